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
                         shift=False, return_lse=False, upcast=False):
    """The loss of DESIGN section 1, written out: logits in the input dtype (or fp64 with
    ``upcast``), then fp32 (fp64) for the softmax, as Hugging Face models do."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    z = logits(hidden, weight, bias=bias, logit_scale=logit_scale, softcap=softcap, upcast=upcast)
    z = z.double() if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(z, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    zy = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    tok = (1 - label_smoothing) * (lse - zy) + label_smoothing * (lse - z.mean(-1)) + z_loss * lse * lse
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    if reduction == "none":
        loss = tok
    elif num_items_in_batch is not None:
        loss = tok.sum() / num_items_in_batch
    elif reduction == "sum":
        loss = tok.sum()
    else:
        loss = tok.sum() / mask.sum().clamp(min=1)
    return (loss, lse) if return_lse else loss


def plain_tied_step(ids, weight, body, labels, *, ignore_index=-100):
    """What a stock model does: nn.Embedding lookup, a body, F.linear logits, F.cross_entropy."""
    h = body(F.embedding(ids, weight))
    z = F.linear(h, weight)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index)
