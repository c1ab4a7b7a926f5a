"""Save/load, resize, generate, gradient checkpointing, meta-device construction and torch.compile
of patched models, against stock transformers."""

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf._lazy import LazyLogits  # noqa: E402
from tiedkernels.hf._modules import HFTiedEmbedding, HFTiedOutput  # noqa: E402
from _hf_testing import ARCHS, CAUSAL, batch, build  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
# Stock causal losses round the logits to float32 (see test_hf_patch.py): 1e-6 there, 1e-10 elsewhere.
TOL = {a: (dict(atol=1e-6, rtol=1e-6) if a in CAUSAL else dict(atol=1e-10, rtol=1e-10)) for a in ARCHS}
EXACT = dict(atol=1e-12, rtol=1e-12)


def pair(arch, **kw):
    stock = build(arch, **kw)
    model = copy.deepcopy(stock)
    tkhf.patch(model)
    return stock, model


def assert_patched_and_tied(model):
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(inp, HFTiedEmbedding) and isinstance(out, HFTiedOutput)
    assert out is inp.output_embeddings and out.weight is inp.weight
    v = inp.weight.shape[0]
    assert inp.num_embeddings == v and out.out_features == v and model.config.get_text_config().vocab_size == v
    if out.bias is not None:
        assert out.bias.shape == (v,)


def no_label_inputs(arch, b):
    nb = {"input_ids": b["input_ids"]}
    if arch in ("t5", "bart"):
        nb["decoder_input_ids"] = b["labels"].clamp(min=0)
    return nb


def safetensors_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_patched_load_stock_and_back(arch, tmp_path):
    stock, model = pair(arch)
    cls = type(stock)
    b = batch(arch, stock)
    nb = no_label_inputs(arch, b)
    model.save_pretrained(tmp_path / "patched", safe_serialization=True)
    stock.save_pretrained(tmp_path / "stock", safe_serialization=True)
    # one copy of the tied weight, stored under the same names as stock
    keys = safetensors_keys(tmp_path / "patched")
    assert keys == safetensors_keys(tmp_path / "stock")
    w = model.get_input_embeddings().weight
    aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is w]
    assert len(aliases) >= 2 and len(keys & set(aliases)) == 1
    # The reference is the stock checkpoint loaded by stock transformers (loading may rebuild
    # non-persistent buffers such as Gemma's embed_scale in another precision).
    ref = cls.from_pretrained(tmp_path / "stock", torch_dtype=torch.float64).eval()
    # patched checkpoint -> stock model
    loaded = cls.from_pretrained(tmp_path / "patched", torch_dtype=torch.float64).eval()
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for n, t in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[n], t, atol=0, rtol=0, msg=n)
    torch.testing.assert_close(loaded(**nb).logits, ref(**nb).logits, atol=0, rtol=0)
    # stock checkpoint -> patch
    back = tkhf.patch(cls.from_pretrained(tmp_path / "stock", torch_dtype=torch.float64).eval())
    assert_patched_and_tied(back)
    torch.testing.assert_close(back(**nb).logits, ref(**nb).logits, **EXACT)
    torch.testing.assert_close(back(**b).loss.double(), ref(**b).loss.double(), **TOL[arch])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5", "bart"])
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_token_embeddings(arch, mean_resizing):
    stock, model = pair(arch)
    v = stock.config.vocab_size
    for m in (stock, model):
        torch.manual_seed(7)
        m.resize_token_embeddings(v + 5, pad_to_multiple_of=8, mean_resizing=mean_resizing)
    new = ((v + 5 + 7) // 8) * 8
    assert model.get_input_embeddings().weight.shape[0] == new
    assert_patched_and_tied(model)
    torch.testing.assert_close(model.get_input_embeddings().weight, stock.get_input_embeddings().weight, **EXACT)
    b = batch(arch, stock)
    b["input_ids"][0, 0] = new - 1  # a new token
    ref, out = stock(**b), model(**b)
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **TOL[arch])
    # shrink
    for m in (stock, model):
        m.resize_token_embeddings(v - 3)
    assert_patched_and_tied(model)
    b = batch(arch, stock)
    b["input_ids"] = b["input_ids"] % (v - 3)
    b["labels"] = torch.where(b["labels"] >= 0, b["labels"] % (v - 3), b["labels"])
    torch.testing.assert_close(model(**b).loss.double(), stock(**b).loss.double(), **TOL[arch])
    # unpatch after resizing: stock classes with the resized sizes
    tkhf.unpatch(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(inp) is type(stock.get_input_embeddings()) and type(out) is type(stock.get_output_embeddings())
    assert inp.num_embeddings == out.out_features == v - 3 and out.weight is inp.weight
    torch.testing.assert_close(model(**b).loss, stock(**b).loss, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "t5", "bart"])
def test_greedy_generate_matches_stock(arch):
    stock, model = pair(arch)
    ids = batch(arch, stock)["input_ids"][:, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    ref = stock.generate(ids, **kw)
    out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert out.shape[1] > (1 if arch in ("t5", "bart") else 5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_gradient_checkpointing(arch, reentrant):
    stock, model = pair(arch)
    for m in (stock, model):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert m.is_gradient_checkpointing
    b = batch(arch, stock)
    ref, out = stock(**b), model(**b)
    assert out.logits is None or isinstance(out.logits, LazyLogits)  # fused: no logits built
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), **TOL[arch])
    g = dict(stock.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g[n].grad, **TOL[arch], msg=n)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_to_empty_after_meta_construction_then_tie_weights(arch):
    stock = build(arch)
    with torch.device("meta"):
        model = type(stock)(copy.deepcopy(stock.config)).to(torch.float64)
    tkhf.patch(model)
    model.to_empty(device="cpu")
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert out.weight is not inp.weight  # to_empty re-creates each registration: untied
    model.tie_weights()
    assert_patched_and_tied(model)
    model.load_state_dict(stock.state_dict())
    assert_patched_and_tied(model)
    b = batch(arch, stock)
    torch.testing.assert_close(model.eval()(**b).loss.double(), stock(**b).loss.double(), **TOL[arch])


def test_torch_compile_training_step():
    # float32: transformers v4 builds its causal mask from the dtype's minimum, which the traced
    # graph cannot hold for float64. Both sides compute in float32 with different summation
    # orders (the compiled side runs the stock loss on materialized logits): 1e-5.
    stock, model = pair("gpt2", dtype=torch.float32)
    b = batch("gpt2", stock)
    tol = dict(atol=1e-5, rtol=1e-5)

    def step(m):
        out = m(**b)
        out.loss.backward()
        return out.loss.detach()

    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(2):
        for m in (stock, model):
            m.zero_grad()
        got, ref = compiled(model), step(stock)
        torch.testing.assert_close(got, ref, **tol)
        g = dict(stock.named_parameters())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, g[n].grad, **tol, msg=n)
    assert_patched_and_tied(model)


def test_config_saved_as_tied(tmp_path):
    model = build("llama", tie_word_embeddings=False)
    model = type(model)(model.config)
    tkhf.patch(model, force_tie=True)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in safetensors_keys(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.skipif(not V5, reason="transformers v4 ties only output-to-input: a checkpoint storing just "
                                   "lm_head.weight leaves the embedding unloaded, stock or patched")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_with_only_the_output_key_loads_and_patches(arch, tmp_path):
    """v5 ties whichever of the two keys the checkpoint has."""
    from safetensors.torch import save_file

    stock = build(arch)
    stock.save_pretrained(tmp_path)
    sd = stock.state_dict()
    src = stock.all_tied_weights_keys["lm_head.weight"]
    only_out = {k: v.contiguous() for k, v in sd.items() if k not in (src, "lm_head.weight")}
    only_out["lm_head.weight"] = sd[src].clone()
    save_file(only_out, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = tkhf.patch(type(stock).from_pretrained(tmp_path, torch_dtype=torch.float64).eval())
    assert_patched_and_tied(model)
    torch.testing.assert_close(model.get_input_embeddings().weight, stock.get_input_embeddings().weight,
                               atol=0, rtol=0)
    b = batch(arch, stock)
    torch.testing.assert_close(model(**b).loss.double(), stock(**b).loss.double(), **TOL[arch])
