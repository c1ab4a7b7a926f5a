"""Installing tiedkernels as a user would: the commands of the README's install section, in fresh venvs.

The metadata checks run everywhere. The install checks build venvs and compile the kernels (minutes), so they
run where TIEDKERNELS_INSTALL_TESTS=1 is set: `make test-install` (mk/install.mk), part of `make test`. They
work on a copy of this checkout's files (tracked and new, not ignored: what a clean clone has), never on
the checkout itself, whose in-place extension other processes may have loaded. The venvs have no system
site-packages; torch comes from pip (its cache, or the local wheel that pip's configuration points at).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = os.environ.get("TIEDKERNELS_INSTALL_TESTS") == "1"
heavy = pytest.mark.skipif(not HEAVY, reason="builds venvs: run by `make test-install` (part of `make test`)")
EXTRAS = {"hf": "hf.txt", "triton": "triton.txt", "bench": "bench.txt", "test": "test.txt", "dist": "dist.txt"}


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _versions_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tk_versions", os.path.join(ROOT, "tiedkernels", "_versions.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------------
# Metadata (fast, every run).


def test_pyproject_declares_what_the_readme_and_info_say():
    meta = _pyproject()
    proj = meta["project"]
    assert proj["name"] == "tiedkernels"
    # the license named is the one shipped (wheel: .dist-info/licenses/LICENSE; sdist: MANIFEST.in)
    assert proj["license"] == "BSD-3-Clause" and proj["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.readline().strip() == "BSD 3-Clause License"
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        assert "LICENSE" in f.read().split()
    assert set(proj["dynamic"]) == {"version", "optional-dependencies"}
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tiedkernels.__version__"}
    # The lower ends that pip enforces are the tested range's lower ends.
    v = _versions_module()
    lo_py = ".".join(map(str, v.SUPPORTED["python"][0]))
    lo_torch = ".".join(map(str, v.SUPPORTED["torch"][0]))
    assert proj["requires-python"] == f">={lo_py}"
    assert f"torch>={lo_torch}" in proj["dependencies"]
    classified = {c.rsplit(" :: ", 1)[1] for c in proj["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", c)}
    lo, hi = v.SUPPORTED["python"]
    assert classified == {f"3.{m}" for m in range(lo[1], hi[1] + 1)}
    # Each extra is one requirements file (the Makefile installs the files; pip installs the extras).
    extras = meta["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
    assert {k: v["file"] for k, v in extras.items()} == {k: [f"requirements/{f}"] for k, f in EXTRAS.items()}
    for f in EXTRAS.values():
        with open(os.path.join(ROOT, "requirements", f)) as fh:
            lines = [ln.strip() for ln in fh if ln.strip() and not ln.strip().startswith("#")]
        assert lines, f
        assert all(not ln.startswith("-") and "#" not in ln for ln in lines), (f, lines)  # plain requirement lines


def test_triton_extra_is_the_supported_range():
    v = _versions_module()
    lo, hi = v.SUPPORTED["triton"]
    with open(os.path.join(ROOT, "requirements", "triton.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines == [f"triton>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"]


@pytest.mark.parametrize("name,version,ok", [
    ("python", "3.10.13", False), ("python", "3.11.7", True), ("python", "3.12.1", True), ("python", "3.9.18", False), ("python", "3.13.0", False),
    ("torch", "2.11.0+cu130", True), ("torch", "2.14.1", True), ("torch", "2.14.2", False), ("torch", "2.10.0", False),
    ("triton", "3.6.0", True), ("triton", "3.9.1", True), ("triton", "3.5.1", False), ("triton", "3.10.0", False),
    ("transformers", "4.51.3", True), ("transformers", "5.23.0", True), ("transformers", "4.50.0", False),
    ("transformers", "6.0.0", False),
])
def test_version_ranges(name, version, ok):
    got, text = _versions_module().check(name, version)
    assert got is ok, text
    assert ("supported" in text) is ok and ("OUTSIDE" in text) is (not ok)


def test_info_prints_versions_and_range():
    out = subprocess.run([sys.executable, "-m", "tiedkernels", "info"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import platform

    import torch

    assert re.search(rf"^python {re.escape(platform.python_version())} \((supported|OUTSIDE)", out.stdout, re.M)
    assert re.search(rf"^torch {re.escape(torch.__version__)} \((supported|OUTSIDE)", out.stdout, re.M)
    assert re.search(r"^versions: (all inside the tested range|outside the tested range: \w+)", out.stdout, re.M)


# --------------------------------------------------------------------------------------------------------
# Installs (TIEDKERNELS_INSTALL_TESTS=1).

SMOKE = textwrap.dedent("""
    import json, os, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, tiedkernels as tk
        from tiedkernels import _ext, reference
    torch.manual_seed(0)
    backend = "cpu" if _ext.build_info() is not None else "torch"
    errs = []
    for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 7.0, "reduction": "none"},
               {"logit_scale": 0.5, "reduction": "sum", "ignore_index": 3}):
        h = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
        w = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 101, (37,)); y[::5] = kw.get("ignore_index", -100)
        out = tk.linear_cross_entropy(h, w, y, backend=backend, **kw)
        ref = reference.linear_cross_entropy(h, w, y, **kw)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (h, w), g)
        want = torch.autograd.grad(ref, (h, w), g)
        errs.append(max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(got, want)]))
    print("SMOKE " + json.dumps({
        "file": tk.__file__, "version": tk.__version__, "backend": backend, "origin": _ext.origin(),
        "error": _ext.error(), "build": _ext.build_info(), "torch": torch.__version__, "max_err": max(errs),
        "warnings": [str(c.message) for c in caught if "tiedkernels" in str(c.message)],
        "data": sorted(os.listdir(os.path.join(os.path.dirname(tk.__file__), "data")))}))
""")


class Env:
    """A fresh venv (no system site-packages) and the commands run in it, with a log of each."""

    def __init__(self, ws, name, torch_req):
        self.ws, self.path, self.torch_req = ws, os.path.join(ws, name), torch_req
        self.py = os.path.join(self.path, "bin", "python")
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", self.path], check=True)

    def run(self, *args, env=None, cwd=None, check=True, timeout=1200):
        e = dict(os.environ)
        e.pop("PYTHONPATH", None)
        e["TIEDKERNELS_CACHE"] = os.path.join(self.ws, "jit-cache")
        e.update(env or {})
        out = subprocess.run([self.py, *args], capture_output=True, text=True, env=e, cwd=cwd or self.ws,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def pip(self, *args, **kw):
        return self.run("-m", "pip", "install", "--progress-bar", "off", *args, **kw)

    def smoke(self, **kw):
        out = self.run("-c", SMOKE, **kw)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("SMOKE ")][-1]
        res = json.loads(line[6:])
        res["stderr"] = out.stderr
        assert res["max_err"] < 1e-10, res
        assert "hf_corpus.txt" in res["data"] and "demo_corpus.txt" in res["data"], res
        return res


def _copy_checkout(dest):
    """The files a clean clone has (tracked, and new files not ignored), as they are on disk now."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


@pytest.fixture(scope="module")
def ws():
    root = os.path.join(ROOT, "build", "install-tests")
    # A fresh workspace; the first-use build cache survives (the first test empties it for its own check),
    # so a run of a few tests alone (-k) does not compile the kernels again.
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name != "jit-cache":
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    _copy_checkout(os.path.join(root, "src"))
    yield root


@pytest.fixture(scope="module")
def torch_req():
    import torch

    return "torch==" + os.environ.get("TORCH_VERSION", torch.__version__.split("+")[0])


@pytest.fixture(scope="module")
def with_torch(ws, torch_req):
    env = Env(ws, "venv-torch", torch_req)
    env.pip(torch_req)
    return env


def _assert_compiled_against_running_torch(res, origin):
    assert res["backend"] == "cpu" and res["error"] is None, res
    assert res["build"]["torch"] == res["torch"], res  # never a build against another torch
    if origin == "package":
        assert res["origin"] == "package", res
    else:
        assert res["origin"] and res["origin"].startswith(origin), res


@heavy
def test_pip_install_dot_with_torch_installed_builds_on_first_import(ws, with_torch):
    """`pip install .` with default flags (isolated build, no torch in it): a pure-Python wheel with the
    sources; the first imports (two at once, on a cold cache) compile once against the installed torch."""
    shutil.rmtree(os.path.join(ws, "jit-cache"), ignore_errors=True)
    with_torch.pip(os.path.join(ws, "src"))
    code = f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {SMOKE!r}], " \
           "stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]\n" \
           "outs = [p.communicate() for p in ps]\n" \
           "print('RCS', [p.returncode for p in ps]); [print(o) for o, _ in outs]; [print(e, file=sys.stderr) for _, e in outs]"
    out = with_torch.run("-c", code)
    assert "RCS [0, 0]" in out.stdout, out.stdout + out.stderr
    results = [json.loads(ln[6:]) for ln in out.stdout.splitlines() if ln.startswith("SMOKE ")]
    assert len(results) == 2
    for res in results:
        assert res["file"].startswith(with_torch.path), res
        _assert_compiled_against_running_torch(res, os.path.join(ws, "jit-cache"))
        assert res["warnings"] == [], res
    assert out.stderr.count("tiedkernels: compiling the C++ kernels") == 1, out.stderr
    # Later imports find the cache: no compile, no message.
    res = with_torch.smoke()
    assert "compiling" not in res["stderr"], res["stderr"]
    _assert_compiled_against_running_torch(res, os.path.join(ws, "jit-cache"))
    info = with_torch.run("-m", "tiedkernels", "info").stdout
    assert "compiled extension: CPU kernels yes" in info and "built on first use" in info, info


@heavy
def test_extension_missing_or_failing_falls_back_to_torch_backend(ws, with_torch):
    """The compiled part fails to build (no working compiler) or is turned off: the package works at once
    on the torch backend and says why, once."""
    for env in ({"TIEDKERNELS_CACHE": os.path.join(ws, "jit-broken"), "CXX": "/bin/false"},
                {"TIEDKERNELS_CACHE": os.path.join(ws, "jit-off"), "TIEDKERNELS_JIT": "0"}):
        res = with_torch.smoke(env=env)
        assert res["backend"] == "torch" and res["error"], res
        assert sum("did not load" in m for m in res["warnings"]) == 1, res


@heavy
def test_wheel_and_sdist_build_and_check(ws):
    tools = Env(ws, "venv-tools", None)
    tools.pip("-r", os.path.join(ws, "src", "requirements", "dist.txt"))
    dist = os.path.join(ws, "dist")
    tools.run("-m", "build", "--outdir", dist, os.path.join(ws, "src"))
    wheels, sdists = glob.glob(os.path.join(dist, "*.whl")), glob.glob(os.path.join(dist, "*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    tools.run("-m", "twine", "check", "--strict", *wheels, *sdists)
    assert os.path.basename(wheels[0]).endswith("-py3-none-any.whl"), wheels  # built without torch: no binary
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        meta = z.read([n for n in names if n.endswith(".dist-info/METADATA")][0]).decode()
    csrc = {os.path.relpath(p, os.path.join(ws, "src")) for p in glob.glob(os.path.join(ws, "src", "csrc", "**", "*"),
                                                                             recursive=True) if os.path.isfile(p)}
    assert {"tiedkernels/" + p for p in csrc} <= names, sorted(names)
    assert {"tiedkernels/data/hf_corpus.txt", "tiedkernels/data/demo_corpus.txt"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))], names
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], sorted(names)
    assert "Requires-Dist: torch>=2.11" in meta and "Requires-Python: >=3.11" in meta, meta
    for extra in EXTRAS:
        assert f"Provides-Extra: {extra}" in meta, meta
    with tarfile.open(sdists[0]) as t:
        snames = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "setup.py", "README.md", "LICENSE", "csrc/ops.cpp"} | {f"requirements/{f}" for f in EXTRAS.values()} \
        <= snames, sorted(snames)
    assert not [n for n in snames if n.endswith((".so", ".o", ".pyc"))], snames


@heavy
def test_no_torch_installed_pip_install_brings_torch(ws, torch_req):
    """No torch in the venv: `pip install .` installs torch as a dependency (pinned here to the release the
    suite uses, so it comes from pip's cache) and the package works; then the built wheel, in the same way."""
    env = Env(ws, "venv-bare", torch_req)
    pin = os.path.join(ws, "pin.txt")
    with open(pin, "w") as f:
        f.write(torch_req + "\n")
    env.pip("-c", pin, os.path.join(ws, "src"))
    res = env.smoke()
    assert res["file"].startswith(env.path), res
    _assert_compiled_against_running_torch(res, os.path.join(ws, "jit-cache"))
    wheels = glob.glob(os.path.join(ws, "dist", "*.whl"))
    if wheels:  # the wheel test ran before this one
        env.run("-m", "pip", "uninstall", "-y", "tiedkernels")
        env.pip("-c", pin, wheels[0])
        res = env.smoke()
        assert res["file"].startswith(env.path), res
        _assert_compiled_against_running_torch(res, os.path.join(ws, "jit-cache"))
        out = subprocess.run([os.path.join(env.path, "bin", "tiedkernels"), "info"], capture_output=True, text=True,
                             env={**os.environ, "TIEDKERNELS_CACHE": os.path.join(ws, "jit-cache")})
        assert out.returncode == 0 and "versions: " in out.stdout, out.stdout + out.stderr


@heavy
def test_sdist_installs(ws, with_torch):
    sdists = glob.glob(os.path.join(ws, "dist", "*.tar.gz"))
    assert sdists, "the wheel and sdist test builds it"
    with_torch.run("-m", "pip", "uninstall", "-y", "tiedkernels")
    with_torch.pip(sdists[0])
    res = with_torch.smoke()
    assert res["file"].startswith(with_torch.path), res
    _assert_compiled_against_running_torch(res, os.path.join(ws, "jit-cache"))


@heavy
def test_no_build_isolation_compiles_at_install(ws, with_torch):
    """`pip install --no-build-isolation .` (torch, setuptools>=77 and ninja first): compiled now, against
    the installed torch; the package imports its own _C, no first-use build."""
    with_torch.run("-m", "pip", "uninstall", "-y", "tiedkernels")
    with_torch.pip("setuptools>=77", "ninja")
    with_torch.pip("--no-build-isolation", os.path.join(ws, "src"), env={"MAX_JOBS": "2"})
    res = with_torch.smoke(env={"TIEDKERNELS_JIT": "0"})
    assert res["file"].startswith(with_torch.path), res
    _assert_compiled_against_running_torch(res, "package")


@heavy
def test_make_install_is_an_editable_build(ws, torch_req):
    """The Makefile's install recipe (a venv, torch, `pip install --no-build-isolation -e ".[test]"`) in
    the copy: the kernels compile in place, against that venv's torch."""
    src = os.path.join(ws, "src")
    venv = os.path.join(ws, "venv-make")
    base = getattr(sys, "_base_executable", None) or sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(["make", "-C", src, "install", f"VENV={venv}", f"PYTHON={base}",
                          f"TORCH_VERSION={torch_req.split('==')[1]}", "MAX_JOBS=2"], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert os.path.isfile(os.path.join(venv, ".tiedkernels-installed"))
    assert "compiled extension: CPU kernels yes" in out.stdout and "(built at install)" in out.stdout, out.stdout[-3000:]
    e = Env.__new__(Env)
    e.ws, e.path, e.py = ws, venv, os.path.join(venv, "bin", "python")
    res = e.smoke(env={"TIEDKERNELS_JIT": "0"})
    assert res["file"].startswith(src), res
    _assert_compiled_against_running_torch(res, "package")
    assert e.run("-c", "import pytest, expecttest, pytest_benchmark").returncode == 0  # the test extra


@heavy
def test_force_build_without_torch_is_one_clear_error(ws):
    """TIEDKERNELS_FORCE_BUILD=1 in an isolated build (no torch there): one line that says what to run."""
    env = Env(ws, "venv-force", None)
    out = env.pip(os.path.join(ws, "src"), env={"TIEDKERNELS_FORCE_BUILD": "1"}, check=False)
    assert out.returncode != 0
    assert "torch is not importable in this build environment" in out.stdout + out.stderr
    assert "pip install --no-build-isolation ." in out.stdout + out.stderr
