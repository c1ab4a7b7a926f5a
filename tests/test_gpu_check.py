"""``make gpu-check``'s failure handling, without a GPU: a step cut at its budget takes its whole
process group and keeps the results it streamed, a signal still gets the summary written, the
preflight turns off only what a missing tool is needed for, and a failed CUDA build leaves the
Triton tests running.  (The end-to-end dry run with an injected failing build and hanging step is
``make gpu-check-dry``; tests/test_gpu_report.py runs the plain dry run.)"""

import json
import os
import signal
import stat
import sys
import time

import pytest

from benchmarks import gpu_check as C


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_step_cut_at_its_budget_takes_its_process_group(tmp_path):
    """The child and what it started (xdist workers, nvcc under ninja) are killed together."""
    r = C.Runner(str(tmp_path), sys.executable, dry_run=True, total=120)
    pidfile = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
             f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    t0 = time.monotonic()
    res = r.run("hang", [sys.executable, "-c", child], budget=3)
    assert res.timed_out and time.monotonic() - t0 < 15
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the step's grandchild outlived the step"
    assert "killed at its budget of 3 s" in (tmp_path / "logs" / "hang.log").read_text()


def test_no_step_starts_past_the_run_limit(tmp_path):
    r = C.Runner(str(tmp_path), sys.executable, dry_run=True, total=C.SUMMARY_RESERVE_S + C.MIN_STEP_S - 1)
    with pytest.raises(C.OutOfTime):
        r.run("late", [sys.executable, "-c", "pass"])


TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_a():
    pass

def test_b():
    assert 1 == 2, "b is wrong"

def test_c():
    pytest.skip("no c here")

def test_d(broken):
    pass

def test_e():
    pass
'''


def test_results_stream_per_test_and_survive_a_hang(tmp_path):
    """The plugin's line per finished test: counts, the failures with their errors; a step that
    hangs after two tests is cut at its budget and keeps those two; the summary says so."""
    path = tmp_path / "test_sample.py"
    path.write_text(TESTS)
    r = C.Runner(str(tmp_path / "out"), sys.executable, dry_run=True, total=120)
    stream = os.path.join(r.logs, "full.jsonl")
    C._pytest_step(r, "full", C._pytest(r, str(path)), {}, stream)
    got = r.data["tests"]["full"]
    assert got["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "errors": 1} and got["finished"] == 5
    errors = {f["test"].split("::")[-1]: f for f in got["failures"]}
    assert errors["test_b"]["outcome"] == "failed" and "b is wrong" in errors["test_b"]["error"]
    assert errors["test_d"]["outcome"] == "errors" and "setup broke" in errors["test_d"]["error"]
    assert r.steps[-1]["status"] == "failed"

    r.hang = "cut"
    r.budgets["cut"] = 15
    C.HANG_AFTER, after = 2, C.HANG_AFTER
    try:
        C._pytest_step(r, "cut", C._pytest(r, str(path)), {}, os.path.join(r.logs, "cut.jsonl"))
    finally:
        C.HANG_AFTER = after
    got = r.data["tests"]["cut"]
    assert got["finished"] == 2 and got["counts"]["passed"] == 1 and got["counts"]["failed"] == 1
    step = r.steps[-1]
    assert step["step"] == "cut" and step["status"] == "timeout" and "2 tests finished" in step["detail"]
    out = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert out["ok"] is False and out["tests"]["cut"]["finished"] == 2
    assert "| cut | timeout |" in (tmp_path / "out" / "RESULTS.md").read_text()


def test_a_line_cut_by_a_kill_is_left_out(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"test": "t::a", "outcome": "passed", "when": "call", "seconds": 0.1}\n{"test": "t::b", "outc')
    assert C.read_stream(str(path))["counts"] == {"passed": 1, "failed": 0, "skipped": 0, "errors": 0}
    rows = tmp_path / "b.jsonl"
    rows.write_text('{"shape": "32k", "provider": "cuda", "cuda_ms": 1.2, "tflops": 600.0, "peak_mib": 9.0, '
                    '"roofline_ms": 0.83, "device": "X", "group": "g"}\n{"shape": "llama')
    assert C.read_bench_lines(str(rows)) == [{"shape": "32k", "provider": "cuda", "cuda_ms": 1.2, "tflops": 600.0,
                                              "peak_mib": 9.0, "roofline_ms": 0.83, "device": "X"}]


def test_a_signal_stops_the_run_and_the_summary_names_the_step(tmp_path, monkeypatch):
    r = C.Runner(str(tmp_path), sys.executable, dry_run=True, total=120)
    monkeypatch.setattr(C, "step_env", lambda r: r.run("env", [sys.executable, "-c", "import time; time.sleep(60)"]))
    old = signal.signal(signal.SIGALRM, C._stop)
    signal.alarm(2)
    t0 = time.monotonic()
    try:
        C.run_all(r)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t0 < 15
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["ok"] is False
    assert out["steps"][-1]["step"] == "env" and out["steps"][-1]["status"] == "killed"
    assert "SIGALRM" in out["steps"][-1]["detail"]


def _fake_env(r):
    r.data["env"] = {"gpu": {"name": "NVIDIA X", "capability": "9.0", "sms": 132, "memory_gib": 80.0},
                     "torch": "2.11.0+cu130", "torch_cuda": "13.0", "setuptools": "80.9.0"}


def test_preflight_turns_off_only_what_a_missing_tool_is_needed_for(tmp_path):
    """Tools are looked up on the steps' PATH, which starts with SITE/bin (``pip --target``'s
    executables); nvcc's major version must be torch's CUDA major; a missing compute-sanitizer
    turns off memcheck only."""
    site = tmp_path / "site"
    (site / "bin").mkdir(parents=True)
    _script(site / "bin" / "ninja", "echo 1.13.1")
    nvcc = site / "bin" / "nvcc"
    _script(nvcc, "echo 'Cuda compilation tools, release 12.4, V12.4.131'")
    r = C.Runner(str(tmp_path / "out"), sys.executable, dry_run=False, total=120, site=str(site))
    r.env["PATH"] = os.pathsep.join([str(site / "bin"), "/usr/bin", "/bin"])
    assert r.env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    _fake_env(r)
    C.step_preflight(r)
    tools = r.data["preflight"]
    assert tools["ninja"] == {"found": True, "path": str(site / "bin" / "ninja"), "version": "1.13.1"}
    assert tools["nvcc"]["major"] == 12 and tools["nvcc"]["matches_torch"] is False
    assert "nvcc 12.4 is not torch's CUDA major (13.0)" in r.disabled["build"]
    assert "compute-sanitizer" in r.disabled["memcheck"] and not tools["compute-sanitizer"]["found"]
    assert not {"test-triton", "bench"} & set(r.disabled)
    assert r.steps[-1]["status"] == "failed"

    _script(nvcc, "echo 'Cuda compilation tools, release 13.0, V13.0.88'")
    _script(site / "bin" / "compute-sanitizer", "echo 'Version 2025.3.0'")
    r2 = C.Runner(str(tmp_path / "out2"), sys.executable, dry_run=False, total=120, site=str(site))
    r2.env["PATH"] = r.env["PATH"]
    _fake_env(r2)
    C.step_preflight(r2)
    assert not r2.disabled and r2.steps[-1]["status"] == "ok" and r2.data["preflight"]["nvcc"]["matches_torch"]


def test_a_failed_build_still_runs_the_triton_tests(tmp_path):
    """Not the dry run: the build (setup.py) fails, the cuda tests are skipped for it, and the triton
    ones run (here every test skips itself: no GPU), each streamed and counted."""
    real = sys.executable
    python = _script(tmp_path / "python", f'case "$1" in setup.py) echo "nvcc fatal: boom"; exit 1;; esac\n'
                                          f'exec {real} "$@"')
    r = C.Runner(str(tmp_path / "out"), python, dry_run=False, total=300)
    _fake_env(r)
    r.data["preflight"] = {"ninja": {"found": True}}
    assert C.step_build(r) is False
    C.step_tests(r, False)
    status = {s["step"]: s for s in r.steps}
    assert status["build"]["status"] == "failed" and "nvcc fatal: boom" in status["build"]["detail"]
    assert status["test-cuda"]["status"] == "skipped" and status["test-cuda"]["detail"] == "the CUDA build failed"
    assert status["test-triton"]["status"] == "ok", status["test-triton"]
    got = r.data["tests"]["test-triton"]
    assert got["finished"] > 100 and got["counts"]["skipped"] == got["finished"]
    params = [json.loads(x)["test"].partition("[")[2].rstrip("]").split("-")
              for x in (tmp_path / "out" / "logs" / "test-triton.jsonl").read_text().splitlines()]
    assert all("cuda" not in p for p in params) and sum("triton" in p for p in params) > 100


def test_benchmarks_never_run_under_xdist(tmp_path, monkeypatch):
    """Tests spread over xdist workers; the benchmark does not (pytest-benchmark turns itself off under
    xdist, and timings must not share the GPU)."""
    r = C.Runner(str(tmp_path), sys.executable, dry_run=False, total=120)
    _fake_env(r)
    r.data["env"]["xdist"] = "3.8.0"
    seen = {}
    monkeypatch.setattr(C, "_pytest_step", lambda r, name, cmd, *a, **k: seen.setdefault(name, cmd))
    C.step_tests(r, True)
    C.step_bench(r, True)
    assert "-n" in seen["test-cuda"] and "-n" in seen["test-triton"]
    assert "-n" not in seen["bench"] and "--benchmark-only" in seen["bench"]


def test_wheels_without_pip_are_unzipped_onto_the_path(tmp_path):
    """The machine's Python may have no pip: the pure-Python wheels are unzipped into SITE, which
    every step then has on PYTHONPATH (and SITE/bin on PATH)."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpucheckprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("gpucheckprobe/__init__.py", "VALUE = 42\n")
        z.writestr("gpucheckprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n")
    python = _script(tmp_path / "python", f'[ "$2" = pip ] && {{ echo "No module named pip"; exit 1; }}\n'
                                          f'exec {sys.executable} "$@"')
    site = tmp_path / "site"
    r = C.Runner(str(tmp_path / "out"), python, dry_run=False, total=120, site=str(site))
    C.step_wheels(r, str(wheels))
    step = r.steps[-1]
    assert step["status"] == "ok" and "No module named pip" in step["detail"], step
    assert r.env["PATH"].split(os.pathsep)[0] == str(site / "bin")
    res = r.run("probe", [python, "-c", "import gpucheckprobe, importlib.metadata as m; "
                                        "print(gpucheckprobe.VALUE, m.version('gpucheckprobe'))"])
    assert res.rc == 0 and "42 1.0" in (tmp_path / "out" / "logs" / "probe.log").read_text()
