"""No host synchronisation in the torch backend's index checks on CUDA tensors.

There is no GPU here, so the CUDA logic is reached two ways: a fake CUDA tensor (the device the
check sees, with no data to read), and CPU tensors routed through the device-side check while
every way Python reads a tensor's value on the host is counted.
"""

from unittest import mock

import pytest
import torch

import tiedkernels
from tiedkernels import _torch_backend as tb

V, D = 7, 4


class _HostReads:
    """Counts (and names) every host read of a tensor's value made from Python meanwhile."""

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu", "numpy")

    def __init__(self):
        self.reads = []

    def __enter__(self):
        self._patches = []
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(t, *args, _orig=orig, _name=name, **kwargs):
                self.reads.append(_name)
                return _orig(t, *args, **kwargs)

            p = mock.patch.object(torch.Tensor, name, counted)
            p.start()
            self._patches.append(p)
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.stop()


class _DeviceAsserts:
    """Records torch._assert_async's (condition, message) instead of checking them."""

    def __init__(self):
        self.calls = []

    def __call__(self, cond, msg=None):
        self.calls.append((cond, msg))


def test_fake_cuda_tensor_takes_the_device_assert():
    """A CUDA tensor (fake: no data, so any host read would raise) is checked by a device-side
    assert naming V and the ignore_index, and its value is never read on the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    asserts = _DeviceAsserts()
    with mock.patch.object(torch, "_assert_async", asserts), FakeTensorMode():
        ids = torch.randint(0, V, (5,), device="cuda")
        tb.check_index_range(ids, V, "id")
        tb.check_index_range(ids, V, "label", -100)
    assert [m for _, m in asserts.calls] == [
        f"tiedkernels: some id is outside [0, V) for V={V}",
        f"tiedkernels: some label is outside [0, V) for V={V} and is not ignore_index=-100",
    ]


@pytest.fixture
def routed(monkeypatch):
    """CPU tensors take the CUDA path of the index checks; the device asserts are recorded."""
    asserts = _DeviceAsserts()
    monkeypatch.setattr(tb, "_checks_on_device", lambda x: True, raising=False)
    monkeypatch.setattr(torch, "_assert_async", asserts)
    return asserts


def test_check_index_range_reads_nothing_on_the_host(routed):
    """The device path's condition holds exactly where every value is in range (or ignored)."""
    cases = [(torch.tensor([0, 3, V - 1]), None, True), (torch.tensor([0, V]), None, False),
             (torch.tensor([-1, 2]), None, False), (torch.tensor([-100, 2]), -100, True),
             (torch.tensor([-100, 2, V + 3]), -100, False)]
    with _HostReads() as host:
        for x, ii, _ in cases:
            tb.check_index_range(x, V, "label", ii)
    assert host.reads == []
    assert len(routed.calls) == len(cases)
    for (cond, msg), (_, _, ok) in zip(routed.calls, cases):
        assert cond.dim() == 0 and cond.dtype == torch.bool and bool(cond) == ok
        assert f"V={V}" in msg


def test_torch_backend_ops_read_nothing_on_the_host(routed):
    """Every torch-backend op that checks indices (embedding forward and both backwards, the
    loss forward in both strategies, its backward with grad_lse, the statistics) runs with no host
    read once its check takes the CUDA path."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, D, generator=g)
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (6,), generator=g)
    y[1] = -100
    opts = (-100, 0.1, 1e-3, 2.0, 0.9, 0, 0, 4)  # ignore_index, smoothing, z_loss, softcap, scale, start, total, chunk
    with _HostReads() as host:
        e = tb.embedding_fwd(w, y.clamp(min=0), None)
        tb.embedding_bwd(e, y.clamp(min=0), V, 0)
        tb.embedding_bwd_acc_(torch.zeros_like(w), e, y.clamp(min=0), None)
        tb.lce_fwd(h, w, b, y, None, *opts, False, False, False)
        _, lse, *_ = tb.lce_fwd(h, w, b, y, torch.tensor(0.5), *opts, True, True, True, return_stats=True)
        tb.lce_bwd(torch.randn(6, generator=g), h, w, b, y, lse, *opts, True, True, True,
                   grad_lse=torch.randn(6, generator=g))
        tb.lce_stats(h, w, b, y, -100, 2.0, 0.9, 0, V, 4)
    assert host.reads == []
    assert len(routed.calls) == 7 and all(bool(c) for c, _ in routed.calls)


def test_out_of_range_on_the_cpu_names_the_value():
    """On CPU tensors the check stays on the host (free there) and names the value and position."""
    with pytest.raises(IndexError, match=rf"label {V + 2} at position 2 is outside \[0, V\) for V={V} and is "
                                         "not ignore_index=-100"):
        tb.check_index_range(torch.tensor([1, -100, V + 2, -5]), V, "label", -100)
    w = torch.randn(V, D)
    with pytest.raises(IndexError, match=rf"id -1 at position 1 is outside \[0, V\) for V={V}"):
        tiedkernels.embedding(torch.tensor([0, -1]), w, backend="torch")
    with pytest.raises(IndexError, match=rf"label {V} at position 0 is outside"):
        tiedkernels.linear_cross_entropy(torch.randn(2, D), w, torch.tensor([V, 0]), backend="torch")


def test_routed_device_assert_fails_on_a_bad_value(monkeypatch):
    """The real torch._assert_async (which checks at once on CPU tensors) fails on the device
    path's condition for an out-of-range value, with the message naming V."""
    monkeypatch.setattr(tb, "_checks_on_device", lambda x: True, raising=False)
    tb.check_index_range(torch.tensor([0, V - 1, -100]), V, "label", -100)
    with pytest.raises(RuntimeError, match=rf"some label is outside \[0, V\) for V={V}"):
        tb.check_index_range(torch.tensor([0, V]), V, "label", -100)
