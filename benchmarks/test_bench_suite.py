"""Every job (embedding forward and backward, logits, fused loss forward and forward+backward)
against every provider of ``benchmarks/providers.py``, timed with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/test_bench_suite.py --benchmark-only              # CI shapes
    .venv/bin/python -m pytest benchmarks/test_bench_suite.py --benchmark-only --bench-set report

The CI set (default) runs each job at a tiny shape in fp32 and bf16, so the suite runs in seconds
and breaks when a provider does; the compiled providers (``compile``, ``cce``) compile once per
job and dtype, so the CI set runs them on the fused loss in fp32 only. The report set is the
issue's shapes; ``python -m benchmarks.report`` times it with interleaved rounds and writes
``benchmarks/RESULTS.md``.
"""

import pytest
import torch

from benchmarks import providers as P

_COMPILED = {"compile", "cce"}


def cases_for(which):
    out = []
    if which in ("ci", "all"):
        out += [P.Case(k, *s, dt) for s in P.CI_SHAPES for dt in P.DTYPES for k in P.KINDS]
    if which in ("report", "all"):
        out += [P.Case(k, *s, dt) for dt in P.DTYPES for s in P.REPORT_SHAPES for k in P.KINDS]
    return out


def cells_for(which):
    """(provider, case) pairs: every provider on every job it implements; CUDA-only providers are
    listed once per job and skipped off CUDA, so the table says they exist."""
    out = []
    for case in cases_for(which):
        tiny = case.n * case.v <= 1 << 20
        for p in P.providers():
            if case.kind not in p.kinds:
                continue
            if tiny and p.name in _COMPILED and (case.kind != "loss_fwdbwd" or case.dtype != "float32"):
                continue  # CI set: one compile per compiled provider
            marks = []
            if p.name in ("liger", "cce-triton"):
                if case.dtype != "float32":
                    continue
                marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{p.name} runs on CUDA only"))
            out.append(pytest.param(p.name, case, marks=marks, id=f"{p.name}-{case.label.replace(' ', '-')}"))
    return out


def test_bench(benchmark, provider, case):
    p = P.get(provider)
    reason = p.reason(case)
    if reason is not None:
        pytest.skip(reason)
    tiny = case.n * case.v <= 1 << 20
    step = P.build(p, case)
    benchmark.group = case.label
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["case"] = case.label
    rounds = 5 if tiny else 3
    benchmark.pedantic(step.run, rounds=rounds, iterations=1, warmup_rounds=1)
    step.reset()
