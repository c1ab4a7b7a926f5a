"""The fused loss's options beyond the basic ones, on every CPU backend, against fp64 PyTorch:
class weights, per-token statistics (return_stats), the lse's incoming gradient (lce_bwd's
grad_lse), masked (-inf) logits, and low-precision logsumexp with a bias or softcap.

Every comparison uses a random incoming gradient and the tolerance rules of tests/tolerances.py.
"""

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk
from tiedkernels import reference as R
from tiedkernels._torch_backend import _cpu_gemm_is_slow

from _cpu_backends import BACKENDS_CPU
from tolerances import assert_close

import test_ops as core  # noqa: E402  (the core's tables and helpers; tests/ is on sys.path)

F64 = torch.float64
DTYPES, DTYPE_IDS = core.DTYPES, core.DTYPE_IDS
N, D, V, CHUNK = core.N, core.D, core.V, core.CHUNK


def _class_weight(v, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(v, dtype=F64, generator=gen) * 1.5 + 0.25


# ------------------------------------------------------------------------------------------
# class weights

CW_OPTIONS = {
    "plain": dict(),
    "ignore_index": dict(ignore=0.3),
    "ignore_index_custom": dict(ignore=0.3, ignore_index=5),
    "label_smoothing": dict(ignore=0.2, label_smoothing=0.1),
    "z_loss": dict(ignore=0.2, z_loss=1e-2),
    "num_items": dict(ignore=0.3, num_items_in_batch=50),
    "everything": dict(shape=(3, 13), bias=True, ignore=0.3, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
                       logit_scale=0.7, shift=True, chunk_size=5),
}


def _cw_params():
    out = []
    for name, opts in CW_OPTIONS.items():
        for reduction in ("none", "sum", "mean"):
            if reduction == "none" and "num_items_in_batch" in opts:
                continue
            out.append(pytest.param(name, reduction, id=f"{name}-{reduction}"))
    return out


def _split(opts):
    opts = dict(opts)
    data = {k: opts.pop(k) for k in core._DATA_KEYS if k in opts}
    if "ignore_index" in opts:
        data["ignore_index"] = opts["ignore_index"]
    return data, opts


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,reduction", _cw_params())
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_class_weight(backend, case, reduction, dtype):
    data, opts = _split(CW_OPTIONS[case])
    chunk = opts.pop("chunk_size", CHUNK)
    h, w, b, labels = core.lce_inputs(**data)
    cw = _class_weight(V)
    ref_opts = dict(opts, reduction=reduction)
    cw_k = cw.to(torch.float32 if dtype != F64 else F64)

    def kernel(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, labels, bias=b_, class_weight=cw_k, chunk_size=chunk,
                                       backend=backend, **ref_opts)

    def ref(h_, w_, b_):
        return R.linear_cross_entropy(h_, w_, labels, bias=b_, class_weight=cw_k, **ref_opts)

    bases = None
    if dtype == torch.bfloat16 and reduction != "none":
        # the summed loss: the bf16 reference's per-token errors summed (see test_ops)
        tok_opts = {k: v for k, v in ref_opts.items() if k != "num_items_in_batch"}
        tok_opts["reduction"] = "none"
        hl, wl, bl = core._leaves([h, w, b], dtype)
        lp = R.linear_cross_entropy(hl, wl, labels, bias=bl, class_weight=cw_k, **tok_opts)
        hi = R.linear_cross_entropy(hl.double(), wl.double(), labels, bias=None if bl is None else bl.double(),
                                    class_weight=cw_k, **tok_opts)
        total = float((lp.detach().double() - hi.detach()).abs().sum())
        bases = {"loss": (total, total)}  # the denominators are >= 1 here (weights >= 0.25, ~20 tokens)
    core._compare(kernel, ref, [h, w, b], dtype, ["loss", "dh", "dW", "db"], f"{backend}/{case}/{reduction}",
                  bases)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_class_weight_is_pytorchs(backend, reduction, label_smoothing):
    """Against PyTorch itself: fp64 F.cross_entropy(F.linear(h, W), y, weight=c, label_smoothing=eps),
    ignore_index included, loss and every gradient."""
    h, w, _, labels = core.lce_inputs(ignore=0.3, ignore_index=7)
    cw = _class_weight(V)
    g = core._incoming(torch.zeros(() if reduction != "none" else (N,), dtype=F64))
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=7)
    ours = tk.linear_cross_entropy(h, w, labels, class_weight=cw, chunk_size=CHUNK, backend=backend, **opts)
    dh, dw = torch.autograd.grad(ours, [h, w], g)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    theirs = F.cross_entropy(F.linear(h2, w2), labels, weight=cw, **opts)
    rh, rw = torch.autograd.grad(theirs, [h2, w2], g)
    for name, a, r in (("loss", ours, theirs), ("dh", dh, rh), ("dW", dw, rw)):
        assert_close(a, r, dtype=F64, name=f"{backend}/{reduction}/eps={label_smoothing}: {name}")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_class_weight_mean_edges(backend):
    """Every token ignored: 0 (as without weights); non-ignored targets whose weights sum to 0:
    PyTorch's 0/0 = NaN."""
    h, w, _, labels = core.lce_inputs()
    cw = _class_weight(V)
    none = torch.full_like(labels, -100)
    loss = tk.linear_cross_entropy(h, w, none, class_weight=cw, backend=backend)
    assert loss.item() == 0.0
    zero_cw = cw.clone()
    zero_cw[labels] = 0.0
    loss = tk.linear_cross_entropy(h.detach(), w.detach(), labels, class_weight=zero_cw, backend=backend)
    ref = F.cross_entropy(F.linear(h.detach(), w.detach()), labels, weight=zero_cw)
    assert torch.isnan(ref) and torch.isnan(loss)


# ------------------------------------------------------------------------------------------
# per-token statistics (return_stats)

STATS_OPTIONS = {
    "plain": dict(),
    "everything": dict(shape=(3, 13), bias=True, ignore=0.3, label_smoothing=0.1, z_loss=1e-2, softcap=4.0,
                       logit_scale=0.7, shift=True),
    "class_weight": dict(ignore=0.3, z_loss=1e-2, class_weight=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", list(STATS_OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_return_stats(backend, case, reduction, dtype):
    data, opts = _split(STATS_OPTIONS[case])
    h, w, b, labels = core.lce_inputs(**data)
    if opts.pop("class_weight", False):
        opts["class_weight"] = _class_weight(V).to(torch.float32 if dtype != F64 else F64)
    opts["reduction"] = reduction
    hl, wl, bl = core._leaves([h, w, b], dtype)
    st = tk.linear_cross_entropy(hl, wl, labels, bias=bl, return_stats=True, chunk_size=CHUNK, backend=backend,
                                 **opts)
    assert isinstance(st, tk.functional.LossStats)
    # loss: identical to the call without return_stats (same pass, same arithmetic)
    plain = tk.linear_cross_entropy(hl, wl, labels, bias=bl, chunk_size=CHUNK, backend=backend, **opts)
    assert torch.equal(st.loss.detach(), plain.detach())
    (g,) = torch.autograd.grad(st.loss, [hl], core._incoming(st.loss))
    (g0,) = torch.autograd.grad(plain, [hl], core._incoming(plain))
    assert torch.equal(g, g0), "return_stats changed the gradient"
    ref_loss, ref = R.linear_cross_entropy(*(x.double() if x is not None else None for x in (hl, wl)), labels,
                                           bias=None if bl is None else bl.double(), return_stats=True, **opts)
    ref_lp = None
    if dtype == torch.bfloat16:
        _, ref_lp = R.linear_cross_entropy(hl.detach(), wl.detach(), labels,
                                           bias=None if bl is None else bl.detach(), return_stats=True, **opts)
    eff = labels[..., 1:] if opts.get("shift") else labels
    assert st.predictions.dtype == torch.int64 and st.predictions.shape == eff.shape
    assert st.lse.shape == eff.shape and st.entropy.shape == eff.shape and st.accuracy.shape == ()
    sdt = F64 if dtype == F64 else torch.float32
    assert st.entropy.dtype == sdt and st.lse.dtype == sdt and st.accuracy.dtype == sdt
    for name in ("lse", "entropy", "z_loss"):
        assert_close(getattr(st, name), ref[name], None if ref_lp is None else ref_lp[name], dtype=dtype,
                     name=f"{backend}/{case}/{reduction}: {name}")
    # predictions: an argmax of the logits the kernel saw (ties between nearly equal logits may
    # fall either way in low precision); exactly the reference's in fp64
    z64 = R.logits(hl, wl, bias=bl, logit_scale=opts.get("logit_scale", 1.0), softcap=opts.get("softcap"),
                   upcast=True)
    if opts.get("shift"):
        z64 = z64[..., :-1, :]
    if dtype == F64:
        assert torch.equal(st.predictions, ref["predictions"])
    else:
        picked = z64.gather(-1, st.predictions.unsqueeze(-1)).squeeze(-1)
        slack = 1e-5 if dtype == torch.float32 else 0.1
        assert torch.all(picked >= z64.max(-1).values - slack), "a prediction is not an argmax"
    keep = eff != -100
    expect_acc = ((st.predictions == eff) & keep).sum().double() / keep.sum().clamp(min=1)
    assert abs(float(st.accuracy) - float(expect_acc)) < 1e-6
    assert not st.entropy.requires_grad and not st.lse.requires_grad and not st.z_loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_return_stats_ties_and_masks(backend):
    """argmax takes the first index on ties (as torch.argmax); a -inf logit adds nothing to the
    entropy; a token whose best logit is its label counts as correct; an ignored one never counts."""
    w = torch.zeros(9, 4, dtype=F64)
    w[2] = w[6] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a tie between 2 and 6
    w[4] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    b = torch.zeros(9, dtype=F64)
    b[8] = float("-inf")
    h = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 1.0, 0]], dtype=F64)
    labels = torch.tensor([2, 4, -100])
    st = tk.linear_cross_entropy(h, w, labels, bias=b, return_stats=True, reduction="none", backend=backend)
    z = F.linear(h, w, b)
    assert st.predictions.tolist() == [2, 4, 0] == z.argmax(-1).tolist()
    assert float(st.accuracy) == 1.0
    p = torch.softmax(z, -1)
    ent = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    assert_close(st.entropy, ent, dtype=F64, name="entropy with a -inf logit")


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_options_large_vocab(backend):
    """V > 65,536: class weights and statistics with targets beyond 16 bits."""
    v = core.BIG_V
    h, w, b, labels = core.lce_inputs(shape=(9,), v=v, d=8, bias=True, ignore=0.2)
    labels[1], labels[2] = v - 1, 65_536
    cw = _class_weight(v).float()
    w.data[v - 3] = w.data[1] * 0 + 3.0  # a clear argmax far out
    opts = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, class_weight=cw)

    def kernel(h_, w_, b_):
        return tk.linear_cross_entropy(h_, w_, labels, bias=b_, chunk_size=4, backend=backend, **opts)

    def ref(h_, w_, b_):
        return R.linear_cross_entropy(h_, w_, labels, bias=b_, **opts)

    core._compare(kernel, ref, [h, w, b], torch.float32, ["loss", "dh", "dW", "db"], f"{backend}/V={v}")
    hf, wf, bf = (x.detach().float() for x in (h, w, b))
    st = tk.linear_cross_entropy(hf, wf, labels, bias=bf, return_stats=True, chunk_size=4, backend=backend, **opts)
    _, r = R.linear_cross_entropy(hf.double(), wf.double(), labels, bias=bf.double(), return_stats=True, **opts)
    assert torch.equal(st.predictions, r["predictions"])
    assert_close(st.entropy, r["entropy"], dtype=torch.float32, name="entropy")


# ------------------------------------------------------------------------------------------
# lce_bwd's grad_lse: the incoming gradient of the returned lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("class_weight", [False, True], ids=["plain", "class_weight"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_lce_bwd_grad_lse(backend, class_weight, dtype):
    """dh, dW, db of sum(g * loss) + sum(g_lse * lse), every option on, ignored tokens included
    (their lse still has a gradient), against fp64 autograd of the reference."""
    h, w, b, labels = core.lce_inputs(bias=True, ignore=0.3)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, logit_scale=0.7)
    cw = _class_weight(V) if class_weight else None
    gen = torch.Generator().manual_seed(5)
    g = torch.rand(N, dtype=F64, generator=gen) * 2 - 1
    gl = torch.rand(N, dtype=F64, generator=gen) * 2 - 1
    hl, wl, bl = core._leaves([h, w, b], dtype)
    sdt = F64 if dtype == F64 else torch.float32

    def ref_grads(h_, w_, b_):
        tok, lse = R.linear_cross_entropy(h_, w_, labels, bias=b_, reduction="none", return_lse=True,
                                          class_weight=cw, **opts)
        total = (tok * g.to(tok.dtype)).sum() + (lse * gl.to(lse.dtype)).sum()
        return (lse.detach(),) + torch.autograd.grad(total, [h_, w_, b_])

    lse64, *r64 = ref_grads(*core._leaves([hl, wl, bl], F64))
    rlp = ref_grads(*core._leaves([hl, wl, bl], dtype))[1:] if dtype == torch.bfloat16 else [None] * 3
    lse_k = tk.linear_cross_entropy(hl.detach(), wl.detach(), labels, bias=bl.detach(), reduction="none",
                                    return_lse=True, backend=backend, **opts)[1]
    dh, dw, db = core._op(backend, "lce_bwd")(g.to(sdt), hl.detach(), wl.detach(), bl.detach(), labels, lse_k,
                                              -100, 0.1, 1e-2, 4.0, 0.7, 0, 0, CHUNK, True, True, True,
                                              None if cw is None else cw.to(sdt), gl.to(sdt))
    for name, a, r, rl in zip(("dh", "dW", "db"), (dh, dw, db), r64, rlp):
        assert_close(a, r, rl, dtype=dtype, name=f"{backend}/grad_lse: {name}")


# ------------------------------------------------------------------------------------------
# masked logits: a -inf bias entry, an inf row of W, a -inf target, a row of -inf


def _masked_case(kind):
    h, w, b, labels = core.lce_inputs(shape=(11,), v=17, d=6, bias=True, ignore=0.2)
    h, w, b = (x.detach() for x in (h, w, b))
    labels[labels == 9] = 3
    if kind == "bias":
        b[9] = float("-inf")  # a masked entry no label points at
    elif kind in ("weight_row_neg", "weight_row_pos"):
        h = h.abs()  # positive hidden states: every logit of row 9 is -inf (masked) or +inf
        w[9] = float("-inf") if kind == "weight_row_neg" else float("inf")
    elif kind == "target":
        b[9] = float("-inf")
        labels[1] = 9  # PyTorch: an infinite loss for this token
    elif kind == "row":
        b[:] = float("-inf")  # every logit -inf: PyTorch's NaN
    return h, w, b, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["bias", "weight_row_neg", "weight_row_pos", "target", "row"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_masked_logits_are_pytorchs(backend, kind, reduction, label_smoothing, dtype):
    h, w, b, labels = _masked_case(kind)
    h, w, b = (x.to(dtype).requires_grad_() for x in (h, w, b))
    opts = dict(reduction=reduction, label_smoothing=label_smoothing)
    ours = tk.linear_cross_entropy(h, w, labels, bias=b, chunk_size=4, backend=backend, **opts)
    g = core._incoming(ours.detach().double()).to(ours.dtype)
    mine = torch.autograd.grad(ours, [h, w, b], g)
    h2, w2, b2 = (x.detach().double().requires_grad_() for x in (h, w, b))
    theirs = F.cross_entropy(F.linear(h2, w2, b2), labels, **opts)
    ref = torch.autograd.grad(theirs, [h2, w2, b2], g.double())
    if kind == "bias" and label_smoothing == 0:  # (smoothing averages log p over every entry: inf, as PyTorch)
        assert torch.isfinite(ours).all(), "a masked vocabulary entry must leave the loss finite"
    for name, a, r in zip(("loss", "dh", "dW", "db"), (ours,) + mine, (theirs,) + ref):
        assert_close(a, r, dtype=dtype, name=f"{backend}/{kind}/{reduction}/eps={label_smoothing}: {name}")


# ------------------------------------------------------------------------------------------
# low-precision logsumexp: Cut Cross-Entropy's rule


def _cce_inputs(n, v, d, dtype, has_bias, seed=0):
    """CCE's test_lse data: e ~ N(0, 1/d), c ~ N(0, 1), half the rows of c copied from e (large
    logits), bias ~ 0.02 N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(n, d, generator=gen) / d**0.5).to(dtype)
    c = torch.randn(v, d, generator=gen).to(dtype)
    c[: min(n, v) // 2] = e[: min(n, v) // 2]
    bias = (torch.randn(v, generator=gen) * 0.02).to(dtype) if has_bias else None
    return e, c, bias


def _gemm_in_dtype(a, b):
    """a @ b in a's dtype, fp32 sums rounded once: PyTorch's own GEMM where it runs on the CPU's
    bf16/fp16 instructions. On a CPU without them ATen's GEMM is a scalar fallback whose order of
    summation no fast kernel follows (a logit rounded the other way moves the lse by its
    probability times a bf16 ulp of the logit, far above the rule's 1e-5 slack),
    so there the baseline is the value that GEMM stands for: the fp32 GEMM of the upcast operands,
    rounded once, as the cpu and torch backends compute it there (tests/test_cpu_gemm.py)."""
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16) and _cpu_gemm_is_slow(a.dtype):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


@pytest.mark.parametrize("logit_scale", [1.0, 0.7], ids=["noscale", "scale"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "cap20"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_low_precision_lse_cce_rule(backend, dtype, has_bias, softcap, logit_scale):
    """Per row, |exact - tk| <= |exact - PyTorch in the same dtype| + 1e-5, where exact is fp64 and
    PyTorch in the same dtype is CCE's reference (its test_lse): e @ c.T in the dtype, + bias and the
    softcap in the dtype (the scale likewise), then a fp32 logsumexp."""
    for n, v, d in ((255, 507, 128), (255, 507, 123)):
        e, c, bias = _cce_inputs(n, v, d, dtype, has_bias)
        z64 = e.double() @ c.double().T
        zlp = _gemm_in_dtype(e, c.T)
        if bias is not None:
            z64 = z64 + bias.double()
            zlp = zlp + bias
        if logit_scale != 1.0:
            z64 = z64 * logit_scale
            zlp = zlp * logit_scale
        if softcap is not None:
            z64 = torch.tanh(z64 / softcap) * softcap
            zlp = torch.tanh(zlp / softcap) * softcap
        exact = torch.logsumexp(z64, -1)
        same = torch.logsumexp(zlp.float(), -1).double()
        labels = torch.zeros(n, dtype=torch.long)
        _, lse = tk.linear_cross_entropy(e, c, labels, bias=bias, softcap=softcap, logit_scale=logit_scale,
                                         reduction="none", return_lse=True, chunk_size=64, backend=backend)
        ours = (exact - lse.double()).abs()
        bound = (exact - same).abs() + 1e-5
        bad = ours > bound
        assert not bad.any(), (f"{backend} {dtype} bias={has_bias} softcap={softcap} shape={(n, v, d)}: "
                               f"{int(bad.sum())} rows over the bound, worst excess {float((ours - bound).max()):.3g}")
