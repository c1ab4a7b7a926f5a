"""The public functions: embedding lookup, logits projection, fused linear + cross-entropy."""

import contextlib
import math
import numbers
import os
from typing import NamedTuple

import torch

from . import _composite, backends

_REDUCTIONS = ("none", "sum", "mean")
DEFAULT_CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 128
# The compiled CPU backend's fp32 training step: its GEMMs on 256-row chunks took 15-19% longer than on
# 384- or 512-row ones at D=512 (N=4096, V=50257; MKL, 2-core AVX2 EPYC, 5 interleaved rounds), the
# step 1.17x the three GEMMs against 1.02x; D/2 rows (half of dW) stays the rule from D=1024 up.
CPU_DW_CHUNK_ROWS = 512


class TiedKernelsError(ValueError, RuntimeError):
    """A bad argument: a shape, dtype, device or option value the ops cannot take.

    Both a ``ValueError`` and a ``RuntimeError``: code written against PyTorch (which raises
    ``RuntimeError`` for shape and device mismatches) and code catching ``ValueError`` both see it.
    Out-of-range ids and labels raise ``IndexError``, as ``F.embedding`` does on the CPU."""


def _is_int(t):
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _require_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tiedkernels: {name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}"
                        + (" (convert it with torch.as_tensor)" if hasattr(t, "__array__") else ""))


def check_device(t, name, weight, weight_name="weight"):
    """Every tensor argument lives on the weight's device (a tensor elsewhere, `meta` included, would
    let a kernel read memory that is not there)."""
    if t.device != weight.device:
        raise TiedKernelsError(f"tiedkernels: {name} is on {t.device} but {weight_name} is on {weight.device}; "
                               f"move {name} to {weight.device}")


def _zero3_partition(weight):
    """The full shape of a DeepSpeed ZeRO-3 parameter that is partitioned (not gathered) now, else None."""
    full = getattr(weight, "ds_shape", None)
    status = getattr(weight, "ds_status", None)
    if full is None or status is None or getattr(status, "name", "") != "NOT_AVAILABLE":
        return None
    return tuple(full)


def check_weight(weight, name="weight"):
    _require_tensor(weight, name)
    full = _zero3_partition(weight)
    if full is not None:
        raise TiedKernelsError(
            f"tiedkernels: {name} is a DeepSpeed ZeRO-3 partition (full shape {full}, here {tuple(weight.shape)}) "
            "that is not gathered: call the loss or logits inside the forward of the module that owns the "
            "parameter (tiedkernels.hf.patch does), or under deepspeed.zero.GatheredParameters")
    if weight.dim() != 2:
        kdim = (" (PyTorch's K-dimensional form, a weight [C, d1, ..., dK, D], is not supported: flatten the "
                "class dimensions into V)") if weight.dim() > 2 else ""
        raise TiedKernelsError(f"tiedkernels: {name} must be [V, D], got shape {tuple(weight.shape)}{kdim}")
    if not weight.is_floating_point():
        raise TiedKernelsError(f"tiedkernels: {name} must be floating point, got {weight.dtype}")


def check_hidden(hidden, weight, weight_name="weight"):
    _require_tensor(hidden, "hidden")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise TiedKernelsError(f"tiedkernels: hidden has shape {tuple(hidden.shape)} but {weight_name} "
                               f"{tuple(weight.shape)}: the last dimension of hidden must equal D")
    check_device(hidden, "hidden", weight, weight_name)
    if hidden.dtype != weight.dtype:
        raise TiedKernelsError(f"tiedkernels: hidden is {hidden.dtype} but {weight_name} is {weight.dtype}; "
                               "cast one of them")


def check_bias(bias, weight, weight_name="weight"):
    if bias is None:
        return
    _require_tensor(bias, "bias")
    check_device(bias, "bias", weight, weight_name)
    if bias.shape != (weight.shape[0],):
        raise TiedKernelsError(f"tiedkernels: bias has shape {tuple(bias.shape)} but {weight_name} "
                               f"{tuple(weight.shape)}: bias must be [V]")
    if bias.dtype != weight.dtype:
        raise TiedKernelsError(f"tiedkernels: bias is {bias.dtype} but {weight_name} is {weight.dtype}")


def check_index_dtype(t, name):
    _require_tensor(t, name)
    if not _is_int(t):
        soft = ("; probability (soft) targets, floating labels [*, V], are not supported: pass class indices"
                if name == "labels" and t.is_floating_point() else "")
        raise TiedKernelsError(f"tiedkernels: {name} must be an integer tensor (int64 or int32), got {t.dtype}{soft}")


def normalize_padding_idx(padding_idx, num_embeddings):
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise TiedKernelsError(f"tiedkernels: padding_idx {padding_idx} is outside [-V, V) for V={num_embeddings}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def chunk_rows(n, v, chunk_size=None, d=None, itemsize=4, dw=False):
    """Rows per chunk: ``chunk_size`` if given; else what fits ``TIEDKERNELS_CHUNK_BYTES`` of logits
    when that is set (or when ``d`` is not given: 32 MiB of fp32 logits); else a chunk whose logits take
    half the bytes of the fp32 dW accumulator (``D/2`` rows in fp32, ``D`` in bf16), which keeps the dW
    GEMM's inner dimension in the hundreds (its [V, D] output is read and written once per chunk).
    A low-precision call on the compiled CPU backend that computes dW takes one chunk when its logits
    cost no more than the fp32 accumulator that backend then does without; an fp32 (or fp64) one takes at least
    CPU_DW_CHUNK_ROWS rows when D >= CPU_DW_CHUNK_ROWS (logits at most the size of dW there). At least
    MIN_CHUNK_ROWS rows."""
    if chunk_size is not None:
        chunk_size = int(chunk_size)
        if chunk_size <= 0:
            raise TiedKernelsError(f"tiedkernels: chunk_size must be a positive number of rows, got {chunk_size}")
        return chunk_size
    env = os.environ.get("TIEDKERNELS_CHUNK_BYTES")
    if env is not None or d is None:
        budget = int(env) if env is not None else DEFAULT_CHUNK_BYTES
        rows = max(MIN_CHUNK_ROWS, budget // max(1, (itemsize if env is not None else 4) * v))
        return max(1, min(rows, n))
    rows = max(MIN_CHUNK_ROWS, (2 * d) // itemsize)
    if dw and itemsize >= 4 and d >= CPU_DW_CHUNK_ROWS:
        rows = max(rows, CPU_DW_CHUNK_ROWS)
    if dw and itemsize < 4 and n * itemsize <= rows * itemsize + 4 * d:
        rows = n
    return max(1, min(rows, n))


def embedding(ids, weight, *, padding_idx=None, backend="auto"):
    """``weight[ids]``: ids ``[*]`` (int64 or int32) -> ``[*, D]``. Rows at ``padding_idx`` get no gradient."""
    check_weight(weight)
    check_index_dtype(ids, "ids")
    check_device(ids, "ids", weight)
    pad = normalize_padding_idx(padding_idx, weight.shape[0])
    b = backends.resolve(backend, weight.device)
    if _composite.mode(weight) is not None:  # torch.func, forward-mode AD: the differentiable path
        return _composite.embedding(weight, ids, pad)
    return b.op("embedding_fwd")(weight, ids, pad)


def logits(hidden, weight, *, bias=None, logit_scale=1.0, softcap=None, backend="auto"):
    """``softcap((hidden @ weight.T + bias) * logit_scale)``: ``[*, D] -> [*, V]``."""
    check_weight(weight)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_hidden(hidden, weight)
    check_bias(bias, weight)
    cap = _softcap_value(softcap)
    if per_token_scale(logit_scale):
        return _logits_per_token_scale(hidden, weight, bias, logit_scale, cap, backend)
    scale = _logit_scale_value(logit_scale)
    b = backends.resolve(backend, weight.device)
    hidden2, weight2 = _nonempty_dim(hidden, weight)
    with no_autocast(weight.device):
        if _composite.mode(hidden, weight, bias) is not None:  # torch.func, forward-mode AD
            return _composite.logits(hidden2, weight2, bias, scale, cap)
        return b.op("logits_fwd")(hidden2, weight2, bias, scale, cap)


def _softcap_value(softcap):
    """The cap for the kernels: 0.0 means none. ``inf`` is the limit c * tanh(z / c) -> z: no cap."""
    if softcap is None:
        return 0.0
    cap = _real(softcap, "softcap")
    if math.isinf(cap) and cap > 0:
        return 0.0
    if not cap > 0:
        raise TiedKernelsError(f"tiedkernels: softcap must be positive (or None, or inf: no cap), got {softcap}")
    return cap


def _real(x, name):
    """A Python real number (a 1-element tensor is read on the host: options are not hot-path data)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"tiedkernels: {name} must be a real number, got {type(x).__name__}")
    return float(x)


def per_token_scale(logit_scale):
    """Whether ``logit_scale`` is a tensor of one scale per token (more than one element)."""
    return isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1


def _logits_per_token_scale(hidden, weight, bias, logit_scale, cap, backend):
    """``logits`` with a ``[*]`` logit scale (broadcast to ``hidden.shape[:-1]``): the unscaled projection
    of the op, then the scale and the cap in the statistics dtype (no gradient to the scale)."""
    check_device(logit_scale, "logit_scale", weight)
    if logit_scale.requires_grad:
        raise NotImplementedError("tiedkernels: a per-token logit_scale gets no gradient; pass logit_scale.detach()")
    try:
        s = torch.broadcast_to(logit_scale, hidden.shape[:-1])
    except RuntimeError:
        raise TiedKernelsError(f"tiedkernels: logit_scale has shape {tuple(logit_scale.shape)}, which does not "
                               f"broadcast to the tokens of hidden {tuple(hidden.shape[:-1])}")
    raw = logits(hidden, weight, bias=bias, backend=backend)
    sdt = torch.float64 if raw.dtype == torch.float64 else torch.float32
    z = raw.to(sdt) * s.to(sdt)[..., None]
    if cap > 0:
        z = torch.tanh(z / cap) * cap
    return z.to(raw.dtype)


def _logit_scale_value(logit_scale):
    scale = _real(logit_scale, "logit_scale")
    if not torch.compiler.is_compiling() and not math.isfinite(scale):  # traced values: checked eagerly
        raise TiedKernelsError(f"tiedkernels: logit_scale must be finite, got {logit_scale}")
    return scale


def _nonempty_dim(hidden, weight):
    """D = 0: F.linear gives zero logits; the kernels get one zero column instead of none (the
    gradients of the empty hidden and weight flow back through the concatenation, empty)."""
    if weight.shape[1] != 0:
        return hidden, weight
    return (torch.cat([hidden, hidden.new_zeros((*hidden.shape[:-1], 1))], -1),
            torch.cat([weight, weight.new_zeros((weight.shape[0], 1))], -1))


def _autocast_dtype(device):
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, ValueError, TypeError):  # a device type autocast does not know (meta, ...)
        pass
    return None


def autocast_inputs(hidden, weight, bias=None):
    """Under ``torch.autocast`` the stock head's precision on every backend: the projection's floating
    inputs are cast to the autocast dtype, as ``F.linear`` is (fp64 is left alone, as autocast does); the
    softmax and the loss then run in fp32, as ``F.cross_entropy`` does under autocast.  Outside
    autocast, the inputs unchanged."""
    dtype = _autocast_dtype(weight.device) if isinstance(weight, torch.Tensor) else None
    if dtype is None:
        return hidden, weight, bias

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)


def no_autocast(device):
    """The ops run on the dtypes ``autocast_inputs`` chose; autocast must not recast inside them."""
    if _autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def shift_labels(labels, ignore_index):
    """labels[..., 1:] padded with one ignore_index at the end: position t is scored on token t+1.
    T = 0 stays empty."""
    if labels.shape[-1] == 0:
        return labels
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def check_loss_options(hidden, labels, *, reduction, label_smoothing, z_loss, num_items_in_batch, shift,
                       context=""):
    """The checks every cross-entropy entry point shares (labels vs hidden, option ranges)."""
    if labels.shape != hidden.shape[:-1]:
        raise TiedKernelsError(f"tiedkernels: labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)}"
                         f"{context}: labels must match hidden without its last dimension")
    check_device(labels, "labels", hidden, "hidden")
    if reduction not in _REDUCTIONS:
        raise TiedKernelsError(f"tiedkernels: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= _real(label_smoothing, "label_smoothing") <= 1.0:
        raise TiedKernelsError(f"tiedkernels: label_smoothing must be in [0, 1], got {label_smoothing}")
    z = _real(z_loss, "z_loss")
    if not torch.compiler.is_compiling() and not (math.isfinite(z) and z >= 0):
        raise TiedKernelsError(f"tiedkernels: z_loss must be finite and >= 0, got {z_loss}")
    if num_items_in_batch is not None and reduction == "none":
        raise TiedKernelsError("tiedkernels: num_items_in_batch divides a summed loss; it has no meaning with "
                               "reduction='none'")
    check_num_items(num_items_in_batch, hidden.device)
    if shift and hidden.dim() < 2:
        raise TiedKernelsError("tiedkernels: shift=True needs a sequence dimension: hidden [..., T, D]")


def check_num_items(num_items_in_batch, device):
    """``num_items_in_batch``: None, a positive finite number, or a 1-element numeric tensor (``[]`` or
    ``[1]``, as Hugging Face trainers pass it) on the loss's device or the CPU.  A tensor's value is not
    checked: that would be a host sync in the hot path; it divides the summed loss as in PyTorch
    (0 gives inf or NaN there too)."""
    n = num_items_in_batch
    if n is None:
        return
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise TiedKernelsError(f"tiedkernels: num_items_in_batch must be a number or a 1-element tensor, got "
                                   f"a tensor of shape {tuple(n.shape)}")
        if n.dtype == torch.bool or n.is_complex():
            raise TiedKernelsError(f"tiedkernels: num_items_in_batch must be a count (an integer or floating "
                                   f"tensor), got {n.dtype}")
        if n.device != device and n.device.type != "cpu":
            raise TiedKernelsError(f"tiedkernels: num_items_in_batch is on {n.device} but the loss is on {device}; "
                                   f"pass it on {device} or the CPU")
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"tiedkernels: num_items_in_batch must be a number or a 1-element tensor, got "
                        f"{type(n).__name__}")
    if not torch.compiler.is_compiling() and not (math.isfinite(n) and n > 0):
        raise TiedKernelsError(f"tiedkernels: num_items_in_batch must be a positive finite count, got {n}")


def check_classes(weight):
    if weight.shape[0] == 0:
        raise TiedKernelsError(f"tiedkernels: weight has shape {tuple(weight.shape)}: cross-entropy needs at least "
                               "one class (V >= 1)")


def loss_denominator(labels_flat, reduction, ignore_index, num_items_in_batch, dtype, class_weight=None):
    """What a summed loss is divided by: num_items_in_batch, the non-ignored count (mean), or None.
    With class weights the mean divides by the summed weights of the non-ignored targets
    (``F.cross_entropy``'s weighted mean; 0 when every token is ignored, PyTorch's x/0 when they
    weigh 0 in all)."""
    if reduction == "none":
        return None
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch).reshape(()).to(device=labels_flat.device, dtype=dtype)
    if reduction == "mean":
        keep = labels_flat != ignore_index
        if class_weight is None:
            return keep.sum().clamp(min=1).to(dtype)
        cy = class_weight.to(dtype).index_select(0, torch.where(keep, labels_flat, 0).long().clamp(min=0))
        total = torch.where(keep, cy, torch.zeros((), dtype=dtype, device=cy.device)).sum()
        return torch.where(keep.any(), total, torch.ones((), dtype=dtype, device=total.device))
    return None


def check_class_weight(class_weight, weight):
    """``class_weight``: None or a floating ``[V]`` tensor on the weight's device."""
    if class_weight is None:
        return
    _require_tensor(class_weight, "class_weight")
    check_device(class_weight, "class_weight", weight)
    if class_weight.shape != (weight.shape[0],):
        raise TiedKernelsError(f"tiedkernels: class_weight has shape {tuple(class_weight.shape)} but weight "
                               f"{tuple(weight.shape)}: class_weight must be [V]")
    if not class_weight.is_floating_point():
        raise TiedKernelsError(f"tiedkernels: class_weight must be floating point, got {class_weight.dtype}")
    if class_weight.requires_grad:
        raise NotImplementedError("tiedkernels: class_weight gets no gradient; pass class_weight.detach()")


class LossStats(NamedTuple):
    """``linear_cross_entropy(..., return_stats=True)``: the loss and statistics of the same pass,
    none of which (but ``loss``) carries a gradient.  Per-token fields have the labels' shape
    (``[..., T-1]`` with ``shift``)."""

    loss: torch.Tensor         # as without return_stats
    lse: torch.Tensor          # per-token logsumexp of the final logits (fp32; fp64 for fp64)
    z_loss: torch.Tensor       # the z-loss term's share of ``loss``, reduced as ``loss`` is
    predictions: torch.Tensor  # per-token argmax of the logits (int64; first index on ties, as torch.argmax)
    accuracy: torch.Tensor     # 0-dim: mean over non-ignored tokens of predictions == labels (0 if none)
    entropy: torch.Tensor      # per-token entropy of the softmax, lse - sum_j p_j z_j


def loss_stats(loss, lse, pred, ent, labels_flat, labels_shape, reduction, denom, shift, ignore_index, z_loss,
               class_weight):
    """The LossStats of one call from the op's per-token outputs (no second pass over V, no host sync)."""
    keep = labels_flat != ignore_index
    lse_d = lse.detach()
    zl = z_loss * lse_d * lse_d
    if class_weight is not None:
        zl = zl * class_weight.to(zl.dtype).index_select(0, torch.where(keep, labels_flat, 0).long().clamp(min=0))
    zl = torch.where(keep, zl, torch.zeros((), dtype=zl.dtype, device=zl.device))
    zl = reduce_tokens(zl, labels_shape, reduction, denom, shift)
    hits = ((pred == labels_flat) & keep).sum().to(lse.dtype)
    accuracy = hits / keep.sum().clamp(min=1).to(lse.dtype)

    def per_token(t):
        t = t.view(labels_shape)
        return t[..., :-1] if shift else t

    return LossStats(loss, per_token(lse_d), zl, per_token(pred), accuracy, per_token(ent))


def reduce_tokens(tok, labels_shape, reduction, denom, shift):
    """Per-token losses [N] -> the requested reduction (shift drops each sequence's last position)."""
    if reduction == "none":
        loss = tok.view(labels_shape)
        return loss[..., :-1] if shift else loss
    loss = tok.sum()
    return loss / denom if denom is not None else loss


def finish(loss, lse, labels_shape, shift, return_lse):
    if not return_lse:
        return loss
    lse = lse.view(labels_shape)
    return loss, (lse[..., :-1] if shift else lse)


# grad_filter="auto": this fraction of the dtype's machine epsilon (see grad_filter_value).
AUTO_FILTER_EPS_FRACTION = 1.0 / 32


def grad_filter_value(grad_filter, dtype):
    """The kernels' threshold ``t`` for ``grad_filter`` (0.0: exact).

    ``None`` (or 0): exact.  A finite number ``t >= 0``: per row chunk, a vocabulary column ``j`` is
    left out of the ``dh`` and ``dW`` GEMMs when ``|dz_ij| <= t * s_i`` in every row ``i`` of the
    chunk, ``s_i`` the row's incoming gradient scale (``|dL/dloss_i|``, 1/denominator for a mean,
    times the caller's incoming gradient on the recompute path; plus ``|dL/dlse_i|``).  ``"auto"``:
    ``eps(dtype) / 32`` (bf16 2^-12, fp16 2^-15, fp32 2^-28, fp64 2^-57): in units of ``s_i``, the
    rounding that ``dz`` itself gets in the input dtype near 1 is ``eps/2``, so a dropped entry is
    at most 1/16 of the rounding error of an entry of size 1 (Cut Cross-Entropy's default, on the
    same scale: its filter compares softmax probabilities)."""
    if grad_filter is None:
        return 0.0
    if isinstance(grad_filter, str):
        if grad_filter == "auto":
            return float(torch.finfo(dtype).eps * AUTO_FILTER_EPS_FRACTION)
        raise TiedKernelsError(f"tiedkernels: grad_filter must be None, a number >= 0 or 'auto', got {grad_filter!r}")
    if isinstance(grad_filter, torch.Tensor):
        raise TiedKernelsError("tiedkernels: grad_filter must be a Python number (or None or 'auto'), not a tensor: "
                               "it decides which GEMM columns run, so it is read on the host; pass float(t)")
    if isinstance(grad_filter, bool) or not isinstance(grad_filter, numbers.Real):
        raise TiedKernelsError(f"tiedkernels: grad_filter must be None, a number >= 0 or 'auto', got "
                               f"{type(grad_filter).__name__} {grad_filter!r}")
    t = float(grad_filter)
    if not (math.isfinite(t) and t >= 0):
        raise TiedKernelsError(f"tiedkernels: grad_filter must be a finite number >= 0 (0 or None: exact), got "
                               f"{grad_filter}")
    return t


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, num_items_in_batch=None,
                         shift=False, return_lse=False, chunk_size=None, backend="auto", class_weight=None,
                         return_stats=False, grad_filter=None):
    """Cross-entropy of ``softcap((hidden @ weight.T + bias) * logit_scale)`` against ``labels``
    without materializing the ``[N, V]`` logits.

    hidden ``[*, D]``, labels ``[*]``. Returns the loss (fp32; fp64 for fp64 inputs), and the
    per-token logsumexp too when ``return_lse``. ``class_weight`` ``[V]``: per-class weights
    (``F.cross_entropy``'s ``weight=``). ``return_stats``: a ``LossStats`` tuple instead (loss, lse,
    z_loss, predictions, accuracy, entropy) from the same pass. ``grad_filter`` (None: exact; a
    threshold ``t >= 0``; ``"auto"``): the columns of a chunk's ``dL/dz`` at most ``t`` times each row's
    incoming gradient scale in every row are left out of the ``dh`` and ``dW`` GEMMs (see
    ``grad_filter_value``); the loss, lse and statistics are exact; the differentiable path
    (``torch.func``, forward-mode AD, ``create_graph=True``) ignores it (exact gradients). See the
    README for every option.
    """
    check_weight(weight)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_hidden(hidden, weight)
    check_bias(bias, weight)
    check_index_dtype(labels, "labels")
    check_loss_options(hidden, labels, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                       num_items_in_batch=num_items_in_batch, shift=shift)
    check_classes(weight)
    check_class_weight(class_weight, weight)
    if per_token_scale(logit_scale):
        return _loss_per_token_scale(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                     logit_scale=logit_scale, num_items_in_batch=num_items_in_batch, shift=shift,
                                     return_lse=return_lse, chunk_size=chunk_size, backend=backend,
                                     class_weight=class_weight, return_stats=return_stats, grad_filter=grad_filter)
    cap = _softcap_value(softcap)
    lscale = _logit_scale_value(logit_scale)
    gfilter = grad_filter_value(grad_filter, hidden.dtype)
    lab = shift_labels(labels, ignore_index) if shift else labels
    n = labels.numel()
    hidden, weight = _nonempty_dim(hidden, weight)
    d = weight.shape[1]
    h2 = hidden.reshape(n, d)
    lab = lab.reshape(-1)
    b = backends.resolve(backend, weight.device)
    chunk = chunk_rows(n, weight.shape[0], chunk_size, d=d, itemsize=hidden.element_size(),
                       dw=weight.requires_grad and torch.is_grad_enabled() and reduction != "none"
                       and b.name == "cpu")
    # vocab_start=0, vocab_total=0: this weight is the whole vocabulary (the distributed loss shards it)
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), cap, lscale, 0, 0, chunk)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    sdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    denom = loss_denominator(lab, reduction, ignore_index, num_items_in_batch, sdt, class_weight)
    extra = dict(class_weight=class_weight, return_stats=bool(return_stats))
    if gfilter > 0:
        extra["grad_filter"] = gfilter
    out = None
    with no_autocast(weight.device):
        if _composite.mode(h2, weight, bias, class_weight) is not None:
            # torch.func transforms, forward-mode AD: the differentiable path (chunked plain ops),
            # exact gradients (no grad_filter there)
            out = _composite.linear_cross_entropy(h2, weight, bias, lab, opts, class_weight, return_stats)
            tok, lse = out[:2]
            out = (tok, lse, None, None, None, *out[2:])  # the op's output positions (stats at 5, 6)
            loss = reduce_tokens(tok, labels.shape, reduction, denom, shift)
        elif reduction != "none" and torch.is_grad_enabled() and any(need):
            # Gradient-in-forward: the scalar's gradients are computed in the same pass.
            scale = (1.0 / denom) if denom is not None else torch.ones((), dtype=sdt, device=hidden.device)
            out = b.op("lce_fwd")(h2, weight, bias, lab, scale, *opts, *need, **extra)
            loss, lse = out[:2]
        else:
            out = b.op("lce_fwd")(h2, weight, bias, lab, None, *opts, False, False, False, **extra)
            tok, lse = out[:2]
            loss = reduce_tokens(tok, labels.shape, reduction, denom, shift)
    if return_stats:
        return loss_stats(loss, lse, out[5], out[6], lab, labels.shape, reduction, denom, shift, ignore_index,
                          float(z_loss), class_weight)
    return finish(loss, lse, labels.shape, shift, return_lse)


def _loss_per_token_scale(hidden, weight, labels, *, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          logit_scale, num_items_in_batch, shift, return_lse, chunk_size, backend, class_weight,
                          return_stats, grad_filter):
    """``linear_cross_entropy`` with a logit scale per token (``[*]``, broadcast to the labels' shape; one per
    sample: ``[B, 1]``): the cross-entropy as the token-level objective ``-log p(label)`` of
    ``tiedkernels.objectives`` (the same chunked pass, gradients in the forward for ``sum``/``mean``)."""
    from . import objectives

    unsupported = [name for name, on in (("label_smoothing", float(label_smoothing) != 0.0),
                                         ("z_loss", float(z_loss) != 0.0), ("class_weight", class_weight is not None),
                                         ("return_stats", bool(return_stats))) if on]
    if unsupported:
        raise NotImplementedError(f"tiedkernels: a per-token logit_scale does not combine with {', '.join(unsupported)} "
                                  "yet; pass a scalar logit_scale, or scale the hidden states per token yourself")
    # the filter's rule carries over: for -log p(label) the objective's s_i is |g_i| (+ |g_lse,i|)
    opts = dict(bias=bias, logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, shift=shift,
                chunk_size=chunk_size, backend=backend, grad_filter=grad_filter)
    if not return_lse:
        return objectives.linear_token_objective(hidden, weight, labels, None, reduction=reduction,
                                                 num_items_in_batch=num_items_in_batch, **opts)
    # the lse differentiable too: the recompute path
    res = objectives.token_log_probs(hidden, weight, labels, **opts)
    tok = -res.log_probs
    if reduction == "none":
        return tok, res.lse
    lab = shift_labels(labels, ignore_index)[..., :-1] if shift else labels
    sdt = tok.dtype
    denom = loss_denominator(lab.reshape(-1), reduction, ignore_index, num_items_in_batch, sdt)
    loss = tok.sum()
    return (loss / denom if denom is not None else loss), res.lse
