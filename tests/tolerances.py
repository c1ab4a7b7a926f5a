"""How close a kernel must be to the reference, per dtype.

Every comparison is against the fp64 reference computed on the *same input values* (the
low-precision inputs upcast, so the only error measured is the kernel's own arithmetic).

* fp64 and fp32: plain ``atol``/``rtol`` bounds (``torch.testing.assert_close`` semantics).
* bf16/fp16: the flash-attention rule.  The error of the kernel against fp64 must be at most
  ``mult`` times the error of the same-precision reference (plain PyTorch, unchunked, in that
  dtype) against fp64, plus ``atol`` (a floor for results that the reference gets exactly).
  The bound scales with what the dtype can do, so it stays tight without hand-tuned numbers.
  See ``assert_close`` for which error (RMS and max).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    mult: float = 0.0  # > 0: relative to the same-precision reference's error (flash-attention rule)


TOLERANCES = {
    # fp64 runs every step in fp64 (std::exp, BLAS dgemm), only the summation order differs
    # from the unchunked reference: observed errors are ~1e-15 relative (1.6e-13 on a 70,001-term
    # dot product of O(200)), so 1e-12 leaves a 100x margin.
    torch.float64: Tol(atol=1e-12, rtol=1e-12),
    # fp32: GEMM outputs of O(5) with D <= 64 carry ~1e-6 rounding, the CPU exp/tanh are a few
    # ulp, and losses summed over ~40 tokens reach O(100): observed max errors ~1e-6 absolute
    # and ~3e-7 relative, so 2e-5 / 1e-5 leaves a 10x margin and still catches a wrong term
    # (a missing label-smoothing or z-loss term moves results by >= 1e-3).
    torch.float32: Tol(atol=2e-5, rtol=1e-5),
    # bf16 (8-bit mantissa, eps 2^-8): kernel RMS error <= 2x plain PyTorch bf16's + 1e-4
    # (max error <= 4x).
    # The floor is ~40x below one bf16 ulp at 1.0, so it only matters where PyTorch is exact.
    torch.bfloat16: Tol(atol=1e-4, rtol=0.0, mult=2.0),
    # fp16 (11-bit mantissa): same rule, floor scaled to its eps of 2^-11.
    torch.float16: Tol(atol=1e-5, rtol=0.0, mult=2.0),
}


def _diff(a, ref):
    """|a - ref| in fp64, NaN-aware: agreeing NaNs/Infs count 0, a NaN where the reference has none inf."""
    a, ref = a.detach().double(), ref.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(ref)
    same_inf = torch.isinf(a) & (a == ref)
    diff = (a - ref).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    return torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)


def errors(a, ref):
    """(RMS, max) absolute error of ``a`` against ``ref``."""
    if a.numel() == 0:
        return 0.0, 0.0
    d = _diff(a, ref)
    return float(d.square().mean().sqrt()), float(d.max())


def assert_close(actual, ref64, ref_lowp=None, *, dtype, name="", base=None):
    """``actual`` (kernel output) against ``ref64`` (fp64 reference).

    Low precision (``mult`` > 0): ``ref_lowp`` is the same-precision reference; the kernel's RMS
    error must be within ``mult`` x the reference's RMS error + ``atol``, and its max error within
    ``2 * mult`` x the reference's max error + ``atol``.  (The RMS over the tensor is the stable
    measure of accuracy; the max alone moves by whole ulps from one random draw to the next, so
    it gets the wider multiple and is there to catch a wrong element.)  For a scalar that sums
    many terms, pass ``base`` = (rms, max) of the reference's error computed without the luck
    of cancellation, e.g. the sum of the per-token errors."""
    tol = TOLERANCES[dtype]
    assert actual is not None, f"{name}: missing (None)"
    assert tuple(actual.shape) == tuple(ref64.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if tol.mult == 0.0:
        torch.testing.assert_close(actual.double(), ref64.double(), atol=tol.atol, rtol=tol.rtol, equal_nan=True,
                                   msg=lambda m: f"{name} ({dtype}): {m}")
        return
    if base is None:
        assert ref_lowp is not None, f"{name}: the {dtype} rule needs the same-precision reference"
        base = errors(ref_lowp, ref64)
    err = errors(actual, ref64)
    for what, e, b, mult in (("RMS", err[0], base[0], tol.mult), ("max", err[1], base[1], 2 * tol.mult)):
        bound = mult * b + tol.atol
        assert e <= bound, (f"{name} ({dtype}): {what} error {e:.3g} vs fp64 exceeds {mult:g}x the {dtype} "
                            f"reference's {b:.3g} + {tol.atol:g} = {bound:.3g}")
