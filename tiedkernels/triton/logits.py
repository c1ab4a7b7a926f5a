"""Triton logits: the GEMM through torch (cuBLAS), the scale/softcap and its derivative as
elementwise Triton kernels in fp32."""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import device_guard, launcher, round_to, same_device, softcap_args, stat_dtype, tanh, tl_acc

BLOCK = 1024  # elements per program (4 warps: 8 per thread)
NUM_WARPS = 4


@triton.jit(do_not_specialize=["has_cap"])
def _transform_kernel(Z, numel, scale, softcap, inv_softcap, has_cap, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(Z + offs, mask=mask, other=0.0)
    x = z.to(ACC) * scale
    if has_cap:
        x = softcap * tanh(x * inv_softcap)
    tl.store(Z + offs, round_to(x, z.dtype), mask=mask)


@triton.jit(do_not_specialize=["has_cap"])
def _transform_bwd_kernel(G, Z, OUT, numel, scale, inv_softcap, has_cap, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0)
    x = g.to(ACC) * scale
    if has_cap:
        t = tl.load(Z + offs, mask=mask, other=0.0).to(ACC) * inv_softcap
        x = x * (1.0 - t * t)
    tl.store(OUT + offs, round_to(x, g.dtype), mask=mask)


@triton_op("tiedkernels::triton_logits_fwd", mutates_args=())
def logits_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], logit_scale: float,
               softcap: float) -> torch.Tensor:
    d = weight.shape[1]
    h2 = hidden.reshape(-1, d)
    has_cap, cap, inv_cap = softcap_args(softcap)
    same_device(weight, hidden=hidden, bias=bias)
    with device_guard(weight):
        z = torch.addmm(bias, h2, weight.t()) if bias is not None else torch.mm(h2, weight.t())
        if (logit_scale != 1.0 or has_cap) and z.numel() > 0:
            launcher(_transform_kernel)[(triton.cdiv(z.numel(), BLOCK),)](
                z, z.numel(), float(logit_scale), cap, inv_cap, has_cap=int(has_cap), ACC=tl_acc(z.dtype),
                BLOCK=BLOCK, num_warps=NUM_WARPS)
    return z.view(*hidden.shape[:-1], weight.shape[0])


@triton_op("tiedkernels::triton_logits_bwd", mutates_args=())
def logits_bwd(grad: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], logit_scale: float, softcap: float, compute_dh: bool, compute_dw: bool,
               compute_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v, d = weight.shape
    g = grad.reshape(-1, v).contiguous()
    dz = g
    has_cap, _, inv_cap = softcap_args(softcap)
    same_device(weight, grad=grad, logits=logits if has_cap else None)
    if (logit_scale != 1.0 or has_cap) and g.numel() > 0:
        dz = torch.empty_like(g)
        z = logits.reshape(-1, v).contiguous() if has_cap else g
        with device_guard(g):
            launcher(_transform_bwd_kernel)[(triton.cdiv(g.numel(), BLOCK),)](
                g, z, dz, g.numel(), float(logit_scale), inv_cap, has_cap=int(has_cap), ACC=tl_acc(g.dtype),
                BLOCK=BLOCK, num_warps=NUM_WARPS)
    h2 = hidden.reshape(-1, d)
    dh = torch.mm(dz, weight).view(hidden.shape) if compute_dh else hidden.new_empty((0,))
    dw = torch.mm(dz.t(), h2) if compute_dw else weight.new_empty((0,))
    if compute_db and bias is not None:
        db = dz.sum(0, dtype=stat_dtype(dz.dtype)).to(dz.dtype)
    else:
        db = weight.new_empty((0,))
    return dh, dw, db


OPS = (logits_fwd, logits_bwd,)
