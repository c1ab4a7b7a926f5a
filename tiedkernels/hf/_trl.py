"""TRL's fused LM head on a patched model: the tiedkernels op computes it.

TRL's trainers (``SFTTrainer`` and others) call ``add_fused_lm_head``: with ``fused_lm_head=True`` the model's
forward runs the backbone and hands the hidden states, ``lm_head.weight`` and ``lm_head.bias`` to TRL's
``ChunkedLogProbFunction`` for per-token log-probabilities, entropy and top-1 hits. ``install`` puts a
stand-in for that function into ``trl.trainer.utils``: when the weight is the tied weight of a model patched
now and the request is one this op answers exactly (the outputs ``log_probs``, ``entropy``, ``is_top1``; no
temperature together with a softcap, since TRL divides by the temperature after capping), the per-token loss
and the statistics come from one pass of ``linear_cross_entropy(..., reduction="none", return_stats=True)``;
anything else goes to TRL's own function unchanged. The entropy is a statistic of that pass: a gradient
through it raises (TRL's SFTTrainer only logs it).
"""

import inspect
import sys
import weakref

import torch

from ._state import fuses_loss

_ANSWERED = frozenset({"log_probs", "entropy", "is_top1"})
_SIGNATURE = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
              "logit_scale", "outputs")
# id(tied weight) -> (weakref to it, weakref to the patched model that owns it); tensors compare
# elementwise, so no WeakKeyDictionary
_models = {}


def register(model):
    """Called by ``patch``: ``model``'s tied weight is answered by this op inside TRL (once installed)."""
    w = model.get_output_embeddings().weight
    for k in [k for k, (wr, mr) in _models.items() if wr() is None or mr() is None]:
        del _models[k]
    _models[id(w)] = (weakref.ref(w), weakref.ref(model))
    install()


def _owner(weight):
    refs = _models.get(id(weight))
    if refs is None or refs[0]() is not weight:
        return None
    model = refs[1]()
    if model is None or not fuses_loss(model):
        return None
    out = model.get_output_embeddings()
    return model if out is not None and out.weight is weight else None


class _EntropyNoGrad(torch.autograd.Function):
    """The entropy, attached to the graph through ``hidden`` only so that a gradient asked of it reaches
    ``backward`` and raises instead of being dropped."""

    @staticmethod
    def forward(ctx, entropy, hidden):
        ctx.set_materialize_grads(False)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None:
            raise NotImplementedError("tiedkernels.hf: the entropy of TRL's fused head on a patched model is a "
                                      "statistic of the fused pass and has no gradient; unpatch the model (or "
                                      "compute the entropy from logits) to train through it")
        return None, None


class TiedLogProbFunction:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (same ``apply`` arguments and results)."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        args = (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
        temperature = float(temperature)
        owner = _owner(weight)
        if (owner is None or not set(outputs) <= _ANSWERED or temperature <= 0
                or (final_logit_softcapping is not None and temperature != 1.0)
                # TRL casts mixed dtypes to one compute dtype (cast_lm_head_to_fp32); this op takes one dtype
                or hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype)):
            return self.trl_function.apply(*args)
        from .. import functional as tkf

        head = owner.get_input_embeddings()
        stats = tkf.linear_cross_entropy(
            hidden, weight, targets, bias=bias, reduction="none", return_stats=True, ignore_index=-100,
            logit_scale=float(logit_scale) / temperature, softcap=final_logit_softcapping,
            backend=getattr(head, "backend", "auto"))
        log_probs = -stats.loss
        entropy = _EntropyNoGrad.apply(stats.entropy, hidden) if "entropy" in outputs else None
        is_top1 = stats.predictions == targets if "is_top1" in outputs else None
        return log_probs, entropy, None, None, is_top1


def install():
    """Put the stand-in into ``trl.trainer.utils`` if TRL is imported and its function has the arguments
    this stand-in knows; else leave TRL as it is. Idempotent."""
    if "trl" not in sys.modules:
        return False
    try:
        import trl.trainer.utils as tu
    except Exception:  # noqa: BLE001 - a TRL that does not import as expected is left alone
        return False
    fn = getattr(tu, "_ChunkedLogProbFunction", None)
    if fn is None:
        return False
    if isinstance(fn, TiedLogProbFunction):
        return True
    try:
        names = tuple(inspect.signature(fn.forward).parameters)
    except (TypeError, ValueError):
        return False
    if names != _SIGNATURE:
        return False
    tu._ChunkedLogProbFunction = TiedLogProbFunction(fn)
    return True
