"""``make gpu-check OUT=dir``: one pass over everything that needs an NVIDIA GPU, for a machine
with one and no network.

    python -m benchmarks.gpu_check --out DIR            # on the GPU machine
    python -m benchmarks.gpu_check --out DIR --dry-run  # the plumbing, anywhere: names each step it skips

Steps, each with a time budget (seconds, for a 16-core H200; the whole run stays under 8 minutes
because every step is cut at its budget and the rest of the run goes on):

  env       versions, the GPU, its architecture and SM count                        (5)
  build     the extension in place for the present GPU's architecture only, with
            ``-Xptxas -v``; then ``python -m tiedkernels info`` must report the CUDA
            kernels and the GPU, and the resource table of this build (spills fail) (150)
  test      tests/test_cuda.py: both GPU backends, cuda and triton, on the GPU
            (8 pytest-xdist workers when xdist is there: Triton compiles in parallel) (120)
  bench     benchmarks/test_bench_gpu.py: cuda and triton against plain PyTorch,
            torch.compile, Liger Kernel and Cut Cross-Entropy (when importable), the
            Llama 3 8B head and a 32k shape, CUDA events and peak memory            (110)
  memcheck  compute-sanitizer memcheck over a small case of each op, per backend
            (cuda 35, triton 50: its kernels compile under the sanitizer)           (85)

It writes ``DIR/gpu_check.json`` (every step's status, time and figures) and ``DIR/RESULTS.md``
(a section for benchmarks/RESULTS.md), each step's log and raw output under ``DIR/logs/``, and
exits non-zero when a step failed or ran out of time.  The packages it needs beyond the machine's own are in requirements/gpu-check.txt.
``memcheck-case`` (below) is the small workload the sanitizer runs.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 470  # under 8 minutes, the machine's start and the transfers aside
BUDGETS = {"env": 5, "build": 150, "test": 120, "bench": 110, "memcheck-cuda": 35, "memcheck-triton": 50}


def log(msg):
    print(f"gpu-check [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    def __init__(self, out, python, dry_run, total=TOTAL_BUDGET_S):
        self.out = out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.python = python
        self.dry = dry_run
        self.deadline = time.monotonic() + total
        self.steps = []
        self.data = {}

    def left(self):
        return self.deadline - time.monotonic()

    def record(self, name, status, seconds=0.0, detail="", **extra):
        step = {"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail, **extra}
        self.steps.append(step)
        log(f"{name}: {status}{' - ' + detail if detail else ''} ({seconds:.0f} s)")
        return step

    def skip(self, name, why, command=None):
        return self.record(name, "skipped", 0.0, why, command=command)

    def run(self, name, cmd, budget, env=None, logname=None):
        """Run cmd with a budget (cut to what is left of the total); its output goes to a log."""
        budget = max(1, min(budget, int(self.left())))
        logpath = os.path.join(self.logs, logname or f"{name}.log")
        log(f"{name}: {' '.join(cmd)} (budget {budget} s, log {os.path.basename(logpath)})")
        t0 = time.monotonic()
        with open(logpath, "w") as f:
            try:
                p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
                rc = p.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                rc = None
        dt = time.monotonic() - t0
        tail = _tail(logpath)
        return rc, dt, tail


def _tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _has_module(python, name):
    res = subprocess.run([python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{name}') is None)"],
                         capture_output=True)
    return res.returncode == 0


# ---------------------------------------------------------------------------------------------
# steps


def step_env(r):
    t0 = time.monotonic()
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    gpu = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                   "memory_gib": round(p.total_memory / 2**30, 1)}
    except Exception as exc:
        info["torch"] = f"not importable: {exc}"
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "pytest_benchmark"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "installed")
        except Exception:
            info[mod] = None
    for tool, args in (("nvcc", ["--version"]), ("compute-sanitizer", ["--version"]),
                       ("nvidia-smi", ["--query-gpu=name,driver_version", "--format=csv,noheader"])):
        path = shutil.which(tool)
        if path is None:
            info[tool] = None
            continue
        try:
            res = subprocess.run([path] + args, capture_output=True, text=True, timeout=20)
            lines = [x for x in res.stdout.strip().splitlines() if x.strip()]
            info[tool] = lines[-1] if lines else f"{path} (no output)"
        except Exception as exc:
            info[tool] = f"{path} ({exc})"
    info["gpu"] = gpu
    r.data["env"] = info
    r.record("env", "ok", time.monotonic() - t0,
             f"GPU {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs)" if gpu
             else "no CUDA GPU")
    return gpu


def step_build(r, gpu):
    arch = gpu["capability"] if gpu else None
    # --force: a build folder left by an earlier run must not skip the compile (and its ptxas report)
    cmd = [r.python, "setup.py", "build_ext", "--inplace", "--force"]
    if r.dry:
        r.skip("build", "dry run: no GPU; would build csrc/cuda for this GPU's architecture only",
               "TIEDKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<capability> NVCC_APPEND_FLAGS='-Xptxas -v' "
               + " ".join(cmd))
        return False
    env = {"TIEDKERNELS_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
           "NVCC_APPEND_FLAGS": (os.environ.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip()}
    rc, dt, tail = r.run("build", cmd, BUDGETS["build"], env=env)
    if rc != 0:
        r.record("build", "timeout" if rc is None else "failed", dt, tail.strip()[-400:])
        return False
    res = subprocess.run([r.python, "-m", "tiedkernels", "info"], cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(r.logs, "info.txt"), "w") as f:
        f.write(res.stdout + res.stderr)
    ok = "CUDA kernels yes" in res.stdout and gpu["name"] in res.stdout
    if not ok:
        r.record("build", "failed", dt, "`python -m tiedkernels info` does not report the CUDA kernels and the GPU: "
                 + res.stdout.strip()[-300:])
        return False
    table = os.path.join(r.logs, "cuda_resources.json")
    res = subprocess.run([r.python, "-m", "tiedkernels.gpu_report", "cuda-table", "--root", ROOT,
                          "--ptxas-log", os.path.join(r.logs, "build.log"), "--out", table],
                         cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(r.logs, "cuda_table.log"), "w") as f:
        f.write(res.stdout + res.stderr)
    if res.returncode != 0:
        r.record("build", "failed", dt, "resource table: " + (res.stdout + res.stderr).strip()[-400:])
        return False
    with open(table) as f:
        r.data["cuda_resources"] = json.load(f)["kernels"]
    r.record("build", "ok", dt, f"sm_{arch.replace('.', '')} only; {len(r.data['cuda_resources'])} kernels, no spills")
    return True


def _junit_counts(path):
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures = []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None, []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def step_test(r, built):
    junit = os.path.join(r.logs, "test_cuda.xml")
    cmd = [r.python, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if r.dry or not built:
        # the plumbing: the file must collect here (a GPU-less machine), every test behind the marker
        rc, dt, tail = r.run("test-collect", [r.python, "-m", "pytest", "tests/test_cuda.py", "--collect-only", "-q",
                                              "-p", "no:cacheprovider"], 120)
        m = re.search(r"(\d+) tests? collected", tail)
        r.data["test_collected"] = int(m.group(1)) if m else None
        if rc != 0:
            r.record("test-collect", "failed", dt, tail.strip()[-300:])
        else:
            r.record("test-collect", "ok", dt, f"{r.data['test_collected']} tests collected")
        r.skip("test", "dry run: no GPU" if r.dry else "the build failed", " ".join(cmd))
        return
    if _has_module(r.python, "xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    rc, dt, tail = r.run("test", cmd, BUDGETS["test"])
    counts, failures = _junit_counts(junit)
    r.data["tests"] = {"counts": counts, "failures": failures[:50]}
    if rc is None:
        r.record("test", "timeout", dt, f"cut at its budget; so far {counts}")
    elif rc != 0 or counts is None or counts["failed"] or counts["errors"]:
        r.record("test", "failed", dt, f"{counts}; first failures: {failures[:5]}" if counts else tail[-300:])
    else:
        r.record("test", "ok", dt, f"{counts}")


def step_bench(r, built):
    bjson = os.path.join(r.logs, "bench.json")
    cmd = [r.python, "-m", "pytest", "benchmarks/test_bench_gpu.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={bjson}"]
    if r.dry or not built:
        rc, dt, tail = r.run("bench-collect", [r.python, "-m", "pytest", "benchmarks/test_bench_gpu.py",
                                               "--collect-only", "-q", "-p", "no:cacheprovider"], 60)
        if rc != 0:
            r.record("bench-collect", "failed", dt, tail.strip()[-300:])
        else:
            r.record("bench-collect", "ok", dt, re.sub(r"\s+", " ", tail.strip().splitlines()[-1]))
        r.skip("bench", "dry run: no GPU" if r.dry else "the build failed", " ".join(cmd))
        return
    rc, dt, tail = r.run("bench", cmd, BUDGETS["bench"])
    rows = read_bench(bjson)
    r.data["bench"] = rows
    if rc is None:
        r.record("bench", "timeout", dt, f"cut at its budget; {len(rows)} cases measured")
    elif rc != 0:
        r.record("bench", "failed", dt, tail.strip()[-300:])
    else:
        r.record("bench", "ok", dt, f"{len(rows)} cases")


def read_bench(path):
    """pytest-benchmark's JSON -> rows of (shape, provider, cuda_ms, tflops, peak_mib, roofline_ms)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    rows = []
    for b in data.get("benchmarks", []):
        x = b.get("extra_info", {})
        if "cuda_ms" not in x:
            continue
        rows.append({k: x.get(k) for k in ("shape", "provider", "cuda_ms", "tflops", "peak_mib", "roofline_ms",
                                           "device")})
    return rows


MEMCHECK_CMD = ["--tool", "memcheck", "--error-exitcode", "99", "--leak-check", "no"]


def step_memcheck(r, built):
    sanitizer = shutil.which("compute-sanitizer")
    case = [r.python, "-m", "benchmarks.gpu_check", "memcheck-case"]
    if r.dry or not built:
        # the plumbing: the workload itself, on the CPU (backend cpu), must run here
        rc, dt, tail = r.run("memcheck-case", case + ["--device", "cpu"], 120)
        r.record("memcheck-case", "ok" if rc == 0 else "failed", dt,
                 "the sanitizer's workload ran on the CPU" if rc == 0 else tail.strip()[-300:])
        r.skip("memcheck", "dry run: no GPU" if r.dry else "the build failed",
               f"compute-sanitizer {' '.join(MEMCHECK_CMD)} {' '.join(case)} --device cuda")
        return
    if sanitizer is None:
        r.record("memcheck", "failed", 0.0, "compute-sanitizer is not on the PATH")
        return
    results = {}
    for backend in ("cuda", "triton"):
        rc, dt, tail = r.run(f"memcheck-{backend}", [sanitizer] + MEMCHECK_CMD + case + ["--backend", backend],
                             BUDGETS[f"memcheck-{backend}"], env={"TIEDKERNELS_CHECK_INDICES": "1"})
        errors = re.search(r"ERROR SUMMARY: (\d+) error", tail)
        results[backend] = {"rc": rc, "seconds": round(dt, 1), "errors": int(errors.group(1)) if errors else None}
        status = "timeout" if rc is None else ("ok" if rc == 0 and errors and errors.group(1) == "0" else "failed")
        r.record(f"memcheck-{backend}", status, dt, errors.group(0) if errors else tail.strip()[-300:])
    r.data["memcheck"] = results


# ---------------------------------------------------------------------------------------------
# the sanitizer's workload


def memcheck_case(device, backends_):
    """A small case of each op and path, forward and backward: embedding (atomic fp32 and the
    sorted bf16 path), logits with scale and softcap, the fused loss in both strategies with
    every option, and a bad label (the IndexError path)."""
    import torch

    import tiedkernels as tk

    torch.manual_seed(0)
    n, d, v = 37, 64, 1000
    for backend in backends_:
        for dtype in (torch.float32, torch.bfloat16):
            w = (torch.randn(v, d, device=device) * 0.05).to(dtype).requires_grad_()
            ids = torch.randint(0, v, (n,), device=device)
            e = tk.embedding(ids, w, padding_idx=3, backend=backend)
            e.backward(torch.randn_like(e))
            h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(v, device=device, dtype=dtype, requires_grad=True)
            z = tk.logits(h, w, bias=b, logit_scale=0.7, softcap=20.0, backend=backend)
            z.backward(torch.randn_like(z))
            y = torch.randint(0, v, (n,), device=device)
            y[::5] = -100
            for reduction in ("mean", "none"):
                loss = tk.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, label_smoothing=0.1,
                                               z_loss=1e-4, softcap=30.0, logit_scale=0.9, chunk_size=16,
                                               backend=backend)
                loss.backward(torch.randn_like(loss))
            bad = y.clone()
            bad[7] = v + 5
            try:
                tk.linear_cross_entropy(h, w, bad, backend=backend)
            except IndexError:
                pass
            else:
                raise AssertionError(f"{backend}: a label outside [0, V) did not raise")
            for t in (w.grad, h.grad, b.grad):
                assert t is not None and torch.isfinite(t.float()).all(), f"{backend} {dtype}: a non-finite gradient"
        if device != "cpu":
            torch.cuda.synchronize()
        print(f"memcheck-case: {backend} on {device}: every op ran", flush=True)


# ---------------------------------------------------------------------------------------------
# results


def write_results(r):
    env = r.data.get("env", {})
    gpu = env.get("gpu")
    failed = [s for s in r.steps if s["status"] in ("failed", "timeout")]
    summary = {"dry_run": r.dry, "ok": not failed, "env": env, "steps": r.steps,
               **{k: v for k, v in r.data.items() if k != "env"}}
    with open(os.path.join(r.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    L = []
    where = f"{gpu['name']} ({gpu['sms']} SMs, {gpu['memory_gib']} GiB)" if gpu else "no GPU (dry run)"
    L.append(f"## GPU check: {where}, {env.get('date', '')}")
    L.append("")
    L.append(f"`make gpu-check`{' DRY_RUN=1' if r.dry else ''}: Python {env.get('python')}, torch {env.get('torch')}, "
             f"Triton {env.get('triton')}, nvcc `{env.get('nvcc')}`, {env.get('cpus')} CPUs; "
             f"Liger Kernel {env.get('liger_kernel') or 'not installed'}, "
             f"Cut Cross-Entropy {env.get('cut_cross_entropy') or 'not installed'}.")
    L.append("")
    L.append("| step | status | seconds | detail |")
    L.append("|---|---|---|---|")
    for s in r.steps:
        L.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {str(s['detail']).replace('|', '/')[:200]} |")
    rows = r.data.get("bench") or []
    if rows:
        L.append("")
        L.append("Fused loss forward + backward, bf16 (CUDA events, median of 10; peak memory above the inputs; "
                 "roofline from `python -m tiedkernels gpu-report` at this GPU's SM count):")
        L.append("")
        L.append("| shape | provider | ms | TFLOP/s (6·N·D·V) | peak MiB | H100 roofline ms (cost model) |")
        L.append("|---|---|---|---|---|---|")
        for x in sorted(rows, key=lambda x: (str(x["shape"]), x["cuda_ms"] or 0)):
            L.append(f"| {x['shape']} | {x['provider']} | {x['cuda_ms']} | {x['tflops']} | {x['peak_mib']} | "
                     f"{x['roofline_ms'] if x['roofline_ms'] is not None else ''} |")
    res = r.data.get("cuda_resources") or []
    if res:
        L.append("")
        L.append("CUDA kernels of this build (`ptxas -v`, cuobjdump): "
                 + "; ".join(f"{k['kernel']} ({k['config']}) {k['registers']} regs, {k['spill_bytes']} B spilled"
                             for k in res))
    with open(os.path.join(r.out, "RESULTS.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return not failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memcheck-case"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check memcheck-case")
        ap.add_argument("--device", default="cuda")
        ap.add_argument("--backend", action="append")
        a = ap.parse_args(argv[1:])
        memcheck_case(a.device, a.backend or (["cpu", "torch"] if a.device == "cpu" else ["cuda", "triton"]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, RESULTS.md and the logs")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run the plumbing and name each step skipped")
    ap.add_argument("--python", default=sys.executable, help="the Python that builds and tests (default: this one)")
    ap.add_argument("--budget", type=int, default=TOTAL_BUDGET_S, help="seconds for the whole run")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    r = Runner(os.path.abspath(a.out), a.python, a.dry_run, a.budget)
    log(f"{'dry run' if a.dry_run else 'run'}: results in {r.out}, budget {a.budget} s")
    gpu = step_env(r)
    if gpu is None and not a.dry_run:
        r.record("env", "failed", 0.0, "no CUDA GPU is visible to torch (use DRY_RUN=1 to check the plumbing)")
        write_results(r)
        return 1
    built = step_build(r, gpu)
    step_test(r, built)
    step_bench(r, built)
    step_memcheck(r, built)
    ok = write_results(r)
    skipped = [s["step"] for s in r.steps if s["status"] == "skipped"]
    log(f"done: {'all steps passed' if ok else 'FAILED: ' + ', '.join(s['step'] for s in r.steps if s['status'] in ('failed', 'timeout'))}"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + f"; wrote {os.path.join(r.out, 'gpu_check.json')} and RESULTS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
