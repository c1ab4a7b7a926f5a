"""Build tiedkernels: the CPU extension always, the CUDA sources when nvcc and a CUDA torch are present.

Switches (environment variables):
  TIEDKERNELS_SKIP_CUDA=1   never build the CUDA sources
  TIEDKERNELS_FORCE_CUDA=1  build the CUDA sources or fail (no GPU is needed to compile)
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs (ninja)
  CUDA_HOME                 the CUDA toolkit folder; found from nvcc when unset
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit folder. A wrapper script on PATH may exec the real nvcc: follow it."""
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


def _nvidia_wheel_includes():
    """cuBLAS/cuSPARSE headers of the nvidia-* wheels that a CUDA torch pulls in."""
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return []
    roots = [os.path.dirname(p) for p in nvidia.__path__]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted({os.path.abspath(p) for p in found})


cuda_home = _find_cuda_home()
if cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
build_cuda = False
why_not = ""
if _truthy("TIEDKERNELS_SKIP_CUDA"):
    why_not = "TIEDKERNELS_SKIP_CUDA is set"
elif torch.version.cuda is None:
    why_not = f"torch {torch.__version__} is a CPU build"
elif cuda_home is None:
    why_not = "nvcc was not found (set CUDA_HOME)"
elif not cuda_sources:
    why_not = "there are no CUDA sources"
else:
    build_cuda = True
if not build_cuda:
    if _truthy("TIEDKERNELS_FORCE_CUDA"):
        sys.exit(f"tiedkernels: TIEDKERNELS_FORCE_CUDA=1 but the CUDA sources cannot be built: {why_not}")
    print(f"tiedkernels: building the CPU extension only ({why_not})")
else:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"tiedkernels: building the CUDA sources with {cuda_home} for {os.environ['TORCH_CUDA_ARCH_LIST']}")

sources = ["csrc/ops.cpp", "csrc/lce_driver.cpp"] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = [("TIEDKERNELS_TORCH_VERSION", '"%s"' % torch.__version__)]
# torch >= 2.14's headers need C++20 (ATen.h refuses anything older).
cxx_std = "-std=c++20" if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 14) else "-std=c++17"
cxx_flags = ["-O3", "-fopenmp", cxx_std]
extra = {"cxx": cxx_flags}
ext_cls = CppExtension
if build_cuda:
    ext_cls = CUDAExtension
    sources += cuda_sources
    include_dirs += _nvidia_wheel_includes()
    define_macros.append(("TIEDKERNELS_WITH_CUDA", "1"))
    extra["nvcc"] = ["-O3", cxx_std, "--expt-relaxed-constexpr", "-lineinfo"]

ext = ext_cls(
    name="tiedkernels._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-fopenmp"],
)

setup(
    name="tiedkernels",
    version="0.1.0",
    description="Tied input embedding + output projection + fused cross-entropy for PyTorch",
    packages=find_packages(include=["tiedkernels", "tiedkernels.*"]),
    package_data={"tiedkernels": ["data/*.txt"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "expecttest"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
