"""``python -m tiedkernels demo``: train the same tiny causal LM twice from one seed.

* ``stock``: tied ``nn.Embedding`` + ``nn.Linear`` (one Parameter), logits, ``F.cross_entropy``;
* ``tiedkernels``: ``TiedEmbeddingHead`` (embed, then the fused loss that never builds logits).

Each variant runs in a fresh process so that its peak memory is its own; the parent prints
both side by side. The text is ``data/demo_corpus.txt`` (public-domain texts), tokenized
into words; the vocabulary is padded to ``--vocab`` rows, the size of a real tokenizer's,
because the LM head's cost grows with V.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

DATA = os.path.join(os.path.dirname(__file__), "data", "demo_corpus.txt")


def _tokens(vocab_size):
    with open(DATA, encoding="utf-8") as f:
        words = re.findall(r"[a-z']+|[^\sa-z']", f.read().lower())
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    if len(vocab) > vocab_size:
        raise SystemExit(f"--vocab must be at least {len(vocab)} (the corpus has that many distinct words)")
    return [vocab[w] for w in words], len(vocab)


def _build(kind, vocab, dim, layers, seed):
    import torch
    from torch import nn

    import tiedkernels as tk

    torch.manual_seed(seed)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(512, dim)
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            t = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t)
            x = x + self.pos(torch.arange(t))
            return self.norm(self.blocks(x, mask=mask, is_causal=True))

    class StockLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.body = Body()
            self.lm_head = nn.Linear(dim, vocab, bias=False)
            self.lm_head.weight = self.embed.weight  # tied, as transformers does

        def forward(self, ids, labels):
            logits = self.lm_head(self.body(self.embed(ids)))
            z = logits[:, :-1].reshape(-1, vocab).float()
            return nn.functional.cross_entropy(z, labels[:, 1:].reshape(-1))

    class FusedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tk.TiedEmbeddingHead(vocab, dim)
            self.body = Body()

        def forward(self, ids, labels):
            return self.embed.loss(self.body(self.embed(ids)), labels, shift=True)

    torch.manual_seed(seed)
    model = StockLM() if kind == "stock" else FusedLM()
    # identical initial weights for both variants
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.02)
    return model


def _child(args):
    import resource

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    tokens, _ = _tokens(args.vocab)
    data = torch.tensor(tokens)
    model = _build(args.child, args.vocab, args.dim, args.layers, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * 4096
    losses, t0 = [], None
    bar = tqdm(range(args.steps), desc=f"{args.child:>11}", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        if step == 1:
            t0 = time.perf_counter()  # step 0 pays one-time initialisation
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        ids = torch.stack([data[s : s + args.seq] for s in starts])
        loss = model(ids, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tok_s = (args.steps - 1) * args.batch * args.seq / elapsed
    print("RESULT " + json.dumps({"losses": losses, "tokens_per_s": tok_s, "peak_extra": peak - base}))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tiedkernels demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--child", choices=["stock", "tiedkernels"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    tokens, distinct = _tokens(args.vocab)
    print(f"corpus: {len(tokens)} tokens, {distinct} distinct words, vocabulary padded to {args.vocab}; "
          f"model: {args.layers} layers, d={args.dim}; {args.steps} steps of {args.batch}x{args.seq} tokens")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    for kind in ("stock", "tiedkernels"):
        cmd = [sys.executable, "-m", "tiedkernels", "demo", *(argv or []), "--child", kind]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            print(out.stdout)
            raise SystemExit(f"the {kind} run failed")
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results[kind] = json.loads(line[len("RESULT "):])
    s, t = results["stock"], results["tiedkernels"]
    print()
    print(f"{'step':>6} {'stock loss':>11} {'tiedkernels':>12} {'|diff|':>9}")
    marks = sorted({0, *range(args.steps // 10 or 1, args.steps, args.steps // 10 or 1), args.steps - 1})
    for i in marks:
        print(f"{i:>6} {s['losses'][i]:>11.4f} {t['losses'][i]:>12.4f} {abs(s['losses'][i] - t['losses'][i]):>9.2e}")
    mib = 1 << 20
    print()
    print(f"{'':<13}{'tokens/s':>10} {'peak extra memory':>18}")
    for name, r in (("stock", s), ("tiedkernels", t)):
        print(f"{name:<13}{r['tokens_per_s']:>10.0f} {r['peak_extra'] / mib:>14.0f} MiB")
    print(f"\ntiedkernels: {t['tokens_per_s'] / s['tokens_per_s']:.2f}x the stock throughput, "
          f"{t['peak_extra'] / max(1, s['peak_extra']):.2f}x its peak extra memory")
    return 0
