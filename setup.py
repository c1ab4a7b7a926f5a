"""Build tiedkernels. The metadata lives in pyproject.toml; this file decides what gets compiled.

* torch importable in the build (``pip install --no-build-isolation .``, ``pip install -e .``, ``make install``):
  the CPU extension is compiled now, against that torch, and the CUDA sources too when nvcc and a CUDA torch
  are present (no GPU is needed to compile).
* torch not importable (pip's default isolated build, ``python -m build``): a pure-Python package that carries
  the C++/CUDA sources; the first import compiles them against the torch it runs with (tiedkernels/_ext.py).
  A build against the build environment's own torch would break as soon as the user's torch differs (ABI).

The wheel always carries the sources (tiedkernels/csrc), so a compiled install can be rebuilt on first use too.

Switches (environment variables):
  TIEDKERNELS_SKIP_CUDA=1   never build the CUDA sources
  TIEDKERNELS_FORCE_CUDA=1  build the CUDA sources or fail (no GPU is needed to compile)
  TIEDKERNELS_FORCE_BUILD=1 fail when torch is not importable instead of leaving the build to the first import
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs (ninja)
  CUDA_HOME                 the CUDA toolkit folder; found from nvcc when unset
"""

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# The sources and flags are defined once, in tiedkernels/_ext.py (also used by the first-use build);
# read it by path: importing the package would import torch.
_spec = importlib.util.spec_from_file_location("_tiedkernels_ext", os.path.join(ROOT, "tiedkernels", "_ext.py"))
_ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ext)


class build_py_with_sources(build_py):
    """Copy csrc/ into the package as tiedkernels/csrc, for the first-use build."""

    def run(self):
        super().run()
        if self.editable_mode:
            return  # an editable install reads the checkout's csrc/ (tiedkernels/_ext.py: csrc_dir)
        dest = os.path.join(self.build_lib, "tiedkernels", "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


cmdclass = {"build_py": build_py_with_sources}
ext_modules = []

try:
    cuda_home = _ext.find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
except ImportError:
    torch = None

if torch is None:
    if _ext._truthy("TIEDKERNELS_FORCE_BUILD") or _ext._truthy("TIEDKERNELS_FORCE_CUDA"):
        sys.exit("tiedkernels: torch is not importable in this build environment, so nothing can be compiled now.\n"
                 "Install torch first, then: pip install --no-build-isolation .")
    print("tiedkernels: torch is not importable in this build environment; building the pure-Python package "
          "(the C++ kernels compile on first import, against the torch installed then)")
else:
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda, why_not = _ext.cuda_decision(torch, cuda_home, CSRC)
    if not build_cuda:
        if _ext._truthy("TIEDKERNELS_FORCE_CUDA"):
            sys.exit(f"tiedkernels: TIEDKERNELS_FORCE_CUDA=1 but the CUDA sources cannot be built: {why_not}")
        print(f"tiedkernels: building the CPU extension only ({why_not})")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"tiedkernels: building the CUDA sources with {cuda_home} for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    s = _ext.spec(torch, "csrc", build_cuda)
    extra = {"cxx": s["cxx"]}
    if build_cuda:
        extra["nvcc"] = s["nvcc"]
    ext_modules.append((CUDAExtension if build_cuda else CppExtension)(
        name="tiedkernels._C",
        sources=s["sources"],
        include_dirs=[os.path.join(ROOT, "csrc")] + s["include_dirs"][1:],
        define_macros=s["define_macros"],
        extra_compile_args=extra,
        extra_link_args=s["ldflags"],
    ))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

legacy = {}
if not os.path.isfile(os.path.join(ROOT, "pyproject.toml")):
    # A copy of setup.py, csrc/ and the package without the metadata file (mk/cuda.mk's build folder):
    # enough to build and install the package; the full metadata is pyproject.toml's.
    import re

    from setuptools import find_packages

    with open(os.path.join(ROOT, "tiedkernels", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    legacy = dict(name="tiedkernels", version=version, packages=find_packages(include=["tiedkernels*"]),
                  package_data={"tiedkernels": ["data/*.txt", "data/*.json"]})

setup(ext_modules=ext_modules, cmdclass=cmdclass, **legacy)
