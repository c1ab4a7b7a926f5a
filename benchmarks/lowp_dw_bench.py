"""The cpu backend's bf16/fp16 training step in one chunk and in several, on each low-precision
GEMM path: does summing dW over chunks cost more than a single chunk's GEMM?

    .venv/bin/python -m benchmarks.lowp_dw_bench                 # N=2048 D=1024 V=32768, bf16
    .venv/bin/python -m benchmarks.lowp_dw_bench --shape 4096,512,50257 --chunks 8
    .venv/bin/python -m benchmarks.lowp_dw_bench --quick         # small shape: checks the script

Several chunks keep one fp32 dW into which every chunk's dzᵀ·h is summed (one rounding at the end).
On a CPU with AMX or AVX512-BF16 that sum runs through MKL's bf16 GEMM with fp32 output (the
``auto`` path); ``tiles`` is the fp32-tile path it replaced there, ``mkl`` MKL's GEMM for every
low-precision GEMM.  On a CPU without those instructions ``auto`` is ``tiles``.  Timings: median of
interleaved rounds in one process, each as a multiple of the single-chunk step on the ``auto`` path;
every run's loss and gradients are checked against that step's first.
"""

import argparse
import statistics
import time

import torch

import tiedkernels as tk
from benchmarks import report as R
from tiedkernels import _torch_backend as TB

PATHS = ("auto", "tiles", "mkl")


def step(h, w, y, chunk, path):
    def run():
        TB.set_cpu_lowp_gemm_path(None if path == "auto" else path)
        try:
            hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss = tk.linear_cross_entropy(hh, ww, y, backend="cpu", chunk_size=chunk)
            loss.backward()
            return loss.detach(), hh.grad, ww.grad
        finally:
            TB.set_cpu_lowp_gemm_path(None)

    return run


def paths_here():
    from tiedkernels import _ext

    ext = _ext.load()
    if ext is None:
        raise SystemExit(f"the compiled extension did not load: {_ext.error()}")
    return [p for p in PATHS if p != "mkl" or ext._cpu_mixed_gemm_available(True)]


def measure(n, d, v, dtype, chunks, rounds, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype)
    w = (torch.randn(v, d, generator=gen) * 0.05).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    cases = {}
    for path in paths_here():
        cases[f"1 chunk, {path}"] = step(h, w, y, n, path)
        cases[f"{chunks} chunks, {path}"] = step(h, w, y, -(-n // chunks), path)
    base_name = "1 chunk, auto"
    ref = cases[base_name]()
    checks = {}
    for name, fn in cases.items():
        loss, dh, dw = fn()
        checks[name] = {"loss_rel": float((loss - ref[0]).abs() / ref[0].abs()),
                        "dh_rel": float((dh.float() - ref[1].float()).abs().max() / ref[1].float().abs().max()),
                        "dw_rel": float((dw.float() - ref[2].float()).abs().max() / ref[2].float().abs().max())}
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(x) for k, x in times.items()}
    return {k: {"median_s": med[k], "x_one_chunk_auto": med[k] / med[base_name], **checks[k]} for k in cases}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="2048,1024,32768", help="N,D,V")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N=256 D=64 V=1000, one round")
    args = ap.parse_args(argv)
    n, d, v = (256, 64, 1000) if args.quick else tuple(int(x) for x in args.shape.split(","))
    rounds = 1 if args.quick else args.rounds
    m = R.machine()
    print(f"# {m['cpu']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU flags: {m['isa'] or 'none of note'}")
    print(f"# N={n} D={d} V={v} {args.dtype}, median of {rounds} interleaved rounds")
    res = measure(n, d, v, getattr(torch, args.dtype), args.chunks, rounds)
    for k, r in res.items():
        print(f"{k:<20} {r['median_s'] * 1e3:9.1f} ms  {r['x_one_chunk_auto']:.3f}x   "
              f"vs 1 chunk auto: loss {r['loss_rel']:.1e}, dh {r['dh_rel']:.1e}, dW {r['dw_rel']:.1e} (max rel)")
    return res


if __name__ == "__main__":
    main()
