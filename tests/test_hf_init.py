"""Where the tied weight comes from: ``patch`` decides from the model's real parameters (a checkpoint
that stores its own output layer is refused, equal copies are tied), and every init path a user or a
library takes (meta device, ``init_empty_weights``, ``low_cpu_mem_usage``, ``device_map``, a patched
model's checkpoint, ``_init_weights``) gives a patched model every parameter and buffer stock has,
with stock's values."""

import copy
import io
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tiedkernels.hf as tkhf  # noqa: E402
from tiedkernels.hf import _patch  # noqa: E402
from tiedkernels.hf._modules import HFTiedEmbedding, HFTiedOutput  # noqa: E402
from tiedkernels.hf._ties import same_values  # noqa: E402
from _hf_testing import (ARCHS, batch, build, compare_models, fill_unset_buffers, meta_init,  # noqa: E402
                         nan_empty, save_with_separate_head)

V5 = int(transformers.__version__.split(".")[0]) >= 5
LOAD = {"dtype": torch.float64} if V5 else {"torch_dtype": torch.float64}
LOGITS = dict(atol=1e-10, rtol=1e-10)  # two fp64 models, the same GEMM on the same numbers
# the stock causal loss rounds the fp64 logits to fp32
LOSS = dict(atol=1e-6, rtol=1e-5)


def no_label_inputs(arch, b):
    nb = {"input_ids": b["input_ids"]}
    if arch in ("t5", "bart"):
        nb["decoder_input_ids"] = b["labels"].clamp(min=3)
    return nb


def logits(model, arch, b):
    with torch.no_grad():
        return model(**no_label_inputs(arch, b)).logits


def assert_patched_and_tied(model):
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert _patch.is_patched(model) and isinstance(inp, HFTiedEmbedding) and isinstance(out, HFTiedOutput)
    assert out is inp.output_embeddings and out.weight is inp.weight


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---------------------------------------------------------------------------------------------------
# item 2: decide from the parameters, never from the config alone


def _v11_checkpoint(arch, folder, config_ties):
    """A model saved with its output layer stored apart (T5 v1.1 / Flan-T5 layout), config.json
    saying ``tie_word_embeddings=config_ties``. Returns the stored output weight and its two keys."""
    model = build(arch)
    keys = save_with_separate_head(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = config_ties
    (folder / "config.json").write_text(json.dumps(cfg))
    return keys


@pytest.mark.parametrize("config_ties", [True, False], ids=["config-ties", "config-unties"])
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_separately_stored_head_is_refused_and_force_tie_ties(arch, config_ties, tmp_path):
    """Loaded as stock loads it: where the head stays its own tensor (v5 always; v4 when the config
    unties), patch refuses naming both weights and the model computes as before; ``force_tie`` ties
    it (the output side takes the input embedding's weight). Where transformers itself tied them at
    load (v4, a config that ties), patch goes on and changes nothing."""
    out_key, in_key = _v11_checkpoint(arch, tmp_path, config_ties)
    stock = quiet(type(build(arch)).from_pretrained, tmp_path, **LOAD).eval()
    model = copy.deepcopy(stock)
    b = batch(arch, stock)
    want = logits(stock, arch, b)
    apart = stock.get_output_embeddings().weight is not stock.get_input_embeddings().weight
    assert apart == (V5 or not config_ties)  # what stock transformers does with this checkpoint
    if not apart:
        tkhf.patch(model)
        assert_patched_and_tied(model)
        torch.testing.assert_close(logits(model, arch, b), want, **LOGITS)
        return
    params = [id(p) for p in model.parameters()]
    with pytest.raises(ValueError) as e:
        tkhf.patch(model)
    assert out_key in str(e.value) and in_key in str(e.value)
    # T5Config ties whatever the checkpoint's config says on v5; elsewhere an untying config is named
    config_says = model.config.get_text_config().tie_word_embeddings
    assert ("different values" if config_says else "tie_word_embeddings=False") in str(e.value)
    assert not _patch.is_patched(model) and [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(logits(model, arch, b), want, atol=0, rtol=0)
    # force_tie: the stock model tied by hand computes the same
    tkhf.patch(model, force_tie=True)
    assert_patched_and_tied(model)
    ref = copy.deepcopy(stock)
    for c in (ref.config, ref.config.get_text_config()):
        c.tie_word_embeddings = True
    ref.tie_weights()
    assert ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    torch.testing.assert_close(logits(model, arch, b), logits(ref, arch, b), **LOGITS)
    assert not torch.allclose(logits(model, arch, b), want)  # the stored head did matter


@pytest.mark.parametrize("arch", ["gpt2", "bart", "bert"])
def test_equal_copies_are_tied(arch):
    """Two tensors with equal values (a clone, what load_state_dict fills after to_empty) are one
    weight in two places: patch ties them and the model computes as before."""
    stock = build(arch)
    model = copy.deepcopy(stock)
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    b = batch(arch, stock)
    tkhf.patch(model)
    assert_patched_and_tied(model)
    torch.testing.assert_close(logits(model, arch, b), logits(stock, arch, b), **LOGITS)


def test_equal_values_in_another_dtype_are_not_a_copy():
    stock = build("gpt2")
    model = copy.deepcopy(stock)
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        w.copy_(w.float().double())  # representable in fp32: equal values across the two dtypes
    model.lm_head.weight = torch.nn.Parameter(w.detach().float())
    with pytest.raises(ValueError, match="lm_head.weight and input embedding weight transformer.wte.weight"):
        tkhf.patch(model)
    assert not _patch.is_patched(model)


def test_separate_weights_on_meta_follow_transformers_and_loads_are_checked():
    """Meta tensors hold no values: patch follows transformers' own decision there (accelerate's
    init_empty_weights gives every registration a fresh meta tensor, so a tied model always looks
    untied) and checks the values when they come: a state dict holding two different copies of the
    tied weight is refused by name before anything is loaded; equal copies load."""
    stock = build("llama")
    with torch.device("meta"):
        model = type(stock)(copy.deepcopy(stock.config)).to(torch.float64)
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    tkhf.patch(model)
    assert_patched_and_tied(model)
    model.to_empty(device="cpu")
    model.tie_weights()
    sd = {k: v.clone() for k, v in stock.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    before = model.model.norm.weight.clone()
    with pytest.raises(ValueError, match="holds model.embed_tokens.weight and lm_head.weight with different values"):
        model.load_state_dict(sd)
    assert same_values(model.model.norm.weight, before)  # nothing loaded (NaN equal to NaN)
    model.load_state_dict(stock.state_dict())
    with torch.no_grad():  # the rotary inv_freq, not in a state dict
        for n, buf in stock.named_buffers():
            model.get_buffer(n).copy_(buf)
    b = batch("llama", stock)
    torch.testing.assert_close(logits(model.eval(), "llama", b), logits(stock, "llama", b), **LOGITS)
    tkhf.unpatch(model)
    model.load_state_dict(sd)  # a stock model loads it as stock does: the check went with the patch


# ---------------------------------------------------------------------------------------------------
# item 3: every init path gives stock's parameters and buffers


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_construction_init_weights_and_load(arch):
    """Constructed on the meta device, patched there, to_empty() (NaN-filled), init_weights(), a
    state-dict load: every parameter and buffer, the ties and the logits equal stock's through the
    same path. Gemma's embed_scale is a non-persistent buffer that only Gemma's own _init_weights
    sets (it matches its embedding class): the head is one of that class, so it is set."""
    stock = build(arch)
    ref = quiet(meta_init, type(stock), stock.config, stock.state_dict(), patched=False)
    model = quiet(meta_init, type(stock), stock.config, stock.state_dict(), patched=True)
    assert_patched_and_tied(model)
    compare_models(model, ref, "meta init")
    for m in (model, ref):
        fill_unset_buffers(m, stock)
    b = batch(arch, stock)
    want = logits(ref, arch, b)
    assert not want.isnan().any()
    torch.testing.assert_close(logits(model, arch, b), want, **LOGITS)
    if arch == "gemma" and V5:
        emb = model.get_input_embeddings()
        assert float(emb.embed_scale) == pytest.approx(32 ** 0.5, rel=1e-15)


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "t5", "bart"])
def test_init_weights_module_by_module(arch):
    """The model's own ``_init_weights`` applied to every module (what a library that initializes
    a model piece by piece does), then a state-dict load."""
    stock = build(arch)
    out = []
    for patched in (False, True):
        with torch.device("meta"):
            m = type(stock)(copy.deepcopy(stock.config))
        m = m.to(torch.float64)
        if patched:
            tkhf.patch(m)
        with nan_empty():
            m.to_empty(device="cpu")
        torch.manual_seed(0)
        quiet(m.apply, m._init_weights)
        m.tie_weights()
        m.load_state_dict(stock.state_dict())
        out.append(m.eval())
    ref, model = out
    assert_patched_and_tied(model)
    compare_models(model, ref, "_init_weights")
    for m in (model, ref):
        fill_unset_buffers(m, stock)
    b = batch(arch, stock)
    torch.testing.assert_close(logits(model, arch, b), logits(ref, arch, b), **LOGITS)


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "t5", "bert"])
def test_accelerate_init_empty_weights(arch):
    """accelerate's ``init_empty_weights`` (parameters on meta, buffers real), patched there, then the
    weights assigned from a state dict (``load_state_dict(assign=True)``) and tied."""
    from accelerate import init_empty_weights

    stock = build(arch)
    out = []
    for patched in (False, True):
        with init_empty_weights():
            m = type(stock)(copy.deepcopy(stock.config))
        if patched:
            tkhf.patch(m)
        m.load_state_dict({k: v.clone() for k, v in stock.state_dict().items()}, assign=True)
        m.tie_weights()
        out.append(m.eval())
    ref, model = out
    assert_patched_and_tied(model)
    compare_models(model, ref, "init_empty_weights")
    b = batch(arch, stock)
    torch.testing.assert_close(logits(model, arch, b), logits(ref, arch, b), **LOGITS)


@pytest.mark.parametrize("how", ["low_cpu_mem_usage", "device_map", "patched_checkpoint"])
@pytest.mark.parametrize("arch", ["gemma", "gpt2", "t5", "bert"])
def test_from_pretrained_paths(arch, how, tmp_path):
    """Loaded with ``low_cpu_mem_usage=True``, with ``device_map="cpu"``, or from a checkpoint a
    patched model saved, then patched: every parameter and buffer, the ties and the logits equal
    the stock model loaded from the stock checkpoint the same way."""
    stock = build(arch)
    cls = type(stock)
    stock.save_pretrained(tmp_path / "stock")
    kw = dict(LOAD)
    src = tmp_path / "stock"
    if how == "low_cpu_mem_usage":
        kw["low_cpu_mem_usage"] = True
    elif how == "device_map":
        kw["device_map"] = "cpu"
    else:
        tkhf.patch(copy.deepcopy(stock)).save_pretrained(tmp_path / "patched")
        src = tmp_path / "patched"
    ref = quiet(cls.from_pretrained, tmp_path / "stock", **kw).eval()
    model = tkhf.patch(quiet(cls.from_pretrained, src, **kw).eval())
    assert_patched_and_tied(model)
    compare_models(model, ref, how)
    b = batch(arch, stock)
    torch.testing.assert_close(logits(model, arch, b), logits(ref, arch, b), **LOGITS)
    torch.testing.assert_close(model(**b).loss.double(), ref(**b).loss.double(), **LOSS)


def test_patched_scaled_embedding_pickles_and_copies():
    """The head of a model whose embedding has its own class (Gemma, BART) is an instance of that
    class too; torch.save of the whole model and deepcopy keep it so, tied."""
    for arch in ("gemma", "bart"):
        stock = build(arch)
        model = tkhf.patch(copy.deepcopy(stock))
        stock_cls = type(stock.get_input_embeddings())
        assert isinstance(model.get_input_embeddings(), stock_cls)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for twin in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
            assert type(twin.get_input_embeddings()) is type(model.get_input_embeddings())
            assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
            b = batch(arch, stock)
            torch.testing.assert_close(logits(twin, arch, b), logits(stock, arch, b), **LOGITS)
        tkhf.unpatch(model)
        assert type(model.get_input_embeddings()) is stock_cls


def test_unpatch_after_to_empty_keeps_the_current_tensors():
    """to_empty re-creates every tensor of the head; unpatch hands the current ones (weight and
    buffers) back to the stock module, which then computes as the patched one did."""
    stock = build("gemma")
    with torch.device("meta"):
        model = type(stock)(copy.deepcopy(stock.config))
    model = model.to(torch.float64)
    tkhf.patch(model)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(stock.state_dict())
    model.eval()
    b = batch("gemma", stock)
    want = logits(model, "gemma", b)
    tkhf.unpatch(model)
    inp = model.get_input_embeddings()
    assert type(inp) is type(stock.get_input_embeddings()) and model.lm_head.weight is inp.weight
    torch.testing.assert_close(logits(model, "gemma", b), want, atol=0, rtol=0, equal_nan=True)
