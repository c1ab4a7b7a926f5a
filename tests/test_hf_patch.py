"""tiedkernels.hf.patch / unpatch on tiny models of every supported architecture.

Models are built in float64 with identical weights; the stock model is a deep copy taken before
patching. ``pair`` puts both in training mode, where the patched loss fuses (every dropout is 0, so the
two modes compute the same values; eval mode runs the stock forward: tests/test_hf_eval.py).
Tolerances: the stock causal-LM loss (``ForCausalLMLoss``) upcasts the logits with ``.float()``, i.e. it
rounds them to float32 (relative error 2**-24 ≈ 6e-8 per logit) while the fused loss stays in float64; for logits of size O(1) and losses O(5) that bounds loss and gradient
differences by ~1e-6, hence atol=1e-6/rtol=1e-6 there. The other heads (BERT, T5, BART) compute
the stock loss in float64: 1e-10 there.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf._lazy import LazyLogits  # noqa: E402
from tiedkernels.hf._modules import HFTiedEmbedding, HFTiedOutput  # noqa: E402
from _hf_testing import ARCHS, CAUSAL, SCALED, batch, build  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5


def tol(arch):
    return dict(atol=1e-6, rtol=1e-6) if arch in CAUSAL else dict(atol=1e-10, rtol=1e-10)


def pair(arch, **kw):
    stock = build(arch, **kw).train()
    model = copy.deepcopy(stock)
    tkhf.patch(model)
    return stock, model


def tied_param(model):
    return model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_installs_one_head_on_the_existing_parameter(arch):
    stock = build(arch)
    keys = list(stock.state_dict().keys())
    nparams = sum(p.numel() for p in stock.parameters())
    w = stock.get_input_embeddings().weight
    bias = stock.get_output_embeddings().bias
    tied = dict(getattr(stock, "all_tied_weights_keys", {}))
    assert tkhf.patch(stock) is stock
    inp, out = stock.get_input_embeddings(), stock.get_output_embeddings()
    assert isinstance(inp, HFTiedEmbedding) and isinstance(out, HFTiedOutput)
    assert out is inp.output_embeddings
    assert inp.weight is w and out.weight is w
    assert out.bias is bias
    if arch == "bert":
        assert out.bias is stock.cls.predictions.bias
    assert list(stock.state_dict().keys()) == keys
    assert sum(p.numel() for p in stock.parameters()) == nparams
    if V5:
        assert stock.all_tied_weights_keys == tied and tied
    # HF's own tie_weights keeps all of it (both signatures on v5)
    stock.tie_weights()
    if V5:
        stock.tie_weights(missing_keys=None, recompute_mapping=False)
        stock.tie_weights(recompute_mapping=True)
        assert stock.all_tied_weights_keys == tied
    assert stock.get_input_embeddings() is inp and stock.get_output_embeddings() is out
    assert out.weight is w and inp.weight is w
    # idempotent
    tkhf.patch(stock)
    assert stock.get_input_embeddings() is inp and stock.get_output_embeddings() is out
    assert list(stock.state_dict().keys()) == keys
    # every path that held the stock embedding holds the head (T5/BART encoder and decoder)
    for name, mod in stock.named_modules(remove_duplicate=False):
        assert not (isinstance(mod, torch.nn.Embedding) and mod.weight is w and mod is not inp), name


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_stock_modules(arch):
    stock, model = pair(arch)
    w = tied_param(model)
    tkhf.unpatch(model)
    tkhf.unpatch(model)  # idempotent
    assert type(model.get_input_embeddings()) is type(stock.get_input_embeddings())
    assert type(model.get_output_embeddings()) is type(stock.get_output_embeddings())
    assert model.get_input_embeddings().weight is w and model.get_output_embeddings().weight is w
    assert "forward" not in model.__dict__ and not tkhf.is_patched(model)
    assert list(model.state_dict().keys()) == list(stock.state_dict().keys())
    b = batch(arch, stock)
    torch.testing.assert_close(model(**b).loss, stock(**b).loss, atol=0, rtol=0)
    tkhf.patch(model)
    assert isinstance(model.get_input_embeddings(), HFTiedEmbedding)


@pytest.mark.parametrize("arch", ARCHS + SCALED)
def test_fused_loss_and_every_gradient_equal_stock(arch):
    stock, model = pair(arch)
    b = batch(arch, stock)
    ref = stock(**b)
    ref.loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to materialized logits
        out = model(**b)
    assert isinstance(out.logits, LazyLogits)  # never built
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **tol(arch))
    grads = dict(stock.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, **tol(arch), msg=name)
        n += 1
    assert n == len(list(stock.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
def test_return_logits_flag(arch):
    stock, model = pair(arch)
    b = batch(arch, stock)
    ref = stock(**b)
    out = model(**b, return_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-12, rtol=1e-12)
    assert type(out.logits) is torch.Tensor
    tkhf.patch(model, return_logits=True)
    assert type(model(**b).logits) is torch.Tensor
    assert isinstance(model(**b, return_logits=False).logits, LazyLogits)
    tkhf.patch(model, fused_loss=False)
    assert type(model(**b).logits) is torch.Tensor
    # without labels the logits are always there and equal
    nb = {k: v for k, v in b.items() if k != "labels"}
    if arch in ("t5", "bart"):
        nb["decoder_input_ids"] = b["labels"].clamp(min=0)
    torch.testing.assert_close(model(**nb).logits, stock(**nb).logits, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tuple_output(arch):
    # The logits keep their position, unbuilt (tests/test_hf_eval.py compares every position).
    stock, model = pair(arch)
    b = batch(arch, stock)
    ref = stock(**b, return_dict=False)
    out = model(**b, return_dict=False)
    assert type(out) is tuple and len(out) == len(ref)
    torch.testing.assert_close(out[0], ref[0], **tol(arch))
    assert isinstance(out[1], LazyLogits) and not any(isinstance(o, LazyLogits) for o in out[2:])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_num_items_in_batch(arch):
    stock, model = pair(arch)
    b = batch(arch, stock)
    n = torch.tensor(23)
    ref = stock(**b, num_items_in_batch=n)
    out = model(**b, num_items_in_batch=n)
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **tol(arch))
    plain = model(**b).loss
    valid = (b["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss * 23, plain * valid, **tol(arch))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_logits_to_keep(arch):
    stock, model = pair(arch)
    ids = batch(arch, stock)["input_ids"]
    ref = stock(input_ids=ids, logits_to_keep=1).logits
    out = model(input_ids=ids, logits_to_keep=1).logits
    assert out.shape == ref.shape == (2, 1, stock.config.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_gemma2_softcap_is_applied():
    stock, model = pair("gemma2")
    ids = batch("gemma2", stock)["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.abs().max() <= 0.5
    b = batch("gemma2", stock)
    nocap = copy.deepcopy(stock)
    nocap.config.final_logit_softcapping = None
    assert abs(nocap(**b).loss.item() - stock(**b).loss.item()) > 1e-3  # the cap matters here
    torch.testing.assert_close(model(**b).loss.double(), stock(**b).loss.double(), **tol("gemma2"))


def test_untied_config_is_refused():
    model = build("llama", tie_word_embeddings=False)
    model = type(model)(model.config)  # built untied
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        tkhf.patch(model)
    assert not tkhf.is_patched(model)
    w = model.model.embed_tokens.weight
    tkhf.patch(model, force_tie=True)
    assert model.lm_head.weight is w and model.config.tie_word_embeddings
    if V5:
        assert model.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.skipif(V5, reason="config.torchscript clones the tied weight on transformers v4 only")
def test_torchscript_refused_on_v4():
    model = build("gpt2", torchscript=True)
    with pytest.raises(ValueError, match="torchscript"):
        tkhf.patch(model)


def test_gradient_accumulation_and_tied_gradient_sum():
    """Two micro-batches accumulate into .grad exactly as stock does (embedding + head gradient)."""
    stock, model = pair("gpt2")
    for seed in (1, 2):
        b = batch("gpt2", stock, seed=seed)
        stock(**b).loss.backward()
        model(**b).loss.backward()
    torch.testing.assert_close(tied_param(model).grad, tied_param(stock).grad, **tol("gpt2"))


def test_materializing_fallback_is_exact_and_warns():
    """An operation LazyLogits does not know builds the logits exactly (one warning)."""
    from tiedkernels.hf._lazy import LazyLogits

    _, model = pair("gpt2")
    h = torch.randn(3, 32, dtype=torch.float64)
    out = model.get_output_embeddings()
    lazy = LazyLogits(h, out)
    real = out.real_forward(h)
    with pytest.warns(UserWarning, match="builds the full logits"):
        got = torch.softmax(lazy, -1)
    torch.testing.assert_close(got, torch.softmax(real, -1), atol=0, rtol=0)


def test_logits_of_a_training_step_are_built_exactly_when_read_and_refused_after_a_step(monkeypatch):
    """``out.logits`` of a fused training step is the placeholder: reading it builds the stock logits
    (Gemma 2's recorded softcap included) with one warning; once an optimizer step changed the weight
    in place, reading it, or taking a loss from it, raises instead of using the new weight."""
    from tiedkernels.hf import _lazy

    monkeypatch.setattr(_lazy, "_warned", set())
    stock, model = pair("gemma2")
    b = batch("gemma2", stock)
    ref, out = stock(**b), model(**b)
    out.loss.backward()
    with pytest.warns(UserWarning, match="softmax on the logits of a patched model builds the full logits"):
        probs = torch.softmax(out.logits, -1)
    torch.testing.assert_close(probs, torch.softmax(ref.logits, -1), atol=1e-12, rtol=1e-12)
    assert type(probs) is torch.Tensor
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    v = stock.config.vocab_size
    for read in (lambda lg: lg.argmax(-1), lambda lg: torch.nn.functional.cross_entropy(lg.view(-1, v),
                                                                                       b["labels"].view(-1))):
        with pytest.raises(RuntimeError, match="changed since that forward"):
            read(out.logits)


@pytest.mark.parametrize("arch", SCALED)
def test_logit_scaling_is_applied(arch):
    stock, model = pair(arch)
    ids = batch(arch, stock)["input_ids"]
    ref = stock(input_ids=ids).logits
    h = stock.model(input_ids=ids).last_hidden_state
    raw = h @ stock.model.embed_tokens.weight.T
    scale = stock.config.logit_scale if arch == "cohere" else 1 / stock.config.logits_scaling
    torch.testing.assert_close(ref, raw * scale, atol=1e-12, rtol=1e-12)  # what the stock model does
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-12, rtol=1e-12)


def test_import_tiedkernels_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, tiedkernels; assert 'transformers' not in sys.modules; print(tiedkernels.inspect_ties)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "bert", "bart"])
def test_bfloat16_model_is_at_least_as_accurate_as_stock(arch):
    """bf16 weights: the fused loss accumulates in float32 where stock BERT/BART take the cross-entropy
    of bf16 logits. Against the float64 loss of the same weights, the patched bf16 loss is as close
    as the stock bf16 loss, up to 1e-4 (the bf16 body both share dominates for the causal models)."""
    s64 = build(arch, vocab=512).train()
    b = batch(arch, s64, seq=16)
    ref = s64(**b).loss.item()
    s16 = copy.deepcopy(s64).to(torch.bfloat16)
    p16 = tkhf.patch(copy.deepcopy(s16), backend="torch")
    assert p16.get_input_embeddings().backend == "torch"
    stock_loss = s16(**b).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = p16(**b)
    assert isinstance(out.logits, LazyLogits) and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref) <= abs(stock_loss.item() - ref) + 1e-4
    out.loss.backward()
    w = p16.get_input_embeddings().weight
    assert w.grad is not None and w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()
    tkhf.patch(p16, backend="auto")
    assert p16.get_input_embeddings().backend == "auto"


def test_deepcopy_of_a_patched_model_is_patched_on_its_own_weights():
    stock, model = pair("llama")
    twin = copy.deepcopy(model)
    assert tkhf.is_patched(twin)
    w = twin.get_input_embeddings().weight
    assert w is not tied_param(model) and twin.get_output_embeddings().weight is w
    assert twin.forward.__self__ is twin
    b = batch("llama", stock)
    out = twin(**b)
    assert isinstance(out.logits, LazyLogits)
    torch.testing.assert_close(out.loss, stock(**b).loss, **tol("llama"))
    tkhf.unpatch(twin)
    assert tkhf.is_patched(model) and not tkhf.is_patched(twin)
    assert twin.get_input_embeddings().weight is w


@pytest.mark.parametrize("arch", ["llama", "bert", "bart"])
def test_loss_runs_inside_the_output_layers_call_and_survives_output_functions(arch):
    """What ZeRO-3 needs (tests/test_hf_deepspeed.py runs the real thing): the fused loss is taken inside
    a call of the output layer, so hooks around that module's forward see it, with the layer's parameters
    in place; and a module output handed through an identity autograd Function (DeepSpeed does that to
    every output) stays fused, with the stock value and gradients."""

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.detach()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

    stock, model = pair(arch)
    b = batch(arch, stock)
    ref = stock(**b)
    ref.loss.backward()
    head = model.get_output_embeddings()
    seen = []
    pre = head.register_forward_pre_hook(lambda m, args, kw: seen.append(sorted(kw)), with_kwargs=True)
    post = head.register_forward_hook(lambda m, args, out: Identity.apply(out))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # never the materializing fallback
            out = model(**b)
    finally:
        pre.remove()
        post.remove()
    assert seen == [[], ["_lazy_loss"]], seen  # the logits call, then the loss call
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **tol(arch))
    grads = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, **tol(arch), msg=name)


@pytest.mark.parametrize("arch", ["gemma", "bart"])
def test_scaled_embedding_holding_nan_is_patched(arch):
    # Their embeddings override forward, so patch compares the two on a probe of token ids. A weight
    # that holds NaN (to_empty leaves memory uninitialized) is still reproduced: NaN equals NaN there.
    stock = build(arch)
    with torch.no_grad():
        tied_param(stock)[0, 1] = float("nan")
        tied_param(stock)[2, 0] = float("inf")
    model = copy.deepcopy(stock)
    tkhf.patch(model)
    ids = torch.tensor([[0, 2, 3]])
    want, got = stock.get_input_embeddings()(ids), model.get_input_embeddings()(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[0, 0, 1]) and torch.isinf(got[0, 1, 0])


def test_embedding_forward_that_differs_is_refused():
    stock = build("gemma")
    emb = stock.get_input_embeddings()

    class Shifted(type(emb)):
        def forward(self, input_ids):
            return super().forward(input_ids) + 1

    emb.__class__ = Shifted
    weight = emb.weight
    with pytest.raises(TypeError, match="Shifted overrides forward with a computation TiedEmbeddingHead does not "
                                        "reproduce"):
        tkhf.patch(stock)
    assert stock.get_input_embeddings() is emb and emb.weight is weight  # left as it was
