"""Gradient filtering on the CPU: fused loss forward + backward with ``grad_filter`` against the exact
path and the three dense GEMMs, on a realistic (peaked) softmax, and the kept fraction per chunk.

    .venv/bin/python -m benchmarks.grad_filter_bench                 # the README shapes, fp32 and bf16
    .venv/bin/python -m benchmarks.grad_filter_bench --quick         # small shapes: checks the script
    .venv/bin/python -m benchmarks.grad_filter_bench --json out.json

Workload: the trained model of ``benchmarks/workload.py`` (its cached hidden states, labels and
weight mapped to each shape) when that module is present and its cache exists (``--workload``
makes it first); otherwise (or with ``--synthetic``) a stand-in with a peaked softmax: a Zipf prior
over the vocabulary (logits ``-log(rank)`` through a shared direction of ``W``) plus each token
aligned with its label's row, labels drawn from the same Zipf law.  Random logits are not used:
their softmax is flat and nothing gets filtered.

Timings: median of interleaved rounds (each provider once per round, after a warm-up), in one
process; ``gemm3`` is ``h·Wᵀ``, ``dz·W`` and ``dzᵀ·h`` into preallocated outputs.  For bf16 on a
CPU without native bf16 GEMMs (no AVX512-BF16/AMX), ATen's bf16 GEMM is a scalar fallback that
nobody would use as a floor; the floor printed there is the same three GEMMs in fp32 (the fused
loss's own bf16 GEMMs run through fp32 tiles on such a CPU).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import tiedkernels as tk
from tiedkernels import functional as tkf
from tiedkernels._torch_backend import _cpu_lacks_lowp_gemm, filter_keep

SHAPES = ((2048, 1024, 32768), (4096, 512, 50257))
QUICK_SHAPES = ((512, 256, 4096),)
# per dtype: "auto", bf16's "auto" value (2^-12) for fp32, and 1e-3
THRESHOLDS = {torch.float32: ("auto", 2.0 ** -12, 1e-3), torch.bfloat16: ("auto", 1e-3)}


def synthetic(n, d, v, dtype, seed=0, prior=1.0, align=9.0, noise=0.5):
    """(hidden, weight, labels): logits ≈ prior·(-log rank_j) + align·W_y·W_j + noise, labels ~ Zipf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) / math.sqrt(d)
    e = torch.zeros(d)
    e[0] = 1.0
    logzipf = -torch.log(torch.arange(1, v + 1, dtype=torch.float32))
    w[:, 0] = logzipf / 8.0  # the prior's direction: h·e = 8·prior gives prior·(-log rank)
    p = torch.exp(logzipf)
    labels = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    h = align * w[labels] + noise * torch.randn(n, d, generator=g) / math.sqrt(d)
    h[:, 0] = 8.0 * prior
    return h.to(dtype).contiguous(), w.to(dtype).contiguous(), labels


def load(shape, dtype, source, split=None):
    n, d, v = shape
    if source == "workload":
        from benchmarks import workload

        kw = {} if split is None else {"split": split}
        h, w, y, meta = workload.load_workload(shape=shape, dtype=dtype, log=lambda *a: None, return_meta=True, **kw)
        return h, w, y, meta.get("split")
    return (*synthetic(n, d, v, dtype), None)


def workload_available():
    try:
        from benchmarks import workload
    except Exception:  # noqa: BLE001
        return False
    try:
        return os.path.exists(workload.cache_path())
    except Exception:  # noqa: BLE001
        return False


def chunk_of(n, d, v, dtype):
    """The rows per chunk the cpu backend takes for a training step (tkf.chunk_rows)."""
    return tkf.chunk_rows(n, v, None, d=d, itemsize=torch.finfo(dtype).bits // 8, dw=True)


def kept_per_chunk(h, w, y, chunk, t):
    """Kept columns of each chunk by the kernels' rule (mean loss: s_i = 1/N in every row)."""
    n = h.shape[0]
    s = 1.0 / n
    out = []
    for c0 in range(0, n, chunk):
        z = h[c0:c0 + chunk].float() @ w.float().t()
        dz = torch.softmax(z, dim=1)
        dz[torch.arange(dz.shape[0]), y[c0:c0 + chunk]] -= 1
        dz = (dz * s).to(h.dtype)  # rounded to the input dtype, as the kernels test it
        out.append(int(filter_keep(dz, torch.full((dz.shape[0],), s * t, dtype=torch.float32)).sum()))
    return out


def gemm3(h, w):
    if h.dtype == torch.bfloat16 and _cpu_lacks_lowp_gemm(torch.bfloat16):
        h, w = h.float(), w.float()
    n, v = h.shape[0], w.shape[0]
    z = torch.empty(n, v, dtype=h.dtype)
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def run():
        torch.mm(h, w.t(), out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.t(), h, out=dw)

    return run


def fused(h, w, y, grad_filter):
    def run():
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        loss = tk.linear_cross_entropy(hh, ww, y, backend="cpu", grad_filter=grad_filter)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    return run


def measure(shape, dtype, source, rounds, thresholds, split=None):
    h, w, y, split = load(shape, dtype, source, split)
    n, d, v = shape
    chunk = chunk_of(n, d, v, dtype)
    auto = tkf.grad_filter_value("auto", dtype)
    provs = {"gemm3": gemm3(h, w), "exact": fused(h, w, y, None)}
    for t in thresholds:
        provs[f"filter={t}"] = fused(h, w, y, t)
    # correctness of what is timed: loss bit-identical, gradient change against the exact path
    ref = provs["exact"]()
    checks = {}
    for name, fn in provs.items():
        if not name.startswith("filter"):
            continue
        loss, dh, dw = fn()
        checks[name] = {"loss_bit_identical": bool(torch.equal(loss, ref[0])),
                        "dh_max_abs_change": float((dh.float() - ref[1].float()).abs().max()),
                        "dh_max_abs": float(ref[1].float().abs().max()),
                        "dw_max_abs_change": float((dw.float() - ref[2].float()).abs().max()),
                        "dw_max_abs": float(ref[2].float().abs().max())}
    del ref
    times = {k: [] for k in provs}
    for fn in provs.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in provs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(x) for k, x in times.items()}
    kept = {}
    for t in thresholds:
        tv = auto if t == "auto" else float(t)
        k = kept_per_chunk(h, w, y, chunk, tv)
        kept[str(t)] = {"threshold": tv, "kept_per_chunk": k, "kept_fraction_mean": sum(k) / len(k) / v,
                        "kept_fraction_max": max(k) / v}
    return {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "source": source, "split": split,
            "chunk_rows": chunk,
            "median_s": med, "x_gemm3": {k: med[k] / med["gemm3"] for k in med}, "kept": kept, "checks": checks,
            "loadavg": os.getloadavg()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic peaked softmax even if the workload exists")
    ap.add_argument("--workload", action="store_true", help="use (and make, if needed) benchmarks/workload.py's cache")
    ap.add_argument("--split", help="the workload's split (its default when not given: see benchmarks/workload.py)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    source = "workload" if args.workload or (workload_available() and not args.synthetic) else "synthetic"
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"# grad_filter benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, workload: {source}")
    results = []
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for shape in shapes:
            r = measure(shape, dtype, source, args.rounds, THRESHOLDS[dtype], args.split)
            results.append(r)
            n, d, v = shape
            print(f"\nN={n} D={d} V={v} {r['dtype']} (chunk {r['chunk_rows']} rows; workload split "
                  f"{r['split']}; load {r['loadavg'][0]:.1f})")
            for k, s in r["median_s"].items():
                print(f"  {k:<14} {s * 1e3:9.1f} ms  {r['x_gemm3'][k]:.3f}x gemm3")
            for t, kk in r["kept"].items():
                print(f"  kept (t={t}: {kk['threshold']:.3g}): mean {kk['kept_fraction_mean']:.4f}, max "
                      f"{kk['kept_fraction_max']:.4f} of V; per chunk {kk['kept_per_chunk']}")
            for name, c in r["checks"].items():
                print(f"  {name}: loss bit-identical {c['loss_bit_identical']}, max |Δdh| {c['dh_max_abs_change']:.3g} "
                      f"(max |dh| {c['dh_max_abs']:.3g}), max |ΔdW| {c['dw_max_abs_change']:.3g} "
                      f"(max |dW| {c['dw_max_abs']:.3g})")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
