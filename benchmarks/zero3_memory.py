"""Per-rank peak memory of a DeepSpeed ZeRO-3 training step, stock GPT-2 against patched.

    python -m benchmarks.zero3_memory [--batch 2 --seq 512 --world 2]

The demo's memory shape (tiedkernels.hf.demo --memory: 2 layers, n_embd=256, V=50,257), ZeRO-3 with every
parameter partitioned, DeepSpeed's CPU accelerator on loopback gloo, ``--world`` ranks of ``--batch`` x
``--seq`` tokens each, fp32, SGD. Each variant runs in fresh processes (``MALLOC_MMAP_THRESHOLD_=65536``:
freed buffers go back to the OS); each rank reports its peak resident memory (getrusage) and its resident
memory before the first step. A figure, not a test: tests/test_hf_deepspeed.py checks the values.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def rank_main(kind, batch, seq, out):
    import torch
    import torch.distributed as dist
    import deepspeed
    import tiedkernels.hf as tkhf
    from tiedkernels.hf.demo import _current_rss_bytes, _peak_rss_bytes, gpt2_config, gpt2_model

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = gpt2_model(gpt2_config(50257, n_embd=256, n_layer=2, n_head=4, n_positions=seq))
    if kind == "patched":
        tkhf.patch(model)
    model.train()
    cfg = {"train_micro_batch_size_per_gpu": batch, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randint(0, 50257, (batch, seq), generator=g)
    live, before = _current_rss_bytes(), _peak_rss_bytes()
    losses, times = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    res = {"kind": kind, "rank": dist.get_rank(), "peak_rss": _peak_rss_bytes(), "rss_before_step": live,
           "peak_before_step": before, "losses": losses, "times": times}
    with open(os.path.join(out, f"{kind}-rank{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)


def launch(kind, batch, seq, world, out):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           "-m", "benchmarks.zero3_memory", "--_rank", kind, "--batch", str(batch), "--seq", str(seq), "--out", out]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{kind} ranks failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return [json.load(open(os.path.join(out, f"{kind}-rank{r}.json"))) for r in range(world)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.zero3_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--_rank", dest="rank_kind", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rank_kind:
        return rank_main(a.rank_kind, a.batch, a.seq, a.out)
    import torch
    import deepspeed
    import transformers

    with tempfile.TemporaryDirectory() as out:
        res = {k: launch(k, a.batch, a.seq, a.world, out) for k in ("stock", "patched")}
    if a.json:
        print(json.dumps(res))
        return 0
    mib = 2 ** 20
    logits = a.batch * a.seq * 50257 * 4
    print(f"DeepSpeed {deepspeed.__version__} ZeRO-3, {a.world} CPU ranks (gloo), GPT-2 (2 layers, n_embd=256, "
          f"V=50,257), {a.batch}x{a.seq} tokens per rank, fp32, SGD; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; fp32 logits per rank {logits / mib:.1f} MiB")
    for k, ranks in res.items():
        for r in ranks:
            print(f"  {k:<8} rank {r['rank']}  peak RSS {r['peak_rss'] / mib:8.1f} MiB   step above live RSS "
                  f"{(r['peak_rss'] - r['rss_before_step']) / mib:8.1f} MiB   loss {r['losses'][0]:.4f}   "
                  f"step {min(r['times']):.2f} s")
    saved = [s["peak_rss"] - q["peak_rss"] for s, q in zip(res["stock"], res["patched"])]
    print("  saved per rank: " + ", ".join(f"{s / mib:.1f} MiB ({s / logits:.2f}x the fp32 logits)" for s in saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
