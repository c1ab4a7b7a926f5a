"""The RL and distillation objectives (GRPO, generalised JSD; forward + backward) against Liger Kernel's
chunked losses, TRL's computation on full logits and plain PyTorch, timed with pytest-benchmark.

    .venv/bin/python -m pytest benchmarks/test_bench_rl.py --benchmark-only                    # CI shape
    .venv/bin/python -m pytest benchmarks/test_bench_rl.py --benchmark-only --bench-set report

The cases and providers are ``benchmarks/rl_report.py``'s (the same math for every provider: see its
docstring and tests/test_rl_peers.py); ``python -m benchmarks.rl_report`` times the report set in
interleaved rounds, measures peak memory and writes its section of ``benchmarks/RESULTS.md``. The CI set
(default, and what ``make test`` runs once with ``--benchmark-disable``) is one tiny shape in fp32 and
bf16; the liger and trl providers are skipped, with the reason, where they are not installed.
"""

import pytest

from benchmarks import providers as P
from benchmarks import rl_report as RL


def cases_for(which):
    out = []
    if which in ("ci", "all"):
        out += RL.cases(RL.CI_SHAPES)
    if which in ("report", "all"):
        out += RL.cases(P.REPORT_SHAPES)
    return out


def cells_for(which):
    """(provider, case) pairs for the conftest's parametrisation: every provider on every case."""
    return [pytest.param(p, c, id=f"{p}-{c.label.replace(' ', '-')}") for c in cases_for(which) for p in RL.PROVIDERS]


_INPUTS = {}


def _inputs(case):
    """One set of inputs per case, shared by its providers (the report shapes' weights are large)."""
    if case not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[case] = RL.Inputs(case)
    return _INPUTS[case]


def test_bench_rl(benchmark, provider, case):
    reason = RL.why_not(provider)
    if reason is not None:
        pytest.skip(reason)
    step = RL.build(provider, case, _inputs(case))
    benchmark.group = case.label
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["case"] = case.label
    tiny = case.n * case.v <= 1 << 20
    benchmark.pedantic(step.run, rounds=5 if tiny else 3, iterations=1, warmup_rounds=1)
    step.reset()
