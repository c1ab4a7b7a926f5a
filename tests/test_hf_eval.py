"""A patched model where the caller reads its outputs: evaluation with metrics, and the tuple and dict forms.

In eval mode a patched model called with ``labels`` runs the stock forward: real logits and the stock loss,
so ``Trainer.evaluate()`` hands ``compute_metrics`` what it hands it for the stock model. In training mode
the loss fuses and the logits entry holds the storage-less ``LazyLogits`` (built, exactly, only when
something reads it). Either way ``model(..., return_dict=False)`` equals ``model(...).to_tuple()`` position
by position, as transformers' own ``test_model_outputs_equivalence`` checks, and equals the stock model's.

Models are float64 with every dropout at 0 (tests/_hf_testing.py). Tolerances as in test_hf_patch.py: the
stock causal-LM loss rounds the logits to float32, so losses, gradients and what training changes agree to
1e-6 there; the other heads compute in float64 (1e-10). Logits the two models compute the same way (eval
mode, or a ``LazyLogits`` built) agree to 1e-12.
"""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf import _forward  # noqa: E402
from tiedkernels.hf._lazy import LazyLogits  # noqa: E402
from _hf_testing import ARCHS, CAUSAL, SCALED, batch, build  # noqa: E402

EXACT = dict(atol=1e-12, rtol=1e-12)


def tol(arch):
    return dict(atol=1e-6, rtol=1e-6) if arch in CAUSAL else dict(atol=1e-10, rtol=1e-10)


def pair(arch, **kw):
    stock = build(arch, **kw)
    return stock, tkhf.patch(copy.deepcopy(stock))


@pytest.fixture
def lazy_uses(monkeypatch):
    """How often a patched forward took the fused loss from ``LazyLogits`` and how often anything built
    the full logits from one (or ran a model whose head cannot fuse): the memory saving holds while
    ``built`` stays 0."""
    seen = {"fused": 0, "built": 0}
    fused, built, unfused = LazyLogits.fused_loss, LazyLogits.materialize, _forward._warn_unfused

    def count(key, fn):
        def spy(*a, **k):
            seen[key] += 1
            return fn(*a, **k)
        return spy

    monkeypatch.setattr(LazyLogits, "fused_loss", count("fused", fused))
    monkeypatch.setattr(LazyLogits, "materialize", count("built", built))
    monkeypatch.setattr(_forward, "_warn_unfused", count("built", unfused))
    return seen


# -- Trainer.evaluate with compute_metrics -----------------------------------------------------------

class Rows(torch.utils.data.Dataset):
    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(self.columns["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def train_then_evaluate(arch, model, out):
    """Two optimizer steps of two accumulated micro-batches, then ``evaluate()`` with an accuracy from the
    argmax of the logits. Returns the logged training losses, the eval metrics and what
    ``compute_metrics`` received."""
    got = {}

    def accuracy(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids
        if arch in CAUSAL:  # the logits at position t predict the token at t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        got["logits"], got["labels"] = logits, labels
        mask = labels != -100
        return {"accuracy": float((logits.argmax(-1) == labels)[mask].mean())}

    train = batch(arch, model, batch_size=8, seed=1)
    ev = batch(arch, model, batch_size=6, seed=2)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                             report_to=[], use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0)
    tr = Trainer(model=model, args=args, train_dataset=Rows(train), eval_dataset=Rows(ev), compute_metrics=accuracy)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    return losses, tr.evaluate(), got


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_trainer_evaluate_with_compute_metrics_equals_stock(arch, tmp_path, lazy_uses):
    stock, model = pair(arch)
    ref_losses, ref, ref_got = train_then_evaluate(arch, stock.train(), tmp_path / "stock")
    assert lazy_uses == {"fused": 0, "built": 0}
    losses, res, got = train_then_evaluate(arch, model.train(), tmp_path / "patched")
    # training fused every micro-batch and never built the logits; evaluation ran the stock forward
    assert lazy_uses == {"fused": 4, "built": 0}
    assert len(losses) == len(ref_losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol(arch))
    assert got["logits"].shape == ref_got["logits"].shape and got["logits"].shape[-1] == stock.config.vocab_size
    np.testing.assert_array_equal(got["labels"], ref_got["labels"])
    torch.testing.assert_close(torch.from_numpy(got["logits"]), torch.from_numpy(ref_got["logits"]), **tol(arch))
    assert res["eval_accuracy"] == ref["eval_accuracy"]
    torch.testing.assert_close(torch.tensor(res["eval_loss"]), torch.tensor(ref["eval_loss"]), **tol(arch))
    assert not model.training and tkhf.is_patched(model)


# -- eval mode: the stock forward ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS + SCALED)
def test_eval_mode_with_labels_returns_the_stock_logits_and_loss(arch, lazy_uses):
    stock, model = pair(arch)
    assert not model.training
    b = batch(arch, stock)
    ref, out = stock(**b), model(**b)
    assert type(out.logits) is torch.Tensor
    torch.testing.assert_close(out.logits, ref.logits, **EXACT)
    torch.testing.assert_close(out.loss, ref.loss, **EXACT)
    ref.loss.backward()
    out.loss.backward()
    grads = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, **EXACT, msg=name)
    assert lazy_uses == {"fused": 0, "built": 0}
    # the same model in training mode fuses again
    model.train()
    out = model(**b)
    assert isinstance(out.logits, LazyLogits) and lazy_uses["fused"] == 1
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **tol(arch))


# -- tuple and dict forms ------------------------------------------------------------------------------

def _same(a, b, where, close):
    """``a`` and ``b`` hold the same structure and values (tensors compared by ``close``, Cache objects by
    their contents)."""
    if a is None or b is None:
        assert a is None and b is None, f"{where}: {type(a).__name__} against {type(b).__name__}"
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} against {type(b)}"
        assert not isinstance(a, LazyLogits) and not isinstance(b, LazyLogits), where
        close(a, b, msg=where)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__} of {len(a)} against " \
                                                        f"{type(b).__name__} of {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", close)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}", close)
    elif type(a).__module__.startswith("transformers"):  # a Cache: its layers' keys and values
        assert type(a) is type(b), f"{where}: {type(a).__name__} against {type(b).__name__}"
        _same(vars(a), vars(b), f"{where}({type(a).__name__})", close)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _built(out):
    """``out`` with each ``LazyLogits`` built (what reading it gives)."""
    if isinstance(out, LazyLogits):
        return out.materialize()
    if isinstance(out, tuple):
        return tuple(_built(o) for o in out)
    return out


# use_cache values each model takes (None: not passed, the config's default)
CACHED = {"gpt2": (None, True, False), "llama": (None, True, False), "t5": (None, True, False),
          "bart": (None, True, False), "bert": (None,)}


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5", "bart", "llama"])
def test_tuple_and_dict_outputs_agree_with_each_other_and_with_stock(arch, mode, labels, lazy_uses):
    stock, model = pair(arch)
    getattr(stock, mode)()
    getattr(model, mode)()
    fused = mode == "train" and labels
    for n, use_cache in enumerate(CACHED[arch], 1):
        b = batch(arch, stock)
        if not labels:
            if arch in ("t5", "bart"):
                b["decoder_input_ids"] = b["labels"].clamp_min(3)
            del b["labels"]
        if use_cache is not None:
            b["use_cache"] = use_cache
        with torch.set_grad_enabled(mode == "train"):
            outs = {"stock tuple": stock(**b, return_dict=False),
                    "stock dict": stock(**b, return_dict=True).to_tuple(),
                    "tuple": model(**b, return_dict=False), "dict": model(**b, return_dict=True).to_tuple()}
        assert lazy_uses == {"fused": 2 * n if fused else 0, "built": 0}, use_cache
        ref = outs["stock tuple"]
        _same(outs["stock dict"], ref, f"use_cache={use_cache}: stock dict",
              lambda a, b, msg: torch.testing.assert_close(a, b, atol=0, rtol=0, msg=msg))
        for form in ("tuple", "dict"):
            out = outs[form]
            where = f"use_cache={use_cache}: {form}"
            assert type(out) is tuple and len(out) == len(ref), (where, [type(o).__name__ for o in out])
            lazy = [i for i, o in enumerate(out) if isinstance(o, LazyLogits)]
            assert lazy == ([1] if fused else []), where  # (loss, logits, ...): the logits' own position
            # the fused loss to its tolerance; everything else (the built logits too) is what the same
            # modules compute
            _same(_built(out), ref, where, lambda a, b, msg: torch.testing.assert_close(
                a, b, **(tol(arch) if fused and msg == f"{where}[0]" else EXACT), msg=msg))
        lazy_uses["built"] = 0  # _built above


def test_peft_lora_training_step_keeps_the_logits_unbuilt(lazy_uses):
    # PEFT's wrapper hands the base model's output back as it is: the placeholder, at its place.
    peft = pytest.importorskip("peft")
    def lora(m):
        torch.manual_seed(0)  # the same random adapter on both
        return peft.get_peft_model(m.train(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))

    stock, model = pair("llama")
    ps, pp = lora(stock), lora(model)
    b = batch("llama", stock)
    ref, out = ps(**b), pp(**b)
    ref.loss.backward()
    out.loss.backward()
    assert isinstance(out.logits, LazyLogits) and lazy_uses == {"fused": 1, "built": 0}
    torch.testing.assert_close(out.loss, ref.loss, **tol("llama"))
    grads = {n: p.grad for n, p in ps.named_parameters() if p.requires_grad}
    assert grads
    for n, p in pp.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], **tol("llama"), msg=n)
    torch.testing.assert_close(out.logits.materialize(), ref.logits, **EXACT)  # before any optimizer step
