"""Does gradient filtering change training?  The demo's GPT-2 trained with and without ``grad_filter``.

    .venv/bin/python -m benchmarks.grad_filter_curve          # 300 steps: exact, then 2^-12 and 2^-8,
                                                              # each from step 0 and from step 100
    .venv/bin/python -m benchmarks.grad_filter_curve --steps 20 --out /tmp/c   # a quick look

The model, tokenizer, data and optimizer are ``tiedkernels.hf.demo``'s (byte-level BPE trained on
``tiedkernels/data/hf_corpus.txt``, GPT-2 with a 16,384-row vocabulary, n_embd=128, 2 layers, fp32,
AdamW at lr 2e-3, batches of 8x128 tokens drawn with a seeded generator), patched with
``tiedkernels.hf.patch``.  Every run starts from the same seed and sees the same batches in the same
order, in this one process (same threads, same summation orders): the exact run (``grad_filter=None``)
and one run per threshold and start step: ``patch(model, grad_filter=t)`` from step 0 (training from
scratch) or from a later step (``--filter-from``: the run is exact until then, so identical to the exact
run, and ``patch`` switches the filter on; the fine-tuning case).  The loss of a step is exact under
the filter, so a difference at step s comes from the filtered gradients of the steps before.

Every ``--probe-every`` steps the final hidden states of the batch are caught by a hook and the fraction
of the vocabulary that the run's threshold keeps is computed in plain torch (``|softmax - onehot| > t``
in some row of a chunk of ``--chunk`` rows, the fused loss's chunk by default: the rule of
``grad_filter``, in units of the row's gradient scale), and the gradient mass it leaves out
(``Σ_j |softmax - onehot|`` over the left-out columns, mean over rows; a row's total is at most 2).

Writes ``benchmarks/plots/grad_filter_curve.png`` (the loss curves side by side, their difference, the
kept fraction) and ``benchmarks/grad_filter_curve.json`` (every figure, the command and the machine).

``--stand-in`` runs where ``tiedkernels.hf.patch`` has no ``grad_filter``: the "filtered" runs are then
exact runs under another name (a no-op flag), the output says so, and the figures prove nothing about
the filter; it exists to build and test this script without the filter.
"""

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PLOT = os.path.join(HERE, "plots", "grad_filter_curve.png")
JSON = os.path.join(HERE, "grad_filter_curve.json")
DEFAULT_FILTERS = {"2^-12": 2.0 ** -12, "2^-8": 2.0 ** -8}
AUTO_FP32 = 2.0 ** -28  # grad_filter="auto" on fp32: eps(fp32) / 32


def parse_filter(text):
    """'2^-12', 'auto' or a number -> (label, value)."""
    t = text.strip()
    if t == "auto":
        return t, "auto"
    try:
        v = 2.0 ** float(t[2:]) if t.startswith("2^") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a threshold is a positive number, 2^k or 'auto', got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"a threshold is a positive number, 2^k or 'auto', got {text!r}")
    return t, v


def numeric(t):
    return AUTO_FP32 if t == "auto" else t


def patch_supports_filter():
    import tiedkernels.hf as tkhf

    return "grad_filter" in inspect.signature(tkhf.patch).parameters


def train(label, grad_filter, start, ids, held, config, args, stand_in, log):
    """One run: the losses per step, the step times, the kept fractions at the probe steps, the
    held-out loss at the end.  ``grad_filter`` None: exact; else on from step ``start``."""
    import torch

    import tiedkernels.hf as tkhf
    from benchmarks import workload as W
    from tiedkernels.hf import demo

    torch.manual_seed(args.seed)
    model = demo.gpt2_model(config)
    tkhf.patch(model)
    model.train()
    caught = {}
    hook = model.transformer.register_forward_hook(
        lambda mod, inp, out: caught.__setitem__("h", out.last_hidden_state.detach()))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    n = ids.numel() - args.seq - 1
    losses, times, probes = [], [], []
    weight = model.transformer.wte.weight
    t_run = time.perf_counter()
    for step in range(args.steps):
        if grad_filter is not None and step == start and not stand_in:
            tkhf.patch(model, grad_filter=grad_filter)  # patching again only updates the options
        starts = torch.randint(0, n, (args.batch,), generator=g)
        x = torch.stack([ids[s:s + args.seq] for s in starts])
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        if step % args.probe_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                h = caught["h"][:, :-1].reshape(-1, caught["h"].shape[-1])
                dz = W.grad_logits(h, weight.detach(), x[:, 1:].reshape(-1))
                kept, dropped = {}, {}
                for name, t in args.filters.items():
                    per = W.kept_columns(dz, args.chunk, numeric(t))
                    kept[name] = sum(per) / len(per) / dz.shape[1]
                    # Σ_j |dz_ij| over the left-out columns, mean over rows (a row's total is at most 2)
                    dropped[name] = W.dropped_mass(dz, args.chunk, numeric(t))
            probes.append({"step": step, "kept": kept, "dropped_mass_per_row": dropped})
        if log and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            log(f"{label:>14}: step {step:>4}/{args.steps}  loss {losses[-1]:.5f}  "
                f"({time.perf_counter() - t_run:.0f} s)")
    hook.remove()
    model.eval()
    with torch.no_grad():
        tot, cnt = 0.0, 0
        for s in range(0, held.numel() - 1, args.seq):
            x = held[s:s + args.seq]
            if x.numel() < 2:
                break
            tot += model(input_ids=x.view(1, -1), labels=x.view(1, -1)).loss.item() * (x.numel() - 1)
            cnt += x.numel() - 1
    return {"label": label, "grad_filter": grad_filter, "filter_from": start, "losses": losses, "times": times,
            "probes": probes, "heldout_loss": tot / max(1, cnt)}


def plot(res, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = res["runs"][0]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    steps = range(len(exact["losses"]))
    for i, r in enumerate(res["runs"]):
        style = "-" if r["grad_filter"] is None or r["filter_from"] == 0 else "--"
        name = "exact (grad_filter=None)" if r["grad_filter"] is None else r["label"]
        ax1.plot(steps, r["losses"], style, lw=1.4 if i else 2.2, label=name, color=f"C{i}")
        if i:
            ax2.plot(steps, [a - b for a, b in zip(r["losses"], exact["losses"])], style, lw=1.2, label=name,
                     color=f"C{i}")
            ax3.plot([p["step"] for p in r["probes"]], [100 * p["kept"][r["threshold_label"]] for p in r["probes"]],
                     style, marker="o", ms=2.5, lw=1, label=name, color=f"C{i}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats)")
    ax1.set_title("training loss: same seed, same batches")
    ax1.legend(fontsize=7)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xlabel("step")
    ax2.set_ylabel("filtered − exact (nats)")
    ax2.set_title("loss difference against the exact run")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.legend(fontsize=7)
    ax3.set_yscale("log")
    ax3.set_xlabel("step")
    ax3.set_ylabel("kept vocabulary per chunk (% of V)")
    ax3.set_title(f"kept columns per {res['config']['chunk']}-row chunk (each run's threshold)")
    ax3.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grad_filter_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=None, help="rows per chunk of the kept-fraction probe (default: "
                    "the fused loss's own chunk for this shape, functional.chunk_rows)")
    ap.add_argument("--probe-every", type=int, default=25)
    ap.add_argument("--grad-filter", type=parse_filter, action="append", metavar="T",
                    help="a threshold to train with (repeatable; 2^k, a number or auto; default 2^-12 and 2^-8)")
    ap.add_argument("--filter-from", type=int, action="append", metavar="STEP",
                    help="the step each filtered run turns the filter on (repeatable; default 0 and 100)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--stand-in", action="store_true", help="run even where patch has no grad_filter (the "
                    "filtered runs are then exact: a no-op flag for building and testing this script)")
    ap.add_argument("--out", default=None, help="write the PNG and JSON into this folder instead of benchmarks/")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import tiedkernels
    from tiedkernels import functional
    from tiedkernels.hf import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    supported = patch_supports_filter()
    stand_in = not supported
    if stand_in and not args.stand_in:
        sys.exit("grad_filter_curve: tiedkernels.hf.patch has no grad_filter option here; pass --stand-in to run "
                 "the script with a no-op flag (its figures then prove nothing)")
    if supported and args.stand_in:
        print("grad_filter_curve: patch supports grad_filter; --stand-in ignored, the real filter runs")
        stand_in = False
    args.filters = dict(args.grad_filter or DEFAULT_FILTERS.items())
    starts = sorted(set(args.filter_from or [0, 100]))
    if any(k < 0 or k >= args.steps for k in starts):
        ap.error(f"--filter-from wants steps in [0, {args.steps}), got {starts}")
    config = demo.gpt2_config(demo.VOCAB)
    if args.chunk is None:
        args.chunk = functional.chunk_rows(args.batch * args.seq, demo.VOCAB, None, d=config.n_embd, itemsize=4,
                                           dw=True)

    with tempfile.TemporaryDirectory(prefix="tiedkernels-curve-") as tmp:
        ids, tok = demo.load_ids(demo.train_tokenizer(tmp))
        with open(os.path.join(os.path.dirname(demo.CORPUS), "demo_corpus.txt"), encoding="utf-8") as f:
            held = torch.tensor(tok.encode(f.read()).ids, dtype=torch.long)
    print(f"grad_filter_curve: GPT-2 (V={demo.VOCAB}, n_embd={config.n_embd}, n_layer={config.n_layer}, fp32), "
          f"{args.steps} AdamW steps of {args.batch}x{args.seq} tokens, seed {args.seed}, "
          f"{torch.get_num_threads()} threads; filters {', '.join(args.filters)} from steps {starts}; kept fraction per "
          f"{args.chunk}-row chunk" + ("; STAND-IN: the filtered runs are exact" if stand_in else ""))
    t0 = time.time()
    runs = [train("exact", None, 0, ids, held, config, args, stand_in, print)]
    for k in starts:
        for name, t in args.filters.items():
            label = f"grad_filter={name}" + (f" from step {k}" if k else "")
            r = train(label, t, k, ids, held, config, args, stand_in, print)
            r["threshold_label"] = name
            runs.append(r)
    exact = runs[0]["losses"]
    summary = []
    for r in runs[1:]:
        k = r["filter_from"]
        d = [abs(a - b) for a, b in zip(r["losses"], exact)]
        rel = [x / abs(b) for x, b in zip(d, exact)]
        last = max(1, len(d) // 10)
        on = [p for p in r["probes"] if p["step"] >= k]
        summary.append({
            "run": r["label"], "grad_filter": r["threshold_label"], "threshold": r["grad_filter"], "filter_from": k,
            "threshold_value": numeric(r["grad_filter"]),
            "max_abs_diff": max(d), "mean_abs_diff": statistics.fmean(d), "max_rel_diff": max(rel),
            "mean_rel_diff": statistics.fmean(rel),
            "mean_abs_diff_after_filter_on": statistics.fmean(d[k:]),
            "identical_until_filter_on": r["losses"][:k + 1] == exact[:k + 1],
            "final_loss_mean_last_10pct": statistics.fmean(r["losses"][-last:]),
            "exact_final_loss_mean_last_10pct": statistics.fmean(exact[-last:]),
            "heldout_loss": r["heldout_loss"], "exact_heldout_loss": runs[0]["heldout_loss"],
            "median_step_s": statistics.median(r["times"][k:]),
            "exact_median_step_s": statistics.median(runs[0]["times"][k:]),
            "kept_fraction_mean": statistics.fmean(p["kept"][r["threshold_label"]] for p in on) if on else None,
            "kept_fraction_last": r["probes"][-1]["kept"][r["threshold_label"]],
        })
    res = {
        "about": "benchmarks/grad_filter_curve.py: the demo GPT-2 trained with and without grad_filter "
                 "(same seed and batches); loss differences per step against the exact run",
        "stand_in": stand_in,
        "command": "python -m benchmarks.grad_filter_curve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": str(torch.__version__),
                    "transformers": transformers.__version__, "tiedkernels": getattr(tiedkernels, "__version__", "")},
        "config": {"vocab": demo.VOCAB, "n_embd": config.n_embd, "n_layer": config.n_layer, "steps": args.steps,
                   "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed, "chunk": args.chunk,
                   "probe_every": args.probe_every, "filters": args.filters, "filter_from": starts},
        "seconds": time.time() - t0,
        "summary": summary,
        "runs": runs,
    }
    out_dir = args.out
    png = os.path.join(out_dir, "grad_filter_curve.png") if out_dir else PLOT
    js = os.path.join(out_dir, "grad_filter_curve.json") if out_dir else JSON
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    title = (f"GPT-2 V={demo.VOCAB} n_embd={config.n_embd} fp32, AdamW lr {args.lr:g}, {args.steps} steps of "
             f"{args.batch}x{args.seq} tokens, seed {args.seed}: tiedkernels.hf.patch exact vs grad_filter "
             "(solid: on from step 0, dashed: switched on later)"
             + ("  [STAND-IN: no filter, the runs are all exact]" if stand_in else ""))
    plot(res, png, title)
    with open(js, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print()
    for s in summary:
        kept = "n/a" if s["kept_fraction_mean"] is None else f"{100 * s['kept_fraction_mean']:.2f}%"
        print(f"{s['run']}: |loss - exact| over {args.steps} steps: max {s['max_abs_diff']:.2e} nats "
              f"({s['max_rel_diff']:.2e} relative), mean {s['mean_abs_diff']:.2e} ({s['mean_rel_diff']:.2e}); "
              f"identical until the filter is on: {s['identical_until_filter_on']}; final loss "
              f"{s['final_loss_mean_last_10pct']:.4f} vs {s['exact_final_loss_mean_last_10pct']:.4f}; held-out "
              f"{s['heldout_loss']:.4f} vs {s['exact_heldout_loss']:.4f}; kept {kept} of V per {args.chunk}-row "
              f"chunk while on ({100 * s['kept_fraction_last']:.2f}% at the end); median step "
              f"{s['median_step_s'] * 1e3:.0f} ms vs {s['exact_median_step_s'] * 1e3:.0f} ms")
    if stand_in:
        print("STAND-IN: patch has no grad_filter here; the 'filtered' runs were exact runs")
    print(f"wrote {png} and {js} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
