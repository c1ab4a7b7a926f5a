"""The versions tiedkernels is tested on (README, install section), and a check of the running ones.

The lower ends are enforced by pyproject.toml (``requires-python``, ``torch>=``); the upper ends are where the
tests stop, not a cap: a newer release may work, and ``python -m tiedkernels info`` says it is untested.
"""

import re

# name: (lowest, highest) tested, as release tuples; a highest of (a, b) covers every a.b.x.
SUPPORTED = {
    "python": ((3, 11), (3, 12)),
    "torch": ((2, 11), (2, 14, 1)),
    "triton": ((3, 6), (3, 9)),
    "transformers": ((4, 51), (5,)),
}


def _release(version):
    """'2.14.1+cu130' -> (2, 14, 1); '3.9.0rc1' -> (3, 9, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _fmt(t):
    return ".".join(map(str, t))


def describe(name):
    """'3.11-3.12', the tested range as text."""
    lo, hi = SUPPORTED[name]
    return f"{_fmt(lo)}-{_fmt(hi)}" + (".x" if len(hi) == 1 else "")


def check(name, version):
    """(inside the tested range?, text for `info`), e.g. (True, 'supported: 2.11-2.14.1')."""
    lo, hi = SUPPORTED[name]
    v = _release(version)
    ok = v[:len(lo)] >= lo and v[:len(hi)] <= hi
    if ok:
        return True, f"supported: {describe(name)}"
    side = "older than" if v[:len(lo)] < lo else "newer than"
    return False, f"OUTSIDE the tested range {describe(name)} ({side} it)"
