"""Run the report set and write ``benchmarks/RESULTS.md`` and the plots under ``benchmarks/plots/``.

    .venv/bin/python -m benchmarks.report                 # everything (about 45 minutes on 2 cores)
    .venv/bin/python -m benchmarks.report --only memory   # peak memory only (fresh process per cell)
    .venv/bin/python -m benchmarks.report --only time     # timings only
    .venv/bin/python -m benchmarks.report --only write    # re-render RESULTS.md and plots from results.json
    .venv/bin/python -m benchmarks.report --quick --out /tmp/r   # tiny shapes: checks the pipeline in a minute

Timing: every provider of a case runs in this one process, in interleaved rounds (the order rotates
each round, so a burst of load hits every provider alike); the figure is the median of the rounds.
The floor is the GEMMs of the same shapes into preallocated outputs, timed in the same rounds.
Memory: each provider and case in a fresh process (``benchmarks/providers.py``: extra peak
resident memory of a steady-state step above the inputs). Raw figures go to ``results.json``
beside RESULTS.md; the phases merge into it, so memory and time can be measured at different hours.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import providers as P

HERE = os.path.dirname(os.path.abspath(__file__))

# Plots: time and memory of the fused loss (forward + backward) vs V at fixed N, and vs N at fixed V.
SWEEP_D = 1024
SWEEP_N_FIXED, SWEEP_VS = 1024, (16384, 32768, 65536, 131072)
SWEEP_V_FIXED, SWEEP_NS = 32768, (512, 1024, 2048, 4096)
REPORT_KINDS = ("loss_fwdbwd", "loss_fwd", "logits", "embed_fwdbwd", "embed_fwd")
MEMORY_KINDS = ("loss_fwdbwd",)  # the others with --memory-kinds (one fresh process per cell: minutes each)
COMPILED = ("compile", "cce")
# The sweep points outside the report set measure memory for these only (a compiled provider's
# fresh process spends minutes compiling on 2 cores; its memory tracks plain's or CCE's).
SWEEP_MEMORY_SKIP = ("compile", "tiedkernels-torch")


def report_cases(quick=False):
    shapes = P.CI_SHAPES + ((128, 64, 4096),) if quick else P.REPORT_SHAPES
    return [P.Case(k, *s, dt) for dt in P.DTYPES for s in shapes for k in REPORT_KINDS]


def sweep_cases(quick=False):
    d, n0, v0 = (64, 128, 4096) if quick else (SWEEP_D, SWEEP_N_FIXED, SWEEP_V_FIXED)
    vs = (1024, 2048, 4096) if quick else SWEEP_VS
    ns = (64, 128, 256) if quick else SWEEP_NS
    out = [P.Case("loss_fwdbwd", n0, d, v) for v in vs] + [P.Case("loss_fwdbwd", n, d, v0) for n in ns]
    return list(dict.fromkeys(out))


def all_cases(quick=False):
    return list(dict.fromkeys(report_cases(quick) + sweep_cases(quick)))


def runnable(case):
    return [p.name for p in P.providers() if p.reason(case) is None]


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# timing


def interleaved(steps, names, rounds):
    """Time ``steps[n].run()`` for every name in ``rounds`` rounds, the order rotating each round, with
    the garbage collector off: (samples, medians, the load average at the start)."""
    samples = {n: [] for n in names}
    load0 = loadavg()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                steps[n].run()
                samples[n].append(time.perf_counter() - t0)
                steps[n].reset()
    finally:
        gc.enable()
    return samples, {n: statistics.median(s) for n, s in samples.items()}, load0


def time_case(case, rounds, warmed, log):
    names = runnable(case)
    x = P.make_inputs(case)
    steps = {n: P.build(n, case, x) for n in names}
    for n in names:
        key = (n, case.kind, case.dtype)
        if n in COMPILED or key not in warmed:  # compile for this shape; first touch of everything
            steps[n].run()
            steps[n].reset()
            warmed.add(key)
    samples, med, load0 = interleaved(steps, names, rounds)
    floor = med.get(P.floor_name(case.kind))
    log(f"{case.label}  (load {load0[0]})")
    for n in sorted(med, key=med.get):
        extra = f"  {med[n] / floor:5.2f}x floor" if floor else ""
        log(f"    {n:<20} {med[n] * 1e3:9.1f} ms{extra}")
    return {"samples": samples, "median": med, "load": [load0, loadavg()]}


def rounds_for(case, rounds):
    """More rounds where a step takes milliseconds (cheap, and the noise is relatively larger)."""
    flops = 2 * case.n * case.d * case.v * (3 if case.kind == "loss_fwdbwd" else 1)
    return rounds if flops > 5e10 else max(rounds, 7)


def run_time(cases, rounds, results, log):
    warmed = set()
    t0 = time.time()
    results.setdefault("time", {})
    meta = {"start": datetime.datetime.now().isoformat(timespec="minutes"), "load_start": loadavg(),
            "rounds": rounds, "threads": torch.get_num_threads(), "kinds": sorted({c.kind for c in cases})}
    for case in cases:
        results["time"][case.to_json()] = time_case(case, rounds_for(case, rounds), warmed, log)
    meta.update(load_end=loadavg(), seconds=round(time.time() - t0), end=datetime.datetime.now().isoformat(timespec="minutes"))
    # Runs of other jobs stay listed; a run of the same jobs replaces theirs.
    results["time_runs"] = [m for m in results.get("time_runs", []) if m["kinds"] != meta["kinds"]] + [meta]


# ---------------------------------------------------------------------------------------------
# memory


def run_memory(cases, results, log, jobs=2, kinds=MEMORY_KINDS, save=None):
    from concurrent.futures import ThreadPoolExecutor

    results.setdefault("memory", {})
    sweeps_only = set(sweep_cases(results.get("quick", False))) - set(report_cases(results.get("quick", False)))
    cells = [(n, c) for c in cases if c.kind in kinds for n in runnable(c)
             if not n.startswith("gemm")  # the floor writes into preallocated outputs: nothing extra
             and not (c in sweeps_only and n in SWEEP_MEMORY_SKIP)
             and results["memory"].get(c.to_json(), {}).get(n) is None]  # resume
    t0 = time.time()
    results.setdefault("memory_meta", {}).setdefault("start", datetime.datetime.now().isoformat(timespec="minutes"))

    def one(cell):
        n, c = cell
        try:
            return cell, P.measure_fresh(n, c), None
        except Exception as e:  # noqa: BLE001
            return cell, None, str(e)[-500:]

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for (n, c), extra, err in pool.map(one, cells):
            results["memory"].setdefault(c.to_json(), {})[n] = extra
            if save:
                save()
            log(f"memory {c.label:<45} {n:<20} " + (f"{extra / 2**20:8.1f} MiB" if extra is not None else err))
    results["memory_meta"].update(seconds=round(time.time() - t0),
                                  end=datetime.datetime.now().isoformat(timespec="minutes"))


# ---------------------------------------------------------------------------------------------
# writing


# the CPU flags that decide the GEMM paths (native bf16 GEMMs or the fp32 tiles)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            have = set(f.read().split())
        flags = " ".join(x for x in ISA_FLAGS if x in have)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1), "isa": flags}


def versions():
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("cut-cross-entropy", "liger-kernel", "triton", "pytest-benchmark"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import tiedkernels

        out["tiedkernels"] = tiedkernels.__version__
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        if commit.returncode == 0:
            out["tiedkernels"] += f" (commit {commit.stdout.strip()})"
    except Exception:  # noqa: BLE001
        pass
    return out


def write_marked_section(path, begin, end, text):
    """Replace the text between the markers ``begin`` and ``end`` in ``path`` (``text`` includes them)
    with ``text``; append it at the end when the markers are absent. Nothing else in the file changes."""
    old = open(path).read() if os.path.exists(path) else ""
    if begin in old and end in old:
        a = old.index(begin)
        b = old.index(end) + len(end)
        new = old[:a] + text + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)


def _mib(b):
    if b is None:
        return "–"
    return f"{b / 2**20:,.1f}" if b < 10 * 2**20 else f"{b / 2**20:,.0f}"


def _floor_bytes(case):
    """dW + dh of the fused loss: the unavoidable extra memory (the gradients themselves)."""
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    return (case.v * case.d + case.n * case.d) * elt


def _table(case, results, note_targets=False):
    t = results.get("time", {}).get(case.to_json())
    mem = results.get("memory", {}).get(case.to_json(), {})
    if t is None and not mem:
        return []
    med = t["median"] if t else {}
    floor_name = P.floor_name(case.kind)
    floor = med.get(floor_name)
    plain = med.get("plain")
    names = [n for n in runnable(case) if n in med or n in mem]
    lines = [f"| provider | median (ms) | × {floor_name or 'floor'} | × plain | extra peak (MiB) |",
             "|---|---:|---:|---:|---:|"]
    for n in sorted(names, key=lambda n: med.get(n, float("inf"))):
        m = med.get(n)
        cells = [n if not n.startswith("tiedkernels") else f"**{n}**",
                 f"{m * 1e3:,.1f}" if m else "–",
                 f"{m / floor:.3f}" if m and floor else "–",
                 f"{m / plain:.3f}" if m and plain else "–",
                 _mib(mem.get(n))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load_note(case, results):
    t = results.get("time", {}).get(case.to_json())
    return f" — load {t['load'][0][0]}" if t else ""


def _targets(case, results):
    """The issue's three targets for the cpu backend on one fused forward+backward case."""
    t = results.get("time", {}).get(case.to_json())
    mem = results.get("memory", {}).get(case.to_json(), {})
    me = "tiedkernels-cpu"
    if not t or me not in t["median"]:
        return None
    med = t["median"]
    ratio = med[me] / med["gemm3"]
    peers = {n: v for n, v in med.items() if n not in ("gemm3", me) and not n.startswith("tiedkernels")}
    best_peer = min(peers, key=peers.get) if peers else None
    limit = 1.1 * _floor_bytes(case)
    extra = mem.get(me)
    return {
        "ratio": ratio,
        "time_ok": ratio <= 1.05,
        "best_peer": best_peer,
        "peer_ratio": med[me] / peers[best_peer] if best_peer else None,
        "extra": extra,
        "limit": limit,
        "mem_ok": extra is not None and extra <= limit,
    }


def _plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    sweeps = sweep_cases(quick=results.get("quick", False))
    d = sweeps[0].d
    n0 = sweeps[0].n
    v0 = sweeps[-1].v
    written = []
    for axis, fixed, name in (("v", n0, "vs_V"), ("n", v0, "vs_N")):
        cases = [c for c in sweeps if (c.n == fixed if axis == "v" else c.v == fixed)]
        cases.sort(key=lambda c: getattr(c, axis))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        provs = [p.name for p in P.providers()]
        colors = {prov: f"C{i % 10}" for i, prov in enumerate(provs)}  # one colour per provider in both panels
        for prov in provs:
            xs_t, ys_t, xs_m, ys_m = [], [], [], []
            for c in cases:
                t = results.get("time", {}).get(c.to_json())
                if t and prov in t["median"]:
                    xs_t.append(getattr(c, axis))
                    ys_t.append(t["median"][prov])
                m = results.get("memory", {}).get(c.to_json(), {}).get(prov)
                if m is not None:
                    xs_m.append(getattr(c, axis))
                    ys_m.append(m / 2**20)
            style = dict(marker="o", color=colors[prov], linewidth=2.5 if prov.startswith("tiedkernels") else 1.2,
                         linestyle="--" if prov.startswith("gemm") else "-")
            if xs_t:
                ax_t.plot(xs_t, ys_t, label=prov, **style)
            if xs_m:
                ax_m.plot(xs_m, ys_m, label=prov, **style)
        what = f"N={n0}, D={d}" if axis == "v" else f"V={v0}, D={d}"
        for ax, ylabel in ((ax_t, "median time (s)"), (ax_m, "extra peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(axis.upper())
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.set_title(f"fused loss forward+backward, fp32, {what}")
        ax_m.set_title(f"extra peak memory, fp32, {what}")
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.basename(path))
    return written


def write(results, out_md, plot_dir):
    quick = results.get("quick", False)
    plots = _plot(results, plot_dir)
    m, v = results.get("machine") or machine(), results.get("versions") or versions()
    runs = results.get("time_runs", [])
    tm = runs[-1] if runs else {}
    mm = results.get("memory_meta", {})
    L = ["# Benchmark results", "",
         "Written by `python -m benchmarks.report` (see the README's benchmarks section); raw figures in "
         "`results.json`.", "",
         f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['isa']}), {m['mem_gib']} GiB; "
         f"PyTorch threads: {tm.get('threads', '?')}",
         "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
         "- **Timings:** median of interleaved rounds (3; 7 for cases under 50 GFLOP), after a warm-up run; "
         "the load average (1 min) when each case started is beside its title. Runs: " +
         "; ".join(f"{r['start']} to {r['end']} ({', '.join(r['kinds'])}; load average (1, 5, 15 min) "
                   f"{r['load_start']} at the start, {r['load_end']} at the end)" for r in runs) + ".",
         f"- **Memory:** {mm.get('start', '?')} to {mm.get('end', '?')}: extra peak resident memory of one "
         "steady-state step in a fresh process (`MALLOC_MMAP_THRESHOLD_=65536`), above the inputs and "
         "weights; the gradients the step returns are counted.", ""]
    if quick:
        L += ["**Quick run (tiny shapes): a check of the pipeline, not a measurement.**", ""]
    L += ["Providers: `gemm3` the three GEMMs of the same shapes (h·Wᵀ, dz·W, dzᵀ·h) into preallocated "
          "outputs, the physical floor (`gemm1`: the one GEMM of a forward); `plain` `F.linear` + "
          "`F.cross_entropy` on fp32 logits (as a Hugging Face loss upcasts them), `nn.Embedding` for the "
          "embedding; `compile` `torch.compile(dynamic=True)` of plain; `torch-lce` PyTorch's chunked "
          "`F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`; `cce` Cut Cross-Entropy's "
          "`torch_compile` implementation; `tiedkernels-cpu` the compiled C++ backend, `tiedkernels-torch` "
          "the same chunked algorithm in plain PyTorch. Liger Kernel and CCE's Triton kernel run on CUDA only.",
          ""]
    fused = [c for c in report_cases(quick) if c.kind == "loss_fwdbwd"]
    # Targets.
    L += ["## Targets of the cpu backend (fused loss, forward + backward)", "",
          "| case | × three GEMMs (≤ 1.05) | fastest peer | × fastest peer (< 1) | extra peak vs dW + dh + 10% |",
          "|---|---:|---|---:|---:|"]
    for c in fused:
        r = _targets(c, results)
        if r is None:
            continue
        mem_cell = (f"{_mib(r['extra'])} / {_mib(r['limit'])} MiB {'✓' if r['mem_ok'] else '✗'}"
                    if r["extra"] is not None else "–")
        L.append(f"| N={c.n} D={c.d} V={c.v} {c.dtype} | {r['ratio']:.3f} {'✓' if r['time_ok'] else '✗'} | "
                 f"{r['best_peer']} | {r['peer_ratio']:.3f} {'✓' if r['peer_ratio'] < 1 else '✗'} | {mem_cell} |")
    L += [""]
    notes = os.path.join(os.path.dirname(out_md), "NOTES.md")
    if os.path.exists(notes) and not quick:
        with open(notes) as f:
            L += [f.read().strip(), ""]
    titles = {"loss_fwdbwd": "Fused loss, forward + backward", "loss_fwd": "Fused loss, forward only (no grad)",
              "logits": "Logits h·Wᵀ", "embed_fwdbwd": "Embedding, forward + backward (dense dW)",
              "embed_fwd": "Embedding, forward"}
    for kind in REPORT_KINDS:
        L += [f"## {titles[kind]}", ""]
        for c in [c for c in report_cases(quick) if c.kind == kind]:
            tab = _table(c, results)
            if tab:
                L += [f"**N={c.n}, D={c.d}, V={c.v}, {c.dtype}**" +
                      (f" (dW + dh = {_mib(_floor_bytes(c))} MiB)" if kind == "loss_fwdbwd" else "") +
                      _load_note(c, results), ""] + tab + [""]
    L += ["## Sweeps (fused loss, forward + backward, fp32)", ""]
    L += [f"![{p}](plots/{p})" for p in plots] + [""]
    for c in sweep_cases(quick):
        tab = _table(c, results)
        if tab:
            L += [f"**N={c.n}, D={c.d}, V={c.v}, {c.dtype}**" + _load_note(c, results), ""] + tab + [""]
    text = "\n".join(L).rstrip() + "\n"
    # Sections other scripts write between their own markers (rl_report, grad_filter_bench) are kept.
    if os.path.exists(out_md):
        old = open(out_md).read()
        for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", old, flags=re.S):
            text = text.rstrip("\n") + "\n\n" + m.group(0) + "\n"
    with open(out_md, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("time", "memory", "write"), help="one phase (results merge into results.json)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (default 3; 7 for small cases)")
    ap.add_argument("--jobs", type=int, default=2, help="memory measurements run at once (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the pipeline")
    ap.add_argument("--out", default=HERE, help="folder for RESULTS.md, results.json and plots/")
    ap.add_argument("--kinds", default=None, help="comma-separated jobs to time/measure (default: all)")
    ap.add_argument("--memory-kinds", default=",".join(MEMORY_KINDS),
                    help=f"jobs whose peak memory is measured (default: {','.join(MEMORY_KINDS)})")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "results.json")
    results = {}
    if os.path.exists(raw):
        with open(raw) as f:
            results = json.load(f)
        if results.get("quick", False) != args.quick:
            results = {}
    results["quick"] = args.quick
    cases = all_cases(args.quick)
    if args.kinds:
        keep = set(args.kinds.split(","))
        cases = [c for c in cases if c.kind in keep]

    def log(msg):
        print(msg, flush=True)

    def save():
        with open(raw, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)

    if args.only in (None, "memory"):
        run_memory(cases, results, log, jobs=args.jobs, kinds=tuple(args.memory_kinds.split(",")), save=save)
        save()
    if args.only in (None, "time"):
        results["machine"], results["versions"] = machine(), versions()
        run_time(cases, args.rounds, results, log)
        save()
    write(results, os.path.join(args.out, "RESULTS.md"), os.path.join(args.out, "plots"))
    log(f"wrote {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
