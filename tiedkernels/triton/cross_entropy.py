"""Triton fused linear + cross-entropy: the [N, V] logits never exist, not even per chunk.

Two kernels over tiles of ``z = h W^T`` (fp32 accumulation, any input dtype):

* ``_lse_kernel``: one program per block of rows walks the vocabulary in tiles with an online
  logsumexp, picking up the target logit and the sum of logits (label smoothing); it writes
  lse, the per-token loss and the shard statistics.
* ``_grad_kernel``: one program per (row block, vocabulary tile) recomputes its logits tile,
  turns it into ``dz`` with the given lse and incoming gradient, and adds ``dz W`` into
  ``dh`` and ``dz^T h`` into ``dW`` (fp32 accumulators, atomic adds across tiles), ``db``
  likewise.

Strategies (DESIGN section 2): with ``grad_scale`` (a scalar loss that needs a gradient)
``lce_fwd`` runs both kernels and returns the finished gradients; otherwise it runs the
first only and ``lce_bwd`` runs the second with the real incoming gradient.  ``chunk_size``
has no effect here: there is no logits buffer to bound.

A label outside [0, V) (not ignore_index) is reported as an IndexError (see
``_common.check_indices``); the kernels never read out of bounds with it: its loss and
gradient rows are NaN.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import check_indices, dot_precision, interpreted, stat_dtype, tl_acc


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter (triton 3.9) multiplies bf16 operands wrongly; fp32 operands give the same
    # products there (a bf16 x bf16 product is exact in fp32).  Never set on the GPU.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _logits_tile(H, W, B, rows, cols, rmask, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap,
                 inv_softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """softcap((h W^T + b) * scale) for one [BN, BV] tile, in the accumulation type."""
    acc = tl.zeros([BN, BV], dtype=ACC)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        h = tl.load(H + rows64[:, None] * stride_hn + dd[None, :] * stride_hd, mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        w = tl.load(W + cols64[:, None] * stride_wv + dd[None, :] * stride_wd, mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        acc = _dot(h, tl.trans(w), acc, PREC, ACC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=cmask, other=0.0).to(ACC)[None, :]
    f = acc * scale
    if HAS_CAP:
        f = softcap * _tanh(f * inv_softcap)
    return f


@triton.jit
def _lse_kernel(H, W, B, LAB, LSE, LOSS, ZY, SUMF, N, V, D, valid, stride_hn, stride_hd, stride_wv, stride_wd,
                ignore_index, vocab_start, vocab_total, eps, z_loss, inv_vocab, scale, softcap, inv_softcap,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    y = tl.load(LAB + rows, mask=rmask, other=ignore_index).to(tl.int64)
    ignored = y == ignore_index
    bad = (~ignored) & ((y < 0) | (y >= vocab_total))
    local = tl.where(ignored | bad, -1, y - vocab_start)
    m = tl.full([BN], float("-inf"), dtype=ACC)
    s = tl.zeros([BN], dtype=ACC)
    sf = tl.zeros([BN], dtype=ACC)
    zy = tl.zeros([BN], dtype=ACC)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < valid
        f = _logits_tile(H, W, B, rows, cols, rmask, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd, scale,
                         softcap, inv_softcap, HAS_BIAS, HAS_CAP, ACC, PREC, UPCAST, BN, BV, BD)
        sf += tl.sum(tl.where(cmask[None, :], f, 0.0), axis=1)
        zy += tl.sum(tl.where(cols[None, :] == local[:, None], f, 0.0), axis=1)
        f = tl.where(cmask[None, :], f, float("-inf"))
        m_new = tl.maximum(m, tl.max(f, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(f - m_ref[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    # A NaN in the row reaches s (exp(NaN) = NaN) or sf; keep it in lse as PyTorch would.
    lse = tl.where(sf != sf, sf, lse)
    loss = (1.0 - eps) * (lse - zy) + eps * (lse - sf * inv_vocab) + z_loss * lse * lse
    loss = tl.where(ignored, 0.0, loss)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(ZY + rows, zy, mask=rmask)
    tl.store(SUMF + rows, sf, mask=rmask)


@triton.jit
def _grad_kernel(H, W, B, LAB, LSE, G, DH, DW, DB, N, V, D, valid, stride_hn, stride_hd, stride_wv, stride_wd,
                 ignore_index, vocab_start, vocab_total, eps, z_loss, inv_vocab, scale, softcap, inv_softcap,
                 G_SCALAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, COMPUTE_DH: tl.constexpr,
                 COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    rmask = rows < N
    cmask = cols < valid
    y = tl.load(LAB + rows, mask=rmask, other=ignore_index).to(tl.int64)
    ignored = y == ignore_index
    bad = (~ignored) & ((y < 0) | (y >= vocab_total))
    local = tl.where(ignored | bad, -1, y - vocab_start)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0).to(ACC)
    if G_SCALAR:
        g = tl.zeros([BN], dtype=ACC) + tl.load(G).to(ACC)
    else:
        g = tl.load(G + rows, mask=rmask, other=0.0).to(ACC)
    f = _logits_tile(H, W, B, rows, cols, rmask, cmask, D, stride_hn, stride_hd, stride_wv, stride_wd, scale, softcap,
                     inv_softcap, HAS_BIAS, HAS_CAP, ACC, PREC, UPCAST, BN, BV, BD)
    a = g * (1.0 + 2.0 * z_loss * lse)
    b = g * eps * inv_vocab
    dz = a[:, None] * tl.exp(f - lse[:, None]) - b[:, None]
    dz -= tl.where(cols[None, :] == local[:, None], (g * (1.0 - eps))[:, None], 0.0)
    if HAS_CAP:
        t = f * inv_softcap
        dz = dz * (1.0 - t * t)
    dz = dz * scale
    live = rmask & ~ignored
    dz = tl.where(live[:, None] & cmask[None, :], dz, 0.0)
    dz = tl.where(bad[:, None] & cmask[None, :], float("nan"), dz)
    cols64 = cols.to(tl.int64)
    rows64 = rows.to(tl.int64)
    if COMPUTE_DB:
        tl.atomic_add(DB + cols64, tl.sum(dz, axis=0), mask=cmask)
    dzc = dz.to(H.dtype.element_ty)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        if COMPUTE_DH:
            w = tl.load(W + cols64[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            part = _dot(dzc, w, None, PREC, ACC, UPCAST)
            tl.atomic_add(DH + rows64[:, None] * D + dd[None, :], part, mask=rmask[:, None] & dmask[None, :])
        if COMPUTE_DW:
            h = tl.load(H + rows64[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            part = _dot(tl.trans(dzc), h, None, PREC, ACC, UPCAST)
            tl.atomic_add(DW + cols64[:, None] * D + dd[None, :], part, mask=cmask[:, None] & dmask[None, :])


def _blocks(hidden, v):
    """(BN, BV, BD, num_warps, num_stages).  In the interpreter every program and loop step
    costs Python time and registers cost nothing: wide vocabulary tiles.  On the GPU,
    H100/A100-sized tiles."""
    if interpreted(hidden):
        return 16, (128 if v <= 4096 else 1024), 32, 4, 1
    if hidden.dtype == torch.float32 or hidden.dtype == torch.float64:
        return 64, 64, 32, 4, 2
    return 128, 128, 64, 8, 3


class _Args:
    """The launch arguments every kernel shares, derived once per op call."""

    def __init__(self, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, softcap, logit_scale,
                 vocab_start, vocab_total, chunk_size):
        if chunk_size <= 0:
            raise RuntimeError(f"tiedkernels: chunk_size must be positive, got {chunk_size}")
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise RuntimeError(f"tiedkernels: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                               "[N, D] and [V, D]")
        if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"tiedkernels: labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
        if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            raise RuntimeError("tiedkernels: hidden, weight and bias must have one dtype")
        if softcap < 0:
            raise RuntimeError("tiedkernels: softcap must be positive (0 disables it)")
        self.n, self.d = hidden.shape
        self.v = weight.shape[0]
        self.vt = vocab_total if vocab_total > 0 else vocab_start + self.v
        self.valid = max(0, min(self.v, self.vt - vocab_start))
        self.sdt = stat_dtype(hidden.dtype)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.labels = labels.to(torch.int64).contiguous()
        self.bn, self.bv, self.bd, self.warps, self.stages = _blocks(hidden, self.v)
        self.common = (self.n, self.v, self.d, self.valid, hidden.stride(0), hidden.stride(1), weight.stride(0),
                       weight.stride(1), int(ignore_index), int(vocab_start), int(self.vt), float(label_smoothing),
                       float(z_loss), 1.0 / self.vt, float(logit_scale), float(softcap),
                       1.0 / softcap if softcap > 0 else 0.0)
        self.flags = dict(HAS_BIAS=bias is not None, HAS_CAP=softcap > 0, ACC=tl_acc(hidden.dtype),
                          PREC=dot_precision(hidden.dtype),
                          UPCAST=interpreted(hidden) and hidden.dtype in (torch.bfloat16, torch.float16))
        self.ignore_index = int(ignore_index)

    def bias_arg(self):
        return self.bias if self.bias is not None else self.weight  # never read without HAS_BIAS

    def check_labels(self):
        return check_indices(self.labels, self.vt, "label", self.ignore_index)

    def lse_pass(self):
        """(lse, loss, target logit, sum of logits), each [N] in the stat dtype."""
        out = [torch.empty((self.n,), dtype=self.sdt, device=self.hidden.device) for _ in range(4)]
        if self.n > 0:
            wrap_triton(_lse_kernel)[(triton.cdiv(self.n, self.bn),)](
                self.hidden, self.weight, self.bias_arg(), self.labels, *out, *self.common,
                **self.flags, BN=self.bn, BV=self.bv, BD=self.bd, num_warps=self.warps, num_stages=self.stages)
        return out

    def grad_pass(self, lse, g, want_dh, want_dw, want_db):
        """Gradients of sum(g * loss) for the given lse: dh, dw, db (empty [0] when not wanted)."""
        h, w = self.hidden, self.weight
        acc = self.sdt
        dh = torch.zeros((self.n, self.d), dtype=acc, device=h.device) if want_dh else None
        dw = torch.zeros((self.v, self.d), dtype=acc, device=h.device) if want_dw else None
        db = torch.zeros((self.v,), dtype=acc, device=h.device) if want_db else None
        if self.n > 0 and self.valid > 0 and (want_dh or want_dw or want_db):
            g = g.to(acc).contiguous()
            dummy = lse
            grid = (triton.cdiv(self.n, self.bn), triton.cdiv(self.valid, self.bv))
            wrap_triton(_grad_kernel)[grid](
                h, w, self.bias_arg(), self.labels, lse.contiguous(), g, dh if want_dh else dummy,
                dw if want_dw else dummy, db if want_db else dummy, *self.common, G_SCALAR=g.dim() == 0,
                COMPUTE_DH=want_dh, COMPUTE_DW=want_dw, COMPUTE_DB=want_db, **self.flags, BN=self.bn, BV=self.bv,
                BD=self.bd, num_warps=self.warps, num_stages=self.stages)
        dh = dh.to(h.dtype) if want_dh else h.new_empty((0,))
        dw = dw.to(w.dtype) if want_dw else w.new_empty((0,))
        db = db.to(w.dtype) if want_db else w.new_empty((0,))
        return dh, dw, db


def _not_yet(op, **used):
    """The options of the op schemas this backend does not implement yet: refused by name."""
    for name, on in used.items():
        if on:
            raise NotImplementedError(f"tiedkernels: {name} is not implemented on the triton backend yet ({op}); "
                                      "use backend='torch' (or 'cuda' / 'cpu')")


@triton_op("tiedkernels::triton_lce_fwd", mutates_args=())
def lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
            grad_scale: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: float, logit_scale: float, vocab_start: int, vocab_total: int, chunk_size: int,
            compute_dh: bool, compute_dw: bool, compute_db: bool, class_weight: Optional[torch.Tensor] = None,
            return_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    _not_yet("lce_fwd", class_weight=class_weight is not None, return_stats=return_stats)
    a = _Args(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start,
              vocab_total, chunk_size)
    pending = a.check_labels()
    stats = a.lse_pass()
    lse, loss_vec = stats[0], stats[1]
    grads = grad_scale is not None and (compute_dh or compute_dw or compute_db)
    if grad_scale is not None:
        gs = grad_scale.to(a.sdt)
        if gs.dim() not in (0, 1) or (gs.dim() == 1 and gs.shape[0] != a.n):
            raise RuntimeError("tiedkernels: grad scale must be 0-dim or [N]")
        loss = loss_vec.sum() * gs if gs.dim() == 0 else (loss_vec * gs).sum()
        dh, dw, db = a.grad_pass(lse, gs, grads and compute_dh, grads and compute_dw, grads and compute_db)
    else:
        loss = loss_vec
        dh, dw, db = hidden.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,))
    pending.finish()
    return loss, lse, dh, dw, db, hidden.new_empty((0,), dtype=torch.long), hidden.new_empty((0,), dtype=a.sdt)


@triton_op("tiedkernels::triton_lce_bwd", mutates_args=())
def lce_bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: float, logit_scale: float, vocab_start: int, vocab_total: int, chunk_size: int,
            compute_dh: bool, compute_dw: bool, compute_db: bool, class_weight: Optional[torch.Tensor] = None,
            grad_lse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _not_yet("lce_bwd", class_weight=class_weight is not None, grad_lse=grad_lse is not None)
    a = _Args(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start,
              vocab_total, chunk_size)
    if grad_loss.dim() not in (0, 1) or (grad_loss.dim() == 1 and grad_loss.shape[0] != a.n):
        raise RuntimeError("tiedkernels: the incoming gradient must be 0-dim or [N]")
    if lse.shape != (a.n,):
        raise RuntimeError("tiedkernels: lse must be [N]")
    pending = a.check_labels()
    dh, dw, db = a.grad_pass(lse.to(a.sdt), grad_loss, compute_dh, compute_dw, compute_db)
    pending.finish()
    return dh, dw, db


@triton_op("tiedkernels::triton_lce_stats", mutates_args=())
def lce_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
              ignore_index: int, softcap: float, logit_scale: float, vocab_start: int, vocab_total: int,
              chunk_size: int, class_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    _not_yet("lce_stats", class_weight=class_weight is not None)
    a = _Args(hidden, weight, bias, labels, ignore_index, 0.0, 0.0, softcap, logit_scale, vocab_start, vocab_total,
              chunk_size)
    pending = a.check_labels()
    stats = a.lse_pass()
    out = torch.stack([stats[0], stats[2], stats[3]])
    pending.finish()
    return out


OPS = (lce_fwd, lce_bwd, lce_stats,)
