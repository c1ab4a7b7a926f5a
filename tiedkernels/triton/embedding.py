"""Triton embedding kernels: a checked gather, and the scatter-add backward.

Backward: each vocabulary row's contributions are summed in fp32 in a fixed order (ids
sorted stably, one program per run of equal ids) and added to the row once: deterministic
and one rounding for bf16/fp16.  For fp32 weights outside deterministic mode a plain
atomic-add kernel is used instead (no sort; the summation order then varies run to run).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import check_indices, device_guard, launcher, round_to, same_device, tl_acc

BT = 16  # tokens per program (gather, atomic scatter)
BD = 128  # columns per program
NUM_WARPS = 4


@triton.jit
def _gather_kernel(W, IDS, OUT, T, D, V, stride_wv, stride_wd, BT: tl.constexpr, BD: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    dd = pid_d * BD + tl.arange(0, BD)
    tmask = t < T
    dmask = dd < D
    ids = tl.load(IDS + t, mask=tmask, other=0).to(tl.int64)
    bad = (ids < 0) | (ids >= V)
    safe = tl.where(bad, 0, ids)
    m2 = tmask[:, None] & dmask[None, :]
    vals = tl.load(W + safe[:, None] * stride_wv + dd[None, :].to(tl.int64) * stride_wd, mask=m2, other=0.0)
    # NaN rows for bad ids (reported after the launch); for bf16 placed in fp32 (an exact round trip):
    # the Triton 3.6 interpreter has no bf16 constants
    if vals.dtype == tl.bfloat16:
        vals = tl.where(bad[:, None], float("nan"), vals.to(tl.float32)).to(tl.bfloat16)
    else:
        vals = tl.where(bad[:, None], float("nan"), vals)
    tl.store(OUT + t[:, None].to(tl.int64) * D + dd[None, :], vals, mask=m2)


@triton.jit(do_not_specialize=["has_bad"])
def _scatter_sorted_kernel(SORTED, PERM, RUN_START, RUN_END, G, OUT, BAD, T, D, V, pad, stride_gt, stride_ov,
                           stride_od, has_bad, ACC: tl.constexpr, BD: tl.constexpr):
    p = tl.program_id(0)
    ok = (has_bad == 0) | (tl.load(BAD) == 0)  # BAD is always a readable pointer (a placeholder without has_bad)
    pid_d = tl.program_id(1)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < D
    row = tl.load(SORTED + p)
    start = tl.load(RUN_START + p)
    end = tl.load(RUN_END + p)
    if ok & (start == p) & (row >= 0) & (row < V) & (row != pad):
        acc = tl.zeros([BD], dtype=ACC)
        for q in range(start, end):
            src = tl.load(PERM + q)
            acc += tl.load(G + src * stride_gt + dd, mask=dmask, other=0.0).to(ACC)
        dst = OUT + row * stride_ov + dd.to(tl.int64) * stride_od
        old = tl.load(dst, mask=dmask, other=0.0)
        tl.store(dst, round_to(old.to(ACC) + acc, old.dtype), mask=dmask)


@triton.jit(do_not_specialize=["has_bad"])
def _scatter_atomic_kernel(IDS, G, OUT, BAD, T, D, V, pad, stride_gt, stride_ov, stride_od, has_bad,
                           BT: tl.constexpr, BD: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    dd = pid_d * BD + tl.arange(0, BD)
    ids = tl.load(IDS + t, mask=t < T, other=-1).to(tl.int64)
    ok = (t < T) & (ids >= 0) & (ids < V) & (ids != pad)
    if has_bad:
        ok = ok & (tl.load(BAD + t * 0) == 0)  # per lane: scalar & vector is no bool mask in the interpreter
    m2 = ok[:, None] & (dd < D)[None, :]
    g = tl.load(G + t[:, None].to(tl.int64) * stride_gt + dd[None, :], mask=m2, other=0.0)
    # relaxed: a sum needs no ordering against other memory (the default, acq_rel, fences each add)
    tl.atomic_add(OUT + ids[:, None] * stride_ov + dd[None, :].to(tl.int64) * stride_od, g, mask=m2, sem="relaxed")


def _scatter_into(out, grad, ids, padding_idx, bad=None):
    """out[ids[i]] += grad[i] (rows at padding_idx skipped); out is [V, D], any strides.  ``bad``:
    the index check's device record; when it reports a bad id nothing is written (no host wait)."""
    v, d = out.shape
    flat = ids.reshape(-1).to(torch.int64)
    t = flat.numel()
    if t == 0 or d == 0:
        return
    g = grad.reshape(t, d)
    if g.stride(1) != 1:
        g = g.contiguous()
    pad = -1 if padding_idx is None else int(padding_idx)
    grid = (t, triton.cdiv(d, BD))
    if out.dtype == torch.float32 and not torch.are_deterministic_algorithms_enabled():
        launcher(_scatter_atomic_kernel)[(triton.cdiv(t, BT), triton.cdiv(d, BD))](
            flat.contiguous(), g, out, bad if bad is not None else flat, t, d, v, pad, g.stride(0), out.stride(0),
            out.stride(1), has_bad=int(bad is not None), BT=BT, BD=BD, num_warps=NUM_WARPS)
        return
    sorted_ids, perm = torch.sort(flat, stable=True)
    run_start = torch.searchsorted(sorted_ids, sorted_ids, right=False)
    run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    launcher(_scatter_sorted_kernel)[grid](
        sorted_ids, perm, run_start, run_end, g, out, bad if bad is not None else flat, t, d, v, pad, g.stride(0),
        out.stride(0), out.stride(1), has_bad=int(bad is not None), ACC=tl_acc(out.dtype), BD=BD, num_warps=NUM_WARPS)


@triton_op("tiedkernels::triton_embedding_fwd", mutates_args=())
def embedding_fwd(weight: torch.Tensor, ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    v, d = weight.shape
    same_device(weight, ids=ids)
    with device_guard(weight):
        pending = check_indices(ids, v, "id")
        flat = ids.reshape(-1).contiguous()
        t = flat.numel()
        out = weight.new_empty((t, d))
        if t > 0 and d > 0:
            launcher(_gather_kernel)[(triton.cdiv(t, BT), triton.cdiv(d, BD))](
                weight, flat, out, t, d, v, weight.stride(0), weight.stride(1), BT=BT, BD=BD, num_warps=NUM_WARPS)
        pending.finish()
    return out.view(*ids.shape, d)


@triton_op("tiedkernels::triton_embedding_bwd", mutates_args=())
def embedding_bwd(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: Optional[int]) -> torch.Tensor:
    same_device(grad, ids=ids)
    with device_guard(grad):
        pending = check_indices(ids, num_weights, "id")
        out = grad.new_zeros((num_weights, grad.shape[-1]))
        _scatter_into(out, grad, ids, padding_idx, pending.record)
        pending.finish()
    return out


@triton_op("tiedkernels::triton_embedding_bwd_acc_", mutates_args={"grad_weight"})
def embedding_bwd_acc_(grad_weight: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor,
                       padding_idx: Optional[int]) -> None:
    if grad.dtype != grad_weight.dtype:
        raise ValueError(f"tiedkernels: gradient dtype {grad.dtype} does not match the weight's {grad_weight.dtype}")
    same_device(grad_weight, grad=grad, ids=ids)
    with device_guard(grad_weight):
        pending = check_indices(ids, grad_weight.shape[0], "id")
        _scatter_into(grad_weight, grad, ids, padding_idx, pending.record)
        pending.finish()


OPS = (embedding_fwd, embedding_bwd, embedding_bwd_acc_,)
