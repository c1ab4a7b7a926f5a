"""The index check shared by the ``torch`` and ``triton`` backends, without a host sync on a GPU.

An id or label outside ``[0, V)`` must raise an IndexError naming it, on every backend, and never
read out of bounds on the device (a device-side assert kills the CUDA context).  On CPU tensors the
check reads the values right away (free there).  On CUDA tensors a few small device ops find the
first bad entry and copy (bad?, position, value) to pinned host memory, with an event on the
tensor's stream; the op queues its own work, which never reads out of bounds (a bad entry yields
NaN), and only then ``finish()`` waits for that copy and raises.
"""

import os

import torch


def _tracing(t):
    """True while torch.compile / make_fx / fake tensors trace the op body: no host reads then."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def on_gpu(t):
    """Whether ``t``'s check is queued on its device (a CUDA tensor) rather than read at once."""
    return t.device.type == "cuda"


def enabled():
    """Whether the checks run (TIEDKERNELS_CHECK_INDICES=0 turns them off: NaN marks a bad entry)."""
    return os.environ.get("TIEDKERNELS_CHECK_INDICES", "1") != "0"


def out_of_range(x, n, ignore_index=None):
    """The mask of ``x``'s entries outside ``[0, n)`` that are not ``ignore_index``."""
    bad = (x < 0) | (x >= n)
    if ignore_index is not None:
        bad &= x != ignore_index
    return bad


def pinned(n):
    """A page-locked int64 host buffer: the target of an asynchronous device-to-host copy."""
    return torch.empty((n,), dtype=torch.int64, pin_memory=True)


def _message(what, val, pos, n, extra):
    return f"tiedkernels: {what} {val} at position {pos} is outside [0, V) for V={n}{extra}"


class _Pending:
    """The device-side result of an index check, read by the host after the op's work is queued."""

    def __init__(self, record, host, event, what, n, extra):
        self.record = record  # on the device: (bad?, position, value)
        self.host, self.event, self.what, self.n, self.extra = host, event, what, n, extra

    def finish(self):
        """Wait for the check's own copy (recorded before the op's work, which keeps the GPU busy
        meanwhile; no stream or device synchronisation) and raise for a bad entry."""
        self.event.synchronize()
        bad, pos, val = (int(x) for x in self.host.tolist())
        if bad:
            raise IndexError(_message(self.what, val, pos, self.n, self.extra))


class _Done:
    record = None

    def finish(self):
        return None


_DONE = _Done()


def device_record(flat, bad):
    """[bad?, first bad position, its value] (int64) on ``flat``'s device, by device ops only:
    ``flat[pos]`` with a 0-dim device tensor ``pos`` would be an ``.item()`` (a full device sync)."""
    pos = bad.to(torch.int32).argmax().reshape(1).to(torch.int64)
    return torch.cat([bad.any().reshape(1).to(torch.int64), pos, flat.gather(0, pos).to(torch.int64)])


def check_indices(x, n, what, ignore_index=None, *, gpu=None, bad=None, host=None):
    """Ids/labels must lie in [0, n) (or equal ignore_index); IndexError names the first bad one.

    CPU: checked right away.  CUDA (``gpu``, by default ``on_gpu(x)``): the record is queued and
    copied to a pinned buffer (``host(3)``, by default ``pinned(3)``) with an event on ``x``'s
    stream; the caller queues its own work (which never reads out of bounds: a bad entry yields
    NaN) and then calls ``finish()``, which waits for that copy only, and raises.  No host read
    before the work is queued.  Skipped while tracing or capturing a CUDA graph (no host read is
    possible there), and everywhere when TIEDKERNELS_CHECK_INDICES=0; the NaN marks the bad token
    then.  ``bad``: the caller's ``out_of_range`` mask of ``x`` (flattened), when it has one.
    """
    if x.numel() == 0 or not enabled() or _tracing(x):
        return _DONE
    extra = "" if ignore_index is None else f" and is not ignore_index={ignore_index}"
    flat = x.reshape(-1)
    if bad is None:
        bad = out_of_range(flat, n, ignore_index)
    if not (on_gpu(x) if gpu is None else gpu):
        if bool(bad.any()):
            pos = int(bad.reshape(-1).nonzero()[0, 0])
            raise IndexError(_message(what, int(flat[pos]), pos, n, extra))
        return _DONE
    if torch.cuda.is_current_stream_capturing():
        return _DONE
    record = device_record(flat, bad.reshape(-1))
    buf = (pinned if host is None else host)(3)
    buf.copy_(record, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat.device))
    return _Pending(record, buf, event, what, n, extra)
