"""The GPU cost model: ``python -m tiedkernels gpu-report [--json]``.

For each GPU backend (``cuda``, ``triton``) and training shape it lists every kernel the fused
loss (forward + backward, bf16, ``reduction="mean"``, gradients of ``hidden`` and ``weight``)
launches, its programs (thread blocks) against the SM count, its flops, HBM bytes and atomic
bytes, and the roofline time on an H100 SXM; and, for each kernel, the registers, spilled bytes
and shared memory of the ahead-of-time compile for sm_80 and sm_90.  No GPU, network or CUDA
build of torch is needed:

* the ``cuda`` kernels' resources come from ``tiedkernels/data/cuda_resources.json``, which
  ``make cuda-check`` regenerates from its build (``ptxas -v`` and ``cuobjdump`` of the built
  extension; ``python -m tiedkernels.gpu_report cuda-table``), with the hash of the sources it
  was built from; the ``cuda`` launch plan is modelled here from ``csrc/lce_driver.cpp`` (the
  chunk rule of ``functional.chunk_rows``, the per-chunk GEMMs, the fp32 ``dW`` accumulated by
  cuBLAS itself) and ``csrc/cuda/kernels.cu``;
* the ``triton`` side comes from ``tiedkernels.triton.plan`` (``compile_report(arch)`` compiles
  each shipped launch configuration ahead of time; ``launches(n, d, v, dtype, sms)`` is the
  backend's own launch plan).

Counting rules.  ``flops`` are matrix flops (2·M·N·K per GEMM or ``tl.dot``), the work the
tensor-core peak is for; elementwise work is counted in bytes only.  ``hbm_bytes`` counts each
launch's reads and writes of device memory once (no credit for L2 reuse between launches; the
row kernel's second read of its logits row is counted too, since a chunk's rows do not fit in
L2), ``atomic_bytes`` the bytes that atomic read-modify-writes touch.  The roofline is
``max(flops / 989 TFLOP/s, (hbm_bytes + atomic_bytes) / 3.35 TB/s)``: atomics are charged at
HBM bandwidth.  cuBLAS picks its own tiles: its programs are estimated as 128×256 output tiles
(the tile of cuBLAS's large bf16 GEMMs on sm_90), and ATen's elementwise kernels as 512
elements per program (128 threads × 4).
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
HBM_BW = 3.35e12  # H100 SXM, bytes/s
H100_SMS = 132
ARCHS = ("sm_80", "sm_90")

# (name, N, D, V): the Llama 3 8B head, a 32k vocabulary, the 256k-vocabulary Gemma 2 head.
SHAPES = (
    ("llama3-8b", 8192, 4096, 128_256),
    ("32k", 2048, 2048, 32_768),
    ("gemma-256k", 8192, 2304, 256_000),
)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Gradient filtering (``grad_filter=``): the fraction of the vocabulary columns a chunk keeps for the
# dh and dW GEMMs.  The default is measured on the trained workload (benchmarks/workload.py, the demo's
# GPT-2 with a 4,096-row vocabulary on the shipped corpus; `python -m benchmarks.workload` prints the
# tables): with bf16's grad_filter="auto" threshold (2^-12 of each row's gradient scale), in chunks of
# 4,096 rows (the cuda plan's chunk for the Llama 3 8B head), on the "mid" split (the training text when
# the training loss was 2.5 nats), a chunk keeps 1,933.5 of the 4,096 columns on average: 0.472.  That
# is the fraction of the workload's own vocabulary, no extrapolation; its text uses 1,945 tokens, and a
# chunk keeps 99.4% of those.  Were the kept *count* the same at V=128,256 (a larger vocabulary adding
# only tokens the text never uses), the fraction would be 1,933.5 / 128,256 = 0.0151: `--kept 0.0151`.
KEPT_WORKLOAD = {"split": "mid", "chunk_rows": 4096, "threshold": "2^-12 bf16 auto"}
KEPT_DEFAULT = 0.472
KEPT_SOURCE = ("measured on benchmarks/workload.py's trained GPT-2, V=4,096: bf16 grad_filter='auto' (2^-12), "
               "4,096-row chunks, the 'mid' split at 2.5 nats; the same kept count at V=128,256 would be 0.0151")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cuda_resources.json")
# What the CUDA kernels' machine code depends on in this repository: csrc/cuda.  kernels.cu also
# includes csrc/lce_driver.h, but only for host code (the driver's declarations): every kernel
# takes raw pointers or RowParams, defined in kernels.cu, so a change of the driver's header does
# not make the table stale.  (The nvcc flags live in setup.py; the table records the toolkit.)
CUDA_SOURCE_GLOBS = ("csrc/cuda/*.cu", "csrc/cuda/*.cuh", "csrc/cuda/*.h")

# Threads per block of each kernel of csrc/cuda/kernels.cu (tests check them against the source).
CUDA_THREADS = {
    "find_bad_kernel": 256,
    "bad_record_kernel": 1,
    "gather_kernel": 128,  # kEmbThreads
    "scatter_atomic_kernel": 128,
    "scatter_sorted_kernel": 128,
    "transform_kernel": 256,  # kElemThreads
    "transform_bwd_kernel": 256,
    "row_kernel": 512,  # kRowThreads
}
CUBLAS_TILE = (128, 256)
ELEMENTWISE_PER_PROGRAM = 512


def cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# the CUDA resource table (built by `make cuda-check`)


def cuda_sources(root=ROOT):
    import glob

    files = set()
    for pattern in CUDA_SOURCE_GLOBS:
        files.update(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern)))
    return sorted(f.replace(os.sep, "/") for f in files)


def sources_sha256(root=ROOT):
    """sha256 over the CUDA sources' names and contents (the table is stale when it differs)."""
    h = hashlib.sha256()
    for rel in cuda_sources(root):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def parse_ptxas(text):
    """``ptxas -v`` output -> {(arch, mangled): {registers, stack_bytes, spill_store_bytes,
    spill_load_bytes, shared_bytes}} for every entry function."""
    out = {}
    cur = None
    props_for = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            out[cur] = {"registers": None, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0,
                        "shared_bytes": 0}
            props_for = None
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_for = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            if cur is not None and props_for == cur[1]:
                e = out[cur]
                e["stack_bytes"], e["spill_store_bytes"], e["spill_load_bytes"] = map(int, m.groups())
            elif props_for is not None and int(m.group(2)) + int(m.group(3)) > 0:
                # a device function that was not inlined: its spills count against the kernel
                if cur is not None:
                    out[cur]["spill_store_bytes"] += int(m.group(2))
                    out[cur]["spill_load_bytes"] += int(m.group(3))
            props_for = None
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            out[cur]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[cur]["shared_bytes"] = int(s.group(1)) if s else 0
            cur = None
    return out


def parse_cuobjdump(text):
    """``cuobjdump --dump-resource-usage`` -> {(arch, mangled): {registers, stack_bytes,
    shared_bytes, local_bytes}}."""
    out = {}
    arch = None
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name is not None and arch is not None:
            reg, stack, shared, local = map(int, m.groups())
            out[(arch, name)] = {"registers": reg, "stack_bytes": stack, "shared_bytes": shared,
                                 "local_bytes": local}
            name = None
    return out


def find_cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy that ships in the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                m = re.search(rb"exec\s+['\"]?(/[^\s'\"]+/bin/nvcc)", f.read(4096))
            if m:
                real = m.group(1).decode()
        except OSError:
            pass
        cands.append(os.path.join(os.path.dirname(real), "cuobjdump"))
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:
        pass
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def demangle(names):
    """Mangled -> demangled names through c++filt (unchanged where c++filt is missing)."""
    names = list(names)
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    return dict(zip(names, res.stdout.splitlines()))


_DTYPES = {"c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32", "double": "fp64"}


def short_name(demangled):
    """'void ns::(anonymous namespace)::row_kernel<c10::BFloat16, float>(...)' ->
    ('row_kernel', 'bf16, fp32')."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, end = 0, len(s)
    for i, ch in enumerate(s):  # the argument list starts at the first '(' outside <...>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s[i:].startswith("(anonymous namespace)"):
            end = i
            break
    s = s[:end]
    targs = ""
    if s.endswith(">"):
        start = s.index("<")
        s, targs = s[:start], s[start + 1 : -1]
    base = s.rsplit("::", 1)[-1]
    args = ", ".join(_DTYPES.get(a.strip(), a.strip()) for a in targs.split(",")) if targs else ""
    return base, args


def cuda_table(so_path, root=ROOT, ptxas_log=None, cuobjdump=None):
    """The resource table of a built extension: every kernel per architecture."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump was not found (PATH, CUDA_HOME/bin, the triton wheel)")
    res = subprocess.run([tool, "--dump-resource-usage", so_path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{tool} --dump-resource-usage {so_path} failed: {res.stderr.strip()}")
    binary = parse_cuobjdump(res.stdout)
    if not binary:
        raise RuntimeError(f"{so_path} holds no CUDA kernels (cuobjdump found none)")
    ptx = {}
    if ptxas_log is not None:
        with open(ptxas_log, errors="replace") as f:
            ptx = parse_ptxas(f.read())
        if not ptx:
            raise RuntimeError(f"{ptxas_log} holds no 'ptxas -v' report (was the build run with -Xptxas -v?)")
    names = demangle(sorted({n for _, n in binary}))
    rows = []
    for (arch, mangled), b in sorted(binary.items()):
        kernel, targs = short_name(names[mangled])
        p = ptx.get((arch, mangled))
        if ptx and p is None:
            raise RuntimeError(f"ptxas reported nothing for {names[mangled]} on {arch}")
        if p is not None and p["registers"] != b["registers"]:
            raise RuntimeError(f"{names[mangled]} on {arch}: ptxas says {p['registers']} registers, "
                               f"the binary {b['registers']}")
        threads = CUDA_THREADS.get(kernel)
        config = ", ".join(x for x in (targs, f"{threads} threads" if threads else "") if x)
        rows.append({
            "kernel": kernel,
            "arch": arch,
            "config": config,
            "registers": b["registers"],
            # spilled bytes per thread: ptxas' spill stores; without its report, every byte of
            # local memory and stack (an upper bound)
            "spill_bytes": p["spill_store_bytes"] if p else b["stack_bytes"] + b["local_bytes"],
            "spill_load_bytes": p["spill_load_bytes"] if p else None,
            "stack_bytes": b["stack_bytes"],
            "local_bytes": b["local_bytes"],
            "shared_bytes": b["shared_bytes"],
            "threads": threads,
            "signature": names[mangled],
        })
    toolchain = {}
    try:
        import torch

        toolchain["torch"] = torch.__version__
        toolchain["cuda"] = torch.version.cuda
    except Exception:
        pass
    return {
        "about": "Resources of the CUDA kernels of csrc/cuda per architecture, from `make cuda-check` "
                 "(ptxas -v and cuobjdump --dump-resource-usage of the built extension). "
                 "Regenerate with `make cuda-check`.",
        "sources": cuda_sources(root),
        "sources_sha256": sources_sha256(root),
        "toolchain": toolchain,
        "archs": sorted({r["arch"] for r in rows}),
        "kernels": rows,
    }


def load_cuda_table(path=TABLE_PATH):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# launch plans


def _launch(kernel, programs, flops=0, hbm=0, atomic=0):
    return {"kernel": kernel, "programs": int(programs), "flops": int(flops), "hbm_bytes": int(hbm),
            "atomic_bytes": int(atomic)}


def _gemm(kernel, m, n, k, a_bytes, b_bytes, c_bytes):
    """A cuBLAS GEMM [m, k] x [k, n] -> [m, n] with each operand read once and the output written once."""
    return _launch(kernel, cdiv(m, CUBLAS_TILE[0]) * cdiv(n, CUBLAS_TILE[1]), 2 * m * n * k,
                   a_bytes + b_bytes + c_bytes)


def _elementwise(kernel, numel, nbytes):
    return _launch(kernel, max(1, cdiv(numel, ELEMENTWISE_PER_PROGRAM)), 0, nbytes)


def _chunk_rows(n, d, itemsize):
    """The rows per chunk the cuda backend runs with by default (functional.chunk_rows)."""
    from tiedkernels import functional

    old = os.environ.pop("TIEDKERNELS_CHUNK_BYTES", None)  # the default rule, not this process's setting
    try:
        return functional.chunk_rows(n, 1, None, d=d, itemsize=itemsize, dw=False)
    finally:
        if old is not None:
            os.environ["TIEDKERNELS_CHUNK_BYTES"] = old


def cuda_launches(n, d, v, dtype="bf16", sms=H100_SMS):
    """Every launch of ``linear_cross_entropy(h, W, labels)`` forward + backward on the cuda
    backend (mean reduction, gradients of h and W, no bias, int64 labels; gradient-in-forward),
    in order.  Mirrors functional.py, csrc/cuda/kernels.cu (lce_fwd_cuda) and
    csrc/lce_driver.cpp (lce_chunked), then ops.py's backward."""
    e = DTYPE_BYTES[dtype]
    low = e < 4
    L = []
    # functional.loss_denominator: (labels != ignore).sum().clamp(1).to(fp32); then 1 / denom
    L.append(_elementwise("aten: denominator (labels != ignore_index).sum()", n, 8 * n + 4))
    L.append(_elementwise("aten: clamp, to fp32, reciprocal of the denominator", 1, 16))
    # kernels.cu start_check: at::full, find_bad_kernel, bad_record_kernel, a 24-byte copy to the host
    L.append(_elementwise("aten: fill (first bad position)", 1, 8))
    L.append(_launch("find_bad_kernel", cdiv(n, CUDA_THREADS["find_bad_kernel"]), 0, 8 * n))
    L.append(_launch("bad_record_kernel", 1, 0, 8 + 8 + 24))
    chunk = _chunk_rows(n, d, e)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        L.append(_gemm("cublas: z = h_c·Wᵀ", c, v, d, c * d * e, v * d * e, c * v * e))
        # one block per row: reads the row for the lse, again for dz, writes dz over it;
        # labels, lse and loss per row
        L.append(_launch("row_kernel", c, 0, 3 * c * v * e + c * (8 + 4 + 4) + 4))
        L.append(_gemm("cublas: dh_c = dz·W", c, d, v, c * v * e, v * d * e, c * d * e))
        # dW in fp32 (fp32 inputs; low precision: cuBLAS's fp32 output from bf16/fp16 inputs, so
        # the chunk's contribution is never rounded): the first chunk writes it, the others
        # accumulate in the GEMM (addmm: dW read and written)
        out = "" if not low else " (fp32 out)"
        if start == 0:
            L.append(_gemm("cublas: dW = dzᵀ·h_c" + out, v, d, c, c * v * e, c * d * e, v * d * 4))
        else:
            L.append(_gemm("cublas: dW += dzᵀ·h_c" + out, v, d, c, c * v * e, c * d * e, 2 * v * d * 4))
    return L + _finish_launches(n, d, v, e, low)


def _finish_launches(n, d, v, e, low):
    """The launches after the chunks: the loss's sum and scale, dW's cast, and the backward (ops.py),
    whose incoming gradient is a CUDA tensor, so it cannot be known to be 1 without a sync and the
    precomputed gradients are scaled in place."""
    L = [_elementwise("aten: loss = sum(loss_vec)", n, 4 * n + 4),
         _elementwise("aten: loss *= 1/denominator", 1, 12)]
    if low:
        L.append(_elementwise("aten: dW fp32 -> input dtype", v * d, v * d * (4 + e)))
    L.append(_elementwise("aten: dh *= grad", n * d, 2 * n * d * e + 4))
    L.append(_elementwise("aten: dW *= grad", v * d, 2 * v * d * e + 4))
    return L


# csrc/lce_driver.cpp, kFilterTileBytes: the filtered GEMMs walk the kept columns in tiles of this many
# bytes of fp32 [kept, D] rows (so their temporaries stay bounded whatever the kept fraction).
FILTER_TILE_BYTES = 64 << 20


def cuda_filtered_launches(n, d, v, kept, dtype="bf16", sms=H100_SMS):
    """The cuda plan with gradient filtering (``grad_filter=``) at a kept fraction ``kept`` of the
    vocabulary in every chunk, as csrc/lce_driver.cpp runs it: ``dW`` is zeroed first (no chunk writes
    all of it); per chunk the logits GEMM and the row kernel stay dense, then the kept columns are
    found (``aminmax`` of ``dz`` over the rows against the threshold, ``nonzero``: the one host sync
    of a chunk), and the ``dh`` and ``dW`` GEMMs run on ``k = ceil(kept·V)`` columns only, in tiles of
    ``FILTER_TILE_BYTES`` of fp32 ``[k, D]`` rows: ``index_select`` of the tile's ``dz`` columns and
    ``W`` rows, ``dh_c = dz_k·W_k`` (several tiles of a bf16/fp16 ``dh`` summed in an fp32 buffer,
    rounded once), ``dz_kᵀ·h_c`` into an fp32 ``[kt, D]`` part, and ``index_add_`` of the part into the
    kept rows of the fp32 ``dW`` (atomic adds on CUDA: counted as atomic bytes).  ``kept = 1`` is a
    chunk that keeps every column: the dense GEMMs, ``dW`` accumulated from the first chunk on."""
    if not 0 < kept <= 1:
        raise ValueError(f"gpu-report: the kept fraction must be in (0, 1], got {kept}")
    e = DTYPE_BYTES[dtype]
    low = e < 4
    k = max(1, min(v, math.ceil(kept * v)))
    tile = max(1, FILTER_TILE_BYTES // (d * 4))
    L = []
    L.append(_elementwise("aten: denominator (labels != ignore_index).sum()", n, 8 * n + 4))
    L.append(_elementwise("aten: clamp, to fp32, reciprocal of the denominator", 1, 16))
    L.append(_elementwise("aten: fill (first bad position)", 1, 8))
    L.append(_launch("find_bad_kernel", cdiv(n, CUDA_THREADS["find_bad_kernel"]), 0, 8 * n))
    L.append(_launch("bad_record_kernel", 1, 0, 8 + 8 + 24))
    L.append(_elementwise("aten: zero the fp32 dW", v * d, v * d * 4))
    chunk = _chunk_rows(n, d, e)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        L.append(_gemm("cublas: z = h_c·Wᵀ", c, v, d, c * d * e, v * d * e, c * v * e))
        L.append(_launch("row_kernel", c, 0, 3 * c * v * e + c * (8 + 4 + 4) + 4))
        # filter_keep: min and max of dz over the rows, compared with the threshold, a [V] mask
        L.append(_elementwise("filter: aminmax of dz over rows vs threshold", c * v, c * v * e + 4 * v * e + v))
        # nonzero: the kept columns' int64 indices (its count comes to the host)
        L.append(_elementwise("filter: nonzero (kept columns; host sync)", v, v + 8 * k))
        if k == v:  # every column kept: the dense GEMMs, dW accumulated (it was zeroed)
            L.append(_gemm("cublas: dh_c = dz·W", c, d, v, c * v * e, v * d * e, c * d * e))
            L.append(_gemm("cublas: dW += dzᵀ·h_c" + (" (fp32 out)" if low else ""), v, d, c, c * v * e, c * d * e,
                           2 * v * d * 4))
            continue
        tiles = [min(tile, k - k0) for k0 in range(0, k, tile)]
        dh32 = low and len(tiles) > 1
        if dh32:
            L.append(_elementwise("filter: zero the fp32 dh_c", c * d, c * d * 4))
        for i, kt in enumerate(tiles):
            L.append(_elementwise("filter: index_select dz[:, kept]", c * kt, 2 * c * kt * e + 8 * kt))
            L.append(_elementwise("filter: index_select W[kept]", kt * d, 2 * kt * d * e + 8 * kt))
            if dh32:
                L.append(_gemm("cublas: dh_c += dz_k·W_k (fp32 out)", c, d, kt, c * kt * e, kt * d * e, 2 * c * d * 4))
            elif i == 0:
                L.append(_gemm("cublas: dh_c = dz_k·W_k", c, d, kt, c * kt * e, kt * d * e, c * d * e))
            else:  # fp32: later tiles summed in place
                L.append(_gemm("cublas: dh_c += dz_k·W_k", c, d, kt, c * kt * e, kt * d * e, 2 * c * d * e))
            L.append(_gemm("cublas: dW_k = dz_kᵀ·h_c (fp32 out)", kt, d, c, c * kt * e, c * d * e, kt * d * 4))
            # index_add_: the part and the indices read, atomic adds into the kept rows of dW
            L.append(_launch("aten: index_add_ dW[kept] += dW_k (fp32)", max(1, cdiv(kt * d, ELEMENTWISE_PER_PROGRAM)),
                             0, kt * d * 4 + 8 * kt, kt * d * 4))
        if dh32:
            L.append(_elementwise("filter: dh_c fp32 -> input dtype", c * d, c * d * (4 + e)))
    return L + _finish_launches(n, d, v, e, low)


def triton_plan():
    """The Triton backend's plan module, or the reason it is not available."""
    try:
        from tiedkernels.triton import plan
    except Exception as exc:  # triton missing, or the module not there
        return None, f"{type(exc).__name__}: {exc}"
    return plan, None


# ---------------------------------------------------------------------------------------------
# the report


def shape_entry(backend, shape, n, d, v, dtype, sms, launches):
    flops = sum(x["flops"] for x in launches)
    hbm = sum(x["hbm_bytes"] for x in launches)
    atomic = sum(x["atomic_bytes"] for x in launches)
    return {
        "backend": backend,
        "shape": shape,
        "n": n, "d": d, "v": v, "dtype": dtype,
        "sms": sms,
        "flops": flops,
        "hbm_bytes": hbm,
        "atomic_bytes": atomic,
        "roofline_ms": roofline_ms(flops, hbm + atomic),
        "launches": launches,
    }


def roofline_ms(flops, nbytes, peak=PEAK_FLOPS, bw=HBM_BW):
    return max(flops / peak, nbytes / bw) * 1e3


def filtered_entry(shape, n, d, v, dtype, sms, kept):
    """The cuda plan with gradient filtering at ``kept``, next to the dense plan's figures."""
    s = shape_entry("cuda", shape, n, d, v, dtype, sms, cuda_filtered_launches(n, d, v, kept, dtype, sms))
    dense = shape_entry("cuda", shape, n, d, v, dtype, sms, cuda_launches(n, d, v, dtype, sms))
    s.update(kept=kept, kept_columns=max(1, min(v, math.ceil(kept * v))), dense_flops=dense["flops"],
             dense_hbm_bytes=dense["hbm_bytes"], dense_atomic_bytes=dense["atomic_bytes"],
             dense_roofline_ms=dense["roofline_ms"])
    return s


def build_report(shapes=SHAPES, dtype="bf16", sms=H100_SMS, backends=("cuda", "triton"), table_path=TABLE_PATH,
                 kept=None, kept_source=None):
    """The report; with ``kept`` (a fraction in (0, 1]) also the cuda plan with gradient filtering
    at that kept fraction for every shape (``rep["filtered"]``)."""
    kernels, entries, notes, filtered = [], [], [], []
    if "cuda" in backends:
        try:
            table = load_cuda_table(table_path)
        except OSError as exc:
            table = {"kernels": [], "sources_sha256": None}
            notes.append(f"cuda: no resource table ({exc.strerror}: {table_path}); `make cuda-check` writes it")
        if table["sources_sha256"] is not None and os.path.isdir(os.path.join(ROOT, "csrc")) \
                and table["sources_sha256"] != sources_sha256():
            notes.append(f"cuda: {os.path.relpath(table_path, ROOT)} was built from other sources than "
                         "csrc/cuda now holds; run `make cuda-check` to refresh it")
        for r in table["kernels"]:
            kernels.append({"backend": "cuda", **{k: r[k] for k in ("kernel", "arch", "config", "registers",
                                                                    "spill_bytes", "shared_bytes")}})
        for name, n, d, v in shapes:
            entries.append(shape_entry("cuda", name, n, d, v, dtype, sms, cuda_launches(n, d, v, dtype, sms)))
            if kept is not None:
                filtered.append(filtered_entry(name, n, d, v, dtype, sms, kept))
    if "triton" in backends:
        plan, why = triton_plan()
        if plan is None:
            notes.append(f"triton: no launch plan ({why})")
        else:
            for arch in ARCHS:
                for r in plan.compile_report(arch):
                    kernels.append({k: r[k] for k in ("backend", "kernel", "arch", "config", "registers",
                                                      "spill_bytes", "shared_bytes")})
            for name, n, d, v in shapes:
                launches = [_launch(x["kernel"], x["programs"], x["flops"], x["hbm_bytes"], x["atomic_bytes"])
                            for x in plan.launches(n, d, v, dtype, sms=sms)]
                entries.append(shape_entry("triton", name, n, d, v, dtype, sms, launches))
    return {"kernels": kernels, "shapes": entries, "notes": notes, "filtered": filtered,
            "kept": kept, "kept_source": kept_source if kept_source is not None else
            (KEPT_SOURCE if kept == KEPT_DEFAULT else "given"),
            "peak": {"flops": PEAK_FLOPS, "hbm_bytes_per_s": HBM_BW, "device": "H100 SXM"}}


def to_json(rep):
    """The machine-readable form: exactly the documented keys."""
    return {
        "kernels": [{k: r[k] for k in ("backend", "kernel", "arch", "config", "registers", "spill_bytes",
                                       "shared_bytes")} for r in rep["kernels"]],
        "shapes": [{**{k: s[k] for k in ("backend", "shape", "sms", "flops", "hbm_bytes", "atomic_bytes",
                                         "roofline_ms")},
                    "launches": [{k: x[k] for k in ("kernel", "programs", "flops")} for x in s["launches"]]}
                   for s in rep["shapes"]],
        # gradient filtering: the cuda plan at a kept fraction, beside the dense plan (empty without --kept)
        "filtered": [{**{k: s[k] for k in ("backend", "shape", "sms", "kept", "kept_columns", "flops", "hbm_bytes",
                                           "atomic_bytes", "roofline_ms", "dense_flops", "dense_hbm_bytes",
                                           "dense_atomic_bytes", "dense_roofline_ms")},
                      "launches": [{k: x[k] for k in ("kernel", "programs", "flops")} for x in s["launches"]]}
                     for s in rep.get("filtered", [])],
    }


def resident_blocks(registers, threads, shared=0):
    """Blocks of a kernel that fit on one sm_80/sm_90 SM (64k registers, 2048 threads, 32 blocks,
    228 KiB shared memory; registers are allocated per warp in units of 256)."""
    warps = cdiv(threads, 32)
    per_warp = cdiv(max(registers, 1) * 32, 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_threads = 2048 // (warps * 32)
    by_smem = (228 * 1024) // shared if shared else 32
    return max(0, min(by_regs, by_threads, 32, by_smem))


def _gb(x):
    return f"{x / 1e9:9.2f}"


def format_text(rep):
    out = []
    p = rep["peak"]
    out.append(f"GPU cost model: the fused loss forward + backward, roofline on an {p['device']} "
               f"({p['flops'] / 1e12:.0f} TFLOP/s dense bf16, {p['hbm_bytes_per_s'] / 1e12:.2f} TB/s)")
    out.append("")
    out.append("kernels (ahead-of-time compile):")
    out.append(f"  {'backend':<7} {'arch':<6} {'kernel':<28} {'config':<50} {'regs':>5} {'spill B':>8} "
               f"{'shared B':>9} {'blocks/SM':>9}")
    for r in rep["kernels"]:
        m = re.search(r"(\d+) threads", r["config"])
        blocks = resident_blocks(r["registers"], int(m.group(1)), r["shared_bytes"]) if m else None
        out.append(f"  {r['backend']:<7} {r['arch']:<6} {r['kernel'][:28]:<28} {r['config'][:50]:<50} "
                   f"{r['registers']:>5} {r['spill_bytes']:>8} {r['shared_bytes']:>9} "
                   f"{blocks if blocks is not None else '':>9}")
    for s in rep["shapes"]:
        out.append("")
        f, hb, ab = s["flops"], s["hbm_bytes"], s["atomic_bytes"]
        ndv6 = 6 * s["n"] * s["d"] * s["v"]
        out.append(f"{s['backend']} · {s['shape']} (N={s['n']}, D={s['d']}, V={s['v']}, {s['dtype']}), "
                   f"{s['sms']} SMs: {f / 1e12:.2f} TFLOP ({f / ndv6:.3f} × 6·N·D·V), "
                   f"HBM {hb / 1e9:.2f} GB, atomics {ab / 1e9:.3f} GB ({100 * ab / max(hb, 1):.2f}% of HBM), "
                   f"roofline {s['roofline_ms']:.2f} ms "
                   f"({'compute' if f / PEAK_FLOPS >= (hb + ab) / HBM_BW else 'memory'}-bound; "
                   f"{f / PEAK_FLOPS * 1e3:.2f} ms of flops, {(hb + ab) / HBM_BW * 1e3:.2f} ms of bytes)")
        out += _launch_lines(s)
    if rep.get("filtered"):
        out.append("")
        out.append(f"gradient filter (grad_filter=): each chunk keeps a fraction {rep['kept']:g} of the vocabulary "
                   f"columns ({rep['kept_source']}); the logits GEMM and the row kernel stay dense, dh and dW run "
                   "on the kept columns (gathered dz columns and W rows, index_add_ into the fp32 dW: atomics), "
                   "as csrc/lce_driver.cpp runs them:")
        for s in rep["filtered"]:
            f, hb, ab = s["flops"], s["hbm_bytes"], s["atomic_bytes"]
            df, dhb, dab = s["dense_flops"], s["dense_hbm_bytes"], s["dense_atomic_bytes"]
            ndv6 = 6 * s["n"] * s["d"] * s["v"]
            bound = "compute" if f / PEAK_FLOPS >= (hb + ab) / HBM_BW else "memory"
            out.append("")
            out.append(f"{s['backend']} · {s['shape']} filtered (N={s['n']}, D={s['d']}, V={s['v']}, {s['dtype']}, "
                       f"kept {s['kept']:g}: {s['kept_columns']:,} columns per chunk): "
                       f"{f / 1e12:.2f} TFLOP ({f / ndv6:.3f} × 6·N·D·V; dense {df / 1e12:.2f}), "
                       f"HBM {hb / 1e9:.2f} GB (dense {dhb / 1e9:.2f}), atomics {ab / 1e9:.3f} GB (dense "
                       f"{dab / 1e9:.3f}), roofline {s['roofline_ms']:.2f} ms ({bound}-bound) against dense "
                       f"{s['dense_roofline_ms']:.2f} ms: {s['dense_roofline_ms'] / s['roofline_ms']:.2f}× faster")
            out += _launch_lines(s)
    if rep["notes"]:
        out.append("")
        out += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(out)


def _launch_lines(s):
    out = []
    serial = sum(roofline_ms(x["flops"], x["hbm_bytes"] + x["atomic_bytes"]) for x in s["launches"])
    out.append(f"  launch by launch (each kernel at its own roofline, one after another): {serial:.2f} ms")
    groups = {}
    for x in s["launches"]:
        g = groups.setdefault((x["kernel"], x["programs"]), [0, 0, 0, 0])
        g[0] += 1
        g[1] += x["flops"]
        g[2] += x["hbm_bytes"]
        g[3] += x["atomic_bytes"]
    out.append(f"  {'launches':>8}  {'kernel':<48} {'programs':>9} {'/SMs':>7} {'TFLOP':>8} {'HBM GB':>9} "
               f"{'atomic GB':>9}")
    for (kernel, programs), (count, fl, hbm, at) in groups.items():
        flag = "  < SMs" if programs < s["sms"] and (fl > 1e9 or hbm + at > 1e8) else ""
        out.append(f"  {count:>8}× {kernel[:48]:<48} {programs:>9} {programs / s['sms']:>7.2f} "
                   f"{fl / 1e12:>8.3f} {_gb(hbm)} {_gb(at)}{flag}")
    return out


def _kept_arg(text):
    if text.lower() in ("none", "off"):
        return None
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants a fraction in (0, 1] or 'none', got {text!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"wants a fraction in (0, 1] or 'none', got {text!r}")
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tiedkernels gpu-report",
                                 description="Kernels, launches, flops, bytes and the H100 roofline of the GPU "
                                             "backends' fused loss, without a GPU.")
    ap.add_argument("--json", action="store_true", help="print the machine-readable form")
    ap.add_argument("--backend", choices=("cuda", "triton"), action="append",
                    help="only this backend (repeatable; default: both)")
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SMs to plan for (default 132, an H100 SXM)")
    ap.add_argument("--shape", action="append", metavar="N,D,V",
                    help="a shape of your own instead of the three built in (repeatable)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    ap.add_argument("--kept", type=_kept_arg, default=KEPT_DEFAULT, metavar="FRACTION",
                    help="gradient filtering: the cuda plan with each chunk keeping this fraction of the vocabulary "
                         f"for dh and dW, beside the dense one ('none': leave it out; default {KEPT_DEFAULT:g}, "
                         f"{KEPT_SOURCE})".replace("%", "%%"))
    args = ap.parse_args(argv)
    shapes = SHAPES
    if args.shape:
        shapes = []
        for s in args.shape:
            try:
                n, d, v = (int(x) for x in s.split(","))
            except ValueError:
                ap.error(f"--shape wants N,D,V (three integers), got {s!r}")
            shapes.append((f"N={n},D={d},V={v}", n, d, v))
    rep = build_report(shapes, args.dtype, args.sms, tuple(args.backend or ("cuda", "triton")), kept=args.kept)
    if args.json:
        print(json.dumps(to_json(rep), indent=1))
    else:
        print(format_text(rep))
    return 0


def _table_main(argv):
    ap = argparse.ArgumentParser(prog="python -m tiedkernels.gpu_report cuda-table",
                                 description="Write the CUDA kernels' resource table from a built extension.")
    ap.add_argument("--so", help="the built extension (default: the tiedkernels._C this Python imports)")
    ap.add_argument("--ptxas-log", help="a build log holding nvcc's -Xptxas -v report")
    ap.add_argument("--root", default=ROOT, help="the checkout whose csrc/ the hash is taken over")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    so = args.so
    if so is None:
        import importlib.util

        spec = importlib.util.find_spec("tiedkernels._C")
        if spec is None or spec.origin is None:
            sys.exit("cuda-table: tiedkernels._C is not built here; pass --so")
        so = spec.origin
    table = cuda_table(so, root=args.root, ptxas_log=args.ptxas_log)
    spills = [r for r in table["kernels"] if r["spill_bytes"] or r["spill_load_bytes"]]
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for r in table["kernels"]:
        print(f"cuda-table: {r['arch']} {r['kernel']:<22} {r['config']:<26} {r['registers']:>4} registers, "
              f"{r['spill_bytes']} B spilled, {r['stack_bytes']} B stack, {r['shared_bytes']} B shared")
    print(f"cuda-table: wrote {len(table['kernels'])} kernels for {', '.join(table['archs'])} to {args.out}")
    if spills:
        sys.exit(f"cuda-table: {len(spills)} kernels spill registers: "
                 + ", ".join(f"{r['kernel']} ({r['arch']})" for r in spills))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["cuda-table"]:
        sys.exit(_table_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
