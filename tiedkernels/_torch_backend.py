"""The ``torch`` backend: the chunked algorithm of the compiled kernels, in plain PyTorch.

Always importable; the fallback when the extension is not built, and the template the
other backends are checked against (besides the unchunked reference).
"""

import torch

from ._schemas import SCHEMAS

PREFIX = "torch_"
_lib = torch.library.Library("tiedkernels", "FRAGMENT")


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_index_range(x, n, what, ignore_index=None):
    """IndexError naming the first value outside [0, n) (ignore_index allowed). Syncs on GPU."""
    if x.numel() == 0:
        return
    bad = (x < 0) | (x >= n)
    if ignore_index is not None:
        bad &= x != ignore_index
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        val = int(x.reshape(-1)[pos])
        extra = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
        raise IndexError(f"tiedkernels: {what} {val} at position {pos} is outside [0, V) for V={n}{extra}")


# ---------------------------------------------------------------------------------------
# embedding


def embedding_fwd(weight, ids, padding_idx):
    check_index_range(ids, weight.shape[0], "id")
    return weight.index_select(0, ids.reshape(-1).long()).view(*ids.shape, weight.shape[1])


def _scatter(grad_weight, grad, ids, padding_idx):
    idx = ids.reshape(-1).long()
    g = grad.reshape(-1, grad_weight.shape[1])
    if padding_idx is not None:
        keep = idx != padding_idx
        idx, g = idx[keep], g[keep]
    acc_dtype = _stat_dtype(grad_weight.dtype)
    if acc_dtype != grad_weight.dtype:
        acc = torch.zeros(grad_weight.shape, dtype=acc_dtype, device=grad_weight.device)
        acc.index_add_(0, idx, g.to(acc_dtype))
        grad_weight.add_(acc)
    else:
        grad_weight.index_add_(0, idx, g)


def embedding_bwd(grad, ids, num_weights, padding_idx):
    check_index_range(ids, num_weights, "id")
    out = grad.new_zeros((num_weights, grad.shape[-1]))
    _scatter(out, grad, ids, padding_idx)
    return out


def embedding_bwd_acc_(grad_weight, grad, ids, padding_idx):
    check_index_range(ids, grad_weight.shape[0], "id")
    _scatter(grad_weight, grad, ids, padding_idx)


# ---------------------------------------------------------------------------------------
# logits


def _transform(z, logit_scale, softcap):
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap > 0:
        z = torch.tanh(z / softcap) * softcap
    return z


def logits_fwd(hidden, weight, bias, logit_scale, softcap):
    z = torch.nn.functional.linear(hidden, weight, bias)
    if logit_scale == 1.0 and softcap <= 0:
        return z
    return _transform(z.to(_stat_dtype(z.dtype)), logit_scale, softcap).to(z.dtype)


def logits_bwd(grad, logits, hidden, weight, bias, logit_scale, softcap, compute_dh, compute_dw, compute_db):
    v, d = weight.shape
    dz = grad.reshape(-1, v)
    if logit_scale != 1.0 or softcap > 0:
        dzf = dz.to(_stat_dtype(dz.dtype)) * logit_scale
        if softcap > 0:
            t = logits.reshape(-1, v).to(dzf.dtype) / softcap
            dzf = dzf * (1 - t * t)
        dz = dzf.to(grad.dtype)
    h2 = hidden.reshape(-1, d)
    empty_h, empty_w = hidden.new_empty((0,)), weight.new_empty((0,))
    dh = (dz @ weight).view(hidden.shape) if compute_dh else empty_h
    dw = dz.t() @ h2 if compute_dw else empty_w
    db = dz.sum(0, dtype=_stat_dtype(dz.dtype)).to(dz.dtype) if (compute_db and bias is not None) else empty_w
    return dh, dw, db


# ---------------------------------------------------------------------------------------
# fused linear + cross-entropy


def _vocab_total(vocab_start, vocab_total, v):
    return vocab_total if vocab_total > 0 else vocab_start + v


def _chunked(hidden, weight, bias, labels, grad_scale, lse_in, ignore_index, label_smoothing, z_loss, softcap,
             logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, mode):
    if chunk_size <= 0:
        raise RuntimeError(f"tiedkernels: chunk_size must be positive, got {chunk_size}")
    n, d = hidden.shape
    v = weight.shape[0]
    vt = _vocab_total(vocab_start, vocab_total, v)
    check_index_range(labels, vt, "label", ignore_index)
    valid = max(0, min(v, vt - vocab_start))
    sdt = _stat_dtype(hidden.dtype)
    labels = labels.long()
    grads = mode == "bwd" or (mode == "fwd" and grad_scale is not None and (compute_dh or compute_dw or compute_db))
    want_dh, want_dw, want_db = grads and compute_dh, grads and compute_dw, grads and compute_db
    gs = grad_scale.to(sdt) if grad_scale is not None else None
    loss_vec = hidden.new_empty((n,), dtype=sdt)
    lse = hidden.new_empty((n,), dtype=sdt)
    stats = hidden.new_empty((3, n), dtype=sdt) if mode == "stats" else None
    dh = hidden.new_empty((n, d)) if want_dh else hidden.new_empty((0,))
    dw = weight.new_zeros((v, d), dtype=sdt) if want_dw else None
    db = weight.new_zeros((v,), dtype=sdt) if want_db else None
    eps, inv_v = float(label_smoothing), 1.0 / vt
    for start in range(0, n, chunk_size):
        rows = min(chunk_size, n - start)
        hc = hidden[start : start + rows]
        z = torch.nn.functional.linear(hc, weight, bias)
        f = _transform(z.to(sdt), logit_scale, softcap)
        if valid < v:
            f[:, valid:] = float("-inf")
        y = labels[start : start + rows]
        ignored = y == ignore_index
        local = y - vocab_start
        has_t = ~ignored & (local >= 0) & (local < valid)
        local = torch.where(has_t, local, torch.zeros_like(local))
        row_lse = torch.logsumexp(f, dim=1)
        zero = torch.zeros((), dtype=sdt, device=f.device)
        zy = torch.where(has_t, f.gather(1, local[:, None]).squeeze(1), zero) if v > 0 else zero.expand(rows)
        sumf = f[:, :valid].sum(1)
        if mode == "stats":
            stats[0, start : start + rows] = row_lse
            stats[1, start : start + rows] = zy
            stats[2, start : start + rows] = sumf
        if mode == "fwd":
            tok = (1 - eps) * (row_lse - zy) + eps * (row_lse - sumf * inv_v) + z_loss * row_lse * row_lse
            loss_vec[start : start + rows] = torch.where(ignored, torch.zeros_like(tok), tok)
            lse[start : start + rows] = row_lse
        if not grads:
            continue
        use_lse = lse_in[start : start + rows].to(sdt) if lse_in is not None else row_lse
        if gs is None:
            g = torch.ones((rows,), dtype=sdt, device=f.device)
        else:
            g = gs.expand(rows) if gs.dim() == 0 else gs[start : start + rows]
        g = torch.where(ignored, torch.zeros_like(g), g)
        p = torch.exp(f - use_lse[:, None])
        dz = (g * (1 + 2 * z_loss * use_lse))[:, None] * p - (g * eps * inv_v)[:, None]
        rows_idx = torch.arange(rows, device=f.device)
        if v > 0:
            dz[rows_idx, local] -= torch.where(has_t, g * (1 - eps), torch.zeros_like(g))
        if softcap > 0:
            t = f / softcap
            dz = dz * (1 - t * t)
        dz = dz * logit_scale
        if valid < v:
            dz[:, valid:] = 0
        dz = dz.to(hidden.dtype)
        if want_dh:
            dh[start : start + rows] = dz @ weight
        if want_dw:
            dw.addmm_(dz.t().to(sdt), hc.to(sdt))
        if want_db:
            db += dz.sum(0, dtype=sdt)
    if mode == "stats":
        return stats
    if mode == "fwd":
        if gs is not None:
            loss = (loss_vec * gs).sum()
        else:
            loss = loss_vec
    else:
        loss = None
    dw = dw.to(weight.dtype) if want_dw else weight.new_empty((0,))
    db = db.to(weight.dtype) if want_db else weight.new_empty((0,))
    return loss, lse, dh, dw, db


def lce_fwd(hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap, logit_scale,
            vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db):
    return _chunked(hidden, weight, bias, labels, grad_scale, None, ignore_index, label_smoothing, z_loss, softcap,
                    logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, "fwd")


def lce_bwd(grad_loss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss, softcap,
            logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db):
    _, _, dh, dw, db = _chunked(hidden, weight, bias, labels, grad_loss, lse, ignore_index, label_smoothing, z_loss,
                                softcap, logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw,
                                compute_db, "bwd")
    return dh, dw, db


def lce_stats(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, vocab_start, vocab_total, chunk_size):
    return _chunked(hidden, weight, bias, labels, None, None, ignore_index, 0.0, 0.0, softcap, logit_scale,
                    vocab_start, vocab_total, chunk_size, False, False, False, "stats")


_IMPLS = {
    "embedding_fwd": embedding_fwd,
    "embedding_bwd": embedding_bwd,
    "embedding_bwd_acc_": embedding_bwd_acc_,
    "logits_fwd": logits_fwd,
    "logits_bwd": logits_bwd,
    "lce_fwd": lce_fwd,
    "lce_bwd": lce_bwd,
    "lce_stats": lce_stats,
}

for _name, _schema in SCHEMAS.items():
    _lib.define(PREFIX + _name + _schema)
    _lib.impl(PREFIX + _name, _IMPLS[_name], "CompositeExplicitAutograd")
