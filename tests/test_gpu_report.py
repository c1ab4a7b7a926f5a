"""The GPU cost model (``python -m tiedkernels gpu-report``), the CUDA resource table it reads,
and the dry run of ``make gpu-check``; none of it needs a GPU."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tiedkernels import functional
from tiedkernels import gpu_report as G

ROOT = G.ROOT
KERNELS_CU = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")


@pytest.fixture(scope="module")
def table():
    return G.load_cuda_table()


@pytest.fixture(scope="module")
def report():
    return G.build_report()


# ---------------------------------------------------------------------------------------------
# the CUDA resource table (tiedkernels/data/cuda_resources.json, written by `make cuda-check`)


def test_table_was_built_from_these_sources(table):
    assert table["sources"] == G.cuda_sources()
    assert table["sources_sha256"] == G.sources_sha256(), (
        "tiedkernels/data/cuda_resources.json was built from other CUDA sources than csrc/ holds now: "
        "run `make cuda-check` (it rewrites the table) and commit the table with the sources")


def test_table_covers_every_kernel_on_both_archs_without_spills(table):
    with open(KERNELS_CU) as f:
        src = f.read()
    defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", src))
    assert defined == set(G.CUDA_THREADS), "gpu_report.CUDA_THREADS must name every kernel of kernels.cu"
    assert table["archs"] == ["sm_80", "sm_90"]
    for arch in ("sm_80", "sm_90"):
        rows = [r for r in table["kernels"] if r["arch"] == arch]
        assert {r["kernel"] for r in rows} == defined, arch
        for r in rows:
            assert r["registers"] > 0, r
            assert r["spill_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{r['kernel']} spills on {arch}: {r}"
            # No spills anywhere. The return_stats variant of the row kernel keeps a small stack frame
            # (24 B, 40 B in fp64: its argmax/entropy block reduction), ptxas counting no spill in it.
            small_frame = r["kernel"] == "row_kernel" and r["config"].split(", ")[2] == "true"
            limit = 64 if small_frame else 0
            assert r["stack_bytes"] <= limit and r["local_bytes"] == 0, f"{r['kernel']} uses local memory: {r}"
            assert r["shared_bytes"] <= 48 * 1024, r
    # every templated kernel is there for each dtype it is dispatched with
    row = {r["config"] for r in table["kernels"] if r["kernel"] == "row_kernel" and r["arch"] == "sm_90"}
    # (each with and without return_stats)
    assert row == {f"{t}, {stats}, 512 threads" for t in ("fp32, fp32", "fp64, fp64", "bf16, fp32", "fp16, fp32")
                   for stats in ("true", "false")}


def test_threads_per_kernel_match_the_source():
    with open(KERNELS_CU) as f:
        src = f.read()
    const = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+Threads) = (\d+);", src)}
    assert G.CUDA_THREADS["row_kernel"] == const["kRowThreads"]
    for k in ("gather_kernel", "scatter_atomic_kernel", "scatter_sorted_kernel"):
        assert G.CUDA_THREADS[k] == const["kEmbThreads"], k
        assert re.search(rf"{k}(<[^>]*>)*<<<\w+, kEmbThreads", src), k
    for k in ("transform_kernel", "transform_bwd_kernel"):
        assert G.CUDA_THREADS[k] == const["kElemThreads"], k
    assert re.search(r"const int threads = 256;\s+const int64_t blocks = \(n \+ threads - 1\) / threads;\s+"
                     r"find_bad_kernel<<<blocks, threads", src)
    assert "bad_record_kernel<<<1, 1," in src
    assert re.search(r"row_kernel<scalar_t, acc_t(, (true|false))?><<<rows, kRowThreads", src)
    with open(os.path.join(ROOT, "csrc", "lce_driver.cpp")) as f:
        driver = f.read()
    # CUDA, low precision: dW accumulated by cuBLAS into fp32 (what cuda_launches models)
    assert re.search(r"h\.is_cuda\(\)\) \{.*?at::mm_out\(dw_acc, z\.t\(\), hc, sdt\);.*?"
                     r"at::addmm_out\(dw_acc, dw_acc, z\.t\(\), hc, sdt\);", driver, re.S)


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 1 barriers, 512 bytes smem, 496 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 392 bytes cmem[0]
"""

CUOBJDUMP = """\
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:24 STACK:0 SHARED:512 LOCAL:0 CONSTANT[0]:496 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Function _Z3barPf:
  REG:255 STACK:48 SHARED:0 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parsers_read_registers_spills_and_shared():
    p = G.parse_ptxas(PTXAS)
    assert p[("sm_80", "_Z3fooPf")] == {"registers": 24, "stack_bytes": 0, "spill_store_bytes": 0,
                                         "spill_load_bytes": 0, "shared_bytes": 512}
    assert p[("sm_90", "_Z3barPf")] == {"registers": 255, "stack_bytes": 48, "spill_store_bytes": 40,
                                         "spill_load_bytes": 36, "shared_bytes": 0}
    c = G.parse_cuobjdump(CUOBJDUMP)
    assert c == {("sm_80", "_Z3fooPf"): {"registers": 24, "stack_bytes": 0, "shared_bytes": 512, "local_bytes": 0},
                 ("sm_90", "_Z3barPf"): {"registers": 255, "stack_bytes": 48, "shared_bytes": 0, "local_bytes": 0}}


def test_short_names():
    assert G.short_name("void tiedkernels::(anonymous namespace)::row_kernel<c10::BFloat16, float>"
                        "(c10::BFloat16*, tiedkernels::(anonymous namespace)::RowParams<float>)") == \
        ("row_kernel", "bf16, fp32")
    assert G.short_name("tiedkernels::(anonymous namespace)::find_bad_kernel(long const*, long, long, bool, "
                        "long, unsigned long long*)") == ("find_bad_kernel", "")


def test_resident_blocks():
    assert G.resident_blocks(24, 512) == 4  # thread-bound: 2048 threads per SM
    assert G.resident_blocks(128, 512) == 1  # register-bound: 65,536 / (128 · 512)
    assert G.resident_blocks(255, 256) == 1
    assert G.resident_blocks(32, 128, shared=100 * 1024) == 2  # shared-memory-bound


# ---------------------------------------------------------------------------------------------
# the cost model


def test_json_has_exactly_the_documented_keys(report):
    j = G.to_json(report)
    assert set(j) == {"kernels", "shapes", "filtered"}
    assert j["filtered"] == []  # build_report without kept: no filtered plan
    assert j["kernels"] and j["shapes"]
    for k in j["kernels"]:
        assert set(k) == {"backend", "kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes"}
    for s in j["shapes"]:
        assert set(s) == {"backend", "shape", "sms", "flops", "hbm_bytes", "atomic_bytes", "roofline_ms", "launches"}
        for x in s["launches"]:
            assert set(x) == {"kernel", "programs", "flops"}
    assert {(s["backend"], s["shape"]) for s in j["shapes"] if s["backend"] == "cuda"} == \
        {("cuda", name) for name, *_ in G.SHAPES}


def test_sums_roofline_and_the_flop_floor(report):
    assert report["shapes"]
    for s in report["shapes"]:
        n, d, v = s["n"], s["d"], s["v"]
        assert s["flops"] == sum(x["flops"] for x in s["launches"])
        assert s["hbm_bytes"] == sum(x["hbm_bytes"] for x in s["launches"])
        assert s["atomic_bytes"] == sum(x["atomic_bytes"] for x in s["launches"])
        want = max(s["flops"] / 989e12, (s["hbm_bytes"] + s["atomic_bytes"]) / 3.35e12) * 1e3
        assert math.isclose(s["roofline_ms"], want, rel_tol=1e-12)
        assert s["flops"] >= 6 * n * d * v, (s["backend"], s["shape"])
        # the essential traffic: h and W read, dh and dW written, once each (bf16)
        assert s["hbm_bytes"] >= 2 * 2 * (n * d + v * d), (s["backend"], s["shape"])
        assert all(x["programs"] >= 1 for x in s["launches"])


def test_cuda_plan_follows_the_chunked_driver():
    for name, n, d, v in G.SHAPES:
        chunk = functional.chunk_rows(n, v, None, d=d, itemsize=2, dw=False)
        L = G.cuda_launches(n, d, v, "bf16")
        rows = [x for x in L if x["kernel"] == "row_kernel"]
        assert len(rows) == math.ceil(n / chunk) and sum(x["programs"] for x in rows) == n, name
        # 6·N·D·V exactly: the minimum, no recompute
        assert sum(x["flops"] for x in L) == 6 * n * d * v, name
        # the fp32 accumulator: written by the first chunk's GEMM, read + written by each later
        # chunk's (cuBLAS, fp32 output), cast once; no tiles, no separate add
        dws = [x for x in L if x["kernel"].startswith("cublas: dW")]
        chunks = math.ceil(n / chunk)
        assert len(dws) == chunks and all(x["kernel"].endswith("(fp32 out)") for x in dws), name
        # dz and h_c read in bf16; fp32 dW written once, then read and written once per later chunk
        assert sum(x["hbm_bytes"] for x in dws) == 2 * n * (v + d) + 4 * v * d * (2 * chunks - 1), name
        assert not [x for x in L if "tile" in x["kernel"] or "zero_" in x["kernel"]], name
    # fp32 inputs: the same GEMMs, fp32 throughout
    L = G.cuda_launches(1000, 64, 3000, "fp32")
    assert not [x for x in L if "tile" in x["kernel"]]
    assert sum(x["flops"] for x in L) == 6 * 1000 * 64 * 3000


def test_llama_head_figures(report):
    s = next(s for s in report["shapes"] if s["backend"] == "cuda" and s["shape"] == "llama3-8b")
    assert (s["n"], s["d"], s["v"]) == (8192, 4096, 128_256)
    assert math.isclose(s["roofline_ms"], 6 * 8192 * 4096 * 128_256 / 989e12 * 1e3)  # compute-bound: 26.1 ms
    assert s["atomic_bytes"] == 0
    assert 25e9 < s["hbm_bytes"] < 30e9  # 28.7 GB: README's breakdown


def test_triton_side_is_wired_or_says_why(report):
    plan, why = G.triton_plan()
    tri = [s for s in report["shapes"] if s["backend"] == "triton"]
    if plan is None:
        assert not tri
        assert any(n.startswith("triton: no launch plan") and why in n for n in report["notes"])
        return
    assert {s["shape"] for s in tri} == {name for name, *_ in G.SHAPES}
    kernels = [k for k in report["kernels"] if k["backend"] == "triton"]
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
    for s in tri:
        direct = plan.launches(s["n"], s["d"], s["v"], "bf16", sms=s["sms"])
        assert [x["kernel"] for x in s["launches"]] == [x["kernel"] for x in direct]
        assert s["flops"] == sum(x["flops"] for x in direct)


def test_cli_text_and_json():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "tiedkernels", "gpu-report", "--json", "--backend", "cuda",
                          "--shape", "1024,512,5000"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    (s,) = j["shapes"]
    assert s["shape"] == "N=1024,D=512,V=5000" and s["flops"] == 6 * 1024 * 512 * 5000
    text = G.format_text(G.build_report(backends=("cuda",)))
    for name, n, d, v in G.SHAPES:
        assert f"cuda · {name} (N={n}, D={d}, V={v}, bf16), 132 SMs" in text
    assert "row_kernel" in text and "roofline" in text


# ---------------------------------------------------------------------------------------------
# gradient filtering: the cuda plan at a kept fraction


def test_filter_tile_matches_the_driver():
    with open(os.path.join(ROOT, "csrc", "lce_driver.cpp")) as f:
        driver = f.read()
    assert re.search(r"constexpr int64_t kFilterTileBytes = 64LL << 20;", driver) and G.FILTER_TILE_BYTES == 64 << 20
    # what the plan models: zeroed dW, aminmax + nonzero per chunk, tiles of index_select, the GEMMs, index_add_
    assert re.search(r"\(chunks == 0 \|\| filtering\) \? at::zeros\(\{v, d\}", driver)
    assert "at::aminmax(dz, 0)" in driver and "at::nonzero(filter_keep(z, thr))" in driver
    assert re.search(r"const int64_t tile = std::max<int64_t>\(1, kFilterTileBytes / std::max<int64_t>\(1, d \* 4\)\);",
                     driver)
    # on CUDA: index_select of the dz columns and W rows, the fp32 dh and dW parts, index_add_ into dW
    for frag in (r"z\.index_select\(1, (it|idx)\)", r"w\.index_select\(0, (it|idx)\)",
                 r"at::addmm_out\(dh32, dh32, zk, wk, sdt\)", r"at::mm_out\(part, zk\.t\(\), hc, sdt\)",
                 r"\.index_add_\(0, (it|idx), part\)"):
        assert re.search(frag, driver), frag


def test_filtered_plan_flops_and_bytes():
    for name, n, d, v in G.SHAPES + (("odd", 1000, 64, 123), ("one tile", 3000, 64, 300_000)):
        for dtype in ("bf16", "fp32"):
            e = G.DTYPE_BYTES[dtype]
            for kept in (1e-4, 0.0123, 0.5):
                k = max(1, math.ceil(kept * v))
                L = G.cuda_filtered_launches(n, d, v, kept, dtype)
                dense = G.cuda_launches(n, d, v, dtype)
                # the logits GEMM dense, dh and dW on the kept columns: 2·N·D·V + 2·(2·N·D·k)
                assert sum(x["flops"] for x in L) == 2 * n * d * v + 4 * n * d * k, (name, kept)
                named = lambda L, p: [x for x in L if x["kernel"].startswith(p)]  # noqa: E731
                assert named(L, "cublas: z = ") == named(dense, "cublas: z = ")
                assert named(L, "row_kernel") == named(dense, "row_kernel")
                chunk = functional.chunk_rows(n, v, None, d=d, itemsize=e, dw=False)
                cs = [min(chunk, n - s) for s in range(0, n, chunk)]
                tile = max(1, (64 << 20) // (4 * d))
                kts = [min(tile, k - k0) for k0 in range(0, k, tile)]
                # per chunk and tile: dz_kᵀ·h_c into an fp32 [kt, D] part, index_add_ of it into dW (atomics)
                assert [x["hbm_bytes"] for x in named(L, "cublas: dW_k")] == \
                    [e * (c * kt + c * d) + 4 * kt * d for c in cs for kt in kts]
                adds = named(L, "aten: index_add_")
                assert [(x["hbm_bytes"], x["atomic_bytes"]) for x in adds] == \
                    [(4 * kt * d + 8 * kt, 4 * kt * d) for _ in cs for kt in kts]
                # dh_c: one tile straight into dh; several: summed in fp32 (bf16) or in place (fp32)
                dh = named(L, "cublas: dh_c")
                if len(kts) == 1:
                    assert [x["hbm_bytes"] for x in dh] == [e * (c * k + k * d + c * d) for c in cs]
                elif e == 2:
                    assert [x["hbm_bytes"] for x in dh] == [e * (c * kt + kt * d) + 8 * c * d for c in cs for kt in kts]
                    assert len(named(L, "filter: dh_c fp32 -> input dtype")) == len(cs)
                else:
                    assert [x["hbm_bytes"] for x in dh] == [e * (c * kt + kt * d) + (1 + (i > 0)) * e * c * d
                                                            for c in cs for i, kt in enumerate(kts)]
                # the gathers: kt columns of each dz row and kt rows of W, read and written, with the indices
                assert [x["hbm_bytes"] for x in named(L, "filter: index_select W")] == \
                    [2 * e * kt * d + 8 * kt for _ in cs for kt in kts]
                assert [x["hbm_bytes"] for x in named(L, "filter: index_select dz")] == \
                    [2 * e * c * kt + 8 * kt for c in cs for kt in kts]
                # dW zeroed once (no chunk writes all of it); the dense plan's tail
                assert [x["hbm_bytes"] for x in named(L, "aten: zero the fp32 dW")] == [4 * v * d]
                assert L[-3:] == dense[-3:] and len(named(L, "filter: nonzero")) == len(cs)
                assert all(x["programs"] >= 1 for x in L)
                assert sum(x["atomic_bytes"] for x in L) == 4 * k * d * len(cs)
    # several tiles at the Llama head (4,096 columns of D=4096 per tile)
    assert len([x for x in G.cuda_filtered_launches(8192, 4096, 128_256, 0.5) if x["kernel"].startswith("cublas: dW_k")]) \
        == 2 * 16
    # every column kept: the dense GEMMs and flops, dW accumulated from the first chunk (it was zeroed)
    L = G.cuda_filtered_launches(512, 64, 123, 1.0)
    assert sum(x["flops"] for x in L) == 6 * 512 * 64 * 123 and not [x for x in L if "index_" in x["kernel"]]
    assert [x["kernel"] for x in L if x["kernel"].startswith("cublas: dW")] == \
        ["cublas: dW += dzᵀ·h_c (fp32 out)"] * math.ceil(512 / functional.chunk_rows(512, 123, None, d=64, itemsize=2))
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="kept fraction"):
            G.cuda_filtered_launches(512, 64, 123, bad)


def test_filtered_llama_head_next_to_the_dense_one():
    rep = G.build_report(backends=("cuda",), kept=G.KEPT_DEFAULT)
    s = next(s for s in rep["filtered"] if s["shape"] == "llama3-8b")
    dense = next(s for s in rep["shapes"] if s["shape"] == "llama3-8b")
    n, d, v = 8192, 4096, 128_256
    k = math.ceil(G.KEPT_DEFAULT * v)
    assert s["kept_columns"] == k and s["flops"] == 2 * n * d * v + 4 * n * d * k
    assert (s["dense_flops"], s["dense_hbm_bytes"], s["dense_roofline_ms"]) == \
        (dense["flops"], dense["hbm_bytes"], dense["roofline_ms"])
    want = max(s["flops"] / 989e12, (s["hbm_bytes"] + s["atomic_bytes"]) / 3.35e12) * 1e3
    assert math.isclose(s["roofline_ms"], want, rel_tol=1e-12)
    # fewer flops than dense; the logits GEMM alone (2·N·D·V) is the floor.  The bytes: more than dense at
    # this fraction (the gathers, the zeroed dW, the scatter-add), fewer at a small one
    assert s["flops"] < dense["flops"] and s["atomic_bytes"] == 2 * 4 * k * d  # index_add_, two chunks
    small = G.filtered_entry("llama3-8b", n, d, v, "bf16", G.H100_SMS, 0.01)
    assert small["hbm_bytes"] < dense["hbm_bytes"] and small["roofline_ms"] < s["roofline_ms"]
    assert 2 * n * d * v / 989e12 * 1e3 <= s["roofline_ms"] < dense["roofline_ms"]
    text = G.format_text(rep)
    assert f"cuda · llama3-8b filtered (N={n}, D={d}, V={v}, bf16, kept {G.KEPT_DEFAULT:g}: {k:,} columns" in text
    assert f"against dense {dense['roofline_ms']:.2f} ms" in text and G.KEPT_SOURCE in text
    # the dense part of the text is what it was without the filter
    plain = G.format_text(G.build_report(backends=("cuda",)))
    assert text.startswith(plain.split("\nnote:")[0].rstrip("\n"))
    assert "gradient filter" not in plain


def test_cli_kept_option():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "tiedkernels", "gpu-report", "--backend", "cuda", *a],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, env=env)
    res = run("--json", "--shape", "1024,512,5000", "--kept", "0.02")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    (f,) = j["filtered"]
    assert set(f) == {"backend", "shape", "sms", "kept", "kept_columns", "flops", "hbm_bytes", "atomic_bytes",
                      "roofline_ms", "dense_flops", "dense_hbm_bytes", "dense_atomic_bytes", "dense_roofline_ms",
                      "launches"}
    assert f["kept"] == 0.02 and f["kept_columns"] == 100 and f["flops"] == 2 * 1024 * 512 * 5000 + 4 * 1024 * 512 * 100
    assert j["shapes"][0]["flops"] == f["dense_flops"] == 6 * 1024 * 512 * 5000
    # the default: the measured fraction
    j = json.loads(run("--json", "--shape", "1024,512,5000").stdout)
    assert j["filtered"][0]["kept"] == G.KEPT_DEFAULT
    assert json.loads(run("--json", "--kept", "none").stdout)["filtered"] == []
    for bad in ("0", "1.5", "x"):
        res = run("--kept", bad)
        assert res.returncode == 2 and "--kept" in res.stderr and "(0, 1]" in res.stderr, bad


# ---------------------------------------------------------------------------------------------
# make gpu-check: the results writer, and the dry run end to end


def test_results_writer(tmp_path):
    from benchmarks import gpu_check as C

    bench = {"benchmarks": [{"extra_info": {"shape": "llama3-8b", "provider": "cuda", "cuda_ms": 40.5, "tflops": 637.2,
                                            "peak_mib": 3100.0, "roofline_ms": 26.11, "device": "X"}},
                            {"extra_info": {"provider": "no timing"}}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    r = C.Runner(str(tmp_path), sys.executable, dry_run=False)
    r.data["env"] = {"gpu": {"name": "NVIDIA X", "sms": 132, "memory_gib": 80.0, "capability": "9.0"}, "python": "3.12"}
    r.data["bench"] = C.read_bench(str(tmp_path / "bench.json"))
    r.record("bench", "ok", 12.0, "1 cases")
    r.record("memcheck-cuda", "failed", 3.0, "ERROR SUMMARY: 2 errors")
    assert not C.write_results(r)
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["ok"] is False and out["bench"] == [{"shape": "llama3-8b", "provider": "cuda", "cuda_ms": 40.5,
                                                    "tflops": 637.2, "peak_mib": 3100.0, "roofline_ms": 26.11,
                                                    "device": "X"}]
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith("## GPU check: NVIDIA X (132 SMs, 80.0 GiB)")
    assert "| llama3-8b | cuda | 40.5 | 637.2 | 3100.0 | 26.11 |" in md
    assert "| memcheck-cuda | failed | 3.0 | ERROR SUMMARY: 2 errors |" in md


def test_gpu_check_dry_run(tmp_path):
    """`make gpu-check DRY_RUN=1`: every GPU step named and skipped, the plumbing run, exit 0."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["step"]: s for s in out["steps"]}
    assert out["dry_run"] and out["ok"]
    for step in ("build", "test", "bench", "memcheck"):
        assert status[step]["status"] == "skipped" and status[step]["command"], step
        assert f"{step}: skipped" in res.stdout
    for step in ("env", "test-collect", "bench-collect", "memcheck-case"):
        assert status[step]["status"] == "ok", status[step]
    assert out["test_collected"] > 100
    assert (tmp_path / "RESULTS.md").read_text().startswith("## GPU check: no GPU (dry run)")


def test_cuda_table_command_fails_on_a_spill(tmp_path, monkeypatch, capsys):
    """What `make cuda-check` runs: the table is written, and any spilling kernel fails the check."""
    row = {"kernel": "row_kernel", "arch": "sm_90", "config": "bf16, fp32, 512 threads", "registers": 128,
           "spill_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 512,
           "threads": 512, "signature": "row_kernel"}
    table = {"sources": [], "sources_sha256": "x", "toolchain": {}, "archs": ["sm_90"], "kernels": [row]}
    monkeypatch.setattr(G, "cuda_table", lambda so, root, ptxas_log: table)
    out = tmp_path / "t.json"
    assert G._table_main(["--so", "x.so", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["kernels"] == [row]
    table["kernels"] = [dict(row, spill_bytes=40, spill_load_bytes=36)]
    with pytest.raises(SystemExit, match="1 kernels spill registers: row_kernel \\(sm_90\\)"):
        G._table_main(["--so", "x.so", "--out", str(out)])
