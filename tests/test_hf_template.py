"""The template model (tiedkernels.hf.modeling_tiny): tied by transformers itself, round-trips, generates."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels import TiedEmbeddingHead, TiedOutputEmbedding  # noqa: E402
from tiedkernels.hf.modeling_tiny import TinyConfig, TinyForCausalLM, register  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5


def tiny(**kw):
    torch.manual_seed(0)
    cfg = TinyConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kw)
    return TinyForCausalLM(cfg).double().eval()


def reference_loss(model, ids, labels):
    """The same model computed with plain PyTorch: logits from the shared weight, shifted CE."""
    h = model.model(input_ids=ids).last_hidden_state
    logits = h @ model.model.embed_tokens.weight.T
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_tied_by_transformers():
    model = tiny()
    emb = model.get_input_embeddings()
    assert isinstance(emb, TiedEmbeddingHead) and isinstance(model.get_output_embeddings(), TiedOutputEmbedding)
    assert model.lm_head.weight is emb.weight
    assert list(model.state_dict()).count("lm_head.weight") == 1
    if V5:
        assert model.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    # HF's tie_weights re-ties a broken tie on its own
    model.lm_head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    assert not tkhf.inspect_ties(model, verbose=False).ok
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tkhf.inspect_ties(model, verbose=False).ok


def test_fused_loss_and_gradients():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, ids, labels)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, atol=1e-12, rtol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-12, rtol=1e-12, msg=n)
    both = model(input_ids=ids, labels=labels, return_logits=True)
    assert both.logits.shape == (2, 11, 97)
    torch.testing.assert_close(both.loss, ref, atol=1e-12, rtol=1e-12)


def test_save_load_and_generate(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = TinyForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied by transformers
    assert loaded.lm_head is loaded.model.embed_tokens.output_embeddings
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    register()
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert type(auto) is TinyForCausalLM
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    a, b = model.generate(ids, **kw), auto.generate(ids, **kw)
    assert a.shape == (2, 12) and torch.equal(a, b)
    # greedy decoding is the argmax of the full-sequence logits, step by step
    seq = ids
    for _ in range(6):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(a, seq)


def test_resize_keeps_the_head():
    model = tiny()
    w = model.model.embed_tokens.weight
    model.resize_token_embeddings(101, mean_resizing=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, TiedEmbeddingHead) and emb.weight is w and w.shape == (101, 32)
    assert model.lm_head.weight is w and model.lm_head.out_features == 101 and model.config.vocab_size == 101
    ids = torch.tensor([[100, 3, 5, 7]])
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_untied_config_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings must be True"):
        tiny(tie_word_embeddings=False)
