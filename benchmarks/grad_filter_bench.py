"""Gradient filtering on the CPU: fused loss forward + backward with ``grad_filter`` against the exact
path and the three dense GEMMs, on a realistic (peaked) softmax, and the kept fraction per chunk.

    .venv/bin/python -m benchmarks.grad_filter_bench                 # the README shapes, fp32 and bf16
    .venv/bin/python -m benchmarks.grad_filter_bench --quick         # small shapes: checks the script
    .venv/bin/python -m benchmarks.grad_filter_bench --json out.json
    .venv/bin/python -m benchmarks.grad_filter_bench --dtypes float32 --write-results   # RESULTS.md section
    .venv/bin/python -m benchmarks.grad_filter_bench --from-json   # re-render the section, no measuring
    .venv/bin/python -m benchmarks.grad_filter_bench --job grpo --dtypes float32   # grpo_loss instead

``--job grpo`` times ``tiedkernels.grpo_loss`` (TRL's ``dapo``, on-policy, ``beta=0``, an entropy bonus
of 0.01: the fused token-objective pass) on the same workload instead of the cross-entropy: the
workload's labels are the completions, in sequences of 512 tokens with an advantage of ±1 each (fixed
seed), and the kept columns are those the pass records. It prints (and ``--json`` saves) its figures;
``--write-results`` renders the cross-entropy job only.

``--write-results`` renders the section between ``<!-- grad-filter:begin -->`` and
``<!-- grad-filter:end -->`` of ``benchmarks/RESULTS.md`` (``--out DIR`` for another folder) and
saves the raw results to ``results_grad_filter.json`` beside it, merged with the results already there
by (shape, dtype): a float32 run and a bfloat16 run made separately end up in one section.  The
section's last part renders ``grad_filter_curve.json`` (``benchmarks/grad_filter_curve.py``'s
training curves; ``--curve PATH`` for another file).

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
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import tiedkernels as tk
from benchmarks import report as R
from tiedkernels import functional as tkf
from tiedkernels._torch_backend import _cpu_lacks_lowp_gemm, filter_keep

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- grad-filter:begin -->", "<!-- grad-filter:end -->"
RAW_NAME = "results_grad_filter.json"
CURVE = os.path.join(HERE, "grad_filter_curve.json")
ISA_FLAGS = R.ISA_FLAGS

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


GRPO_SEQ = 512  # tokens per completion in --job grpo


def grpo_inputs(h, y):
    """``(hidden [B, T, D], completion ids [B, T], advantages [B])`` for --job grpo: the workload's rows
    as B completions of GRPO_SEQ tokens (the tail cut), an advantage of ±1 each."""
    t = min(GRPO_SEQ, h.shape[0])
    b = h.shape[0] // t
    adv = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(0)).to(torch.float32) * 2 - 1
    return h[:b * t].reshape(b, t, -1), y[:b * t].reshape(b, t), adv


def fused_grpo(h, w, y, grad_filter):
    hs, ids, adv = grpo_inputs(h, y)

    def run():
        hh = hs.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        out = tk.grpo_loss(hh, ww, ids, adv, loss_type="dapo", entropy_coef=0.01, grad_filter=grad_filter)
        out.loss.backward()
        return out.loss.detach(), hh.grad.reshape(-1, hh.shape[-1]), ww.grad

    return run


def grpo_kept(h, w, y, t):
    """Kept columns per chunk of a filtered grpo_loss step, as the pass records them."""
    from tiedkernels import _token_pass

    made = []
    init = _token_pass.Grads.__init__

    def record(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    _token_pass.Grads.__init__ = record
    try:
        fused_grpo(h, w, y, t)()
    finally:
        _token_pass.Grads.__init__ = init
    return [k for g in made for k in g.kept]


def fused(h, w, y, grad_filter):
    def run():
        hh = h.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        loss = tk.linear_cross_entropy(hh, ww, y, backend="cpu", grad_filter=grad_filter)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    return run


def machine():
    """CPU model, core count and the flags that decide the GEMM paths (report.machine's reading)."""
    m = R.machine()
    have = set(m["isa"].split())
    return {"cpu": m["cpu"], "cores": m["cores"], "flags": {x: x in have for x in ISA_FLAGS}}


def measure(shape, dtype, source, rounds, thresholds, split=None, job="ce"):
    load_start = R.loadavg()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    h, w, y, split = load(shape, dtype, source, split)
    n, d, v = shape
    if job == "grpo":  # whole completions only (grpo_inputs)
        n = n // min(GRPO_SEQ, n) * min(GRPO_SEQ, n)
        h, y = h[:n], y[:n]
    chunk = chunk_of(n, d, v, dtype) if job == "ce" else \
        tkf.chunk_rows(n, v, None, d=d, itemsize=max(4, torch.finfo(dtype).bits // 8))  # the token pass's
    auto = tkf.grad_filter_value("auto", dtype)
    step = fused_grpo if job == "grpo" else fused
    provs = {"gemm3": gemm3(h, w), "exact": step(h, w, y, None)}
    for t in thresholds:
        provs[f"filter={t}"] = step(h, w, y, t)
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
        k = grpo_kept(h, w, y, t) if job == "grpo" else kept_per_chunk(h, w, y, chunk, tv)
        kept[str(t)] = {"threshold": tv, "kept_per_chunk": k, "kept_fraction_mean": sum(k) / len(k) / v,
                        "kept_fraction_max": max(k) / v}
    return {"job": job, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "source": source,
            "split": split,
            "chunk_rows": chunk, "rounds": rounds,
            "gemm3_dtype": "float32" if dtype == torch.bfloat16 and _cpu_lacks_lowp_gemm(torch.bfloat16)
            else str(dtype).replace("torch.", ""),
            "median_s": med, "x_gemm3": {k: med[k] / med["gemm3"] for k in med}, "kept": kept, "checks": checks,
            "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": date, "load_start": load_start, "load_end": R.loadavg()}


# ---------------------------------------------------------------------------------------------
# the RESULTS.md section


def _label(t, kept=None):
    """A threshold as the section shows it: 2^-k for powers of two, auto with its value."""
    if t == "auto":
        return "auto" + (f" (= {_label(kept['threshold'])})" if kept else "")
    t = float(t)
    e = math.log2(t) if t > 0 else None
    return f"2^{int(e)}" if e is not None and e == int(e) else f"{t:g}"


def _ms(sec):
    ms = sec * 1e3
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def _pct(x):
    return f"{100 * x:.2f}%"


def _rel(change, ref):
    if ref == 0:
        return "–" if change == 0 else f"{change:.3g} (max abs 0)"
    return f"{change / ref:.3g}"


def _bf16_floor_fp32(r):
    f = r.get("machine", {}).get("flags", {})
    return r["dtype"] == "bfloat16" and not (f.get("avx512_bf16") or f.get("amx_bf16"))


def _case_table(r):
    n, d, v = r["shape"]
    floor = r["median_s"]["gemm3"]
    la = lambda x: ", ".join(f"{y:g}" for y in x)  # noqa: E731
    L = [f"**N={n} D={d} V={v} {r['dtype']}** (chunk {r['chunk_rows']} rows; {r['date']}; load average "
         f"(1, 5, 15 min) {la(r['load_start'])} at the start, {la(r['load_end'])} at the end)", "",
         "| run | median (ms) | × gemm3 | kept columns per chunk, mean (max) of V | loss bit-identical | "
         "max abs Δdh / max abs dh | max abs ΔdW / max abs dW |",
         "|---|---:|---:|---|---|---:|---:|"]
    for name, sec in r["median_s"].items():
        label, kept_cell, c = name, "–", None
        if name.startswith("filter="):
            t = name.split("=", 1)[1]
            k = r["kept"].get(t)
            label = f"filter={_label(t, k)}"
            if k:
                cols = k["kept_per_chunk"]
                kept_cell = (f"{sum(cols) / len(cols):,.0f} ({max(cols):,}) of {v:,}: "
                             f"{_pct(k['kept_fraction_mean'])} ({_pct(k['kept_fraction_max'])})")
            c = r["checks"].get(name)
        if name == "gemm3" and _bf16_floor_fp32(r):
            label = "gemm3 (fp32)"
        cells = [label, _ms(sec), f"{sec / floor:.3f}", kept_cell,
                 ("yes" if c["loss_bit_identical"] else "no") if c else "–",
                 _rel(c["dh_max_abs_change"], c["dh_max_abs"]) if c else "–",
                 _rel(c["dw_max_abs_change"], c["dw_max_abs"]) if c else "–"]
        L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def _curve_part(curve):
    if curve is None:
        return ["### Does the filter change training?", "",
                "No `grad_filter_curve.json` (`python -m benchmarks.grad_filter_curve` writes it).", ""]
    cfg = curve.get("config", {})
    m = curve.get("machine", {})
    L = ["### Does the filter change training?", "",
         "`benchmarks/grad_filter_curve.py`" + (" (a stand-in model)" if curve.get("stand_in") else "") +
         f": {curve.get('about', '').split(': ', 1)[-1]}. Config: " +
         ", ".join(f"{k} {v}" for k, v in cfg.items() if k not in ("filters", "filter_from")) +
         f". Command: `{curve.get('command', '?')}`, {curve.get('date', '?')}"
         + (f", {m.get('cpus')} CPUs, {m.get('threads')} threads, torch {m.get('torch')}" if m else "")
         + (f", {curve['seconds'] / 60:.0f} minutes" if curve.get("seconds") else "")
         + ". Figures from `benchmarks/grad_filter_curve.json`; every run on the same batches as the exact one.",
         "",
         "| run | filter from step | final loss, mean of the last 10% (exact) | held-out loss (exact) | "
         "mean abs difference of the loss curve | kept fraction, mean | bit-identical until the filter is on |",
         "|---|---:|---:|---:|---:|---:|---|"]
    for s in curve.get("summary", []):
        ident = s.get("identical_until_filter_on")
        L.append(f"| {s['run']} | {s.get('filter_from', '–')} | {s['final_loss_mean_last_10pct']:.3f} "
                 f"({s['exact_final_loss_mean_last_10pct']:.3f}) | {s['heldout_loss']:.3f} "
                 f"({s['exact_heldout_loss']:.3f}) | {s['mean_abs_diff']:.3f} | {_pct(s['kept_fraction_mean'])} | "
                 f"{'–' if ident is None else ('yes' if ident else 'no')} |")
    return L + ["", "![grad_filter training curves](plots/grad_filter_curve.png)", ""]


def section(results, curve=None):
    """The markdown section (markers included) from a list of ``measure`` results and the curve json."""
    L = [BEGIN, "", "## Gradient filtering (grad_filter=), fused loss forward + backward", ""]
    if any(r.get("quick") for r in results):
        L += ["**Quick run (tiny shapes): a check of the pipeline, not a measurement.**", ""]
    if results:
        srcs = sorted({(r["source"], r.get("split")) for r in results}, key=str)
        work = "; ".join(
            f"`benchmarks/workload.py`'s trained GPT-2 (its cached hidden states, labels and tied weight), "
            f"split `{sp}`, mapped to each shape (rows tiled, D zero-padded, extra vocabulary rows)"
            if src == "workload" else
            "synthetic (a Zipf prior over the vocabulary plus each token aligned with its label's row: a "
            "peaked softmax)" for src, sp in srcs)
        machines = sorted({(r["machine"]["cpu"], r["machine"]["cores"],
                            " ".join(k for k, on in r["machine"]["flags"].items() if on) or "none of "
                            + "/".join(ISA_FLAGS)) for r in results})
        dates = sorted(r["date"] for r in results)
        loads = [x for r in results for x in (r["load_start"][0], r["load_end"][0])]
        cmds = list(dict.fromkeys(r["command"] for r in results if r.get("command")))
        para = ("Timed: `gemm3` = the three dense GEMMs (h·Wᵀ, dz·W, dzᵀ·h) into preallocated outputs, the "
                "floor; `exact` = the default fused loss (`tk.linear_cross_entropy(..., backend=\"cpu\")`, mean "
                "loss, forward + backward); `filter=t` = the same with `grad_filter=t` (`auto` = the dtype's "
                "default, its value beside it). Median of " +
                "/".join(str(x) for x in sorted({r.get("rounds", "?") for r in results}, key=str)) +
                " interleaved rounds after a warm-up, all runs of a case in one process. Kept columns: per "
                "chunk of the backend's training-step chunk rows, the columns the kernels' rule keeps (mean "
                "and max over the chunks). The gradient changes are against `exact`. Workload: " + work +
                ". Machine: " + "; ".join(f"{c}, {n} cores ({fl})" for c, n, fl in machines) +
                "; torch " + ", ".join(sorted({r["torch"] for r in results})) + ", " +
                "/".join(str(t) for t in sorted({r["threads"] for r in results})) + " threads; measured " +
                (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") +
                f"; 1-minute load average {min(loads)} to {max(loads)}. Reproduce: " +
                "; ".join(f"`{c}`" for c in cmds) + ".")
        if any(_bf16_floor_fp32(r) for r in results):
            para += (" This CPU has no native bf16 GEMMs (no avx512_bf16 / amx_bf16), so the bf16 floor "
                     "`gemm3 (fp32)` is the same three GEMMs in fp32 (ATen's bf16 GEMM is a scalar fallback "
                     "there; the fused loss's own bf16 GEMMs run through fp32 tiles).")
        L += [para, ""]
        for r in results:
            L += _case_table(r)
    else:
        L += ["No measurements yet: `python -m benchmarks.grad_filter_bench --write-results`.", ""]
    L += _curve_part(curve)
    L.append(END)
    return "\n".join(L)


DTYPE_ORDER = ("float32", "bfloat16", "float16")


def merge(old, new):
    """``old`` results with those of the same (shape, dtype) in ``new`` replaced, the others of ``new``
    added; quick and full results do not mix (a change of kind drops ``old``)."""
    if old and new and bool(old[0].get("quick")) != bool(new[0].get("quick")):
        old = []
    key = lambda r: (tuple(r["shape"]), r["dtype"])  # noqa: E731
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in old] + [r for r in new if key(r) in fresh]
    rank = {dt: i for i, dt in enumerate(DTYPE_ORDER)}
    return sorted(out, key=lambda r: rank.get(r["dtype"], len(rank)))


def load_curve(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def write_results(results, out, curve_path=CURVE):
    """Merge ``results`` into ``out/results_grad_filter.json`` and render the section into
    ``out/RESULTS.md``; returns the merged list."""
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, RAW_NAME)
    old = []
    if os.path.exists(raw):
        with open(raw) as f:
            old = json.load(f)
    merged = merge(old, results)
    with open(raw, "w") as f:
        json.dump(merged, f, indent=1)
    render(out, curve_path, merged)
    return merged


def render(out, curve_path=CURVE, results=None):
    """Write the section into ``out/RESULTS.md`` from ``results`` (default: ``out/results_grad_filter.json``)."""
    if results is None:
        raw = os.path.join(out, RAW_NAME)
        results = []
        if os.path.exists(raw):
            with open(raw) as f:
                results = json.load(f)
    path = os.path.join(out, "RESULTS.md")
    R.write_marked_section(path, BEGIN, END, section(results, load_curve(curve_path)))
    return path


def _command(argv):
    """The command line that reproduces a run (``--out``, ``--json`` and ``--write-results`` left out)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--json", "--curve"):
            skip = True
            continue
        if a.startswith(("--out=", "--json=", "--curve=")) or a == "--write-results":
            continue
        keep.append(a)
    return " ".join(["python -m benchmarks.grad_filter_bench"] + keep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic peaked softmax even if the workload exists")
    ap.add_argument("--workload", action="store_true", help="use (and make, if needed) benchmarks/workload.py's cache")
    ap.add_argument("--split", help="the workload's split (its default when not given: see benchmarks/workload.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--job", choices=("ce", "grpo"), default="ce",
                    help="the fused cross-entropy (default) or grpo_loss (printed and --json only)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", help="also save this run's results to this file")
    ap.add_argument("--write-results", action="store_true",
                    help=f"merge into OUT/{RAW_NAME} by (shape, dtype) and render OUT/RESULTS.md's section")
    ap.add_argument("--from-json", action="store_true",
                    help=f"measure nothing: re-render OUT/RESULTS.md's section from OUT/{RAW_NAME}")
    ap.add_argument("--out", default=HERE, help="folder of RESULTS.md and the json (default: benchmarks/)")
    ap.add_argument("--curve", default=CURVE, help="the training-curve json (default: benchmarks/grad_filter_curve.json)")
    args = ap.parse_args(argv)
    if args.quick and args.write_results and os.path.abspath(args.out) == HERE:
        ap.error("--quick --write-results needs --out: a quick run is a check, not figures for benchmarks/")
    if args.job != "ce" and args.write_results:
        ap.error("--write-results renders the cross-entropy job only; save --job grpo with --json")
    if args.from_json:
        print(f"wrote {render(args.out, args.curve)} (section {BEGIN} ... {END})")
        return []
    argv = sys.argv[1:] if argv is None else list(argv)
    source = "workload" if args.workload or (workload_available() and not args.synthetic) else "synthetic"
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"# grad_filter benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, workload: {source}")
    results = []
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        for shape in shapes:
            r = measure(shape, dtype, source, args.rounds, THRESHOLDS[dtype], args.split, args.job)
            r["quick"], r["command"] = args.quick, _command(argv)
            results.append(r)
            n, d, v = shape
            print(f"\n{args.job}: N={n} D={d} V={v} {r['dtype']} (chunk {r['chunk_rows']} rows; workload split "
                  f"{r['split']}; load {r['load_start'][0]:.1f} to {r['load_end'][0]:.1f})")
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
    if args.write_results:
        write_results(results, args.out, args.curve)
        print(f"wrote {os.path.join(args.out, 'RESULTS.md')} (section {BEGIN} ... {END}) and "
              f"{os.path.join(args.out, RAW_NAME)}")
    return results


if __name__ == "__main__":
    main()
