"""The patched model's forward: with ``labels`` the output layer returns ``LazyLogits`` and the loss fuses."""

import functools
import warnings

import torch

from ._lazy import LazyLogits
from ._modules import HFTiedOutput
from ._state import _STATE


def _strip_lazy(output):
    if output is None:
        return output
    if isinstance(output, tuple):
        return type(output)(None if isinstance(o, LazyLogits) else o for o in output) \
            if type(output) is tuple else output
    try:
        keys = list(output.keys())
    except AttributeError:
        return output
    if any(isinstance(output[k], LazyLogits) for k in keys):
        cls = type(output)
        return cls(**{k: output[k] for k in keys if not isinstance(output[k], LazyLogits)})
    return output


def forward_like(cls_forward):
    """The patched forward with the stock one's name, docstring and signature: Trainer and PEFT read
    ``inspect.signature(model.forward)`` to pick the batch columns and loss kwargs."""

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    return forward


def _patched_forward(self, *args, **kwargs):
    st = self.__dict__[_STATE]
    rl = kwargs.pop("return_logits", None)
    rl = st.return_logits if rl is None else rl
    labels = kwargs.get("labels")
    if labels is None and st.labels_pos is not None and len(args) > st.labels_pos:
        labels = args[st.labels_pos]
    lazy = st.fused_loss and labels is not None and not rl
    out_mod = self.get_output_embeddings()
    if not isinstance(out_mod, HFTiedOutput):
        lazy = False
    if not lazy:
        return type(self).forward(self, *args, **kwargs)
    prev = out_mod.__dict__.get("lazy", False)
    out_mod.__dict__["lazy"] = True
    calls = []
    # Dynamo cannot trace registering a hook (a graph break under fullgraph): the check that the
    # output layer was called runs in eager mode only.
    compiling = torch.compiler.is_compiling()
    hook = None if compiling else out_mod.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        output = type(self).forward(self, *args, **kwargs)
    finally:
        out_mod.__dict__["lazy"] = prev
        if hook is not None:
            hook.remove()
    if not calls and not compiling:
        _warn_unfused(self)
    return _strip_lazy(output)


_warned_unfused = set()


def _warn_unfused(model):
    """The model computed its loss without calling its output embeddings (MobileBERT's head multiplies
    by ``decoder.weight`` itself): the loss is the stock one, from full logits. Said once per class."""
    name = type(model).__name__
    if name in _warned_unfused:
        return
    _warned_unfused.add(name)
    warnings.warn(f"tiedkernels.hf: {name} does not call its output embeddings to build its logits (its head "
                  "reads the weight itself), so its loss does not fuse: the full logits are built and the "
                  "loss is the stock one (exact, without the memory saving)", stacklevel=3)
