"""Logits that are never built: what the patched output layer returns while a model computes its loss
in a training step, and what that step hands back as its logits.

A Hugging Face forward with ``labels`` does ``logits = lm_head(hidden)``, maybe a few cheap
elementwise steps (``/ cap``, ``tanh``, ``* cap`` for Gemma 2, ``+ final_logits_bias`` for BART,
``* logit_scale`` for Cohere, ``/ logits_scaling`` for Granite, ``.float()``, ``.view(-1, V)``) and
then ``F.cross_entropy`` (directly, through ``CrossEntropyLoss`` or through the model's
``loss_function``). ``LazyLogits`` stands for that ``[*, V]`` tensor without storage: it records
those steps and, when ``F.cross_entropy`` is called on it, runs the fused projection +
cross-entropy on the hidden states with the recorded bias, scale and softcap. Any other use
(an operation it does not know) builds the real logits exactly as the stock model would and
carries on, with one warning: never a wrong value, at worst the memory of the stock model. The
patched forward returns it in the output (``out.logits``, or its place in the tuple), so the logits
are built only if the caller reads them; once the weight, the bias or the hidden states have changed
in place since the forward (an optimizer step), they can no longer be built exactly, and reading them
raises instead.

Under ``torch.compile`` a storage-less wrapper cannot be traced, so ``lazy_logits`` returns a
``TracedLazyLogits`` instead: the real logits (``F.linear`` of the hidden states, a graph node)
viewed as a subclass that records the same steps, each applied to the real tensor too. When the
recorded chain ends in ``F.cross_entropy``, the fused op computes the loss from the hidden states
and the real logits and their steps have no user left: the compiler drops them from the graph,
forward and backward, so the compiled step keeps the saving. Any other use reads the real
tensor, which is exactly what the stock model computed.
"""

import numbers
import warnings

import torch
import torch.nn.functional as F

_T = torch.Tensor

# Metadata queries answered by the wrapper itself (no data needed).
_META = [
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__, _T.layout.__get__,
    _T.requires_grad.__get__, _T.is_cuda.__get__, _T.is_sparse.__get__, _T.is_meta.__get__, _T.size, _T.dim,
    _T.numel, _T.is_floating_point, _T.is_complex, _T.__len__, _T.nelement, _T.element_size, _T.get_device,
    _T.is_contiguous, _T.grad_fn.__get__, _T.is_leaf.__get__, _T.is_quantized.__get__,
    _T.is_nested.__get__, _T.itemsize.__get__, _T.data_ptr,
]
_MUL = [_T.__mul__, _T.__rmul__, _T.mul, torch.mul, torch.multiply]
_DIV = [_T.__truediv__, _T.div, torch.div, torch.true_divide]
_ADD = [_T.__add__, _T.__radd__, _T.add, torch.add]
_TANH = [_T.tanh, torch.tanh, F.tanh]
_VIEW = [_T.view, _T.reshape, torch.reshape]
_IDENT = [_T.contiguous, _T.detach, _T.clone]
_CAST = [_T.float, _T.to, _T.type_as, _T.double, _T.half, _T.bfloat16]
_CE = [F.cross_entropy]

_warned = set()


def _is(func, group):
    return any(func == f for f in group)


def _scalar(x):
    """A Python number, or a one-element tensor that needs no gradient; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, torch.Tensor) and not isinstance(x, LazyLogits) and x.numel() == 1 and not x.requires_grad:
        return float(x)
    return None


class LazyLogits(torch.Tensor):
    """``[*, V]`` logits of ``head`` applied to ``hidden``, followed by ``ops``, with no storage."""

    @staticmethod
    def __new__(cls, hidden, out, ops=(), dtype=None, stamp=None):
        v = out.weight.shape[0]
        shape = (*hidden.shape[:-1], v)
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or hidden.dtype, device=hidden.device,
                                                requires_grad=False)
        r._hidden = hidden
        r._out = out
        r._ops = tuple(ops)
        # What the logits are computed from, each with its version counter when the forward made them:
        # kept by every recorded step, checked before anything is computed from them. (A tensor made
        # under inference_mode has no version counter.)
        r._stamp = stamp if stamp is not None else (out.weight, out.bias, tuple(
            (t, t._version) for t in (out.weight, out.bias, hidden) if t is not None and not t.is_inference()))
        return r

    def _with(self, hidden=None, op=None, dtype=None, real=None):
        ops = self._ops + ((op,) if op is not None else ())
        return LazyLogits(self._hidden if hidden is None else hidden, self._out, ops, dtype=dtype or self.dtype,
                          stamp=self._stamp)

    def _check_unchanged(self):
        """Raise when the weight, the bias or the hidden states are no longer what the forward read
        (replaced, or changed in place, e.g. by an optimizer step): the stock logits of that forward
        cannot be built from them any more."""
        weight, bias, versions = self._stamp
        if self._out.weight is not weight or self._out.bias is not bias or any(t._version != v for t, v in versions):
            raise RuntimeError("tiedkernels.hf: these logits of a patched model's training step were not built, and "
                               "the output weight, bias or hidden states changed since that forward (e.g. an "
                               "optimizer step), so they cannot be built exactly any more; read the logits before "
                               "changing the model, or call the model with return_logits=True")

    def __repr__(self, *, tensor_contents=None):
        return f"LazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, ops={[o[0] for o in self._ops]})"

    # -- building the real thing --------------------------------------------------------
    def materialize(self):
        """The logits exactly as the stock model computes them."""
        self._check_unchanged()
        out = self._out
        t = out.real_forward(self._hidden)
        for kind, val in self._ops:
            if kind == "mul":
                t = t * val
            elif kind == "div":
                t = t / val
            elif kind == "add":
                t = t + val
            elif kind == "tanh":
                t = torch.tanh(t)
            elif kind == "cast":
                t = t.to(val)
        return t

    def _canonical(self, values=True):
        """(bias, logit_scale, softcap) with ``softcap(scale * (h W^T + bias))`` equal to the recorded
        steps, or None when the steps do not have that form.  ``values=False`` checks the form only,
        reading no parameter (under ZeRO-3 the output layer's parameters are partitions outside its
        forward)."""
        bias = self._out.bias if values else None
        scale = 1.0
        cap = None
        state = "affine"
        for kind, val in self._ops:
            if kind == "cast":
                continue
            if state == "affine":
                if kind == "mul":
                    scale *= val
                elif kind == "div":
                    scale /= val
                elif kind == "add" and values:
                    add = val.reshape(-1).to(self._out.weight.dtype)
                    add = add if scale == 1.0 else add / scale
                    bias = add if bias is None else bias + add
                elif kind == "tanh":
                    state = "tanh"
            elif state == "tanh" and kind == "mul" and val > 0:
                cap = val
                scale *= val
                state = "capped"
            else:
                return None
        if state == "tanh" or scale == 0.0:
            return None
        return bias, scale, cap

    def _cross_entropy(self, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                       reduction="mean", label_smoothing=0.0):
        if (self._canonical(values=False) is None or weight is not None or size_average is not None
                or reduce is not None or self.dim() != 2 or target.dim() != 1 or target.shape[0] != self.shape[0]
                or target.dtype not in (torch.int64, torch.int32)):
            return None
        opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        if isinstance(self, TracedLazyLogits):
            return self.fused_loss(target, opts)
        self._check_unchanged()
        # Through the output layer's own call: whatever gathers its parameters around a module's
        # forward and backward (DeepSpeed ZeRO-3's hooks) sees the loss read them.
        return self._out(self._hidden, _lazy_loss=(self, target, opts))

    def fused_loss(self, target, opts):
        """The fused loss of these logits (``_cross_entropy`` has checked the form)."""
        bias, scale, cap = self._canonical()
        loss = self._out.head.loss(self._hidden, target.to(self._hidden.device), bias=bias, logit_scale=scale,
                                   softcap=cap, **opts)
        if self.dtype in (torch.float32, torch.float64) and loss.dtype != self.dtype:
            loss = loss.to(self.dtype)  # the dtype the stock loss has (e.g. ``logits.float()``)
        return loss

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every use is intercepted by __torch_function__ first; getting here means torch functions
        # were disabled around the call, and building logits below autograd would lose gradients.
        raise RuntimeError(f"tiedkernels.hf: {func} reached LazyLogits below autograd; call "
                           "materialize() on the logits first")

    # -- the recorded operations --------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is(func, _META):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _T.__repr__:
            return args[0].__repr__()
        res = _try_lazy(func, args, kwargs)
        if res is not NotImplemented:
            return res
        args, kwargs = _materialize_all(args), _materialize_all(kwargs)  # raises where they cannot be built
        name = getattr(func, "__name__", str(func))
        if name not in _warned and not torch.compiler.is_compiling():
            _warned.add(name)
            warnings.warn(f"tiedkernels.hf: {name} on the logits of a patched model builds the full logits "
                          "(the result is exact, the memory saving is lost for this call)", stacklevel=3)
        return func(*args, **kwargs)


class TracedLazyLogits(LazyLogits):
    """What ``lazy_logits`` returns under ``torch.compile``: the real logits (a graph node), viewed as
    a subclass that records the steps like ``LazyLogits``. Each recorded step is applied to the real
    tensor as well (``_real``), so every value it hands out is the stock one; when the fused loss is
    taken, those nodes are dead and the compiler removes them."""

    # A plain tensor underneath: no Python dispatch key (Dynamo traces __torch_function__ only).
    __torch_dispatch__ = torch._C._disabled_torch_dispatch_impl

    @staticmethod
    def __new__(cls, hidden, out, ops=(), dtype=None, real=None):
        raise TypeError("TracedLazyLogits is built by tiedkernels.hf._lazy.lazy_logits")

    @staticmethod
    def _make(real, hidden, out, ops):
        r = real.as_subclass(TracedLazyLogits)
        r._real = real
        r._hidden = hidden
        r._out = out
        r._ops = tuple(ops)
        return r

    def _with(self, hidden=None, op=None, dtype=None, real=None):
        ops = self._ops + ((op,) if op is not None else ())
        return TracedLazyLogits._make(real, self._hidden if hidden is None else hidden, self._out, ops)

    def materialize(self):
        return self._real

    def __repr__(self, *, tensor_contents=None):
        return f"TracedLazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, ops={[o[0] for o in self._ops]})"


def lazy_logits(hidden, out):
    """The placeholder logits of output layer ``out`` (an ``HFTiedOutput``) on ``hidden``: a
    storage-less ``LazyLogits`` in eager mode, a ``TracedLazyLogits`` while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return TracedLazyLogits._make(out.real_forward(hidden), hidden, out, ())
    return LazyLogits(hidden, out)


def _try_lazy(func, args, kwargs):
    if not args or not isinstance(args[0], LazyLogits):
        if _is(func, _ADD + _MUL) and len(args) == 2 and isinstance(args[1], LazyLogits):
            args = (args[1], args[0])  # commutative: a + lazy, s * lazy
        else:
            return NotImplemented
    x = args[0]
    rest = args[1:]
    traced = isinstance(x, TracedLazyLogits)
    if traced and not _is(func, _CE):
        # The real result of the step (the stock value), recorded along with the step below.
        with torch._C.DisableTorchFunctionSubclass():
            real = func(*_materialize_all(args), **_materialize_all(kwargs))
    else:
        real = None
    if _is(func, _CE):
        if len(rest) < 1 and "target" not in kwargs:
            return NotImplemented
        target = rest[0] if rest else kwargs.pop("target")
        names = ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        opts = dict(zip(names, rest[1:]))
        opts.update(kwargs)
        res = x._cross_entropy(target, **opts)
        return NotImplemented if res is None else res
    if _is(func, _IDENT) and not rest and not kwargs:
        return x._with(real=real) if traced else x
    if func == _T.view_as and len(rest) == 1 and not kwargs and isinstance(rest[0], torch.Tensor) \
            and tuple(rest[0].shape) == tuple(x.shape):
        # What autograd does to a custom Function's output that is its input (DeepSpeed ZeRO-3 hands
        # every module output through one): a new object, same logits.
        return x._with(real=real)
    if _is(func, _CAST):
        dtype = _cast_dtype(func, x, rest, kwargs)
        if dtype is None:
            return NotImplemented
        return x._with(op=("cast", dtype), dtype=dtype, real=real)
    if _is(func, _TANH) and not rest and not kwargs:
        return x._with(op=("tanh", None), real=real)
    if _is(func, _MUL) and len(rest) == 1 and not kwargs:
        s = _scalar(rest[0])
        return NotImplemented if s is None else x._with(op=("mul", s), real=real)
    if _is(func, _DIV) and len(rest) == 1 and not kwargs:
        s = _scalar(rest[0])
        return NotImplemented if s is None or s == 0.0 else x._with(op=("div", s), real=real)
    if _is(func, _ADD) and len(rest) == 1 and not kwargs:
        b = rest[0]
        v = x.shape[-1]
        if (isinstance(b, torch.Tensor) and not isinstance(b, LazyLogits) and b.numel() == v and b.dim() >= 1
                and b.shape[-1] == v and b.device == x.device):
            return x._with(op=("add", b), real=real)
        return NotImplemented
    if _is(func, _VIEW):
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        if kwargs or not shape:
            return NotImplemented
        shape = [int(s) for s in shape]
        v = x.shape[-1]
        if shape[-1] == -1 and -1 not in shape[:-1]:
            shape[-1] = v
        if shape[-1] != v:
            return NotImplemented
        try:
            h = x._hidden.reshape(*shape[:-1], x._hidden.shape[-1])
        except RuntimeError:
            return NotImplemented
        return x._with(hidden=h, real=real)
    if func == _T.__getitem__ and len(rest) == 1:
        idx = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        if not _keeps_last_dim(idx, x.dim()):
            return NotImplemented
        return x._with(hidden=x._hidden[rest[0]], real=real)
    return NotImplemented


def _keeps_last_dim(idx, ndim):
    """True when ``idx`` selects rows only: it leaves the last dimension whole."""
    full = slice(None)
    if any(i is None or isinstance(i, bool) for i in idx):
        return False
    if any(isinstance(i, torch.Tensor) for i in idx):
        return False
    n_ell = sum(1 for i in idx if i is Ellipsis)
    if n_ell > 1:
        return False
    if n_ell == 1:
        return idx[-1] == full if idx[-1] is not Ellipsis else True
    if len(idx) < ndim:
        return True
    return len(idx) == ndim and idx[-1] == full


def _cast_dtype(func, x, rest, kwargs):
    if func == _T.float:
        return torch.float32
    if func == _T.double:
        return torch.float64
    if func == _T.half:
        return torch.float16
    if func == _T.bfloat16:
        return torch.bfloat16
    if func == _T.type_as:
        return rest[0].dtype if rest and isinstance(rest[0], torch.Tensor) and rest[0].device == x.device else None
    # Tensor.to(dtype) / to(device) / to(device, dtype) / to(tensor), on the same device only
    dtype = kwargs.get("dtype")
    device = kwargs.get("device")
    if set(kwargs) - {"dtype", "device", "non_blocking", "copy"}:
        return None
    for a in rest:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)):
            device = a
        elif isinstance(a, torch.Tensor):
            dtype, device = a.dtype, a.device
        elif isinstance(a, bool):
            continue
        else:
            return None
    if device is not None and torch.device(device) != x.device:
        if not (torch.device(device).type == x.device.type and torch.device(device).index is None):
            return None
    if dtype is not None and not dtype.is_floating_point:
        return None
    return dtype or x.dtype


def _materialize_all(obj):
    if isinstance(obj, LazyLogits):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize_all(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialize_all(v) for k, v in obj.items()}
    return obj
