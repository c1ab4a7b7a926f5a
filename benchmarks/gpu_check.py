"""``make gpu-check OUT=dir``: one pass over everything that needs an NVIDIA GPU, for a machine
with one and no network, made so that its one run comes back with every figure it could get.

    python -m benchmarks.gpu_check --out DIR            # on the GPU machine
    python -m benchmarks.gpu_check --out DIR --dry-run  # the plumbing, anywhere: names each step it skips

Steps, each with a time budget (seconds; the whole run is cut at ``--budget``, 9 minutes by default,
and a step that runs out of time is killed with its process group while the rest of the run goes on):

  wheels       with ``--wheels DIR``: ``pip install --no-index --no-deps --target SITE`` of the
               wheels of requirements/gpu-check.txt found there                            (90)
  env          versions and the GPUs, read by the Python that builds and tests           (60)
  preflight    in seconds: the driver (nvidia-smi), nvcc and its major version against
               torch's CUDA, ninja (without it the extension builds one file after
               another), setuptools, compute-sanitizer, ncu; each recorded with its
               version or why it is missing, and a missing one disables only the steps
               that need it                                                       (15 per tool)
  build        the extension in place for the present GPU's architecture only, with
               ``-Xptxas -v``                                                            (150)
  info         ``python -m tiedkernels info`` must report the CUDA kernels and the GPU    (60)
  cuda-table   the resource table of this build (spills fail)                            (90)
  test-cuda    tests/test_cuda.py on the cuda backend (needs the build)                  (100)
  test-triton  tests/test_cuda.py on the triton backend: runs whether or not the build
               worked (Triton needs no nvcc)                                             (110)
  bench        benchmarks/test_bench_gpu.py: cuda (when built) and triton against plain
               PyTorch, torch.compile, Liger Kernel and Cut Cross-Entropy (when
               importable), the Llama 3 8B head and a 32k shape                          (100)
  memcheck-*   compute-sanitizer memcheck over a small case of each op, per backend
               (cuda 35 s, when built; triton 50 s: its kernels compile under the sanitizer)

Every step's PATH starts with SITE/bin (where ``pip --target`` puts executables) and the CUDA
toolkit's bin folder when nvcc is found only there; PYTHONPATH starts with SITE; the first-use
build of the extension is off (``TIEDKERNELS_JIT=0``), so an unloadable ``.so`` never starts a
minutes-long compile.  Results are written as they come: a JSON line per finished test
(``DIR/logs/test-*.jsonl``, by this module loaded as a pytest plugin) and per timed benchmark case
(``DIR/logs/bench-cases.jsonl``), so a step cut at its budget keeps what finished.  The summary,
``DIR/gpu_check.json`` (every step's status, time and figures, the failing tests with their
errors) and ``DIR/RESULTS.md`` (a section for benchmarks/RESULTS.md), is rewritten after every
step and last of all from whatever exists, also when a step hangs or the run is stopped
(SIGTERM, SIGINT, SIGHUP, or the hard limit).  The exit status is non-zero when a step failed,
ran out of time or could not run for a missing tool.

The dry run of ``make test`` (``make gpu-check-dry``) also injects a failing build
(``--inject-build-failure``) and a step that hangs after a few tests (``--inject-hang
test-triton``), and checks that the rest still ran and reported.
``memcheck-case`` (below) is the small workload the sanitizer runs.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 540  # the hard limit of a run: 9 minutes, the machine's start and the transfers aside
SUMMARY_RESERVE_S = 10  # kept back from the steps, for the summary
MIN_STEP_S = 5  # a step is not started with less than this left
BUDGETS = {"wheels": 90, "env": 60, "tool": 15, "build": 150, "info": 60, "cuda-table": 90, "test-cuda": 100,
           "test-triton": 110, "bench": 100, "memcheck-cuda": 35, "memcheck-triton": 50,
           "test-collect": 120, "bench-collect": 60, "memcheck-case": 120}
FAILING = ("failed", "timeout", "killed")

STREAM_ENV = "GPU_CHECK_STREAM"  # the plugin's JSON lines, one per finished test
HANG_ENV = "GPU_CHECK_HANG_AFTER"  # the dry run's injected hang: the plugin stops before test k + 1
BENCH_ENV = "GPU_CHECK_BENCH"  # benchmarks/test_bench_gpu.py's JSON lines, one per timed case
BACKENDS_ENV = "TIEDKERNELS_TEST_GPU_BACKENDS"  # which GPU backends tests/test_cuda.py and the benchmark run
HANG_AFTER = 3
TEST_FILE = "tests/test_cuda.py"
BENCH_FILE = "benchmarks/test_bench_gpu.py"


def log(msg):
    print(f"gpu-check [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stop(Exception):
    """A signal ended the run (SIGTERM, SIGINT, SIGHUP, or SIGALRM: the hard limit)."""


class OutOfTime(Exception):
    """Too little of the run's budget is left to start a step."""


class Result:
    def __init__(self, rc, seconds, log):
        self.rc, self.seconds, self.log = rc, seconds, log

    @property
    def timed_out(self):
        return self.rc is None

    def tail(self, chars=400):
        return _tail(self.log)[-chars:].strip()


class Runner:
    """Runs the steps: each child in a process group of its own, bounded by its budget and by what is
    left of the run's; records each step and rewrites the summary after it."""

    def __init__(self, out, python, dry_run, total=TOTAL_BUDGET_S, site=None, budgets=None,
                 inject_build_failure=False, hang=None):
        self.out = out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.python = python
        self.dry = dry_run
        self.total = total
        self.deadline = time.monotonic() + total
        self.budgets = {**BUDGETS, **(budgets or {})}
        self.inject_build_failure = inject_build_failure
        self.hang = hang
        self.steps = []
        self.data = {}
        self.disabled = {}  # step -> why the preflight turned it off
        self.proc = None  # the child running now
        self.current = None  # its step
        self.env = dict(os.environ, TIEDKERNELS_JIT="0", PYTHONUNBUFFERED="1")
        self.site = None
        if site:
            self.use_site(site)

    @property
    def injected(self):
        return self.inject_build_failure or self.hang is not None

    def use_site(self, site):
        """Packages installed with ``pip --target site``: importable, and their executables on the PATH."""
        self.site = os.path.abspath(site)
        self.add_path(os.path.join(self.site, "bin"))
        pp = self.env.get("PYTHONPATH")
        self.env["PYTHONPATH"] = self.site + (os.pathsep + pp if pp else "")

    def add_path(self, folder):
        path = self.env.get("PATH", "")
        if folder not in path.split(os.pathsep):
            self.env["PATH"] = folder + (os.pathsep + path if path else "")

    def which(self, tool):
        return shutil.which(tool, path=self.env.get("PATH", ""))

    def left(self):
        return self.deadline - time.monotonic()

    def record(self, name, status, seconds=0.0, detail="", **extra):
        step = {"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail, **extra}
        self.steps.append(step)
        log(f"{name}: {status}{' - ' + detail if detail else ''} ({seconds:.0f} s)")
        write_results(self)
        return step

    def skip(self, name, why, command=None):
        return self.record(name, "skipped", 0.0, why, command=command)

    def run(self, name, cmd, budget=None, env=None, logname=None):
        """Run cmd, its output to a log, cut at its budget and at what is left of the run (kept back:
        the summary's time); on a timeout or a signal the child's whole process group is killed."""
        left = int(self.left() - SUMMARY_RESERVE_S)
        if left < MIN_STEP_S:
            raise OutOfTime(name)
        budget = max(1, min(self.budgets.get(name, 60) if budget is None else budget, left))
        logpath = os.path.join(self.logs, logname or f"{name}.log")
        shown = " ".join(cmd) if len(" ".join(cmd)) < 300 else " ".join(cmd)[:120].split("\n")[0] + " ..."
        log(f"{name}: {shown} (budget {budget} s, log {os.path.relpath(logpath, self.out)})")
        t0 = time.monotonic()
        self.current = name  # kept when a signal stops the run here, so that the record names this step
        with open(logpath, "w") as f:
            try:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env={**self.env, **(env or {})},
                                             start_new_session=True)
            except OSError as exc:
                f.write(f"gpu-check: cannot start {cmd[0]}: {exc}\n")
                self.current = None
                return Result(127, time.monotonic() - t0, logpath)
            try:
                rc = self.proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                rc = None
                f.write(f"\ngpu-check: killed at its budget of {budget} s\n")
            finally:
                self.kill()  # the group: workers and compilers the step left behind go too
        self.current = None
        return Result(rc, time.monotonic() - t0, logpath)

    def kill(self):
        """SIGTERM to the running child's process group, SIGKILL after 3 s, and SIGKILL to whatever of
        the group is left once the child is gone."""
        p, self.proc = self.proc, None
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, None)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def quick(self, cmd, timeout=None):
        """(returncode or None on a timeout, output) of a short command (a tool's version)."""
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.budgets["tool"],
                                 env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout or self.budgets['tool']} s"
        except OSError as exc:
            return 1, str(exc)
        return res.returncode, (res.stdout + res.stderr).strip()


def _tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _json_lines(path):
    """The complete JSON lines of a file (a line cut by a kill is left out)."""
    rows = []
    for line in _read(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# ---------------------------------------------------------------------------------------------
# the pytest plugin (``-p benchmarks.gpu_check``): a JSON line per finished test, written as it finishes

_plugin = {"worker": False, "started": 0}


def pytest_configure(config):
    _plugin["worker"] = hasattr(config, "workerinput")  # under xdist only the controller writes


def pytest_runtest_logstart(nodeid, location):
    after = os.environ.get(HANG_ENV)
    if after is None or _plugin["worker"]:
        return
    _plugin["started"] += 1
    if _plugin["started"] > int(after):
        print(f"\ngpu-check: injected hang before {nodeid}", flush=True)
        while True:
            time.sleep(60)


def pytest_runtest_logreport(report):
    path = os.environ.get(STREAM_ENV)
    if not path or _plugin["worker"]:
        return
    if report.when != "call" and report.passed:
        return  # setup and teardown count only when they fail or skip
    row = {"test": report.nodeid, "outcome": report.outcome, "when": report.when, "seconds": round(report.duration, 3)}
    if report.failed:
        row["error"] = report.longreprtext[-1500:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["reason"] = str(report.longrepr[2])[:300]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_stream(path):
    """The streamed results of a test step: counts per outcome (a test whose teardown failed is an
    error), the failures with their errors, and how many tests finished."""
    final = {}
    for row in _json_lines(path):
        prev = final.get(row["test"])
        if row["outcome"] == "failed":
            row = dict(row, outcome="failed" if row["when"] == "call" else "errors")
        if prev is None or prev["outcome"] in ("passed", "skipped"):
            final[row["test"]] = row
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for row in final.values():
        counts[row["outcome"]] += 1
    failures = [{"test": t, "outcome": r["outcome"], "error": r.get("error", "")}
                for t, r in final.items() if r["outcome"] in ("failed", "errors")]
    return {"finished": len(final), "counts": counts, "failures": failures}


# ---------------------------------------------------------------------------------------------
# steps

PROBE = r"""
import importlib.metadata, importlib.util, json, os, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
       "cpus": os.cpu_count()}
for mod, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"),
                  ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("xdist", "pytest-xdist"),
                  ("expecttest", "expecttest")):
    try:
        out[mod] = importlib.metadata.version(dist)
    except Exception:
        out[mod] = "installed" if importlib.util.find_spec(mod) else None
try:
    import setuptools
    out["setuptools"] = setuptools.__version__
except Exception as exc:
    out["setuptools"] = None
    out["setuptools_error"] = f"{type(exc).__name__}: {exc}"
try:
    import torch
    out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
    out["gpus"] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                                "memory_gib": round(p.total_memory / 2**30, 1)})
except Exception as exc:
    out["torch"] = None
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
print("GPU_CHECK_PROBE " + json.dumps(out))
"""


def step_wheels(r, wheels):
    whl = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not whl:
        r.record("wheels", "failed", 0.0, f"no wheels in {wheels}")
        return
    site = r.site or os.path.join(ROOT, "build", "gpu-check-site")
    res = r.run("wheels", [r.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", site] + whl)
    r.use_site(site)  # what did install is used even when one wheel failed
    names = [os.path.basename(w) for w in whl]
    if res.rc == 0:
        r.record("wheels", "ok", res.seconds, f"{len(whl)} wheels into {os.path.relpath(site, ROOT)}", wheels=names)
    elif res.timed_out:
        r.record("wheels", "timeout", res.seconds, res.tail(), wheels=names)
    else:
        # no pip in that Python, or a pip that refuses: a pure-Python wheel is a zip of what pip would
        # copy (console scripts aside, which none of these needs)
        import zipfile

        for w in whl:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        r.record("wheels", "ok", res.seconds, f"pip failed ({res.tail(200)}); unzipped the {len(whl)} wheels into "
                 f"{os.path.relpath(site, ROOT)} instead", wheels=names)


def step_env(r):
    """Versions and GPUs, read by the Python that builds and tests, in a child bounded in time."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": None}
    r.data["env"] = info
    res = r.run("env", [r.python, "-c", PROBE])
    m = re.search(r"^GPU_CHECK_PROBE (.*)$", _read(res.log), re.M)
    if m is None:
        r.record("env", "timeout" if res.timed_out else "failed", res.seconds, res.tail())
        return None
    info.update(json.loads(m.group(1)))
    gpus = info.get("gpus") or []
    info["gpu"] = gpus[0] if gpus else None
    gpu = info["gpu"]
    if info.get("torch") is None:
        r.record("env", "failed", res.seconds, f"torch is not importable: {info.get('torch_error')}")
    else:
        r.record("env", "ok", res.seconds,
                 f"{len(gpus)} GPU(s), the first {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                 f"{gpu['sms']} SMs); torch {info['torch']} (CUDA {info['torch_cuda']})" if gpu
                 else f"no CUDA GPU; torch {info['torch']} (CUDA {info.get('torch_cuda')})")
    return gpu


def _major(version):
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else None


def _tool(r, name, args, parse=None):
    """{path, version} of a tool found on the steps' PATH, or {why} it is not usable."""
    path = r.which(name)
    if path is None:
        return {"found": False, "why": "not on the PATH"}
    rc, out = r.quick([path] + args)
    if rc != 0:
        return {"found": False, "path": path, "why": out[-300:] if rc is None else f"exit {rc}: {out[-300:]}"}
    lines = [x.strip() for x in out.splitlines() if x.strip()]
    version = parse(out) if parse else (lines[-1] if lines else "")
    return {"found": True, "path": path, "version": version}


def _nvcc_release(out):
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else ""


def step_preflight(r):
    """What each step needs, found in seconds; a missing tool disables only the steps that need it."""
    t0 = time.monotonic()
    env = r.data.get("env", {})
    if r.which("nvcc") is None:  # a toolkit that is installed but not on the PATH
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
                r.add_path(os.path.join(home, "bin"))
                break
    tools = {
        "nvidia-smi": _tool(r, "nvidia-smi", ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            str.strip),
        "nvcc": _tool(r, "nvcc", ["--version"], _nvcc_release),
        "ninja": _tool(r, "ninja", ["--version"]),
        "compute-sanitizer": _tool(r, "compute-sanitizer", ["--version"]),
        "ncu": _tool(r, "ncu", ["--version"]),
    }
    if tools["nvidia-smi"]["found"]:
        rows = [x.split(",") for x in tools["nvidia-smi"]["version"].splitlines()]
        tools["nvidia-smi"]["driver"] = rows[0][1].strip() if rows and len(rows[0]) > 1 else None
    st = env.get("setuptools")
    tools["setuptools"] = ({"found": True, "version": st} if st else
                           {"found": False, "why": env.get("setuptools_error", "the env probe did not run")})
    torch_cuda = env.get("torch_cuda")
    nvcc = tools["nvcc"]
    if nvcc["found"]:
        nvcc["major"] = _major(nvcc["version"])
        nvcc["torch_cuda"] = torch_cuda
        nvcc["matches_torch"] = nvcc["major"] is not None and nvcc["major"] == _major(torch_cuda)
    r.data["preflight"] = tools
    env["nvcc"] = nvcc.get("version")
    env["compute-sanitizer"] = tools["compute-sanitizer"].get("version")
    env["nvidia-smi"] = tools["nvidia-smi"].get("version")

    build_why = []
    if env.get("gpu") is None:
        build_why.append("no CUDA GPU is visible to torch")
    if not torch_cuda:
        build_why.append("torch is not a CUDA build")
    if not nvcc["found"]:
        build_why.append(f"nvcc: {nvcc['why']}")
    elif torch_cuda and not nvcc["matches_torch"]:
        build_why.append(f"nvcc {nvcc['version']} is not torch's CUDA major ({torch_cuda})")
    if not tools["setuptools"]["found"]:
        build_why.append(f"setuptools is not importable ({tools['setuptools']['why']})")
    notes = []
    if build_why:
        r.disabled["build"] = "; ".join(build_why)
        notes.append(f"build off: {r.disabled['build']}")
    if not tools["ninja"]["found"]:
        notes.append("ninja missing: the extension builds one file after another")
    if not tools["compute-sanitizer"]["found"]:
        r.disabled["memcheck"] = f"compute-sanitizer: {tools['compute-sanitizer']['why']}"
        notes.append(f"memcheck off: {r.disabled['memcheck']}")
    if env.get("gpu") is None:
        for step in ("test-cuda", "test-triton", "bench", "memcheck"):
            r.disabled.setdefault(step, "no CUDA GPU is visible to torch")
    found = ", ".join(f"{k} {v.get('version', '').splitlines()[0] if v.get('version') else ''}".strip()
                      for k, v in tools.items() if v["found"])
    if r.dry:  # nothing runs on a GPU: the tools are recorded, nothing is turned off
        r.disabled.clear()
        r.record("preflight", "ok", time.monotonic() - t0, f"dry run; found: {found or 'none'}")
    else:
        r.record("preflight", "failed" if notes else "ok", time.monotonic() - t0,
                 "; ".join(notes) + f"; found: {found}" if notes else f"found: {found}")


def step_build(r):
    """The extension for this GPU's architecture, then `info` and the resource table; True when the
    cuda backend can be tested."""
    cmd = [r.python, "setup.py", "build_ext", "--inplace", "--force"]
    if r.inject_build_failure:
        res = r.run("build", [r.python, "-c", "import sys; sys.exit('gpu-check: injected build failure')"])
        r.record("build", "failed", res.seconds, "injected: " + res.tail(), command=" ".join(cmd))
        r.build_why = "the CUDA build failed"
        return False
    if r.dry:
        r.skip("build", "dry run: no GPU; would build csrc/cuda for this GPU's architecture only",
               "TIEDKERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<capability> NVCC_APPEND_FLAGS='-Xptxas -v' "
               + " ".join(cmd))
        r.build_why = "dry run: no GPU"
        return False
    if "build" in r.disabled:
        r.build_why = f"the build is off: {r.disabled['build']}"
        r.skip("build", f"off: {r.disabled['build']}", " ".join(cmd))
        return False
    r.build_why = "the CUDA build failed"
    gpu = r.data["env"]["gpu"]
    arch = gpu["capability"]
    # --force: a build folder left by an earlier run must not skip the compile (and its ptxas report)
    env = {"TIEDKERNELS_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4),
           "NVCC_APPEND_FLAGS": (os.environ.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip()}
    res = r.run("build", cmd, env=env)
    if res.rc != 0:
        r.record("build", "timeout" if res.timed_out else "failed", res.seconds, res.tail())
        return False
    serial = "" if r.data["preflight"]["ninja"]["found"] else " (no ninja: serial)"
    r.record("build", "ok", res.seconds, f"sm_{arch.replace('.', '')} only{serial}")
    res = r.run("info", [r.python, "-m", "tiedkernels", "info"])
    text = _read(res.log)
    if res.rc != 0 or "CUDA kernels yes" not in text or gpu["name"] not in text:
        r.record("info", "timeout" if res.timed_out else "failed", res.seconds,
                 "`python -m tiedkernels info` does not report the CUDA kernels and the GPU: " + res.tail(300))
        r.build_why = "`python -m tiedkernels info` does not report the CUDA kernels"
        return False
    r.record("info", "ok", res.seconds, "the CUDA kernels and the GPU are reported")
    table = os.path.join(r.logs, "cuda_resources.json")
    res = r.run("cuda-table", [r.python, "-m", "tiedkernels.gpu_report", "cuda-table", "--root", ROOT,
                               "--ptxas-log", os.path.join(r.logs, "build.log"), "--out", table])
    if res.rc != 0:
        r.record("cuda-table", "timeout" if res.timed_out else "failed", res.seconds, res.tail())
    else:
        with open(table) as f:
            r.data["cuda_resources"] = json.load(f)["kernels"]
        r.record("cuda-table", "ok", res.seconds, f"{len(r.data['cuda_resources'])} kernels, no spills")
    return True  # a spill is a finding, not a reason to leave the kernels untested


def _pytest(r, path, *extra, parallel=True):
    """pytest with the streaming plugin; tests spread over up to 8 xdist workers where xdist is there
    (Triton compiles in parallel), never benchmarks (pytest-benchmark turns itself off under xdist,
    and timings must not share the GPU)."""
    cmd = [r.python, "-m", "pytest", path, "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider",
           "-p", "benchmarks.gpu_check", *extra]
    if parallel and not r.dry and r.data.get("env", {}).get("xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    return cmd


def step_collect(r, name, path, what):
    res = r.run(name, [r.python, "-m", "pytest", path, "--collect-only", "-q", "-p", "no:cacheprovider"])
    m = re.search(r"(\d+) tests? collected", _read(res.log))
    if name == "test-collect":
        r.data["test_collected"] = int(m.group(1)) if m else None
    if res.rc != 0 or m is None:
        r.record(name, "timeout" if res.timed_out else "failed", res.seconds, res.tail(300))
    else:
        r.record(name, "ok", res.seconds, f"{m.group(1)} {what} collected")


def _pytest_step(r, name, cmd, env, stream, counted=None):
    """Run a pytest step whose plugin streams a line per finished test; the record counts what finished
    (``counted``: a note on what else the step streamed, read after the run)."""
    if r.hang == name:
        env = {**env, HANG_ENV: str(HANG_AFTER)}
    res = r.run(name, cmd, env={STREAM_ENV: stream, **env})
    got = read_stream(stream)
    r.data.setdefault("tests", {})[name] = got
    counts, first = got["counts"], [f["test"] for f in got["failures"][:5]]
    note = f"; {counted()}" if counted else ""
    if res.timed_out:
        r.record(name, "timeout", res.seconds, f"cut at its budget; {got['finished']} tests finished: {counts}{note}")
    elif res.rc == 0:
        r.record(name, "ok", res.seconds, f"{counts}{note}")
    elif not got["finished"]:  # nothing ran: a collection error, a crash at start
        r.record(name, "failed", res.seconds, f"exit {res.rc}: " + res.tail(300))
    else:
        r.record(name, "failed", res.seconds, f"{counts}; first failures: {first}{note}")
    return res


def step_tests(r, built):
    cmds = {b: " ".join(_pytest(r, TEST_FILE)) + f"  ({BACKENDS_ENV}={b})" for b in ("cuda", "triton")}
    if r.dry and not r.injected:
        r.skip("test", "dry run: no GPU", "; ".join(cmds.values()))
        return
    for backend in ("cuda", "triton"):
        name = f"test-{backend}"
        if backend == "cuda" and not built:
            r.skip(name, r.build_why, cmds[backend])
        elif r.dry and r.hang != name:
            r.skip(name, "dry run: no GPU", cmds[backend])
        elif name in r.disabled:
            r.skip(name, f"off: {r.disabled[name]}", cmds[backend])
        else:
            _pytest_step(r, name, _pytest(r, TEST_FILE), {BACKENDS_ENV: backend},
                         os.path.join(r.logs, f"{name}.jsonl"))


def step_bench(r, built):
    bjson = os.path.join(r.logs, "bench.json")
    cases = os.path.join(r.logs, "bench-cases.jsonl")
    cmd = _pytest(r, BENCH_FILE, "--benchmark-only", f"--benchmark-json={bjson}", parallel=False)
    backends_ = "cuda,triton" if built else "triton"
    if r.dry and r.hang != "bench":
        r.skip("bench", "dry run: no GPU", " ".join(cmd))
        return
    if "bench" in r.disabled:
        r.skip("bench", f"off: {r.disabled['bench']}", " ".join(cmd))
        return
    def timed():
        r.data["bench"] = read_bench_lines(cases) or read_bench(bjson)
        return f"{len(r.data['bench'])} cases timed (backends {backends_})"

    _pytest_step(r, "bench", cmd, {BACKENDS_ENV: backends_, BENCH_ENV: cases}, os.path.join(r.logs, "bench.jsonl"),
                 timed)


def read_bench_lines(path):
    """The benchmark's streamed cases -> rows of (shape, provider, cuda_ms, tflops, peak_mib, roofline_ms, device)."""
    return [{k: x.get(k) for k in ("shape", "provider", "cuda_ms", "tflops", "peak_mib", "roofline_ms", "device")}
            for x in _json_lines(path) if "cuda_ms" in x]


def read_bench(path):
    """pytest-benchmark's JSON (written only when the run ends) -> the same rows."""
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
    case = [r.python, "-m", "benchmarks.gpu_check", "memcheck-case"]
    if r.dry:
        # the plumbing: the workload itself, on the CPU (backends cpu and torch), must run here
        res = r.run("memcheck-case", case + ["--device", "cpu"])
        r.record("memcheck-case", "ok" if res.rc == 0 else ("timeout" if res.timed_out else "failed"), res.seconds,
                 "the sanitizer's workload ran on the CPU" if res.rc == 0 else res.tail(300))
        r.skip("memcheck", "dry run: no GPU", f"compute-sanitizer {' '.join(MEMCHECK_CMD)} {' '.join(case)} "
               "--backend cuda|triton")
        return
    results = {}
    for backend in ("cuda", "triton"):
        name = f"memcheck-{backend}"
        if backend == "cuda" and not built:
            r.skip(name, r.build_why)
            continue
        if "memcheck" in r.disabled:
            r.skip(name, f"off: {r.disabled['memcheck']}")
            continue
        res = r.run(name, [r.which("compute-sanitizer")] + MEMCHECK_CMD + case + ["--backend", backend],
                    env={"TIEDKERNELS_CHECK_INDICES": "1"})
        errors = re.search(r"ERROR SUMMARY: (\d+) error", _read(res.log))
        results[backend] = {"rc": res.rc, "seconds": round(res.seconds, 1),
                            "errors": int(errors.group(1)) if errors else None}
        status = "timeout" if res.timed_out else ("ok" if res.rc == 0 and errors and errors.group(1) == "0"
                                                  else "failed")
        r.data["memcheck"] = results
        r.record(name, status, res.seconds, errors.group(0) if errors else res.tail(300))


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


def _cell(x, width=200):
    return str(x).replace("|", "/").replace("\n", " ")[:width]


def write_results(r):
    """gpu_check.json and RESULTS.md from whatever exists now; False when a step failed."""
    env = r.data.get("env", {})
    gpu = env.get("gpu")
    failed = [s for s in r.steps if s["status"] in FAILING]
    summary = {"dry_run": r.dry, "ok": not failed, "budget_s": r.total, "env": env, "steps": r.steps,
               **{k: v for k, v in r.data.items() if k != "env"}}
    tmp = os.path.join(r.out, "gpu_check.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(r.out, "gpu_check.json"))
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
        L.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {_cell(s['detail'])} |")
    for name, got in (r.data.get("tests") or {}).items():
        if got["failures"]:
            L.append("")
            L.append(f"{name}: {len(got['failures'])} failing (errors in gpu_check.json): "
                     + ", ".join(f"`{f['test']}`" for f in got["failures"][:20]))
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
    tmp = os.path.join(r.out, "RESULTS.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(tmp, os.path.join(r.out, "RESULTS.md"))
    return not failed


def _stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def run_all(r, wheels=None):
    """Every step in order; a signal, the hard limit or a step's own crash stops the run, and the
    step it stopped is recorded."""
    steps = []
    if wheels:
        steps.append(lambda: step_wheels(r, wheels))
    steps += [lambda: step_env(r), lambda: step_preflight(r)]
    try:
        for step in steps:
            step()
        if r.data["env"].get("gpu") is None and not r.dry:
            r.record("gpu", "failed", 0.0, "no CUDA GPU is visible to torch (use DRY_RUN=1 to check the plumbing)")
            return
        built = step_build(r)
        if r.dry:
            step_collect(r, "test-collect", TEST_FILE, "tests")
            step_collect(r, "bench-collect", BENCH_FILE, "benchmarks")
        step_tests(r, built)
        step_bench(r, built)
        step_memcheck(r, built)
    except OutOfTime as exc:
        r.record(str(exc), "timeout", 0.0, f"not started: the run's limit of {r.total} s was reached; "
                                           "the steps after it did not run either")
    except Stop as exc:
        name = r.current or "run"
        r.kill()
        r.record(name, "killed", 0.0, f"{exc}: the run was stopped during this step")
    except Exception as exc:  # a bug in this script: the summary still goes out
        name = r.current or "run"
        r.kill()
        r.record(name, "failed", 0.0, f"gpu_check crashed: {type(exc).__name__}: {exc}")


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
    ap.add_argument("--budget", type=int, default=TOTAL_BUDGET_S, help="seconds for the whole run (a hard limit)")
    ap.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                    help="one step's budget instead of its default")
    ap.add_argument("--wheels", help="install the *.whl found here first (pip --target SITE, no index)")
    ap.add_argument("--site", help="packages installed with pip --target: on PYTHONPATH, SITE/bin on PATH")
    ap.add_argument("--inject-build-failure", action="store_true", help="(dry run) a build that fails")
    ap.add_argument("--inject-hang", metavar="STEP", help=f"(dry run) run STEP, which hangs after {HANG_AFTER} tests")
    a = ap.parse_args(argv)
    if (a.inject_build_failure or a.inject_hang) and not a.dry_run:
        ap.error("--inject-* are for the dry run")
    budgets = {}
    for item in a.step_budget:
        name, _, seconds = item.partition("=")
        budgets[name] = int(seconds)
    os.makedirs(a.out, exist_ok=True)
    site = a.site if a.site and (a.wheels or os.path.isdir(a.site)) else None
    r = Runner(os.path.abspath(a.out), a.python, a.dry_run, a.budget, site=site, budgets=budgets,
               inject_build_failure=a.inject_build_failure, hang=a.inject_hang)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, _stop)
    signal.alarm(a.budget)  # the hard limit, should a step's own bound ever fail
    log(f"{'dry run' if a.dry_run else 'run'}: results in {r.out}, budget {a.budget} s")
    try:
        run_all(r, a.wheels)
    finally:
        signal.alarm(0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the summary is written once more, last, whatever comes
        ok = write_results(r)
    bad = [s["step"] for s in r.steps if s["status"] in FAILING]
    skipped = [s["step"] for s in r.steps if s["status"] == "skipped"]
    log(f"done: {'all steps passed' if ok else 'FAILED: ' + ', '.join(bad)}"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + f"; wrote {os.path.join(r.out, 'gpu_check.json')} and RESULTS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
