"""The differentiable path: the three jobs in plain PyTorch ops, for the autograd modes the fused
kernels do not serve.

The fused ops compute exact first derivatives for an ordinary ``backward()``, and nothing more:
their outputs carry no graph of their own derivatives and no tangent. So

* under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``,
  ``hessian``, ``functional_call`` inside them) and under forward-mode AD
  (``torch.autograd.forward_ad``), ``mode()`` names the mode and the public functions call
  ``embedding``/``logits``/``linear_cross_entropy`` here instead of the fused op;
* inside the fused ops' backward, when it builds a graph (``create_graph=True``: a gradient
  penalty, a Hessian-vector product, ``gradgradcheck``) or runs under ``vmap`` (``is_grads_batched``),
  ``ops.py`` takes the gradients from ``lce_grads``/``logits_grads``/``embedding_grad`` here,
  written in differentiable ops, from the tensors the forward saved.

``grad_filter`` (the kernels' approximation of their dh and dW GEMMs) does not apply here: every
gradient this path gives is the exact derivative (a double backward of a filtered loss, a
``torch.func`` transform, forward-mode AD). The filter only ever changes the first derivative of
an ordinary ``backward()``.

The loss works in row chunks, as the kernels do. ``_LCE`` is an ``autograd.Function`` (with
``setup_context``, a ``jvp`` and a generated vmap rule, so every ``torch.func`` transform
composes with it) that saves only its inputs: its backward and its jvp recompute a chunk's
logits at a time, so a first derivative in any mode never holds more than one chunk's ``[C, V]``.
Higher derivatives are differentiable through the same chunked formulas; outside ``torch.func``
each chunk runs under ``torch.utils.checkpoint`` so the graph keeps only its inputs. (Under
``torch.func`` saved-tensor hooks are unavailable, so a derivative of a derivative there keeps
the chunks' softmax, as plain PyTorch would.)
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _fwad

from . import _index_check
from ._torch_backend import _transform  # softcap((z) * scale): the same elementwise steps
from ._torch_backend import check_index_range


def _functorch_level():
    try:
        return torch._C._functorch.maybe_current_level()
    except AttributeError:  # pragma: no cover (older torch)
        return None


def _wrapped(t):
    return t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)


def mode(*tensors):
    """The autograd mode that needs this path (``"torch.func"``, ``"forward-mode AD"``), or None on
    the ordinary path. Costs a few attribute reads: no device work, no sync."""
    if torch.compiler.is_compiling():
        return None
    if _functorch_level() is not None:
        return "torch.func"
    if getattr(_fwad, "_current_level", 0) >= 0:
        for t in tensors:
            if t is not None and _fwad.unpack_dual(t).tangent is not None:
                return "forward-mode AD"
    return None


def _differentiated(t):
    """t is differentiated: it requires grad, is tracked by a torch.func grad/jvp level, or carries a
    forward-mode tangent."""
    if t.requires_grad or torch._C._functorch.is_gradtrackingtensor(t):
        return True
    return getattr(_fwad, "_current_level", 0) >= 0 and _fwad.unpack_dual(t).tangent is not None


def in_functorch():
    return not torch.compiler.is_compiling() and _functorch_level() is not None


def batched(t):
    """t is batched by vmap (torch.func's, or the legacy one behind ``is_grads_batched=True``)."""
    f = torch._C._functorch
    return t is not None and (f.is_batchedtensor(t) or f.is_legacy_batchedtensor(t))


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_range(x, n, what, ignore_index=None):
    """The same IndexError as the fused ops, as ``(pending, bad)`` of the torch backend's
    ``check_index_range``: ``bad`` is the flat device mask on CUDA (the caller keeps its reads in
    bounds with it and marks those entries with NaN, then calls ``pending.finish()``), None on the
    CPU, which raised already.  Skipped for a batched/wrapped index tensor (its values cannot be
    read inside a transform), where the gather itself refuses an index out of range."""
    if _wrapped(x) or x.numel() == 0:
        return _index_check._DONE, None
    return check_index_range(x, n, what, ignore_index)


# ---------------------------------------------------------------------------------------
# embedding


def embedding(weight, ids, padding_idx):
    pending, bad = _check_range(ids, weight.shape[0], "id")
    if bad is None:
        return F.embedding(ids.long(), weight, padding_idx=padding_idx)
    if weight.shape[0] == 0:  # every id is bad
        out = weight.new_full((*ids.shape, weight.shape[1]), float("nan"))
    else:  # a bad id reads row 0 and yields a NaN row
        bad = bad.view(ids.shape)
        out = F.embedding(torch.where(bad, 0, ids.long()), weight, padding_idx=padding_idx)
        out = torch.where(bad.unsqueeze(-1), float("nan"), out)
    pending.finish()
    return out


def embedding_grad(grad, ids, num_weights, padding_idx):
    """The embedding's weight gradient, differentiable in ``grad`` (index_add of its rows)."""
    idx = ids.reshape(-1).long()
    g = grad.reshape(idx.shape[0], grad.shape[-1])
    if padding_idx is not None:
        g = g * (idx != padding_idx).unsqueeze(1).to(g.dtype)
    return g.new_zeros((num_weights, g.shape[1])).index_add(0, idx, g)


# ---------------------------------------------------------------------------------------
# logits


def logits(hidden, weight, bias, logit_scale, softcap):
    z = F.linear(hidden, weight, bias)
    if logit_scale == 1.0 and softcap <= 0:
        return z
    return _transform(z.to(_stat_dtype(z.dtype)), logit_scale, softcap).to(z.dtype)


def logits_grads(grad, hidden, weight, bias, logit_scale, softcap, want):
    """(dh, dW, db) of ``logits`` for the incoming ``grad``, differentiable in every input."""
    v, d = weight.shape
    dz = grad.reshape(-1, v)
    h2 = hidden.reshape(-1, d)
    if logit_scale != 1.0 or softcap > 0:
        dzf = dz.to(_stat_dtype(dz.dtype)) * logit_scale
        if softcap > 0:
            raw = F.linear(h2, weight, bias).to(dzf.dtype) * logit_scale
            t = torch.tanh(raw / softcap)
            dzf = dzf * (1 - t * t)
        dz = dzf.to(grad.dtype)
    dh = (dz @ weight).reshape(hidden.shape) if want[0] else None
    dw = dz.t() @ h2 if want[1] else None
    db = dz.sum(0, dtype=_stat_dtype(dz.dtype)).to(dz.dtype) if (want[2] and bias is not None) else None
    return dh, dw, db


# ---------------------------------------------------------------------------------------
# fused linear + cross-entropy


class Opts(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    logit_scale: float
    vocab_start: int
    vocab_total: int
    chunk_size: int


def _vocab(o, v):
    total = o.vocab_total if o.vocab_total > 0 else o.vocab_start + v
    return total, max(0, min(v, total - o.vocab_start))


def _chunk_logits(hc, weight, bias, o, sdt):
    """The chunk's final logits (fp32/fp64), and the raw product's derivative factor for the chain
    rule (None when it is the constant logit_scale)."""
    z = F.linear(hc, weight, bias).to(sdt)
    if o.logit_scale != 1.0:
        z = z * o.logit_scale
    factor = None
    if o.softcap > 0:
        t = torch.tanh(z / o.softcap)
        z = t * o.softcap
        factor = 1 - t * t
    v = weight.shape[0]
    _, valid = _vocab(o, v)
    if valid < v:  # columns past the vocabulary (a padded shard) do not exist
        cols = torch.arange(v, device=z.device) >= valid
        z = z.masked_fill(cols, float("-inf"))
    return z, factor


def _targets(y, o, v):
    _, valid = _vocab(o, v)
    ignored = y == o.ignore_index
    local = y.long() - o.vocab_start
    has_t = ~ignored & (local >= 0) & (local < valid)
    local = torch.where(has_t, local, torch.zeros_like(local))
    return ignored, has_t, local


class _Classes(NamedTuple):
    """Class weights as one chunk needs them: c[y] per token, this shard's columns, their global sum."""

    cy: torch.Tensor  # [C]: c[y] (0 at ignored tokens), or None without class weights
    local: torch.Tensor  # [V_local]: c_j of this shard's columns (0 past the vocabulary), or None
    total: object  # sum_j c_j over the whole vocabulary (vocab_total without class weights)


def _classes(class_weight, y, ignored, o, v, sdt):
    total, valid = _vocab(o, v)
    if class_weight is None:
        return _Classes(None, None, total)
    cw = class_weight.to(sdt)
    safe = torch.where(ignored, torch.zeros_like(y), y).long()
    cy = torch.where(ignored, torch.zeros((), dtype=sdt, device=cw.device), cw[safe])
    local = cw[o.vocab_start:o.vocab_start + valid]
    if valid < v:
        local = torch.cat([local, local.new_zeros((v - valid,))])
    return _Classes(cy, local, cw.sum())


def _weighted_sum(f, c, valid):
    """sum_j c_j f_j over the real columns (c_j = 1 without class weights)."""
    return (f[:, :valid] * c.local[:valid]).sum(1) if c.local is not None else f[:, :valid].sum(1)


def _tok_loss(f, lse, y, o, class_weight):
    """Per-token loss of one chunk (0 at ignored tokens) from its final logits and lse:
    c[y]((1-eps)(lse - z_y) + lam lse^2) + (eps/V)(S lse - sum_j c_j z_j), as the kernels."""
    v = f.shape[1]
    total, valid = _vocab(o, v)
    ignored, has_t, local = _targets(y, o, v)
    c = _classes(class_weight, y, ignored, o, v, f.dtype)
    eps = o.label_smoothing
    zero = torch.zeros_like(lse)
    zy = torch.where(has_t, f.gather(1, local[:, None]).squeeze(1), zero) if v else zero
    from ._torch_backend import cross_entropy_lse

    ce_lse = cross_entropy_lse(lse)  # NaN on a row holding +inf, as PyTorch's cross_entropy
    tok = (1 - eps) * (ce_lse - zy) if eps != 1.0 else zero
    if o.z_loss != 0.0:
        tok = tok + o.z_loss * lse * lse
    if c.cy is not None:
        tok = c.cy * tok
    if eps != 0.0:  # skipped when 0: a -inf logit must not give 0 * inf
        tok = tok + (eps / total) * (c.total * ce_lse - _weighted_sum(f, c, valid))
    return torch.where(ignored, zero, tok)


def _rows(g, start, rows, dtype):
    if g is None:
        return None
    g = g.to(dtype)
    return g.expand(rows).clone() if g.dim() == 0 else g[start:start + rows]


def _chunk_grads(hc, weight, bias, y, g, g_lse, class_weight, o, want):
    """(dh_c, dW_c, db_c) of one chunk for per-token incoming gradients g (loss) and g_lse (lse):
    plain differentiable ops, so the result can itself be differentiated."""
    sdt = _stat_dtype(hc.dtype)
    v = weight.shape[0]
    total, valid = _vocab(o, v)
    f, factor = _chunk_logits(hc, weight, bias, o, sdt)
    lse = torch.logsumexp(f, dim=1)
    p = torch.exp(f - lse[:, None])
    coef, dz = None, None
    if g is not None:
        ignored, has_t, local = _targets(y, o, v)
        c = _classes(class_weight, y, ignored, o, v, sdt)
        g = torch.where(ignored, torch.zeros_like(g), g)
        gy = g * c.cy if c.cy is not None else g
        eps = o.label_smoothing
        coef = gy * (1 - eps)
        if o.z_loss != 0.0:
            coef = coef + gy * (2 * o.z_loss) * lse
        if eps != 0.0:
            coef = coef + g * (eps / total) * c.total
    if g_lse is not None:
        coef = g_lse if coef is None else coef + g_lse
    if coef is None:
        return None, None, None
    dz = coef[:, None] * p
    if g is not None:
        if eps != 0.0:
            smooth = (g * (eps / total))[:, None]
            dz = dz - (smooth * c.local[None, :] if c.local is not None else smooth)
        if v:
            hit = torch.where(has_t, gy * (1 - eps), torch.zeros_like(g))
            dz = dz.scatter_add(1, local[:, None], -hit[:, None])
    if factor is not None:
        dz = dz * factor
    if o.logit_scale != 1.0:
        dz = dz * o.logit_scale
    if valid < v:
        dz = dz.masked_fill(torch.arange(v, device=dz.device) >= valid, 0.0)
    dz = dz.to(hc.dtype)
    dh = dz @ weight if want[0] else None
    dw = dz.t().to(sdt) @ hc.to(sdt) if want[1] else None
    db = dz.sum(0, dtype=sdt) if (want[2] and bias is not None) else None
    return dh, dw, db


class _Static:
    """Non-tensor arguments of a Function, as one opaque leaf (a tuple would be flattened by the
    generated vmap rule's pytree handling)."""

    __slots__ = ("o", "want")

    def __init__(self, o, want=None):
        self.o, self.want = o, want


class _ChunkGrads(torch.autograd.Function):
    """One chunk's (dh_c, dW_c, db_c), saving only its inputs: differentiating it recomputes the
    chunk (``torch.func.vjp``/``jvp`` of ``_chunk_grads``). This is checkpointing that works inside
    ``torch.func`` transforms too, where saved-tensor hooks (``torch.utils.checkpoint``) are not
    allowed and every backward builds a graph: a gradient never holds more than one chunk's softmax."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hc, weight, bias, y, g, g_lse, class_weight, static):
        return _chunk_grads(hc, weight, bias, y, g, g_lse, class_weight, static.o, static.want)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.save_for_forward(*inputs[:7])
        ctx.static = inputs[7]
        ctx.set_materialize_grads(False)

    @staticmethod
    def _diff(ctx):
        """The chunk's gradients as a function of its differentiable inputs, and those inputs."""
        hc, weight, bias, y, g, g_lse, class_weight = ctx.saved_tensors
        o, want = ctx.static.o, ctx.static.want
        keys = [i for i, t in enumerate((hc, weight, bias, None, g, g_lse)) if t is not None]
        full = [hc, weight, bias, y, g, g_lse]

        def fn(*xs):
            args = list(full)
            for i, x in zip(keys, xs):
                args[i] = x
            out = _chunk_grads(*args, class_weight, o, want)
            return tuple(t if t is not None else args[0].new_zeros(()) for t in out)

        # (contiguous: functorch's duals refuse an expanded primal, e.g. the incoming gradient of a sum)
        return fn, keys, [full[i].contiguous() for i in keys]

    @staticmethod
    def backward(ctx, *cotangents):
        fn, keys, xs = _ChunkGrads._diff(ctx)
        outs, vjp_fn = torch.func.vjp(fn, *xs)
        cot = tuple(c if c is not None else torch.zeros_like(t) for c, t in zip(cotangents, outs))
        grads = [None] * 8
        for i, gr in zip(keys, vjp_fn(cot)):
            grads[i] = gr
        return tuple(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        fn, keys, xs = _ChunkGrads._diff(ctx)
        tans = [tangents[i].contiguous() if tangents[i] is not None else torch.zeros_like(x)
                for i, x in zip(keys, xs)]
        _, out_t = torch.func.jvp(fn, tuple(xs), tuple(tans))
        return out_t


def lce_grads(hidden, weight, bias, labels, g, g_lse, o, want, class_weight=None):
    """(dh, dW, db) of the fused loss for the incoming gradients ``g`` (0-dim or [N], of the
    per-token loss; or None) and ``g_lse`` ([N] or None, of lse), chunk by chunk, differentiable in
    every input. Each chunk is a ``_ChunkGrads``: a graph built through these gradients
    (``create_graph=True``, ``torch.func``) keeps each chunk's inputs, not its softmax."""
    n, d = hidden.shape
    sdt = _stat_dtype(hidden.dtype)
    want = (bool(want[0]), bool(want[1]), bool(want[2]) and bias is not None)
    chunk = max(1, int(o.chunk_size))
    dhs, dw, db = [], None, None
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        dh_c, dw_c, db_c = _ChunkGrads.apply(hidden[start:start + rows], weight, bias, labels[start:start + rows],
                                             _rows(g, start, rows, sdt), _rows(g_lse, start, rows, sdt),
                                             class_weight, _Static(o, want))
        if want[0]:
            dhs.append(dh_c if dh_c is not None else hidden.new_zeros((rows, d)))
        if want[1] and dw_c is not None:
            dw = dw_c if dw is None else dw + dw_c
        if want[2] and db_c is not None:
            db = db_c if db is None else db + db_c
    dh = (torch.cat(dhs) if dhs else hidden.new_zeros((0, d))) if want[0] else None
    if want[1]:
        dw = weight.new_zeros(weight.shape) if dw is None else dw.to(weight.dtype)
    if want[2]:
        db = bias.new_zeros(bias.shape) if db is None else db.to(bias.dtype)
    return dh, dw, db


def _forward(hidden, weight, bias, labels, class_weight, o, stats=False):
    """(per-token loss, lse), and with ``stats`` the predicted token (argmax, first index on ties,
    global) and the entropy of the softmax, as the kernels' ``return_stats``."""
    sdt = _stat_dtype(hidden.dtype)
    outs = ([], [], [], [])
    chunk = max(1, int(o.chunk_size))
    for start in range(0, hidden.shape[0], chunk):
        hc, y = hidden[start:start + chunk], labels[start:start + chunk]
        f, _ = _chunk_logits(hc, weight, bias, o, sdt)
        lse = torch.logsumexp(f, dim=1)
        outs[0].append(_tok_loss(f, lse, y, o, class_weight))
        outs[1].append(lse)
        if stats:
            p = torch.exp(f - lse[:, None])
            pz = torch.where(p == 0, torch.zeros((), dtype=sdt, device=f.device), p * f)  # 0 at z = -inf; NaN stays
            outs[2].append(torch.argmax(f, dim=1) + o.vocab_start)
            outs[3].append(lse - pz.sum(1))
    if not outs[0]:
        empty = hidden.new_zeros((0,), dtype=sdt)
        res = (empty, empty.clone(), hidden.new_zeros((0,), dtype=torch.long), empty.clone())
    else:
        res = tuple(torch.cat(x) for x in outs if x)
    return res if stats else res[:2]


def _tangents(hidden, weight, bias, labels, class_weight, th, tw, tb, o):
    """Tangents of (per-token loss, lse) for the input tangents th, tw, tb (any may be None)."""
    sdt = _stat_dtype(hidden.dtype)
    v = weight.shape[0]
    total, valid = _vocab(o, v)
    eps = o.label_smoothing
    t_toks, t_lses = [], []
    chunk = max(1, int(o.chunk_size))
    for start in range(0, hidden.shape[0], chunk):
        hc, y = hidden[start:start + chunk], labels[start:start + chunk]
        f, factor = _chunk_logits(hc, weight, bias, o, sdt)
        lse = torch.logsumexp(f, dim=1)
        p = torch.exp(f - lse[:, None])
        tz = None  # tangent of the raw product h W^T + b
        for part in (F.linear(th[start:start + chunk], weight) if th is not None else None,
                     F.linear(hc, tw) if tw is not None else None,
                     tb.expand(hc.shape[0], v) if tb is not None else None):
            if part is not None:
                tz = part if tz is None else tz + part
        tf = tz.to(sdt) if tz is not None else f.new_zeros(f.shape)
        if o.logit_scale != 1.0:
            tf = tf * o.logit_scale
        if factor is not None:
            tf = tf * factor
        if valid < v:
            tf = tf.masked_fill(torch.arange(v, device=tf.device) >= valid, 0.0)
        t_lse = (p * tf).sum(1)
        ignored, has_t, local = _targets(y, o, v)
        c = _classes(class_weight, y, ignored, o, v, sdt)
        zero = torch.zeros_like(t_lse)
        tfy = torch.where(has_t, tf.gather(1, local[:, None]).squeeze(1), zero) if v else zero
        t_tok = (1 - eps) * (t_lse - tfy)
        if o.z_loss != 0.0:
            t_tok = t_tok + 2 * o.z_loss * lse * t_lse
        if c.cy is not None:
            t_tok = c.cy * t_tok
        if eps != 0.0:
            t_tok = t_tok + (eps / total) * (c.total * t_lse - _weighted_sum(tf, c, valid))
        t_toks.append(torch.where(ignored, zero, t_tok))
        t_lses.append(t_lse)
    if not t_toks:
        empty = hidden.new_zeros((0,), dtype=sdt)
        return empty, empty.clone()
    return torch.cat(t_toks), torch.cat(t_lses)


class _LCE(torch.autograd.Function):
    """(per-token loss [N], lse [N]) of the fused loss, in plain ops, saving only its inputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden, weight, bias, labels, class_weight, static):
        return _forward(hidden, weight, bias, labels, class_weight, static.o, static.want)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, class_weight, static = inputs
        ctx.o, ctx.stats = static.o, static.want
        if static.want:
            ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(hidden, weight, bias, labels, class_weight)
        ctx.save_for_forward(hidden, weight, bias, labels, class_weight)

    @staticmethod
    def backward(ctx, g_tok, g_lse, *_stats):
        hidden, weight, bias, labels, class_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, dw, db = lce_grads(hidden, weight, bias, labels, g_tok, g_lse, ctx.o, need[:3], class_weight)
        return dh, dw, db, None, None, None

    @staticmethod
    def jvp(ctx, th, tw, tb, _t_labels, t_cw, _t_opts):
        hidden, weight, bias, labels, class_weight = ctx.saved_tensors  # (linear_cross_entropy refused a t_cw)
        t_tok, t_lse = _tangents(hidden, weight, bias, labels, class_weight, th, tw, tb if bias is not None else None,
                                 ctx.o)
        return (t_tok, t_lse, None, torch.zeros_like(t_lse)) if ctx.stats else (t_tok, t_lse)


NO_CLASS_WEIGHT_GRAD = ("tiedkernels: class_weight gets no derivative (the loss is differentiated in hidden, "
                         "weight and bias only); pass class weights that do not require grad and carry no tangent")


def linear_cross_entropy(hidden, weight, bias, labels, opts, class_weight=None, return_stats=False):
    """(per-token loss [N], lse [N]) for hidden [N, D], labels [N] and the fused op's options
    (ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk);
    with ``return_stats`` also the predicted tokens and the entropies (no derivative), as ``lce_fwd``."""
    o = Opts(*opts)
    total, _ = _vocab(o, weight.shape[0])
    if class_weight is not None and _differentiated(class_weight):
        raise NotImplementedError(NO_CLASS_WEIGHT_GRAD)
    pending, bad = _check_range(labels, total, "label", o.ignore_index)
    if bad is not None:  # CUDA: a bad label reads c[0] and its token gets a NaN loss, lse and gradient
        hidden = torch.where(bad.view(labels.shape).unsqueeze(1), float("nan"), hidden)
        labels = torch.where(bad.view(labels.shape), 0, labels)
    out = _LCE.apply(hidden, weight, bias, labels, class_weight, _Static(o, bool(return_stats)))
    pending.finish()
    return out
