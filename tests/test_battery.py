"""A battery of bad inputs, each run in a worker subprocess: no crash, no hang, the expected clear error.

Every case below is one bad (or borderline) call; the worker (this file run as a script, one per
backend, with the Triton interpreter on so the ``triton`` backend runs on CPU tensors) executes the
cases one by one and reports the exception's class and message.  A case passes when the call
raises the expected class with a message naming the problem (or, for the ``ok`` rows, returns
PyTorch's value).  A worker that dies (a segfault, an abort) or takes longer than ``CASE_TIMEOUT``
seconds fails that case and is restarted for the next one.
"""

import json
import math
import os
import re
import select
import subprocess
import sys
import time
import traceback

import pytest
import torch

F64 = torch.float64
N, D, V = 7, 5, 11
CASE_TIMEOUT = float(os.environ.get("TIEDKERNELS_BATTERY_TIMEOUT", "120"))


# ------------------------------------------------------------------------------------------
# the cases (run in the worker)


def _x(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, dtype=F64).requires_grad_(requires_grad)
    w = torch.randn(V, D, generator=g, dtype=F64).requires_grad_(requires_grad)
    b = torch.randn(V, generator=g, dtype=F64).requires_grad_(requires_grad)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, b, y


def _lce(backend, **kw):
    import tiedkernels as tk

    h, w, b, y = _x()
    args = {"hidden": h, "weight": w, "labels": y}
    for k in ("hidden", "weight", "labels"):
        if k in kw:
            args[k] = kw.pop(k)
    return tk.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], backend=backend, **kw)


def _logits(backend, **kw):
    import tiedkernels as tk

    h, w, b, y = _x()
    return tk.logits(kw.pop("hidden", h), kw.pop("weight", w), backend=backend, **kw)


def _embed(backend, ids, **kw):
    import tiedkernels as tk

    return tk.embedding(ids, kw.pop("weight", _x()[1]), backend=backend, **kw)


def _meta(t):
    return t.detach().to("meta")


def _head(backend, **kw):
    import tiedkernels as tk

    return tk.TiedEmbeddingHead(V, D, dtype=F64, backend=backend, **kw)


def _vp_head(backend, **kw):
    from tiedkernels.distributed import VocabParallelTiedEmbeddingHead

    return VocabParallelTiedEmbeddingHead(V, D, dtype=F64, backend=backend, **kw)


def _vp_lce(backend, **kw):
    from tiedkernels.distributed import vocab_parallel_linear_cross_entropy

    h, w, b, y = _x()
    return vocab_parallel_linear_cross_entropy(kw.pop("hidden", h), kw.pop("weight", w), kw.pop("labels", y),
                                               backend=backend, **kw)


def _value_ok(backend, **kw):
    """A borderline valid call: PyTorch's value (the fp64 reference) and a finite gradient."""
    from tiedkernels import reference as R

    h, w, b, _ = _x()
    ref_kw = dict(kw)
    y = ref_kw.pop("labels", _x()[3])
    ref_kw.pop("chunk_size", None)
    if ref_kw.get("softcap") == math.inf:
        ref_kw["softcap"] = None
    if isinstance(ref_kw.get("num_items_in_batch"), torch.Tensor):
        ref_kw["num_items_in_batch"] = float(ref_kw["num_items_in_batch"].reshape(()))
    loss = _lce(backend, **kw)
    ref = R.linear_cross_entropy(h.detach(), w.detach(), y, **ref_kw)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-10, atol=1e-10)
    if loss.requires_grad:
        loss.sum().backward()
    return f"loss {float(loss.sum()):.6f} matches the reference"


def _raises(cls, *patterns):
    return ("raises", cls, patterns)


OK = ("ok",)
TKE = "TiedKernelsError"
h_, w_, b_, y_ = _x(False)

CASES = {
    # shapes and ranks
    "hidden last dim != D": (lambda be: _lce(be, hidden=torch.randn(N, D + 2, dtype=F64)),
                             _raises(TKE, r"\(7, 7\)", r"\(11, 5\)")),
    "logits hidden last dim != D": (lambda be: _logits(be, hidden=torch.randn(N, 1, dtype=F64)),
                                    _raises(TKE, r"\(7, 1\)", r"\(11, 5\)")),
    "labels shape != hidden": (lambda be: _lce(be, labels=y_[:-1]), _raises(TKE, r"\(6,\)", r"\(7, 5\)")),
    "labels 2-D for 1-D tokens": (lambda be: _lce(be, labels=y_[:, None]), _raises(TKE, r"\(7, 1\)")),
    "bias shape": (lambda be: _lce(be, bias=torch.randn(V + 1, dtype=F64)), _raises(TKE, r"\(12,\)", r"\[V\]")),
    "bias 2-D": (lambda be: _logits(be, bias=torch.randn(1, V, dtype=F64)), _raises(TKE, r"\(1, 11\)")),
    "weight 1-D": (lambda be: _lce(be, weight=w_.reshape(-1)), _raises(TKE, r"\[V, D\]", r"\(55,\)")),
    "weight K-dimensional": (lambda be: _lce(be, weight=torch.randn(V, 2, D, dtype=F64)),
                             _raises(TKE, "K-dimensional", r"\(11, 2, 5\)")),
    "hidden 0-dim": (lambda be: _lce(be, hidden=torch.tensor(1.0, dtype=F64), labels=torch.tensor(1)),
                     _raises(TKE, r"\(\)")),
    "shift without a sequence dim": (lambda be: _lce(be, hidden=h_[0], labels=y_[0], shift=True),
                                     _raises(TKE, "sequence dimension")),
    "V = 0": (lambda be: _lce(be, weight=torch.randn(0, D, dtype=F64)), _raises(TKE, r"V >= 1", r"\(0, 5\)")),
    # dtypes
    "hidden fp32, weight fp64": (lambda be: _lce(be, hidden=h_.float()), _raises(TKE, "float32", "float64")),
    "bias fp32, weight fp64": (lambda be: _lce(be, bias=b_.float()), _raises(TKE, "float32", "float64")),
    "integer weight": (lambda be: _embed(be, y_, weight=w_.long()), _raises(TKE, "int64", "floating")),
    "soft targets": (lambda be: _lce(be, labels=torch.softmax(torch.randn(N, V, dtype=F64), -1)),
                     _raises(TKE, r"probability \(soft\) targets")),
    "float labels": (lambda be: _lce(be, labels=y_.float()), _raises(TKE, "float32", "integer")),
    "bool labels": (lambda be: _lce(be, labels=y_ > 3), _raises(TKE, "bool")),
    "complex hidden": (lambda be: _lce(be, hidden=h_.to(torch.complex128)), _raises(TKE, "complex128")),
    "float ids": (lambda be: _embed(be, y_.double()), _raises(TKE, "ids", "float64")),
    # not tensors
    "hidden numpy": (lambda be: _lce(be, hidden=h_.numpy()), _raises("TypeError", "hidden", "ndarray")),
    "hidden None": (lambda be: _lce(be, hidden=None), _raises("TypeError", "hidden", "NoneType")),
    "hidden list": (lambda be: _logits(be, hidden=h_.tolist()), _raises("TypeError", "hidden", "list")),
    "weight numpy": (lambda be: _lce(be, weight=w_.numpy()), _raises("TypeError", "weight", "ndarray")),
    "labels None": (lambda be: _lce(be, labels=None), _raises("TypeError", "labels", "NoneType")),
    "labels list": (lambda be: _lce(be, labels=y_.tolist()), _raises("TypeError", "labels", "list")),
    "ids numpy": (lambda be: _embed(be, y_.numpy()), _raises("TypeError", "ids", "ndarray")),
    "bias numpy": (lambda be: _lce(be, bias=b_.numpy()), _raises("TypeError", "bias", "ndarray")),
    # devices
    "bias on meta": (lambda be: _lce(be, bias=_meta(b_)), _raises(TKE, "bias", "meta", "cpu")),
    "labels on meta": (lambda be: _lce(be, labels=_meta(y_)), _raises(TKE, "labels", "meta", "cpu")),
    "hidden on meta": (lambda be: _lce(be, hidden=_meta(h_)), _raises(TKE, "hidden", "meta", "cpu")),
    "weight on meta": (lambda be: _lce(be, weight=_meta(w_)), _raises(TKE, "meta", "cpu")),
    "logits bias on meta": (lambda be: _logits(be, bias=_meta(b_)), _raises(TKE, "bias", "meta", "cpu")),
    "ids on meta": (lambda be: _embed(be, _meta(y_)), _raises(TKE, "ids", "meta", "cpu")),
    "num_items on meta": (lambda be: _lce(be, reduction="sum", num_items_in_batch=torch.tensor(3.0, device="meta")),
                          _raises(TKE, "num_items_in_batch", "meta", "cpu")),
    "module ids on meta": (lambda be: _head(be)(_meta(y_)), _raises(TKE, "ids", "meta", "cpu")),
    "module loss labels on meta": (lambda be: _head(be).loss(h_, _meta(y_)), _raises(TKE, "labels", "meta")),
    "output_embeddings bias on meta": (lambda be: _head(be).output_embeddings(h_, bias=_meta(b_)),
                                       _raises(TKE, "bias", "meta", "cpu")),
    "vocab-parallel bias on meta": (lambda be: _vp_lce(be, bias=_meta(b_)), _raises(TKE, "bias", "meta", "cpu")),
    # options
    "reduction 'avg'": (lambda be: _lce(be, reduction="avg"), _raises(TKE, "reduction", "'avg'")),
    "label_smoothing -0.1": (lambda be: _lce(be, label_smoothing=-0.1), _raises(TKE, "label_smoothing", "-0.1")),
    "label_smoothing 1.5": (lambda be: _lce(be, label_smoothing=1.5), _raises(TKE, "label_smoothing", "1.5")),
    "label_smoothing NaN": (lambda be: _lce(be, label_smoothing=math.nan), _raises(TKE, "label_smoothing", "nan")),
    "z_loss negative": (lambda be: _lce(be, z_loss=-1.0), _raises(TKE, "z_loss", "-1.0")),
    "z_loss NaN": (lambda be: _lce(be, z_loss=math.nan), _raises(TKE, "z_loss", "nan")),
    "z_loss inf": (lambda be: _lce(be, z_loss=math.inf), _raises(TKE, "z_loss", "inf")),
    "softcap 0": (lambda be: _lce(be, softcap=0.0), _raises(TKE, "softcap", "0.0")),
    "softcap negative": (lambda be: _logits(be, softcap=-2.0), _raises(TKE, "softcap", "-2.0")),
    "softcap NaN": (lambda be: _lce(be, softcap=math.nan), _raises(TKE, "softcap", "nan")),
    "softcap a string": (lambda be: _lce(be, softcap="30"), _raises("TypeError", "softcap", "str")),
    "logit_scale NaN": (lambda be: _lce(be, logit_scale=math.nan), _raises(TKE, "logit_scale", "nan")),
    "logit_scale inf": (lambda be: _logits(be, logit_scale=math.inf), _raises(TKE, "logit_scale", "inf")),
    "num_items [2] tensor": (lambda be: _lce(be, reduction="sum", num_items_in_batch=torch.tensor([3, 4])),
                             _raises(TKE, "num_items_in_batch", r"\(2,\)")),
    "num_items 0": (lambda be: _lce(be, reduction="sum", num_items_in_batch=0), _raises(TKE, "num_items_in_batch")),
    "num_items negative": (lambda be: _lce(be, num_items_in_batch=-3), _raises(TKE, "num_items_in_batch", "-3")),
    "num_items NaN": (lambda be: _lce(be, num_items_in_batch=math.nan), _raises(TKE, "num_items_in_batch", "nan")),
    "num_items inf": (lambda be: _lce(be, num_items_in_batch=math.inf), _raises(TKE, "num_items_in_batch", "inf")),
    "num_items bool tensor": (lambda be: _lce(be, num_items_in_batch=torch.tensor(True)),
                              _raises(TKE, "num_items_in_batch", "bool")),
    "num_items a string": (lambda be: _lce(be, num_items_in_batch="7"), _raises("TypeError", "num_items_in_batch")),
    "num_items with reduction none": (lambda be: _lce(be, reduction="none", num_items_in_batch=3),
                                      _raises(TKE, "num_items_in_batch", "reduction='none'")),
    "chunk_size 0": (lambda be: _lce(be, chunk_size=0), _raises(TKE, "chunk_size", "0")),
    "chunk_size negative": (lambda be: _lce(be, chunk_size=-4), _raises(TKE, "chunk_size", "-4")),
    "padding_idx out of range": (lambda be: _embed(be, y_, padding_idx=V), _raises(TKE, "padding_idx", "11")),
    "unknown backend": (lambda be: _lce("nope"), _raises("ValueError", "unknown backend", "'nope'")),
    "vocab-parallel max_norm": (lambda be: _vp_head(be, max_norm=1.0), _raises("NotImplementedError", "max_norm")),
    "vocab-parallel sparse": (lambda be: _vp_head(be, sparse=True), _raises("NotImplementedError", "sparse")),
    # out-of-range ids and labels
    "label = V": (lambda be: _lce(be, labels=torch.full((N,), V)), _raises("IndexError", "11", "V=11")),
    "label -5": (lambda be: _lce(be, labels=torch.full((N,), -5)), _raises("IndexError", "-5", "V=11")),
    "label 10**12": (lambda be: _lce(be, labels=torch.full((N,), 10**12)), _raises("IndexError", "1000000000000")),
    "label = V, reduction none, no grad": (lambda be: torch.no_grad()(_lce)(be, labels=torch.full((N,), V),
                                                                            reduction="none"),
                                           _raises("IndexError", "11", "V=11")),
    "int32 label = V": (lambda be: _lce(be, labels=torch.full((N,), V, dtype=torch.int32)),
                        _raises("IndexError", "11")),
    "id = V": (lambda be: _embed(be, torch.tensor([0, V])), _raises("IndexError", "11", "V=11")),
    "id -1": (lambda be: _embed(be, torch.tensor([-1, 2])), _raises("IndexError", "-1")),
    "module id = V": (lambda be: _head(be)(torch.tensor([[1, V]])), _raises("IndexError", "11")),
    # borderline valid calls: PyTorch's value, no error
    "softcap inf": (lambda be: _value_ok(be, softcap=math.inf), OK),
    "num_items [1] tensor": (lambda be: _value_ok(be, reduction="sum", num_items_in_batch=torch.tensor([3])), OK),
    "num_items 0-dim tensor": (lambda be: _value_ok(be, num_items_in_batch=torch.tensor(4.5)), OK),
    "all labels ignored": (lambda be: _value_ok(be, labels=torch.full((N,), -100)), OK),
    "label_smoothing 1": (lambda be: _value_ok(be, label_smoothing=1.0), OK),
    "logit_scale 0": (lambda be: _value_ok(be, logit_scale=0.0), OK),
    "huge chunk_size": (lambda be: _value_ok(be, chunk_size=10**9), OK),
    "int16 labels": (lambda be: _value_ok(be, labels=y_.to(torch.int16)), OK),
    "NaN hidden, reduction none": (lambda be: str(_lce(be, hidden=torch.full((N, D), math.nan, dtype=F64),
                                                       reduction="none").isnan().all().item()), OK),
    "shift with T = 0": (lambda be: str(float(_lce(be, hidden=torch.randn(2, 0, D, dtype=F64),
                                                   labels=torch.zeros(2, 0, dtype=torch.long), shift=True))), OK),
}


def _has_class_weight():
    import inspect

    import tiedkernels as tk

    return "class_weight" in inspect.signature(tk.linear_cross_entropy).parameters


if _has_class_weight():  # the per-class weights, where this version has them
    CASES.update({
        "class_weight shape": (lambda be: _lce(be, class_weight=torch.ones(V + 1, dtype=F64)),
                               _raises(TKE, "class_weight", r"\(12,\)")),
        "class_weight on meta": (lambda be: _lce(be, class_weight=torch.ones(V, dtype=F64, device="meta")),
                                 _raises(TKE, "class_weight", "meta", "cpu")),
        "class_weight integer": (lambda be: _lce(be, class_weight=torch.ones(V, dtype=torch.long)),
                                 _raises(TKE, "class_weight", "int64")),
        "class_weight numpy": (lambda be: _lce(be, class_weight=torch.ones(V, dtype=F64).numpy()),
                               _raises("TypeError", "class_weight", "ndarray")),
    })


# ------------------------------------------------------------------------------------------
# the worker: reads case names on stdin, answers one JSON line each


def _worker(backend):
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else the libraries print goes to stderr, never into the answers
    import warnings

    warnings.simplefilter("ignore")
    import tiedkernels  # noqa: F401
    from tiedkernels import backends

    out.write(json.dumps({"ready": backends.why_not(backend, "cpu")}) + "\n")
    for line in sys.stdin:
        name = line.rstrip("\n")
        fn, _ = CASES[name]
        try:
            detail = fn(backend)
            ans = {"status": "ok", "detail": str(detail)[:500]}
        except BaseException as e:  # noqa: B036 (report everything, KeyboardInterrupt included)
            ans = {"status": "raised", "mro": [c.__name__ for c in type(e).__mro__], "type": type(e).__name__,
                   "msg": str(e)[:2000], "tb": traceback.format_exc()[-1500:]}
        out.write(json.dumps(ans) + "\n")


# ------------------------------------------------------------------------------------------
# the parent side


class Worker:
    def __init__(self, backend):
        self.backend = backend
        self.proc = None

    def start(self):
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", self.backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.buf = ""
        ready = self._read(max(CASE_TIMEOUT, 180))
        if not isinstance(ready, dict) or "ready" not in ready:
            raise RuntimeError(f"the {self.backend} worker did not start: {ready}")
        return ready["ready"]

    def _read(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while "\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536).decode()
                if not chunk:
                    return "died"
                self.buf += chunk
        line, self.buf = self.buf.split("\n", 1)
        return json.loads(line)

    def run(self, name):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        ans = self._read(CASE_TIMEOUT)
        if isinstance(ans, str):  # "timeout" or "died": no answer; the next case gets a fresh worker
            self.proc.kill()
            _, err = self.proc.communicate()
            self.proc = None
            return {"status": ans, "stderr": err[-3000:]}
        return ans

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _backends():
    import importlib.util

    from _cpu_backends import BACKENDS_CPU

    out = list(BACKENDS_CPU)
    if importlib.util.find_spec("triton") is not None:
        out.append("triton")
    return out


_WORKERS = {}


@pytest.fixture(scope="module")
def workers():
    yield _WORKERS
    for w in _WORKERS.values():
        w.close()
    _WORKERS.clear()


def _get(workers, backend):
    if backend not in workers:
        w = Worker(backend)
        reason = w.start()
        if reason is not None:
            w.close()
            pytest.fail(f"backend {backend!r} cannot run in the worker: {reason}")
        workers[backend] = w
    return workers[backend]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(workers, backend, case):
    ans = _get(workers, backend).run(case)
    expect = CASES[case][1]
    if ans["status"] in ("timeout", "died"):
        pytest.fail(f"{case!r} on {backend}: the worker {ans['status']} "
                    f"({'no answer in %gs' % CASE_TIMEOUT if ans['status'] == 'timeout' else 'crashed'})\n"
                    f"{ans['stderr']}")
    if expect[0] == "ok":
        assert ans["status"] == "ok", f"{case!r} on {backend} raised {ans.get('type')}: {ans.get('msg')}\n" \
                                      f"{ans.get('tb')}"
        return
    _, cls, patterns = expect
    assert ans["status"] == "raised", f"{case!r} on {backend}: no error, returned {ans.get('detail')}"
    assert cls in ans["mro"], (f"{case!r} on {backend}: expected {cls}, got {ans['type']}: {ans['msg']}\n"
                               f"{ans['tb']}")
    assert "tiedkernels" in ans["msg"], \
        f"{case!r} on {backend}: the message does not say where it comes from: {ans['msg']}"
    for p in patterns:
        assert re.search(p, ans["msg"]), f"{case!r} on {backend}: the message does not name {p!r}: {ans['msg']}"


def test_worker_survives_and_reports_a_crash(workers):
    """The harness itself: a case that kills its process is reported as a crash, and the next case
    runs in a fresh worker."""
    w = Worker(_backends()[0])
    try:
        w.start()
        w.proc.stdin.write("no such case\n")  # a KeyError in the worker's own loop: the process exits
        w.proc.stdin.flush()
        assert w._read(CASE_TIMEOUT) == "died"
        w.proc.wait()
        assert w.run("label = V")["type"] == "IndexError"  # in a fresh worker
    finally:
        w.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        _worker(sys.argv[2])
