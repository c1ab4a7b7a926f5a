"""TRL's fused LM head and its chunked distillation divergence on a patched model: tiedkernels computes them.

TRL's trainers (``SFTTrainer`` and others) call ``add_fused_lm_head``: with ``fused_lm_head=True`` the model's
forward runs the backbone and hands the hidden states, ``lm_head.weight`` and ``lm_head.bias`` to TRL's
``ChunkedLogProbFunction`` for per-token log-probabilities, entropy and top-1 hits. ``install`` puts a
stand-in for that function into ``trl.trainer.utils``: when the weight is the tied weight of a model patched
now and the request is one this op answers exactly (the outputs ``log_probs``, ``entropy``, ``is_top1``; no
temperature together with a softcap, since TRL divides by the temperature after capping), the per-token loss
and the statistics come from one pass of ``linear_cross_entropy(..., reduction="none", return_stats=True)``;
anything else goes to TRL's own function unchanged. Where the top-1 hits are asked for (SFTTrainer) the entropy
is a statistic of that pass and a gradient through it raises (SFTTrainer only logs it); where only log-probs
and entropy are (GRPOTrainer, which may train through the entropy: its bonus), both come from
``token_log_probs``, each with its gradient, and a temperature may follow a softcap as in TRL.

``DistillationTrainer`` projects the student's and the teacher's hidden states through
``ChunkedDivergenceFunction``; ``TiedDivergenceFunction`` stands in for it when the student's head weight is
a patched model's tied weight: ``linear_distillation_loss(..., reduction="none")`` computes the per-token
divergence (TRL's ``beta``, temperature, scales and softcaps) and the student's entropy.
"""

import inspect
import sys
import weakref

import torch

from ._state import _STATE, fuses_loss

_ANSWERED = frozenset({"log_probs", "entropy", "is_top1"})
_DIFFERENTIABLE = frozenset({"log_probs", "entropy"})
_DIV_SIGNATURE = ("ctx", "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                  "teacher_bias", "beta", "temperature", "student_logit_scale", "student_final_logit_softcapping",
                  "teacher_logit_scale", "teacher_final_logit_softcapping")
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


def _grad_filter(model):
    """``patch(model, grad_filter=...)``'s value for a training-mode call (None in eval mode, as the
    patched forward does)."""
    return getattr(model.__dict__[_STATE], "grad_filter", None) if model.training else None


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
        if (owner is not None and set(outputs) <= _DIFFERENTIABLE and temperature > 0 and hidden.dtype == weight.dtype
                and (bias is None or bias.dtype == weight.dtype)):
            from .. import objectives

            head = owner.get_input_embeddings()
            res = objectives.token_log_probs(hidden, weight, targets, bias=bias, ignore_index=-100,
                                             logit_scale=float(logit_scale), softcap=final_logit_softcapping,
                                             temperature=temperature, backend=getattr(head, "backend", "auto"),
                                             grad_filter=_grad_filter(owner))
            return res.log_probs, (res.entropy if "entropy" in outputs else None), None, None, None
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
            backend=getattr(head, "backend", "auto"), grad_filter=_grad_filter(owner))
        log_probs = -stats.loss
        entropy = _EntropyNoGrad.apply(stats.entropy, hidden) if "entropy" in outputs else None
        is_top1 = stats.predictions == targets if "is_top1" in outputs else None
        return log_probs, entropy, None, None, is_top1


class TiedDivergenceFunction:
    """Stands in for TRL's ``ChunkedDivergenceFunction`` (same ``apply`` arguments and results: the per-token
    divergence, with its gradient to the student, and the student's entropy, without one)."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    def apply(self, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
                temperature, student_logit_scale, student_final_logit_softcapping, teacher_logit_scale,
                teacher_final_logit_softcapping)
        owner = _owner(student_weight)
        if (owner is None or float(temperature) <= 0 or not 0.0 <= float(beta) <= 1.0
                or student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype
                or (student_bias is not None and student_bias.dtype != student_weight.dtype)
                or (teacher_bias is not None and teacher_bias.dtype != teacher_weight.dtype)
                or teacher_weight.device != student_weight.device):
            return self.trl_function.apply(*args)
        from .. import distill

        head = owner.get_input_embeddings()
        n = student_hidden.shape[0]
        out = distill.linear_distillation_loss(
            student_hidden, student_weight, torch.zeros((n,), dtype=torch.long, device=student_hidden.device),
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            divergence="jsd", beta=float(beta), temperature=float(temperature), reduction="none", bias=student_bias,
            logit_scale=float(student_logit_scale), softcap=student_final_logit_softcapping,
            teacher_logit_scale=float(teacher_logit_scale), teacher_softcap=teacher_final_logit_softcapping,
            backend=getattr(head, "backend", "auto"), return_stats=True, grad_filter=_grad_filter(owner))
        return out.loss, out.entropy


def _install_divergence():
    try:
        import trl.trainer.distillation_trainer as dt
    except Exception:  # noqa: BLE001 - a TRL without it (or one that does not import) is left alone
        return False
    fn = getattr(dt, "ChunkedDivergenceFunction", None)
    if fn is None:
        return False
    if isinstance(fn, TiedDivergenceFunction):
        return True
    try:
        names = tuple(inspect.signature(fn.forward).parameters)
    except (TypeError, ValueError):
        return False
    if names != _DIV_SIGNATURE:
        return False
    dt.ChunkedDivergenceFunction = TiedDivergenceFunction(fn)
    return True


def _student_plain(model):
    """Whether ``model``'s logits are its head's product alone (no softcap or logit scale in its config):
    the hidden states through the tied weight are then the whole story."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return all(getattr(cfg, k, None) in (None, 1.0) for k in
               ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def _backbone_states(model, inputs):
    """The last hidden states of ``model``'s backbone (no head): ``[B, L-1, D]``, the positions that predict."""
    out = model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    return out.last_hidden_state[:, :-1, :]


def _gkd_compute_loss(original):
    """GKDTrainer.compute_loss with the student and teacher heads fused (``linear_distillation_loss``) when the
    student is a patched model; else, and whenever the caller wants the outputs, the original."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        if hasattr(student, "get_base_model"):  # PEFT
            student = student.get_base_model()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        if hasattr(teacher, "get_base_model"):
            teacher = teacher.get_base_model()
        owner = _owner(student.get_output_embeddings().weight) if hasattr(student, "get_output_embeddings") else None
        t_out = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
        if (return_outputs or owner is not student or t_out is None or not _student_plain(student)
                or not _student_plain(teacher) or getattr(t_out, "bias", None) is not None
                or not hasattr(teacher, "base_model") or not hasattr(student, "base_model")):
            return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        hs = _backbone_states(student, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            ht = _backbone_states(teacher, inputs)
        head = student.get_input_embeddings()
        out = head.distillation_loss(hs, inputs["labels"][:, 1:], teacher_hidden=ht, teacher_weight=t_out.weight,
                                     divergence="jsd", beta=float(self.beta), reduction="batchmean",
                                     num_items_in_batch=num_items_in_batch, logit_scale=1.0, softcap=None,
                                     bias=student.get_output_embeddings().bias, grad_filter=_grad_filter(student))
        return out

    compute_loss._tiedkernels_original = original
    return compute_loss


def _install_gkd():
    mod = sys.modules.get("trl.experimental.gkd.gkd_trainer")
    cls = getattr(mod, "GKDTrainer", None) if mod is not None else None
    if cls is None:
        return False
    fn = cls.__dict__.get("compute_loss")
    if fn is None:
        return False
    if getattr(fn, "_tiedkernels_original", None) is not None:
        return True
    try:
        names = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    if names != ("self", "model", "inputs", "return_outputs", "num_items_in_batch"):
        return False
    cls.compute_loss = _gkd_compute_loss(fn)
    return True


def install():
    """Put the stand-ins into ``trl.trainer.utils`` and ``trl.trainer.distillation_trainer`` if TRL is imported
    and its functions have the arguments these stand-ins know; else leave TRL as it is. Idempotent."""
    if "trl" not in sys.modules:
        return False
    _install_divergence()
    _install_gkd()
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
