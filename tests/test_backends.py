"""Backend choice: explicit requests, the environment override, auto's fallback, a missing build."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import tiedkernels as tk
from tiedkernels import backends


def _inputs():
    torch.manual_seed(0)
    return torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))


def test_explicit_backend_that_cannot_run_raises_with_reason():
    h, w, y = _inputs()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: "):
        tk.linear_cross_entropy(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        tk.linear_cross_entropy(h, w, y, backend="nope")


def test_env_overrides_auto_only(monkeypatch):
    h, w, y = _inputs()
    monkeypatch.setenv("TIEDKERNELS_BACKEND", "torch")
    assert backends.resolve("auto", h.device).name == "torch"
    assert backends.resolve("cpu", h.device).name == "cpu"  # an explicit argument wins
    monkeypatch.setenv("TIEDKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        tk.linear_cross_entropy(h, w, y)


def test_auto_on_cpu_is_the_compiled_backend_when_built():
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"


def test_report_lists_every_backend():
    rep = backends.report()
    assert set(rep) == set(backends.NAMES)
    assert rep["torch"] is None and rep["cpu"] is None
    assert rep["cuda"]  # a reason: no GPU here


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "tiedkernels", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "compiled extension: CPU kernels yes" in out.stdout
    assert "cpu     available" in out.stdout and "torch   available" in out.stdout


def test_missing_extension_falls_back_to_torch_and_says_why_once():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["tiedkernels._C"] = None  # as if the build were missing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, tiedkernels as tk
            h, w = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)
            y = torch.tensor([0, 5, 2, -100])
            for _ in range(3):
                tk.linear_cross_entropy(h, w, y).backward()
        msgs = [str(c.message) for c in caught if "tiedkernels" in str(c.message)]
        print("LOADWARN", sum("did not load" in m for m in msgs))
        print("AUTOWARN", sum("'auto' is using 'torch'" in m for m in msgs))
        try:
            tk.linear_cross_entropy(h, w, y, backend="cpu")
        except RuntimeError as e:
            print("EXPLICIT", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADWARN 1" in out.stdout
    assert "AUTOWARN 1" in out.stdout
    assert "EXPLICIT tiedkernels: backend 'cpu' cannot run here: the compiled extension is not loaded" in out.stdout
    info = subprocess.run([sys.executable, "-c", "import sys; sys.modules['tiedkernels._C'] = None\n"
                           "from tiedkernels.__main__ import main; main(['info'])"],
                          capture_output=True, text=True, timeout=120)
    assert "compiled extension: not loaded" in info.stdout
    assert "cpu     off: the compiled extension is not loaded" in info.stdout
