"""inspect_ties and `python -m tiedkernels inspect PATH`."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

import tiedkernels  # noqa: E402
import tiedkernels.hf as tkhf  # noqa: E402
from _hf_testing import ARCHS, build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tiedkernels", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_report_of_patched_model(arch, capsys):
    model = tkhf.patch(build(arch))
    r = tiedkernels.inspect_ties(model)  # top-level, lazy
    assert r.ok and r.declared
    w = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is w]
    group = next(g for g in r.groups if names[0] in g)
    assert sorted(group) == sorted(names)
    extra = 0
    if arch == "bert":  # the decoder bias is the very cls.predictions.bias
        assert ["cls.predictions.bias", "cls.predictions.decoder.bias"] in r.groups
        extra = w.shape[0] * 8
    assert r.bytes_saved == (len(names) - 1) * w.numel() * 8 + extra
    out = capsys.readouterr().out
    assert "broken ties: none" in out and " = ".join(group) in out


def test_broken_ties_are_reported():
    model = build("llama", tie_word_embeddings=False)
    model = type(model)(model.config)
    model.config.tie_word_embeddings = True  # declares a tie the weights do not have
    r = tkhf.inspect_ties(model, verbose=False)
    assert r.broken == [("lm_head.weight", "model.embed_tokens.weight", "different tensors")]
    assert r.bytes_saved == 0 and not r.groups


def _patched_on_meta():
    stock = build("gpt2")
    with torch.device("meta"):
        model = type(stock)(copy.deepcopy(stock.config))
    return tkhf.patch(model)


def test_to_empty_untie_and_retie_are_visible():
    model = _patched_on_meta()
    assert tkhf.inspect_ties(model, verbose=False).ok  # meta tensors are grouped by identity
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.lm_head.weight.copy_(model.transformer.wte.weight)  # whatever to_empty left there
    r = tkhf.inspect_ties(model, verbose=False)
    assert len(r.broken) == 1 and "equal values, separate copies" in r.broken[0][2]
    model.tie_weights()
    assert tkhf.inspect_ties(model, verbose=False).ok


@pytest.mark.parametrize("special", ["nan", "inf", "none"])
def test_separate_copies_are_named_whatever_the_values(special):
    # to_empty leaves memory uninitialized, so a copy can hold NaN or inf; it is still a copy.
    model = _patched_on_meta()
    model.to_empty(device="cpu")
    with torch.no_grad():
        w = model.transformer.wte.weight
        w.normal_()
        if special != "none":
            w[1, 2] = float(special)
            w[3, 0] = -float(special)
        model.lm_head.weight.copy_(w)
    r = tkhf.inspect_ties(model, verbose=False)
    assert len(r.broken) == 1 and "equal values, separate copies" in r.broken[0][2]
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    r = tkhf.inspect_ties(model, verbose=False)
    assert len(r.broken) == 1 and r.broken[0][2] == "different tensors"


def test_cli_on_saved_patched_model(tmp_path):
    model = tkhf.patch(build("t5"))
    model.save_pretrained(tmp_path)
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "shared.weight = encoder.embed_tokens.weight = decoder.embed_tokens.weight = lm_head.weight" in res.stdout
    assert "stored once as shared.weight" in res.stdout
    v, d = model.shared.weight.shape
    assert f"bytes saved by tying: {3 * v * d * 8:,}" in res.stdout  # float64 checkpoint


def _save_with_separate_lm_head(model, folder, lm_head):
    """Save ``model`` with ``lm_head.weight`` stored as its own tensor, ``lm_head``."""
    model.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["lm_head.weight"] = lm_head
    os.remove(folder / "model.safetensors")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_cli_flags_a_checkpoint_with_two_different_copies(tmp_path):
    model = build("gpt2")
    _save_with_separate_lm_head(model, tmp_path, model.lm_head.weight.detach().clone() + 1)
    assert json.loads((tmp_path / "config.json").read_text()).get("tie_word_embeddings", True)
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 1
    assert "stored 2 times" in res.stdout and "different values" in res.stdout


def test_cli_two_equal_copies_holding_nan_are_not_called_different(tmp_path):
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[1, 2] = float("nan")
    _save_with_separate_lm_head(model, tmp_path, model.lm_head.weight.detach().clone())
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stored 2 times" in res.stdout and "different values" not in res.stdout


def test_cli_rejects_a_folder_without_a_model(tmp_path):
    res = run_cli("inspect", str(tmp_path))
    assert res.returncode == 2 and "no config.json" in res.stderr


@pytest.mark.parametrize("chunk", [7, 100, 1 << 22])
def test_same_values_nan_equal_in_every_chunk(chunk):
    from tiedkernels.hf._ties import same_values

    a = torch.randn(50, 13, dtype=torch.float64)
    a[3, 4] = a[49, 12] = float("nan")
    a[0, 0] = float("-inf")
    b = a.clone()
    assert same_values(a, b, chunk=chunk) and same_values(a.t(), b.t(), chunk=chunk)
    assert same_values(a.float(), b.float().double(), chunk=chunk)  # promoted, as torch.equal
    for i, j in [(0, 1), (49, 11), (25, 6)]:  # a difference in the first, last and a middle chunk
        c = b.clone()
        c[i, j] += 1
        assert not same_values(a, c, chunk=chunk)
    c = b.clone()
    c[3, 4] = 0.0  # NaN against a number
    assert not same_values(a, c, chunk=chunk)
    assert not same_values(a, b[:, :12], chunk=chunk)
    assert same_values(torch.arange(9), torch.arange(9)) and not same_values(torch.arange(9), torch.arange(1, 10))
