"""Loading the compiled extension: a failure is remembered and reported once, never raised."""

import warnings

_module = None
_error = None
_tried = False
_info = None


def load():
    """The compiled module (which registers the C++ ops), or None with the reason kept."""
    global _module, _error, _tried, _info
    if _tried:
        return _module
    _tried = True
    try:
        from tiedkernels import _C  # noqa: F401  (importing registers the ops)

        _module = _C
        _info = dict(_C.build_info())  # read once: plain data is cheap to consult while tracing
    except Exception as e:  # ImportError, or a broken build (undefined symbol, ABI mismatch)
        _error = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"tiedkernels: the compiled extension did not load ({_error}); using the pure-PyTorch "
            "backend. Rebuild with `pip install --no-build-isolation -e .` or see `python -m tiedkernels info`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module


def error():
    """Why the extension is not loaded, or None."""
    load()
    return _error


def build_info():
    load()
    return _info
