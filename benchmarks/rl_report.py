"""The RL and distillation objectives against their peers: time and peak memory, written into
``benchmarks/RESULTS.md`` (between the ``rl-objectives`` markers) and ``benchmarks/results_rl.json``.

    .venv/bin/python -m benchmarks.rl_report                          # every case (see --help for subsets)
    .venv/bin/python -m benchmarks.rl_report --shapes 0 --dtypes float32
    .venv/bin/python -m benchmarks.rl_report --only memory            # peak memory only
    .venv/bin/python -m benchmarks.rl_report --only write             # re-render the section from the json
    .venv/bin/python -m benchmarks.rl_report --quick --out /tmp/r     # tiny shapes: checks the pipeline

Jobs (forward + backward, ``dh`` and ``dW``), at ``benchmarks/providers.py``'s report shapes:

* ``grpo``  TRL 1.16's GRPO loss, ``loss_type="dapo"``, ``beta=0.04`` (k3 KL against reference log-probs),
  ``epsilon=0.2``, temperature 1: the N tokens are B=8 completions (one GRPO group) of T=N/8 tokens with
  a completion mask (each completion keeps between T/2 and T tokens), advantages per completion, old and
  reference log-probs near the current ones (so the ratio is clipped on some tokens).
* ``jsd``   TRL's generalised JSD (GKDTrainer.generalized_jsd_loss), ``beta=0.5``, temperature 1, no hard
  label loss, mean over the scored tokens (10% of the labels are ``-100``). The teacher is a hidden state
  ``[N, D]`` and weight ``[V, D]`` of the same D as the student's; its forward (one GEMM, no gradient) is
  part of every provider's step.

Providers: ``tiedkernels-cpu`` (``grpo_loss`` / ``linear_distillation_loss``, backend ``cpu``); ``liger``
(Liger Kernel's ``LigerFusedLinearGRPOLoss`` / ``LigerFusedLinearJSDLoss`` with their default chunk
sizes, ``compiled=False``); ``trl`` (logits ``h Wᵀ`` in the model's dtype, then TRL's own functions on
the full logits: ``selective_log_softmax_and_entropy`` and the loss of ``GRPOTrainer._compute_loss``,
or ``GKDTrainer.generalized_jsd_loss``); ``plain`` (plain PyTorch on fp32 logits, as a Hugging Face
loss upcasts them: ``log_softmax``, ``gather``, the same loss).

Timing: every provider of a case in this one process, interleaved rounds (the order rotates each
round), median. Memory: a fresh process per provider and case (the method of
``benchmarks/providers.py``'s ``measure_here``: extra peak resident memory of a steady-state step
above the inputs, the gradients counted).
"""

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks import providers as P

HERE = os.path.dirname(os.path.abspath(__file__))
JOBS = ("grpo", "jsd")
PROVIDERS = ("tiedkernels-cpu", "liger", "trl", "plain")
GROUP = 8  # GRPO completions per batch (one group)
CI_SHAPES = ((64, 32, 512),)
DTYPES = {**P.DTYPES, "float64": torch.float64}  # float64: the correctness check of the providers
BEGIN, END = "<!-- rl-objectives:begin -->", "<!-- rl-objectives:end -->"

# The objectives' settings, the same for every provider.
GRPO = dict(loss_type="dapo", beta=0.04, epsilon=0.2)
JSD = dict(beta=0.5, temperature=1.0)


@dataclasses.dataclass(frozen=True)
class RLCase:
    job: str
    n: int
    d: int
    v: int
    dtype: str = "float32"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def label(self):
        return f"{self.job} fwd+bwd N={self.n} D={self.d} V={self.v} {self.dtype}"

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s):
        return cls(**json.loads(s))


def cases(shapes=P.REPORT_SHAPES, dtypes=tuple(P.DTYPES), jobs=JOBS):
    return [RLCase(j, *s, dt) for dt in dtypes for s in shapes for j in jobs]


# ---------------------------------------------------------------------------------------------
# inputs


class Inputs:
    """Every tensor of a case, shared by its providers (leaf copies of ``h`` and ``w``: each step drops
    their gradients first)."""

    def __init__(self, case, seed=0):
        g = torch.Generator().manual_seed(seed)
        dt = case.torch_dtype
        n, d, v = case.n, case.d, case.v
        self.h = (torch.randn(n, d, generator=g) * 0.5).to(dt)
        self.w = (torch.randn(v, d, generator=g) * 0.02).to(dt)
        self.y = torch.randint(0, v, (n,), generator=g)
        if case.job == "grpo":
            b, t = GROUP, n // GROUP
            if b * t != n:
                raise ValueError(f"grpo cases need N divisible by {GROUP}, got {n}")
            self.bt = (b, t)
            lengths = torch.randint(max(t // 2, 1), t + 1, (b,), generator=g)
            self.mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float32)
            self.adv = torch.randn(b, generator=g)
            lp0 = _log_probs(self.h.float(), self.w.float(), self.y).view(b, t)
            self.old = lp0 + 0.1 * torch.randn(b, t, generator=g)
            self.ref = lp0 + 0.1 * torch.randn(b, t, generator=g)
        else:
            self.ht = (torch.randn(n, d, generator=g) * 0.5).to(dt)
            self.wt = (torch.randn(v, d, generator=g) * 0.04).to(dt)
            drop = torch.rand(n, generator=g) < 0.1
            self.y = torch.where(drop, torch.full_like(self.y, -100), self.y)
        self._leaves = None

    def leaves(self):
        if self._leaves is None:
            self._leaves = tuple(t.detach().clone().requires_grad_(True) for t in (self.h, self.w))
        return self._leaves


@torch.no_grad()
def _log_probs(h, w, y, rows=256):
    out = torch.empty(h.shape[0], dtype=h.dtype)
    for s in range(0, h.shape[0], rows):
        z = h[s:s + rows] @ w.T
        out[s:s + rows] = z.gather(1, y[s:s + rows, None]).squeeze(1) - torch.logsumexp(z, 1)
    return out


# ---------------------------------------------------------------------------------------------
# the objectives' math on per-token log-probs / full logits (TRL's, line by line)


def trl_grpo_from_logps(per_token_logps, mask, advantages, old, ref, beta, eps_low, eps_high):
    """GRPOTrainer._compute_loss (TRL 1.16), token-level importance sampling, loss_type "dapo" (one
    process, ``num_items_in_batch`` None)."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old)
    per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_loss = per_token_loss + beta * per_token_kl
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def plain_jsd(zs, zt, labels, beta, temperature, ignore_index=-100):
    """The generalised JSD of fp32 logits, written out: β Σ p_t (t - m) + (1-β) Σ p_s (s - m), mean over
    the scored tokens."""
    s = torch.log_softmax(zs / temperature, -1)
    t = torch.log_softmax(zt / temperature, -1)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    d = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    keep = labels != ignore_index
    return torch.where(keep, d, torch.zeros_like(d)).sum() / keep.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# providers: (case, Inputs) -> providers.Step


def _tiedkernels(case, x):
    import tiedkernels as tk

    hl, wl = x.leaves()
    if case.job == "grpo":
        b, t = x.bt

        def run():
            out = tk.grpo_loss(hl.view(b, t, -1), wl, x.y.view(b, t), x.adv, completion_mask=x.mask,
                               old_log_probs=x.old, ref_log_probs=x.ref, backend="cpu", **GRPO)
            out.loss.backward()
            return out.loss.detach()
    else:
        def run():
            loss = tk.linear_distillation_loss(hl, wl, x.y, teacher_hidden=x.ht, teacher_weight=x.wt,
                                               divergence="jsd", backend="cpu", **JSD)
            loss.backward()
            return loss.detach()
    return P.Step(run, (hl, wl))


def liger_grpo_module():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=GRPO["beta"], compiled=False, use_ref_model=True,
                                    epsilon_low=GRPO["epsilon"], epsilon_high=GRPO["epsilon"],
                                    loss_type=GRPO["loss_type"], temperature=1.0)


def liger_jsd_module(alpha=0.0, beta=JSD["beta"], temperature=JSD["temperature"]):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=alpha, weight_soft_loss=1.0 - alpha, beta=beta,
                                   ignore_index=-100, temperature=temperature, compiled=False)


def _liger(case, x):
    hl, wl = x.leaves()
    if case.job == "grpo":
        b, t = x.bt
        mod = liger_grpo_module()

        def run():
            loss, _metrics = mod(hl.view(b, t, -1), wl, x.y.view(b, t), x.mask, x.adv,
                                 ref_per_token_logps=x.ref, old_per_token_logps=x.old)
            loss.backward()
            return loss.detach()
    else:
        mod = liger_jsd_module()

        def run():
            loss = mod(hl, wl, x.ht, x.wt, x.y)
            loss.backward()
            return loss.detach()
    return P.Step(run, (hl, wl))


def trl_jsd_fn():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def _trl(case, x):
    hl, wl = x.leaves()
    if case.job == "grpo":
        from trl.trainer.utils import selective_log_softmax_and_entropy

        b, t = x.bt

        def run():
            logits = (hl @ wl.T).view(b, t, -1)
            logps, entropy = selective_log_softmax_and_entropy(logits, x.y.view(b, t), temperature=1.0)
            loss = trl_grpo_from_logps(logps, x.mask, x.adv, x.old, x.ref, GRPO["beta"], GRPO["epsilon"],
                                       GRPO["epsilon"])
            loss.backward()
            return loss.detach(), (entropy.detach() * x.mask).sum() / x.mask.sum()
    else:
        jsd = trl_jsd_fn()

        def run():
            zs = hl @ wl.T
            with torch.no_grad():
                zt = x.ht @ x.wt.T
            loss = jsd(zs, zt, labels=x.y, beta=JSD["beta"], temperature=JSD["temperature"])
            loss.backward()
            return loss.detach()
    return P.Step(run, (hl, wl))


def _upcast(z):
    """fp32 logits, as a Hugging Face loss upcasts them (fp64 stays fp64: the providers' correctness check)."""
    return z if z.dtype == torch.float64 else z.float()


def _plain(case, x):
    hl, wl = x.leaves()
    if case.job == "grpo":
        b, t = x.bt

        def run():
            ls = torch.log_softmax(_upcast(F.linear(hl, wl)), -1)
            lp = ls.gather(1, x.y[:, None]).squeeze(1).view(b, t)
            with torch.no_grad():
                ent = -(ls.exp() * ls).sum(-1).view(b, t)
            loss = trl_grpo_from_logps(lp, x.mask, x.adv, x.old, x.ref, GRPO["beta"], GRPO["epsilon"],
                                       GRPO["epsilon"])
            loss.backward()
            return loss.detach(), (ent * x.mask).sum() / x.mask.sum()
    else:
        def run():
            zs = _upcast(F.linear(hl, wl))
            with torch.no_grad():
                zt = _upcast(F.linear(x.ht, x.wt))
            loss = plain_jsd(zs, zt, x.y, JSD["beta"], JSD["temperature"])
            loss.backward()
            return loss.detach()
    return P.Step(run, (hl, wl))


_BUILD = {"tiedkernels-cpu": _tiedkernels, "liger": _liger, "trl": _trl, "plain": _plain}
_NEEDS = {"tiedkernels-cpu": "tiedkernels", "liger": "liger_kernel.chunked_loss", "trl": "trl"}


def why_not(provider):
    """None, or why this provider cannot run here."""
    if provider == "tiedkernels-cpu":
        try:
            from tiedkernels import backends
        except Exception as e:  # noqa: BLE001
            return f"tiedkernels does not import ({type(e).__name__}: {e})"
        return backends.why_not("cpu", "cpu")
    module = _NEEDS.get(provider)
    if module:
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001
            return f"{module} is not installed ({type(e).__name__}: {e}); pip install -r requirements/bench.txt"
    return None


def runnable():
    return [p for p in PROVIDERS if why_not(p) is None]


def build(provider, case, inputs=None):
    reason = why_not(provider)
    if reason is not None:
        raise RuntimeError(f"{provider} cannot run {case.label}: {reason}")
    return _BUILD[provider](case, inputs if inputs is not None else Inputs(case))


# ---------------------------------------------------------------------------------------------
# memory: providers.measure_here's method, in a fresh process


def measure_here(provider, case):
    """Extra peak resident memory of one steady-state step, in bytes (as ``providers.measure_here``):
    one step runs, its outputs are dropped, the peak counter is reset and the peak of a second step is
    taken above the resident set just before it. Inputs and weights are not counted; the gradients are."""
    step = build(provider, case)
    step.run()
    step.reset()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = P._rss()
    step.run()
    return P._hwm() - base


def measure_fresh(provider, case, threads=None, timeout=1800):
    """``measure_here`` in a new interpreter with ``MALLOC_MMAP_THRESHOLD_=65536``, as
    ``providers.measure_fresh``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRL_EXPERIMENTAL_SILENCE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    root = os.path.dirname(HERE)
    cmd = [sys.executable, "-m", "benchmarks.rl_report", "--memory-cell", provider, case.to_json()]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory of {provider} on {case.label} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")][-1]
    return int(line[4:])


# ---------------------------------------------------------------------------------------------
# timing


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def time_case(case, names, rounds, log):
    x = Inputs(case)
    steps = {n: build(n, case, x) for n in names}
    for n in names:  # warm-up: first touch of every buffer
        steps[n].run()
        steps[n].reset()
    from benchmarks.report import interleaved

    samples, med, load0 = interleaved(steps, names, rounds)
    log(f"{case.label}  (load {load0[0]})")
    base = med.get("liger")
    for n in sorted(med, key=med.get):
        log(f"    {n:<16} {med[n] * 1e3:10.1f} ms" + (f"  {med[n] / base:5.2f}x liger" if base else ""))
    return {"samples": samples, "median": med, "load": [load0, loadavg()]}


# ---------------------------------------------------------------------------------------------
# writing


def _fmt_ms(s):
    return "–" if s is None else f"{s * 1e3:,.0f}" if s >= 1 else f"{s * 1e3:,.1f}"


def _mib(b):
    return "–" if b is None else f"{b / 2**20:,.0f}" if b >= 10 * 2**20 else f"{b / 2**20:,.1f}"


def _ratio(a, b):
    return "–" if a is None or not b else f"{a / b:.2f}"


NOTES = """**Reading the figures.** Liger's chunked GRPO loss computes each completion's log-probs in vocabulary \
chunks of 4096 and recomputes the logits in the backward (8·N·D·V flops; tiedkernels' fused objective does \
6·N·D·V), and allocates a float32 `[V, D]` weight gradient per completion that it adds into the accumulator \
(B = 8 times per step); it computes no entropy. Its JSD loss takes 1024-row chunks whose `[1024, V]` student \
and teacher logits, log-softmaxes and mixture are live at once. tiedkernels' GRPO objective runs its row \
pass in PyTorch operations on chunks of D/2 rows whose fp32 logits are overwritten in place by the gradient \
(column tiles of a few MiB for the temporaries): its extra peak is about dW + dh + one chunk. The GRPO \
rows were measured after that change (memory in the run of 17:32, times in the later runs), except the \
time at V=131072, which is the earlier pass's (the run of 17:04; not re-run for lack of time); the JSD row \
before it, which the distillation's pass did not take: it still holds several \
`[rows, V]` fp32 buffers of the chunk (student and teacher). In bf16, Liger's \
and TRL's JSD take the log-softmax of bf16 logits, so their loss is only bf16-accurate (at the CI shape, \
N=64 D=32 V=512, both give -0.0047 where the fp32 statistics give 0.0019); tiedkernels and `plain` compute \
the statistics in fp32."""


def section(results):
    from benchmarks import report as R

    m, v = results.get("machine") or R.machine(), results.get("versions") or R.versions()
    L = [BEGIN, "", "## RL and distillation objectives against Liger Kernel's chunked losses (CPU)", "",
         "Written by `python -m benchmarks.rl_report`; raw figures in `results_rl.json`. "
         "Forward + backward (`dh` and `dW`) of one step.", "",
         f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['isa'] or 'no avx2/avx512 flags'}), "
         f"{m['mem_gib']} GiB; PyTorch threads: {results.get('threads', '?')}",
         "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items())]
    for run in results.get("runs", []):
        L.append(f"- **Run** {run['start']} to {run['end']} ({run['what']}): load average (1, 5, 15 min) "
                 f"{run['load_start']} at the start, {run['load_end']} at the end.")
    L += ["- **Timing:** all four providers of a case in one process, interleaved rounds (the order rotates "
          f"each round), median of {results.get('rounds', '?')} rounds after a warm-up step; the 1-minute "
          "load average when the case started is beside its title (the machine is shared: read ratios, "
          "not absolute times).",
          "- **Memory:** extra peak resident memory of one steady-state step in a fresh process per provider "
          "and case (`MALLOC_MMAP_THRESHOLD_=65536`), above the inputs, weights and per-token constants; the "
          "gradients `dh` and `dW` are counted.", "",
          "**grpo**: TRL 1.16 GRPO loss, `loss_type=\"dapo\"`, `beta=0.04` (k3 KL against reference "
          "log-probs), `epsilon=0.2`, temperature 1; B=8 completions of T=N/8 tokens, completion mask "
          "(T/2 to T tokens kept), old and reference log-probs given. **jsd**: TRL's generalised JSD "
          "(`beta=0.5`, temperature 1, no hard-label loss, mean over scored tokens, 10% ignored); the "
          "teacher has the same D as the student (hidden `[N, D]`, weight `[V, D]`) and its forward is "
          "inside every provider's step.", "",
          "Providers: `tiedkernels-cpu` `grpo_loss` / `linear_distillation_loss` (backend `cpu`); `liger` "
          "`LigerFusedLinearGRPOLoss` / `LigerFusedLinearJSDLoss` (liger-kernel, default chunk sizes: one "
          "completion per chunk for GRPO, 1024 rows for JSD; `compiled=False`); `trl` logits `h·Wᵀ` in the "
          "model's dtype, then TRL's functions on the full logits (`selective_log_softmax_and_entropy` and "
          "`GRPOTrainer`'s loss; `GKDTrainer.generalized_jsd_loss`); `plain` plain PyTorch on fp32 "
          "logits (`log_softmax`, `gather`, the same loss). `tiedkernels-cpu` also returns the per-token "
          "entropy and TRL's logged metrics (clip ratios, KL); `trl` and `plain` compute the entropy "
          "(as TRL does), Liger does not.", ""]
    ok_t = ok_m = total = 0
    rows_t, rows_m = results.get("time", {}), results.get("memory", {})
    body = []
    for job in JOBS:
        body += [f"### {job} forward + backward", "",
                 "| case | provider | median (ms) | × liger | extra peak (MiB) | × liger |",
                 "|---|---|---:|---:|---:|---:|"]
        for c in cases(shapes=results.get("shapes_all", P.REPORT_SHAPES), dtypes=tuple(P.DTYPES), jobs=(job,)):
            key = c.to_json()
            t = rows_t.get(key)
            mem = rows_m.get(key, {})
            if t is None and not mem:
                continue
            med = t["median"] if t else {}
            lt, lm = med.get("liger"), mem.get("liger")
            me_t, me_m = med.get("tiedkernels-cpu"), mem.get("tiedkernels-cpu")
            if me_t is not None and lt is not None and me_m is not None and lm is not None:
                total += 1
                ok_t += me_t < lt
                ok_m += me_m < lm
            title = f"N={c.n} D={c.d} V={c.v} {c.dtype}" + (f" (load {t['load'][0][0]})" if t else "")
            for i, n in enumerate(PROVIDERS):
                if n not in med and n not in mem:
                    continue
                name = f"**{n}**" if n.startswith("tiedkernels") else n
                body.append(f"| {title if i == 0 else ''} | {name} | {_fmt_ms(med.get(n))} | "
                            f"{_ratio(med.get(n), lt)} | {_mib(mem.get(n))} | {_ratio(mem.get(n), lm)} |")
        body.append("")
    L += [f"**Target** (faster and leaner than Liger's chunked loss on every case): tiedkernels-cpu is faster on "
          f"{ok_t} and leaner on {ok_m} of the {total} cases with both figures.", ""]
    L += [NOTES, ""]
    if results.get("run_notes"):  # what happened in this machine's runs (set by hand in the json)
        L += [results["run_notes"].strip(), ""]
    L += body
    full = cases(shapes=[tuple(s) for s in results.get("shapes_all", P.REPORT_SHAPES)])
    missing = [c for c in full if c.to_json() not in rows_t and c.to_json() not in rows_m]
    if missing:
        by = {}
        for c in missing:
            by.setdefault((c.dtype, c.job), set()).add(list(map(list, results.get("shapes_all", P.REPORT_SHAPES))).index(
                [c.n, c.d, c.v]))
        L += ["**Not measured yet** (the full set does not fit the time this machine had): " +
              ", ".join(c.label for c in missing) + ". To add them (the figures merge into `results_rl.json`): " +
              "; ".join(f"`python -m benchmarks.rl_report --dtypes {dt} --jobs {job} --shapes "
                        f"{','.join(map(str, sorted(ix)))}`" for (dt, job), ix in sorted(by.items())) + ".", ""]
    L.append(END)
    return "\n".join(L)


def write_section(results, path):
    """Replace the text between the markers (added at the end when absent); nothing else changes."""
    from benchmarks import report as R

    R.write_marked_section(path, BEGIN, END, section(results))


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("time", "memory", "write"), help="one phase (results merge into the json)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (default 3)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated indices into providers.REPORT_SHAPES (default: all)")
    ap.add_argument("--dtypes", default=",".join(P.DTYPES), help="comma-separated dtypes (default: all)")
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs (default: grpo,jsd)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated providers")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the pipeline")
    ap.add_argument("--out", default=HERE, help="folder for results_rl.json and RESULTS.md")
    ap.add_argument("--memory-cell", nargs=2, metavar=("PROVIDER", "CASE_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_cell:
        print(f"MEM {measure_here(args.memory_cell[0], RLCase.from_json(args.memory_cell[1]))}", flush=True)
        return
    from benchmarks import report as R

    all_shapes = CI_SHAPES if args.quick else P.REPORT_SHAPES
    shapes = all_shapes if args.shapes is None else tuple(all_shapes[int(i)] for i in args.shapes.split(","))
    todo = cases(shapes, tuple(args.dtypes.split(",")), tuple(args.jobs.split(",")))
    names = [n for n in args.providers.split(",") if n in PROVIDERS]
    for n in names:
        if why_not(n):
            print(f"skipping {n}: {why_not(n)}", flush=True)
    names = [n for n in names if why_not(n) is None]
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, "results_rl.json")
    results = {}
    if os.path.exists(raw):
        with open(raw) as f:
            results = json.load(f)
        if results.get("quick", False) != args.quick:
            results = {}
    results["quick"] = args.quick
    results["shapes_all"] = [list(s) for s in all_shapes]

    def log(msg):
        print(msg, flush=True)

    def save():
        with open(raw, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)

    start, load_start = datetime.datetime.now().isoformat(timespec="minutes"), loadavg()
    for c in todo:
        if args.only == "write":
            break
        if args.only in (None, "time"):
            results["machine"], results["versions"] = R.machine(), R.versions()
            results["threads"], results["rounds"] = torch.get_num_threads(), args.rounds
            results.setdefault("time", {})[c.to_json()] = time_case(c, names, args.rounds, log)
            save()
        if args.only in (None, "memory"):
            mem = results.setdefault("memory", {}).setdefault(c.to_json(), {})
            for n in names:
                try:
                    mem[n] = measure_fresh(n, c)
                    log(f"    memory {n:<16} {mem[n] / 2**20:10.1f} MiB")
                except Exception as e:  # noqa: BLE001
                    mem[n] = None
                    log(f"    memory {n:<16} failed: {str(e)[-400:]}")
                save()
    if args.only != "write" and todo:
        what = (f"{args.only or 'time and memory'}: {len(todo)} cases, jobs {args.jobs}, dtypes {args.dtypes}, "
                f"shapes {' '.join('x'.join(map(str, s)) for s in shapes)}")
        results.setdefault("runs", []).append({"what": what, "start": start, "load_start": load_start,
                                               "end": datetime.datetime.now().isoformat(timespec="minutes"),
                                               "load_end": loadavg()})
        save()
    if not args.quick or args.out != HERE:
        write_section(results, os.path.join(args.out, "RESULTS.md"))
        log(f"wrote {os.path.join(args.out, 'RESULTS.md')} (section {BEGIN} ... {END})")


if __name__ == "__main__":
    main()
