"""The backends that run on CPU tensors here (an unbuilt extension drops "cpu"; `python -m
tiedkernels info` says why). A module of its own: test files import it by a name no other
folder's conftest shadows."""

from tiedkernels import backends as _backends

BACKENDS_CPU = [b for b in ("cpu", "torch") if _backends.why_not(b, "cpu") is None]
