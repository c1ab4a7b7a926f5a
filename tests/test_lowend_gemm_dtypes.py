"""The GEMMs with an fp32 output from bf16/fp16 operands that both GPU backends run (the multi-chunk
dW, accumulated by the GEMM itself into fp32, and the fp32 logits): registered for CUDA in this
torch and accepting those dtypes. Older torch releases rejected mixed dtypes there.

The overloads, exactly:

* ``csrc/lce_driver.cpp`` (the ``cuda`` backend): ``at::mm_out(out, a, b, out_dtype)`` is
  ``aten::mm.dtype_out`` and ``at::addmm_out(out, self, a, b, out_dtype)`` is
  ``aten::addmm.dtype_out`` (ATen/ops/mm.h and addmm.h), with ``self`` the fp32 dW itself;
* ``tiedkernels/triton/cross_entropy.py``: ``torch.ops.aten.mm.dtype_out`` and
  ``torch.ops.aten.addmm.dtype_out``, which functionalization (``torch.compile``) turns into
  ``aten::mm.dtype`` and ``aten::addmm.dtype``.

``make test`` runs this file in the low end's venv (mk/lowend.mk: torch 2.11, a CUDA build that runs
on the CPU) with TIEDKERNELS_EXPECT_CUDA_TORCH=1, where the checks that need a CUDA build of torch
must run. No GPU runs the kernels here: their dtype rules are read from the meta functions (which
carry the CUDA kernels' checks) and, for the dtype of ``self``, which the meta function does not
check, from the CUDA library's own check messages. The meta function of ``addmm.dtype`` is broken
in torch 2.11 (test_meta_addmm_with_fp32_output): code that torch.compile traces must not call
``addmm.dtype``/``addmm.dtype_out`` at the low end.
"""

import mmap
import os

import pytest
import torch

OVERLOADS = ("aten::mm.dtype_out", "aten::addmm.dtype_out", "aten::mm.dtype", "aten::addmm.dtype")
LOW_PRECISION = (torch.bfloat16, torch.float16)

needs_cuda_torch = pytest.mark.skipif(
    not torch.version.cuda and os.environ.get("TIEDKERNELS_EXPECT_CUDA_TORCH") != "1",
    reason="a CPU build of torch registers no CUDA kernels (the low end's venv runs these)")


@needs_cuda_torch
def test_cuda_build_of_torch():
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"


@needs_cuda_torch
@pytest.mark.parametrize("op", OVERLOADS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), \
        f"torch {torch.__version__} has no CUDA kernel for {op}"


def _operands(dtype, v=48, d=40, rows=24):
    """A chunk's dL/dz [rows, V] and hidden rows [rows, D], as the backends pass them (dz transposed,
    a view), and the fp32 dW [V, D]."""
    dz = torch.empty(rows, v, dtype=dtype, device="meta")
    hc = torch.empty(rows, d, dtype=dtype, device="meta")
    return dz.t(), hc, torch.empty(v, d, dtype=torch.float32, device="meta")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_meta_mm_takes_low_precision_operands_with_fp32_output(dtype):
    a, b, dw = _operands(dtype)
    f32 = torch.float32
    out = torch.ops.aten.mm.dtype_out(a, b, f32, out=torch.empty_like(dw))
    r = torch.ops.aten.mm.dtype(a, b, f32)
    for x in (out, r):
        assert x.dtype == f32 and x.shape == dw.shape and x.device.type == "meta"
    # the logits' GEMM: h_c [rows, D] x W^T
    h = torch.empty(24, 40, dtype=dtype, device="meta")
    w = torch.empty(48, 40, dtype=dtype, device="meta")
    z = torch.ops.aten.mm.dtype_out(h, w.t(), f32, out=torch.empty(24, 48, dtype=f32, device="meta"))
    assert z.dtype == f32 and z.shape == (24, 48)


def _torch_version():
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_meta_addmm_with_fp32_output(dtype):
    """The accumulating call, addmm.dtype_out(dW, a, b, fp32, out=dW). Up to torch 2.11 (2.12 not
    checked; 2.13 and 2.14 have their own decomposition) its meta function is the plain addmm
    decomposition, registered for every overload, which takes out_dtype for beta and fails with a
    TypeError: an eager CUDA call never meets it (the CUDA kernel runs), but any trace with fake
    tensors does (torch.compile of code that calls it, the meta device)."""
    a, b, dw = _operands(dtype)
    f32 = torch.float32
    calls = (lambda: torch.ops.aten.addmm.dtype_out(dw, a, b, f32, out=dw),
             lambda: torch.ops.aten.addmm.dtype(dw, a, b, f32))
    if _torch_version() < (2, 13):
        for call in calls:
            with pytest.raises(TypeError, match="unsupported operand"):
                call()
        return
    assert calls[0]() is dw
    r = calls[1]()
    assert r.dtype == f32 and r.shape == dw.shape and r.device.type == "meta"


@pytest.mark.parametrize("inputs, out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                               (torch.float16, torch.float64)])
def test_meta_carries_the_dtype_check(inputs, out_dtype):
    """The acceptance above is the meta function's checked answer, not one it gives to anything."""
    a, b, _ = _operands(inputs)
    with pytest.raises(RuntimeError, match="out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs"):
        torch.ops.aten.mm.dtype(a, b, out_dtype)


@needs_cuda_torch
def test_cuda_addmm_accepts_an_fp32_self():
    """addmm.dtype_out(dW, a, b, fp32, out=dW) with dW in fp32 and a, b in bf16/fp16: the meta function
    does not check self's dtype, the CUDA kernel does. Releases that required self to have mat2's dtype
    (rejecting the fp32 accumulator) carry "self and mat2 must have the same dtype" in libtorch_cuda;
    those that take it carry "self dtype must match either out_dtype or mat1 dtype" instead."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as lib:
        assert lib.find(b"out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs") >= 0, path
        assert lib.find(b"self dtype must match either out_dtype or mat1 dtype") >= 0, \
            f"torch {torch.__version__}: addmm.dtype_out's CUDA kernel has no check that admits an fp32 self"
        assert lib.find(b"self and mat2 must have the same dtype") < 0, \
            f"torch {torch.__version__}: addmm.dtype_out's CUDA kernel requires self in the operands' dtype"
