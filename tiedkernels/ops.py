"""Fake kernels and autograd for every backend's ops.

The compiled ops (``tiedkernels::<name>``) and the Python-defined ones
(``tiedkernels::<prefix><name>``) share these registrations, so every backend behaves
the same under autograd, ``torch.compile`` and ``torch.library.opcheck``.
"""

import torch

from . import _composite, _ext
from . import _torch_backend  # noqa: F401  (defines the torch_* ops)


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# fake kernels (shapes and dtypes only)


def _embedding_fwd_fake(weight, ids, padding_idx):
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _embedding_bwd_fake(grad, ids, num_weights, padding_idx):
    return grad.new_empty((num_weights, grad.shape[-1]))


def _embedding_bwd_acc_fake(grad_weight, grad, ids, padding_idx):
    return None


def _logits_fwd_fake(hidden, weight, bias, logit_scale, softcap):
    torch._check(hidden.shape[-1] == weight.shape[1])
    return hidden.new_empty((*hidden.shape[:-1], weight.shape[0]))


def _logits_bwd_fake(grad, logits, hidden, weight, bias, logit_scale, softcap, compute_dh, compute_dw, compute_db):
    dh = hidden.new_empty(hidden.shape) if compute_dh else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if compute_dw else weight.new_empty((0,))
    db = weight.new_empty((weight.shape[0],)) if (compute_db and bias is not None) else weight.new_empty((0,))
    return dh, dw, db


def _grad_outputs_fake(hidden, weight, want_dh, want_dw, want_db):
    dh = hidden.new_empty(hidden.shape) if want_dh else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if want_dw else weight.new_empty((0,))
    db = weight.new_empty((weight.shape[0],)) if want_db else weight.new_empty((0,))
    return dh, dw, db


def _lce_fwd_fake(hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                  logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db,
                  class_weight=None, return_stats=False, grad_filter=0.0):
    torch._check(hidden.shape[1] == weight.shape[1])
    torch._check(labels.shape[0] == hidden.shape[0])
    sdt = _stat_dtype(hidden.dtype)
    n = hidden.shape[0]
    grads = grad_scale is not None and (compute_dh or compute_dw or compute_db)
    loss = hidden.new_empty((), dtype=sdt) if grad_scale is not None else hidden.new_empty((n,), dtype=sdt)
    lse = hidden.new_empty((n,), dtype=sdt)
    m = n if return_stats else 0
    stats = (hidden.new_empty((m,), dtype=torch.long), hidden.new_empty((m,), dtype=sdt))
    return (loss, lse) + _grad_outputs_fake(hidden, weight, grads and compute_dh, grads and compute_dw,
                                            grads and compute_db) + stats


def _lce_bwd_fake(grad_loss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss, softcap,
                  logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db,
                  class_weight=None, grad_lse=None, grad_filter=0.0):
    return _grad_outputs_fake(hidden, weight, compute_dh, compute_dw, compute_db)


def _lce_stats_fake(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, vocab_start, vocab_total,
                    chunk_size, class_weight=None):
    return hidden.new_empty((3, hidden.shape[0]), dtype=_stat_dtype(hidden.dtype))


_FAKES = {
    "embedding_fwd": _embedding_fwd_fake,
    "embedding_bwd": _embedding_bwd_fake,
    "embedding_bwd_acc_": _embedding_bwd_acc_fake,
    "logits_fwd": _logits_fwd_fake,
    "logits_bwd": _logits_bwd_fake,
    "lce_fwd": _lce_fwd_fake,
    "lce_bwd": _lce_bwd_fake,
    "lce_stats": _lce_stats_fake,
}


# ---------------------------------------------------------------------------------------
# autograd


def _is_one(g):
    """True only when it is free to know that g == 1 (a real CPU tensor, outside tracing)."""
    if torch.compiler.is_compiling() or g.device.type != "cpu" or g.numel() != 1:
        return False
    if isinstance(g, torch._subclasses.FakeTensor) or type(g) is not torch.Tensor:
        return False
    return bool(g == 1)


def _sole_owner(t):
    """True when no tensor but ``t`` sees its storage (the op's own outputs were dropped)."""
    try:
        # +1 for the temporary storage object made by the call itself
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2
    except Exception:
        return False


def _scaled(t, g):
    """t * g, in place when nobody else can observe t (the usual case: the public functions
    drop the op's gradient outputs), so the scaled gradient costs no second buffer."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or not _sole_owner(t):
        return t * g
    return t.mul_(g)


def _differentiable_backward(grad):
    """True when a backward must give gradients that can themselves be differentiated or batched: it
    runs with grad mode on (``create_graph=True``), inside a ``torch.func`` transform, or with an
    incoming gradient batched by vmap (``is_grads_batched=True``). The kernels' gradients carry no
    graph and take no batch, so these take the plain-op formulas of ``_composite`` instead. False
    under ``torch.compile``'s tracing (grad mode is off there) and on every ordinary backward: the
    fused path is untouched."""
    return torch.is_grad_enabled() or _composite.in_functorch() or _composite.batched(grad)


def _make_autograd(prefix):
    def op(name):
        return getattr(torch.ops.tiedkernels, prefix + name).default

    # embedding ---------------------------------------------------------------------------
    def emb_setup(ctx, inputs, output):
        weight, ids, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.num_weights = weight.shape[0]
        ctx.padding_idx = padding_idx

    def emb_backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[0]:
            if _differentiable_backward(grad):
                gw = _composite.embedding_grad(grad, ids, ctx.num_weights, ctx.padding_idx)
            else:
                gw = op("embedding_bwd")(grad, ids, ctx.num_weights, ctx.padding_idx)
        return gw, None, None

    # logits ------------------------------------------------------------------------------
    def logits_setup(ctx, inputs, output):
        hidden, weight, bias, logit_scale, softcap = inputs
        ctx.opts = (logit_scale, softcap)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, output if softcap > 0 else None)

    def logits_backward(ctx, grad):
        hidden, weight, bias, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _differentiable_backward(grad):
            dh, dw, db = _composite.logits_grads(grad, hidden, weight, bias, *ctx.opts,
                                                 (need[0], need[1], need[2] and ctx.has_bias))
        else:
            dh, dw, db = op("logits_bwd")(grad, out if out is not None else grad, hidden, weight, bias, *ctx.opts,
                                          need[0], need[1], need[2] and ctx.has_bias)
        return (dh if need[0] else None, dw if need[1] else None, db if (need[2] and ctx.has_bias) else None,
                None, None)

    # fused loss --------------------------------------------------------------------------
    # lse is differentiable where lce_bwd takes its incoming gradient (``grad_lse``)
    lse_grad = "grad_lse" in [a.name for a in op("lce_bwd")._schema.arguments]

    def lce_setup(ctx, inputs, output):
        (hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap, logit_scale,
         vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db) = inputs[:16]
        class_weight = inputs[16] if len(inputs) > 16 else None
        # the recompute backward honours the forward's gradient filter (a float; 0 exact)
        ctx.grad_filter = float(inputs[18]) if len(inputs) > 18 else 0.0
        ctx.n_inputs = len(inputs)
        loss, lse, dh, dw, db = output[:5]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*((dh, dw, db) if lse_grad else (lse, dh, dw, db)), *output[5:])
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start, vocab_total,
                    chunk_size)
        ctx.has_bias = bias is not None
        ctx.scalar = grad_scale is not None
        # Gradient-in-forward: keep the finished gradients (detached, so no reference cycle
        # through this node) until the first backward takes them.
        if grad_scale is not None and (compute_dh or compute_dw or compute_db):
            ctx.pre = tuple(t.detach() if flag else None
                            for t, flag in ((dh, compute_dh), (dw, compute_dw), (db, compute_db)))
        else:
            ctx.pre = None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, grad_scale, class_weight)

    def lce_backward(ctx, g_loss, g_lse=None, *unused):
        need = ctx.needs_input_grad
        want = (need[0], need[1], need[2] and ctx.has_bias)
        if len(need) > 16 and need[16]:
            raise NotImplementedError(_composite.NO_CLASS_WEIGHT_GRAD)
        none = (None,) * (ctx.n_inputs - 3)
        if (g_loss is None and g_lse is None) or not any(want):
            return (None, None, None) + none
        if _differentiable_backward(g_loss) or _differentiable_backward(g_lse):
            # The gradients as differentiable functions of the saved inputs (and of the incoming
            # gradients), chunk by chunk; the forward's finished gradients, constants, cannot serve.
            # Exact: the gradient filter (a first-order approximation of the kernels' GEMMs) is not
            # applied on this path.
            ctx.pre = None
            hidden, weight, bias, labels, lse, grad_scale, class_weight = ctx.saved_tensors
            g = None if g_loss is None else (g_loss * grad_scale if ctx.scalar else g_loss)
            grads = _composite.lce_grads(hidden, weight, bias, labels, g, g_lse, _composite.Opts(*ctx.opts), want,
                                         class_weight)
            return tuple(t if w else None for t, w in zip(grads, want)) + none
        pre, ctx.pre = ctx.pre, None
        if g_lse is None and pre is not None and all(p is not None for p, w in zip(pre, want) if w):
            if not _is_one(g_loss):
                pre = tuple(_scaled(p, g_loss) if p is not None else None for p in pre)
            return tuple(p if w else None for p, w in zip(pre, want)) + none
        # Recompute (reduction="none", a second backward after the first took the forward's
        # gradients, or an incoming gradient for lse, which the forward's gradients of the loss
        # alone cannot include): the tiles again, with the real incoming gradients.
        hidden, weight, bias, labels, lse, grad_scale, class_weight = ctx.saved_tensors
        if g_loss is None:
            g = lse.new_zeros(())
        else:
            g = g_loss * grad_scale if ctx.scalar else g_loss
        extra = {k: t for k, t in (("class_weight", class_weight), ("grad_lse", g_lse)) if t is not None}
        if ctx.grad_filter:
            extra["grad_filter"] = ctx.grad_filter
        try:
            dh, dw, db = op("lce_bwd")(g, hidden, weight, bias, labels, lse, *ctx.opts, *want, **extra)
        except NotImplementedError:
            if g_lse is None:
                raise
            # a backend without grad_lse yet: the same gradients from the chunked plain-op path
            dh, dw, db = _composite.lce_grads(hidden, weight, bias, labels, g, g_lse, _composite.Opts(*ctx.opts),
                                              want, class_weight)
        return tuple(t if w else None for t, w in zip((dh, dw, db), want)) + none

    torch.library.register_autograd(f"tiedkernels::{prefix}embedding_fwd", emb_backward, setup_context=emb_setup)
    torch.library.register_autograd(f"tiedkernels::{prefix}logits_fwd", logits_backward, setup_context=logits_setup)
    torch.library.register_autograd(f"tiedkernels::{prefix}lce_fwd", lce_backward, setup_context=lce_setup)


def _register(prefix):
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"tiedkernels::{prefix}{name}")(fake)
    _make_autograd(prefix)


_registered = set()


def register_prefix(prefix):
    """Fake kernels and autograd for one backend's ops (idempotent)."""
    if prefix in _registered:
        return
    _register(prefix)
    _registered.add(prefix)


register_prefix("torch_")
if _ext.load() is not None:
    register_prefix("")
