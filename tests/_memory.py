"""Peak host memory of a snippet, measured in a fresh process.

The child builds its inputs, records its resident set size, runs the step once and
reports ``ru_maxrss - baseline``.  ``MALLOC_MMAP_THRESHOLD_`` makes glibc return every
large freed buffer to the OS, so the peak is the peak of live tensors (plus small noise).
"""

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import json, resource, torch
torch.set_num_threads(1)
def _rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
"""

_MEASURE = """
if 'warmup' in globals():
    warmup()  # the same code paths on tiny inputs: library pages and lazy state are not the step's
base = _rss()
step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print('MEM ' + json.dumps({'extra': peak - base}))
"""


def extra_peak_bytes(setup):
    """``setup`` must define ``step()`` (and may define ``warmup()``); returns the peak bytes
    above the resident set size measured just before ``step()``."""
    code = _PRELUDE + textwrap.dedent(setup) + _MEASURE
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEM ")][-1]
    return json.loads(line[4:])["extra"]
