"""What the Triton backend launches, proven without a GPU.

* ``aot_specs()``: every Triton kernel of the backend at every launch configuration it can pick
  (each dtype, each output set that changes a constexpr), as ``triton.compile`` inputs.
* ``compile_report(arch)``: compiles each spec ahead of time for ``sm_80``/``sm_90``
  (``GPUTarget("cuda", arch, 32)``; no GPU needed) and reads registers, spills (stack/local
  bytes) and shared memory from the cubin with the ``cuobjdump`` shipped in the Triton wheel.
* ``launches(n, d, v, dtype, sms)``: the fused loss's launches for one training step (forward +
  backward, gradient-in-forward: mean reduction, gradients of h and W), torch GEMMs included,
  from the backend's own rules (``cross_entropy.row_config``, ``splits``, ``fp32_logits``, the
  default chunk of ``functional.chunk_rows``).

``python -m tiedkernels.triton.plan --arch 90`` prints the compile report as JSON.  The compile
runs in a process of its own when this one has the Triton interpreter on (its kernels cannot
be compiled for a GPU).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl

from . import cross_entropy as ce
from . import embedding as emb
from . import logits as lg

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}
_SIG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# cuBLAS programs are estimated at one thread block per 128 x 256 output tile.
CUBLAS_TILE = (128, 256)
# rough elementwise cost of the row kernels, flops per logit (exp, transform, compare, fma)
STATS_FLOPS_PER_LOGIT = 8
GRAD_FLOPS_PER_LOGIT = 8


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _sig(fn, types, constexprs):
    """A signature dict in argument order: pointers '*<dtype>', ints 'i32', floats 'fp32', and
    'constexpr' for the constexpr arguments."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.isupper() or name[:1].isupper():
            raise KeyError(f"{fn.__name__}: no type for pointer argument {name}")
        elif name in ("scale", "cap", "inv_cap", "eps", "z_loss", "inv_vocab", "softcap", "inv_softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _spec(kernel, config, fn, types, constexprs, num_warps, num_stages=1):
    config = f"{config}, {32 * num_warps} threads"
    return {"kernel": kernel, "config": config, "fn": fn, "signature": _sig(fn, types, constexprs),
            "constexprs": dict(constexprs), "num_warps": num_warps, "num_stages": num_stages}


def _loss_specs():
    out = []
    zpairs = []  # (logits dtype, dz dtype) of the grad kernel
    for dt in INPUT_DTYPES:
        zdts = [dt] + ([torch.float32] if ce.fp32_logits(dt, True, True, 1.0) else [])
        for zdt in zdts:
            zpairs.append((zdt, dt))
    for zdt, dt in zpairs:
        bv, warps = ce.row_config(zdt, 1 << 20)
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s = _SIG[sdt]
        types = {"Z": f"*{_SIG[zdt]}", "B": f"*{_SIG[dt]}", "CW": f"*{s}", "LAB": "*i64", "PART": f"*{s}",
                 "PIDX": "*i32"}
        out.append(_spec("triton _stats_kernel", f"z={_SIG[zdt]} bias={_SIG[dt]} BLOCK_V={bv}",
                         ce._stats_kernel, types, {"ACC": _acc(zdt), "BLOCK_V": bv}, warps))
    for sdt in (torch.float32, torch.float64):
        s = _SIG[sdt]
        types = {"PART": f"*{s}", "PIDX": "*i32", "LAB": "*i64", "CW": f"*{s}", "CSUM": f"*{s}", "LSE": f"*{s}",
                 "LOSS": f"*{s}", "SOUT": f"*{s}", "PRED": "*i64", "ENT": f"*{s}"}
        out.append(_spec("triton _finish_kernel", f"acc={s} BLOCK_R={ce.FINISH_ROWS}",
                         ce._finish_kernel, types, {"ACC": _acc(sdt), "BLOCK_R": ce.FINISH_ROWS}, ce.FINISH_WARPS))
    for zdt, dt in zpairs:
        bv, warps = ce.row_config(zdt, 1 << 20)
        sdt = torch.float64 if dt == torch.float64 else torch.float32
        s = _SIG[sdt]
        types = {"Z": f"*{_SIG[zdt]}", "DZ": f"*{_SIG[dt]}", "B": f"*{_SIG[dt]}", "CW": f"*{s}", "CSUM": f"*{s}",
                 "LAB": "*i64", "LSE": f"*{s}", "G": f"*{s}", "GL": f"*{s}"}
        out.append(_spec("triton _grad_kernel", f"z={_SIG[zdt]} dz={_SIG[dt]} BLOCK_V={bv}",
                         ce._grad_kernel, types, {"ACC": _acc(zdt), "BLOCK_V": bv}, warps))
    return out


def _logits_specs():
    out = []
    for dt in INPUT_DTYPES:
        s = _SIG[dt]
        cx = {"ACC": _acc(dt), "BLOCK": lg.BLOCK}
        out.append(_spec("triton _transform_kernel", f"{s} BLOCK={lg.BLOCK}",
                         lg._transform_kernel, {"Z": f"*{s}"}, cx, lg.NUM_WARPS))
        out.append(_spec("triton _transform_bwd_kernel", f"{s} BLOCK={lg.BLOCK}",
                         lg._transform_bwd_kernel, {"G": f"*{s}", "Z": f"*{s}", "OUT": f"*{s}"}, cx, lg.NUM_WARPS))
    return out


_TDV = {"T": "i32", "D": "i32", "V": "i32"}  # the embedding kernels' sizes


def _embedding_specs():
    out = []
    for dt in INPUT_DTYPES:
        s = _SIG[dt]
        out.append(_spec("triton _gather_kernel", f"{s} BT={emb.BT} BD={emb.BD}", emb._gather_kernel,
                         {"W": f"*{s}", "IDS": "*i64", "OUT": f"*{s}", **_TDV}, {"BT": emb.BT, "BD": emb.BD},
                         emb.NUM_WARPS))
        out.append(_spec("triton _scatter_sorted_kernel", f"{s} BD={emb.BD}", emb._scatter_sorted_kernel,
                         {"SORTED": "*i64", "PERM": "*i64", "RUN_START": "*i64", "RUN_END": "*i64", "G": f"*{s}",
                          "OUT": f"*{s}", "BAD": "*i64", **_TDV}, {"ACC": _acc(dt), "BD": emb.BD}, emb.NUM_WARPS))
    out.append(_spec("triton _scatter_atomic_kernel", f"fp32 BT={emb.BT} BD={emb.BD}", emb._scatter_atomic_kernel,
                     {"IDS": "*i64", "G": "*fp32", "OUT": "*fp32", "BAD": "*i64", **_TDV},
                     {"BT": emb.BT, "BD": emb.BD}, emb.NUM_WARPS))
    return out


def aot_specs():
    """Every kernel of the backend at every launch configuration it can pick on a GPU."""
    return _loss_specs() + _logits_specs() + _embedding_specs()


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile


def _arch_number(arch):
    a = str(arch).lower().replace("sm_", "").replace("sm", "")
    n = int(a)
    if n not in (80, 90):
        raise ValueError(f"tiedkernels: arch must be 80 or 90 (sm_80, sm_90), got {arch!r}")
    return n


def cuobjdump_path():
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else shutil.which("cuobjdump")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resources(cubin, tool):
    """(registers, stack + local bytes per thread, static shared bytes) of a cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    m = _RES.search(out.stdout)
    if m is None:
        raise RuntimeError(f"tiedkernels: cannot read the resource usage from cuobjdump: {out.stdout}{out.stderr}")
    reg, stack, shared, local = (int(x) for x in m.groups())
    return reg, stack + local, shared


def compile_kernel(spec, arch):
    """Compile one spec for sm_<arch> (no GPU needed); returns Triton's compiled kernel (``.asm``
    holds its PTX and cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", _arch_number(arch), 32)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(spec["signature"].items())
             if t.startswith("*")}
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    return triton.compile(src, target=target, options=options.__dict__)


def compile_spec(spec, arch):
    """Compile one spec for sm_<arch>; returns its report row."""
    n = _arch_number(arch)
    k = compile_kernel(spec, n)
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("tiedkernels: cuobjdump not found (it ships in the triton wheel)")
    reg, spill, shared_static = _resources(k.asm["cubin"], tool)
    shared = max(int(getattr(k.metadata, "shared", 0) or 0), shared_static)
    return {"backend": "triton", "kernel": spec["kernel"], "arch": f"sm_{n}", "config": spec["config"],
            "registers": reg, "spill_bytes": spill, "shared_bytes": shared,
            "num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}


def _in_interpreter():
    return type(ce._stats_kernel).__name__ == "InterpretedFunction"


def compile_report(arch):
    """Compile every spec for ``arch`` (80/90 or "sm_80"/"sm_90"): a list of
    {"backend", "kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes"}."""
    n = _arch_number(arch)
    if _in_interpreter():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run([sys.executable, "-m", "tiedkernels.triton.plan", "--arch", str(n)], capture_output=True,
                             text=True, env=env, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"tiedkernels: the ahead-of-time compile failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout)
    return [compile_spec(s, n) for s in aot_specs()]


# ---------------------------------------------------------------------------------------------
# the launch plan of one training step


def _launch(kernel, programs, flops=0, hbm=0, atomic=0):
    return {"kernel": kernel, "programs": int(programs), "flops": int(flops), "hbm_bytes": int(hbm),
            "atomic_bytes": int(atomic)}


def _gemm(kernel, m, n, k, nbytes):
    return _launch(kernel, triton.cdiv(m, CUBLAS_TILE[0]) * triton.cdiv(n, CUBLAS_TILE[1]), 2 * m * n * k, nbytes)


def _torch_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    return _NAMES[str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
                  .replace("float32", "fp32").replace("float64", "fp64")]


def launches(n, d, v, dtype, sms=132, *, bias=False, softcap=None, logit_scale=1.0, chunk_size=None):
    """Every launch of ``linear_cross_entropy(h, W, labels)`` forward + backward on the triton
    backend (mean reduction, gradients of h and W, int64 labels, gradient-in-forward), in order,
    as {"kernel", "programs", "flops", "hbm_bytes", "atomic_bytes"}.  HBM bytes count each
    launch's reads and writes once (no credit for L2 reuse); small torch ops are lumped."""
    from .. import functional

    dt = _torch_dtype(dtype)
    e = torch.empty((), dtype=dt).element_size()
    sdt = torch.float64 if dt == torch.float64 else torch.float32
    se = 8 if sdt == torch.float64 else 4
    low = dt in (torch.bfloat16, torch.float16)
    old = os.environ.pop("TIEDKERNELS_CHUNK_BYTES", None)  # the default rule, not this process's setting
    try:
        chunk = functional.chunk_rows(n, v, chunk_size, d=d, itemsize=e, dw=False)
    finally:
        if old is not None:
            os.environ["TIEDKERNELS_CHUNK_BYTES"] = old
    has_cap = softcap is not None and 0 < float(softcap) < float("inf")
    z32 = ce.fp32_logits(dt, bias, has_cap, float(logit_scale))
    ze = 4 if z32 else e
    bv, _ = ce.row_config(torch.float32 if z32 else dt, v)
    L = [_launch("aten: denominator, label check (compare, any, argmax, copy to pinned host)", triton.cdiv(n, 512),
                 0, 6 * 8 * n + 64)]
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        L.append(_gemm(f"cublas_gemm logits z = h_c·Wᵀ ({'fp32 out' if z32 else 'input dtype'})", c, v, d,
                       c * d * e + v * d * e + c * v * ze))
        nsp, _ = ce.splits(c, v, bv, sms)
        L.append(_launch("triton _stats_kernel", c * nsp, STATS_FLOPS_PER_LOGIT * c * v,
                         c * v * ze + c * 8 + (v * e if bias else 0) * min(c, sms) + ce.NSTAT * c * nsp * se))
        L.append(_launch("triton _finish_kernel", triton.cdiv(c, ce.FINISH_ROWS), 10 * c * nsp,
                         ce.NSTAT * c * nsp * se + c * (8 + 2 * se)))
        # dz over the logits (in place) or into an input-dtype buffer
        L.append(_launch("triton _grad_kernel", c * nsp, GRAD_FLOPS_PER_LOGIT * c * v,
                         c * v * ze + c * v * e + c * (8 + 2 * se)))
        L.append(_gemm("cublas_gemm dh_c = dz·W", c, d, v, c * v * e + v * d * e + c * d * e))
        acc = v * d * se
        if start == 0:
            L.append(_gemm("cublas_gemm dW = dzᵀ·h_c (fp32 out)", v, d, c, c * v * e + c * d * e + acc))
        else:
            L.append(_gemm("cublas_gemm dW += dzᵀ·h_c (fp32 accumulate)", v, d, c, c * v * e + c * d * e + 2 * acc))
    L.append(_launch("aten: loss = sum(loss_vec) * scale", 1, 2 * n, se * n + 16))
    if low:
        L.append(_launch("aten: dW fp32 -> input dtype", triton.cdiv(v * d, 512), 0, v * d * (se + e)))
    # backward (ops.py): the incoming gradient is a device tensor, not known to be 1: scale in place
    L.append(_launch("aten: dh *= grad", triton.cdiv(n * d, 512), n * d, 2 * n * d * e))
    L.append(_launch("aten: dW *= grad", triton.cdiv(v * d, 512), v * d, 2 * v * d * e))
    return L


def _main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Ahead-of-time compile report of the Triton kernels (JSON)")
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    args = p.parse_args(argv)
    json.dump(compile_report(args.arch), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    _main()
