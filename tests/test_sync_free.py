"""The index check of the torch backend (and of the composite and vocabulary-parallel paths) on
CUDA tensors: no host synchronisation before the op's work is queued, no out-of-bounds read, and
still the IndexError naming the value, its position and V.

There is no GPU here, so the CUDA logic is reached two ways: CPU tensors routed down the CUDA path
with ``torch.cuda`` mocked (the event, the stream, the pinned buffer; as tests/test_triton.py's GPU
path), with every torch call and every host read of a tensor's value logged in order; and fake CUDA
tensors (the device the check sees, with no data to read).
"""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tiedkernels
from tiedkernels import _composite, _index_check
from tiedkernels import _torch_backend as tb
from tiedkernels import distributed

V, D = 7, 4
_HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy")
# ignore_index, smoothing, z_loss, softcap, scale, vocab_start, vocab_total, chunk (two chunks of 6 rows)
OPTS = (-100, 0.1, 1e-3, 2.0, 0.9, 0, 0, 4)


class _Routed:
    """CPU tensors take the CUDA path of the index check, torch.cuda mocked.  ``log``: in order,
    ("op", name) for every torch call made from Python, ("record",) and ("wait",) for the check's
    event, ("read", name, pinned?) for every host read of a tensor's value."""

    def __init__(self, monkeypatch):
        self.log, self.hosts = [], []
        log = self

        class Event:
            def record(self, stream):
                log.log.append(("record",))

            def synchronize(self):
                log.log.append(("wait",))

        def pinned(n):
            buf = torch.empty((n,), dtype=torch.int64)
            log.hosts.append(buf)
            return buf

        monkeypatch.setattr(_index_check, "on_gpu", lambda t: True)
        monkeypatch.setattr(_index_check, "pinned", pinned)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", device))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        for name in _HOST_READS:
            real = getattr(torch.Tensor, name)

            def read(t, *args, _real=real, _name=name, **kwargs):
                log.log.append(("read", _name, any(t is h for h in log.hosts)))
                return _real(t, *args, **kwargs)

            read.real = real
            monkeypatch.setattr(torch.Tensor, name, read)

    def calls(self):
        """A torch-function mode logging every torch call (but the host reads, logged already)."""
        log = self.log

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                real = getattr(func, "real", None)
                if real is not None:  # a host read (logged already) dispatched here once more
                    return real(*args, **kwargs)
                log.append(("op", getattr(func, "__name__", str(func))))
                return func(*args, **kwargs)

        return Calls()


def _inputs(bad=None):
    """hidden [6, D], weight [V, D], bias [V], labels [6] (one ignored), ids [2, 3]; ``bad``
    replaces labels[3] and ids[1, 1]."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, D, generator=g)
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g)
    y = torch.tensor([1, -100, 6, 0, 3, 2])
    ids = torch.tensor([[0, 5, 6], [2, 1, 3]])
    if bad is not None:
        y[3] = bad
        ids[1, 1] = bad
    return h, w, b, y, ids


def _calls(bad=None):
    """(name, thunk, what, V, position) of every op whose index check takes the CUDA path."""
    h, w, b, y, ids = _inputs(bad)
    e = torch.randn(2, 3, D)
    opts = _composite.Opts(*OPTS)
    return [
        ("embedding_fwd", lambda: tb.embedding_fwd(w, ids, None), "id", V, 4),
        ("embedding_bwd", lambda: tb.embedding_bwd(e, ids, V, 0), "id", V, 4),
        ("embedding_bwd_acc_", lambda: tb.embedding_bwd_acc_(torch.zeros_like(w), e, ids, None), "id", V, 4),
        ("lce_fwd", lambda: tb.lce_fwd(h, w, b, y, None, *OPTS, False, False, False), "label", V, 3),
        ("lce_fwd_grads", lambda: tb.lce_fwd(h, w, b, y, torch.tensor(0.5), *OPTS, True, True, True,
                                             return_stats=True), "label", V, 3),
        ("lce_bwd", lambda: tb.lce_bwd(torch.rand(6), h, w, b, y, torch.rand(6), *OPTS, True, True, True,
                                       grad_lse=torch.rand(6)), "label", V, 3),
        ("lce_stats", lambda: tb.lce_stats(h, w, b, y, -100, 2.0, 0.9, 0, V, 4, class_weight=torch.rand(V)),
         "label", V, 3),
        ("composite_embedding", lambda: _composite.embedding(w, ids, None), "id", V, 4),
        ("composite_lce", lambda: _composite.linear_cross_entropy(h, w, b, y, opts, class_weight=torch.rand(V)),
         "label", V, 3),
        ("vocab_parallel_embedding", lambda: distributed.vocab_parallel_embedding(ids, w, backend="torch"), "id", V,
         4),
    ]


_NAMES = [c[0] for c in _calls()]


@pytest.mark.parametrize("i", range(len(_NAMES)), ids=_NAMES)
def test_op_queues_its_work_before_the_only_host_read(monkeypatch, i):
    """Each op records its check's event, queues all of its work, and only then waits for that
    event; the one host read is finish()'s read of the pinned buffer, after the wait."""
    dev = _Routed(monkeypatch)
    name, run, *_ = _calls()[i]
    with dev.calls():
        run()
    log = dev.log
    checks = 2 if name == "vocab_parallel_embedding" else 1  # and its backend op's own, of the local ids
    assert log.count(("record",)) == checks and log.count(("wait",)) == checks, log
    waits = [k for k, e in enumerate(log) if e == ("wait",)]
    reads = [k for k, e in enumerate(log) if e[0] == "read"]
    assert [log[k] for k in reads] == [("read", "tolist", True)] * checks, f"{name} read on the host: {log}"
    assert reads == [k + 1 for k in waits], f"{name} read before a wait: {log}"
    assert log[waits[-1] + 1:] == [("read", "tolist", True)], f"{name} did work after the wait: {log[waits[-1]:]}"
    rec = max(k for k, e in enumerate(log) if e == ("record",))
    assert rec < waits[-1] and any(e[0] == "op" for e in log[rec + 1:waits[-1]]), f"{name} queued nothing before"


@pytest.mark.parametrize("bad", [V, -3])
@pytest.mark.parametrize("i", range(len(_NAMES)), ids=_NAMES)
def test_routed_bad_value_names_value_position_and_v(monkeypatch, i, bad):
    """Through the CUDA path, a bad id or label still raises the IndexError naming its value, its
    (flat) position and V; the op's work ran first without an out-of-bounds read (a CPU index
    out of range would raise PyTorch's own error instead)."""
    dev = _Routed(monkeypatch)
    name, run, what, n, pos = _calls(bad)[i]
    extra = " and is not ignore_index=-100" if what == "label" else ""
    with pytest.raises(IndexError, match=rf"^tiedkernels: {what} {bad} at position {pos} is outside \[0, V\) for "
                                         rf"V={n}{extra}$"):
        run()
    assert dev.log[-2:] == [("wait",), ("read", "tolist", True)]


def _checks_off(monkeypatch):
    dev = _Routed(monkeypatch)
    monkeypatch.setenv("TIEDKERNELS_CHECK_INDICES", "0")
    return dev


def test_checks_off_embedding_gives_nan_rows(monkeypatch):
    """TIEDKERNELS_CHECK_INDICES=0: no event, no host read, and a bad id's row is NaN (the other
    rows exact), on the torch backend, the composite path and the vocabulary-parallel embedding."""
    dev = _checks_off(monkeypatch)
    _, w, _, _, ids = _inputs(bad=V + 5)
    good = ids.clone()
    good[1, 1] = 0
    want = w[good]
    outs = (tb.embedding_fwd(w, ids, None), _composite.embedding(w, ids, None),
            distributed.vocab_parallel_embedding(ids, w, backend="torch"))
    assert dev.log == []
    for out in outs:
        assert out.shape == (2, 3, D)
        assert out[1, 1].isnan().all()
        keep = torch.ones(2, 3, dtype=torch.bool)
        keep[1, 1] = False
        assert torch.equal(out[keep], want[keep])


def test_checks_off_loss_gives_nan_at_the_bad_token(monkeypatch):
    """TIEDKERNELS_CHECK_INDICES=0: a bad label's token has a NaN loss, lse and hidden-gradient row;
    every other token's loss and gradient row equals the one computed with that token ignored
    (the token's own row and the weight gradient are its only reach)."""
    h, w, b, y, _ = _inputs(bad=V)
    ref = y.clone()
    ref[3] = -100
    gl = torch.rand(6, generator=torch.Generator().manual_seed(1))
    want_loss, want_lse, *_ = tb.lce_fwd(h, w, b, ref, None, *OPTS, False, False, False)
    want_dh, _, _ = tb.lce_bwd(gl, h, w, b, ref, want_lse, *OPTS, True, False, False)
    dev = _checks_off(monkeypatch)
    loss, lse, *_ = tb.lce_fwd(h, w, b, y, None, *OPTS, False, False, False)
    dh, _, _ = tb.lce_bwd(gl, h, w, b, y, lse, *OPTS, True, False, False)
    comp_loss, comp_lse = _composite.linear_cross_entropy(h, w, b, y, _composite.Opts(*OPTS))
    assert dev.log == []
    others = torch.arange(6) != 3
    for got_loss, got_lse in ((loss, lse), (comp_loss, comp_lse)):
        assert math.isnan(got_loss[3]) and math.isnan(got_lse[3])
        torch.testing.assert_close(got_lse[others], want_lse[others], rtol=1e-6, atol=1e-6)
        # the ignored reference token's loss is 0; every other token's is the same
        torch.testing.assert_close(got_loss[others], want_loss[others], rtol=1e-6, atol=1e-6)
    assert dh[3].isnan().all()
    torch.testing.assert_close(dh[others], want_dh[others], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("off", [False, True], ids=["checks_on", "checks_off"])
def test_in_place_embedding_backward_writes_nothing_for_a_bad_id(monkeypatch, off):
    """The in-place embedding backward leaves its buffer untouched when any id is bad (with the
    check on it then raises; off, silently writing the good rows would hide the error), and the
    out-of-place one returns zeros; with good ids both add every row."""
    dev = _checks_off(monkeypatch) if off else _Routed(monkeypatch)
    _, w, _, _, ids = _inputs(bad=-1)
    e = torch.randn(2, 3, D)
    buf = torch.randn(V, D)
    before = buf.clone()
    if off:
        tb.embedding_bwd_acc_(buf, e, ids, None)
        assert torch.equal(tb.embedding_bwd(e, ids, V, None), torch.zeros(V, D))
    else:
        with pytest.raises(IndexError, match=r"id -1 at position 4"):
            tb.embedding_bwd_acc_(buf, e, ids, None)
    assert torch.equal(buf, before)
    ids[1, 1] = 4
    tb.embedding_bwd_acc_(buf, e, ids, 2)
    want = before.double().index_add(0, ids.reshape(-1), e.reshape(-1, D).double() * (ids.reshape(-1, 1) != 2))
    torch.testing.assert_close(buf.double(), want, rtol=1e-6, atol=1e-6)
    assert dev.log.count(("wait",)) == (0 if off else 2)


def test_fake_cuda_tensors_take_the_device_path_with_no_read(monkeypatch):
    """CUDA tensors (fake: no data, so any host read would raise) get a device mask and no host
    read; under a tracing mode the check itself is skipped (no read is possible there), and the
    embedding still runs with the mask keeping its reads in bounds.  (The loss slices its rows,
    which fake CUDA tensors refuse without a CUDA build.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    reads = []
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name, **k: reads.append(_n) or _r(t, *a, **k))
    with FakeTensorMode():
        ids = torch.randint(0, V, (2, 3), device="cuda")
        w = torch.randn(V, D, device="cuda")
        pending, bad = tb.check_index_range(ids, V, "id")
        assert pending is _index_check._DONE
        assert bad.shape == (6,) and bad.dtype == torch.bool and bad.device.type == "cuda"
        out = tb.embedding_fwd(w, ids, None)
        assert out.shape == (2, 3, D) and out.device.type == "cuda"
    assert reads == []


def test_out_of_range_on_the_cpu_names_the_value():
    """On CPU tensors the check stays on the host (free there), names the value and position, and
    hands the op no mask (no extra work)."""
    with pytest.raises(IndexError, match=rf"label {V + 2} at position 2 is outside \[0, V\) for V={V} and is "
                                         "not ignore_index=-100"):
        tb.check_index_range(torch.tensor([1, -100, V + 2, -5]), V, "label", -100)
    assert tb.check_index_range(torch.tensor([[0, V - 1], [-100, 2]]), V, "label", -100) == (_index_check._DONE, None)
    w = torch.randn(V, D)
    with pytest.raises(IndexError, match=rf"id -1 at position 1 is outside \[0, V\) for V={V}"):
        tiedkernels.embedding(torch.tensor([0, -1]), w, backend="torch")
    with pytest.raises(IndexError, match=rf"label {V} at position 0 is outside"):
        tiedkernels.linear_cross_entropy(torch.randn(2, D), w, torch.tensor([V, 0]), backend="torch")
