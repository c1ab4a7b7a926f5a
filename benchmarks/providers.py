"""Cases and providers shared by the pytest-benchmark suite and the report.

A *case* is one job at one shape and dtype; a *provider* is one implementation of it.
``build(provider, case)`` returns a ``Step`` whose ``run()`` does the job once (a training
step's share: the previous step's gradients are dropped first, as ``zero_grad(set_to_none=True)``
does) and whose ``reset()`` drops what the last run left behind.

Jobs (``Case.kind``):

* ``embed_fwd``     ``E = W[ids]``
* ``embed_fwdbwd``  the same and ``E.backward(g)``: a dense ``[V, D]`` gradient
* ``logits``        ``Z = h Wᵀ``
* ``loss_fwd``      cross-entropy of ``h Wᵀ`` against ``y`` without gradients
* ``loss_fwdbwd``   the same, mean over tokens, and its backward (``dh`` and ``dW``)

Providers: ``gemm1``/``gemm3`` (the floor: the GEMMs of the same shapes into preallocated
outputs), ``plain`` (what a model does: ``nn.Embedding``/``F.linear``/``F.cross_entropy`` on
fp32 logits, as Hugging Face's loss upcasts them), ``compile`` (``torch.compile`` of plain),
``torch-lce`` (PyTorch's own chunked ``F.linear_cross_entropy``), ``cce`` (Cut Cross-Entropy's
``torch_compile`` implementation), ``tiedkernels-<backend>``, and on CUDA only ``liger`` and
``cce-triton`` (reported as unavailable here with the reason).
"""

import dataclasses
import functools
import gc
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

KINDS = ("embed_fwd", "embed_fwdbwd", "logits", "loss_fwd", "loss_fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    n: int
    d: int
    v: int
    dtype: str = "float32"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def label(self):
        return f"{self.kind} N={self.n} D={self.d} V={self.v} {self.dtype}"

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s):
        return cls(**json.loads(s))


# The report set on the CPU (issue 4), and the CI set: the same jobs at shapes that run in milliseconds.
REPORT_SHAPES = ((2048, 1024, 32768), (1024, 1024, 131072), (4096, 512, 50257))
CI_SHAPES = ((64, 32, 512),)


def floor_name(kind):
    """The floor provider of a job: the three GEMMs with a backward, one without; none for the embedding."""
    return {"loss_fwdbwd": "gemm3", "loss_fwd": "gemm1", "logits": "gemm1"}.get(kind)


# ---------------------------------------------------------------------------------------------
# inputs


class Inputs:
    """``h [N, D]``, ``w [V, D]``, labels/ids ``y [N]``, and leaf copies of ``h`` and ``w`` shared by
    every provider of the case (each step drops their gradients first, so sharing is safe and a
    report holds one copy of the weight, not one per provider)."""

    def __init__(self, case, seed=0):
        g = torch.Generator().manual_seed(seed)
        dt = case.torch_dtype
        self.h = (torch.randn(case.n, case.d, generator=g) * 0.5).to(dt)
        self.w = (torch.randn(case.v, case.d, generator=g) * 0.02).to(dt)
        self.y = torch.randint(0, case.v, (case.n,), generator=g)
        self.grad = torch.randn(case.n, case.d, generator=g).to(dt)
        self._leaves = None

    def leaves(self):
        if self._leaves is None:
            self._leaves = tuple(t.detach().clone().requires_grad_(True) for t in (self.h, self.w))
        return self._leaves


def make_inputs(case, seed=0):
    return Inputs(case, seed)


class Step:
    """``run()`` does the job once; ``reset()`` drops the gradients and outputs it left."""

    def __init__(self, run, leaves=(), keep=None):
        self._run = run
        self._leaves = leaves
        self._keep = keep if keep is not None else {}

    def reset(self):
        for t in self._leaves:
            t.grad = None
        self._keep.clear()

    def run(self):
        self.reset()
        self._keep["out"] = self._run()


# ---------------------------------------------------------------------------------------------
# providers


def _tk_backends():
    try:
        from tiedkernels import backends
    except Exception:  # noqa: BLE001
        return []
    return [name for name in backends.NAMES if backends.why_not(name, "cpu") is None]


def _gemm(case, x):
    h, w = x.h, x.w
    z = torch.empty(case.n, case.v, dtype=h.dtype)
    if case.kind != "loss_fwdbwd":
        return Step(lambda: torch.mm(h, w.t(), out=z))
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    def run():
        torch.mm(h, w.t(), out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.t(), h, out=dw)

    return Step(run)


def _plain_fns(kind):
    """The plain PyTorch function of a job (used as is, and compiled)."""
    if kind in ("embed_fwd", "embed_fwdbwd"):
        return lambda ids, w: F.embedding(ids, w)
    if kind == "logits":
        return lambda h, w: F.linear(h, w)
    return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)


def _wrap(case, x, fwd):
    """A Step for job ``case.kind`` around ``fwd``: (h, w, y) -> loss, (h, w) -> logits, (ids, w) -> E."""
    kind = case.kind
    h, w, y = x.h, x.w, x.y
    if kind == "embed_fwd":
        return Step(lambda: fwd(y, w))
    if kind == "embed_fwdbwd":
        _, wl = x.leaves()
        return Step(lambda: fwd(y, wl).backward(x.grad), (wl,))
    if kind == "logits":
        def run():
            with torch.no_grad():
                return fwd(h, w)
        return Step(run)
    if kind == "loss_fwd":
        def run():
            with torch.no_grad():
                return fwd(h, w, y)
        return Step(run)
    hl, wl = x.leaves()
    return Step(lambda: fwd(hl, wl, y).backward(), (hl, wl))


@functools.lru_cache(maxsize=None)
def _compiled(kind):
    # One compiled function per job, with dynamic shapes (as CCE's own compiled path): one compile
    # per job and dtype instead of one per shape, which the report's many shapes could not afford.
    return torch.compile(_plain_fns(kind), dynamic=True)


def _torch_lce(case, x):
    opts = torch.nn.LinearCrossEntropyOptions()
    return _wrap(case, x, lambda h_, w_, y_: F.linear_cross_entropy(h_, w_, y_, options=opts))


def _cce(case, x):
    from cut_cross_entropy import linear_cross_entropy as cce

    return _wrap(case, x, lambda h_, w_, y_: cce(h_, w_, y_, impl="torch_compile"))


def _tiedkernels(backend):
    def build(case, x):
        import tiedkernels as tk

        kind = case.kind
        if kind.startswith("embed"):
            return _wrap(case, x, lambda ids, w_: tk.embedding(ids, w_, backend=backend))
        if kind == "logits":
            return _wrap(case, x, lambda h_, w_: tk.logits(h_, w_, backend=backend))
        return _wrap(case, x, lambda h_, w_, y_: tk.linear_cross_entropy(h_, w_, y_, backend=backend))

    return build


def _why_not_module(module):
    def why_not(case):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001
            return f"{module} is not installed ({type(e).__name__}: {e}); pip install -r requirements/bench.txt"
        return None

    return why_not


def _why_not_torch_lce(case):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options (torch >= 2.13)"
    return None


def _cuda_only(what):
    def why_not(case):
        return f"{what} runs on CUDA only; this run is on the CPU"

    return why_not


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kinds: tuple
    build: object  # (case, Inputs) -> Step
    why_not: object = None  # (case) -> None or the reason it cannot run

    def reason(self, case):
        if case.kind not in self.kinds:
            return f"{self.name} has no {case.kind}"
        return self.why_not(case) if self.why_not else None


_LOSS = ("loss_fwd", "loss_fwdbwd")


def providers():
    """Every provider, in the order tables list them."""
    out = [
        Provider("gemm3", ("loss_fwdbwd",), _gemm),
        Provider("gemm1", ("logits", "loss_fwd"), _gemm),
        Provider("plain", KINDS, lambda c, x: _wrap(c, x, _plain_fns(c.kind))),
        Provider("compile", KINDS, lambda c, x: _wrap(c, x, _compiled(c.kind))),
        Provider("torch-lce", _LOSS, _torch_lce, _why_not_torch_lce),
        Provider("cce", _LOSS, _cce, _why_not_module("cut_cross_entropy")),
    ]
    for backend in _tk_backends():
        out.append(Provider(f"tiedkernels-{backend}", KINDS, _tiedkernels(backend)))
    out += [
        Provider("liger", _LOSS, None, _cuda_only("Liger Kernel")),
        Provider("cce-triton", _LOSS, None, _cuda_only("Cut Cross-Entropy's Triton kernel")),
    ]
    return out


def get(name):
    for p in providers():
        if p.name == name:
            return p
    raise KeyError(name)


def build(provider, case, inputs=None):
    p = get(provider) if isinstance(provider, str) else provider
    reason = p.reason(case)
    if reason is not None:
        raise RuntimeError(f"{p.name} cannot run {case.label}: {reason}")
    return p.build(case, inputs if inputs is not None else make_inputs(case))


# ---------------------------------------------------------------------------------------------
# peak memory of one step, in a fresh process


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024


def measure_here(provider, case):
    """Extra peak resident memory of one steady-state step, in bytes: the step runs once (compiling
    what it compiles), its outputs are dropped, the kernel's peak counter is reset, and the peak of a
    second step is taken above the resident set just before it. Inputs and weights are not counted;
    the gradients the step produces are."""
    step = build(provider, case)
    step.run()
    step.reset()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss()
    step.run()
    return _hwm() - base


def measure_fresh(provider, case, threads=None, timeout=900):
    """``measure_here`` in a new interpreter; glibc returns every large freed buffer to the kernel
    (``MALLOC_MMAP_THRESHOLD_``) so the resident peak is the peak of live buffers."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.providers", "--memory", provider, case.to_json()]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory of {provider} on {case.label} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")][-1]
    return int(line[4:])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":
        print(f"MEM {measure_here(sys.argv[2], Case.from_json(sys.argv[3]))}", flush=True)
    else:
        sys.exit("usage: python -m benchmarks.providers --memory PROVIDER CASE_JSON")
