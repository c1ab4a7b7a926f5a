"""Backends and how one is chosen.

Each backend is a set of ops with the same signatures (see ``_schemas.py``); the
dispatcher routes the compiled ``cpu``/``cuda`` ops by device, and the Python-defined
backends register prefixed copies.  ``resolve`` picks one per call:

* an explicit ``backend=`` (or ``TIEDKERNELS_BACKEND`` when the call says ``auto``) must be
  met or it raises with the reason;
* ``auto`` takes the first available backend of the device's preference list and warns
  once when it had to fall back.
"""

import os
import warnings

import torch

from . import _ext

NAMES = ("cuda", "triton", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_warned = set()


class Backend:
    """A named set of ops plus a predicate saying why it cannot run on a device."""

    def __init__(self, name, prefix, why_not):
        self.name = name
        self.prefix = prefix
        self._why_not = why_not

    def why_not(self, device_type):
        """None when usable for tensors on ``device_type``, else the reason."""
        return self._why_not(device_type)

    def op(self, name):
        return getattr(torch.ops.tiedkernels, self.prefix + name).default

    def __repr__(self):
        return f"Backend({self.name!r})"


def _compiled_why_not(kind):
    def why_not(device_type):
        info = _ext.build_info()
        if info is None:
            return f"the compiled extension is not loaded ({_ext.error()})"
        if kind == "cuda" and not info.get("cuda"):
            return "the extension was built without the CUDA sources"
        if kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type not in (kind, "meta"):
            return f"it runs on {kind} tensors, these are on {device_type}"
        return None

    return why_not


def _torch_why_not(device_type):
    return None


_REGISTRY = {
    "cpu": Backend("cpu", "", _compiled_why_not("cpu")),
    "cuda": Backend("cuda", "", _compiled_why_not("cuda")),
    "torch": Backend("torch", "torch_", _torch_why_not),
}


def register(backend):
    """Add a backend (the Triton kernels register themselves this way)."""
    _REGISTRY[backend.name] = backend


def get(name):
    return _REGISTRY.get(name)


def why_not(name, device_type):
    b = _REGISTRY.get(name)
    if b is None:
        if name == "triton":
            return "the Triton kernels are not part of this version"
        return f"unknown backend {name!r}"
    return b.why_not(device_type)


def resolve(backend, device):
    """The Backend to run on tensors on ``device`` for the request ``backend``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    requested = backend or "auto"
    if requested == "auto":
        env = os.environ.get("TIEDKERNELS_BACKEND", "").strip()
        if env and env != "auto":
            requested = env
    if requested != "auto":
        if requested not in NAMES:
            raise ValueError(f"tiedkernels: unknown backend {requested!r}; choose one of {NAMES + ('auto',)}")
        reason = why_not(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"tiedkernels: backend {requested!r} cannot run here: {reason}")
        return _REGISTRY[requested]
    order = _AUTO_ORDER.get(device_type, ("torch",))
    skipped = []
    for name in order:
        reason = why_not(name, device_type)
        if reason is None:
            if skipped and order[0] not in _warned:
                _warned.add(order[0])
                detail = "; ".join(f"{n}: {r}" for n, r in skipped)
                warnings.warn(f"tiedkernels: backend 'auto' is using {name!r} ({detail})", RuntimeWarning,
                              stacklevel=3)
            return _REGISTRY[name]
        skipped.append((name, reason))
    raise RuntimeError("tiedkernels: no backend can run here: " + "; ".join(f"{n}: {r}" for n, r in skipped))


def report(device_type=None):
    """{name: reason or None} for every backend on the given device type (default: each backend's own)."""
    out = {}
    for name in NAMES:
        dt = device_type or ("cuda" if name in ("cuda", "triton") else "cpu")
        out[name] = why_not(name, dt)
    return out
