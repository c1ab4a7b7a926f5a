"""Fused linear + cross-entropy forward + backward on a GPU: the ``cuda`` and ``triton``
backends against plain PyTorch, ``torch.compile`` of it, Liger Kernel's fused linear
cross-entropy and Cut Cross-Entropy (each when installed), and the floor: the three GEMMs
of the same shapes (h Wᵀ, dz W, dzᵀ h).

    .venv/bin/python -m pytest benchmarks/test_bench_gpu.py --benchmark-only

Shapes: the Llama 3 8B head (N=8192, D=4096, V=128,256) and the cost model's 32k shape
(N=2048, D=2048, V=32,768), bf16: the two shapes of ``python -m tiedkernels gpu-report``
that a run of ``make gpu-check`` (about two minutes for this file) can afford.  Each case records
in ``extra_info``: the shape, the median of CUDA-event timings (``cuda_ms``), the implied rate
over 6·N·D·V flops (``tflops``), the peak memory above the inputs (``peak_mib``) and, for the
cuda and triton backends, the cost model's roofline at this GPU's SM count (``roofline_ms``).
Skipped by a marker without a GPU (evaluated at setup, never at import or collection).
``TIEDKERNELS_TEST_GPU_BACKENDS`` (default ``cuda,triton``) limits the tiedkernels backends timed: the
device check times only ``triton`` when the CUDA build failed.  When ``GPU_CHECK_BENCH`` names a
file, each case appends its ``extra_info`` there as one JSON line as soon as it is timed, so a
run cut short keeps the cases that finished (pytest-benchmark's JSON is written only at the end).
"""

import json
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk

pytestmark = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")

SHAPES = {
    "llama3-8b": (8192, 4096, 128_256),
    "32k": (2048, 2048, 32_768),
}
ROUNDS = 10
GPU_BACKENDS = os.environ.get("TIEDKERNELS_TEST_GPU_BACKENDS", "cuda,triton").split(",")


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request):
    return request.param


@pytest.fixture(scope="module")
def inputs(shape):
    n, d, v = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, d, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    w = (torch.randn(v, d, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    y[::17] = -100
    return h, w, y


def _leaves(h, w):
    return h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()


def _run(benchmark, shape, provider, step):
    """Time ``step`` (one forward + backward) with CUDA events and record its peak memory."""
    n, d, v = SHAPES[shape]
    benchmark.group = f"gpu lce fwd+bwd {shape} N={n} D={d} V={v} bf16"
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["shape"] = shape
    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    ms = statistics.median(times)
    benchmark.extra_info["cuda_ms"] = round(ms, 3)
    benchmark.extra_info["tflops"] = round(6 * n * d * v / (ms * 1e-3) / 1e12, 1)
    benchmark.extra_info["peak_mib"] = round(peak / 2**20, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark.extra_info["roofline_ms"] = _roofline_ms(provider, n, d, v)
    stream = os.environ.get("GPU_CHECK_BENCH")
    if stream:
        with open(stream, "a") as f:
            f.write(json.dumps({"group": benchmark.group, **benchmark.extra_info}) + "\n")

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=3, iterations=1)


def _roofline_ms(provider, n, d, v):
    """The cost model's H100 roofline for the tiedkernels backends, planned for this GPU's SMs."""
    if provider not in ("cuda", "triton"):
        return None
    from tiedkernels import gpu_report

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if provider == "cuda":
        launches = gpu_report.cuda_launches(n, d, v, "bf16", sms=sms)
    else:
        plan, why = gpu_report.triton_plan()
        if plan is None:
            return None
        launches = plan.launches(n, d, v, "bf16", sms=sms)
    flops = sum(x["flops"] for x in launches)
    nbytes = sum(x["hbm_bytes"] + x["atomic_bytes"] for x in launches)
    return round(gpu_report.roofline_ms(flops, nbytes), 3)


def _fused_step(fn, h, w):
    hl, wl = _leaves(h, w)

    def step():
        hl.grad = wl.grad = None
        fn(hl, wl).backward()

    return step


def test_gemm3(benchmark, shape, inputs):
    h, w, _ = inputs
    n, d, v = SHAPES[shape]
    chunk = 1024  # the logits of a chunk at a time, so the floor fits in memory at V=128k
    z = torch.empty(chunk, v, device="cuda", dtype=h.dtype)
    dh = torch.empty(n, d, device="cuda", dtype=h.dtype)
    dw = torch.zeros(v, d, device="cuda", dtype=h.dtype)

    def step():
        for s in range(0, n, chunk):
            torch.mm(h[s : s + chunk], w.t(), out=z)
            torch.mm(z, w, out=dh[s : s + chunk])
            dw.addmm_(z.t(), h[s : s + chunk])

    _run(benchmark, shape, "gemm3", step)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tiedkernels(benchmark, shape, inputs, backend):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend!r} is not in TIEDKERNELS_TEST_GPU_BACKENDS={','.join(GPU_BACKENDS)}")
    reason = tk.backends.why_not(backend, "cuda")
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    h, w, y = inputs
    _run(benchmark, shape, backend,
         _fused_step(lambda h_, w_: tk.linear_cross_entropy(h_, w_, y, backend=backend), h, w))


def _plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def test_plain(benchmark, shape, inputs):
    h, w, y = inputs
    _run(benchmark, shape, "plain", _fused_step(lambda h_, w_: _plain(h_, w_, y), h, w))


def test_torch_compile(benchmark, shape, inputs):
    h, w, y = inputs
    torch._dynamo.reset()
    compiled = torch.compile(_plain)
    _run(benchmark, shape, "torch.compile", _fused_step(lambda h_, w_: compiled(h_, w_, y), h, w))


def test_liger(benchmark, shape, inputs):
    liger = pytest.importorskip("liger_kernel.transformers", reason="Liger Kernel is not installed")
    h, w, y = inputs
    loss_fn = liger.LigerFusedLinearCrossEntropyLoss()
    _run(benchmark, shape, "liger", _fused_step(lambda h_, w_: loss_fn(w_, h_, y), h, w))


def test_cut_cross_entropy(benchmark, shape, inputs):
    cce = pytest.importorskip("cut_cross_entropy", reason="Cut Cross-Entropy is not installed")
    h, w, y = inputs
    _run(benchmark, shape, "cce", _fused_step(lambda h_, w_: cce.linear_cross_entropy(h_, w_, y), h, w))
