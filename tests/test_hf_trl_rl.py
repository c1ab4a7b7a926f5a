"""TRL's RL and distillation trainers on a patched model: the fused paths run and the logs are TRL's own.

* ``GRPOTrainer`` asks its fused LM head for log-probs and entropy (``add_fused_lm_head``); on a patched model
  ``token_log_probs`` answers, both with gradients (the entropy bonus trains through the entropy).
* ``DistillationTrainer`` projects student and teacher through ``ChunkedDivergenceFunction``; on a patched
  student ``linear_distillation_loss`` answers.
* ``GKDTrainer`` (experimental) builds both models' full logits; on a patched student its loss comes from the
  backbones' hidden states through ``linear_distillation_loss``.

Each trainer runs a few steps stock and patched from the same fp64 weights and seed; the logged metrics must
agree (TRL's own kernels compute in fp32, hence the tolerance) and the fused function must have been called.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils  # noqa: E402,F401  (imported before patch, as a TRL script does)
import trl.trainer.distillation_trainer  # noqa: E402,F401
import trl.kernels.chunked_divergence  # noqa: E402,F401
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels import distill, objectives  # noqa: E402
from tiedkernels.hf import _trl  # noqa: E402
from _hf_testing import build  # noqa: E402
from _rl_reference import final_logits, jsd  # noqa: E402

VOCAB = 61
F64 = torch.float64


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return out


@pytest.fixture
def spies(monkeypatch):
    calls = {"token_log_probs": 0, "distillation": 0}
    real_tlp, real_dist = objectives.token_log_probs, distill.linear_distillation_loss

    def tlp(*a, **k):
        calls["token_log_probs"] += 1
        return real_tlp(*a, **k)

    def dist(*a, **k):
        calls["distillation"] += 1
        return real_dist(*a, **k)

    monkeypatch.setattr(objectives, "token_log_probs", tlp)
    monkeypatch.setattr(distill, "linear_distillation_loss", dist)
    return calls


def _logged(trainer, keys=None):
    rows = [h for h in trainer.state.log_history if "loss" in h]
    skip = {"step_time", "learning_rate", "epoch", "step"}
    return [{k: v for k, v in r.items() if isinstance(v, float) and k not in skip and (keys is None or k in keys)}
            for r in rows]


def _compare(stock, patched, rtol, atol=1e-7):
    assert len(stock) == len(patched) > 0
    for a, b in zip(stock, patched):
        assert set(a) == set(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=atol), (k, a[k], b[k])


def _stock_then_patched(run, tmp_path, spies, key):
    """Both runs' logs; the fused function is called in the patched run only."""
    stock = run(False, tmp_path / "stock")
    assert spies[key] == 0
    patched = run(True, tmp_path / "patched")
    assert spies[key] > 0
    return stock, patched


def _common(out):
    return dict(output_dir=str(out), learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                save_strategy="no", bf16=False, dataloader_num_workers=0)


def test_grpo_trainer_logs_what_stock_logs(tmp_path, spies):
    from trl import GRPOConfig, GRPOTrainer

    base = tmp_path / "base"
    build("llama", vocab=VOCAB, dtype=F64).save_pretrained(base)  # the reference model loads from here

    def reward(completions, **kw):
        return [float(c.count("t7")) - 0.1 * len(c.split()) for c in completions]

    def run(patched, out):
        model = build("llama", vocab=VOCAB, dtype=F64)
        model.config._name_or_path = str(base)
        if patched:
            tkhf.patch(model)
        ds = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9", "t10 t11 t12", "t3 t4"] * 2})
        args = GRPOConfig(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=3,
                          beta=0.04, entropy_coef=0.01, loss_type="dapo", num_iterations=2, **_common(out))
        tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer())
        tr.train()
        return _logged(tr)

    stock, patched = _stock_then_patched(run, tmp_path, spies, "token_log_probs")
    assert {"loss", "entropy", "kl", "clip_ratio/region_mean", "grad_norm"} <= set(stock[1])
    _compare(stock, patched, rtol=2e-5)


def test_grpo_trainer_with_the_patch_filter(tmp_path, monkeypatch):
    """patch(model, grad_filter=t) reaches GRPOTrainer's fused head: the training calls get t (the
    no-grad ones of the reference and old policies too, where it changes nothing), the first step's loss
    is the unfiltered one (the loss is exact) and its gradient norm is not (a large t on this flat
    softmax leaves most columns out)."""
    from trl import GRPOConfig, GRPOTrainer

    seen = []
    real = objectives.token_log_probs

    def tlp(*a, **k):
        seen.append(k.get("grad_filter"))
        return real(*a, **k)

    monkeypatch.setattr(objectives, "token_log_probs", tlp)
    base = tmp_path / "base"
    build("llama", vocab=VOCAB, dtype=F64).save_pretrained(base)

    def reward(completions, **kw):
        return [float(c.count("t7")) - 0.1 * len(c.split()) for c in completions]

    def run(grad_filter, out):
        model = build("llama", vocab=VOCAB, dtype=F64)
        model.config._name_or_path = str(base)
        tkhf.patch(model, grad_filter=grad_filter)
        ds = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9", "t10 t11 t12", "t3 t4"] * 2})
        args = GRPOConfig(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                          beta=0.0, entropy_coef=0.01, loss_type="dapo", **_common(out))
        tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer())
        tr.train()
        return _logged(tr, {"loss", "grad_norm"})

    exact = run(None, tmp_path / "exact")
    assert set(seen) == {None}
    seen.clear()
    filtered = run(0.5, tmp_path / "filtered")
    assert 0.5 in seen
    assert filtered[0]["loss"] == pytest.approx(exact[0]["loss"], rel=1e-12, abs=1e-14)
    assert filtered[0]["grad_norm"] != pytest.approx(exact[0]["grad_norm"], rel=1e-6)


def test_distillation_trainer_logs_what_stock_logs(tmp_path, spies):
    from trl import DistillationConfig, DistillationTrainer

    def run(patched, out):
        model = build("llama", vocab=VOCAB, dtype=F64)
        teacher = build("llama", vocab=VOCAB, dtype=F64, seed=1, hidden_size=48)  # another width
        if patched:
            tkhf.patch(model)
        ds = datasets.Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9", "t10 t11 t12", "t3 t4"] * 2})
        args = DistillationConfig(per_device_train_batch_size=4, max_completion_length=6, max_steps=3, beta=0.5,
                                  temperature=0.9, **_common(out))
        tr = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds,
                                 processing_class=tokenizer())
        tr.train()
        return _logged(tr)

    stock, patched = _stock_then_patched(run, tmp_path, spies, "distillation")
    assert {"loss", "entropy", "grad_norm"} <= set(stock[0])
    # TRL's divergence kernel sums in fp32: a JSD of ~0.02 from terms of the size of the entropy (~4)
    # and the steps after the first start from weights that moved by those differences
    _compare(stock, patched, rtol=2e-4, atol=5e-6)


def test_gkd_trainer_logs_what_stock_logs(tmp_path, spies):
    def run(patched, out):
        model = build("llama", vocab=VOCAB, dtype=F64)
        teacher = build("llama", vocab=VOCAB, dtype=F64, seed=1, hidden_size=48)
        if patched:
            tkhf.patch(model)
        msgs = [[{"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t7 t8 t9"}],
                [{"role": "user", "content": "t10"}, {"role": "assistant", "content": "t11 t12"}]] * 4
        ds = datasets.Dataset.from_dict({"messages": msgs})
        args = GKDConfig(per_device_train_batch_size=4, max_new_tokens=4, max_steps=3, lmbda=0.0, beta=0.3,
                         **_common(out))
        tr = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tokenizer())
        tr.train()
        return _logged(tr)

    stock, patched = _stock_then_patched(run, tmp_path, spies, "distillation")
    assert spies["distillation"] == 3  # one fused loss per step
    assert stock[0]["loss"] > 0
    _compare(stock, patched, rtol=1e-10)  # both fp64 from end to end


def test_stand_ins_against_trls_functions_and_full_logits():
    """Log-probs and entropy with their gradients (temperature after a softcap included) and the per-token
    divergence with its gradient, against plain fp64 PyTorch and TRL's own functions."""
    model = tkhf.patch(build("llama", vocab=VOCAB, dtype=F64))
    w = model.lm_head.weight
    g = torch.Generator().manual_seed(3)
    h = torch.randn(13, w.shape[1], dtype=F64, generator=g)
    y = torch.randint(0, VOCAB, (13,), generator=g)
    y[4] = -100
    b = torch.randn(VOCAB, dtype=F64, generator=g)
    ups = torch.randn(2, 13, dtype=F64, generator=g)
    ups[:, 4] = 0  # TRL's trainers mask what an ignored position yields; its function leaves it unspecified
    stand_in = _trl.TiedLogProbFunction(trl.kernels.ChunkedLogProbFunction)
    for bias, temp, cap, scale in ((None, 1.0, None, 1.0), (b, 0.7, 3.0, 2.0)):
        res = []
        for fn in ("ours", "trl", "plain"):
            hh = h.clone().requires_grad_()
            if fn == "plain":
                ls = torch.log_softmax(final_logits(hh, w.detach(), bias, scale, cap, temp), -1)
                lp = torch.where(y != -100, ls.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
                ent = -(ls.exp() * ls).sum(-1)
            else:
                f = stand_in if fn == "ours" else trl.kernels.ChunkedLogProbFunction
                lp, ent = f.apply(hh, w, bias, y, temp, 32, cap, scale, ("log_probs", "entropy"))[:2]
            (gh,) = torch.autograd.grad((lp * ups[0]).sum() + (ent * ups[1]).sum(), hh)
            res.append((lp.detach().double(), ent.detach().double(), gh))
        ours, theirs, truth = res
        keep = y != -100
        for i in range(3):
            torch.testing.assert_close(ours[i], truth[i], atol=1e-10, rtol=1e-10)
            t, tr = (theirs[i][keep], truth[i][keep]) if i < 2 else (theirs[i], truth[i])
            torch.testing.assert_close(t, tr, atol=1e-4, rtol=1e-4)
    trl_div = trl.kernels.chunked_divergence.ChunkedDivergenceFunction
    div_in = _trl.TiedDivergenceFunction(trl_div)
    ht = torch.randn(13, 40, dtype=F64, generator=g)
    wt = torch.randn(VOCAB, 40, dtype=F64, generator=g) * 0.3
    for beta, temp in ((0.0, 1.0), (0.4, 0.8), (1.0, 2.0)):
        res = []
        for fn in ("ours", "trl", "plain"):
            hh = h.clone().requires_grad_()
            if fn == "plain":
                d = jsd(final_logits(hh, w.detach(), None, 1.5, 4.0) / temp, (ht @ wt.T) / temp, beta)
            else:
                f = div_in if fn == "ours" else trl_div
                d, _ = f.apply(hh, w, None, ht, wt, None, beta, temp, 1.5, 4.0, 1.0, None)
            (gh,) = torch.autograd.grad((d * ups[0]).sum(), hh)
            res.append((d.detach().double(), gh))
        ours, theirs, truth = res
        for a, t, tr in zip(ours, theirs, truth):
            torch.testing.assert_close(a, tr, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(t, tr, atol=1e-4, rtol=1e-4)
