"""Shared pieces of the Triton kernels: the index check, dtypes, the softcap's tanh."""

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# re-exported: the check's pieces, which the Triton ops and their tests reach through this module
from .._index_check import _DONE, _Done, _Pending, _tracing, device_record, on_gpu, pinned  # noqa: F401
from .._index_check import check_indices as _check_indices


def launcher(kernel):
    """``wrap_triton(kernel)``, which ``torch.compile`` traces into; an interpreted kernel
    (``TRITON_INTERPRET=1``) cannot be traced into and is launched as it is (what ``wrap_triton`` hands
    back for it on torch 2.13 and later; torch 2.11 refuses it instead)."""
    if type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return wrap_triton(kernel)


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    """Accumulation type inside the kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# tanh(x) = x + x^3 P(x^2) for |x| < 0.55: the Taylor series of tanh through x^19.  Its
# coefficients' ratio tends to (2/pi)^2, so at |x| = 0.55 each term is ~0.12 of the one before
# and the dropped tail is ~1e-9 relative, below fp32's half ulp (3e-8).
# For 0.55 <= |x| < 1 and 1 <= |x| < 2, polynomials of degree 8 and 9 in t = |x| - 0.78125 and
# |x| - 1.5 (centres exact in fp32, so t is exact): Chebyshev fits of tanh on those intervals
# (numpy.polynomial.chebyshev.chebfit on 20,001 Chebyshev points, turned into powers of t), 1e-11
# and 8e-10 from tanh. Their constant term is split into two fp32 numbers, whose single rounding
# would be most of an ulp of the result. There 1 - 2/(exp(2x) + 1) is 1.6 ulp off (at |x| = 0.56),
# 3 times torch.tanh's worst (0.5 ulp); from |x| = 2 on that formula is within 0.3 ulp.
@triton.jit
def tanh(x):
    """tanh in fp32 (or fp64) to within 0.75 ulp (torch.tanh: 0.5): an odd polynomial near 0, where
    ``1 - 2/(exp(2x) + 1)`` would lose everything below 1e-7 absolute (x = z/softcap is small
    for large softcaps), two short polynomials up to |x| = 2, and that formula beyond and for fp64
    (exact limits +-1, no overflow to NaN)."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    if x.dtype == tl.float64:
        # fp64: that formula's absolute error (~1e-16) is already 1e-13 relative at x = 1e-3
        r = big
    else:
        x2 = x * x
        p = -443861162.0 / 1856156927625.0
        p = p * x2 + 6404582.0 / 10854718875.0
        p = p * x2 + -929569.0 / 638512875.0
        p = p * x2 + 21844.0 / 6081075.0
        p = p * x2 + -1382.0 / 155925.0
        p = p * x2 + 62.0 / 2835.0
        p = p * x2 + -17.0 / 315.0
        p = p * x2 + 2.0 / 15.0
        p = p * x2 + -1.0 / 3.0
        t = a - 0.78125
        q = -0.010261400144078161
        q = q * t + 0.01889139700394451
        q = q * t + 0.0034241692676885097
        q = q * t + -0.06379325724035101
        q = q * t + 0.08975443725966034
        q = q * t + 0.05365290375360202
        q = q * t + -0.3744362972162318
        q = q * t + 0.5730376147248764
        q = (q * t + -1.9204804191375047e-08) + 0.6534236073493958  # tanh(0.78125) in two parts
        u = a - 1.5
        s = 0.00031085456613213624
        s = s * u + 0.0007952899164660749
        s = s * u + -0.0039941323024916065
        s = s * u + 0.007143056526230275
        s = s * u + -0.002656625949488936
        s = s * u + -0.02496897359581818
        s = s * u + 0.08781606598550554
        s = s * u + -0.16356616101687838
        s = s * u + 0.18070664063412806
        s = (s * u + -1.4790650815221795e-08) + 0.9051482677459717  # tanh(1.5) in two parts
        q = tl.where(a < 1.0, q, s)
        mid = tl.where(x < 0, -q, q)
        r = tl.where(a < 0.55, x + x * x2 * p, tl.where(a < 2.0, mid, big))
    return r


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` as ``dtype``, rounded to nearest even as torch rounds.  bf16 by hand: a GPU's
    conversion rounds to nearest, but the interpreter's truncates (toward zero, and flushes
    subnormals wrongly), which biases every stored gradient down by up to an ulp and sums to
    several ulps in a bias gradient.  Adding 0x7FFF plus the kept lowest bit carries into the top
    16 bits exactly as rounding to nearest even does; those bits are the bf16 (NaN kept a NaN)."""
    if dtype == tl.bfloat16:
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            up = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            top = tl.where(x != x, (bits >> 16) | 0x40, up)  # a NaN stays a NaN (quiet bit set)
            return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def softcap_args(softcap):
    """(has_cap, cap, 1/cap) of a softcap value: 0 disables it, and so does +inf, its limit
    (c tanh(z / c) -> z), which would otherwise evaluate inf * tanh(0) = NaN."""
    softcap = float(softcap)
    if softcap < 0 or softcap != softcap:
        raise RuntimeError(f"tiedkernels: softcap must be positive (0 disables it), got {softcap}")
    if softcap == 0 or math.isinf(softcap):
        return False, 0.0, 0.0
    return True, softcap, 1.0 / softcap


def interpreted(t):
    return t.device.type == "cpu"


def device_guard(t):
    """Make ``t``'s device current for an op's launches: Triton launches on the current device and
    stream, so tensors on ``cuda:1`` with device 0 current would run on the wrong GPU (the C++ side's
    OptionalCUDAGuard).  Nothing for CPU tensors (the interpreter)."""
    if not on_gpu(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def same_device(ref, **tensors):
    """A Triton kernel reads raw pointers: every tensor it is given must be on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"tiedkernels: {name} is on {t.device} but the weight on {ref.device}")


def check_indices(x, n, what, ignore_index=None):
    """``_index_check.check_indices`` (CPU tensors at once, CUDA tensors through a pinned copy read
    after the op's kernels are queued), with this module's ``on_gpu`` and ``pinned``: the seams
    through which CPU tensors are sent down the GPU path (the interpreter runs the kernels)."""
    return _check_indices(x, n, what, ignore_index, gpu=on_gpu(x), host=pinned)
