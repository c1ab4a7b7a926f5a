"""Token-level objectives on the fused LM head: per-token log-probs and entropy with gradients, any
token-local loss written once in PyTorch, and the GRPO family of policy-gradient losses.

Three entry points, from the most general to the most fused:

* ``token_log_probs``: per-token ``log p(label)``, entropy and logsumexp, each differentiable. The
  backward recomputes each chunk's logits with the incoming gradients of all three (8·N·D·V flops in
  all). Any objective works on top of it, sequence-level ones included (GSPO's sequence ratio, an
  entropy quantile mask).
* ``linear_token_objective``: a loss ``Σ_i w_i · objective(logp_i, H_i, **consts_i)`` whose per-token
  terms depend on that token alone. The objective is called once per row chunk, inside the pass that
  builds the chunk's logits, and its derivative with respect to ``(logp, H)`` turns straight into the
  chunk's gradients: 6·N·D·V flops, the three GEMMs' floor, and no ``[N, V]`` tensor.
* ``grpo_loss``: TRL's GRPO objectives (its ``loss_type``s, two-sided clipping, the k3 KL estimate
  against reference log-probs, importance-sampling correction, the entropy bonus) on top of the two.

The math of a chunk is in ``_token_pass``.
"""

import math
import numbers
from typing import NamedTuple, Optional

import torch

from . import _composite, _token_pass, backends
from . import _torch_backend as _tb
from . import functional as tkf
from ._index_check import _DONE
from .functional import TiedKernelsError


class TokenLogProbs(NamedTuple):
    """Per-token results (the labels' shape; ``[..., T-1]`` with ``shift``), fp32 (fp64 for fp64)."""

    log_probs: torch.Tensor  # log softmax(z)[label]; 0 at ignored tokens
    entropy: torch.Tensor    # lse - Σ_j p_j z_j, at every token
    lse: torch.Tensor        # logsumexp of the final logits, at every token


class ObjectiveOutput(NamedTuple):
    """``linear_token_objective(..., return_stats=True)``: the loss and, detached, its per-token inputs."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor


# ---------------------------------------------------------------------------------------
# argument handling shared by every entry point


class _Call(NamedTuple):
    h2: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    y: torch.Tensor          # [N] int64, shifted when asked
    keep: torch.Tensor       # [N] bool: not ignored
    logits: _token_pass.Logits
    chunk: int
    shape: tuple             # the per-token output shape
    shift: bool
    pending: object          # the label check (finish() once the work is queued)
    ignore_index: int
    sdt: torch.dtype


def _out_shape(labels, shift):
    return (*labels.shape[:-1], labels.shape[-1] - 1) if shift and labels.shape[-1] > 0 else tuple(labels.shape)


def per_token(x, name, labels, shift, dtype, *, allow_grad=False):
    """A number or a tensor broadcast to the per-token shape, flattened to [N] (0 past each sequence's
    end with ``shift``); None stays None."""
    if x is None:
        return None
    shape = _out_shape(labels, shift)
    if not isinstance(x, torch.Tensor):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"tiedkernels: {name} must be a number or a tensor, got {type(x).__name__}")
        x = torch.full((), float(x), dtype=dtype, device=labels.device)
    tkf.check_device(x, name, labels, "labels")
    if x.is_complex():
        raise TiedKernelsError(f"tiedkernels: {name} must be real, got {x.dtype}")
    if x.requires_grad and not allow_grad:
        raise NotImplementedError(f"tiedkernels: {name} is a constant of the loss and gets no gradient; pass "
                                  f"{name}.detach()")
    try:
        x = torch.broadcast_to(x, shape)
    except RuntimeError:
        raise TiedKernelsError(f"tiedkernels: {name} has shape {tuple(x.shape)}, which does not broadcast to the "
                               f"per-token shape {shape}" + (" (labels' shape without each sequence's last "
                                                             "position, as shift=True scores)" if shift else ""))
    x = x.to(dtype)
    if shift and labels.shape[-1] > 0:
        x = torch.cat([x, x.new_zeros((*shape[:-1], 1))], dim=-1)
    return x.reshape(-1)


def _scales(logit_scale, temperature, labels, shift, sdt):
    """(the scalar logit scale, a per-token scale or None, per-token 1/temperature or None)."""
    row_scale = None
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
        row_scale = per_token(logit_scale, "logit_scale", labels, shift, sdt)
        if not torch.compiler.is_compiling() and row_scale.device.type == "cpu" \
                and not bool(torch.isfinite(row_scale).all()):
            raise TiedKernelsError("tiedkernels: logit_scale must be finite")
        scale = 1.0
    else:
        scale = tkf._logit_scale_value(logit_scale)
    inv_temp = None
    if temperature is not None:
        if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
            t = per_token(temperature, "temperature", labels, shift, sdt)
            if shift and t.numel():  # the padded last positions are ignored; keep them finite
                t = torch.where(t == 0, torch.ones((), dtype=sdt, device=t.device), t)
            if not torch.compiler.is_compiling() and t.device.type == "cpu" \
                    and not bool(((t > 0) & torch.isfinite(t)).all()):
                raise TiedKernelsError("tiedkernels: temperature must be positive and finite at every token")
            inv_temp = 1.0 / t
        else:
            if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
                raise NotImplementedError("tiedkernels: temperature gets no gradient; pass temperature.detach()")
            tv = tkf._real(temperature, "temperature")
            if not (tv > 0 and math.isfinite(tv)):
                raise TiedKernelsError(f"tiedkernels: temperature must be positive and finite, got {temperature}")
            if tv != 1.0:
                inv_temp = torch.full((labels.numel(),), 1.0 / tv, dtype=sdt, device=labels.device)
    return scale, row_scale, inv_temp


def prepare(hidden, weight, labels, *, bias=None, logit_scale=1.0, temperature=None, softcap=None,
            ignore_index=-100, shift=False, chunk_size=None, backend="auto", what="labels"):
    """Check the arguments of a token-level call and build its chunk plan."""
    tkf.check_weight(weight)
    hidden, weight, bias = tkf.autocast_inputs(hidden, weight, bias)
    tkf.check_hidden(hidden, weight)
    tkf.check_bias(bias, weight)
    tkf.check_index_dtype(labels, "labels")
    if labels.shape != hidden.shape[:-1]:
        raise TiedKernelsError(f"tiedkernels: labels have shape {tuple(labels.shape)} but hidden "
                               f"{tuple(hidden.shape)}: labels must match hidden without its last dimension")
    tkf.check_device(labels, "labels", hidden, "hidden")
    if shift and hidden.dim() < 2:
        raise TiedKernelsError("tiedkernels: shift=True needs a sequence dimension: hidden [..., T, D]")
    tkf.check_classes(weight)
    backends.resolve(backend, weight.device)  # an explicit request that cannot run here raises
    cap = tkf._softcap_value(softcap)
    sdt = _token_pass.stat_dtype(hidden.dtype)
    scale, row_scale, inv_temp = _scales(logit_scale, temperature, labels, shift, sdt)
    lab = tkf.shift_labels(labels, ignore_index) if shift else labels
    n = labels.numel()
    hidden, weight = tkf._nonempty_dim(hidden, weight)
    d = weight.shape[1]
    h2 = hidden.reshape(n, d)
    y = lab.reshape(-1).long()
    if torch.compiler.is_compiling():  # traced: the ops check their labels themselves
        pending, bad = _DONE, None
    else:
        pending, bad = _tb.check_index_range(y, weight.shape[0], "label", ignore_index)
    if bad is not None:  # CUDA: a bad label's token gets NaN results, never an out-of-bounds read
        h2 = torch.where(bad.unsqueeze(1), float("nan"), h2)
        y = torch.where(bad, ignore_index, y)
    keep = y != ignore_index
    # the pass holds its chunk's logits in the statistics dtype (fp32 for bf16/fp16): size the chunk by it
    chunk = tkf.chunk_rows(n, weight.shape[0], chunk_size, d=d, itemsize=max(4, hidden.element_size()))
    lg = _token_pass.Logits(h2, weight, bias, scale, cap, row_scale, inv_temp)
    return _Call(h2, weight, bias, y, keep, lg, chunk, _out_shape(labels, shift), shift, pending,
                 int(ignore_index), sdt)


def _view(t, call):
    """[N] -> the per-token output shape."""
    full = (*call.shape[:-1], call.shape[-1] + 1) if call.shift else call.shape
    t = t.view(full)
    return t[..., :-1] if call.shift else t


# ---------------------------------------------------------------------------------------
# token_log_probs: a custom op with a recompute backward


def _pass_args(hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap):
    keep = labels != ignore_index
    lg = _token_pass.Logits(hidden, weight, bias, logit_scale, softcap, row_scale, inv_temp)
    return lg, labels.long(), keep


# The ops this module defines in Python (one implementation for every device: the chunked pass);
# the compiled extension's ops are tiedkernels/_schemas.py's.
PYTHON_OPS = ("token_stats", "token_stats_bwd")


@torch.library.custom_op("tiedkernels::token_stats", mutates_args=())
def _token_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 row_scale: Optional[torch.Tensor], inv_temp: Optional[torch.Tensor], ignore_index: int,
                 logit_scale: float, softcap: float, chunk_size: int, grad_filter: float = 0.0) -> torch.Tensor:
    """[3, N]: per-token (logp, entropy, lse) of the final logits. ``grad_filter`` (the threshold t, 0:
    exact) is the backward's (``token_stats_bwd``)."""
    pending, bad = _tb.check_index_range(labels, weight.shape[0], "label", ignore_index)
    if bad is not None:
        hidden = torch.where(bad.unsqueeze(1), float("nan"), hidden)
        labels = torch.where(bad, ignore_index, labels)
    pending.finish()
    lg, y, keep = _pass_args(hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap)
    logp, ent, lse, _ = _token_pass.run(lg, y, keep, max(1, chunk_size))
    return torch.stack([logp, ent, lse])


@_token_stats.register_fake
def _(hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap, chunk_size,
      grad_filter=0.0):
    return hidden.new_empty((3, hidden.shape[0]), dtype=_token_pass.stat_dtype(hidden.dtype))


@torch.library.custom_op("tiedkernels::token_stats_bwd", mutates_args=())
def _token_stats_bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     labels: torch.Tensor, row_scale: Optional[torch.Tensor], inv_temp: Optional[torch.Tensor],
                     ignore_index: int, logit_scale: float, softcap: float, chunk_size: int, want_dh: bool,
                     want_dw: bool, want_db: bool, grad_filter: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) for the incoming gradient [3, N] of (logp, entropy, lse); empty where not wanted.
    ``grad_filter`` > 0: the chunks' dh and dW GEMMs leave out the columns the filter's rule skips, with
    s_i = |grad_logp_i| + |grad_entropy_i| + |grad_lse_i|."""
    lg, y, keep = _pass_args(hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap)
    g = grad.to(lg.sdt)
    zero = torch.zeros((), dtype=lg.sdt, device=g.device)
    ga, gb, gc = torch.where(keep, g[0], zero), g[1], g[2]
    if hidden.device.type == "cpu" and not torch.compiler.is_compiling():  # free to skip a zero term here
        gb = gb if bool(gb.any()) else None
        gc = gc if bool(gc.any()) else None
    grads = _token_pass.Grads(hidden, weight, bias, (want_dh, want_dw, want_db), grad_filter)

    def coef(start, rows, lp, h, lse):
        sl = slice(start, start + rows)
        return ga[sl], (gb[sl] if gb is not None else None), (gc[sl] if gc is not None else None)

    _token_pass.run(lg, y, keep, max(1, chunk_size), coef, grads)
    dh, dw, db = grads.result()
    empty = hidden.new_empty((0,))
    return (dh if dh is not None else empty, dw if dw is not None else weight.new_empty((0,)),
            db if db is not None else weight.new_empty((0,)))


@_token_stats_bwd.register_fake
def _(grad, hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap, chunk_size,
      want_dh, want_dw, want_db, grad_filter=0.0):
    return (hidden.new_empty(hidden.shape) if want_dh else hidden.new_empty((0,)),
            weight.new_empty(weight.shape) if want_dw else weight.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if want_db and bias is not None else weight.new_empty((0,)))


_NO_SECOND = ("tiedkernels: second derivatives of the token log-probs/objective ops (create_graph=True) are not "
              "implemented; compute the log-probs from full logits (log_softmax) where you need them")


def _stats_setup(ctx, inputs, output):
    hidden, weight, bias, labels, row_scale, inv_temp, ignore_index, logit_scale, softcap, chunk_size, thr = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, row_scale, inv_temp)
    ctx.opts = (ignore_index, logit_scale, softcap, chunk_size)
    ctx.grad_filter = thr


def _stats_backward(ctx, grad):
    if torch.is_grad_enabled() or _composite.in_functorch() or _composite.batched(grad):
        raise NotImplementedError(_NO_SECOND)
    hidden, weight, bias, labels, row_scale, inv_temp = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = (need[0], need[1], need[2] and bias is not None)
    if not any(want):
        return (None,) * 11
    dh, dw, db = _token_stats_bwd(grad, hidden, weight, bias, labels, row_scale, inv_temp, *ctx.opts, *want,
                                  ctx.grad_filter)
    return (dh if want[0] else None, dw if want[1] else None, db if want[2] else None) + (None,) * 8


torch.library.register_autograd("tiedkernels::token_stats", _stats_backward, setup_context=_stats_setup)


def _no_transforms(*tensors):
    m = _composite.mode(*tensors)
    if m is not None:
        raise NotImplementedError(f"tiedkernels: the token-level objectives do not support {m} (forward-mode AD and "
                                  "torch.func transforms); use torch.autograd (loss.backward())")


def token_log_probs(hidden, weight, labels, *, bias=None, logit_scale=1.0, temperature=None, softcap=None,
                    ignore_index=-100, shift=False, chunk_size=None, backend="auto", grad_filter=None):
    """Per-token ``log p(label)``, entropy and logsumexp of ``softcap(logit_scale · (hidden @ weightᵀ + bias))
    / temperature``, each differentiable, without the ``[N, V]`` logits.

    ``logit_scale`` and ``temperature`` may be numbers or tensors broadcast to the per-token shape (a
    temperature per sample: ``[B, 1]``); neither gets a gradient. Returns ``TokenLogProbs`` with the labels'
    shape (``[..., T-1]`` with ``shift``). The backward recomputes each chunk's logits once with the
    incoming gradients of all three outputs. ``grad_filter`` (None: exact; a threshold ``t``; ``"auto"``):
    ``linear_cross_entropy``'s gradient filter in that backward, with ``s_i = |∂L/∂logp_i| + |∂L/∂H_i| +
    |∂L/∂lse_i|``; the three outputs themselves are exact."""
    call = prepare(hidden, weight, labels, bias=bias, logit_scale=logit_scale, temperature=temperature,
                   softcap=softcap, ignore_index=ignore_index, shift=shift, chunk_size=chunk_size, backend=backend)
    _no_transforms(call.h2, call.weight, call.bias)
    thr = tkf.grad_filter_value(grad_filter, call.h2.dtype)
    lg = call.logits
    with tkf.no_autocast(call.weight.device):
        stats = _token_stats(call.h2, call.weight, call.bias, call.y, lg.row_scale, lg.inv_temp, call.ignore_index,
                             lg.logit_scale, lg.softcap, call.chunk, thr)
    call.pending.finish()
    return TokenLogProbs(*(_view(stats[i], call) for i in range(3)))


# ---------------------------------------------------------------------------------------
# linear_token_objective: the objective evaluated chunk by chunk inside the pass


_REDUCTIONS = ("sum", "mean", "none")


def _consts(consts, labels, shift):
    """Per-token constants: name -> [N] (floating ones in their own floating dtype, others as given)."""
    if consts is None:
        return {}
    if not isinstance(consts, dict):
        raise TypeError(f"tiedkernels: consts must be a dict of per-token tensors, got {type(consts).__name__}")
    out = {}
    for k, x in consts.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise TiedKernelsError(f"tiedkernels: consts keys are the objective's keyword names, got {k!r}")
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if (x.is_floating_point() or x.dtype == torch.bool) else torch.long
        else:
            dtype = torch.float32
        out[k] = per_token(x, f"consts[{k!r}]", labels, shift, dtype)
    return out


def _denominator(keep, reduction, num_items_in_batch, sdt):
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch).reshape(()).to(device=keep.device, dtype=sdt)
    if reduction == "mean":
        return keep.sum().clamp(min=1).to(sdt)
    return None


class _Evaluator:
    """Calls the objective on one chunk and turns its derivative into the chunk's coefficients."""

    def __init__(self, objective, consts, weight_tok, keep, sdt):
        self.objective, self.consts, self.w, self.keep, self.sdt = objective, consts, weight_tok, keep, sdt
        self.total = torch.zeros((), dtype=sdt, device=keep.device)
        self.bad = None  # where the objective gave a non-finite value from finite inputs (eager, CPU)
        self.a = torch.zeros(keep.shape, dtype=sdt, device=keep.device)
        self.b = None

    def values(self, start, rows, lp, h, need_grad):
        sl = slice(start, start + rows)
        kc = self.keep[sl]
        with torch.enable_grad():
            lpv = lp.detach().requires_grad_(need_grad)
            hv = h.detach().requires_grad_(need_grad)
            val = _checked(self.objective(lpv, hv, **{k: c[sl] for k, c in self.consts.items()}), lp,
                           " for this chunk").to(self.sdt)
            if val.device.type == "cpu" and not torch.compiler.is_compiling():
                made = kc & ~torch.isfinite(val) & torch.isfinite(lp) & torch.isfinite(h)
                if bool(made.any()):
                    i = int(made.nonzero()[0, 0])
                    raise TiedKernelsError(f"tiedkernels: the objective returned {float(val[i])} at token {start + i} "
                                           f"from finite inputs (log_prob {float(lp[i])}, entropy {float(h[i])})")
            val = torch.where(kc, val, torch.zeros((), dtype=self.sdt, device=val.device))
            if self.w is not None:
                val = val * self.w[sl]
            total = val.sum()
            grads = (None, None)
            if need_grad and total.requires_grad:
                grads = torch.autograd.grad(total, (lpv, hv), allow_unused=True)
        return total.detach(), val.detach(), grads

    def coef(self, start, rows, lp, h, lse):
        total, _, (ga, gb) = self.values(start, rows, lp, h, True)
        self.total += total
        sl = slice(start, start + rows)
        zero = torch.zeros((), dtype=self.sdt, device=lp.device)
        a = torch.where(self.keep[sl], ga.to(self.sdt), zero) if ga is not None else None
        if a is not None:
            self.a[sl] = a
        b = None
        if gb is not None:
            b = torch.where(self.keep[sl], gb.to(self.sdt), zero)
            if self.b is None:
                self.b = torch.zeros(self.keep.shape, dtype=self.sdt, device=lp.device)
            self.b[sl] = b
        return a, b, None


class _FusedObjective(torch.autograd.Function):
    """The objective's loss with its gradients computed in the forward pass; the backward scales them by
    the incoming gradient. A second backward (retain_graph) recomputes the pass with the per-token
    coefficients kept from the first."""

    @staticmethod
    def forward(ctx, h2, weight, bias, call, ev, want, thr):
        grads = _token_pass.Grads(h2, weight, bias, want, thr)
        logp, ent, lse, _ = _token_pass.run(call.logits, call.y, call.keep, call.chunk, ev.coef, grads)
        ctx.pre = grads.result()
        ctx.call, ctx.a, ctx.b, ctx.want, ctx.thr = call, ev.a, ev.b, want, thr
        ctx.save_for_backward(h2, weight, bias)
        ctx.mark_non_differentiable(logp, ent, lse)
        ctx.set_materialize_grads(False)
        return ev.total.clone(), logp, ent, lse

    @staticmethod
    def backward(ctx, g, *unused):
        if torch.is_grad_enabled():
            raise NotImplementedError(_NO_SECOND)
        if g is None:
            return (None,) * 7
        pre, ctx.pre = ctx.pre, None
        if pre is None:  # a second backward: the pass again with the kept coefficients
            h2, weight, bias = ctx.saved_tensors
            call, a, b = ctx.call, ctx.a, ctx.b
            grads = _token_pass.Grads(h2, weight, bias, ctx.want, ctx.thr)

            def coef(start, rows, lp, h, lse):
                sl = slice(start, start + rows)
                return a[sl], (b[sl] if b is not None else None), None

            _token_pass.run(call.logits, call.y, call.keep, call.chunk, coef, grads)
            pre = grads.result()
        out = tuple(None if t is None else t * g.to(t.dtype) for t in pre)
        return out + (None, None, None, None)


def linear_token_objective(hidden, weight, labels, objective=None, *, consts=None, token_weight=None,
                           reduction="mean", num_items_in_batch=None, bias=None, logit_scale=1.0, temperature=None,
                           softcap=None, ignore_index=-100, shift=False, chunk_size=None, backend="auto",
                           return_stats=False, grad_filter=None):
    """``Σ_i w_i · objective(logp_i, H_i, **consts_i)`` over the non-ignored tokens, fused.

    ``logp_i`` is the log-probability of token i's label and ``H_i`` the entropy of its distribution under
    ``softcap(logit_scale · (hidden @ weightᵀ + bias)) / temperature``. ``objective(log_probs, entropy,
    **consts)`` is any differentiable PyTorch function that computes each token's value from that token's
    inputs alone (it is called once per row chunk, on 1-D slices); ``None`` is ``-log_probs`` (the
    cross-entropy). ``consts``: per-token tensors (advantages, old or reference log-probs, masks), each
    broadcast to the labels' shape (``[..., T-1]`` with ``shift``) and sliced with the chunk; they get no
    gradient. ``token_weight`` ``w``: per-token weights (default 1), the linear case without an objective
    (advantage-weighted likelihood, per-sequence normalisation of packed batches).

    ``reduction``: ``"mean"`` divides the weighted sum by the non-ignored token count, ``"sum"`` does not,
    ``num_items_in_batch`` divides by that count instead; ``"none"`` returns ``w_i`` times the per-token
    values (0 at ignored tokens). ``sum``/``mean`` compute the gradients in the same pass as the loss (the
    three GEMMs, 6·N·D·V flops); ``none``, and every call traced by ``torch.compile``, evaluate the
    objective on the whole batch's ``token_log_probs`` and recompute in the backward (8·N·D·V).
    ``return_stats``: an ``ObjectiveOutput`` with the detached per-token log-probs, entropy and lse.
    ``grad_filter`` (None: exact; a threshold ``t``; ``"auto"``): ``linear_cross_entropy``'s gradient filter
    for the chunks' ``dh``/``dW`` GEMMs, with ``s_i = |∂L/∂logp_i| + |∂L/∂H_i|`` (the objective's
    derivative at token i, weight and denominator included); the loss and the statistics are exact.
    """
    if reduction not in _REDUCTIONS:
        raise TiedKernelsError(f"tiedkernels: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction == "none":
        raise TiedKernelsError("tiedkernels: num_items_in_batch divides a summed loss; it has no meaning with "
                               "reduction='none'")
    if objective is not None and not callable(objective):
        raise TypeError(f"tiedkernels: objective must be callable, got {type(objective).__name__}")
    tkf.check_num_items(num_items_in_batch, weight.device if isinstance(weight, torch.Tensor) else None)
    call = prepare(hidden, weight, labels, bias=bias, logit_scale=logit_scale, temperature=temperature,
                   softcap=softcap, ignore_index=ignore_index, shift=shift, chunk_size=chunk_size, backend=backend)
    _no_transforms(call.h2, call.weight, call.bias)
    thr = tkf.grad_filter_value(grad_filter, call.h2.dtype)
    cs = _consts(consts, labels, shift)
    w = per_token(token_weight, "token_weight", labels, shift, call.sdt)
    obj = objective if objective is not None else _neg_log_probs
    denom = _denominator(call.keep, reduction, num_items_in_batch, call.sdt)
    want = (call.h2.requires_grad, call.weight.requires_grad, call.bias is not None and call.bias.requires_grad)
    fused = (reduction != "none" and torch.is_grad_enabled() and any(want)
             and not torch.compiler.is_compiling())
    with tkf.no_autocast(call.weight.device):
        if fused:
            wd = w if denom is None else (w / denom if w is not None else
                                          (1.0 / denom).expand(call.y.shape))
            ev = _Evaluator(obj, cs, wd, call.keep, call.sdt)
            loss, logp, ent, lse = _FusedObjective.apply(call.h2, call.weight, call.bias, call, ev, want, thr)
        elif not torch.is_grad_enabled() or not any(want):
            with torch.no_grad():
                logp, ent, lse, _ = _token_pass.run(call.logits, call.y, call.keep, call.chunk)
                ev = _Evaluator(obj, cs, w, call.keep, call.sdt)
                total, vals, _ = ev.values(0, call.y.shape[0], logp, ent, False)
            loss = _reduce(total, vals, reduction, denom, call)
        else:
            lg = call.logits
            stats = _token_stats(call.h2, call.weight, call.bias, call.y, lg.row_scale, lg.inv_temp,
                                 call.ignore_index, lg.logit_scale, lg.softcap, call.chunk, thr)
            logp, ent, lse = stats[0], stats[1], stats[2]
            vals = _apply(obj, logp, ent, cs, w, call)
            loss = _reduce(vals.sum(), vals, reduction, denom, call)
    call.pending.finish()
    if not return_stats:
        return loss
    return ObjectiveOutput(loss, *(_view(t.detach(), call) for t in (logp, ent, lse)))


def _neg_log_probs(log_probs, entropy):
    return -log_probs


def _checked(val, like, where=""):
    """The objective's output: one floating value per token, else a clear error."""
    if not isinstance(val, torch.Tensor) or val.shape != like.shape:
        got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
        raise TiedKernelsError(f"tiedkernels: the objective must return one value per token (shape "
                               f"{tuple(like.shape)}{where}), got {got}")
    if not val.is_floating_point():
        raise TiedKernelsError(f"tiedkernels: the objective must return floating values, got {val.dtype}")
    return val


def _apply(obj, logp, ent, cs, w, call):
    """The objective on the whole batch (differentiable), 0 at ignored tokens, times the weights."""
    val = _checked(obj(logp, ent, **cs), logp)
    val = torch.where(call.keep, val.to(call.sdt), torch.zeros((), dtype=call.sdt, device=val.device))
    return val * w if w is not None else val


def _reduce(total, vals, reduction, denom, call):
    if reduction == "none":
        return _view(vals, call)
    return total / denom if denom is not None else total


# ---------------------------------------------------------------------------------------
# GRPO and its relatives, as TRL 1.16's GRPOTrainer computes them


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


class GRPOOutput(NamedTuple):
    """``grpo_loss``: the loss, the per-token log-probs and entropy it used (detached, ``[B, T]``), and
    the statistics TRL's GRPOTrainer logs (0-dim tensors, means over the masked tokens)."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict


class _GRPO(NamedTuple):
    loss_type: str
    eps_low: float
    eps_high: float
    delta: Optional[float]
    beta: float
    bias_correction_kl: bool
    sapo_pos: float
    sapo_neg: float


def _grpo_ratio_terms(lp, old, cfg):
    """coef_1 (the ratio, clamped by ``delta`` where TRL clamps it) and the clipped coef_2."""
    coef_1 = torch.exp(lp - (lp.detach() if old is None else old))
    coef_2 = torch.clamp(coef_1, 1 - cfg.eps_low, 1 + cfg.eps_high)
    if cfg.delta is not None and cfg.loss_type not in ("cispo", "sapo"):
        coef_1 = torch.clamp(coef_1, max=cfg.delta)
    return coef_1, coef_2


def _grpo_policy(lp, adv, old, ref, isr, cfg, log_iw=None):
    """TRL's per-token loss (before masking and normalisation) and its k3 KL term (or None).
    ``log_iw``: a sequence-level log importance weight that replaces the token's own log-ratio."""
    ratio = torch.exp(log_iw) if log_iw is not None else torch.exp(lp - (lp.detach() if old is None else old))
    kl = None
    if cfg.beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        if cfg.bias_correction_kl:
            kl = kl * ratio
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cfg.eps_high).detach() * adv * lp
    elif cfg.loss_type == "sapo":
        temps = torch.where(adv > 0, cfg.sapo_pos, cfg.sapo_neg)
        loss = -(torch.sigmoid(temps * (ratio - 1)) * 4 / temps) * adv
    else:
        coef_2 = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
        coef_1 = torch.clamp(ratio, max=cfg.delta) if cfg.delta is not None else ratio
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if isr is not None:
        loss = loss * isr
    if kl is not None:
        loss = loss + cfg.beta * kl
    return loss, kl, ratio


def _grpo_weights(mask, loss_type, max_completion_length, num_items_in_batch, sdt):
    """Per-token weights [B, T] that turn TRL's normalisation of each loss type into a weighted sum."""
    m = mask.to(sdt)
    b, t = m.shape
    if loss_type in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * max(b, 1))
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (max(b, 1) * (max_completion_length if max_completion_length is not None else t))
    if loss_type == "luspo":
        return m / max(b, 1)
    if num_items_in_batch is None:  # dapo, cispo: the caller's global token count, else this batch's
        return m / m.sum().clamp(min=1.0)
    return m / torch.as_tensor(num_items_in_batch).to(device=m.device, dtype=sdt).reshape(()).clamp(min=1.0)


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _high_entropy_mask(ent, mask, quantile):
    """TRL's ``get_high_entropy_mask`` on one process: tokens whose entropy reaches the quantile."""
    local = ent[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(ent, dtype=torch.bool)
    thr = torch.quantile(local, quantile)
    return ((ent * mask.float()) >= thr) & mask.bool()


def grpo_loss(hidden, weight, completion_ids, advantages, *, completion_mask=None, old_log_probs=None,
              ref_log_probs=None, loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0,
              use_bias_correction_kl=False, importance_sampling_level="token", importance_sampling_ratio=None,
              entropy_coef=0.0, top_entropy_quantile=1.0, max_completion_length=None, num_items_in_batch=None,
              sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=None, bias=None, logit_scale=1.0,
              softcap=None, chunk_size=None, backend="auto", grad_filter=None):
    """TRL 1.16 GRPOTrainer's loss on the fused head: ``hidden [B, T, D]`` are the states that predict the
    completion tokens ``completion_ids [B, T]`` (TRL's ``logits_to_keep`` positions).

    ``advantages`` ``[B]`` or ``[B, T]``; ``completion_mask`` ``[B, T]`` (1 for scored tokens; default all);
    ``old_log_probs`` (default: the current ones, detached: ratio 1), ``ref_log_probs`` (needed when ``beta``
    is not 0), ``importance_sampling_ratio`` (vLLM's correction, per token or sequence) are constants.
    ``loss_type`` one of ``GRPO_LOSS_TYPES``, normalised as TRL does (``dapo``/``cispo`` by
    ``num_items_in_batch``, default this batch's token count; ``dr_grpo`` by ``B · max_completion_length``,
    default ``T``). ``epsilon``/``epsilon_high`` clip the ratio (``epsilon_high`` is the CISPO cap there),
    ``delta`` caps it (two-sided clipping); ``beta`` weighs the k3 KL estimate against the reference;
    ``entropy_coef`` subtracts that multiple of the masked mean entropy (the bonus, with its gradient).
    Gradient accumulation: divide the loss by the number of micro-batches as TRL does.

    Token-level importance sampling without an entropy quantile mask runs fused (the per-token loss is
    evaluated inside the pass, 6·N·D·V flops); ``importance_sampling_level="sequence"`` (GSPO) and
    ``top_entropy_quantile < 1`` need every token's log-prob or entropy first and take the recompute path.
    Returns ``GRPOOutput(loss, log_probs, entropy, metrics)``; ``metrics`` holds TRL's ``entropy``,
    ``kl`` (when ``beta``) and, for the clipped types, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``. ``grad_filter``: the gradient filter of the underlying pass
    (``linear_token_objective``, or ``token_log_probs`` on the recompute path); the loss and metrics are exact.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise TiedKernelsError(f"tiedkernels: loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}"
                               + (" (vespo's sequence-level gamma weights are not fused; compute it on "
                                  "token_log_probs)" if loss_type == "vespo" else ""))
    if importance_sampling_level not in ("token", "sequence"):
        raise TiedKernelsError(f"tiedkernels: importance_sampling_level must be 'token' or 'sequence', got "
                               f"{importance_sampling_level!r}")
    if completion_ids.dim() != 2 or hidden.dim() != 3:
        raise TiedKernelsError(f"tiedkernels: grpo_loss takes hidden [B, T, D] and completion_ids [B, T], got "
                               f"{tuple(hidden.shape)} and {tuple(completion_ids.shape)}")
    if beta != 0.0 and ref_log_probs is None:
        raise TiedKernelsError("tiedkernels: beta != 0 needs ref_log_probs (the reference model's per-token log-probs)")
    if not 0.0 < float(top_entropy_quantile) <= 1.0:
        raise TiedKernelsError(f"tiedkernels: top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    cfg = _GRPO(loss_type, float(epsilon), float(epsilon if epsilon_high is None else epsilon_high),
                None if delta is None else float(delta), float(beta), bool(use_bias_correction_kl),
                float(sapo_temperature_pos), float(sapo_temperature_neg))
    b, t = completion_ids.shape
    sdt = _token_pass.stat_dtype(hidden.dtype)
    dev = completion_ids.device
    mask = torch.ones((b, t), dtype=sdt, device=dev) if completion_mask is None else completion_mask
    if mask.shape != (b, t):
        raise TiedKernelsError(f"tiedkernels: completion_mask has shape {tuple(mask.shape)}, completion_ids "
                               f"{(b, t)}")
    tkf.check_device(mask, "completion_mask", completion_ids, "completion_ids")
    mask = mask.detach().to(sdt)
    adv = advantages.unsqueeze(1) if isinstance(advantages, torch.Tensor) and advantages.dim() == 1 else advantages
    labels = torch.where(mask != 0, completion_ids, torch.full_like(completion_ids, -100))
    wts = _grpo_weights(mask, loss_type, max_completion_length, num_items_in_batch, sdt)
    n_tok = mask.sum().clamp(min=1.0)
    opts = dict(bias=bias, logit_scale=logit_scale, temperature=temperature, softcap=softcap, chunk_size=chunk_size,
                backend=backend, grad_filter=grad_filter)
    token_local = importance_sampling_level == "token" and float(top_entropy_quantile) >= 1.0
    if token_local:
        consts = {"adv": adv, "wts": wts, "ent_w": mask / n_tok}
        if old_log_probs is not None:
            consts["old"] = old_log_probs
        if ref_log_probs is not None and beta != 0.0:
            consts["ref"] = ref_log_probs
        if importance_sampling_ratio is not None:
            consts["isr"] = importance_sampling_ratio
        ecoef = float(entropy_coef)

        def objective(lp, ent, adv, wts, ent_w, old=None, ref=None, isr=None):
            loss, _, _ = _grpo_policy(lp, adv, old, ref, isr, cfg)
            out = loss * wts
            return out - ecoef * ent * ent_w if ecoef != 0.0 else out

        res = linear_token_objective(hidden, weight, labels, objective, consts=consts, reduction="sum",
                                     return_stats=True, **opts)
        loss, lp, ent = res.loss, res.log_probs, res.entropy
    else:
        tl = token_log_probs(hidden, weight, labels, **opts)
        lp_full, ent_full = tl.log_probs, tl.entropy
        emask = _high_entropy_mask(ent_full.detach(), mask, 1 - float(top_entropy_quantile)) \
            if float(top_entropy_quantile) < 1.0 else None
        log_iw = None
        if importance_sampling_level == "sequence":
            old_t = lp_full.detach() if old_log_probs is None else old_log_probs
            log_iw = ((lp_full - old_t) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        ptl, _, _ = _grpo_policy(lp_full, adv, old_log_probs, ref_log_probs, importance_sampling_ratio, cfg, log_iw)
        ptl = torch.where(mask != 0, ptl, torch.zeros((), dtype=ptl.dtype, device=ptl.device))
        if emask is not None:
            ptl = ptl * emask
        loss = (ptl * wts).sum()
        if float(entropy_coef) != 0.0:
            eff = mask if emask is None else mask * emask
            loss = loss - float(entropy_coef) * (ent_full * eff).sum() / eff.sum().clamp(min=1.0)
        lp, ent = lp_full.detach(), ent_full.detach()
    metrics = _grpo_metrics(lp, ent, mask, adv, old_log_probs, ref_log_probs, cfg, importance_sampling_level)
    return GRPOOutput(loss, lp, ent, metrics)


def _grpo_metrics(lp, ent, mask, adv, old, ref, cfg, level):
    """What TRL's GRPOTrainer logs from one micro-batch (one process)."""
    with torch.no_grad():
        out = {}
        old_t = lp if old is None else old
        log_ratio = lp - old_t
        if level == "sequence":
            log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        coef_1 = torch.exp(log_ratio)
        seq = level == "sequence"

        def gmean(x):
            if seq and x.shape[-1] == 1:
                return x.sum() / max(x.shape[0], 1)
            return _masked_mean(x, mask)

        if cfg.beta != 0.0:
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            if cfg.bias_correction_kl:
                kl = kl * coef_1
            out["kl"] = gmean(kl)
        out["entropy"] = _masked_mean(ent, mask)
        if cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            c1 = torch.clamp(coef_1, max=cfg.delta) if cfg.delta is not None else coef_1
            low = ((c1 < 1 - cfg.eps_low) & (adv < 0)).to(lp.dtype)
            high = ((c1 > 1 + cfg.eps_high) & (adv > 0)).to(lp.dtype)
            out["clip_ratio/low_mean"] = gmean(low)
            out["clip_ratio/high_mean"] = gmean(high)
            out["clip_ratio/region_mean"] = gmean(torch.maximum(low, high))
            if not (seq and low.shape[-1] == 1):
                lows = (low * mask).sum(-1) / mask.sum(-1)  # per sequence; NaN for an empty one
                highs = (high * mask).sum(-1) / mask.sum(-1)
                out["clip_ratio/low_min"] = _nan_extreme(lows, torch.min)
                out["clip_ratio/high_max"] = _nan_extreme(highs, torch.max)
            else:
                out["clip_ratio/low_min"] = _nan_extreme(low.squeeze(-1), torch.min)
                out["clip_ratio/high_max"] = _nan_extreme(high.squeeze(-1), torch.max)
        elif cfg.loss_type == "cispo":
            out["cispo_clip_ratio"] = gmean(((coef_1 > cfg.eps_high) & (adv > 0)).to(lp.dtype))
    return out


def _nan_extreme(x, fn):
    """TRL's nanmin / nanmax: the extreme of the non-NaN entries, NaN when there are none."""
    x = x[~torch.isnan(x)]
    return fn(x) if x.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
