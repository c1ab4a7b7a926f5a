"""Shared pieces of the Triton kernels: the index check, dtypes, launch sizes."""

import os

import torch
import triton.language as tl


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    """Accumulation type inside the kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tl_dtype(dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


def interpreted(t):
    return t.device.type == "cpu"


def dot_precision(dtype):
    """fp32 inputs: the caller asked for fp32, so no silent TF32 (IEEE); lower types use tensor cores."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _tracing(t):
    """True while torch.compile / make_fx / fake tensors trace the op body: no host reads then."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


class _Pending:
    """The device-side result of an index check, read by the host after the op's kernels are queued."""

    def __init__(self, record, host, event, what, n, extra):
        self.record = record  # on the device: (bad?, position, value)
        self.host, self.event, self.what, self.n, self.extra = host, event, what, n, extra

    def finish(self):
        self.event.synchronize()
        bad, pos, val = (int(x) for x in self.host.tolist())
        if bad:
            raise IndexError(f"tiedkernels: {self.what} {val} at position {pos} is outside [0, V) for V={self.n}"
                             f"{self.extra}")


class _Done:
    record = None

    def finish(self):
        return None


_DONE = _Done()


def check_indices(x, n, what, ignore_index=None):
    """Ids/labels must lie in [0, n) (or equal ignore_index); IndexError names the first bad one.

    CPU (the interpreter): checked right away.  CUDA: a few small kernels find the first bad
    entry and copy (position, value) to pinned host memory; the caller queues its own kernels
    (which never read out of bounds: a bad entry yields NaN) and then calls ``finish()``,
    which waits for the copy only, and raises.  Skipped while tracing or capturing a CUDA
    graph (no host read is possible there), and everywhere when TIEDKERNELS_CHECK_INDICES=0;
    the NaN marks the bad token then.
    """
    if x.numel() == 0 or os.environ.get("TIEDKERNELS_CHECK_INDICES", "1") == "0" or _tracing(x):
        return _DONE
    extra = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
    flat = x.reshape(-1)
    bad = (flat < 0) | (flat >= n)
    if ignore_index is not None:
        bad &= flat != ignore_index
    if flat.device.type != "cuda":
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise IndexError(f"tiedkernels: {what} {int(flat[pos])} at position {pos} is outside [0, V) for V={n}"
                             f"{extra}")
        return _DONE
    if torch.cuda.is_current_stream_capturing():
        return _DONE
    pos = bad.to(torch.int32).argmax()
    record = torch.stack([bad.any().to(torch.int64), pos.to(torch.int64), flat[pos].to(torch.int64)])
    host = torch.empty((3,), dtype=torch.int64, pin_memory=True)
    host.copy_(record, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return _Pending(record, host, event, what, n, extra)
