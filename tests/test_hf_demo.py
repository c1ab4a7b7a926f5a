"""The Hugging Face demo end to end (tiny settings) and the memory saving of a patched training step."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from tiedkernels.hf import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tokenizer_is_byte_level_bpe_and_lossless(tmp_path):
    path = demo.train_tokenizer(str(tmp_path))
    ids, tok = demo.load_ids(path)
    assert 2000 < tok.get_vocab_size() <= demo.VOCAB
    with open(demo.CORPUS, encoding="utf-8") as f:
        text = f.read()
    assert tok.decode(ids.tolist()) == text  # byte-level: nothing is lost
    assert ids.numel() < len(text.encode()) / 3  # and it compresses


def test_demo_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tiedkernels.hf.demo", "--steps", "3", "--batch", "2", "--seq", "32",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "largest relative loss difference over 3 steps" in out
    assert "reloaded with stock transformers: max |logit diff| 0.0e+00" in out
    assert "sample: " in out
    assert (tmp_path / "hf_demo_loss.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "model.safetensors").exists()
    # a new user sees no warning from transformers about the demo's own config
    assert "loss_type" not in out + res.stderr, res.stderr


def test_patched_training_step_saves_more_than_the_logits():
    """GPT-2 (2 layers, n_embd=256, V=50,257), 2x256 tokens, each variant in a fresh process:
    the patched step's peak RSS is lower by at least the fp32 logits (103 MB)."""
    res = subprocess.run([sys.executable, "-m", "tiedkernels.hf.demo", "--memory", "--batch", "2", "--seq", "256"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "\nOK" in res.stdout
