"""The low-precision GEMMs of the cpu and torch backends: the fp32 tiles and ATen's own GEMM.

On a CPU without bf16/fp16 instructions ATen's bf16 GEMM is scalar code (dz @ W of a
[512, 32768] x [32768, 2048] chunk: 325 s on a 2-core AVX2 machine, against 0.6 s through fp32),
so both backends take each GEMM through fp32 tiles of the weight (csrc/lce_driver.cpp: cpu_mm;
tiedkernels/_torch_backend.py: _mm).  Products of bf16/fp16 values are exact in fp32, so the tiles
give the fp32 GEMM of the upcast operands, rounded once: checked here against that, entry by
entry, with shapes that make every tiling (along the rows, the columns, the reduction) take
several tiles.  On a CPU with them (AVX512-BF16/FP16, AMX) both backends use ATen's GEMM, whose
order of summation is its own: a logit rounded the other way is PyTorch's value there, not the
tiles'.  Where the output is fp32 (dW summed over chunks, exact logits) and the CPU has those
instructions, the cpu backend takes MKL's mixed GEMM (bf16/fp16 operands, fp32 products and sums,
fp32 output), which runs on them; the "mkl" path forces it for every low-precision GEMM of the cpu
backend (the torch backend keeps its tiles).  Each path is forced here (set_cpu_lowp_gemm_path), so
every one is tested on every CPU.
"""

import contextlib

import pytest
import torch

import tiedkernels as tk
from tiedkernels import _torch_backend as TB

LOW = [torch.bfloat16, torch.float16]


@contextlib.contextmanager
def _gemm_path(path):
    previous = TB.set_cpu_lowp_gemm_path(path)
    try:
        yield
    finally:
        TB.set_cpu_lowp_gemm_path(previous)


def _has_mixed_gemm():
    from tiedkernels import _ext

    ext = _ext.load()
    return ext is not None and ext._cpu_mixed_gemm_available(True) and ext._cpu_mixed_gemm_available(False)


MIXED = pytest.param("mkl", marks=pytest.mark.skipif(not _has_mixed_gemm(), reason="this torch build has no MKL"))


@pytest.fixture(params=["tiles", MIXED])
def upcast(request):
    """A path that sums fp32 products in fp32 whatever this CPU's own bf16/fp16 instructions: the
    fp32 tiles, or MKL's mixed GEMM (the cpu backend; the torch backend takes its tiles there)."""
    with _gemm_path(request.param):
        yield request.param


def _rounded_f32(a, b, bias=None):
    out = a.float() @ b.float()
    if bias is not None:
        out = out + bias.float()
    return out


def _within_gemm_rounding(got, want, a, b):
    """got and want are two GEMMs of a @ b in a's dtype with fp32 sums in other orders: at most one
    unit in the last place of the result apart, plus what the order of fp32 summation moves."""
    diff = (got.float() - want.float()).abs()
    order = 2 * a.shape[1] * torch.finfo(torch.float32).eps * (a.float().abs() @ b.float().abs())
    bound = want.float().abs() * torch.finfo(got.dtype).eps * 1.01 + order
    assert bool((diff <= bound).all()), f"off by {float((diff / bound).max())} of the bound"


def _check_once_rounded(got, a, b, bias=None):
    """got equals the fp32 GEMM rounded once to got's dtype; where fp32's order of summation moves the
    value across a rounding boundary, by one unit in the last place at most."""
    exact = _rounded_f32(a, b, bias)
    want = exact.to(got.dtype)
    assert got.dtype == a.dtype and got.shape == want.shape
    if want.numel() == 0:
        return
    _within_gemm_rounding(got, want, a, b)
    assert float((got != want).float().mean()) < 0.01, "more than 1% of the entries differ from the fp32 GEMM"


@pytest.fixture(params=LOW, ids=["bf16", "fp16"])
def low(request):
    return request.param


def _inputs(n, v, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(v, d, generator=gen) * 0.1).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype)
    g = torch.randn(n, v, generator=gen).to(dtype)
    return h, w, b, g


# Tiles hold 8 MiB of fp32: with D=512 that is 4096 vocabulary rows, so V=10007 takes three tiles
# along the columns (logits) and the reduction (dh); with 1024 tokens, dW (rows = V) takes five.
SHAPES = [(1024, 10007, 512), (3, 10007, 512), (20000, 123, 64), (5, 7, 9000), (0, 123, 64)]


@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_logits_op_is_the_fp32_gemm_rounded_once(backend, low, n, v, d, with_bias, upcast):
    h, w, b, g = _inputs(n, v, d, low)
    bias = b if with_bias else None
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    br = bias.clone().requires_grad_() if with_bias else None
    z = tk.logits(hr, wr, bias=br, backend=backend)
    _check_once_rounded(z.detach(), h, w.t(), bias)
    grads = torch.autograd.grad(z, [hr, wr] + ([br] if with_bias else []), g)
    _check_once_rounded(grads[0], g, w)
    _check_once_rounded(grads[1], g.t(), h)


@pytest.mark.parametrize("chunk_size", [None, 256], ids=["one-chunk", "chunks"])
def test_fused_loss_gemms_match_the_fp32_path(backend, low, chunk_size, upcast):
    """The fused loss's dh and dW on the tiled (or MKL's mixed) path against the same algorithm in fp32 arithmetic
    on the upcast operands (dL/dz rounded once to the input dtype, as the driver does): the fp64
    reference checks of the rest of the suite bound the error; this pins the GEMMs themselves."""
    n, v, d = 1024, 10007, 512
    h, w, _, _ = _inputs(n, v, d, low, seed=1)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = -100
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.linear_cross_entropy(hr, wr, labels, reduction="sum", chunk_size=chunk_size, backend=backend)
    dh, dw = torch.autograd.grad(loss, [hr, wr])
    # dL/dz from the bf16 logits of the same GEMM, in fp32, rounded once as the driver rounds it
    z = _rounded_f32(h, w.t()).to(low).float()
    p = torch.softmax(z, 1)
    keep = labels != -100
    p[keep, labels[keep]] -= 1
    p[~keep] = 0
    dz = p.to(low)
    dh_want = _rounded_f32(dz, w).to(low)
    dw_want = _rounded_f32(dz.t(), h).to(low)
    # the driver's dL/dz comes from its own row kernel (its exp and sums differ from softmax's in
    # the last fp32 bits), so a few dz entries differ by one ulp: compare as GEMMs of such inputs
    for got, want, scale in ((dh, dh_want, dz.float().abs() @ w.float().abs()),
                             (dw, dw_want, dz.float().abs().t() @ h.float().abs())):
        err = (got.float() - want.float()).abs()
        bound = 2 * torch.finfo(low).eps * (want.float().abs() + scale)
        assert bool((err <= bound).all()), f"max error {float((err / bound).max())} of the bound"


def test_slow_gemm_detection_agrees_with_the_extension():
    """Both backends take the same path: torch's view of the CPU decides for _torch_backend, ATen's
    cpuinfo for the extension, and they read the same flags; a forced path holds for both, and
    None gives the decision back to the CPU."""
    from tiedkernels import _ext

    ext = _ext.load()
    assert ext is not None, _ext.error()
    caps = torch._C._cpu._get_cpu_capability()
    for dtype, keys in ((torch.bfloat16, ("avx512_bf16", "amx_bf16")), (torch.float16, ("avx512_fp16", "amx_fp16"))):
        slow = not any(caps.get(k) is True for k in keys)
        assert TB._cpu_gemm_is_slow(dtype) == slow
        assert ext._cpu_lowp_gemm_is_slow(dtype == torch.bfloat16) == slow
        for path, want in (("tiles", True), ("native", False)) + ((("mkl", True),) if _has_mixed_gemm() else ()):
            with _gemm_path(path):
                assert TB._cpu_gemm_is_slow(dtype) == want
                assert ext._cpu_lowp_gemm_is_slow(dtype == torch.bfloat16) == want
        assert TB._cpu_gemm_is_slow(dtype) == slow
        assert ext._cpu_lowp_gemm_is_slow(dtype == torch.bfloat16) == slow
    with pytest.raises(ValueError, match="'tiles'"):
        TB.set_cpu_lowp_gemm_path("fp32")
    assert TB._cpu_gemm_is_slow(torch.bfloat16) == (not any(caps.get(k) is True for k in ("avx512_bf16", "amx_bf16")))


@pytest.mark.parametrize("path", ["tiles", "native"])
@pytest.mark.parametrize("m,k,n", [(0, 5, 7), (5, 0, 7), (5, 7, 0)])
def test_empty_dimensions(low, m, k, n, path):
    a, b = torch.randn(m, k).to(low), torch.randn(k, n).to(low)
    bias = torch.randn(n).to(low)
    with _gemm_path(path):
        assert torch.equal(TB._mm(a, b), (a.float() @ b.float()).to(low))
        assert torch.equal(TB._mm(a, b, bias), (a.float() @ b.float() + bias.float()).to(low))


def _stock_and_exact(h, w, labels):
    """(loss, dh, dW) of a stock model's summed loss on these low-precision h and W (logits by ATen's
    GEMM in their dtype, the loss in fp32), and the same in fp64 on the upcast values."""
    out = []
    for hh, ww, logits in ((h, w, lambda a, b: (a @ b.t()).float()), (h.double(), w.double(), lambda a, b: a @ b.t())):
        hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(logits(hh, ww), labels, reduction="sum")
        out.append((loss.detach(), *torch.autograd.grad(loss, [hh, ww])))
    return out


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_native_path_is_atens_gemm(backend, low, with_bias):
    """With the native path (a CPU with bf16/fp16 instructions; forced here on any CPU) the logits
    op and its gradients are ATen's own GEMMs of the same operands, as a stock model computes them;
    and the fused loss agrees with a stock loss built on those GEMMs.  Small shapes: on a CPU without
    the instructions ATen's GEMM is scalar code."""
    n, v, d = 37, 301, 96
    h, w, b, g = _inputs(n, v, d, low, seed=3)
    bias = b if with_bias else None
    with _gemm_path("native"):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        br = bias.clone().requires_grad_() if with_bias else None
        z = tk.logits(hr, wr, bias=br, backend=backend)
        grads = torch.autograd.grad(z, [hr, wr], g)
        labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(4))
        labels[::5] = -100
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = tk.linear_cross_entropy(hl, wl, labels, reduction="sum", chunk_size=16, backend=backend)
        dh, dw = torch.autograd.grad(loss, [hl, wl])
    _within_gemm_rounding(z.detach(), torch.nn.functional.linear(h, w, bias), h, w.t())
    _within_gemm_rounding(grads[0], g @ w, g, w)
    _within_gemm_rounding(grads[1], g.t() @ h, g.t(), h)
    # a stock loss on ATen's low-precision logits, against the fp64 answer: the fused loss is as close
    stock, exact = _stock_and_exact(h, w, labels)
    for got, base, ref in zip((loss, dh, dw), stock, exact):
        err, base_err = (got.double() - ref).norm(), (base.double() - ref).norm()
        assert err <= 1.5 * base_err + 1e-6 * ref.norm(), (float(err), float(base_err))


@pytest.mark.parametrize("path", ["tiles", "native", MIXED])
def test_dw_is_summed_in_fp32_across_chunks(backend, low, path):
    """dW of the fused loss over many chunks is one fp32 sum of every chunk's exact products, rounded
    once: as accurate as a stock model's single GEMM (fp32 accumulation inside it), on either GEMM
    path.  A chunk's contribution rounded to the input dtype before the sum would carry an error of
    its own size (1.2 to 1.4 times the stock RMS error here, at 16 chunks)."""
    n, v, d = 512, 2048, 128
    h, w, _, _ = _inputs(n, v, d, low, seed=5)
    labels = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(6))  # frequent targets
    with _gemm_path(path):
        wl = w.clone().requires_grad_()
        loss = tk.linear_cross_entropy(h, wl, labels, reduction="sum", chunk_size=32, backend=backend)
        (dw,) = torch.autograd.grad(loss, [wl])
    (_, _, sw), (_, _, ew) = _stock_and_exact(h, w, labels)
    err, base = float((dw.double() - ew).norm()), float((sw.double() - ew).norm())
    assert err <= 1.1 * base, f"dW RMS error {err / base:.2f} times a stock model's"


def test_mixed_gemm_is_there_on_x86_mkl_builds():
    """PyTorch's x86-64 builds with MKL export its mixed-precision GEMMs, which the cpu backend needs
    to sum dW on a CPU's bf16/fp16 instructions; without them it falls back to the fp32 tiles."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkl.is_available():
        pytest.skip("not an x86-64 torch build with MKL")
    assert _has_mixed_gemm()


@pytest.mark.skipif(not _has_mixed_gemm(), reason="this torch build has no MKL")
@pytest.mark.parametrize("grad_filter", [None, 1e-3], ids=["exact", "filter"])
def test_every_option_on_the_mixed_gemm_agrees_with_the_tiles(low, grad_filter):
    """The cpu backend's fused loss with a bias and a softcap (fp32 logits into an fp32 c, the bias
    summed in by the GEMM), many chunks (dW accumulated) and the gradient filter (kept columns'
    fp32 parts, dh summed over tiles): MKL's mixed GEMM against the fp32 tiles, which sum the same
    exact products in another order."""
    n, v, d = 300, 1031, 96
    h, w, b, _ = _inputs(n, v, d, low, seed=7)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(8))
    labels[::9] = -100
    out = {}
    for path in ("tiles", "mkl"):
        with _gemm_path(path):
            hr, wr, br = (t.clone().requires_grad_() for t in (h, w, b))
            loss = tk.linear_cross_entropy(hr, wr, labels, bias=br, softcap=20.0, chunk_size=64, backend="cpu",
                                           grad_filter=grad_filter)
            out[path] = (loss.detach(), *torch.autograd.grad(loss, [hr, wr, br]))
    ref_loss = out["tiles"][0].double()
    assert abs(float(out["mkl"][0].double() - ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for got, want in zip(out["mkl"][1:], out["tiles"][1:]):
        err = (got.float() - want.float()).abs()
        bound = 2 * torch.finfo(low).eps * want.float().abs() + 1e-3 * want.float().abs().max()
        assert bool((err <= bound).all()), f"max error {float((err / bound).max())} of the bound"
