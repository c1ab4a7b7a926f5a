"""Distillation on the fused head: a student's hidden states against a teacher's distribution over the
same vocabulary, forward KL, reverse KL or the generalised Jensen-Shannon divergence, without either
``[N, V]`` distribution in memory.

Per row chunk the student's logits ``z_s = softcap(logit_scale · (h Wᵀ + b))`` and the teacher's
(``h_t W_tᵀ + b_t`` with its own scale and cap, or rows of logits the caller already has) are built
once; with ``s = log_softmax(z_s / τ)``, ``t = log_softmax(z_t / τ)`` and, for JSD with ``β``,
``m = log((1-β) e^s + β e^t)`` the per-token divergence is (TRL's ``generalized_jsd_loss``):

    β = 0 (forward KL):  Σ_j e^{t_j} (t_j - s_j)          ∂/∂(z_s/τ) = e^s - e^t
    β = 1 (reverse KL):  Σ_j e^{s_j} (s_j - t_j)          ∂/∂(z_s/τ) = e^s ⊙ (g - Σ e^s g),  g = s - t
    0 < β < 1 (JSD):     β Σ e^t (t - m) + (1-β) Σ e^s (s - m)                    ... with g = (1-β)(s - m)

and, with ``alpha > 0``, ``alpha`` times the hard-label cross-entropy of the untempered student logits is
mixed in (``(1 - alpha)`` times the divergence). The gradients of a summed or averaged loss are computed
in the same pass (the student's three GEMMs plus the teacher's one); the teacher gets no gradient.
"""

import math
from typing import NamedTuple

import torch

from . import _composite, _token_pass
from . import functional as tkf
from .functional import TiedKernelsError
from .objectives import _NO_SECOND, _no_transforms, _view, prepare

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_REDUCTIONS = ("mean", "batchmean", "sum", "none")


class DistillOutput(NamedTuple):
    """``linear_distillation_loss(..., return_stats=True)``: the loss and detached per-token terms."""

    loss: torch.Tensor
    divergence: torch.Tensor   # per token, before (1 - alpha) and the reduction; 0 at ignored tokens
    cross_entropy: torch.Tensor  # per token hard-label loss of the student (computed when alpha > 0, else 0)
    entropy: torch.Tensor      # per token entropy of the tempered student distribution, at every token


def _beta(divergence, beta):
    if divergence not in DIVERGENCES:
        raise TiedKernelsError(f"tiedkernels: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    b = tkf._real(beta, "beta")
    if not 0.0 <= b <= 1.0:
        raise TiedKernelsError(f"tiedkernels: beta must be in [0, 1], got {beta}")
    return b


def _xlogy_diff(p, a, b):
    """Σ_j p_j (a_j - b_j) with 0 where p_j = 0 (never 0 · inf)."""
    return torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * (a - b)).sum(1)


def _chunk_divergence(zs, zt, beta, ent_out=None):
    """Per-row divergence and its gradient with respect to the tempered student logits ``zs``; the
    student's entropy into ``ent_out`` when given."""
    s = torch.log_softmax(zs, dim=1)
    t = torch.log_softmax(zt, dim=1)
    ps = torch.exp(s)
    if ent_out is not None:
        ent_out.copy_(-torch.where(ps == 0, torch.zeros((), dtype=s.dtype, device=s.device), ps * s).sum(1))
    if beta == 0.0:
        pt = torch.exp(t)
        return _xlogy_diff(pt, t, s), ps - pt
    if beta == 1.0:
        d = _xlogy_diff(ps, s, t)
        g = torch.where(ps == 0, torch.zeros((), dtype=s.dtype, device=s.device), s - t)
    else:
        pt = torch.exp(t)
        m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        d = beta * _xlogy_diff(pt, t, m) + (1 - beta) * _xlogy_diff(ps, s, m)
        g = torch.where(ps == 0, torch.zeros((), dtype=s.dtype, device=s.device), (1 - beta) * (s - m))
    mean_g = (ps * g).sum(1, keepdim=True)
    return d, ps * (g - mean_g)


class _Teacher:
    """Rows of the teacher's logits: from its hidden states and weight, or from logits the caller has."""

    def __init__(self, hidden=None, weight=None, bias=None, logit_scale=1.0, softcap=0.0, logits=None, sdt=None):
        self.logits = logits
        self.lg = None if hidden is None else _token_pass.Logits(hidden, weight, bias, logit_scale, softcap)
        self.sdt = sdt

    def chunk(self, start, rows):
        if self.lg is not None:
            return self.lg.chunk(start, rows)[0]
        if callable(self.logits):
            z = self.logits(start, rows)
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != rows:
                raise TiedKernelsError(f"tiedkernels: teacher_logits({start}, {rows}) must return [{rows}, V] logits, "
                                       f"got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
            return z.detach().to(self.sdt)
        return self.logits[start:start + rows].to(self.sdt)


def _pass(call, teacher, beta, inv_t, alpha, w, g, grads, ent=None):
    """Per-token divergence and hard-label loss [N]; with ``grads`` the chunk gradients of
    Σ_i g_i w_i ((1-alpha) d_i + alpha ce_i) go into it (g: per-row incoming gradient or None for 1)."""
    n = call.y.shape[0]
    sdt = call.sdt
    dev = call.h2.device
    div = torch.zeros((n,), dtype=sdt, device=dev)
    ce = torch.zeros((n,), dtype=sdt, device=dev)
    zero = torch.zeros((), dtype=sdt, device=dev)
    lg = call.logits
    for start in range(0, n, call.chunk):
        rows = min(call.chunk, n - start)
        sl = slice(start, start + rows)
        kc, yc = call.keep[sl], call.y[sl]
        z, tcap = lg.chunk(start, rows)
        with torch.no_grad():
            zt = teacher.chunk(start, rows)
        if zt.shape != z.shape:
            raise TiedKernelsError(f"tiedkernels: the teacher's logits have {zt.shape[1]} classes but the student's "
                                   f"{z.shape[1]}: distillation needs one vocabulary")
        d, dzs = _chunk_divergence(z * inv_t if inv_t != 1.0 else z, zt * inv_t if inv_t != 1.0 else zt, beta,
                                   None if ent is None else ent[sl])
        div[sl] = torch.where(kc, d, zero)
        if alpha > 0:
            p, lse, _ = _token_pass.softmax_stats(z)
            from ._torch_backend import cross_entropy_lse
            ce[sl] = torch.where(kc, cross_entropy_lse(lse) - _token_pass.label_logits(z, yc, kc), zero)
        if grads is None:
            continue
        wc = torch.where(kc, w[sl] if w is not None else torch.ones((rows,), dtype=sdt, device=dev), zero)
        if g is not None:
            wc = wc * g[sl]
        dz = dzs.mul_(((1 - alpha) * inv_t) * wc[:, None])
        if alpha > 0:
            dz += _token_pass.logits_grad(z, p, None, yc, kc, -alpha * wc, None, None)
        # the gradient filter's s_i: the row's weight on its two probability differences
        scale = wc.abs() * ((1 - alpha) * inv_t + alpha) if grads.grad_filter > 0 else None
        grads.add(lg.chain(dz, tcap, start, rows), start, rows, scale)
    return div, ce


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, weight, bias, call, teacher, opts, w, g_scalar_mode, ent):
        beta, inv_t, alpha, want, thr = opts
        grads = _token_pass.Grads(h2, weight, bias, want, thr) if g_scalar_mode else None
        div, ce = _pass(call, teacher, beta, inv_t, alpha, w, None, grads, ent)
        ctx.pre = grads.result() if grads is not None else None
        ctx.call, ctx.teacher, ctx.opts, ctx.w = call, teacher, opts, w
        ctx.scalar = g_scalar_mode
        ctx.save_for_backward(h2, weight, bias)
        ctx.set_materialize_grads(False)
        tok = (1 - alpha) * div + alpha * ce
        if w is not None:
            tok = tok * w
        ctx.mark_non_differentiable(div, ce)
        return (tok.sum() if g_scalar_mode else tok), div, ce

    @staticmethod
    def backward(ctx, g, *unused):
        if torch.is_grad_enabled() or _composite.in_functorch():
            raise NotImplementedError(_NO_SECOND)
        if g is None:
            return (None,) * 9
        pre, ctx.pre = ctx.pre, None
        if pre is not None:
            return tuple(None if t is None else t * g.to(t.dtype) for t in pre) + (None,) * 6
        h2, weight, bias = ctx.saved_tensors
        beta, inv_t, alpha, want, thr = ctx.opts
        grads = _token_pass.Grads(h2, weight, bias, want, thr)
        gv = g.to(ctx.call.sdt)
        gv = gv.expand(ctx.call.y.shape) if gv.dim() == 0 else gv
        _pass(ctx.call, ctx.teacher, beta, inv_t, alpha, ctx.w, gv, grads)
        return grads.result() + (None,) * 6


def linear_distillation_loss(hidden, weight, labels, *, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                             teacher_logits=None, divergence="jsd", beta=0.5, temperature=1.0, alpha=0.0,
                             reduction="mean", num_items_in_batch=None, ignore_index=-100, bias=None,
                             logit_scale=1.0, softcap=None, teacher_logit_scale=1.0, teacher_softcap=None,
                             shift=False, chunk_size=None, backend="auto", return_stats=False, grad_filter=None):
    """Distil a student (``hidden [*, D]``, ``weight [V, D]``) towards a teacher without materialising
    either ``[N, V]`` distribution.

    The teacher is ``teacher_hidden [*, D_t]`` with ``teacher_weight [V, D_t]`` (``D_t`` may differ from
    ``D``: another model over one vocabulary; optional ``teacher_bias``, ``teacher_logit_scale``,
    ``teacher_softcap``), or ``teacher_logits``: a ``[*, V]`` tensor, or a callable ``(start, rows) ->
    [rows, V]`` that returns the teacher's logits of the flattened tokens ``start:start+rows`` (chunk by
    chunk, where the caller computes or streams them). The teacher gets no gradient.

    ``divergence``: ``"forward_kl"`` (KL(teacher‖student)), ``"reverse_kl"`` or ``"jsd"`` with ``beta``
    (TRL's generalised JSD: 0 and 1 are the two KLs). ``temperature`` divides both logits. ``labels`` mark
    the scored tokens (``ignore_index`` elsewhere) and, with ``alpha > 0``, are the hard targets of a
    cross-entropy of the untempered student logits: the loss is ``(1 - alpha)·divergence + alpha·CE`` per
    token. ``reduction``: ``"mean"``/``"batchmean"`` (over the scored tokens, TRL's ``batchmean`` with
    labels), ``"sum"``, ``"none"``; ``num_items_in_batch`` divides the sum instead.

    ``grad_filter`` (None: exact; a threshold ``t``; ``"auto"``): ``linear_cross_entropy``'s gradient filter
    for the student's ``dh``/``dW`` GEMMs, with ``s_i = |w_i| · ((1 - alpha) / temperature + alpha)`` (``w_i``
    the token's weight in the loss: the reduction's ``1/denominator`` times its incoming gradient); the
    loss and the statistics are exact.
    """
    if reduction not in _REDUCTIONS:
        raise TiedKernelsError(f"tiedkernels: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction == "none":
        raise TiedKernelsError("tiedkernels: num_items_in_batch divides a summed loss; it has no meaning with "
                               "reduction='none'")
    b = _beta(divergence, beta)
    temp = tkf._real(temperature, "temperature")
    if not (temp > 0 and math.isfinite(temp)):
        raise TiedKernelsError(f"tiedkernels: temperature must be positive and finite, got {temperature}")
    a = tkf._real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise TiedKernelsError(f"tiedkernels: alpha must be in [0, 1], got {alpha}")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise TiedKernelsError("tiedkernels: pass the teacher as teacher_hidden with teacher_weight, or as "
                               "teacher_logits (one of the two)")
    if isinstance(weight, torch.Tensor):
        tkf.check_num_items(num_items_in_batch, weight.device)
    call = prepare(hidden, weight, labels, bias=bias, logit_scale=logit_scale, softcap=softcap,
                   ignore_index=ignore_index, shift=shift, chunk_size=chunk_size, backend=backend)
    _no_transforms(call.h2, call.weight, call.bias)
    n = call.y.shape[0]
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise TiedKernelsError("tiedkernels: teacher_hidden needs teacher_weight")
        tkf.check_weight(teacher_weight, "teacher_weight")
        th, tw, tb = tkf.autocast_inputs(teacher_hidden.detach(), teacher_weight.detach(),
                                         None if teacher_bias is None else teacher_bias.detach())
        tkf.check_hidden(th, tw, "teacher_weight")
        tkf.check_bias(tb, tw, "teacher_weight")
        tkf.check_device(tw, "teacher_weight", call.weight)
        if th.shape[:-1] != hidden.shape[:-1]:
            raise TiedKernelsError(f"tiedkernels: teacher_hidden has shape {tuple(th.shape)} but hidden "
                                   f"{tuple(hidden.shape)}: one teacher state per student token")
        if tw.shape[0] != call.weight.shape[0]:
            raise TiedKernelsError(f"tiedkernels: teacher_weight has {tw.shape[0]} rows but weight "
                                   f"{call.weight.shape[0]}: distillation needs one vocabulary")
        th, tw = tkf._nonempty_dim(th, tw)
        teacher = _Teacher(th.reshape(n, tw.shape[1]), tw, tb, tkf._logit_scale_value(teacher_logit_scale),
                           tkf._softcap_value(teacher_softcap), sdt=call.sdt)
    elif callable(teacher_logits):
        teacher = _Teacher(logits=teacher_logits, sdt=call.sdt)
    else:
        tkf._require_tensor(teacher_logits, "teacher_logits")
        tkf.check_device(teacher_logits, "teacher_logits", call.weight)
        if teacher_logits.shape != (*hidden.shape[:-1], call.weight.shape[0]):
            raise TiedKernelsError(f"tiedkernels: teacher_logits has shape {tuple(teacher_logits.shape)}; expected "
                                   f"{(*hidden.shape[:-1], call.weight.shape[0])} (hidden's tokens by V)")
        teacher = _Teacher(logits=teacher_logits.detach().reshape(n, call.weight.shape[0]), sdt=call.sdt)
    denom = None
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch).reshape(()).to(device=call.h2.device, dtype=call.sdt)
    elif reduction in ("mean", "batchmean"):
        denom = call.keep.sum().clamp(min=1).to(call.sdt)
    w = None if denom is None else (1.0 / denom).expand(call.y.shape)
    want = (call.h2.requires_grad, call.weight.requires_grad, call.bias is not None and call.bias.requires_grad)
    scalar = reduction != "none"
    opts = (b, 1.0 / temp, a, want, tkf.grad_filter_value(grad_filter, call.h2.dtype))
    ent = torch.empty((n,), dtype=call.sdt, device=call.h2.device) if return_stats else None
    with tkf.no_autocast(call.weight.device):
        if torch.is_grad_enabled() and any(want):
            loss, div, ce = _Distill.apply(call.h2, call.weight, call.bias, call, teacher, opts, w, scalar, ent)
        else:
            with torch.no_grad():
                div, ce = _pass(call, teacher, b, 1.0 / temp, a, w, None, None, ent)
                tok = (1 - a) * div + a * ce
                tok = tok * w if w is not None else tok
                loss = tok.sum() if scalar else tok
    call.pending.finish()
    if not scalar:
        loss = _view(loss, call)
    if not return_stats:
        return loss
    return DistillOutput(loss, _view(div.detach(), call), _view(ce.detach(), call), _view(ent, call))
