"""Gradient filtering on the Triton backend (CPU tensors, the Triton interpreter: TRITON_INTERPRET=1).

The checks of tests/test_grad_filter.py with ``backend="triton"``, on a subset of its cases that
keeps the interpreter's time small (about a minute and a half on two cores): the documented rule in
fp64 (both strategies, every option set), the bound in fp32 and bf16, 0 bit-for-bit the exact path,
the lse's gradient, the tied gradient, the vocabulary-parallel loss and the path a GPU's
``torch.compile`` trace takes.  ``make test-triton`` runs it in a process of its own with the
interpreter on (mk/cuda.mk); elsewhere (the interpreter off in this process) it skips itself.
"""

import os

import pytest  # noqa: E402
import torch  # noqa: E402

from tiedkernels import backends  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (requirements/triton.txt)")
if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on") or \
        backends.why_not("triton", "cpu") is not None:
    pytest.skip(f"the Triton interpreter is off in this process ({backends.why_not('triton', 'cpu')}); "
                "`make test-triton` runs this file on its own", allow_module_level=True)

import test_grad_filter as gf  # noqa: E402  (tests/ is on sys.path)

B = "triton"


@pytest.mark.parametrize("reduction,optset", [("mean", "plain"), ("mean", "bias_ignore_cw"), ("none", "cap_scale_shift"),
                                              ("none", "smooth_zloss")])
def test_fp64_follows_the_rule(reduction, optset):
    gf.test_fp64_follows_the_rule(B, reduction, optset)


@pytest.mark.parametrize("dtype,reduction,optset", [(torch.bfloat16, "mean", "bias_ignore_cw"),
                                                    (torch.float32, "none", "cap_scale_shift")], ids=["bf16", "fp32"])
def test_low_precision_within_bound(dtype, reduction, optset):
    gf.test_low_precision_within_bound(B, dtype, reduction, optset)


def test_zero_is_the_exact_path_bit_for_bit():
    gf.test_zero_is_the_exact_path_bit_for_bit(B, torch.bfloat16, 0.0)


def test_grad_lse_and_sum():
    gf.test_grad_lse_and_sum(B)


def test_tied_gradient():
    gf.test_tied_gradient(B)


def test_vocab_parallel_shard_matches_the_rule():
    """The vocabulary-parallel loss's recompute backward on the Triton ops."""
    from tiedkernels import distributed as tkd

    h, labels, w, _, _ = gf.make_case(torch.float64, {"ignore": True})
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    tkd.vocab_parallel_linear_cross_entropy(hh, ww, labels, chunk_size=gf.CHUNK, grad_filter=gf.THRESH,
                                            backend=B).backward()
    dz, s, h64, w64 = gf.reference_dz(h, labels, w, None, None, {}, "mean", 1.0)
    dh_e, dw_e, kept = gf.expected_filtered(dz, s, h64, w64, gf.THRESH)
    assert max(kept) < gf.V
    torch.testing.assert_close(hh.grad.reshape(-1, gf.D), dh_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ww.grad, dw_e, atol=1e-12, rtol=1e-10)


def test_traced_fallback_zeroes_the_skipped_columns(monkeypatch):
    """What a GPU's torch.compile trace runs (no data-dependent shape, no host sync): the same rule,
    the skipped columns of dz zeroed and dense GEMMs (fp64: the gathered path's values)."""
    from tiedkernels.triton import cross_entropy as tce

    h, labels, w, _, _ = gf.make_case(torch.float64, {"ignore": True})
    h2, lab = h.reshape(-1, gf.D), labels.reshape(-1)
    args = (h2, w, None, lab, -100, 0.0, 0.0, 0.0, 1.0, 0, 0, gf.CHUNK, None, gf.THRESH)
    gs = torch.tensor(1.0 / float((lab != -100).sum()), dtype=torch.float64)
    gathered = tce._Args(*args).run("fwd", gs, None, True, True, False)
    exact = tce._Args(*args[:-1]).run("fwd", gs, None, True, True, False)

    def no_gather(*a, **k):
        raise AssertionError("the traced path must not gather (data-dependent shapes)")

    monkeypatch.setattr(tce, "_traced", lambda t: True)
    monkeypatch.setattr(tce, "filtered_gemms", no_gather)
    traced = tce._Args(*args).run("fwd", gs, None, True, True, False)
    for i in (2, 3):
        torch.testing.assert_close(traced[i], gathered[i], atol=1e-12, rtol=1e-10)
        assert not torch.equal(traced[i], exact[i])
