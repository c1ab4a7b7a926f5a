"""The ``torch`` backend: the chunked algorithm of the compiled kernels, in plain PyTorch.

Always importable; the fallback when the extension is not built, and the template the
other backends are checked against (besides the unchunked reference).
"""

import functools
import math

import torch

from . import _index_check
from ._schemas import SCHEMAS

PREFIX = "torch_"
_lib = torch.library.Library("tiedkernels", "FRAGMENT")


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_index_range(x, n, what, ignore_index=None):
    """Values outside [0, n) (ignore_index allowed) raise an IndexError naming the first one, its
    position and V.  Returns ``(pending, bad)``; the op calls ``pending.finish()`` once its work is
    queued.  On the CPU (any device but CUDA) the check is made at once (the host read costs
    nothing there): ``bad`` is None.  On CUDA a host read would wait for the whole stream, once per
    call (and fail under CUDA-graph capture), and an out-of-bounds index would kill the context:
    ``bad`` is then the flat device mask of the bad entries, with which the op keeps every read in
    bounds and marks those entries with NaN, and ``finish()`` waits for the check's own copy only
    (``_index_check.check_indices``)."""
    if x.numel() == 0:
        return _index_check._DONE, None
    flat = x.reshape(-1)
    bad = _index_check.out_of_range(flat, n, ignore_index)
    if _index_check.on_gpu(x):
        return _index_check.check_indices(x, n, what, ignore_index, gpu=True, bad=bad), bad
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        extra = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
        raise IndexError(f"tiedkernels: {what} {int(flat[pos])} at position {pos} is outside [0, V) for V={n}{extra}")
    return _index_check._DONE, None


# Tests only (set_cpu_lowp_gemm_path): None lets the CPU decide; "tiles", "native" or "mkl" forces a path.
_LOWP_GEMM_PATH = None


def set_cpu_lowp_gemm_path(path):
    """Tests only: bf16/fp16 CPU GEMMs of the cpu and torch backends through fp32 tiles ("tiles"),
    ATen's own GEMM ("native"), MKL's mixed-precision GEMM in the cpu backend ("mkl": the torch
    backend takes the tiles then), or as the CPU decides (None, the default), so that each path can
    be tested on any CPU. Returns the previous setting."""
    global _LOWP_GEMM_PATH
    codes = {None: -1, "native": 0, "tiles": 1, "mkl": 2}
    if path not in codes:
        raise ValueError(
            f"tiedkernels: the low-precision GEMM path is None, 'native', 'tiles' or 'mkl', not {path!r}"
        )
    from . import _ext

    ext = _ext.load()
    if ext is not None:
        ext._set_cpu_lowp_gemm_path(codes[path])
    previous, _LOWP_GEMM_PATH = _LOWP_GEMM_PATH, path
    return previous


def _cpu_gemm_is_slow(dtype):
    """Whether bf16/fp16 CPU GEMMs take the fp32 tiles (_mm): where the CPU has no native GEMM for
    the dtype, unless a test forced a path (set_cpu_lowp_gemm_path)."""
    if _LOWP_GEMM_PATH is not None:
        return _LOWP_GEMM_PATH != "native"
    return _cpu_lacks_lowp_gemm(dtype)


@functools.cache
def _cpu_lacks_lowp_gemm(dtype):
    """ATen's CPU GEMM in bf16/fp16 runs on the CPU's own instructions only where it has them
    (AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX for fp16); elsewhere a scalar fallback, up to
    hundreds of times slower than fp32 (csrc/lce_driver.cpp: cpu_mm)."""
    get = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    caps = get() if get is not None else {}
    keys = ("avx512_bf16", "amx_bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16")
    return not any(caps.get(k) is True for k in keys)


_TILE_BYTES = 8 << 20


def _mm(a, b, bias=None):
    """a @ b (+ bias) in a's dtype.  Low-precision CPU operands without a native GEMM go through
    fp32 in tiles of the largest dimension (exact products, fp32 sums, one rounding: the values of
    a GEMM with fp32 accumulation); the other operand is converted once."""
    if a.device.type != "cpu" or a.dtype not in (torch.bfloat16, torch.float16) or not _cpu_gemm_is_slow(a.dtype):
        return torch.addmm(bias, a, b) if bias is not None else a @ b
    (m, k), n, f = a.shape, b.shape[1], torch.float32
    b32 = bias.to(f) if bias is not None else None
    if min(m, n, k) == 0:
        out = a.new_zeros((m, n))
        return out + bias if bias is not None else out
    out = a.new_empty((m, n))
    if m >= n and m >= k:
        bf, t = b.to(f), max(1, _TILE_BYTES // (4 * k))
        for i in range(0, m, t):
            x = a[i : i + t].to(f) @ bf
            out[i : i + t] = x + b32 if b32 is not None else x
    elif n >= k:
        af, t = a.to(f), max(1, _TILE_BYTES // (4 * k))
        for j in range(0, n, t):
            x = af @ b[:, j : j + t].to(f)
            out[:, j : j + t] = x + b32[j : j + t] if b32 is not None else x
    else:
        acc, t = torch.zeros((m, n), dtype=f), max(1, _TILE_BYTES // (4 * max(m, n)))
        for i in range(0, k, t):
            acc.addmm_(a[:, i : i + t].to(f), b[i : i + t].to(f))
        out.copy_(acc + b32 if b32 is not None else acc)
    return out


# ---------------------------------------------------------------------------------------
# embedding


def embedding_fwd(weight, ids, padding_idx):
    pending, bad = check_index_range(ids, weight.shape[0], "id")
    idx = ids.reshape(-1).long()
    if bad is None:
        out = weight.index_select(0, idx)
    elif weight.shape[0] == 0:  # every id is bad
        out = weight.new_full((idx.shape[0], weight.shape[1]), float("nan"))
    else:  # a bad id reads row 0 and yields a NaN row
        out = torch.where(bad.unsqueeze(1), float("nan"), weight.index_select(0, torch.where(bad, 0, idx)))
    out = out.view(*ids.shape, weight.shape[1])
    pending.finish()
    return out


def _scatter(grad_weight, grad, ids, padding_idx, bad):
    """grad_weight[ids[i]] += grad[i], rows at padding_idx left out (by a zero factor: a boolean
    index would be a host sync on CUDA).  ``bad`` (CUDA): nothing is written when an id is bad."""
    idx = ids.reshape(-1).long()
    g = grad.reshape(-1, grad_weight.shape[1])
    if bad is not None:
        if grad_weight.shape[0] == 0:  # every id is bad
            return
        idx = torch.where(bad, 0, idx)
        g = torch.where(bad.any(), 0, g)
    if padding_idx is not None:
        g = torch.where((idx != padding_idx).unsqueeze(1), g, 0)
    acc_dtype = _stat_dtype(grad_weight.dtype)
    if acc_dtype != grad_weight.dtype:
        acc = torch.zeros(grad_weight.shape, dtype=acc_dtype, device=grad_weight.device)
        acc.index_add_(0, idx, g.to(acc_dtype))
        grad_weight.add_(acc)
    else:
        grad_weight.index_add_(0, idx, g)


def embedding_bwd(grad, ids, num_weights, padding_idx):
    pending, bad = check_index_range(ids, num_weights, "id")
    out = grad.new_zeros((num_weights, grad.shape[-1]))
    _scatter(out, grad, ids, padding_idx, bad)
    pending.finish()
    return out


def embedding_bwd_acc_(grad_weight, grad, ids, padding_idx):
    pending, bad = check_index_range(ids, grad_weight.shape[0], "id")
    _scatter(grad_weight, grad, ids, padding_idx, bad)
    pending.finish()


# ---------------------------------------------------------------------------------------
# logits


def _transform(z, logit_scale, softcap):
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap > 0:
        z = torch.tanh(z / softcap) * softcap
    return z


def logits_fwd(hidden, weight, bias, logit_scale, softcap):
    z = _mm(hidden.reshape(-1, hidden.shape[-1]), weight.t(), bias).view(*hidden.shape[:-1], weight.shape[0])
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
    dh = _mm(dz, weight).view(hidden.shape) if compute_dh else empty_h
    dw = _mm(dz.t(), h2) if compute_dw else empty_w
    db = dz.sum(0, dtype=_stat_dtype(dz.dtype)).to(dz.dtype) if (compute_db and bias is not None) else empty_w
    return dh, dw, db


# ---------------------------------------------------------------------------------------
# fused linear + cross-entropy


def _vocab_total(vocab_start, vocab_total, v):
    return vocab_total if vocab_total > 0 else vocab_start + v


def _class_weight(class_weight, vt, sdt, device):
    """[vocab_total] class weights in the statistics dtype, or None."""
    if class_weight is None:
        return None
    if class_weight.dim() != 1 or class_weight.shape[0] != vt:
        raise RuntimeError(f"tiedkernels: class_weight must be [vocab_total] = [{vt}], got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise RuntimeError(f"tiedkernels: class_weight is on {class_weight.device} but hidden on {device}")
    return class_weight.to(sdt)


# Gradient filter: gathered weight rows per GEMM (the kept columns are walked in tiles of this many
# bytes of fp32 rows), and rows of |dz| per pass of the keep test.
FILTER_TILE_BYTES = 64 << 20
FILTER_TEST_BYTES = 8 << 20


def filter_keep(dz, thr):
    """The columns of a chunk's ``dz`` [rows, V] that the gradient filter keeps: a bool [V] mask, True
    where some row ``i`` has ``|dz_ij| > thr_i`` or a NaN (``thr`` [rows], the statistics dtype).  The
    rule of every backend (``csrc/lce_driver.cpp``: ``filter_keep``)."""
    rows, v = dz.shape
    step = max(1, FILTER_TEST_BYTES // max(1, v * dz.element_size()))
    skip = None
    for r0 in range(0, rows, step):
        s = (dz[r0:r0 + step].abs().to(thr.dtype) <= thr[r0:r0 + step, None]).all(0)
        skip = s if skip is None else skip & s
    if skip is None:
        return torch.ones((v,), dtype=torch.bool, device=dz.device)
    return ~skip


def filter_thresholds(g, ignored, gl, grad_filter):
    """``t * s_i`` per row: ``s_i = |g_i|`` (0 at an ignored row) ``+ |grad_lse_i|``."""
    s = torch.where(ignored, torch.zeros((), dtype=g.dtype, device=g.device), g.abs())
    if gl is not None:
        s = s + gl.abs()
    return s * grad_filter


def filtered_gemms(dz, hc, weight, idx, dh_out, dw_acc, mm, mm32):
    """The chunk's ``dh`` and ``dW`` GEMMs on the kept columns ``idx`` of ``dz`` only: ``dh_out``
    (the chunk's rows of dh, or None) ``= dz[:, idx] @ W[idx]``, ``dw_acc[idx] += dz[:, idx]^T h_c``
    (``dw_acc`` the fp32/fp64 accumulator, or None).  ``mm(a, b)``: the product in the input dtype
    (one rounding), ``mm32(a, b)``: in the accumulator's dtype.  The kept columns are walked in tiles
    (``FILTER_TILE_BYTES`` of weight rows), several tiles of dh summed in the accumulator dtype."""
    kept, d = idx.shape[0], weight.shape[1]
    tile = max(1, FILTER_TILE_BYTES // max(1, 4 * d))
    if dh_out is not None and kept == 0:
        dh_out.zero_()
    acc = None
    if dh_out is not None and kept > tile:
        acc = torch.zeros(dh_out.shape, dtype=dw_acc.dtype if dw_acc is not None else
                          (torch.float64 if dz.dtype == torch.float64 else torch.float32), device=dz.device)
    for k0 in range(0, kept, tile):
        it = idx[k0:k0 + tile]
        zk = dz.index_select(1, it)
        if dh_out is not None:
            wk = weight.index_select(0, it)
            if acc is not None:
                acc += mm32(zk, wk)
            else:
                dh_out.copy_(mm(zk, wk))
        if dw_acc is not None:
            dw_acc.index_add_(0, it, mm32(zk.t(), hc))
    if acc is not None:
        dh_out.copy_(acc)


def cross_entropy_lse(lse):
    """The lse inside the cross-entropy term, as PyTorch's cross_entropy has it: its log_softmax,
    z - max - log(sum(exp(z - max))), is NaN on every entry of a row whose max is +inf (inf - inf),
    while torch.logsumexp, the lse returned and squared by the z-loss, special-cases that max and
    gives +inf.  lse - z_y from the latter would make such a token's loss +inf (for a finite or
    -inf z_y) where PyTorch's is NaN."""
    return torch.where(lse == float("inf"), torch.full_like(lse, float("nan")), lse)


def _chunked(hidden, weight, bias, labels, grad_scale, lse_in, ignore_index, label_smoothing, z_loss, softcap,
             logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, mode,
             class_weight=None, grad_lse=None, return_stats=False, grad_filter=0.0):
    """The template every backend follows.  Per token, with c the class weights (1 without),
    S = sum(c), eps the label smoothing, lam the z-loss and z the final logits:
    loss = c[y]((1-eps)(lse - z_y) + lam lse^2) + (eps/V)(S lse - sum_j c_j z_j), and
    dL/dz_j = g (((1-eps)c[y] + (eps/V)S + 2 lam c[y] lse) p_j - (1-eps)c[y][j=y] - (eps/V)c_j)
    + grad_lse p_j, chained through the softcap and the scale.  The smoothing term is left out
    when eps = 0 (never 0 * inf for a -inf logit).  ``grad_filter`` > 0: see ``_schemas.py``."""
    if not (math.isfinite(grad_filter) and grad_filter >= 0):
        raise RuntimeError(f"tiedkernels: grad_filter must be a finite number >= 0, got {grad_filter}")
    if chunk_size <= 0:
        raise RuntimeError(f"tiedkernels: chunk_size must be positive, got {chunk_size}")
    n, d = hidden.shape
    v = weight.shape[0]
    vt = _vocab_total(vocab_start, vocab_total, v)
    pending, bad = check_index_range(labels, vt, "label", ignore_index)
    if bad is not None:  # CUDA: a bad label's token gets a NaN loss, lse and gradient row
        hidden = torch.where(bad.unsqueeze(1), float("nan"), hidden)
    valid = max(0, min(v, vt - vocab_start))
    sdt = _stat_dtype(hidden.dtype)
    labels = labels.long()
    cw = _class_weight(class_weight, vt, sdt, hidden.device)
    if grad_lse is not None and grad_lse.shape != (n,):
        raise RuntimeError(f"tiedkernels: grad_lse must be [N] = [{n}], got {tuple(grad_lse.shape)}")
    grads = mode == "bwd" or (mode == "fwd" and grad_scale is not None and (compute_dh or compute_dw or compute_db))
    want_dh, want_dw, want_db = grads and compute_dh, grads and compute_dw, grads and compute_db
    gs = grad_scale.to(sdt) if grad_scale is not None else None
    gl = grad_lse.to(sdt) if grad_lse is not None else None
    stats_on = mode == "fwd" and return_stats
    loss_vec = hidden.new_empty((n,), dtype=sdt)
    lse = hidden.new_empty((n,), dtype=sdt)
    pred = hidden.new_empty((n,) if stats_on else (0,), dtype=torch.long)
    ent = hidden.new_empty((n,) if stats_on else (0,), dtype=sdt)
    stats = hidden.new_empty((3, n), dtype=sdt) if mode == "stats" else None
    dh = hidden.new_empty((n, d)) if want_dh else hidden.new_empty((0,))
    dw = weight.new_zeros((v, d), dtype=sdt) if want_dw else None
    db = weight.new_zeros((v,), dtype=sdt) if want_db else None
    eps, inv_v = float(label_smoothing), 1.0 / vt
    # this shard's columns of the class weights (padding columns weigh 0), their global sum
    # Low precision with a bias, softcap or scale: the logits in fp32 (no rounding before those
    # apply); dL/dz is rounded once to the input dtype for the GEMMs.
    exact = sdt != hidden.dtype and (bias is not None or softcap > 0 or logit_scale != 1.0)
    w32 = weight.to(sdt) if exact else None
    b32 = bias.to(sdt) if exact and bias is not None else None
    c_local = None
    if cw is not None:
        c_local = torch.zeros((v,), dtype=sdt, device=hidden.device)
        c_local[:valid] = cw[vocab_start : vocab_start + valid]
        c_sum = cw.sum()
    for start in range(0, n, chunk_size):
        rows = min(chunk_size, n - start)
        hc = hidden[start : start + rows]
        if exact:
            z = torch.nn.functional.linear(hc.to(sdt), w32, b32)
        else:
            z = _mm(hc, weight.t(), bias)
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
        # sum_j c_j z_j over the real columns (c_j = 1 without class weights)
        fv = f[:, :valid]
        sumf = (fv * c_local[:valid]).sum(1) if c_local is not None else fv.sum(1)
        if cw is not None:
            # a bad label (CUDA, reported by pending.finish()) reads c[0], never out of bounds
            safe = torch.where(ignored | (y < 0) | (y >= vt), torch.zeros_like(y), y)
            cy = torch.where(ignored, zero, cw[safe]) if vt > 0 else zero.expand(rows)
        else:
            cy = torch.ones((rows,), dtype=sdt, device=f.device)
        if mode == "stats":
            stats[0, start : start + rows] = row_lse
            stats[1, start : start + rows] = zy
            stats[2, start : start + rows] = sumf
        if mode == "fwd":
            ce_lse = cross_entropy_lse(row_lse)
            tok = cy * ((1 - eps) * (ce_lse - zy) + z_loss * row_lse * row_lse)
            if eps:
                s_all = c_sum if cw is not None else vt
                tok = tok + (eps * inv_v) * (s_all * ce_lse - sumf)
            loss_vec[start : start + rows] = torch.where(ignored, torch.zeros_like(tok), tok)
            lse[start : start + rows] = row_lse
            if stats_on:
                p = torch.exp(f - row_lse[:, None])
                pz = torch.where(p == 0, zero, p * f)  # probability 0 adds 0, even at z = -inf; a NaN stays
                pred[start : start + rows] = torch.argmax(f, dim=1) + vocab_start if v > 0 else vocab_start
                ent[start : start + rows] = row_lse - pz.sum(1)
        if not grads:
            continue
        use_lse = lse_in[start : start + rows].to(sdt) if lse_in is not None else row_lse
        if gs is None:
            g = torch.ones((rows,), dtype=sdt, device=f.device)
        else:
            g = gs.expand(rows) if gs.dim() == 0 else gs[start : start + rows]
        g = torch.where(ignored, torch.zeros_like(g), g)
        p = torch.exp(f - use_lse[:, None])
        coef = g * cy * ((1 - eps) + 2 * z_loss * use_lse)
        if eps:
            coef = coef + g * (eps * inv_v) * (c_sum if cw is not None else vt)
        if gl is not None:
            coef = coef + gl[start : start + rows]
        dz = coef[:, None] * p
        if eps:
            dz = dz - (g * eps * inv_v)[:, None] * (c_local[None, :] if c_local is not None else 1.0)
        rows_idx = torch.arange(rows, device=f.device)
        if v > 0:
            dz[rows_idx, local] -= torch.where(has_t, g * cy * (1 - eps), torch.zeros_like(g))
        if softcap > 0:
            t = f / softcap
            dz = dz * (1 - t * t)
        dz = dz * logit_scale
        if valid < v:
            dz[:, valid:] = 0
        dz = dz.to(hidden.dtype)
        if want_db:
            db += dz.sum(0, dtype=sdt)  # exact: every column
        if grad_filter > 0 and (want_dh or want_dw) and v > 0:
            thr = filter_thresholds(g, ignored, gl[start : start + rows] if gl is not None else None, grad_filter)
            idx = filter_keep(dz, thr).nonzero().squeeze(1)  # a host sync on a GPU, once per chunk
            if idx.shape[0] < v:
                filtered_gemms(dz, hc, weight, idx, dh[start : start + rows] if want_dh else None,
                               dw if want_dw else None, _mm, lambda a, b: a.to(sdt) @ b.to(sdt))
                continue
        if want_dh:
            dh[start : start + rows] = _mm(dz, weight)
        if want_dw:
            dw.addmm_(dz.t().to(sdt), hc.to(sdt))
    if mode == "stats":
        pending.finish()
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
    pending.finish()
    return loss, lse, dh, dw, db, pred, ent


def lce_fwd(hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap, logit_scale,
            vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, class_weight=None,
            return_stats=False, grad_filter=0.0):
    return _chunked(hidden, weight, bias, labels, grad_scale, None, ignore_index, label_smoothing, z_loss, softcap,
                    logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, "fwd",
                    class_weight=class_weight, return_stats=return_stats, grad_filter=grad_filter)


def lce_bwd(grad_loss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss, softcap,
            logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw, compute_db, class_weight=None,
            grad_lse=None, grad_filter=0.0):
    _, _, dh, dw, db, _, _ = _chunked(hidden, weight, bias, labels, grad_loss, lse, ignore_index, label_smoothing,
                                      z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk_size, compute_dh,
                                      compute_dw, compute_db, "bwd", class_weight=class_weight, grad_lse=grad_lse,
                                      grad_filter=grad_filter)
    return dh, dw, db


def lce_stats(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, vocab_start, vocab_total, chunk_size,
              class_weight=None):
    return _chunked(hidden, weight, bias, labels, None, None, ignore_index, 0.0, 0.0, softcap, logit_scale,
                    vocab_start, vocab_total, chunk_size, False, False, False, "stats", class_weight=class_weight)


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
