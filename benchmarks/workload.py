"""A trained model's softmax to measure gradient filtering on: ``load_workload() -> (hidden, weight, labels)``.

Random logits are the wrong input for a filter that skips the vocabulary columns whose gradient is
negligible: their softmax is nearly flat, and every column stays.  This module trains the demo's
GPT-2 (``tiedkernels.hf.demo``: its byte-level BPE tokenizer trained on ``tiedkernels/data/hf_corpus.txt``
and its ``gpt2_config``, n_embd=128, 2 layers, 4 heads; a 4,096-row vocabulary, see below) once with a
fixed seed, on the stock transformers model (no tiedkernels op makes it), and caches the final hidden
states (the ``ln_f`` output the tied head multiplies), the next-token labels and the tied weight
``W [V, D]`` of three splits:

* ``train``: the first 90% of the corpus, after 1,500 AdamW steps (cosine schedule) when the training
  loss has converged: the model has nearly memorized the text (a loss far below a real LLM's), a peaked
  softmax, the filter's best case;
* ``mid``: the same text and the model's weight at the first step where the training loss averaged
  2.5 nats over 10 steps (a real LLM's training loss, not yet memorized): the realistic case;
* ``heldout``: the last 10% of the corpus and ``tiedkernels/data/demo_corpus.txt``, text the converged
  model never saw (a loss far above a real LLM's: it is confidently wrong).

    hidden, weight, labels = load_workload()                   # "mid", fp32
    hidden, weight, labels = load_workload("train", dtype=torch.bfloat16)
    hidden, weight, labels = load_workload(shape=(2048, 1024, 32768))   # mapped to a report shape

The default split is ``mid``: the converged model has nearly memorized a 38 kB corpus (0.16 nats),
which no real training batch looks like, and its softmax is the filter's best case.

The cache is ``build/workload/<VERSION>-<config hash>.pt`` (``TIEDKERNELS_WORKLOAD_DIR`` overrides the
folder); the first call makes it (a few minutes on two cores: ``transformers`` and ``tokenizers``, as
``make install hf-deps`` installs them, and nothing else), later calls load it.  The same seed gives
the same tensors on the same machine and thread count (float summation orders differ elsewhere).
``python -m benchmarks.workload`` makes it if needed and prints the kept-vocabulary tables (``--json
PATH`` writes them).

The vocabulary.  The shipped corpus is small (38 kB, about 9,000 tokens): its tokenizer learns 4,018
tokens whatever vocabulary size it is asked for, so the demo's 16,384-row model has 12,366 rows that
are never an input nor a label, columns any filter drops for free.  The workload's model has 4,096 rows
instead (4x cheaper to train, and a vocabulary sized to what the tokenizer learned); about half of them
are still never a label (BPE's intermediate merges), which is how real vocabularies' long tails look.

Mapping to the report shapes (N, D, V) = (2048, 1024, 32768), (1024, 1024, 131072), (4096, 512, 50257):
``shape=(n, d, v)`` takes the split's first ``n`` tokens (tiled when the split has fewer;
``meta["tiled"]`` says so), zero-pads ``D`` (the logits are exactly the workload's) and appends
``v - V`` vocabulary rows, seeded 1%-perturbed copies of rows that are never a training label.  So
the number of *kept columns per chunk* is the workload's, and the kept *fraction* falls as 1/V: the
optimistic extrapolation, which assumes that a larger vocabulary only adds tokens the text does not
use.  The tables give the kept count per chunk, its fraction of the workload's V (no extrapolation:
the conservative figure), of the tokens used as training labels, and of each report shape's V.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSION = "1"

# The demo's model (tiedkernels.hf.demo: gpt2_config defaults, 4,096 rows), trained with AdamW and a
# cosine schedule until the training loss stops falling.
CONFIG = {
    "vocab": 4096, "n_embd": 128, "n_layer": 2, "n_head": 4, "seq": 128, "batch": 8,
    "steps": 1500, "lr": 1e-2, "warmup": 50, "seed": 0, "heldout": 0.1, "mid_loss": 2.5,
}
# A setting that trains in a couple of seconds (tests).
TINY = {**CONFIG, "vocab": 512, "n_embd": 32, "n_layer": 1, "n_head": 2, "seq": 32, "batch": 4, "steps": 20,
        "mid_loss": 6.12}

REPORT_SHAPES = ((2048, 1024, 32768), (1024, 1024, 131072), (4096, 512, 50257))
# Chunk rows of the report's cases: functional.chunk_rows' default (2·D/itemsize rows: 512 for fp32
# and 1024 for bf16 at D=1024; 256 and 512 at D=512), and the one-chunk bf16 rule of the compiled CPU
# backend (N=2048 and N=1024 at D=1024 run as one chunk).
CHUNK_ROWS = (256, 512, 1024, 2048, 4096)
SPLITS = ("train", "mid", "heldout")


def cache_dir():
    return os.environ.get("TIEDKERNELS_WORKLOAD_DIR") or os.path.join(ROOT, "build", "workload")


def config_key(config):
    blob = json.dumps({"version": VERSION, **config}, sort_keys=True).encode()
    return f"{VERSION}-{hashlib.sha256(blob).hexdigest()[:12]}"


def cache_path(config=None, cache=None):
    config = CONFIG if config is None else config
    return os.path.join(cache or cache_dir(), config_key(config) + ".pt")


# ---------------------------------------------------------------------------------------------
# generation


def _tokens(config, tmp):
    from tiedkernels.hf import demo

    tok_path = demo.train_tokenizer(tmp, config["vocab"])
    ids, tok = demo.load_ids(tok_path)
    with open(os.path.join(os.path.dirname(demo.CORPUS), "demo_corpus.txt"), encoding="utf-8") as f:
        extra = torch.tensor(tok.encode(f.read()).ids, dtype=torch.long)
    cut = int(round(ids.numel() * (1 - config["heldout"])))
    return ids[:cut], torch.cat([ids[cut:], extra]), tok.get_vocab_size()


def _hidden(model, ids, seq):
    """Final hidden states of every position of ``ids`` (windows of ``seq`` tokens, each predicting
    the next token), and those next tokens."""
    hs, ys = [], []
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, seq):
            x = ids[s:s + seq + 1]
            if x.numel() < 2:
                break
            h = model.transformer(input_ids=x[:-1].view(1, -1)).last_hidden_state[0]
            hs.append(h)
            ys.append(x[1:])
    return torch.cat(hs).contiguous(), torch.cat(ys).contiguous()


def generate(config=None, path=None, log=print):
    """Train the model and write the cache file; returns its contents."""
    import tempfile

    from tiedkernels.hf import demo

    config = dict(CONFIG if config is None else config)
    path = path or cache_path(config)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiedkernels-workload-") as tmp:
        train_ids, held_ids, learned = _tokens(config, tmp)
    torch.manual_seed(config["seed"])
    model = demo.gpt2_model(demo.gpt2_config(config["vocab"], n_embd=config["n_embd"], n_layer=config["n_layer"],
                                             n_head=config["n_head"], n_positions=max(256, config["seq"])))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    steps, warm = config["steps"], config["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(config["seed"])
    seq, batch = config["seq"], config["batch"]
    n = train_ids.numel() - seq - 1
    losses = []
    mid = None
    for i in range(steps):
        starts = torch.randint(0, n, (batch,), generator=g)
        x = torch.stack([train_ids[s:s + seq] for s in starts])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        recent = losses[-10:]
        if mid is None and len(recent) == 10 and sum(recent) / 10 <= config["mid_loss"]:
            # the "mid" split: the training text when the model's loss is a real LLM's, not yet memorized
            model.eval()
            h_mid, y_mid = _hidden(model, train_ids, seq)
            mid = {"hidden": h_mid, "labels": y_mid, "weight": model.transformer.wte.weight.detach().clone(),
                   "step": i + 1}
            model.train()
        if log and (i % max(1, steps // 8) == 0 or i == steps - 1):
            log(f"workload: step {i:>4}/{steps}  loss {losses[-1]:.4f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    h_train, y_train = _hidden(model, train_ids, seq)
    h_held, y_held = _hidden(model, held_ids, seq)
    weight = model.transformer.wte.weight.detach().clone().contiguous()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "the head is not tied"
    if mid is None:
        raise RuntimeError(f"workload: the training loss never reached {config['mid_loss']} nats (mid_loss)")
    data = {
        "train": {"hidden": h_train, "labels": y_train, "weight": weight},
        "heldout": {"hidden": h_held, "labels": y_held, "weight": weight},
        "mid": mid,
    }
    with torch.no_grad():
        loss = {k: torch.nn.functional.cross_entropy(d["hidden"] @ d["weight"].T, d["labels"]).item()
                for k, d in data.items()}
    counts = torch.bincount(train_ids, minlength=config["vocab"])
    data.update({
        "train_token_counts": counts,
        "meta": {"version": VERSION, "config": config, "learned_vocab": learned, "mid_step": mid["step"],
                 "used_vocab": int((counts > 0).sum()), "final_losses": losses[-20:], "losses": losses, "loss": loss,
                 "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                 "torch": str(torch.__version__)},
    })
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    torch.save(data, tmp_path)
    os.replace(tmp_path, path)  # atomic: a concurrent reader sees the old file or the whole new one
    if log:
        log(f"workload: wrote {path} in {data['meta']['seconds']:.0f} s; mean loss train {loss['train']:.3f}, "
            f"heldout {loss['heldout']:.3f}, mid (step {mid['step']}) {loss['mid']:.3f} nats")
    return data


def load_raw(config=None, cache=None, regenerate=False, log=print):
    """The cache file's contents, made first if missing."""
    config = CONFIG if config is None else config
    path = cache_path(config, cache)
    if regenerate or not os.path.exists(path):
        return generate(config, path, log=log)
    return torch.load(path, weights_only=True)


def frequency_order(counts):
    """A permutation of the vocabulary: the most frequent training labels first (ties by id)."""
    return torch.argsort(counts, descending=True, stable=True)


def load_workload(split="mid", *, shape=None, dtype=torch.float32, sort_vocab=False, config=None, cache=None,
                  regenerate=False, return_meta=False, log=print):
    """``(hidden [N, D], weight [V, D], labels [N])`` of the trained model (see the module docstring).

    ``shape=(n, d, v)`` maps it to that shape (rows tiled if the split is shorter, D zero-padded, extra
    vocabulary rows copied from the never-learned tokens' rows); ``sort_vocab`` renumbers the vocabulary
    by training-label frequency (most frequent first); ``return_meta`` adds a dict of facts."""
    if split not in SPLITS:
        raise ValueError(f"workload: split must be one of {', '.join(SPLITS)}, got {split!r}")
    raw = load_raw(config, cache, regenerate, log)
    h, y, w = raw[split]["hidden"], raw[split]["labels"], raw[split]["weight"]
    meta = dict(raw["meta"], split=split, tiled=False, native_shape=(h.shape[0], w.shape[1], w.shape[0]))
    counts = raw["train_token_counts"]
    if sort_vocab:
        order = frequency_order(counts)
        w = w[order]
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        y = inv[y]
        counts = counts[order]
    if shape is not None:
        n, d, v = (int(x) for x in shape)
        N, D = h.shape
        V = w.shape[0]
        if d < D or v < V:
            raise ValueError(f"workload: shape {shape} is smaller than the workload's (D={D}, V={V}); "
                             "only larger D and V are mapped")
        if n > N:
            meta["tiled"] = True
            reps = -(-n // N)
            h, y = h.repeat(reps, 1), y.repeat(reps)
        h, y = h[:n], y[:n]
        if d > D:
            h = torch.nn.functional.pad(h, (0, d - D))
            w = torch.nn.functional.pad(w, (0, d - D))
        if v > V:
            unused = (counts == 0).nonzero().flatten()  # never a training label
            if unused.numel() == 0:
                raise ValueError("workload: no unused vocabulary rows to extend V from")
            g = torch.Generator().manual_seed(1234)
            pick = unused[torch.randint(0, unused.numel(), (v - V,), generator=g)]
            extra = w[pick] * (1 + 0.01 * torch.randn(v - V, w.shape[1], generator=g))
            if d > D:
                extra[:, D:] = 0
            w = torch.cat([w, extra])
        meta["shape"] = (n, d, v)
    h = h.to(dtype).contiguous()
    w = w.to(dtype).contiguous()
    y = y.contiguous()
    return (h, w, y, meta) if return_meta else (h, w, y)


# ---------------------------------------------------------------------------------------------
# the kept vocabulary


def grad_logits(hidden, weight, labels):
    """``softmax(h Wᵀ) - onehot(y)`` in fp64: the gradient of each token's loss with respect to its
    logits.  The mean loss's ``dz`` is this times ``s = 1/n_tokens`` in every row, the scale that
    ``grad_filter``'s threshold is relative to."""
    z = hidden.double() @ weight.double().T
    p = torch.softmax(z, dim=-1)
    p[torch.arange(labels.numel()), labels] -= 1
    return p


def kept_masks(dz, chunk, threshold, tile=1):
    """Per chunk of ``chunk`` rows: (start row, the [V] bool mask of the vocabulary columns that
    ``grad_filter=threshold`` keeps: |dz_ij| > threshold for some row i of the chunk, ``dz`` in units of
    the row's gradient scale as ``grad_logits`` gives it).  ``tile`` > 1: whole tiles of that many
    consecutive columns, a tile kept if any of its columns is (the last tile may be partial)."""
    for s in range(0, dz.shape[0], chunk):
        col = dz[s:s + chunk].abs().amax(dim=0) > threshold
        if tile > 1:
            pad = (-col.numel()) % tile
            kept = torch.nn.functional.pad(col, (0, pad)).view(-1, tile).any(dim=1)
            col = kept.repeat_interleave(tile)[:col.numel()]
        yield s, col


def kept_columns(dz, chunk, threshold, tile=1):
    """Per chunk of ``chunk`` rows: the number of vocabulary columns ``grad_filter=threshold`` keeps."""
    return [int(col.sum()) for _, col in kept_masks(dz, chunk, threshold, tile)]


def dropped_mass(dz, chunk, threshold, tile=1):
    """The mean over rows of Σ_j |dz_ij| over the columns the row's chunk leaves out: how much of a row's
    gradient (in units of its scale; at most 2) the filter drops.  It bounds the error of the row's
    ``dh`` (at most that times max_j |W_jk| per element)."""
    tot = 0.0
    for s, col in kept_masks(dz, chunk, threshold, tile):
        tot += dz[s:s + chunk][:, ~col].abs().sum().item()
    return tot / dz.shape[0]


# grad_filter thresholds, in units of each row's gradient scale (for a mean loss: |dz_ij| * n_tokens,
# i.e. |softmax - onehot|): bf16's spacing next to 1 (2^-8) and half of it, and the "auto" defaults
# (eps(dtype) / 32) for bf16, fp16 and fp32.
THRESHOLDS = {"2^-8": 2.0 ** -8, "2^-9": 2.0 ** -9, "2^-12 bf16 auto": 2.0 ** -12, "2^-15 fp16 auto": 2.0 ** -15,
              "2^-28 fp32 auto": 2.0 ** -28}


def kept_table(split="mid", chunks=CHUNK_ROWS, n_rows=4096, sort_vocab=False, tile=1, config=None, cache=None,
               log=print):
    """The kept-column figures on ``n_rows`` tokens of a split (dz of their mean loss)."""
    h, w, y, meta = load_workload(split, config=config, cache=cache, sort_vocab=sort_vocab, return_meta=True,
                                  log=log)
    n = min(n_rows, h.shape[0])
    h, y = h[:n], y[:n]
    dz = grad_logits(h, w, y)
    V = w.shape[0]
    used = meta["used_vocab"]
    learned = meta["learned_vocab"]
    loss = torch.nn.functional.cross_entropy(h.double() @ w.double().T, y).item()
    rows = []
    for name, t in THRESHOLDS.items():
        per_row = (dz.abs() > t).sum(dim=1).double().mean().item()  # columns one row alone keeps
        for c in chunks:
            if c > n:
                continue
            per = kept_columns(dz, c, t, tile)
            mean = sum(per) / len(per)
            rows.append({"threshold": name, "threshold_value": t, "chunk_rows": c, "chunks": len(per),
                         "kept_per_row": per_row, "dropped_mass_per_row": dropped_mass(dz, c, t, tile),
                         "kept_mean": mean, "kept_max": max(per), "kept_fraction": mean / V,
                         "kept_fraction_of_used": min(1.0, mean / used),
                         "kept_fraction_at_report_v": {str(v): mean / v for _, _, v in REPORT_SHAPES}})
    return {"split": split, "tokens": n, "V": V, "D": w.shape[1], "learned_vocab": learned,
            "used_vocab": meta["used_vocab"], "loss": loss, "sort_vocab": sort_vocab, "tile": tile, "rows": rows}


def report_chunks(n, d, v):
    """The fused loss's rows per chunk at a report shape: functional.chunk_rows' default for fp32 and
    for bf16 (with the compiled CPU backend's one-chunk bf16 rule, which computes dW)."""
    from tiedkernels import functional

    return {"float32": functional.chunk_rows(n, v, None, d=d, itemsize=4, dw=True),
            "bfloat16": functional.chunk_rows(n, v, None, d=d, itemsize=2, dw=True)}


def mapped_table(split="mid", shapes=REPORT_SHAPES, thresholds=("2^-8", "2^-12 bf16 auto", "2^-28 fp32 auto"),
                 config=None, cache=None, log=print):
    """The kept columns per chunk of the workload mapped to each report shape (``load_workload(shape=...)``),
    at that shape's fp32 and bf16 chunk sizes: what a benchmark on the mapped workload sees."""
    out = []
    for n, d, v in shapes:
        h, w, y, meta = load_workload(split, shape=(n, d, v), config=config, cache=cache, return_meta=True, log=log)
        d0 = meta["native_shape"][1]  # the padded columns are zeros: the logits need only the first d0
        dz = grad_logits(h[:, :d0], w[:, :d0], y)
        for dtype, c in report_chunks(n, d, v).items():
            for name in thresholds:
                per = kept_columns(dz, c, THRESHOLDS[name])
                out.append({"shape": [n, d, v], "dtype": dtype, "chunk_rows": c, "threshold": name,
                            "kept_mean": sum(per) / len(per), "kept_fraction": sum(per) / len(per) / v,
                            "tiled": meta["tiled"]})
        del dz
    return out


def format_table(t):
    out = [f"split {t['split']}: {t['tokens']} tokens, mean loss {t['loss']:.3f} nats; V={t['V']} "
           f"(learned {t['learned_vocab']}, used as train labels {t['used_vocab']}), D={t['D']}"
           + (f"; tiles of {t['tile']} columns" if t["tile"] > 1 else "")
           + ("; frequency-sorted vocabulary" if t["sort_vocab"] else "")]
    vs = [str(v) for _, _, v in REPORT_SHAPES]
    out.append(f"  {'threshold':<16} {'rows/chunk':>10} {'chunks':>6} {'kept (mean)':>11} {'max':>6} "
               f"{'of V':>7} {'of used':>10} {'per row':>7} {'dropped':>8} " + " ".join(f"{'of ' + v:>9}" for v in vs))
    for r in t["rows"]:
        out.append(f"  {r['threshold']:<16} {r['chunk_rows']:>10} {r['chunks']:>6} {r['kept_mean']:>11.1f} "
                   f"{r['kept_max']:>6} {100 * r['kept_fraction']:>6.2f}% {100 * r['kept_fraction_of_used']:>9.2f}% {r['kept_per_row']:>7.1f} "
                   f"{r['dropped_mass_per_row']:>8.1e} "
                   + " ".join(f"{100 * r['kept_fraction_at_report_v'][v]:>8.2f}%" for v in vs))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.workload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--regenerate", action="store_true", help="train again even if the cache exists")
    ap.add_argument("--tiny", action="store_true", help="the tiny setting the tests use")
    ap.add_argument("--json", help="write the kept-vocabulary figures to this file")
    ap.add_argument("--rows", type=int, default=4096, help="tokens of each split to measure on (default 4096)")
    a = ap.parse_args(argv)
    config = TINY if a.tiny else CONFIG
    raw = load_raw(config, regenerate=a.regenerate)
    m = raw["meta"]
    print(f"workload {config_key(config)}: GPT-2 n_embd={config['n_embd']} n_layer={config['n_layer']} "
          f"V={config['vocab']}, {config['steps']} AdamW steps of {config['batch']}x{config['seq']} tokens, "
          f"seed {config['seed']}; made in {m['seconds']:.0f} s on {m['threads']} threads; last training losses "
          f"{min(m['final_losses']):.3f}..{max(m['final_losses']):.3f}; eval loss train {m['loss']['train']:.3f}, "
          f"mid (step {m['mid_step']}) {m['loss']['mid']:.3f}, heldout {m['loss']['heldout']:.3f}")
    tables = []
    for split in SPLITS:
        for sort_vocab, tile in ((False, 1), (False, 128), (True, 128)):
            t = kept_table(split, n_rows=a.rows, sort_vocab=sort_vocab, tile=tile, config=config)
            tables.append(t)
            print()
            print(format_table(t))
    mapped = [] if a.tiny else mapped_table(config=config)
    if mapped:
        print()
        print("the 'mid' split mapped to the report shapes (load_workload(shape=...)), at their chunk sizes:")
        for r in mapped:
            n, d, v = r["shape"]
            print(f"  N={n} D={d} V={v} {r['dtype']:<8} {r['chunk_rows']:>5} rows/chunk  {r['threshold']:<16} "
                  f"kept {r['kept_mean']:>8.1f} = {100 * r['kept_fraction']:6.2f}% of V"
                  + ("  (rows tiled)" if r["tiled"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": config, "meta": {k: v for k, v in m.items() if k not in ("config", "losses")},
                       "losses": m["losses"], "tables": tables, "mapped": mapped}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
