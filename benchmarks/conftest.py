"""Options of the benchmark suite, and ratios against the floor timed in the same run, printed
after the benchmark table.

Each benchmark sets ``benchmark.group`` (the case) and ``benchmark.extra_info["provider"]``; the
floor of a group (``gemm3``: the three GEMMs of the same shapes, or ``gemm1`` for a forward only)
and ``plain`` (plain PyTorch) are the denominators.

``--bench-set ci`` (the default) runs every job at a tiny shape, so the suite runs in seconds and
never rots; ``--bench-set report`` runs the report set (slow: minutes); ``all`` both.
"""


def pytest_addoption(parser):
    group = parser.getgroup("tiedkernels benchmarks")
    group.addoption("--bench-set", choices=("ci", "report", "all"), default="ci",
                    help="which cases benchmarks/test_bench_suite.py runs (default: ci, tiny shapes)")


def pytest_generate_tests(metafunc):
    if {"provider", "case"} <= set(metafunc.fixturenames) and hasattr(metafunc.module, "cells_for"):
        cells = metafunc.module.cells_for(metafunc.config.getoption("--bench-set"))
        metafunc.parametrize("provider,case", cells)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        stats = getattr(bench.stats, "stats", bench.stats)  # Metadata wraps Stats in some versions
        if not stats or not getattr(stats, "data", None):
            continue
        groups.setdefault(bench.group, {})[bench.extra_info.get("provider", bench.name)] = stats.median
    tr = terminalreporter
    tr.section("medians and ratios (same run)")
    for group, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        floor_name = "gemm3" if "gemm3" in rows else "gemm1"
        floor = rows.get(floor_name)
        plain = rows.get("plain")
        tr.write_line(f"{group}:")
        for provider, median in sorted(rows.items(), key=lambda kv: kv[1]):
            parts = [f"  {provider:<22} median {median * 1e3:10.1f} ms"]
            if floor:
                parts.append(f"{median / floor:6.3f}x {floor_name}")
            if plain:
                parts.append(f"{median / plain:6.3f}x plain PyTorch")
            tr.write_line("   ".join(parts))
