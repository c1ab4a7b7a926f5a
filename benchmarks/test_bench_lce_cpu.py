"""Fused forward + backward on the CPU against plain PyTorch and the physical floor:
the three GEMMs of the same shapes (h Wᵀ, dz W, dzᵀ h), all timed in the same run.

    .venv/bin/python -m pytest benchmarks/test_bench_lce_cpu.py --benchmark-only

Run with ``--benchmark-disable`` (as `make test` does) each case executes once, so the
suite cannot rot; the shapes are the issue's (N=2048, D=1024, V=32768, fp32).
"""

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk

N, D, V = 2048, 1024, 32768
GROUP = f"lce fwd+bwd N={N} D={D} V={V}"


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    h = torch.randn(N, D) * 0.5
    w = torch.randn(V, D) * 0.02
    y = torch.randint(0, V, (N,))
    return h, w, y


def _leaves(h, w):
    return h.clone().requires_grad_(True), w.clone().requires_grad_(True)


def _bench(benchmark, provider, fn, rounds=3):
    benchmark.group = GROUP
    benchmark.extra_info["provider"] = provider
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def test_gemm3(benchmark, inputs):
    h, w, _ = inputs
    z = torch.empty(N, V)
    dh = torch.empty(N, D)
    dw = torch.empty(V, D)

    def run():
        torch.mm(h, w.t(), out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.t(), h, out=dw)

    _bench(benchmark, "gemm3", run)


def test_plain(benchmark, inputs):
    h, w, y = inputs
    hl, wl = _leaves(h, w)

    def run():
        hl.grad = wl.grad = None
        F.cross_entropy(F.linear(hl, wl), y).backward()

    _bench(benchmark, "plain", run)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_tiedkernels(benchmark, inputs, backend):
    h, w, y = inputs
    hl, wl = _leaves(h, w)

    def run():
        hl.grad = wl.grad = None
        tk.linear_cross_entropy(hl, wl, y, backend=backend).backward()

    _bench(benchmark, f"tiedkernels-{backend}", run)
