"""benchmarks/grad_filter_bench.py's RESULTS.md section: rendered between its markers (a second write
replaces it), float32 and bfloat16 runs made separately merged into one section, the figures as given,
the training-curve part from the real grad_filter_curve.json; and one quick synthetic run end to end."""

import json
import os

import pytest

from benchmarks import grad_filter_bench as G
from benchmarks import report as R

HERE = os.path.dirname(os.path.abspath(__file__))
CURVE = os.path.join(os.path.dirname(HERE), "benchmarks", "grad_filter_curve.json")


def fake(dtype="float32", shape=(2048, 1024, 32768), x_exact=1.353, x_filter=0.694, amx=False):
    gemm3 = 0.100
    t = "auto" if dtype == "bfloat16" else str(2.0 ** -12)
    name = f"filter={t}"
    v = shape[2]
    kept = [1540, 1835, 1500, 1400]
    return {"shape": list(shape), "dtype": dtype, "source": "workload", "split": "mid", "chunk_rows": 512,
            "rounds": 5, "gemm3_dtype": "float32",
            "median_s": {"gemm3": gemm3, "exact": gemm3 * x_exact, name: gemm3 * x_filter},
            "x_gemm3": {"gemm3": 1.0, "exact": x_exact, name: x_filter},
            "kept": {t: {"threshold": 2.0 ** -12, "kept_per_chunk": kept,
                         "kept_fraction_mean": sum(kept) / len(kept) / v, "kept_fraction_max": max(kept) / v}},
            "checks": {name: {"loss_bit_identical": True, "dh_max_abs_change": 0.0125, "dh_max_abs": 1.0,
                              "dw_max_abs_change": 0.5, "dw_max_abs": 2.0}},
            "machine": {"cpu": "Test CPU 9000", "cores": 2,
                        "flags": {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": amx}},
            "torch": "2.13.0+cpu", "threads": 2, "date": "2026-12-06T20:00:00+00:00",
            "load_start": [1.5, 1.2, 1.0], "load_end": [1.75, 1.3, 1.1], "quick": False,
            "command": f"python -m benchmarks.grad_filter_bench --dtypes {dtype}"}


def section_of(text):
    a = text.index(G.BEGIN)
    return text[a:text.index(G.END) + len(G.END)]


def test_section_written_replaced_and_merged(tmp_path):
    out = str(tmp_path)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nbefore\n")
    G.write_results([fake("float32", x_exact=1.353)], out, CURVE)
    G.write_results([fake("bfloat16", x_exact=1.536, x_filter=0.626)], out, CURVE)
    first = md.read_text()
    # the same float32 case again, other figures: replaced in the json and the section, nothing appended
    G.write_results([fake("float32", x_exact=1.425, x_filter=0.856)], out, CURVE)
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\nbefore\n")
    for s in (text, first):
        assert s.count(G.BEGIN) == 1 and s.count(G.END) == 1
        assert s.count("## Gradient filtering (grad_filter=), fused loss forward + backward") == 1
    assert len(text) == len(first)  # the same figures' widths: replaced, not appended
    sec = section_of(text)
    assert "**N=2048 D=1024 V=32768 float32**" in sec and "**N=2048 D=1024 V=32768 bfloat16**" in sec
    assert sec.index("V=32768 float32") < sec.index("V=32768 bfloat16")
    assert "| exact | 142.5 | 1.425 |" in sec and "1.353" not in sec  # the newer float32 run
    assert "| filter=2^-12 | 85.6 | 0.856 | 1,569 (1,835) of 32,768: 4.79% (5.60%) | yes | 0.0125 | 0.25 |" in sec
    assert "| exact | 153.6 | 1.536 |" in sec and "| filter=auto (= 2^-12) | 62.6 | 0.626 |" in sec
    assert "| gemm3 (fp32) | 100.0 | 1.000 | – | – | – | – |" in sec
    assert "the bf16 floor" in sec and "Test CPU 9000, 2 cores (avx2)" in sec
    assert "`python -m benchmarks.grad_filter_bench --dtypes float32`" in sec
    assert "`python -m benchmarks.grad_filter_bench --dtypes bfloat16`" in sec
    raw = json.loads((tmp_path / G.RAW_NAME).read_text())
    assert [(r["dtype"], r["x_gemm3"]["exact"]) for r in raw] == [("float32", 1.425), ("bfloat16", 1.536)]
    # --from-json re-renders the same section without measuring
    md.write_text(text.replace(sec, G.BEGIN + "\nstale\n" + G.END))
    G.main(["--from-json", "--out", out, "--curve", CURVE])
    assert md.read_text() == text


def test_curve_part_from_the_real_json(tmp_path):
    curve = json.load(open(CURVE))
    G.render(str(tmp_path), CURVE, [fake("float32")])
    G.render(str(tmp_path), CURVE, [fake("float32")])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count(G.BEGIN) == 1 and text.count(G.END) == 1
    assert text.count("![grad_filter training curves](plots/grad_filter_curve.png)") == 1
    assert f"`{curve['command']}`" in text and curve["date"] in text
    for s in curve["summary"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {s['run']} |"))
        assert f"{s['final_loss_mean_last_10pct']:.3f} ({s['exact_final_loss_mean_last_10pct']:.3f})" in row
        assert f"{s['heldout_loss']:.3f} ({s['exact_heldout_loss']:.3f})" in row
        assert f"{s['mean_abs_diff']:.3f}" in row and f"{100 * s['kept_fraction_mean']:.2f}%" in row


def test_bf16_floor_note_only_when_it_applied(tmp_path):
    assert "the bf16 floor" not in G.section([fake("float32")])
    assert "the bf16 floor" not in G.section([fake("bfloat16", amx=True)])
    assert "the bf16 floor" in G.section([fake("bfloat16")])


def test_write_marked_section(tmp_path):
    p = str(tmp_path / "f.md")
    R.write_marked_section(p, "<b>", "<e>", "<b>\none\n<e>")
    with open(p, "a") as f:
        f.write("after\n")
    R.write_marked_section(p, "<b>", "<e>", "<b>\ntwo\n<e>")
    assert open(p).read() == "\n\n<b>\ntwo\n<e>\nafter\n"


def test_quick_run_end_to_end(tmp_path):
    out = str(tmp_path)
    res = G.main(["--quick", "--synthetic", "--rounds", "1", "--dtypes", "float32", "--write-results", "--out", out])
    assert [tuple(r["shape"]) for r in res] == list(G.QUICK_SHAPES)
    r = res[0]
    assert set(r["machine"]["flags"]) == set(G.ISA_FLAGS) and r["threads"] >= 1 and r["date"]
    assert len(r["load_start"]) == 3 and len(r["load_end"]) == 3
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count(G.BEGIN) == 1 and "Quick run" in text
    assert f"| exact | {G._ms(r['median_s']['exact'])} | {r['x_gemm3']['exact']:.3f} |" in text
    assert json.loads((tmp_path / G.RAW_NAME).read_text())[0]["shape"] == list(G.QUICK_SHAPES[0])


def test_quick_grpo_job(tmp_path):
    """--job grpo times grpo_loss exact and filtered; its kept columns come from the pass itself; the
    filtered loss is the exact one."""
    out = str(tmp_path / "r.json")
    res = G.main(["--quick", "--synthetic", "--rounds", "1", "--dtypes", "float32", "--job", "grpo", "--json", out])
    r = res[0]
    assert r["job"] == "grpo" and set(r["median_s"]) == {"gemm3", "exact", "filter=auto", "filter=0.000244140625",
                                                        "filter=0.001"}
    n, d, v = G.QUICK_SHAPES[0]
    kept = r["kept"]["0.001"]["kept_per_chunk"]
    assert len(kept) == -(-n // r["chunk_rows"]) and 0 < max(kept) < v
    assert all(c["loss_bit_identical"] for c in r["checks"].values())
    assert json.loads(open(out).read())[0]["job"] == "grpo"
    with pytest.raises(SystemExit):
        G.main(["--job", "grpo", "--write-results", "--out", str(tmp_path)])


def test_quick_needs_out():
    with pytest.raises(SystemExit):
        G.main(["--quick", "--write-results"])


def test_report_rewrite_keeps_marked_sections(tmp_path):
    """benchmarks.report rewrites RESULTS.md from results.json: the sections that rl_report and
    grad_filter_bench own (between their markers) survive it unchanged."""
    from benchmarks import report as R

    md = tmp_path / "RESULTS.md"
    rl = "<!-- rl-objectives:begin -->\n## RL\n\n| a | 1.5 |\n<!-- rl-objectives:end -->"
    gf = "<!-- grad-filter:begin -->\n## Gradient filtering\n\nx 0.702\n<!-- grad-filter:end -->"
    md.write_text("# old report\n\nold table\n\n" + rl + "\n\n" + gf + "\n")
    R.write({"quick": True}, str(md), str(tmp_path / "plots"))
    text = md.read_text()
    assert "old table" not in text and text.startswith("# Benchmark results")
    assert text.count(rl) == 1 and text.count(gf) == 1
    assert text.index(rl) < text.index(gf)
    R.write({"quick": True}, str(md), str(tmp_path / "plots"))  # a second rewrite adds nothing
    assert md.read_text() == text
