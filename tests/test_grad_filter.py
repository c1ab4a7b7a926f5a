"""Gradient filtering (``grad_filter=``): the kept columns, the stated bound, exact loss, every path.

Cases are built with peaked softmaxes (hidden states aligned with their label's row of W), as a
trained model has: most columns of a chunk's ``dz`` are then tiny and get filtered.

* fp64: the backend's filtered gradients equal, to fp64 rounding, the ones computed here from the
  fp64 reference ``dz`` with the documented rule (per chunk, columns with ``|dz_ij| <= t·s_i`` in
  every row left out of the two GEMMs): the rule itself is checked, not only the bound.
* fp32 and bf16: the filtered gradients differ from the same backend's exact ones by at most the
  stated bound (computed from the reference ``dz``: every column the rule may skip counts, with a
  margin for the rounding of ``dz`` in the input dtype) plus the GEMMs' own rounding.
* The loss (and lse) are bit-identical with and without the filter; ``grad_filter`` 0 / None give
  the exact path bit for bit.

``backend`` fixtures: the ``cpu`` (the C++ driver, shared with ``cuda``) and ``torch`` backends;
``tests/test_grad_filter_triton.py`` runs the same checks on the Triton backend (interpreter).
"""

import math

import pytest
import torch

import tiedkernels as tk
from tiedkernels import functional as tkf
from tiedkernels import distributed as tkd
from tiedkernels import reference as ref

from _cpu_backends import BACKENDS_CPU

N_SEQ, T, D, V = 3, 33, 24, 123  # 99 tokens, odd V
CHUNK = 32
THRESH = 2e-3

OPTION_SETS = {
    "plain": {},
    "bias_ignore_cw": {"bias": True, "ignore": True, "class_weight": True},
    "cap_scale_shift": {"softcap": 12.0, "logit_scale": 0.8, "shift": True, "ignore": True},
    "smooth_zloss": {"label_smoothing": 0.05, "z_loss": 1e-3, "bias": True},
}


def make_case(dtype, opts, seed=0, peak=16.0):
    """hidden [N_SEQ, T, D] aligned with the label's row of W (a peaked softmax), labels, weight, bias,
    class weights, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    labels = torch.randint(0, V, (N_SEQ, T), generator=g)
    target = labels.roll(-1, dims=1) if opts.get("shift") else labels  # the token each position scores
    h = peak * w[target] + 0.3 * torch.randn(N_SEQ, T, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    if opts.get("ignore"):
        labels[0, 3:9] = -100
        labels[2, -4:] = -100
    bias = 0.5 * torch.randn(V, generator=g, dtype=torch.float64) if opts.get("bias") else None
    cw = 0.5 + torch.rand(V, generator=g, dtype=torch.float64) if opts.get("class_weight") else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(h), labels, cast(w), cast(bias), (cw.to(dtype) if cw is not None else None)


def kernel_kwargs(opts):
    return {k: opts[k] for k in ("softcap", "logit_scale", "shift", "label_smoothing", "z_loss") if k in opts}


def run(backend, h, labels, w, bias, cw, opts, reduction, gin, grad_filter, return_lse=False):
    """(loss, lse, dh, dW, db) of one call and its backward with incoming gradient ``gin``."""
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = bias.clone().requires_grad_() if bias is not None else None
    out = tk.linear_cross_entropy(hh, ww, labels, bias=bb, reduction=reduction, class_weight=cw, chunk_size=CHUNK,
                                  backend=backend, grad_filter=grad_filter, return_lse=True, **kernel_kwargs(opts))
    loss, lse = out
    loss.backward(gin)
    return (loss.detach(), lse.detach(), hh.grad, ww.grad, bb.grad if bb is not None else None)


def reference_dz(h, labels, w, bias, cw, opts, reduction, gin):
    """fp64: dz = dL/d(raw logits h Wᵀ + b) [N, V] for the incoming gradient ``gin``, the row scales
    s_i (|incoming gradient of token i's loss|, 0 at ignored tokens), the flat hidden [N, D] and weight."""
    h64, w64 = h.double().reshape(-1, D), w.double()
    lab = tkf.shift_labels(labels, -100) if opts.get("shift") else labels
    lab = lab.reshape(-1)
    z = h64 @ w64.t()
    if bias is not None:
        z = z + bias.double()
    z.requires_grad_()
    eye = torch.eye(V, dtype=torch.float64)
    tok = ref.linear_cross_entropy(z, eye, lab, reduction="none", class_weight=cw.double() if cw is not None else None,
                                   **{k: v for k, v in kernel_kwargs(opts).items() if k != "shift"})
    keep = lab != -100
    if reduction == "mean":
        if cw is not None:
            denom = cw.double()[torch.where(keep, lab, 0)][keep].sum()
        else:
            denom = keep.sum().double()
        g = torch.full((lab.numel(),), float(gin) / float(denom), dtype=torch.float64)
    else:
        gfull = torch.zeros(labels.shape, dtype=torch.float64)
        if opts.get("shift"):
            gfull[..., :-1] = gin.double()
        else:
            gfull[...] = gin.double()
        g = gfull.reshape(-1)
    (dz,) = torch.autograd.grad((tok * g).sum(), z)
    s = torch.where(keep, g.abs(), torch.zeros_like(g))
    return dz, s, h64, w64


def expected_filtered(dz, s, h64, w64, t):
    """The documented rule in fp64: per chunk, columns with |dz_ij| <= t·s_i in every row dropped."""
    dh = torch.empty_like(h64)
    dw = torch.zeros_like(w64)
    kept = []
    for c0 in range(0, dz.shape[0], CHUNK):
        zc, hc = dz[c0:c0 + CHUNK], h64[c0:c0 + CHUNK]
        keep = (zc.abs() > t * s[c0:c0 + CHUNK, None]).any(0)
        kept.append(int(keep.sum()))
        dh[c0:c0 + CHUNK] = zc[:, keep] @ w64[keep]
        dw[keep] += zc[:, keep].t() @ hc
    return dh, dw, kept


def bound(dz, s, h64, w64, t, margin):
    """The stated bound, with every column that the rule may skip (|dz_ij| <= margin·t·s_i in every
    row; margin covers the rounding of dz in the input dtype): per element,
    |Δdh_i| <= margin·t·s_i·Σ_{skipped j}|W_j| and |ΔdW_j| <= margin·t·Σ_{i in chunks skipping j} s_i|h_i|."""
    bdh = torch.zeros_like(h64)
    bdw = torch.zeros_like(w64)
    for c0 in range(0, dz.shape[0], CHUNK):
        zc, sc, hc = dz[c0:c0 + CHUNK], s[c0:c0 + CHUNK], h64[c0:c0 + CHUNK]
        skip = (zc.abs() <= margin * t * sc[:, None]).all(0)
        bdh[c0:c0 + CHUNK] = margin * t * sc[:, None] * w64[skip].abs().sum(0)[None, :]
        bdw[skip] += margin * t * (sc[:, None] * hc.abs()).sum(0)[None, :]
    return bdh, bdw


def incoming(reduction, labels, opts, seed=1):
    if reduction == "mean":
        return torch.tensor(1.7)  # a scalar incoming gradient other than 1: the forward's gradients get scaled
    g = torch.Generator().manual_seed(seed)
    shape = (N_SEQ, T - 1) if opts.get("shift") else (N_SEQ, T)
    return torch.rand(shape, generator=g) + 0.5


def reshape_dh(dh):
    return dh.reshape(-1, D).double()


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradient-in-forward, recompute
@pytest.mark.parametrize("optset", list(OPTION_SETS))
def test_fp64_follows_the_rule(backend, reduction, optset):
    opts = OPTION_SETS[optset]
    h, labels, w, bias, cw = make_case(torch.float64, opts)
    gin = incoming(reduction, labels, opts)
    exact = run(backend, h, labels, w, bias, cw, opts, reduction, gin, None)
    filt = run(backend, h, labels, w, bias, cw, opts, reduction, gin, THRESH)
    assert torch.equal(filt[0], exact[0]) and torch.equal(filt[1], exact[1])  # loss and lse bit-identical
    dz, s, h64, w64 = reference_dz(h, labels, w, bias, cw, opts, reduction, gin)
    dh_e, dw_e, kept = expected_filtered(dz, s, h64, w64, THRESH)
    assert 0 < max(kept) < V, kept  # the case filters (an all-ignored chunk keeps nothing)
    torch.testing.assert_close(reshape_dh(filt[2]), dh_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(filt[3], dw_e, atol=1e-12, rtol=1e-10)
    if bias is not None:
        torch.testing.assert_close(filt[4], dz.sum(0), atol=1e-12, rtol=1e-10)  # db exact
        torch.testing.assert_close(filt[4], exact[4], atol=1e-13, rtol=1e-12)
    # the filter changed the gradients (else this test proves nothing), within the stated bound
    ddh = (reshape_dh(filt[2]) - reshape_dh(exact[2])).abs()
    ddw = (filt[3] - exact[3]).abs()
    assert ddh.max() > 1e-9 and ddw.max() > 1e-9
    bdh, bdw = bound(dz, s, h64, w64, THRESH, 1.0 + 1e-9)
    assert (ddh <= bdh + 1e-12).all()
    assert (ddw <= bdw + 1e-12).all()


# rounding of dz in the input dtype moves which columns the backend skips: a margin on t
MARGIN = {torch.float32: 1.01, torch.bfloat16: 1.6}


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("optset", list(OPTION_SETS))
def test_low_precision_within_bound(backend, dtype, reduction, optset):
    opts = OPTION_SETS[optset]
    h, labels, w, bias, cw = make_case(dtype, opts)
    gin = incoming(reduction, labels, opts)
    exact = run(backend, h, labels, w, bias, cw, opts, reduction, gin, None)
    filt = run(backend, h, labels, w, bias, cw, opts, reduction, gin, THRESH)
    assert torch.equal(filt[0], exact[0]) and torch.equal(filt[1], exact[1])
    if bias is not None:
        assert torch.equal(filt[4], exact[4])  # db exact, from the same dz
    dz, s, h64, w64 = reference_dz(h, labels, w, bias, cw, opts, reduction, gin)
    _, _, kept = expected_filtered(dz, s, h64, w64, THRESH)
    assert max(kept) < V, kept
    bdh, bdw = bound(dz, s, h64, w64, THRESH, MARGIN[dtype])
    eps = torch.finfo(dtype).eps
    # the GEMMs' own rounding (a different column set sums in another order; bf16 outputs rounded)
    rdh = 2 * eps * (dz.abs() @ w64.abs())
    rdw = 2 * eps * (dz.abs().t() @ h64.abs())
    ddh = (reshape_dh(filt[2]) - reshape_dh(exact[2])).abs()
    ddw = (filt[3].double() - exact[3].double()).abs()
    assert (ddh <= bdh + rdh).all(), (ddh - bdh - rdh).max()
    assert (ddw <= bdw + rdw).all(), (ddw - bdw - rdw).max()


@pytest.mark.parametrize("backend", BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_zero_is_the_exact_path_bit_for_bit(backend, dtype, off):
    opts = OPTION_SETS["bias_ignore_cw"]
    h, labels, w, bias, cw = make_case(dtype, opts)
    for reduction in ("mean", "none"):
        gin = incoming(reduction, labels, opts)
        a = run(backend, h, labels, w, bias, cw, opts, reduction, gin, off)
        hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
        loss, lse = tk.linear_cross_entropy(hh, ww, labels, bias=bb, reduction=reduction, class_weight=cw,
                                            chunk_size=CHUNK, backend=backend, return_lse=True)
        loss.backward(gin)
        for x, y in zip(a, (loss, lse, hh.grad, ww.grad, bb.grad)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_auto_threshold_and_one_chunk(backend):
    """'auto' is eps(dtype)/32; one chunk (the bf16 direct-dW path of the cpu backend) filters too."""
    assert tkf.grad_filter_value("auto", torch.bfloat16) == 2.0 ** -12
    assert tkf.grad_filter_value("auto", torch.float32) == 2.0 ** -28
    h, labels, w, bias, _ = make_case(torch.bfloat16, {}, peak=30.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    tk.linear_cross_entropy(hh, ww, labels, backend=backend, grad_filter="auto").backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    tk.linear_cross_entropy(he, we, labels, backend=backend, grad_filter=2.0 ** -12, chunk_size=10 ** 6).backward()
    assert torch.equal(hh.grad, he.grad) and torch.equal(ww.grad, we.grad)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_grad_lse_and_sum(backend):
    """A z-loss built from the returned lse (its gradient adds |dL/dlse| to the row scale) and
    reduction='sum', fp64 against the rule."""
    h, labels, w, _, _ = make_case(torch.float64, {"ignore": True})
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, lse = tk.linear_cross_entropy(hh, ww, labels, reduction="sum", chunk_size=CHUNK, backend=backend,
                                        grad_filter=THRESH, return_lse=True)
    (loss + 1e-2 * (lse ** 2).sum()).backward()
    # reference: dz of loss + 1e-2 Σ lse² w.r.t. raw logits, s_i = [not ignored] + |2e-2·lse_i|
    h64, w64 = h.reshape(-1, D), w
    lab = labels.reshape(-1)
    z = (h64 @ w64.t()).requires_grad_()
    tok, lse_r = ref.linear_cross_entropy(z, torch.eye(V, dtype=torch.float64), lab, reduction="none",
                                          return_lse=True)
    (dz,) = torch.autograd.grad(tok.sum() + 1e-2 * (lse_r ** 2).sum(), z)
    s = (lab != -100).double() + (2e-2 * lse_r.detach()).abs()
    dh_e, dw_e, kept = expected_filtered(dz, s, h64, w64, THRESH)
    assert max(kept) < V
    torch.testing.assert_close(hh.grad.reshape(-1, D), dh_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ww.grad, dw_e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_tied_gradient(backend):
    """Embedding and head share W: W.grad = the filtered head gradient + the embedding's scatter of
    the filtered dh (fp64, against the rule)."""
    torch.manual_seed(0)
    head = tk.TiedEmbeddingHead(V, D, backend=backend, dtype=torch.float64)
    with torch.no_grad():
        head.weight.mul_(1.0 / math.sqrt(D))
    ids = torch.randint(0, V, (N_SEQ, T))
    labels = ids.clone()
    labels[1, :5] = -100
    hidden = 16.0 * head(ids)  # aligned with the label's row: peaked
    head.loss(hidden, labels, chunk_size=CHUNK, grad_filter=THRESH).backward()
    w64 = head.weight.detach()
    h64 = 16.0 * w64[ids.reshape(-1)]
    lab = labels.reshape(-1)
    z = (h64 @ w64.t()).requires_grad_()
    tok = ref.linear_cross_entropy(z, torch.eye(V, dtype=torch.float64), lab, reduction="none")
    keep = lab != -100
    (dz,) = torch.autograd.grad(tok.sum() / keep.sum(), z)
    s = keep.double() / keep.sum()
    dh_e, dw_e, kept = expected_filtered(dz, s, h64, w64, THRESH)
    assert max(kept) < V
    expect = dw_e.index_add(0, ids.reshape(-1), 16.0 * dh_e)
    torch.testing.assert_close(head.weight.grad, expect, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_compile_fullgraph(backend):
    """The ops are opaque to torch.compile (their data-dependent column counts stay inside the op:
    no graph break, fullgraph=True); compiled equals eager."""
    h, labels, w, bias, _ = make_case(torch.float32, {"bias": True})

    def step(hh, ww, bb):
        return tk.linear_cross_entropy(hh, ww, labels, bias=bb, chunk_size=CHUNK, backend=backend,
                                       grad_filter=THRESH, shift=True)

    res = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        torch._dynamo.reset()
        hh, ww, bb = h.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = fn(hh, ww, bb)
        loss.backward()
        res.append((loss.detach(), hh.grad, ww.grad, bb.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_differentiable_path_is_exact(backend):
    """create_graph=True (and torch.func) take the plain-op path, which ignores the filter: the
    exact first derivative (documented)."""
    h, labels, w, _, _ = make_case(torch.float64, {})
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.linear_cross_entropy(hh, ww, labels, reduction="none", chunk_size=CHUNK, backend=backend,
                                   grad_filter=0.5).sum()
    (gh,) = torch.autograd.grad(loss, hh, create_graph=True)
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    (ge,) = torch.autograd.grad(tk.linear_cross_entropy(he, we, labels, reduction="none", chunk_size=CHUNK,
                                                        backend=backend).sum(), he)
    torch.testing.assert_close(gh, ge, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), "fast", torch.tensor(1e-3), True, [1e-3]])
def test_invalid_values_raise(bad):
    h, labels, w, _, _ = make_case(torch.float32, {})
    with pytest.raises(tk.TiedKernelsError, match="grad_filter"):
        tk.linear_cross_entropy(h.requires_grad_(), w, labels, grad_filter=bad)
    with pytest.raises(tk.TiedKernelsError, match="grad_filter"):
        tkd.vocab_parallel_linear_cross_entropy(h, w, labels, grad_filter=bad)


def test_vocab_parallel_single_process_matches_the_rule():
    """The vocabulary-parallel loss (one rank, a shard of the vocabulary: vocab_start/vocab_size)
    honours the filter in its recompute backward."""
    h, labels, w, _, _ = make_case(torch.float64, {"ignore": True})
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    tkd.vocab_parallel_linear_cross_entropy(hh, ww, labels, chunk_size=CHUNK, grad_filter=THRESH).backward()
    he, we = h.clone().requires_grad_(), w.clone().requires_grad_()
    tkd.vocab_parallel_linear_cross_entropy(he, we, labels, chunk_size=CHUNK).backward()
    dz, s, h64, w64 = reference_dz(h, labels, w, None, None, {}, "mean", 1.0)
    dh_e, dw_e, kept = expected_filtered(dz, s, h64, w64, THRESH)
    assert max(kept) < V
    torch.testing.assert_close(hh.grad.reshape(-1, D), dh_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ww.grad, dw_e, atol=1e-12, rtol=1e-10)
    assert not torch.equal(hh.grad, he.grad)


def test_hf_patch_reaches_the_fused_loss():
    """patch(model, grad_filter=...) changes a training step's weight gradient (the filter reached the
    fused loss), not its loss; eval mode stays the stock forward; a bad value raises at patch."""
    pytest.importorskip("transformers")
    import _hf_testing as H

    from tiedkernels import hf

    def step(grad_filter):
        model = H.build("gpt2")
        kw = {} if grad_filter is None else {"grad_filter": grad_filter}
        hf.patch(model, backend=BACKENDS_CPU[0], **kw)
        b = H.batch("gpt2", model)
        model.train()
        out = model(**b)
        out.loss.backward()
        w = model.get_input_embeddings().weight
        model.eval()
        with torch.no_grad():
            logits = model(**b).logits
        return out.loss.detach(), w.grad.clone(), logits, model

    loss0, g0, lg0, _ = step(None)
    loss1, g1, lg1, model = step(0.5)  # a large threshold: most columns of every chunk dropped
    assert torch.equal(loss0, loss1)
    assert torch.equal(lg0, lg1)
    assert not torch.allclose(g0, g1, atol=1e-8, rtol=0)
    assert model.get_input_embeddings().__dict__.get("grad_filter") is None  # set for the step only
    with pytest.raises(tk.TiedKernelsError, match="grad_filter"):
        hf.patch(model, grad_filter=-1.0)
