"""The patched model's forward: in training mode with ``labels`` the output layer returns ``LazyLogits``
and the loss fuses; in eval mode the stock forward runs and returns the real logits.

What the caller gets is stock's output, position by position, in the tuple and the dict form alike:
in eager training mode the logits entry holds the ``LazyLogits`` itself (the exact stock logits are built
the first time anything else reads it, with one warning), so ``model(..., return_dict=False)`` equals
``model(...).to_tuple()`` as it does for the stock model. Under ``torch.compile`` the entry is dropped
from both forms the same way (``logits=None`` in the dict, no element in the tuple): a traced output
would keep the logits in the graph and lose the compiled step's saving.
"""

import functools
import warnings

import torch

from ._lazy import LazyLogits
from ._modules import HFTiedOutput
from ._state import _STATE


def _drop_traced(output):
    """``output`` without its ``TracedLazyLogits`` entries: removed from a tuple, ``None`` in a
    ``ModelOutput`` (whose ``to_tuple()`` then leaves it out), so the two forms still agree."""
    if isinstance(output, tuple):
        if type(output) is not tuple:
            return output
        return tuple(o for o in output if not isinstance(o, LazyLogits))
    try:
        keys = list(output.keys())
    except AttributeError:
        return output
    if any(isinstance(output[k], LazyLogits) for k in keys):
        return type(output)(**{k: output[k] for k in keys if not isinstance(output[k], LazyLogits)})
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
    # Only a training step fuses. In eval mode the caller reads the logits (Trainer.evaluate hands
    # them to compute_metrics): the stock forward runs, real logits and the stock loss.
    lazy = st.fused_loss and self.training and labels is not None and not rl
    out_mod = self.get_output_embeddings()
    if not isinstance(out_mod, HFTiedOutput):
        lazy = False
    if not lazy:
        return type(self).forward(self, *args, **kwargs)
    prev = out_mod.__dict__.get("lazy", False)
    out_mod.__dict__["lazy"] = True
    # patch(model, grad_filter=...) reaches the fused loss through the head's loss (this call only)
    head = out_mod.head
    prev_filter = head.__dict__.get("grad_filter")
    head.__dict__["grad_filter"] = getattr(st, "grad_filter", None)
    calls = []
    # Dynamo cannot trace registering a hook (a graph break under fullgraph): the check that the
    # output layer was called runs in eager mode only.
    compiling = torch.compiler.is_compiling()
    hook = None if compiling else out_mod.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        output = type(self).forward(self, *args, **kwargs)
    finally:
        out_mod.__dict__["lazy"] = prev
        head.__dict__["grad_filter"] = prev_filter
        if hook is not None:
            hook.remove()
    if compiling:
        return _drop_traced(output)
    if not calls:
        _warn_unfused(self)
    return output


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
