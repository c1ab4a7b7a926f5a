"""The GPU backends (``cuda`` and ``triton``) on CUDA tensors, against the fp64 reference on
the CPU: the core's option tables (tests/test_ops.py) in fp32 and bf16, the embedding's
deterministic path, bad ids and labels (an IndexError, and the CUDA context still works),
CUDA graph capture, torch.compile tracing into the kernels, opcheck, and 64-bit offsets.

Skipped by a marker when no GPU is present; the condition is a string, so pytest evaluates
it when each test is set up, never at import or collection.
"""

import pytest
import torch

import tiedkernels as tk
from tiedkernels import backends
from tiedkernels import reference as R

import test_ops as core  # noqa: E402  (the core's tables and helpers; tests/ is on sys.path)
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")

GPU_BACKENDS = ["cuda", "triton"]
LOWP = [torch.float32, torch.bfloat16]
LOWP_IDS = ["fp32", "bf16"]
F64 = torch.float64


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    reason = backends.why_not(request.param, "cuda")
    if reason is not None:
        pytest.fail(f"backend {request.param!r} should run on this GPU machine: {reason}")
    return request.param


def _cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


def _cpu(out):
    if isinstance(out, (tuple, list)):
        return type(out)(_cpu(o) for o in out)
    return out.cpu() if isinstance(out, torch.Tensor) else out


def _gpu_version(fn, mutates_first=False):
    """fn on CUDA copies of its tensor arguments, results back on the CPU (autograd flows through
    the copies); for an in-place op the mutated first argument is copied back."""

    def wrapped(*args, **kwargs):
        gargs = [_cuda(a) for a in args]
        out = fn(*gargs, **{k: _cuda(v) for k, v in kwargs.items()})
        if mutates_first:
            with torch.no_grad():
                args[0].copy_(gargs[0].cpu())
        return _cpu(out)

    return wrapped


def _gpu_op(backend, name):
    return backends.get(backend).op(name)


@pytest.fixture
def on_gpu(monkeypatch):
    """Route the core tests' calls (the public functions and ``_op``) to the GPU, so the core's
    test bodies (inputs, reference, tolerances) run unchanged against the GPU kernels."""
    for name in ("linear_cross_entropy", "embedding", "logits"):
        monkeypatch.setattr(tk, name, _gpu_version(getattr(tk, name)))
    monkeypatch.setattr(core, "_op", lambda b, name: _gpu_version(_gpu_op(b, name), name.endswith("_")))


# ------------------------------------------------------------------------------------------
# the core's tests, on the GPU


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case,reduction", core._lce_params())
def test_linear_cross_entropy(on_gpu, backend, case, reduction, dtype):
    core.test_linear_cross_entropy(backend, case, reduction, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case", list(core.EMB_OPTIONS))
def test_embedding(on_gpu, backend, case, dtype):
    core.test_embedding(backend, case, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_bwd_acc_adds_into_buffer(on_gpu, backend, padding_idx, dtype):
    core.test_embedding_bwd_acc_adds_into_buffer(backend, padding_idx, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("case", list(core.LOGITS_OPTIONS))
def test_logits(on_gpu, backend, case, dtype):
    core.test_logits(backend, case, dtype)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_large_vocab(on_gpu, backend, reduction, dtype):
    core.test_linear_cross_entropy_large_vocab(backend, reduction, dtype)
    core.test_embedding_and_logits_large_vocab(backend)


def test_op_level_properties(on_gpu, backend):
    """Second backward, outputs left alone by backward, lse values, shard statistics and the
    sharded backward: the core's op-level tests."""
    for first_grad in (1.0, 0.3):
        core.test_second_backward_retain_graph(backend, "mean", first_grad)
    core.test_backward_leaves_forward_outputs_alone(backend)
    core.test_return_lse_values(backend, torch.float32)
    for dtype in LOWP:
        core.test_lce_stats_per_shard(backend, dtype)
    core.test_lce_bwd_sharded(backend, torch.float32)
    for reduction in ("none", "sum"):
        core.test_bf16_dw_accumulates_in_fp32(backend, reduction)
    core.test_lse_of_many_near_equal_logits(backend)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_backward_paths(backend, deterministic, dtype):
    """Both scatter paths sum every row exactly once; the deterministic one is bitwise repeatable."""
    v, d = 1000, 96
    ids = torch.randint(0, 50, (64, 33))
    ids[0, 0] = v - 1
    grad = torch.randn(64, 33, d, dtype=F64)
    expect = torch.zeros(v, d, dtype=F64).index_add_(0, ids.reshape(-1), grad.reshape(-1, d))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        op = _gpu_op(backend, "embedding_bwd")
        out = op(grad.to(dtype).cuda(), ids.cuda(), v, None)
        again = op(grad.to(dtype).cuda(), ids.cuda(), v, None)
    finally:
        torch.use_deterministic_algorithms(prev)
    if deterministic or dtype != torch.float32:
        assert torch.equal(out, again), "the sorted path must be bitwise repeatable"
    lowp = torch.zeros(v, d, dtype=dtype).index_add_(0, ids.reshape(-1), grad.to(dtype).reshape(-1, d))
    assert_close(out.cpu(), expect, lowp, dtype=dtype, name=f"embedding_bwd ({backend})")


@pytest.mark.parametrize("i", range(len(core._SAMPLES)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(core._SAMPLES)])
def test_opcheck(backend, i):
    name, args = core._SAMPLES[i]
    args = tuple(a.detach().clone().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(_gpu_op(backend, name), args)


# ------------------------------------------------------------------------------------------
# errors that must not kill the context


def test_bad_label_raises_and_context_survives(backend):
    h = torch.randn(6, 16, device="cuda", requires_grad=True)
    w = torch.randn(37, 16, device="cuda", requires_grad=True)
    labels = torch.tensor([1, 2, -100, 37, 4, 5], device="cuda")
    for reduction in ("mean", "none"):
        with pytest.raises(IndexError, match=r"label 37 at position 3 is outside \[0, V\) for V=37"):
            tk.linear_cross_entropy(h, w, labels, reduction=reduction, backend=backend)
    with pytest.raises(IndexError, match=r"id 40 at position 1 is outside \[0, V\) for V=37"):
        tk.embedding(torch.tensor([0, 40], device="cuda"), w, backend=backend)
    labels[3] = 3
    loss = tk.linear_cross_entropy(h, w, labels, backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item() and torch.isfinite(h.grad).all().item()


def test_unchecked_bad_entries_are_nan_not_out_of_bounds(backend, monkeypatch):
    """TIEDKERNELS_CHECK_INDICES=0 (no host wait): far out-of-range ids and labels read nothing
    out of bounds; their loss, gradient and embedding rows are NaN; the context stays usable."""
    monkeypatch.setenv("TIEDKERNELS_CHECK_INDICES", "0")
    h = torch.randn(5, 16, device="cuda")
    w = torch.randn(37, 16, device="cuda")
    labels = torch.tensor([1, 2**40, -100, 3, -7], device="cuda")
    op = _gpu_op(backend, "lce_fwd")
    tok, *_ = op(h, w, None, labels, None, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 8, False, False, False)
    loss, _, dh, *_ = op(h, w, None, labels, torch.ones((), device="cuda"), -100, 0.0, 0.0, 0.0, 1.0, 0, 0, 8,
                           True, True, False)
    e = _gpu_op(backend, "embedding_fwd")(w, torch.tensor([0, 2**40, -3], device="cuda"), None)
    torch.cuda.synchronize()
    tok, dh, e = tok.cpu(), dh.cpu(), e.cpu()
    assert torch.isnan(tok[[1, 4]]).all() and torch.isfinite(tok[[0, 2, 3]]).all() and tok[2] == 0
    assert torch.isnan(loss).item() and torch.isnan(dh[1]).all() and torch.isfinite(dh[[0, 2, 3]]).all()
    assert torch.isnan(e[1:]).all() and torch.equal(e[0], w[0].cpu())


def test_cuda_graph_capture(backend):
    """Under capture the host check is skipped (no sync is possible); replays give eager results."""
    h = torch.randn(64, 32, device="cuda")
    w = torch.randn(300, 32, device="cuda")
    labels = torch.randint(0, 300, (64,), device="cuda")
    labels[:5] = -100
    eager = tk.linear_cross_entropy(h, w, labels, reduction="none", backend=backend)
    emb_eager = tk.embedding(labels.clamp(min=0), w, backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (allocations, compilation)
        tk.linear_cross_entropy(h, w, labels, reduction="none", backend=backend)
        tk.embedding(labels.clamp(min=0), w, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tk.linear_cross_entropy(h, w, labels, reduction="none", backend=backend)
        emb = tk.embedding(labels.clamp(min=0), w, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb, emb_eager, rtol=0, atol=0)


def test_torch_compile_fullgraph(backend):
    """inductor traces into the Triton kernels (triton_op) or keeps the CUDA op; same result as eager."""
    h, w, b, labels = core.lce_inputs(shape=(4, 33), bias=True, ignore=0.2)
    h, w, b = (x.detach().float().cuda().requires_grad_() for x in (h, w, b))
    labels = labels.cuda()

    def step(h_, w_, b_):
        e = tk.embedding(labels.clamp(min=0), w_, backend=backend)
        return tk.linear_cross_entropy(h_ + e, w_, labels, bias=b_, shift=True, label_smoothing=0.1, softcap=4.0,
                                       backend=backend)

    eager = step(h, w, b)
    ge = torch.autograd.grad(eager, [h, w, b])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(h, w, b)
    gc = torch.autograd.grad(compiled, [h, w, b])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, r in zip(gc, ge):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 64-bit offsets


@pytest.mark.slow
def test_64_bit_offsets(backend):
    """N*V >= 2^31 (logits elements) and V*D >= 2^31 (weight elements), bf16, against the
    chunked plain-PyTorch backend on the same device."""
    torch.manual_seed(0)
    v, d, n = 131_072, 16_400, 64  # V*D = 2.15e9
    w = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.01)
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[0] = v - 1
    out = tk.linear_cross_entropy(h, w, labels, reduction="none", backend=backend)
    ref = tk.linear_cross_entropy(h, w, labels, reduction="none", backend="torch")
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    e = tk.embedding(labels, w, backend=backend)
    assert torch.equal(e[0], w[v - 1])
    del w, h
    v2, d2, n2 = 70_001, 64, 32_768  # N*V = 2.29e9
    w2 = torch.randn(v2, d2, device="cuda", dtype=torch.bfloat16) * 0.1
    h2 = torch.randn(n2, d2, device="cuda", dtype=torch.bfloat16)
    y2 = torch.randint(0, v2, (n2,), device="cuda")
    out2 = tk.linear_cross_entropy(h2, w2, y2, reduction="none", backend=backend)
    ref2 = tk.linear_cross_entropy(h2, w2, y2, reduction="none", backend="torch")
    torch.testing.assert_close(out2, ref2, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------
# the cost model (python -m tiedkernels gpu-report) against what the GPU really launches


def test_cost_model_launch_plan_matches_the_profile():
    """The cuda backend's launches at a small bf16 shape, read by torch.profiler, are the ones
    tiedkernels.gpu_report models: its own kernels exactly (row kernel per chunk, the index
    check), and at least as many kernels in all (cuBLAS may add split-K reductions)."""
    from torch.profiler import ProfilerActivity, profile

    from tiedkernels import gpu_report

    if backends.why_not("cuda", "cuda") is not None:
        pytest.fail(f"the cuda backend should run on this GPU machine: {backends.why_not('cuda', 'cuda')}")
    n, d, v = 1000, 256, 5000
    h = (torch.randn(n, d, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    tk.linear_cross_entropy(h, w, y, backend="cuda").backward()  # warm-up: handles, allocator
    h.grad = w.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tk.linear_cross_entropy(h, w, y, backend="cuda").backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    plan = gpu_report.cuda_launches(n, d, v, "bf16", sms=torch.cuda.get_device_properties(0).multi_processor_count)
    for ours in ("row_kernel", "find_bad_kernel", "bad_record_kernel"):
        got = sum(1 for x in names if ours in x)
        want = sum(1 for x in plan if x["kernel"] == ours)
        assert got == want, f"{ours}: the GPU launched {got}, the model counts {want}; launches: {names}"
    assert len(names) >= len(plan) - 2, (len(names), len(plan), names)  # the model's two 1-element ops may fuse
