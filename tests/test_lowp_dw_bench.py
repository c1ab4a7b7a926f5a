"""benchmarks/lowp_dw_bench.py runs end to end on a small shape: every path this build has, one
chunk and several, and each run's loss and gradients agree with the single-chunk step."""

from benchmarks import lowp_dw_bench as B


def test_quick_run_checks_every_path():
    res = B.main(["--quick"])
    paths = B.paths_here()
    assert set(res) == {f"{c}, {p}" for p in paths for c in ("1 chunk", "4 chunks")}
    for name, r in res.items():
        assert r["median_s"] > 0
        # the same loss (fp32 sums over the same bf16 logits) and gradients within bf16 rounding
        assert r["loss_rel"] < 1e-6, (name, r)
        assert r["dh_rel"] < 2 ** -7 and r["dw_rel"] < 2 ** -7, (name, r)
