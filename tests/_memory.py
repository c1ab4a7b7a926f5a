"""Peak host memory of a snippet, measured in a fresh process.

The child builds its inputs, resets its peak resident set size to the current one
(``/proc/self/clear_refs``), runs the step once and reports ``VmHWM`` minus the ``VmRSS`` it
had before.  (``ru_maxrss`` would not do: Linux carries the parent's peak over fork/exec.)
``MALLOC_MMAP_THRESHOLD_`` makes glibc return every large freed buffer to the OS, so the
peak is the peak of live tensors (plus small noise).
"""

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import json, torch
torch.set_num_threads(1)
def _status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
def _reset_peak():
    # ru_maxrss would carry the parent's peak over fork/exec; VmHWM can be reset to now.
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
"""

_MEASURE = """
if 'warmup' in globals():
    warmup()  # the same code paths on tiny inputs: library pages and lazy state are not the step's
_reset_peak()
base = _status('VmRSS')
step()
peak = _status('VmHWM')
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
