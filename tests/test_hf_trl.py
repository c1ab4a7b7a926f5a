"""TRL's SFTTrainer on a patched model: what it trains with and what it logs.

TRL 1.16's SFTTrainer installs a fused LM head of its own (``add_fused_lm_head``: per-token log-probs,
entropy and top-1 hits without the full logits) and calls the model with ``fused_lm_head=True``; that
forward projects through ``lm_head`` itself. On a patched model (TRL imported first) that head is this
op: the loss, ``mean_token_accuracy`` and ``entropy`` come from one ``linear_cross_entropy`` pass with
``return_stats``, and must equal what the stock model logs through TRL's own head.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import trl.trainer.utils  # noqa: E402,F401  (imported before patch, as a TRL script does)

import tiedkernels.functional as tkf  # noqa: E402
import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf import _trl  # noqa: E402
from _hf_testing import build  # noqa: E402

VOCAB = 101


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def dataset():
    # A few short sequences repeated, so that a few steps at a high learning rate make some top-1
    # predictions right (mean_token_accuracy above 0).
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(2)] * 4
    return datasets.Dataset.from_dict({"input_ids": rows})


def run(model, out, peft_config=None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=5e-2,
                     logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no",
                     dataloader_num_workers=0, bf16=False)
    tr = SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer(),
                    peft_config=peft_config)
    tr.train()
    run.trainer = tr
    return [{k: h[k] for k in ("loss", "mean_token_accuracy", "entropy")} for h in tr.state.log_history if "loss" in h]


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls of the fused op with per-token statistics (the way the TRL stand-in calls it)."""
    calls = []
    real = tkf.linear_cross_entropy

    def spy(*a, **kw):
        if kw.get("return_stats"):
            calls.append(kw.get("reduction"))
        return real(*a, **kw)

    monkeypatch.setattr(tkf, "linear_cross_entropy", spy)
    return calls


def test_sft_trainer_logs_what_stock_logs(tmp_path, fused_calls):
    ref = run(build("llama", vocab=VOCAB, dtype=torch.float32).train(), tmp_path / "stock")
    assert fused_calls == []  # a stock model's weight: TRL's own head
    model = tkhf.patch(build("llama", vocab=VOCAB, dtype=torch.float32).train())
    assert isinstance(trl.trainer.utils._ChunkedLogProbFunction, _trl.TiedLogProbFunction)
    got = run(model, tmp_path / "patched")
    assert fused_calls and set(fused_calls) == {"none"}, fused_calls  # this op computed TRL's head
    assert len(got) == len(ref) == 6
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(torch.tensor([h[key] for h in got]), torch.tensor([h[key] for h in ref]),
                                   atol=1e-5, rtol=1e-5, msg=key)
    assert max(h["mean_token_accuracy"] for h in ref) > 0
    assert tkhf.is_patched(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sft_trainer_with_lora_logs_what_stock_logs(tmp_path, fused_calls):
    """SFTTrainer with a PEFT LoRA config (attention projections): same logged loss, accuracy and entropy
    as the stock model under the same config; the base model stays patched and tied under the adapter,
    and only the adapter trained."""
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               task_type="CAUSAL_LM")

    ref = run(build("llama", vocab=VOCAB, dtype=torch.float32).train(), tmp_path / "stock", lora())
    base = tkhf.patch(build("llama", vocab=VOCAB, dtype=torch.float32).train())
    w0 = base.model.embed_tokens.weight.detach().clone()
    n = len(fused_calls)
    got = run(base, tmp_path / "patched", lora())
    assert len(fused_calls) > n, "the fused op did not compute TRL's head under the adapter"
    trained = run.trainer.model
    assert len(got) == len(ref) == 6
    for key in ("loss", "mean_token_accuracy", "entropy"):
        torch.testing.assert_close(torch.tensor([h[key] for h in got]), torch.tensor([h[key] for h in ref]),
                                   atol=1e-5, rtol=1e-5, msg=key)
    assert ref[-1]["loss"] < ref[0]["loss"]
    inner = trained.get_base_model()
    assert tkhf.is_patched(inner)
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    torch.testing.assert_close(inner.model.embed_tokens.weight.detach(), w0, atol=0, rtol=0)  # frozen
    assert any("lora_" in n for n, p in trained.named_parameters() if p.requires_grad)


def test_stand_in_matches_trls_function_and_refuses_entropy_gradients():
    """The stand-in on TRL's arguments (fp64, a bias, logit scale, softcap or temperature) against plain
    PyTorch on the full logits in the order TRL applies them (scale, softcap, temperature) and against
    TRL's own function (which computes in fp32): log-probs and their gradient, entropy, top-1; what it
    does not answer exactly goes to TRL's function; a gradient through the entropy is a clear error."""
    model = tkhf.patch(build("llama", vocab=VOCAB, dtype=torch.float64))
    w = model.lm_head.weight
    stand_in = _trl.TiedLogProbFunction(trl.kernels.ChunkedLogProbFunction)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(13, w.shape[1], dtype=torch.float64, generator=g)
    y = torch.randint(0, VOCAB, (13,), generator=g)
    b = torch.randn(VOCAB, dtype=torch.float64, generator=g)
    up = torch.randn(13, dtype=torch.float64, generator=g)
    outs = ("log_probs", "entropy", "is_top1")

    def plain(hh, bias, temp, cap, scale):
        z = (hh @ w.detach().T + (0 if bias is None else bias)) * scale
        z = z if cap is None else cap * torch.tanh(z / cap)
        logp = torch.log_softmax(z / temp, -1)
        return logp.gather(1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1), z.argmax(-1) == y

    for bias, temp, cap, scale in ((None, 1.0, None, 1.0), (b, 0.7, None, 0.5), (b, 1.0, 3.0, 2.0)):
        res = []
        for fn in (stand_in, trl.kernels.ChunkedLogProbFunction, plain):
            hh = h.clone().requires_grad_()
            out = fn(hh, bias, temp, cap, scale) if fn is plain else fn.apply(hh, w, bias, y, temp, 32, cap, scale,
                                                                               outs)
            lp, ent, top = (out[0], out[1], out[-1])
            (gh,) = torch.autograd.grad((lp * up.to(lp.dtype)).sum(), hh)
            res.append((lp.detach().double(), ent.detach().double(), top, gh))
        ours, theirs, truth = res
        for i, what in enumerate(("log_probs", "entropy", "is_top1", "grad")):
            if what == "is_top1":
                assert torch.equal(ours[i], truth[i]) and torch.equal(theirs[i], truth[i])
                continue
            torch.testing.assert_close(ours[i], truth[i], atol=1e-10, rtol=1e-10, msg=what)
            torch.testing.assert_close(theirs[i], truth[i], atol=1e-5, rtol=1e-5, msg=f"TRL's {what}")
    # not answered here: TRL's function (the spy sees no call)
    calls = []
    real = tkf.linear_cross_entropy
    tkf.linear_cross_entropy = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for args in ((h, w, None, y, 0.7, 32, 3.0, 1.0, outs),  # temperature after a softcap
                     (h, w, None, y, 1.0, 32, None, 1.0, ("log_probs", "mean_logits")),
                     (h, w.detach().clone(), None, y, 1.0, 32, None, 1.0, outs),  # not a patched weight
                     (h.float(), w, None, y, 1.0, 32, None, 1.0, outs)):  # mixed dtypes (cast_lm_head_to_fp32)
            stand_in.apply(*args)
    finally:
        tkf.linear_cross_entropy = real
    assert calls == []
    hh = h.clone().requires_grad_()
    lp, ent, *_ = stand_in.apply(hh, w, None, y, 1.0, 32, None, 1.0, outs)
    with pytest.raises(NotImplementedError, match="entropy .* has no gradient"):
        (lp.sum() + ent.sum()).backward()
