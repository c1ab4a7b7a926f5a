"""The ``triton`` backend: Triton kernels for the embedding, the logits and the fused loss.

Importing this package costs nothing: Triton itself and the kernels are imported the first
time the backend is asked whether it can run (``backends.resolve``) or for one of its ops.
The ops are ``torch.ops.tiedkernels.triton_<name>``, defined with ``torch.library.triton_op``
(kernels launched through ``wrap_triton``, see ``_common.launcher``), so ``torch.compile`` traces
into them; fake kernels and autograd come from ``tiedkernels.ops.register_prefix``.

Where it runs: tensors on a CUDA device, or CPU tensors when ``TRITON_INTERPRET=1`` was set
before the kernels were first loaded (the Triton interpreter, used by the tests).
"""

import importlib.util
import os

from .. import backends

PREFIX = "triton_"
_state = {"loaded": False, "error": None, "interpret": None}


def _interpret_env():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _find_triton_missing():
    try:
        return importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):
        return True


# Looked up once, at import (a path search; Triton is not imported): ``why_not`` runs inside
# ``torch.compile``'s trace when a compiled function picks the backend, and Dynamo before torch 2.13
# cannot trace ``find_spec`` (a graph break, an error under ``fullgraph=True``).
_MISSING = _find_triton_missing()


def _triton_missing():
    return _MISSING


def _interpreted(kernel):
    """Whether ``kernel`` and Triton's own library functions run in the interpreter: both are
    decided when they are defined, by TRITON_INTERPRET at that moment."""
    import triton.language as tl

    return type(kernel).__name__ == "InterpretedFunction" and type(tl.standard.zeros).__name__ == "InterpretedFunction"


def _keep_opaque_when_traced(opdefs):
    """Interpreted kernels cannot be traced into (wrap_triton hands them back unwrapped and they
    would run on fake tensors): under the interpreter, AOT tracing keeps each op as one node
    (its fake kernel gives the shapes) and runs the real body at run time."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for opdef in opdefs:
        opdef.register_torch_dispatch(FunctionalTensorMode, opaque)


def load():
    """Import Triton and define the ``triton_*`` ops (once). Returns None or the reason it failed."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["error"]
    if _triton_missing():
        _state["error"] = "Triton is not installed (pip install -r requirements/triton.txt)"
        return _state["error"]
    try:
        import triton  # noqa: F401

        from . import cross_entropy, embedding, logits  # noqa: F401  (define the ops)
        from .. import ops

        _state["interpret"] = _interpreted(cross_entropy._stats_kernel)
        if _state["interpret"]:
            _keep_opaque_when_traced(embedding.OPS + logits.OPS + cross_entropy.OPS)

        ops.register_prefix(PREFIX)
    except Exception as e:  # a broken Triton install: say why, never break `import tiedkernels`
        _state["error"] = f"Triton could not be loaded ({type(e).__name__}: {e})"
        return _state["error"]
    _state["loaded"] = True
    return None


def why_not(device_type):
    """None when the Triton kernels can run on tensors of ``device_type``, else the reason."""
    if _triton_missing():
        return "Triton is not installed (pip install -r requirements/triton.txt)"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is available"
        err = load()
        if err is not None:
            return err
        if _state["interpret"]:
            return "the kernels were loaded with TRITON_INTERPRET=1 (CPU interpreter); unset it for GPU runs"
        return None
    if device_type == "cpu":
        if not _interpret_env():
            return "Triton kernels run on CUDA tensors; on CPU tensors only with TRITON_INTERPRET=1 (the interpreter)"
        err = load()
        if err is not None:
            return err
        if not _state["interpret"]:
            return "TRITON_INTERPRET=1 was set after Triton was imported; set it before the first import"
        return None
    if device_type == "meta":
        return load()
    return f"Triton kernels do not run on {device_type} tensors"


class TritonBackend(backends.Backend):
    """Loads the kernels on first use of an op, so that a direct ``op(name)`` works too."""

    def op(self, name):
        err = load()
        if err is not None:
            raise RuntimeError(f"tiedkernels: backend 'triton' cannot run here: {err}")
        return super().op(name)


backends.register(TritonBackend("triton", PREFIX, why_not))
