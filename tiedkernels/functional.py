"""The public functions: embedding lookup, logits projection, fused linear + cross-entropy."""

import os

import torch

from . import backends

_REDUCTIONS = ("none", "sum", "mean")
DEFAULT_CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 128


def _is_int(t):
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_weight(weight, name="weight"):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"tiedkernels: {name} must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"tiedkernels: {name} must be [V, D], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"tiedkernels: {name} must be floating point, got {weight.dtype}")


def check_hidden(hidden, weight):
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"tiedkernels: hidden has shape {tuple(hidden.shape)} but weight {tuple(weight.shape)}: "
                         "the last dimension of hidden must equal D")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"tiedkernels: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if hidden.device != weight.device:
        raise ValueError(f"tiedkernels: hidden is on {hidden.device} but weight on {weight.device}")


def check_bias(bias, weight):
    if bias is None:
        return
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"tiedkernels: bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)}: "
                         "bias must be [V]")
    if bias.dtype != weight.dtype:
        raise ValueError(f"tiedkernels: bias is {bias.dtype} but weight is {weight.dtype}")


def check_index_dtype(t, name):
    if not isinstance(t, torch.Tensor) or not _is_int(t):
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"tiedkernels: {name} must be an integer tensor (int64 or int32), got {what}")


def normalize_padding_idx(padding_idx, num_embeddings):
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"tiedkernels: padding_idx {padding_idx} is outside [-V, V) for V={num_embeddings}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def chunk_rows(n, v, chunk_size=None, d=None, itemsize=4, dw=False):
    """Rows per chunk: ``chunk_size`` if given; else what fits ``TIEDKERNELS_CHUNK_BYTES`` of logits
    when that is set (or when ``d`` is not given: 32 MiB of fp32 logits); else a chunk whose logits take
    half the bytes of the fp32 dW accumulator (``D/2`` rows in fp32, ``D`` in bf16), which keeps the dW
    GEMM's inner dimension in the hundreds (its [V, D] output is read and written once per chunk).
    A low-precision call on the compiled CPU backend that computes dW takes one chunk when its logits
    cost no more than the fp32 accumulator that backend then does without. At least MIN_CHUNK_ROWS rows."""
    if chunk_size is not None:
        chunk_size = int(chunk_size)
        if chunk_size <= 0:
            raise ValueError(f"tiedkernels: chunk_size must be a positive number of rows, got {chunk_size}")
        return chunk_size
    env = os.environ.get("TIEDKERNELS_CHUNK_BYTES")
    if env is not None or d is None:
        budget = int(env) if env is not None else DEFAULT_CHUNK_BYTES
        rows = max(MIN_CHUNK_ROWS, budget // max(1, (itemsize if env is not None else 4) * v))
        return max(1, min(rows, n))
    rows = max(MIN_CHUNK_ROWS, (2 * d) // itemsize)
    if dw and itemsize < 4 and n * itemsize <= rows * itemsize + 4 * d:
        rows = n
    return max(1, min(rows, n))


def embedding(ids, weight, *, padding_idx=None, backend="auto"):
    """``weight[ids]``: ids ``[*]`` (int64 or int32) -> ``[*, D]``. Rows at ``padding_idx`` get no gradient."""
    check_weight(weight)
    check_index_dtype(ids, "ids")
    if ids.device != weight.device:
        raise ValueError(f"tiedkernels: ids are on {ids.device} but weight on {weight.device}")
    pad = normalize_padding_idx(padding_idx, weight.shape[0])
    b = backends.resolve(backend, weight.device)
    return b.op("embedding_fwd")(weight, ids, pad)


def logits(hidden, weight, *, bias=None, logit_scale=1.0, softcap=None, backend="auto"):
    """``softcap((hidden @ weight.T + bias) * logit_scale)``: ``[*, D] -> [*, V]``."""
    check_weight(weight)
    check_hidden(hidden, weight)
    check_bias(bias, weight)
    cap = _softcap_value(softcap)
    b = backends.resolve(backend, weight.device)
    return b.op("logits_fwd")(hidden, weight, bias, float(logit_scale), cap)


def _softcap_value(softcap):
    if softcap is None:
        return 0.0
    cap = float(softcap)
    if not cap > 0:
        raise ValueError(f"tiedkernels: softcap must be positive or None, got {softcap}")
    return cap


def shift_labels(labels, ignore_index):
    """labels[..., 1:] padded with one ignore_index at the end: position t is scored on token t+1."""
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def check_loss_options(hidden, labels, *, reduction, label_smoothing, z_loss, num_items_in_batch, shift,
                       context=""):
    """The checks every cross-entropy entry point shares (labels vs hidden, option ranges)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"tiedkernels: labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)}"
                         f"{context}: labels must match hidden without its last dimension")
    if labels.device != hidden.device:
        raise ValueError(f"tiedkernels: labels are on {labels.device} but hidden on {hidden.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"tiedkernels: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"tiedkernels: label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0:
        raise ValueError(f"tiedkernels: z_loss must be >= 0, got {z_loss}")
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError("tiedkernels: num_items_in_batch divides a summed loss; it has no meaning with "
                         "reduction='none'")
    if shift and hidden.dim() < 2:
        raise ValueError("tiedkernels: shift=True needs a sequence dimension: hidden [..., T, D]")


def loss_denominator(labels_flat, reduction, ignore_index, num_items_in_batch, dtype):
    """What a summed loss is divided by: num_items_in_batch, the non-ignored count (mean), or None."""
    if reduction == "none":
        return None
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=labels_flat.device).to(dtype)
    if reduction == "mean":
        return (labels_flat != ignore_index).sum().clamp(min=1).to(dtype)
    return None


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


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, num_items_in_batch=None,
                         shift=False, return_lse=False, chunk_size=None, backend="auto"):
    """Cross-entropy of ``softcap((hidden @ weight.T + bias) * logit_scale)`` against ``labels``
    without materializing the ``[N, V]`` logits.

    hidden ``[*, D]``, labels ``[*]``. Returns the loss (fp32; fp64 for fp64 inputs), and the
    per-token logsumexp too when ``return_lse``. See the README for every option.
    """
    check_weight(weight)
    check_hidden(hidden, weight)
    check_bias(bias, weight)
    check_index_dtype(labels, "labels")
    check_loss_options(hidden, labels, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                       num_items_in_batch=num_items_in_batch, shift=shift)
    cap = _softcap_value(softcap)
    d = weight.shape[1]
    lab = shift_labels(labels, ignore_index) if shift else labels
    h2 = hidden.reshape(-1, d)
    lab = lab.reshape(-1)
    n = h2.shape[0]
    b = backends.resolve(backend, weight.device)
    chunk = chunk_rows(n, weight.shape[0], chunk_size, d=d, itemsize=hidden.element_size(),
                       dw=weight.requires_grad and torch.is_grad_enabled() and reduction != "none"
                       and b.name == "cpu")
    # vocab_start=0, vocab_total=0: this weight is the whole vocabulary (the distributed loss shards it)
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), cap, float(logit_scale), 0, 0, chunk)
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    sdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    denom = loss_denominator(lab, reduction, ignore_index, num_items_in_batch, sdt)
    if reduction != "none" and torch.is_grad_enabled() and any(need):
        # Gradient-in-forward: the scalar's gradients are computed in the same pass.
        scale = (1.0 / denom) if denom is not None else torch.ones((), dtype=sdt, device=hidden.device)
        loss, lse, _, _, _ = b.op("lce_fwd")(h2, weight, bias, lab, scale, *opts, *need)
    else:
        tok, lse, _, _, _ = b.op("lce_fwd")(h2, weight, bias, lab, None, *opts, False, False, False)
        loss = reduce_tokens(tok, labels.shape, reduction, denom, shift)
    return finish(loss, lse, labels.shape, shift, return_lse)
