"""The Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90) on a machine without
one: every kernel at every launch configuration the backend can pick compiles, spills nothing
and fits the SM's shared memory; and the fused loss's launch plan fills an H100 with no
atomics at the training shapes of the GPU report.

The compile runs in child processes (one per architecture, in parallel), without
TRITON_INTERPRET: a process whose Triton runs the interpreter cannot compile for a GPU, and
tests/test_triton.py switches the interpreter on when it is collected first.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (requirements/triton.txt)")

from tiedkernels.triton import cross_entropy as ce  # noqa: E402
from tiedkernels.triton import plan  # noqa: E402

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block (A100, H100)
H100_SMS = 132
SHAPES = {  # name: (N, D, V), the GPU report's shapes
    "llama3-8b": (8192, 4096, 128_256),
    "32k": (2048, 2048, 32_768),
    "gemma-256k": (8192, 2304, 256_000),
}


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {a: subprocess.Popen([sys.executable, "-m", "tiedkernels.triton.plan", "--arch", str(a)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for a in ARCHS}
    out = {}
    for a, p in procs.items():
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, f"the ahead-of-time compile for sm_{a} failed:\n{stderr[-6000:]}"
        out[a] = json.loads(stdout)
    return out


def test_specs_cover_every_kernel_and_dtype():
    specs = plan.aot_specs()
    kernels = {s["kernel"] for s in specs}
    for name in ("_stats_kernel", "_finish_kernel", "_grad_kernel", "_transform_kernel", "_transform_bwd_kernel",
                 "_gather_kernel", "_scatter_sorted_kernel", "_scatter_atomic_kernel"):
        assert f"triton {name}" in kernels
    grads = {s["config"].split(" BLOCK")[0] for s in specs if s["kernel"] == "triton _grad_kernel"}
    # every input dtype with logits in its own dtype, bf16/fp16 also with fp32 logits
    assert grads == {"z=fp32 dz=fp32", "z=bf16 dz=bf16", "z=fp32 dz=bf16", "z=fp16 dz=fp16", "z=fp32 dz=fp16",
                     "z=fp64 dz=fp64"}
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names)
        assert set(s["constexprs"]) == {k for k, t in s["signature"].items() if t == "constexpr"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills(reports, arch):
    rows = reports[arch]
    assert len(rows) == len(plan.aot_specs())
    bad = [r for r in rows if r["spill_bytes"] != 0]
    assert not bad, f"register spills on sm_{arch}: {bad}"
    for r in rows:
        assert r["backend"] == "triton" and r["arch"] == f"sm_{arch}"
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], r


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_launch_plan_fills_the_gpu_without_atomics(shape, dtype):
    n, d, v = SHAPES[shape]
    launches = plan.launches(n, d, v, dtype, sms=H100_SMS)
    for x in launches:
        assert set(x) == {"kernel", "programs", "flops", "hbm_bytes", "atomic_bytes"}
    row = [x for x in launches if x["kernel"] in ("triton _stats_kernel", "triton _grad_kernel")]
    assert row and all(x["programs"] >= 2 * H100_SMS for x in row), row
    hbm = sum(x["hbm_bytes"] for x in launches)
    atomic = sum(x["atomic_bytes"] for x in launches)
    assert atomic <= 0.01 * hbm
    gemm = sum(x["flops"] for x in launches if x["kernel"].startswith("cublas_gemm"))
    assert gemm == 6 * n * d * v  # three GEMMs, the minimum
    total = sum(x["flops"] for x in launches)
    assert total < 6.05 * n * d * v


def test_short_chunks_split_the_vocabulary():
    """A chunk with few rows splits each row's vocabulary so the row kernels still fill the GPU."""
    bv, _ = ce.row_config(torch.bfloat16, 128_256)
    tiles = -(-128_256 // bv)
    for rows in (1, 7, 128, 263):
        nsp, span = ce.splits(rows, 128_256, bv, H100_SMS)
        assert rows * nsp >= min(2 * H100_SMS, rows * tiles)  # one row has only `tiles` tiles to spread
        assert span % bv == 0 and (nsp - 1) * span < 128_256 <= nsp * span
    assert ce.splits(4096, 128_256, bv, H100_SMS)[0] == 1
    launches = plan.launches(100, 4096, 128_256, "bf16", sms=H100_SMS)
    row = [x for x in launches if x["kernel"] == "triton _stats_kernel"]
    assert row[0]["programs"] >= 2 * H100_SMS


def test_scatter_atomics_are_relaxed():
    """The embedding's atomic scatter adds with relaxed ordering (a sum needs no fence; Triton's
    default, acq_rel, orders every add): its sm_90 PTX has only relaxed reductions."""
    code = ("import re\nfrom tiedkernels.triton import plan\n"
            "spec = [s for s in plan.aot_specs() if s['kernel'] == 'triton _scatter_atomic_kernel'][0]\n"
            "ptx = plan.compile_kernel(spec, 90).asm['ptx']\n"
            "print('\\n'.join(l.strip() for l in ptx.splitlines() if re.match(r'\\s*(@%p\\d+\\s+)?(atom|red)\\.', l)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.split()
    ops = [x for x in lines if x.startswith(("atom.", "red."))]
    assert ops and all(".relaxed." in x for x in ops), ops
