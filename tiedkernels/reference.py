"""Plain, unchunked implementations for tests and benchmarks only.

They build the full ``[N, V]`` logits and let autograd differentiate them; with
``upcast=True`` everything runs in fp64.  Every backend is checked against these.
"""

import torch
import torch.nn.functional as F


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def embedding(ids, weight, *, padding_idx=None, upcast=False):
    w = _cast(weight, torch.float64) if upcast else weight
    return F.embedding(ids.long(), w, padding_idx=padding_idx)


def logits(hidden, weight, *, bias=None, logit_scale=1.0, softcap=None, upcast=False):
    if upcast:
        hidden, weight, bias = hidden.double(), weight.double(), _cast(bias, torch.float64)
    z = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, num_items_in_batch=None,
                         shift=False, return_lse=False, class_weight=None, return_stats=False, upcast=False):
    """The loss of DESIGN section 1, written out: logits in the input dtype (or fp64 with
    ``upcast``), then fp32 (fp64) for the softmax, as Hugging Face models do.

    ``class_weight`` c: per token ``c[y]((1-ε)(lse - z_y) + λ·lse²) + (ε/V)(lse·Σc - Σ_j c_j z_j)``
    (``F.cross_entropy(weight=c, label_smoothing=ε)`` plus the z-loss weighted like the target's
    term); ``mean`` divides by ``Σ c[y]`` over the non-ignored tokens.  ``return_stats``: returns
    ``(loss, dict)`` with lse, z_loss, predictions, accuracy and entropy, computed from the logits."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    z = logits(hidden, weight, bias=bias, logit_scale=logit_scale, softcap=softcap, upcast=upcast)
    z = z.double() if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(z, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    zy = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    v = z.shape[-1]
    if class_weight is None:
        cy = torch.ones_like(lse)
        smooth = lse - z.mean(-1) if label_smoothing else None
    else:
        c = class_weight.to(z.dtype)
        cy = c[safe]
        smooth = (lse * c.sum() - (z * c).sum(-1)) / v if label_smoothing else None
    zl = z_loss * cy * lse * lse
    tok = cy * (1 - label_smoothing) * (lse - zy) + zl
    if label_smoothing:
        tok = tok + label_smoothing * smooth
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    zl = torch.where(mask, zl, torch.zeros_like(zl))
    if reduction == "none":
        loss, zl_red = tok, zl
    elif num_items_in_batch is not None:
        loss, zl_red = tok.sum() / num_items_in_batch, zl.sum() / num_items_in_batch
    elif reduction == "sum":
        loss, zl_red = tok.sum(), zl.sum()
    else:
        # all ignored: 0, not NaN; with class weights, the summed c[y] of the others (PyTorch's x/0 if that is 0)
        denom = torch.where(mask, cy, torch.zeros_like(cy)).sum() if class_weight is not None else mask.sum()
        denom = torch.where(mask.any(), denom, torch.ones_like(denom))
        loss, zl_red = tok.sum() / denom, zl.sum() / denom
    if return_stats:
        p = torch.softmax(z, -1)
        pz = torch.where(p == 0, torch.zeros_like(z), p * z).sum(-1)  # probability 0 adds 0 (z = -inf); NaN stays
        pred = z.argmax(-1)
        hits = ((pred == labels) & mask).sum().to(lse.dtype)
        acc = hits / mask.sum().clamp(min=1).to(lse.dtype)
        return loss, dict(lse=lse, z_loss=zl_red, predictions=pred, accuracy=acc, entropy=lse - pz)
    return (loss, lse) if return_lse else loss


def plain_tied_step(ids, weight, body, labels, *, ignore_index=-100):
    """What a stock model does: nn.Embedding lookup, a body, F.linear logits, F.cross_entropy."""
    h = body(F.embedding(ids, weight))
    z = F.linear(h, weight)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index)
