"""``python -m tiedkernels.hf.demo``: a real transformers model, stock against patched.

1. trains a byte-level BPE tokenizer (the ``tokenizers`` package) on ``data/hf_corpus.txt``;
2. builds a small GPT-2 from its config with a realistic vocabulary (16,384 rows);
3. trains it twice from the same seed, stock and ``tiedkernels.hf.patch``-ed, each in a fresh
   process (so that each peak memory is its own), with a progress bar;
4. prints a table (loss per step and their difference, step time, peak memory) and writes a PNG plot;
5. saves the patched model, reloads it with stock transformers, checks the logits match, and
   generates a sample.

``--memory`` measures instead the training-step peak memory of a GPT-2 shaped model (2 layers,
``n_embd=256``, V=50,257, 4×512 tokens), stock vs patched, each in a fresh process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(os.path.dirname(HERE), "data", "hf_corpus.txt")
VOCAB = 16384


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child_env():
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # big freed buffers go back to the OS: RSS tracks live memory
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(4, os.cpu_count() or 1))))
    return env


def _run_child(args):
    cmd = [sys.executable, "-m", "tiedkernels.hf.demo", *args]
    res = subprocess.run(cmd, env=_child_env(), stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child {' '.join(args[:2])} failed with exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- tokenizer and data ---------------------------------------------------------------------
def train_tokenizer(out_dir, vocab_size=VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([CORPUS], trainer)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path


def load_ids(tok_path):
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    return torch.tensor(tok.encode(text).ids, dtype=torch.long), tok


def gpt2_config(vocab, n_embd=128, n_layer=2, n_head=4, n_positions=256):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                      loss_type="ForCausalLM")


def gpt2_model(config):
    """A GPT-2 LM that names its loss: transformers v4 reads ``config.loss_type``, v5 the model's own
    ``loss_type`` (guessed from the class name, which for ``GPT2LMHeadModel`` gives none and a warning)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


# -- one training run (child process) -------------------------------------------------------
def child_train(kind, tok_path, out_dir, steps, batch, seq, seed):
    import torch
    from tqdm import tqdm

    import tiedkernels.hf as tkhf

    ids, _ = load_ids(tok_path)
    torch.manual_seed(seed)
    model = gpt2_model(gpt2_config(VOCAB))
    if kind == "patched":
        tkhf.patch(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = ids.numel() - seq - 1
    losses, times = [], []
    base_rss = _current_rss_bytes()
    for _ in tqdm(range(steps), desc=f"{kind:>8}", file=sys.stderr, dynamic_ncols=True):
        starts = torch.randint(0, n, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    peak = _peak_rss_bytes()
    model.eval()
    probe = ids[:64].view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    result = {"kind": kind, "losses": losses, "times": times, "peak_rss": peak, "base_rss": base_rss}
    if kind == "patched":
        save = os.path.join(out_dir, "model")
        model.save_pretrained(save)
        torch.save({"probe": probe, "logits": logits}, os.path.join(out_dir, "probe.pt"))
        result["saved"] = save
    return result


# -- the memory figure (child process) ------------------------------------------------------
def child_memory(kind, batch=4, seq=512, steps=2):
    import torch

    import tiedkernels.hf as tkhf

    torch.manual_seed(0)
    model = gpt2_model(gpt2_config(50257, n_embd=256, n_layer=2, n_head=4, n_positions=512))
    if kind == "patched":
        tkhf.patch(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))
    before = _peak_rss_bytes()
    live = _current_rss_bytes()
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    return {"kind": kind, "peak_rss": _peak_rss_bytes(), "peak_before_step": before, "rss_before_step": live,
            "losses": losses, "times": times}


def memory_main(batch=4, seq=512):
    import torch
    import transformers

    print(f"GPT-2 (2 layers, n_embd=256, V=50,257), {batch}x{seq} tokens, fp32, SGD training step; "
          f"torch {torch.__version__}, "
          f"transformers {transformers.__version__}; each variant in a fresh process, MALLOC_MMAP_THRESHOLD_=65536, "
          "peak RSS from getrusage")
    res = {k: _run_child(["--_child-memory", k, "--batch", str(batch), "--seq", str(seq)])
           for k in ("stock", "patched")}
    mib = 2 ** 20
    logits = batch * seq * 50257 * 4
    for k, r in res.items():
        step = r["peak_rss"] - r["rss_before_step"]
        print(f"  {k:<8} peak RSS {r['peak_rss'] / mib:8.1f} MiB   step above live RSS {step / mib:8.1f} MiB   "
              f"loss {r['losses'][0]:.4f}   step {min(r['times']):.2f} s")
    saved = res["stock"]["peak_rss"] - res["patched"]["peak_rss"]
    print(f"  saved: {saved / mib:.1f} MiB ({saved / logits:.2f}x the fp32 logits, {logits / mib:.1f} MiB)")
    ok = saved >= logits and abs(res["stock"]["losses"][0] - res["patched"]["losses"][0]) < 1e-4
    print("OK" if ok else "NOT OK: the patched step must save at least the fp32 logits and give the same loss")
    return 0 if ok else 1


# -- the demo (parent) ----------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tiedkernels.hf.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--memory", action="store_true", help="the memory figure instead of the demo (default 4x512 "
                   "tokens; --batch/--seq change it)")
    p.add_argument("--_child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--_child-memory", dest="child_memory", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_memory:
        print(json.dumps(child_memory(a.child_memory, a.batch, a.seq)))
        return 0
    if a._child:
        kind, out = a._child
        print(json.dumps(child_train(kind, os.path.join(out, "tokenizer.json"), out, a.steps, a.batch, a.seq,
                                     a.seed)))
        return 0
    if a.memory:
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:])}
        return memory_main(a.batch if "--batch" in given else 4, a.seq if "--seq" in given else 512)
    return demo(a)


def demo(a):
    import torch
    import transformers

    out = a.out or tempfile.mkdtemp(prefix="tiedkernels-hf-demo-")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    tok_path = train_tokenizer(out)
    ids, tok = load_ids(tok_path)
    print(f"tokenizer: byte-level BPE trained on {os.path.basename(CORPUS)} in {time.perf_counter() - t0:.1f} s: "
          f"{tok.get_vocab_size():,} tokens learned, {ids.numel():,} tokens of text; model vocabulary {VOCAB:,} rows")
    print(f"model: GPT-2 from config (2 layers, n_embd=128), transformers {transformers.__version__}, "
          f"torch {torch.__version__}; {a.steps} AdamW steps of {a.batch}x{a.seq} tokens, seed {a.seed}")
    common = ["--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq), "--seed", str(a.seed)]
    res = {k: _run_child(["--_child", k, out, *common]) for k in ("stock", "patched")}
    s, q = res["stock"], res["patched"]
    print()
    print(f"{'step':>4} {'stock loss':>11} {'patched loss':>13} {'|diff|':>9} {'stock ms':>9} {'patched ms':>11}")
    every = max(1, a.steps // 10)
    worst = 0.0
    for i in range(a.steps):
        d = abs(s["losses"][i] - q["losses"][i])
        worst = max(worst, d / abs(s["losses"][i]))
        if i % every == 0 or i == a.steps - 1:
            print(f"{i:>4} {s['losses'][i]:>11.5f} {q['losses'][i]:>13.5f} {d:>9.2e} {s['times'][i] * 1e3:>9.0f} "
                  f"{q['times'][i] * 1e3:>11.0f}")
    mib = 2 ** 20
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"median step: stock {med(s['times']) * 1e3:.0f} ms, patched {med(q['times']) * 1e3:.0f} ms")
    print(f"peak RSS: stock {s['peak_rss'] / mib:.0f} MiB, patched {q['peak_rss'] / mib:.0f} MiB "
          f"(training-step logits alone: {a.batch * a.seq * VOCAB * 4 / mib:.0f} MiB in fp32)")
    # fp32 training, different summation orders: first-step losses agree to ~1e-6, and AdamW keeps
    # the two trajectories within ~1e-4 relative over tens of steps.
    tol = 1e-3
    print(f"largest relative loss difference over {a.steps} steps: {worst:.1e} (tolerance {tol:g})")
    png = os.path.join(out, "hf_demo_loss.png")
    _plot(s, q, png)
    print(f"plot: {png}")
    # reload with stock transformers
    from transformers import GPT2LMHeadModel

    stock = GPT2LMHeadModel.from_pretrained(q["saved"]).eval()
    assert stock.lm_head.weight is stock.transformer.wte.weight, "the reloaded stock model is not tied"
    probe = torch.load(os.path.join(out, "probe.pt"))
    with torch.no_grad():
        logits = stock(input_ids=probe["probe"]).logits
    err = (logits - probe["logits"]).abs().max().item()
    print(f"saved the patched model to {q['saved']}; reloaded with stock transformers: max |logit diff| {err:.1e}")
    prompt = "The "
    enc = torch.tensor([tok.encode(prompt).ids])
    torch.manual_seed(a.seed)
    with torch.no_grad():
        gen = stock.generate(enc, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8,
                             attention_mask=torch.ones_like(enc), pad_token_id=0)
    print(f"sample: {tok.decode(gen[0].tolist())!r}")
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {out}")
    ok = worst <= tol and err <= 1e-5
    if not ok:
        print("NOT OK: losses or reloaded logits differ beyond tolerance")
    return 0 if ok else 1


def _plot(s, q, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = range(len(s["losses"]))
    ax1.plot(steps, s["losses"], label="stock transformers", lw=2)
    ax1.plot(steps, q["losses"], "--", label="tiedkernels.hf.patch", lw=2)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("GPT-2 (V=16,384): loss")
    ax1.legend()
    mib = 2 ** 20
    ax2.bar(["stock", "patched"], [s["peak_rss"] / mib, q["peak_rss"] / mib], color=["C0", "C1"])
    ax2.set_ylabel("peak RSS (MiB)")
    ax2.set_title("training peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
