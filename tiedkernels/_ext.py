"""The compiled extension: how it is built, found, and (when the package carries none) compiled on first use.

A failure is remembered and reported once, never raised: the package then runs on the ``torch`` backend.

The extension arrives in one of two ways:

* **built at install** by ``setup.py`` when the build can import torch (``pip install --no-build-isolation``,
  ``pip install -e``, ``make install``): ``tiedkernels/_C*.so`` lies in the package and is imported;
* **built on first use** when the package was built without torch (pip's default isolated build, ``python -m
  build``): the package then carries the C++/CUDA sources (``tiedkernels/csrc``), and the first import
  compiles them with ``torch.utils.cpp_extension`` against the torch that is running, into a cache keyed by
  the Python, torch version, CPU/CUDA build and a hash of the sources and flags. Concurrent first imports wait
  for one build (a lock file in the cache entry). ``TIEDKERNELS_JIT=0`` turns this off.

This file is also read by ``setup.py`` (by path, without importing the package or torch): the sources and flags
of both ways are defined once, in :func:`spec`.
"""

import glob
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import warnings

_module = None
_error = None
_tried = False
_info = None
_origin = None  # where the loaded module came from: "package" or the first-use cache folder

JIT_NAME = "tiedkernels_C"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _truthy(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------------------
# The build, shared by setup.py and the first-use compile.


def find_cuda_home():
    """The CUDA toolkit folder (CUDA_HOME, else from nvcc on PATH, following a wrapper script to the real one)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"exec\s+['\"]?(/[^\s'\"]+/bin/nvcc)", head)
            if m:
                nvcc = os.path.realpath(m.group(1).decode())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


def nvidia_wheel_includes():
    """cuBLAS/cuSPARSE headers of the nvidia-* wheels that a CUDA torch pulls in."""
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return []
    found = []
    for root in [os.path.dirname(p) for p in nvidia.__path__]:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted({os.path.abspath(p) for p in found})


def cuda_decision(torch, cuda_home, csrc):
    """(build the CUDA sources?, why not). Honours TIEDKERNELS_SKIP_CUDA."""
    if _truthy("TIEDKERNELS_SKIP_CUDA"):
        return False, "TIEDKERNELS_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cuda_home is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(csrc, "cuda", "*.cu")):
        return False, "there are no CUDA sources"
    return True, ""


def spec(torch, csrc, build_cuda):
    """Sources (absolute), include folders, macros and flags of the extension for this torch."""
    minor = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    cxx_std = "-std=c++20" if minor >= (2, 14) else "-std=c++17"  # torch >= 2.14's headers need C++20
    sources = [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "lce_driver.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    s = {
        "sources": sources,
        "include_dirs": [csrc],
        "define_macros": [("TIEDKERNELS_TORCH_VERSION", '"%s"' % torch.__version__)],
        # -fno-trapping-math: without it GCC keeps the selects of the branch-free exp/tanh (vec_math.h) as
        # branches on AVX2 and SSE (only AVX-512's masks if-convert them), so the row pass ran scalar
        # there, about 5x slower. Neither flag changes a value; PyTorch builds its own kernels with both.
        "cxx": ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", cxx_std],
        "nvcc": [],
        "ldflags": ["-fopenmp"],
    }
    if build_cuda:
        s["sources"] += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        s["include_dirs"] += nvidia_wheel_includes()
        s["define_macros"].append(("TIEDKERNELS_WITH_CUDA", "1"))
        s["nvcc"] = ["-O3", cxx_std, "--expt-relaxed-constexpr", "-lineinfo"]
    return s


def csrc_dir():
    """The C++/CUDA sources: inside the package (a wheel built without torch), else the checkout's csrc/."""
    for d in (os.path.join(_PKG_DIR, "csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(d, "ops.cpp")):
            return d
    return None


# ----------------------------------------------------------------------------------------------------------
# Finding and loading.


def _package_has_build():
    """A _C built for this interpreter (another Python's build, e.g. _C.cpython-311-*.so under 3.12, does not count)."""
    suffixes = {sysconfig.get_config_var("EXT_SUFFIX") or ".so", ".so", ".abi3.so"}
    return any(os.path.isfile(os.path.join(_PKG_DIR, "_C" + s)) for s in suffixes)


def cache_root():
    if os.environ.get("TIEDKERNELS_CACHE"):
        return os.path.abspath(os.environ["TIEDKERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tiedkernels")


def _cuda_archs(torch):
    """The architectures a first-use CUDA build targets: TORCH_CUDA_ARCH_LIST, else the GPUs present."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps)


def _jit_plan(torch):
    """(cache folder, spec, CUDA archs or None) of the first-use build for the running torch."""
    csrc = csrc_dir()
    if csrc is None:
        raise ImportError("the package has neither a compiled extension nor the C++ sources to build one")
    cuda_home = find_cuda_home()
    build_cuda, _ = cuda_decision(torch, cuda_home, csrc)
    archs = None
    if build_cuda:
        archs = _cuda_archs(torch) if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST") else ""
        build_cuda = bool(archs)  # a CUDA torch without a GPU and without an arch list: CPU kernels only
    s = spec(torch, csrc, build_cuda)
    h = hashlib.sha256()
    for path in sorted(s["sources"] + glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True)):
        h.update(os.path.relpath(path, csrc).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(repr((s["define_macros"], s["cxx"], s["nvcc"], s["ldflags"], archs)).encode())
    flavour = f"cu{torch.version.cuda}-sm{archs.replace('.', '').replace(';', '_')}" if build_cuda else "cpu"
    key = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{flavour}-{h.hexdigest()[:12]}"
    if build_cuda and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    return os.path.join(cache_root(), key), s, archs if build_cuda else None


def _import_built(path):
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(JIT_NAME, path)
    mod_spec = importlib.util.spec_from_file_location(JIT_NAME, path, loader=loader)
    mod = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(mod)
    sys.modules[JIT_NAME] = mod
    return mod


def _jit_build():
    """Compile the sources against the running torch (once per cache key) and import the result."""
    import fcntl

    import torch

    folder, s, archs = _jit_plan(torch)
    built = os.path.join(folder, JIT_NAME + ".so")
    done = os.path.join(folder, "built-ok")
    if os.path.isfile(done) and os.path.isfile(built):
        return _import_built(built), folder
    os.makedirs(folder, exist_ok=True)
    with open(folder + ".lock", "w") as lock:  # one build per cache entry; other processes wait for it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"tiedkernels: waiting for another process that is compiling the kernels into {folder}\n")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(done) and os.path.isfile(built):
            return _import_built(built), folder
        what = f"the C++ kernels{' and the CUDA kernels for sm ' + archs if archs else ''}"
        sys.stderr.write(f"tiedkernels: compiling {what} for torch {torch.__version__} (first use; a minute or more "
                         f"on two cores{', several with CUDA' if archs else ''}); cached in {folder}\n")
        sys.stderr.flush()
        from torch.utils.cpp_extension import load

        # The flags reach a shell through ninja unquoted: escape the quotes of string macros.
        macros = [f"-D{k}={v}".replace('"', '\\"') for k, v in s["define_macros"]]
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        try:
            # torch's own lock file: stale if a build was killed (load() would then wait forever); we hold the
            # flock, so no other build is running.
            if os.path.exists(os.path.join(folder, "lock")):
                os.remove(os.path.join(folder, "lock"))
            mod = load(name=JIT_NAME, sources=s["sources"], extra_cflags=s["cxx"] + macros,
                       extra_cuda_cflags=s["nvcc"] + macros, extra_ldflags=s["ldflags"],
                       extra_include_paths=s["include_dirs"], build_directory=folder, with_cuda=bool(archs),
                       verbose=_truthy("TIEDKERNELS_JIT_VERBOSE"))
        finally:
            if archs:
                if old_arch is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        with open(done + ".tmp", "w") as f:
            f.write(torch.__version__ + "\n")
        os.replace(done + ".tmp", done)
    sys.stderr.write("tiedkernels: compiled\n")
    return mod, folder


def load():
    """The compiled module (which registers the C++ ops), or None with the reason kept."""
    global _module, _error, _tried, _info, _origin
    if _tried:
        return _module
    _tried = True
    hint = "Rebuild with `pip install --no-build-isolation -e .` or see `python -m tiedkernels info`."
    try:
        if _package_has_build() or "tiedkernels._C" in sys.modules:
            from tiedkernels import _C  # noqa: F401  (importing registers the ops)

            _module, _origin = _C, "package"
        elif not _truthy("TIEDKERNELS_JIT", "1"):
            raise ImportError("the package carries no compiled extension and TIEDKERNELS_JIT=0 turns off the "
                              "first-use build")
        else:
            hint = ("The first-use build needs a C++ compiler with OpenMP and ninja (`pip install ninja`); "
                    "TIEDKERNELS_JIT_VERBOSE=1 shows the compiler's output.")
            _module, _origin = _jit_build()
        _info = dict(_module.build_info())  # read once: plain data is cheap to consult while tracing
    except Exception as e:  # ImportError, a broken build (undefined symbol, ABI mismatch), a failed compile
        _module = None
        lines = str(e).strip().splitlines() or [""]
        _error = f"{type(e).__name__}: {lines[0]}" + (" [...]" if len(lines) > 1 else "")
        warnings.warn(
            f"tiedkernels: the compiled extension did not load ({_error}); using the pure-PyTorch backend. {hint}",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def error():
    """Why the extension is not loaded, or None."""
    load()
    return _error


def build_info():
    load()
    return _info


def origin():
    """Where the loaded extension came from: "package" (built at install), a first-use cache folder, or None."""
    load()
    return _origin
