"""The gradient filter (``grad_filter=``) on the token-level objectives and the distillation.

The rule is ``linear_cross_entropy``'s: per row chunk, a vocabulary column ``j`` is left out of the ``dh``
and ``dW`` GEMMs when ``|dz_ij| <= t·s_i`` in every row, with the row scale

* ``token_log_probs``: ``s_i = |∂L/∂logp_i| + |∂L/∂H_i| + |∂L/∂lse_i|`` (the incoming gradients of its
  three outputs; the log-prob's is 0 at an ignored token);
* ``linear_token_objective`` and ``grpo_loss``: the same, of the objective's loss (weights and
  denominator included);
* ``linear_distillation_loss``: ``s_i = |w_i| ((1 - alpha)/T + alpha)``, ``w_i`` the token's weight in
  the loss (the reduction's ``1/denominator`` times the incoming gradient, 0 at an ignored token).

fp64: the filtered gradients equal those computed here from the fp64 reference ``dz`` (autograd on full
logits) with that rule, and the reference's own kept counts show columns were dropped. fp32/bf16: the
change against the exact path stays within the README's bound. Everything else (losses, statistics,
metrics, ``db``) is bit-identical to the exact path, and 0/None is the exact path bit for bit. Cases
have peaked softmaxes (hidden states aligned with their label's row of W), as a trained model has.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tiedkernels as tk
from tiedkernels import _token_pass
from tiedkernels.functional import TiedKernelsError
from _rl_reference import jsd, token_stats, trl_grpo_loss
from test_grad_filter import CHUNK, MARGIN, THRESH, V, bound as _bound, expected_filtered  # the rule, shared

F64 = torch.float64
N, D = 99, 24


def peaked(seed=0, dtype=F64, bias=True, n=N):
    """hidden [n, D] aligned with the label's row of W (a peaked softmax), weight, bias, labels with
    ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g, dtype=F64) / math.sqrt(D)
    y = torch.randint(0, V, (n,), generator=g)
    h = 16.0 * w[y] + 0.3 * torch.randn(n, D, generator=g, dtype=F64) / math.sqrt(D)
    b = 0.5 * torch.randn(V, generator=g, dtype=F64) if bias else None
    y[3:9] = -100
    y[-4:] = -100
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(h), cast(w), cast(b), y, g


def final(zraw, logit_scale=1.0, softcap=None, temperature=None):
    z = zraw * (logit_scale[:, None] if isinstance(logit_scale, torch.Tensor) else logit_scale)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature is not None:
        z = z / (temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature)
    return z


def raw_logits(h, w, b):
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    return z.detach().requires_grad_()


def reference(h, w, b, loss_of, keep):
    """fp64: (dz = dL/d(h Wᵀ + b), s) for ``loss_of(zraw) -> (L, lp, ent, lse)``, s_i the sum of the
    absolute gradients of L with respect to the per-token log-prob (0 where ignored), entropy and lse."""
    zraw = raw_logits(h, w, b)
    L, lp, ent, lse = loss_of(zraw)
    dz, glp, gent, glse = torch.autograd.grad(L, [zraw, lp, ent, lse], allow_unused=True)
    s = torch.zeros(zraw.shape[0], dtype=F64)
    for gx, mask in ((glp, keep), (gent, None), (glse, None)):
        if gx is not None:
            s = s + (gx.abs() * mask if mask is not None else gx.abs())
    return dz, s


def expected(dz, s, h, w):
    """The rule in fp64 (``test_grad_filter``'s): (dh, dW, kept columns per chunk of CHUNK rows)."""
    return expected_filtered(dz, s, h.double(), w.double(), THRESH)


def bound(dz, s, h, w, t, margin):
    """The README's per-element bound (``test_grad_filter``'s), every column the rule may skip counted."""
    return _bound(dz, s, h.double(), w.double(), t, margin)


def grads_of(fn, h, w, b, up=None):
    """(outputs of fn(h, w, b) detached, dh, dW, db) for fn's first output's backward with ``up``."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    out = fn(hh, ww, bb)
    first = out[0] if isinstance(out, tuple) else out
    first.backward(up)
    det = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in (out if isinstance(out, tuple) else (out,)))
    return det, hh.grad, ww.grad, (bb.grad if bb is not None else None)


def check_rule(filt, exact, dz, s, h, w):
    """fp64: filtered gradients follow the rule, the rule dropped columns, db and the outputs are exact."""
    dh_e, dw_e, kept = expected(dz, s, h, w)
    assert max(kept) < V, kept  # every chunk drops columns: the case is not vacuous
    for a, b_ in zip(filt[0], exact[0]):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b_)
    torch.testing.assert_close(filt[1], dh_e, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(filt[2], dw_e, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(filt[2], exact[2], atol=1e-13, rtol=0)  # the filter changed something
    if filt[3] is not None:
        assert torch.equal(filt[3], exact[3])


# --------------------------------------------------------------------------------------------------
# token_log_probs (the recompute backward: the op token_stats_bwd)


@pytest.mark.parametrize("opts", [{}, {"softcap": 15.0, "logit_scale": "token", "temperature": "token"}],
                         ids=["plain", "cap_scale_temp"])
def test_token_log_probs_follows_the_rule(opts):
    h, w, b, y, g = peaked()
    keep = y != -100
    ls = (0.8 + 0.4 * torch.rand(N, generator=g, dtype=F64)) if opts.get("logit_scale") else 1.0
    temp = (0.6 + 0.4 * torch.rand(N, generator=g, dtype=F64)) if opts.get("temperature") else None
    up = torch.randn(3, N, generator=g, dtype=F64)

    def fn(t):
        def call(hh, ww, bb):
            r = tk.token_log_probs(hh, ww, y, bias=bb, logit_scale=ls, temperature=temp, softcap=opts.get("softcap"),
                                   chunk_size=CHUNK, grad_filter=t)
            return (r.log_probs * up[0] + r.entropy * up[1] + r.lse * up[2]).sum(), r.log_probs, r.entropy, r.lse
        return call

    filt = grads_of(fn(THRESH), h, w, b)
    exact = grads_of(fn(None), h, w, b)

    def loss_of(zraw):
        lp, ent, lse = token_stats(final(zraw, ls, opts.get("softcap"), temp), y)
        return (lp * up[0] + ent * up[1] + lse * up[2]).sum(), lp, ent, lse

    dz, s = reference(h, w, b, loss_of, keep)
    check_rule(filt, exact, dz, s, h, w)


# --------------------------------------------------------------------------------------------------
# linear_token_objective: gradients in the forward (sum, mean) and the recompute path (none)


def _policy(lp, ent, adv, old):
    r = torch.exp(lp - old)
    return -torch.min(r * adv, r.clamp(0.8, 1.2) * adv) - 0.05 * ent


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_objective_follows_the_rule(reduction):
    h, w, b, y, g = peaked(seed=1)
    keep = y != -100
    adv = torch.randn(N, generator=g, dtype=F64)
    old = -0.05 * torch.rand(N, generator=g, dtype=F64)
    tw = 0.5 + torch.rand(N, generator=g, dtype=F64)
    up = torch.randn(N, generator=g, dtype=F64) if reduction == "none" else torch.tensor(1.7, dtype=F64)

    def fn(t):
        def call(hh, ww, bb):
            return tk.linear_token_objective(hh, ww, y, _policy, consts={"adv": adv, "old": old}, token_weight=tw,
                                             reduction=reduction, bias=bb, softcap=20.0, chunk_size=CHUNK,
                                             grad_filter=t)
        return call

    filt = grads_of(fn(THRESH), h, w, b, up)
    exact = grads_of(fn(None), h, w, b, up)

    def loss_of(zraw):
        lp, ent, lse = token_stats(final(zraw, softcap=20.0), y)
        val = torch.where(keep, _policy(lp, ent, adv, old), torch.zeros((), dtype=F64)) * tw
        tot = (val * up).sum() if reduction == "none" else val.sum() * up
        return (tot / keep.sum() if reduction == "mean" else tot), lp, ent, lse

    dz, s = reference(h, w, b, loss_of, keep)
    check_rule(filt, exact, dz, s, h, w)


def test_objective_second_backward_keeps_the_filter():
    """retain_graph: the second backward recomputes the pass with the kept coefficients and the same
    threshold."""
    h, w, b, y, g = peaked(seed=2)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.linear_token_objective(hh, ww, y, lambda lp, ent: -lp - 0.1 * ent, chunk_size=CHUNK, grad_filter=THRESH)
    loss.backward(retain_graph=True)
    first = (hh.grad.clone(), ww.grad.clone())
    hh.grad, ww.grad = None, None
    loss.backward()
    torch.testing.assert_close(hh.grad, first[0], atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(ww.grad, first[1], atol=1e-13, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# grpo_loss: the fused path and GSPO's sequence ratio (the recompute path)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_follows_the_rule(level):
    b_, t_ = 3, 33
    h, w, _, y, g = peaked(seed=3, bias=False)
    ids = y.clamp(min=0).view(b_, t_)
    mask = (y != -100).view(b_, t_).to(F64)
    hs = h.view(b_, t_, D)
    adv = torch.randn(b_, generator=g, dtype=F64)
    old = -0.05 * torch.rand(b_, t_, generator=g, dtype=F64)
    ref = -0.05 * torch.rand(b_, t_, generator=g, dtype=F64)
    kw = dict(completion_mask=mask, old_log_probs=old, ref_log_probs=ref, beta=0.04, entropy_coef=0.01,
              importance_sampling_level=level, chunk_size=CHUNK)

    def fn(t):
        def call(hh, ww, bb):
            out = tk.grpo_loss(hh, ww, ids, adv, grad_filter=t, **kw)
            return (out.loss, out.log_probs, out.entropy) + tuple(out.metrics[k] for k in sorted(out.metrics))
        return call

    filt = grads_of(fn(THRESH), hs, w, None)
    exact = grads_of(fn(None), hs, w, None)
    labels = torch.where(mask != 0, ids, -100)
    keep = (labels != -100).reshape(-1)

    def loss_of(zraw):
        lp, ent, lse = token_stats(final(zraw), labels.reshape(-1))
        loss, _ = trl_grpo_loss(lp.view(b_, t_), ent.view(b_, t_), mask, adv, old, ref, beta=0.04, entropy_coef=0.01,
                                importance_sampling_level=level)
        return loss, lp, ent, lse

    dz, s = reference(h, w, None, loss_of, keep)
    filt = (filt[0], filt[1].reshape(N, D), filt[2], None)
    exact = (exact[0], exact[1].reshape(N, D), exact[2], None)
    check_rule(filt, exact, dz, s, h, w)


# --------------------------------------------------------------------------------------------------
# linear_distillation_loss


DISTILL = [
    dict(divergence="forward_kl", reduction="mean"),
    dict(divergence="jsd", beta=0.5, temperature=2.0, alpha=0.3, reduction="none"),
    dict(divergence="reverse_kl", softcap=20.0, reduction="sum"),
]


@pytest.mark.parametrize("s", DISTILL, ids=[f"{s['divergence']}-{s['reduction']}" for s in DISTILL])
def test_distillation_follows_the_rule(s):
    h, w, b, y, g = peaked(seed=4)
    keep = y != -100
    # a teacher close to the student: both peaked on the label
    zt = (h @ w.t()) * 0.9 + 0.3 * torch.randn(N, V, generator=g, dtype=F64)
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(s["divergence"], s.get("beta"))
    temp, alpha, red = s.get("temperature", 1.0), s.get("alpha", 0.0), s["reduction"]
    up = torch.randn(N, generator=g, dtype=F64) if red == "none" else torch.tensor(0.7, dtype=F64)

    def fn(t):
        def call(hh, ww, bb):
            out = tk.linear_distillation_loss(hh, ww, y, teacher_logits=zt, divergence=s["divergence"],
                                              beta=s.get("beta", 0.5), temperature=temp, alpha=alpha, reduction=red,
                                              bias=bb, softcap=s.get("softcap"), chunk_size=CHUNK, return_stats=True,
                                              grad_filter=t)
            return tuple(out)
        return call

    filt = grads_of(fn(THRESH), h, w, b, up)
    exact = grads_of(fn(None), h, w, b, up)
    zraw = raw_logits(h, w, b)
    zs = final(zraw, softcap=s.get("softcap"))
    d = jsd(zs / temp, zt / temp, beta)
    ce = F.cross_entropy(zs, torch.where(keep, y, 0), reduction="none")
    tok = torch.where(keep, (1 - alpha) * d + alpha * ce, torch.zeros((), dtype=F64))
    wt = torch.where(keep, torch.full((N,), 1.0 / float(keep.sum()) if red == "mean" else 1.0, dtype=F64),
                     torch.zeros((), dtype=F64))
    loss = (tok * wt * up).sum() if red == "none" else (tok * wt).sum() * up
    (dz,) = torch.autograd.grad(loss, zraw)
    scale = (wt * (up if red == "none" else up.expand(N))).abs() * ((1 - alpha) / temp + alpha)
    check_rule(filt, exact, dz, scale, h, w)


# --------------------------------------------------------------------------------------------------
# low precision within the bound; 0/None exact; errors; compile; opcheck; the head and TRL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry", ["objective", "distillation"])
def test_low_precision_within_bound(dtype, entry):
    h, w, b, y, g = peaked(seed=5, dtype=dtype)
    keep = y != -100
    n_keep = float(keep.sum())
    if entry == "objective":
        def fn(t):
            return lambda hh, ww, bb: tk.linear_token_objective(hh, ww, y, lambda lp, ent: -lp - 0.05 * ent, bias=bb,
                                                                chunk_size=CHUNK, grad_filter=t)

        def loss_of(zraw):
            lp, ent, lse = token_stats(zraw, y)
            return torch.where(keep, -lp - 0.05 * ent, torch.zeros((), dtype=F64)).sum() / n_keep, lp, ent, lse

        dz, s = reference(h, w, b, loss_of, keep)
    else:
        zt = (h.double() @ w.double().t()) * 0.9 + 0.3 * torch.randn(N, V, generator=g, dtype=F64)

        def fn(t):
            return lambda hh, ww, bb: tk.linear_distillation_loss(hh, ww, y, teacher_logits=zt.to(dtype), bias=bb,
                                                                  alpha=0.2, chunk_size=CHUNK, grad_filter=t)

        zraw = raw_logits(h, w, b)
        tok = 0.8 * jsd(zraw, zt.to(dtype).double(), 0.5) + 0.2 * F.cross_entropy(zraw, torch.where(keep, y, 0),
                                                                                  reduction="none")
        (dz,) = torch.autograd.grad(torch.where(keep, tok, torch.zeros((), dtype=F64)).sum() / n_keep, zraw)
        s = keep.double() / n_keep
    filt = grads_of(fn(THRESH), h, w, b)
    exact = grads_of(fn(None), h, w, b)
    assert torch.equal(filt[0][0], exact[0][0]) and torch.equal(filt[3], exact[3])
    _, _, kept = expected(dz, s, h, w)
    assert max(kept) < V, kept
    bdh, bdw = bound(dz, s, h, w, THRESH, MARGIN[dtype])
    eps = torch.finfo(dtype).eps
    rdh = 2 * eps * (dz.abs() @ w.double().abs())
    rdw = 2 * eps * (dz.abs().t() @ h.double().abs())
    ddh = (filt[1].double() - exact[1].double()).abs()
    ddw = (filt[2].double() - exact[2].double()).abs()
    assert (ddh <= bdh + rdh).all(), (ddh - bdh - rdh).max()
    assert (ddw <= bdw + rdw).all(), (ddw - bdw - rdw).max()
    assert not torch.equal(filt[2], exact[2])


ENTRIES = {
    "token_log_probs": lambda hh, ww, y, **k: tk.token_log_probs(hh, ww, y, **k).log_probs.sum(),
    "objective": lambda hh, ww, y, **k: tk.linear_token_objective(hh, ww, y, **k),
    "grpo": lambda hh, ww, y, **k: tk.grpo_loss(hh.view(3, 33, D), ww, y.clamp(min=0).view(3, 33),
                                                torch.ones(3, dtype=hh.dtype), **k).loss,
    "distillation": lambda hh, ww, y, **k: tk.linear_distillation_loss(hh, ww, y, teacher_logits=(hh @ ww.t()).detach()
                                                                       * 0.5, **k),
    "per_token_scale_ce": lambda hh, ww, y, **k: tk.linear_cross_entropy(
        hh, ww, y, logit_scale=torch.linspace(0.8, 1.2, N, dtype=hh.dtype), **k),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_zero_is_the_exact_path_bit_for_bit(entry, off):
    h, w, _, y, _ = peaked(dtype=torch.float32, bias=False)
    res = []
    for kw in ({}, {"grad_filter": off}):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = ENTRIES[entry](hh, ww, y, chunk_size=CHUNK, **kw)
        loss.backward()
        res.append((loss.detach(), hh.grad, ww.grad))
    for a, b_ in zip(*res):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("bad", [-1e-3, float("nan"), "fast", torch.tensor(1e-3), True])
def test_invalid_values_raise(entry, bad):
    h, w, _, y, _ = peaked(dtype=torch.float32, bias=False)
    with pytest.raises(TiedKernelsError, match="grad_filter"):
        ENTRIES[entry](h.clone().requires_grad_(), w, y, grad_filter=bad)


def test_per_token_logit_scale_cross_entropy_follows_the_rule():
    """linear_cross_entropy with a per-token logit scale runs as the objective -log p(label): the filter's
    s_i is the cross-entropy's |g_i|, as on the other paths (both with and without the lse returned)."""
    h, w, b, y, g = peaked(seed=6)
    keep = y != -100
    ls = 0.8 + 0.4 * torch.rand(N, generator=g, dtype=F64)
    up = torch.rand(N, generator=g, dtype=F64) + 0.5
    for return_lse in (False, True):
        def fn(t):
            def call(hh, ww, bb):
                out = tk.linear_cross_entropy(hh, ww, y, bias=bb, logit_scale=ls, reduction="none", chunk_size=CHUNK,
                                              return_lse=return_lse, grad_filter=t)
                return (out[0] * up).sum() if return_lse else (out * up).sum()
            return call

        filt = grads_of(fn(THRESH), h, w, b)
        exact = grads_of(fn(None), h, w, b)

        def loss_of(zraw):
            lp, ent, lse = token_stats(final(zraw, ls), y)
            return (-lp * up).sum(), lp, ent, lse

        dz, s = reference(h, w, b, loss_of, keep)
        check_rule(filt, exact, dz, s, h, w)


def test_compile_fullgraph_and_opcheck():
    """Under torch.compile the objective takes the recompute path (the ops carry the threshold): compiled
    equals eager; opcheck of both ops with a threshold."""
    h, w, b, y, g = peaked(seed=7, dtype=torch.float32)

    def step(hh, ww, bb):
        return tk.linear_token_objective(hh, ww, y, lambda lp, ent: -lp - 0.05 * ent, bias=bb, chunk_size=CHUNK,
                                         grad_filter=THRESH)

    torch._dynamo.reset()
    eager = grads_of(step, h, w, b)
    compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), h, w, b)
    for a, c in zip(eager[1:], compiled[1:]):
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)
    h64, w64, b64 = h.double(), w.double(), b.double()
    args = (h64, w64, b64, y, None, None, -100, 1.0, 0.0, CHUNK, THRESH)
    torch.library.opcheck(torch.ops.tiedkernels.token_stats.default, args)
    grad = torch.randn(3, N, generator=g, dtype=F64)
    torch.library.opcheck(torch.ops.tiedkernels.token_stats_bwd.default, (grad, *args[:10], True, True, True, THRESH))
    # the op drops columns with the threshold, keeps them all without
    with_t = torch.ops.tiedkernels.token_stats_bwd.default(grad, *args[:10], True, True, True, THRESH)
    without = torch.ops.tiedkernels.token_stats_bwd.default(grad, *args[:10], True, True, True, 0.0)
    assert torch.equal(with_t[2], without[2]) and not torch.equal(with_t[1], without[1])


def test_distillation_traced_with_the_filter():
    """torch.compile(fullgraph=True) traces the distillation's pass: there the skipped columns are zeroed
    and the GEMMs stay dense (no data-dependent column count in the graph); the same gradients as eager."""
    h, w, _, y, g = peaked(seed=10, dtype=torch.float32, bias=False)
    zt = (h @ w.t()) * 0.9

    def step(hh, ww, bb):
        return tk.linear_distillation_loss(hh, ww, y, teacher_logits=zt, chunk_size=CHUNK, grad_filter=THRESH)

    torch._dynamo.reset()
    eager = grads_of(step, h, w, None)
    exact = grads_of(lambda hh, ww, bb: tk.linear_distillation_loss(hh, ww, y, teacher_logits=zt, chunk_size=CHUNK),
                     h, w, None)
    compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), h, w, None)
    for a, c in zip(eager[1:3], compiled[1:3]):
        torch.testing.assert_close(c, a, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(eager[2], exact[2], atol=1e-7, rtol=0)


def test_kept_columns_are_recorded():
    h, w, _, y, _ = peaked(seed=8, bias=False)
    grads = _token_pass.Grads(h, w, None, (True, True, False), THRESH)
    lg = _token_pass.Logits(h, w)
    keep = y != -100
    ones = torch.ones(N, dtype=F64)
    _token_pass.run(lg, y, keep, CHUNK, lambda s, r, lp, e, l: (-ones[s:s + r] * keep[s:s + r], None, None), grads)
    assert len(grads.kept) == math.ceil(N / CHUNK) and max(grads.kept) < V


def test_head_methods_take_the_heads_filter():
    """TiedEmbeddingHead's token methods default grad_filter to the head's attribute (what a patched model's
    training forward sets), as its loss does; an explicit argument wins."""
    h, w, _, y, _ = peaked(seed=9, bias=False)
    head = tk.TiedEmbeddingHead(V, D, backend="torch").double()
    with torch.no_grad():
        head.weight.copy_(w)

    def wgrad(**kw):
        head.weight.grad = None
        head.token_objective(h, y, lambda lp, ent: -lp, chunk_size=CHUNK, **kw).backward()
        return head.weight.grad.clone()

    exact = wgrad()
    explicit = wgrad(grad_filter=THRESH)
    head.__dict__["grad_filter"] = THRESH
    try:
        assert torch.equal(wgrad(), explicit)
        assert torch.equal(wgrad(grad_filter=None), exact)
    finally:
        del head.__dict__["grad_filter"]
    assert not torch.equal(explicit, exact)


def test_trl_stand_ins_pass_the_patch_filter(monkeypatch):
    """The TRL stand-ins (fused log-prob head, divergence) give the patched model's grad_filter to the fused
    calls in training mode and None in eval mode."""
    pytest.importorskip("transformers")
    import _hf_testing as H

    from tiedkernels import distill, hf, objectives
    from tiedkernels import functional as tkf
    from tiedkernels.hf import _trl

    model = H.build("llama")
    hf.patch(model, grad_filter=THRESH)
    wt = model.get_output_embeddings().weight
    seen = []

    def spy(fn):
        def wrapped(*a, **k):
            seen.append((fn.__name__, k.get("grad_filter")))
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(objectives, "token_log_probs", spy(objectives.token_log_probs))
    monkeypatch.setattr(tkf, "linear_cross_entropy", spy(tkf.linear_cross_entropy))
    monkeypatch.setattr(distill, "linear_distillation_loss", spy(distill.linear_distillation_loss))
    n, d = 7, wt.shape[1]
    hs = torch.randn(n, d, dtype=wt.dtype)
    tgt = torch.randint(0, wt.shape[0], (n,))
    lp_fn, div_fn = _trl.TiedLogProbFunction(None), _trl.TiedDivergenceFunction(None)
    for training, want in ((True, THRESH), (False, None)):
        model.train(training)
        seen.clear()
        lp_fn.apply(hs, wt, None, tgt, 1.0, 4, outputs=("log_probs", "entropy"))
        lp_fn.apply(hs, wt, None, tgt, 1.0, 4, outputs=("log_probs", "is_top1"))
        div_fn.apply(hs, wt, None, hs.detach(), wt.detach(), None, 0.5)
        assert seen == [("token_log_probs", want), ("linear_cross_entropy", want),
                        ("linear_distillation_loss", want)], seen
