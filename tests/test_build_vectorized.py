"""The CPU row kernel's exp loops are vectorized in every target clone of the built extension.

GCC if-converts the selects of the branch-free ``exp_fast`` (``csrc/vec_math.h``) only with
``-fno-trapping-math`` on AVX2 and baseline x86-64 (AVX-512's masks do it without): without the flag
the AVX2 row pass ran scalar, about 5 times slower.  The check reads the machine code of the loaded
extension: the float-to-int conversion of ``exp_fast`` must appear in packed form (ymm registers in
the AVX2 clone, xmm packed in the baseline one).
"""

import platform
import re
import shutil
import subprocess

import pytest

from tiedkernels import _ext

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="target clones are built on x86-64 only")

PACKED = {"avx2": r"\bvcvttps2dq\s+%ymm", "default": r"\bv?cvttps2dq\s+%xmm", "avx512f": r"\bvcvttps2dq\s+%[yz]mm"}


def _library():
    mod = _ext.load()
    if mod is None:
        pytest.skip(f"no compiled extension: {_ext.error()}")
    return mod.__file__


@pytest.mark.parametrize("clone", sorted(PACKED))
def test_row_kernel_exp_is_packed(clone):
    lib = _library()
    for tool in ("nm", "objdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (binutils) is not installed")
    syms = subprocess.run(["nm", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in syms.splitlines() if re.search(rf"process_row_f32\w*\.{clone}$", line)]
    assert len(names) == 1, f"the {clone} clone of the fp32 row kernel is missing from {lib}: {names}"
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={names[0]}", lib],
                         capture_output=True, text=True, check=True).stdout
    packed = re.findall(PACKED[clone], asm)
    scalar = re.findall(r"\bv?cvttss2si\s", asm)
    # exp_fast's float -> int conversion: packed once per vectorized exp loop (max/sum, gradient, entropy)
    assert len(packed) >= 3, (f"the {clone} clone converts packed {len(packed)} times and scalar {len(scalar)} "
                              "times: its exp loops are not vectorized (was the extension built without "
                              "-fno-trapping-math?)")
