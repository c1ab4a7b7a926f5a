"""The GPU backends (``cuda`` and ``triton``) on CUDA tensors, against the fp64 reference on
the CPU: the core's option tables (tests/test_ops.py) in fp32 and bf16, the embedding's
deterministic path, bad ids and labels (an IndexError, and the CUDA context still works),
CUDA graph capture, torch.compile tracing into the kernels (inductor, bf16, several chunks, the
weight gradient), opcheck, no host synchronisation, tensors on a second GPU, NaN logits with
``return_stats``, and 64-bit offsets inside the kernels.

Skipped by a marker when no GPU is present; the condition is a string, so pytest evaluates
it when each test is set up, never at import or collection.  ``TIEDKERNELS_TEST_GPU_BACKENDS``
(default ``cuda,triton``) picks the backends: the device check runs the file once per backend,
and the triton one even when the CUDA build failed.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk
from tiedkernels import backends
from tiedkernels import reference as R

import test_ops as core  # noqa: E402  (the core's tables and helpers; tests/ is on sys.path)
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA GPU")

GPU_BACKENDS = os.environ.get("TIEDKERNELS_TEST_GPU_BACKENDS", "cuda,triton").split(",")
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


def _embedding_bwd_twice(backend, grad, ids, v, padding_idx, deterministic):
    """The embedding backward op on the GPU, called twice with ``torch.use_deterministic_algorithms``
    set to ``deterministic`` (restored after)."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        op = _gpu_op(backend, "embedding_bwd")
        return op(grad.cuda(), ids.cuda(), v, padding_idx), op(grad.cuda(), ids.cuda(), v, padding_idx)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_backward_paths(backend, deterministic, dtype):
    """Both scatter paths sum every row exactly once; the deterministic one is bitwise repeatable."""
    v, d = 1000, 96
    ids = torch.randint(0, 50, (64, 33))
    ids[0, 0] = v - 1
    grad = torch.randn(64, 33, d, dtype=F64)
    expect = torch.zeros(v, d, dtype=F64).index_add_(0, ids.reshape(-1), grad.reshape(-1, d))
    out, again = _embedding_bwd_twice(backend, grad.to(dtype), ids, v, None, deterministic)
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
# no host synchronisation, a second GPU, inductor, NaN logits


def _inputs(dtype, device, n=300, d=96, v=5000):
    """Small inputs drawn on the CPU (the same values on every device): weight, hidden, bias, labels
    (every 7th ignored), ids (the first 20 equal: a run for the sorted embedding backward)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(v, d, generator=gen) * 0.05).to(dtype)
    h = torch.randn(n, d, generator=gen).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[::7] = -100
    ids = torch.randint(0, v, (n,), generator=gen)
    ids[:20] = 5
    return [x.to(device) for x in (w, h, b, y, ids)]


def _seed_like(t):
    """An incoming gradient computed from the output itself: no random draw on the device."""
    return torch.sin(t.detach().float() * 3.0 + 0.5).to(t.dtype)


def _every_op(backend, w, h, b, y, ids):
    """Every op forward and backward: the embedding (padding_idx), logits with bias, scale and
    softcap, the fused loss as a scalar with gradients (gradient-in-forward, three chunks, with
    return_lse), per token (recompute in backward), without a gradient, and with return_stats.
    Returns every output and gradient, in order."""
    wl, hl, bl = (x.detach().requires_grad_() for x in (w, h, b))
    out = []
    e = tk.embedding(ids, wl, padding_idx=3, backend=backend)
    out += [e, *torch.autograd.grad(e, [wl], _seed_like(e))]
    z = tk.logits(hl, wl, bias=bl, logit_scale=0.7, softcap=20.0, backend=backend)
    out += [z, *torch.autograd.grad(z, [hl, wl, bl], _seed_like(z))]
    opts = dict(bias=bl, label_smoothing=0.1, z_loss=1e-4, chunk_size=128, backend=backend)
    loss, lse = tk.linear_cross_entropy(hl, wl, y, return_lse=True, **opts)
    out += [loss, lse, *torch.autograd.grad(loss, [hl, wl, bl])]
    tok = tk.linear_cross_entropy(hl, wl, y, reduction="none", **opts)
    out += [tok, *torch.autograd.grad(tok, [hl, wl, bl], _seed_like(tok))]
    with torch.no_grad():
        out.append(tk.linear_cross_entropy(hl, wl, y, **opts))
    stats = tk.linear_cross_entropy(hl, wl, y, return_stats=True, **opts)
    out += [*stats, *torch.autograd.grad(stats.loss, [hl, wl, bl])]
    return out


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
def test_no_host_sync(backend, dtype):
    """No op synchronises the host with the device (DESIGN: no ``.item()``, ``.cpu()``, ``bool`` of a
    CUDA tensor or data-dependent shape in the hot path): under ``set_sync_debug_mode("error")``
    any of them raises.  The ops run once before, outside the mode, so that what a first call may
    synchronise for once (a Triton kernel's compile and autotuning, cuBLAS handles, the caching
    allocator growing) is excluded.  The index check's wait for its own pinned copy is an event
    wait, which the mode does not count (README: one host wait per op, after the kernels are queued)."""
    inputs = _inputs(dtype, "cuda")
    _every_op(backend, *inputs)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _every_op(backend, *inputs)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t.float()).all() for t in out if t.is_floating_point())


def _check_like(out, ref64, base, dtype, device, what):
    """Each output on ``device`` and within the dtype's rule of the fp64 results (low precision:
    against the error of ``base``, the same kernels' results elsewhere); integers equal."""
    assert len(out) == len(ref64) == len(base)
    for i, (o, r, lp) in enumerate(zip(out, ref64, base)):
        assert o.device == torch.device(device), f"{what} output {i} is on {o.device}, not {device}"
        if not o.is_floating_point():
            assert torch.equal(o.cpu(), lp.cpu()), f"{what} output {i}"
        else:
            assert_close(o.cpu(), r.cpu(), lp.cpu(), dtype=dtype, name=f"{what} output {i}")


@pytest.mark.skipif("torch.cuda.device_count() < 2", reason="needs a second GPU")
@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
def test_second_gpu_while_the_first_is_current(backend, dtype):
    """Tensors on cuda:1 while cuda:0 is the current device: every op launches on the tensors'
    device (a launch on the current one reads memory of another GPU: an illegal address, or a
    race with the other device's stream), the results are those of cuda:0, and a bad label or id
    is still reported (the index check's event must be recorded on the tensors' device, or the
    host reads its copy too early)."""
    cpu = _inputs(dtype, "cpu")
    ref64 = _every_op("torch", *(x.double() if x.is_floating_point() else x for x in cpu))
    with torch.cuda.device(0):
        on0 = _every_op(backend, *(x.to("cuda:0") for x in cpu))
        dev1 = [x.to("cuda:1") for x in cpu]
        on1 = _every_op(backend, *dev1)
        w, h, _, y, ids = dev1
        bad = y.clone()
        bad[-1] = w.shape[0] + 3
        with pytest.raises(IndexError, match=rf"label {w.shape[0] + 3} at position {y.numel() - 1} is outside"):
            tk.linear_cross_entropy(h, w, bad, backend=backend)
        bad_ids = ids.clone()
        bad_ids[-1] = -2
        with pytest.raises(IndexError, match=rf"id -2 at position {ids.numel() - 1} is outside"):
            tk.embedding(bad_ids, w, backend=backend)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    _check_like(on1, ref64, on0, dtype, "cuda:1", backend)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_inductor_bf16_chunks_weight_grad(backend, reduction):
    """A bf16 training step, embedding + fused loss over four chunks with the tied weight's
    gradient, under ``torch.compile(backend="inductor", fullgraph=True)`` against the same step
    eager: the multi-chunk dW accumulation (an fp32-output GEMM) must lower, and give eager's
    accuracy.  Both against fp64, eager within the bf16 rule of plain PyTorch in bf16, compiled
    within it of eager."""
    n, d, v, chunk = 200, 64, 1000, 64
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(v, d, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16).cuda()
    ids = torch.randint(0, v, (n,), generator=gen).cuda()
    labels = torch.randint(0, v, (n,), generator=gen).cuda()
    labels[::9] = -100
    gtok = torch.randn(n, generator=gen).cuda()

    def step(w_, x_):
        h = tk.embedding(ids, w_, backend=backend) + x_
        loss = tk.linear_cross_entropy(h, w_, labels, reduction=reduction, chunk_size=chunk, backend=backend)
        return loss if reduction == "mean" else (loss * gtok).sum()

    def plain(w_, x_, tokens=False):
        h = F.embedding(ids, w_) + x_
        tok = R.linear_cross_entropy(h, w_, labels, reduction="none")
        if tokens:
            return tok
        return tok.sum() / (labels != -100).sum() if reduction == "mean" else (tok * gtok.to(tok.dtype)).sum()

    def run(fn, dtype):
        wl, xl = (t.detach().to(dtype).requires_grad_() for t in (w, x))
        loss = fn(wl, xl)
        return [loss, *torch.autograd.grad(loss, [wl, xl])]

    ref = run(plain, F64)
    lowp = run(plain, torch.bfloat16)
    eager = run(step, torch.bfloat16)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, backend="inductor", fullgraph=True), torch.bfloat16)
    # the scalar's baseline: plain bf16's per-token errors, weighted as the scalar sums them (no luck
    # of cancellation)
    tok_err = (plain(w.to(torch.bfloat16), x, True).double() - plain(w.double(), x.double(), True)).abs()
    weights = 1.0 / (labels != -100).sum() if reduction == "mean" else gtok.double().abs()
    base = (float((tok_err * weights).sum()),) * 2
    for got, against in ((eager, lowp), (compiled, eager)):
        assert_close(got[0], ref[0], dtype=torch.bfloat16, base=base, name="loss")
        for name, g, r, lp in zip(("dW", "dx"), got[1:], ref[1:], against[1:]):
            assert_close(g, r, lp, dtype=torch.bfloat16, name=f"{name} ({'compiled' if got is compiled else 'eager'})")


def test_nan_logits_return_stats(backend):
    """A NaN in one row of ``hidden`` makes that row's logits NaN.  With return_stats, per token and
    as a mean with gradients: PyTorch's values (the fp64 reference on the same inputs): that row's
    loss, lse, z-loss and entropy NaN and its prediction torch.argmax's (0: the first NaN), an
    ignored NaN row's loss 0 and its lse NaN; every other row within fp32's tolerance, its
    prediction equal; the mean loss and dW NaN, dh NaN in those two rows only (the ignored one too:
    PyTorch's log_softmax backward gives 0 · NaN there)."""
    n, d, v = 37, 32, 300
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[2, 6]] = -100
    h[5, 3] = float("nan")  # a labelled row
    h[6, 0] = float("nan")  # an ignored row
    opts = dict(z_loss=1e-4, label_smoothing=0.1)
    for reduction in ("none", "mean"):
        hl, wl = h.cuda().requires_grad_(), w.cuda().requires_grad_()
        stats = tk.linear_cross_entropy(hl, wl, labels.cuda(), reduction=reduction, return_stats=True,
                                        backend=backend, **opts)
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        loss64, ref = R.linear_cross_entropy(h64, w64, labels, reduction=reduction, return_stats=True, **opts)
        if reduction == "none":
            assert torch.isnan(stats.loss[5]).item() and stats.loss[6].item() == 0.0
            keep = torch.ones(n, dtype=torch.bool)
            keep[[5, 6]] = False
            assert torch.isfinite(stats.loss.cpu()[keep]).all()
        else:
            assert torch.isnan(stats.loss).item()
        assert torch.isnan(stats.lse[[5, 6]]).all().item() and torch.isnan(stats.entropy[[5, 6]]).all().item()
        assert_close(stats.loss.cpu(), loss64, dtype=torch.float32, name=f"loss ({reduction})")
        for field in ("lse", "z_loss", "accuracy", "entropy"):
            assert_close(getattr(stats, field).cpu(), ref[field], dtype=torch.float32, name=f"{field} ({reduction})")
        assert torch.equal(stats.predictions.cpu(), ref["predictions"]), "predictions"
        if reduction == "mean":
            dh, dw = torch.autograd.grad(stats.loss, [hl, wl])
            rh, rw = torch.autograd.grad(loss64, [h64, w64])
            others = [i for i in range(n) if i not in (5, 6)]
            assert_close(dh.cpu()[others], rh[others], dtype=torch.float32, name="dh (finite rows)")
            assert torch.isnan(dh[5]).all().item(), "dh of the labelled NaN row"
            assert torch.isnan(dh[6]).all().item(), ("dh of the ignored NaN row: PyTorch's is NaN (log_softmax's "
                                                     "backward multiplies its zero incoming gradient by NaN)")
            assert torch.isnan(dw).all().item() and torch.isnan(rw).all().item(), "dW: NaN, as PyTorch's"


# ------------------------------------------------------------------------------------------
# 64-bit offsets inside the kernels.  Peak memory per test, under 80 GB (one H100): V·D, 17 GB
# (a 4.3 GB bf16 weight, the 8.6 GB fp32 dW accumulator and its 4.3 GB bf16 result; then the
# embedding's gradient); N·V, 13 GB (one chunk of 2.16e9 logits: 4.3 GB in bf16, 8.6 GB where a
# backend keeps fp32 logits, and a bf16 dz beside those).

BIG_D = 8192
BIG_V = (1 << 31) // BIG_D + 3  # 262,147 rows of 8,192: V·D just above 2^31, row 262,144 starts at 2^31
_SPECIAL = [0, 1000, BIG_V // 2, BIG_V - 3, BIG_V - 2, BIG_V - 1]
_ZERO_ROWS = [5, (1 << 31) // BIG_D - 1, (1 << 31) // BIG_D, BIG_V - 4]  # a label's, around 2^31, the last


@pytest.mark.slow
def test_vocab_times_dim_beyond_int32(backend):
    """V·D > 2^31 elements of a bf16 weight, zero but for a few rows (some past offset 2^31): the
    fused loss with dh and dW (gradient-in-forward), and the embedding's gather and scatter of rows
    past 2^31, against the exact fp64 answer (a zero row's logit is exactly 0, so the reference
    needs only the special rows and their count).  The bf16 baseline is plain PyTorch on the same
    tensors; its dW GEMM is taken over the checked rows only (the others are not compared)."""
    gen = torch.Generator().manual_seed(1)
    special = (torch.randn(len(_SPECIAL), BIG_D, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    h0 = (torch.randn(3, BIG_D, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    w = torch.zeros(BIG_V, BIG_D, dtype=torch.bfloat16, device="cuda")
    w[_SPECIAL] = special
    labels = torch.tensor([BIG_V - 1, BIG_V - 3, 5], device="cuda")  # two special rows past 2^31, one zero row
    g = 1.7
    h, wl = h0.clone().requires_grad_(), w.requires_grad_()
    loss, lse = tk.linear_cross_entropy(h, wl, labels, reduction="sum", return_lse=True, backend=backend)
    dh, dw = torch.autograd.grad(loss, [h, wl], torch.tensor(g, device="cuda"))
    rows = _SPECIAL + _ZERO_ROWS
    dw_rows = dw[rows].cpu()
    del dw
    # the exact answer, in fp64
    hd, sd = h0.double().cpu(), special.double().cpu()
    z = hd @ sd.t()  # [3, 6]: the special rows' logits; every other logit is 0
    zeros = BIG_V - len(_SPECIAL)
    lse_ref = torch.logsumexp(torch.cat([z, torch.full((3, 1), float(zeros), dtype=F64).log()], 1), 1)
    zrows = torch.zeros(3, len(rows), dtype=F64)
    zrows[:, : len(_SPECIAL)] = z
    onehot = torch.tensor([[float(int(y) == r) for r in rows] for y in labels.cpu()], dtype=F64)
    p = torch.exp(zrows - lse_ref[:, None])  # softmax of the checked rows
    dz_rows = g * (p - onehot)
    loss_ref = (lse_ref - (zrows * onehot).sum(1)).sum()
    dh_ref = g * (torch.exp(z - lse_ref[:, None]) @ sd) - g * (onehot[:, : len(_SPECIAL)] @ sd)
    dw_ref = dz_rows.t() @ hd
    # plain PyTorch in bf16 on the same tensors
    zl = F.linear(h0, w.detach()).requires_grad_()
    tok_lp = F.cross_entropy(zl.float(), labels, reduction="none")
    (dz_lp,) = torch.autograd.grad(tok_lp.sum(), [zl], torch.tensor(g, device="cuda"))
    assert dz_lp.dtype == torch.bfloat16
    dh_lp = dz_lp @ w.detach()
    dw_lp = dz_lp[:, rows].t() @ h0
    lse_lp = torch.logsumexp(zl.detach().float(), 1)
    tok_err = float((tok_lp.detach().double().cpu() - (lse_ref - (zrows * onehot).sum(1))).abs().sum())
    assert_close(lse.cpu(), lse_ref, lse_lp.cpu(), dtype=torch.bfloat16, name="lse")
    assert_close(loss.cpu(), loss_ref, dtype=torch.bfloat16, base=(tok_err, tok_err), name="loss")
    assert_close(dh.cpu(), dh_ref, dh_lp.cpu(), dtype=torch.bfloat16, name="dh")
    assert_close(dw_rows, dw_ref, dw_lp.cpu(), dtype=torch.bfloat16, name="dW (checked rows)")
    # the embedding: gather rows past 2^31, scatter (the bf16 sorted path) into them
    ids = torch.tensor([BIG_V - 1, 0, BIG_V - 2, BIG_V - 1], device="cuda")
    e = tk.embedding(ids, wl, backend=backend)
    assert torch.equal(e, w.detach()[ids])
    ge = torch.randn(4, BIG_D, device="cuda").to(torch.bfloat16)
    (gw,) = torch.autograd.grad(e, [wl], ge)
    assert torch.equal(gw[0], ge[1]) and torch.equal(gw[BIG_V - 2], ge[2])
    assert not gw[_ZERO_ROWS].any()
    both = ge[[0, 3]].double().sum(0).cpu()
    assert_close(gw[BIG_V - 1].cpu(), both, (ge[0] + ge[3]).cpu(), dtype=torch.bfloat16, name="embedding dW row V-1")
    del gw, e, w, wl
    torch.cuda.empty_cache()


N_BIG, V_BIG, D_SMALL = 33_000, 65_536, 8  # N·V = 2.16e9 > 2^31 in one chunk of N rows


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_tokens_times_vocab_beyond_int32_in_one_chunk(backend, reduction):
    """One chunk of N rows whose logits hold N·V > 2^31 elements (chunk_size=N: the default chunk is
    D rows, far below), so the row kernels address logits past 2^31 within a launch: the scalar loss
    with dh and dW (gradient-in-forward) and the per-token loss with its backward (recomputed).
    Only the first 64 and the last 192 rows carry labels (the last ones past row 2^31 / V = 32,768);
    the fp64 reference and the bf16 baseline (plain PyTorch) are computed for those rows alone."""
    gen = torch.Generator().manual_seed(3)
    h0 = torch.randn(N_BIG, D_SMALL, generator=gen).to(torch.bfloat16).cuda()
    w0 = (torch.randn(V_BIG, D_SMALL, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    labels = torch.full((N_BIG,), -100, device="cuda")
    live = torch.cat([torch.arange(0, 64), torch.arange(N_BIG - 192, N_BIG)]).cuda()
    labels[live] = torch.randint(0, V_BIG, (len(live),), generator=gen).cuda()
    labels[-1] = V_BIG - 1
    gtok = torch.randn(N_BIG, generator=gen).cuda()
    opts = dict(label_smoothing=0.1, reduction=reduction)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    out, lse = tk.linear_cross_entropy(h, w, labels, return_lse=True, chunk_size=N_BIG, backend=backend, **opts)
    seed = torch.tensor(1.7, device="cuda") if reduction == "sum" else gtok
    dh, dw = torch.autograd.grad(out, [h, w], seed)
    dead = torch.ones(N_BIG, dtype=torch.bool, device="cuda")
    dead[live] = False
    assert not dh[dead].any(), "an ignored row got a gradient"
    dh_live, lse_live = dh[live].cpu(), lse[live].cpu()
    tok_live = out[live].cpu() if reduction == "none" else None
    loss = out.cpu() if reduction == "sum" else None
    del out, lse, dh, h
    yl = labels[live]
    g_live = seed if reduction == "sum" else gtok[live]

    def plain(dtype):
        hl, wl = (t.detach().to(dtype).requires_grad_() for t in (h0[live], w0))
        tok, lse_ = R.linear_cross_entropy(hl, wl, yl, return_lse=True, label_smoothing=0.1, reduction="none")
        total = (tok * g_live.to(tok.dtype)).sum()
        return [t.detach().cpu() for t in (tok, lse_, *torch.autograd.grad(total, [hl, wl]))]

    ref, lowp = plain(F64), plain(torch.bfloat16)
    assert_close(lse_live, ref[1], lowp[1], dtype=torch.bfloat16, name="lse")
    if reduction == "none":
        assert_close(tok_live, ref[0], lowp[0], dtype=torch.bfloat16, name="loss per token")
    else:
        tok_err = float((lowp[0].double() - ref[0]).abs().sum())
        assert_close(loss, ref[0].sum(), dtype=torch.bfloat16, base=(tok_err, tok_err), name="loss")
    assert_close(dh_live, ref[2], lowp[2], dtype=torch.bfloat16, name="dh")
    assert_close(dw.cpu(), ref[3], lowp[3], dtype=torch.bfloat16, name="dW")
    del dw, w
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# the cost model (python -m tiedkernels gpu-report) against what the GPU really launches


def test_cost_model_launch_plan_matches_the_profile():
    """The cuda backend's launches at a small bf16 shape, read by torch.profiler, are the ones
    tiedkernels.gpu_report models: its own kernels exactly (row kernel per chunk, the index
    check), and at least as many kernels in all (cuBLAS may add split-K reductions)."""
    from torch.profiler import ProfilerActivity, profile

    from tiedkernels import gpu_report

    if "cuda" not in GPU_BACKENDS:
        pytest.skip(f"the cuda backend is not in TIEDKERNELS_TEST_GPU_BACKENDS={','.join(GPU_BACKENDS)}")
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


# ------------------------------------------------------------------------------------------
# The row kernel's 16-byte loads, the backward that skips the max/sum pass, +inf logits, and the
# sorted embedding backward's long runs.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("v", [7, 123, 4099])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_row_kernel_odd_rows_forward_and_recompute(backend, v, bias, dtype):
    """Rows of an odd V start anywhere (the row kernel reads a scalar head up to a 16-byte boundary,
    whole vectors, a scalar tail), V=7 is less than one vector, D is odd, and a chunk of 5 rows puts
    rows at every offset; a bias keeps the logits in fp32 (4-byte rows). The loss, lse, dh and dW of
    the gradient-in-forward call, and dh and dW of the backward that recomputes from the saved lse
    (lce_bwd: the max/sum pass skipped), against fp64."""
    n, d, chunk = 37, 33, 5
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    h = torch.randn(n, d, dtype=F64)
    w = torch.randn(v, d, dtype=F64) * 0.5
    b = torch.randn(v, dtype=F64) if bias else None
    y = torch.randint(0, v, (n,))
    y[3] = -100
    g = torch.rand(n, dtype=F64) + 0.5

    def ref(prec):
        hh, ww = h.to(prec).requires_grad_(), w.to(prec).requires_grad_()
        bb = b.to(prec) if bias else None
        loss, lse = R.linear_cross_entropy(hh, ww, y, bias=bb, reduction="none", return_lse=True, **opts)
        dh, dw = torch.autograd.grad(loss, [hh, ww], g.to(loss.dtype))
        return loss.detach(), lse.detach(), dh, dw

    r64, rlow = ref(F64), ref(dtype)
    hc, wc = h.to(dtype).cuda(), w.to(dtype).cuda()
    bc = b.to(dtype).cuda() if bias else None
    yc, gc = y.cuda(), g.float().cuda()
    with torch.no_grad():
        op = _gpu_op(backend, "lce_fwd")
        loss, lse, *_ = op(hc, wc, bc, yc, None, -100, 0.1, 1e-3, 0.0, 1.0, 0, v, chunk, False, False, False)
        _, _, dh, dw, *_ = op(hc, wc, bc, yc, gc, -100, 0.1, 1e-3, 0.0, 1.0, 0, v, chunk, True, True, False)
        bdh, bdw, _ = _gpu_op(backend, "lce_bwd")(gc, hc, wc, bc, yc, lse, -100, 0.1, 1e-3, 0.0, 1.0, 0, v, chunk,
                                                   True, True, False)
    for what, out, i in (("loss", loss, 0), ("lse", lse, 1), ("dh", dh, 2), ("dW", dw, 3), ("lce_bwd dh", bdh, 2),
                         ("lce_bwd dW", bdw, 3)):
        assert_close(out.cpu(), r64[i], rlow[i], dtype=dtype, name=f"{what} ({backend}, V={v})")


@pytest.mark.parametrize("v", [3, 8, 16, 123])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plus_inf_logit_gives_nan_loss_and_gradient(backend, v, dtype):
    """A +inf logit makes PyTorch's log_softmax NaN across its row, so the token's loss and its row of
    dL/dz (hence dh) are NaN, however few entries the row has (with 16-byte loads a short row is one
    thread's), in both strategies; the lse returned is torch.logsumexp's (+inf) and the entropy NaN
    (its softmax is NaN), as on the CPU backends."""
    n, d = 6, 5
    h = torch.randn(n, d, dtype=F64)
    w = torch.randn(v, d, dtype=F64)
    b = torch.zeros(v, dtype=F64)
    b[v // 2] = float("inf")  # every row holds +inf at column v // 2
    y = torch.randint(0, v, (n,))
    y[1] = -100  # an ignored row: its gradient row is NaN too (PyTorch's 0 * NaN)
    z = (h @ w.t() + b).float()
    assert torch.isnan(F.cross_entropy(z, y, reduction="none")[y != -100]).all()
    wc, bc, yc = w.to(dtype).cuda(), b.to(dtype).cuda(), y.cuda()
    for reduction in ("none", "sum"):  # recompute from the saved lse; the gradient in the forward
        hc = h.to(dtype).cuda().requires_grad_()
        loss, lse = tk.linear_cross_entropy(hc, wc, yc, bias=bc, reduction=reduction, return_lse=True,
                                            backend=backend)
        lossc = loss.cpu()
        assert torch.isnan(lossc if reduction == "sum" else lossc[y != -100]).all(), f"{backend}, V={v}: {lossc}"
        assert torch.equal(lse.cpu(), torch.full((n,), float("inf"))), f"{backend}, V={v}: lse {lse.cpu()}"
        (dh,) = torch.autograd.grad(loss.sum(), [hc])
        assert torch.isnan(dh.cpu()).all(), f"{backend}, V={v} ({reduction}): {dh.cpu()}"
    stats = tk.linear_cross_entropy(h.to(dtype).cuda(), wc, yc, bias=bc, reduction="none", return_stats=True,
                                    backend=backend)
    assert torch.isnan(stats.entropy.cpu()).all(), f"{backend}, V={v}: entropy {stats.entropy.cpu()}"
    assert torch.equal(stats.predictions.cpu(), torch.full((n,), v // 2)), "predictions: the +inf column"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [33, 128, 300])
def test_embedding_backward_long_runs(backend, d, dtype):
    """Runs of 31, 32, 33 and 500 equal ids (the CUDA kernel sums a run of 32 or more per tile of 128
    columns, a shorter one in one block over all of D), a run on the padding row, and random ids; in
    deterministic mode. Each row is the run's gradients summed in fp32 in the order of their
    positions and rounded once, bitwise, whatever the tiling; all of it against fp64."""
    v, pad = 64, 3
    ids = torch.cat([torch.full((31,), 5), torch.full((32,), 9), torch.full((33,), 2), torch.full((500,), 7),
                     torch.full((40,), pad), torch.randint(0, v, (200,))])
    ids = ids[torch.randperm(ids.numel())].reshape(4, -1)
    grad = torch.randn(*ids.shape, d, dtype=F64)
    flat, g2 = ids.reshape(-1), grad.to(dtype).reshape(-1, d)
    expect = torch.zeros(v, d, dtype=F64).index_add_(0, flat, grad.reshape(-1, d))
    lowp = torch.zeros(v, d, dtype=dtype).index_add_(0, flat, g2)
    expect[pad], lowp[pad] = 0, 0
    out, again = _embedding_bwd_twice(backend, grad.to(dtype), ids, v, pad, True)
    assert torch.equal(out, again), "the deterministic path must be bitwise repeatable"
    out = out.cpu()
    assert torch.all(out[pad] == 0), "the padding row got a gradient"
    for row in (5, 9, 2, 7):
        acc = torch.zeros(d, dtype=torch.float32)
        for q in (flat == row).nonzero().flatten().tolist():
            acc += g2[q].float()
        assert torch.equal(out[row], acc.to(dtype)), f"row {row}: not the in-order fp32 sum rounded once"
    assert_close(out, expect, lowp, dtype=dtype, name=f"embedding_bwd long runs ({backend}, D={d})")


@pytest.mark.parametrize("dtype", LOWP, ids=LOWP_IDS)
def test_token_objectives_and_distillation(backend, dtype):
    """token_log_probs, linear_token_objective, grpo_loss and linear_distillation_loss on CUDA tensors (the
    chunked plain-PyTorch pass: cuBLAS GEMMs, the fp32-output dW GEMM for bf16) against fp64 on the CPU."""
    from _rl_reference import final_logits, jsd, token_stats

    g = torch.Generator().manual_seed(0)
    b_, t_, d, v = 4, 37, 64, 1000
    h = torch.randn(b_, t_, d, generator=g, dtype=F64)
    w = torch.randn(v, d, generator=g, dtype=F64) * 0.2
    ht, wt = torch.randn(b_, t_, 48, generator=g, dtype=F64), torch.randn(v, 48, generator=g, dtype=F64) * 0.2
    y = torch.randint(0, v, (b_, t_), generator=g)
    mask = (torch.rand(b_, t_, generator=g) > 0.2).to(F64)
    adv = torch.randn(b_, generator=g, dtype=F64)
    temp = torch.rand(b_, 1, generator=g, dtype=F64) + 0.5
    tol = 2e-5 if dtype == torch.float32 else 3e-2

    def on_gpu(*xs):
        return [x.to("cuda", dtype).requires_grad_() for x in xs]

    def check(got, want, name):
        got, want = got.double().cpu(), want.double()
        err = (got - want).abs().max() / want.abs().max().clamp(min=1e-30)
        assert err < tol, (name, float(err))

    hg, wg = on_gpu(h, w)
    res = tk.token_log_probs(hg, wg, y.cuda(), temperature=temp.cuda(), chunk_size=64, backend=backend)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = token_stats(final_logits(h64, w64, None, 1.0, None, temp.expand(b_, t_)), y)
    ups = [torch.randn(b_, t_, generator=g, dtype=F64) for _ in range(3)]
    for i, name in enumerate(("log_probs", "entropy", "lse")):
        check(res[i].detach(), ref[i].detach(), name)
    mine = torch.autograd.grad(sum((r * u.cuda()).sum() for r, u in zip(res, ups)), (hg, wg))
    want = torch.autograd.grad(sum((r * u).sum() for r, u in zip(ref, ups)), (h64, w64))
    for a, r, name in zip(mine, want, ("dh", "dW")):
        assert a.dtype == dtype
        check(a, r, "token_log_probs " + name)

    hg, wg = on_gpu(h, w)
    out = tk.grpo_loss(hg, wg, y.cuda(), adv.cuda(), completion_mask=mask.cuda(), loss_type="grpo",
                       entropy_coef=0.01, chunk_size=64, backend=backend)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    from _rl_reference import trl_grpo_loss

    lp, ent, _ = token_stats(final_logits(h64, w64), torch.where(mask.bool(), y, -100))
    rl, _ = trl_grpo_loss(lp, ent, mask, adv, loss_type="grpo", entropy_coef=0.01)
    check(out.loss.detach(), rl.detach(), "grpo loss")
    for a, r, name in zip(torch.autograd.grad(out.loss, (hg, wg)), torch.autograd.grad(rl, (h64, w64)), ("dh", "dW")):
        check(a, r, "grpo " + name)

    hg, wg = on_gpu(h, w)
    out = tk.linear_distillation_loss(hg, wg, y.cuda(), teacher_hidden=ht.to("cuda", dtype),
                                      teacher_weight=wt.to("cuda", dtype), beta=0.3, temperature=0.8, alpha=0.2,
                                      chunk_size=64, backend=backend)
    h64, w64 = h.clone().requires_grad_(), w.clone().requires_grad_()
    zs = final_logits(h64, w64).reshape(-1, v)
    d = jsd(zs / 0.8, (ht @ wt.T).reshape(-1, v) / 0.8, 0.3)
    ce = F.cross_entropy(zs, y.reshape(-1), reduction="none")
    rd = (0.8 * d + 0.2 * ce).mean()
    check(out.detach(), rd.detach(), "distill loss")
    for a, r, name in zip(torch.autograd.grad(out, (hg, wg)), torch.autograd.grad(rd, (h64, w64)), ("dh", "dW")):
        check(a, r, "distill " + name)


def test_grad_filter_on_token_objectives_and_distillation(backend):
    """The gradient filter of the token-level passes on CUDA tensors (the kept columns found with a
    nonzero, the gathered GEMMs, the index_add into the fp32 dW) against the same calls on the CPU: the
    same columns are left out (the losses agree, and so do the filtered gradients, which differ from the
    exact ones)."""
    import math

    g = torch.Generator().manual_seed(0)
    n, d, v, chunk, thr = 150, 32, 1000, 64, 2e-3
    w = torch.randn(v, d, generator=g, dtype=F64) / math.sqrt(d)
    y = torch.randint(0, v, (n,), generator=g)
    h = 16.0 * w[y] + 0.3 * torch.randn(n, d, generator=g, dtype=F64) / math.sqrt(d)
    y[5:12] = -100
    zt = (h @ w.T) * 0.9 + 0.3 * torch.randn(n, v, generator=g, dtype=F64)
    calls = {
        "objective": lambda hh, ww, dev, t: tk.linear_token_objective(
            hh, ww, y.to(dev), lambda lp, ent: -lp - 0.05 * ent, chunk_size=chunk, grad_filter=t, backend=backend
            if dev == "cuda" else "auto"),
        "log_probs": lambda hh, ww, dev, t: tk.token_log_probs(
            hh, ww, y.to(dev), chunk_size=chunk, grad_filter=t, backend=backend if dev == "cuda" else "auto"
        ).log_probs.sum(),
        "distillation": lambda hh, ww, dev, t: tk.linear_distillation_loss(
            hh, ww, y.to(dev), teacher_logits=zt.to(dev, hh.dtype), alpha=0.2, chunk_size=chunk, grad_filter=t,
            backend=backend if dev == "cuda" else "auto"),
    }
    for name, fn in calls.items():
        res = {}
        for dev, t in (("cuda", thr), ("cpu", thr), ("cpu", None)):
            hh = h.to(dev, torch.float32).requires_grad_()
            ww = w.to(dev, torch.float32).requires_grad_()
            loss = fn(hh, ww, dev, t)
            loss.backward()
            res[(dev, t)] = [x.detach().double().cpu() for x in (loss, hh.grad, ww.grad)]
        for a, b_, what in zip(res[("cuda", thr)], res[("cpu", thr)], ("loss", "dh", "dW")):
            err = (a - b_).abs().max() / b_.abs().max().clamp(min=1e-30)
            assert err < 1e-5, (name, what, float(err))
        assert not torch.allclose(res[("cpu", thr)][2], res[("cpu", None)][2], atol=1e-7, rtol=0), name
