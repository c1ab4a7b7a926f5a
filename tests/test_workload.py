"""The trained workload for gradient filtering (benchmarks/workload.py) on its tiny setting: the cache,
shapes, dtypes, determinism, the mapping to larger shapes, the frequency-sorted vocabulary and the
kept-column count.  A few seconds (the tiny model trains twice).

The full workload (the cached GPT-2 the benchmarks use; about two minutes to make the first time)
is checked only with TIEDKERNELS_WORKLOAD_FULL=1:
    TIEDKERNELS_WORKLOAD_FULL=1 .venv/bin/python -m pytest tests/test_workload.py -q
"""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from benchmarks import workload as W  # noqa: E402

TINY = W.TINY


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("workload")
    torch.manual_seed(123)  # generation seeds itself: what ran before must not matter
    W.load_raw(TINY, cache=str(d), log=None)
    return str(d)


def test_shapes_dtypes_and_cache(cache, monkeypatch):
    path = W.cache_path(TINY, cache)
    assert os.path.basename(path).startswith(W.VERSION + "-") and os.path.exists(path)
    # a second load reads the cache: generating again would fail here
    monkeypatch.setattr(W, "generate", lambda *a, **k: pytest.fail("the cache was not reused"))
    for split in W.SPLITS:
        h, w, y, meta = W.load_workload(split, config=TINY, cache=cache, return_meta=True, log=None)
        n = h.shape[0]
        assert n > 100 and h.shape == (n, TINY["n_embd"]) and w.shape == (TINY["vocab"], TINY["n_embd"])
        assert y.shape == (n,) and y.dtype == torch.int64
        assert h.dtype == w.dtype == torch.float32 and h.is_contiguous() and w.is_contiguous()
        assert int(y.min()) >= 0 and int(y.max()) < TINY["vocab"]
        assert torch.isfinite(h).all() and torch.isfinite(w).all()
        assert meta["split"] == split and meta["native_shape"] == (n, TINY["n_embd"], TINY["vocab"])
    hb, wb, _ = W.load_workload(config=TINY, cache=cache, dtype=torch.bfloat16, log=None)
    h, w, _ = W.load_workload(config=TINY, cache=cache, log=None)
    assert torch.equal(h, W.load_workload("mid", config=TINY, cache=cache, log=None)[0])  # the default split
    assert hb.dtype == wb.dtype == torch.bfloat16 and torch.equal(hb, h.to(torch.bfloat16))
    with pytest.raises(ValueError, match="split"):
        W.load_workload("test", config=TINY, cache=cache, log=None)
    # another config is another file
    assert W.cache_path(dict(TINY, seed=1), cache) != path


def test_generation_is_deterministic(cache, tmp_path):
    torch.manual_seed(999)
    W.load_raw(TINY, cache=str(tmp_path), log=None)
    for split in W.SPLITS:
        a = W.load_workload(split, config=TINY, cache=cache, log=None)
        b = W.load_workload(split, config=TINY, cache=str(tmp_path), log=None)
        for x, z in zip(a, b):
            assert torch.equal(x, z), split


def test_training_converged_below_the_start(cache):
    raw = W.load_raw(TINY, cache=cache, log=None)
    m = raw["meta"]
    # the tiny model learns something in 20 steps (from ln 512 = 6.24 nats); the cache's own loss
    # figure is the loss of the cached tensors
    h, w, y = W.load_workload("train", config=TINY, cache=cache, log=None)
    loss = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y).item()
    assert abs(loss - m["loss"]["train"]) < 1e-4
    final = m["final_losses"]
    assert loss < 6.1 and sum(final[-5:]) < sum(final[:5])
    # the mid split: the training text when the loss first averaged mid_loss over 10 steps
    assert 10 <= m["mid_step"] <= TINY["steps"]
    assert sum(m["losses"][m["mid_step"] - 10:m["mid_step"]]) / 10 <= TINY["mid_loss"]
    hm, wm, ym = W.load_workload("mid", config=TINY, cache=cache, log=None)
    assert torch.equal(ym, y) and not torch.equal(wm, w)
    assert abs(torch.nn.functional.cross_entropy(hm.double() @ wm.double().T, ym).item() - m["loss"]["mid"]) < 1e-4


def test_mapping_to_a_larger_shape_keeps_the_logits(cache):
    h, w, y = W.load_workload(config=TINY, cache=cache, log=None)
    n, d, v = h.shape[0] + 37, 2 * TINY["n_embd"] + 3, TINY["vocab"] + 123
    hm, wm, ym, meta = W.load_workload(config=TINY, cache=cache, shape=(n, d, v), return_meta=True, log=None)
    assert hm.shape == (n, d) and wm.shape == (v, d) and ym.shape == (n,) and meta["tiled"]
    assert torch.equal(ym[:h.shape[0]], y) and torch.equal(ym[h.shape[0]:], y[:37])
    assert torch.equal(hm[:, :TINY["n_embd"]][:h.shape[0]], h) and not hm[:, TINY["n_embd"]:].any()
    assert torch.equal(wm[:TINY["vocab"], :TINY["n_embd"]], w) and not wm[:, TINY["n_embd"]:].any()
    # the appended rows are perturbed copies of rows that are never a training label
    counts = W.load_raw(TINY, cache=cache, log=None)["train_token_counts"]
    unused = w[counts == 0]
    extra = wm[TINY["vocab"]:, :TINY["n_embd"]]
    nearest = torch.cdist(extra.double(), unused.double()).min(dim=1).values
    assert (nearest <= 0.05 * extra.double().norm(dim=1)).all()
    # the workload's logits, untouched by the padding
    z = h.double() @ w.double().T
    zm = hm.double()[:h.shape[0]] @ wm.double()[:TINY["vocab"]].T
    assert torch.allclose(zm, z, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="smaller"):
        W.load_workload(config=TINY, cache=cache, shape=(10, TINY["n_embd"] - 1, v), log=None)


def test_frequency_sorted_vocabulary(cache):
    h, w, y = W.load_workload(config=TINY, cache=cache, log=None)
    hs, ws, ys = W.load_workload(config=TINY, cache=cache, sort_vocab=True, log=None)
    assert torch.equal(hs, h)
    # the same per-token losses: a renumbering of the vocabulary
    a = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y, reduction="none")
    b = torch.nn.functional.cross_entropy(hs.double() @ ws.double().T, ys, reduction="none")
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # the same rows, renumbered by training-token frequency (most frequent first, ties by id)
    assert torch.equal(ws[ys], w[y])
    counts = W.load_raw(TINY, cache=cache, log=None)["train_token_counts"]
    order = W.frequency_order(counts)
    assert torch.equal(ws, w[order]) and (counts[order][1:] <= counts[order][:-1]).all()
    ties = [j for j in range(1, order.numel()) if counts[order[j]] == counts[order[j - 1]]]
    assert ties and all(order[j] > order[j - 1] for j in ties)


def test_kept_columns_against_a_loop():
    g = torch.Generator().manual_seed(0)
    dz = torch.rand(37, 123, generator=g, dtype=torch.float64) ** 6
    dz[5, 7] = 0.25  # exactly the threshold: not kept (the filter drops |dz| <= t)
    for chunk in (1, 10, 37, 64):
        for tile in (1, 8):
            got = W.kept_columns(dz, chunk, 0.25, tile)
            want = []
            for s in range(0, 37, chunk):
                cols = {j for j in range(123) if any(dz[i, j] > 0.25 for i in range(s, min(s + chunk, 37)))}
                if tile > 1:
                    cols = {j for j in range(123) if j // tile in {c // tile for c in cols}}
                want.append(len(cols))
            assert got == want, (chunk, tile)
    # grad_logits: softmax minus one-hot, rows summing to 0
    h = torch.randn(9, 5, generator=g)
    w = torch.randn(123, 5, generator=g)
    y = torch.randint(0, 123, (9,), generator=g)
    dz = W.grad_logits(h, w, y)
    want = torch.softmax(h.double() @ w.double().T, -1) - torch.nn.functional.one_hot(y, 123).double()
    assert torch.equal(dz, want) and dz.sum(1).abs().max() < 1e-12


def test_kept_table_tiny(cache):
    t = W.kept_table("train", chunks=(16, 64), n_rows=128, config=TINY, cache=cache, log=None)
    assert t["V"] == TINY["vocab"] and t["tokens"] == 128
    rows = {(r["threshold"], r["chunk_rows"]): r for r in t["rows"]}
    for name in W.THRESHOLDS:
        small, big = rows[(name, 16)], rows[(name, 64)]
        # at least the chunk's distinct labels, never more than V; bigger chunks keep at least as much
        assert 1 <= small["kept_mean"] <= big["kept_mean"] <= TINY["vocab"]
    # a smaller threshold keeps at least as much, and drops less of each row's gradient
    assert rows[("2^-28 fp32 auto", 64)]["kept_mean"] >= rows[("2^-8", 64)]["kept_mean"]
    assert 0 <= rows[("2^-28 fp32 auto", 64)]["dropped_mass_per_row"] <= rows[("2^-8", 64)]["dropped_mass_per_row"] < 2
    # dropped mass against a loop: Σ over the columns no row of the chunk keeps, per row
    g = torch.Generator().manual_seed(1)
    dz = torch.rand(10, 7, generator=g, dtype=torch.float64) ** 4
    want = sum(dz[i, j].item() for s in range(0, 10, 4) for j in range(7)
               if all(dz[r, j] <= 0.3 for r in range(s, min(s + 4, 10))) for i in range(s, min(s + 4, 10))) / 10
    assert abs(W.dropped_mass(dz, 4, 0.3) - want) < 1e-12
    assert "2^-12 bf16 auto" in W.format_table(t)


@pytest.mark.skipif(os.environ.get("TIEDKERNELS_WORKLOAD_FULL") != "1",
                    reason="the full workload takes minutes to make the first time: TIEDKERNELS_WORKLOAD_FULL=1")
def test_full_workload_and_the_cost_models_default():
    from tiedkernels import gpu_report as G

    h, w, y, meta = W.load_workload(return_meta=True)
    assert w.shape == (W.CONFIG["vocab"], W.CONFIG["n_embd"]) and h.shape[1] == W.CONFIG["n_embd"]
    assert meta["split"] == "mid" and abs(meta["loss"]["mid"] - W.CONFIG["mid_loss"]) < 0.3
    assert meta["loss"]["train"] < 0.5  # converged on the training text (near-memorized)
    t = W.kept_table(G.KEPT_WORKLOAD["split"], chunks=(G.KEPT_WORKLOAD["chunk_rows"],), n_rows=8192, log=None)
    (r,) = [r for r in t["rows"] if r["threshold"] == G.KEPT_WORKLOAD["threshold"]]
    assert abs(r["kept_fraction"] - G.KEPT_DEFAULT) < 5e-4, (r, G.KEPT_DEFAULT)


def test_grad_filter_curve_script_runs(tmp_path):
    """benchmarks/grad_filter_curve.py end to end on two steps: the figures it writes, and the run that
    turns the filter on at step 1 identical to the exact run until then."""
    import json

    from benchmarks import grad_filter_curve as C

    if not C.patch_supports_filter():
        pytest.fail("tiedkernels.hf.patch has no grad_filter option")
    assert C.main(["--steps", "2", "--grad-filter", "2^-8", "--filter-from", "0", "--filter-from", "1",
                   "--probe-every", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "grad_filter_curve.json").read_text())
    assert (tmp_path / "grad_filter_curve.png").stat().st_size > 10_000
    assert not res["stand_in"] and [r["label"] for r in res["runs"]] == \
        ["exact", "grad_filter=2^-8", "grad_filter=2^-8 from step 1"]
    exact = res["runs"][0]["losses"]
    for s, r in zip(res["summary"], res["runs"][1:]):
        assert s["identical_until_filter_on"] and r["losses"][0] == exact[0]  # the loss itself is exact
        assert s["max_abs_diff"] == max(abs(a - b) for a, b in zip(r["losses"], exact))
        assert 0 < s["kept_fraction_last"] <= 1 and s["threshold_value"] == 2.0 ** -8
        assert all(0 <= p["dropped_mass_per_row"]["2^-8"] < 2 for p in r["probes"])
    with pytest.raises(SystemExit):
        C.main(["--filter-from", "5", "--steps", "2"])
