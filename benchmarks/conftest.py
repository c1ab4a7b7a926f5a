"""Ratios against the baseline timed in the same run, printed after the benchmark table.

Each benchmark sets ``benchmark.group`` and ``benchmark.extra_info["provider"]``; the
provider named ``baseline`` in a group (the three GEMMs of the same shapes, or plain
PyTorch) is the denominator.
"""


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
        gemm = rows.get("gemm3")
        plain = rows.get("plain")
        tr.write_line(f"{group}:")
        for provider, median in sorted(rows.items(), key=lambda kv: kv[1]):
            parts = [f"  {provider:<22} median {median * 1e3:10.1f} ms"]
            if gemm:
                parts.append(f"{median / gemm:6.3f}x three GEMMs")
            if plain:
                parts.append(f"{median / plain:6.3f}x plain PyTorch")
            tr.write_line("   ".join(parts))
