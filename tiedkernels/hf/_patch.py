"""``patch`` / ``unpatch``: put one ``TiedEmbeddingHead`` into a transformers model in place."""

import inspect
import types

import torch
from torch import nn

from . import _trl
from ._forward import forward_like
from ._modules import HFTiedEmbedding, HFTiedOutput
from ._state import _STATE, _PatchState, fuses_loss, is_patched  # noqa: F401 - re-exported
from ._ties import same_values


def transformers_major():
    import transformers

    return int(transformers.__version__.split(".")[0])


def _text_configs(config):
    """The config and every sub-config that carries ``tie_word_embeddings`` for the text model."""
    seen, out = set(), []
    for c in (config, _get_text_config(config, False), _get_text_config(config, True)):
        if c is not None and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def _get_text_config(config, decoder):
    try:
        return config.get_text_config(decoder=decoder)
    except (AttributeError, TypeError):
        return None


def _wants_tie(model):
    """Whether transformers itself ties ``model``'s output embedding to its input embedding, decided
    as its own ``tie_weights()`` decides. v5: the tie mapping of every sub-model, each reading its own
    config (a top-level config that ties wins over a text sub-config that says
    ``tie_word_embeddings=False``, as in GlmAsr or GraniteSpeech, whose ``lm_head`` sits on the top
    model). v4: ``config.get_text_config(decoder=True).tie_word_embeddings``."""
    config = model.config
    if transformers_major() < 5:
        text = _get_text_config(config, True) or config
        return getattr(text, "tie_word_embeddings", True) is not False
    try:
        mapping = model.get_expanded_tied_weights_keys(all_submodels=True)
    except Exception:  # an odd model: the config flags alone
        return all(getattr(c, "tie_word_embeddings", True) is not False for c in _text_configs(config))
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None:
        return False
    # every name of the input weight (ProphetNet's mapping names another module holding it) and of the
    # output module's weight
    sources = {n for n, p in model.named_parameters(remove_duplicate=False) if p is inp.weight}
    targets = [f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is out]
    return any(mapping.get(t) in sources for t in targets)


# parameters and buffers an embedding may hold that ``HFTiedEmbedding`` carries over and computes with
_KNOWN_PARAMS = {"weight", "eoi_embedding"}
_KNOWN_BUFFERS = {"embed_scale"}


def _check_embedding(model, inp, head):
    """Refuse, by name, an input embedding that ``HFTiedEmbedding`` would not reproduce exactly: one
    holding parameters or buffers it does not compute with, or whose forward
    gives other values than the head's on a probe of ids (every id of a small vocabulary; else the
    first and last ids and the token indices the module names, e.g. ``eoi_token_index``)."""
    name = type(inp).__name__
    what = f"tiedkernels.hf.patch: {type(model).__name__}'s input embedding {name}"
    extra = [n for n in inp._parameters if n not in _KNOWN_PARAMS and inp._parameters[n] is not None]
    extra += [n for n in inp._buffers if n not in _KNOWN_BUFFERS and inp._buffers[n] is not None]
    extra += [f"{n} (submodule)" for n in inp._modules]
    if extra:
        raise TypeError(f"{what} holds {', '.join(extra)} beside its weight; a TiedEmbeddingHead would drop "
                        "them and change the model, so it is not patched")
    if type(inp).forward is nn.Embedding.forward or inp.weight.device.type == "meta":
        return
    v = inp.weight.shape[0]
    ids = set(range(min(v, 64))) | {v - 1}
    for k, val in vars(inp).items():
        if isinstance(val, int) and not isinstance(val, bool) and 0 <= val < v and ("token" in k or "index" in k):
            ids.add(val)
    probe = torch.tensor(sorted(ids), device=inp.weight.device).view(1, -1)
    with torch.no_grad():
        try:
            want = inp(probe)
        except Exception as e:  # noqa: BLE001 - said by name below
            raise TypeError(f"{what} overrides forward and fails on plain token ids ({type(e).__name__}: {e}); "
                            "it is not patched") from e
        got = head(probe)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype \
            or not same_values(want, got):  # NaN equal to NaN: the weight may be uninitialized memory
        raise TypeError(f"{what} overrides forward with a computation TiedEmbeddingHead does not reproduce "
                        "(its output differs on a probe of token ids); it is not patched")


class _Snapshot:
    """Everything ``patch`` may change, to put back as it was when patching fails: each module's
    submodules, parameters and buffers (the objects, no copies), the config flags, the model's own
    attributes and load hooks. ``patch`` is all-or-nothing."""

    def __init__(self, model):
        self.model = model
        self.mods = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers),
                      {k: m.__dict__[k] for k in ("in_features", "out_features", "num_embeddings")
                       if k in m.__dict__}) for m in model.modules()]
        self.configs = [(c, c.__dict__.get("tie_word_embeddings", _MISSING)) for c in _all_configs(model.config)]
        self.attrs = {k: model.__dict__.get(k, _MISSING) for k in ("forward", _STATE, "all_tied_weights_keys")}
        self.load_hooks = dict(model._load_state_dict_pre_hooks)

    def restore(self):
        for m, mods, params, bufs, attrs in self.mods:
            for d, old in ((m._modules, mods), (m._parameters, params), (m._buffers, bufs)):
                d.clear()
                d.update(old)
            m.__dict__.update(attrs)
        for c, v in self.configs:
            if v is _MISSING:
                c.__dict__.pop("tie_word_embeddings", None)
            else:
                c.__dict__["tie_word_embeddings"] = v
        for k, v in self.attrs.items():
            if v is _MISSING:
                self.model.__dict__.pop(k, None)
            else:
                self.model.__dict__[k] = v
        self.model._load_state_dict_pre_hooks.clear()
        self.model._load_state_dict_pre_hooks.update(self.load_hooks)


_MISSING = object()


def _all_configs(config, seen=None):
    seen = set() if seen is None else seen
    if id(config) in seen:
        return []
    seen.add(id(config))
    out = [config]
    for v in list(vars(config).values()):
        if hasattr(v, "to_dict") and hasattr(v, "__dict__") and type(v).__name__.endswith("Config"):
            out += _all_configs(v, seen)
    return out


def _replace_everywhere(model, old, new):
    """Re-point every registration of module ``old`` (e.g. T5/BART ``embed_tokens``) to ``new``."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def _install(model, inp, out):
    old_in, old_out = model.get_input_embeddings(), model.get_output_embeddings()
    model.set_input_embeddings(inp)
    model.set_output_embeddings(out)
    _replace_everywhere(model, old_in, inp)
    if old_out is not None:
        _replace_everywhere(model, old_out, out)


def _tie(model):
    model.tie_weights()
    if transformers_major() >= 5:
        # post_init computed this once; a model that started untied (or was re-tied) keeps a stale
        # mapping otherwise, which breaks device_map grouping and save/load symmetry.
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def patch(model, *, backend="auto", fused_loss=True, return_logits=False, force_tie=False, grad_filter=None):
    """Swap one ``TiedEmbeddingHead`` into ``model`` (a transformers ``PreTrainedModel``) in place.

    The input embedding becomes the head, the output embedding (``lm_head``, BERT's decoder) its
    ``output_embeddings``; both keep the model's own ``Parameter`` (and BERT's bias ``Parameter``),
    so parameter count, state-dict keys and checkpoints do not change. With ``fused_loss`` a
    training-mode forward (``model.training``) that gets ``labels`` computes the loss with the fused
    projection + cross-entropy and returns the logits unbuilt (a ``LazyLogits`` placeholder, built
    exactly if read); in eval mode the forward is the stock one (pass ``return_logits=True`` to
    ``patch`` or to one forward call to get the logits and the stock loss in training mode too).
    Idempotent: patching again only updates the options.

    ``grad_filter`` (None: exact; a threshold; ``"auto"``): the fused loss of a training step leaves
    the vocabulary columns whose gradient is negligible out of its backward GEMMs
    (``tiedkernels.linear_cross_entropy``'s option, with its bound); the loss itself is exact, and
    eval mode (stock logits and loss) is unchanged.

    A model whose config does not tie its word embeddings is refused, and so is one whose input and
    output weights are separate tensors that are not equal copies (a checkpoint that stores its own
    output layer, e.g. T5 v1.1), whatever the config says; equal copies are tied. ``force_tie=True``
    ties either anyway (for training from scratch: the output side then uses the input embedding's
    weight, as ``tie_word_embeddings=True`` would have done at construction).
    """
    from .. import functional as tkf

    tkf.grad_filter_value(grad_filter, torch.float32)  # a bad value raises here, not at the first step
    snap = _Snapshot(model)
    try:
        _patch(model, backend=backend, fused_loss=fused_loss, return_logits=return_logits, force_tie=force_tie)
        model.__dict__[_STATE].grad_filter = grad_filter
    except BaseException:
        snap.restore()
        raise
    _trl.register(model)  # TRL's fused LM head (if TRL is imported) computed by this op too
    return model


def _patch(model, *, backend, fused_loss, return_logits, force_tie):
    if is_patched(model):
        inp = model.get_input_embeddings()
        if isinstance(inp, HFTiedEmbedding) and model.get_output_embeddings() is inp.output_embeddings:
            st = model.__dict__[_STATE]
            st.fused_loss, st.return_logits = fused_loss, return_logits
            inp.backend = backend
            _tie(model)
            _check_tied(model)
            return model
        # Something replaced the modules since (e.g. PEFT's merge_and_unload after
        # modules_to_save=["lm_head"] leaves plain modules): patch what is there now.
        model.__dict__.pop("forward", None)
        del model.__dict__[_STATE]
        _remove_load_check(model)
    config = model.config
    major = transformers_major()
    if major < 5 and getattr(config, "torchscript", False):
        raise ValueError("tiedkernels.hf.patch: config.torchscript=True makes transformers v4 clone the tied weight "
                         "instead of sharing it; a TorchScript model cannot be patched")
    if not _wants_tie(model):
        if not force_tie:
            raise ValueError(f"tiedkernels.hf.patch: {type(model).__name__} has tie_word_embeddings=False in its "
                             f"config: its input and output embeddings are separate weights{_weight_names(model)}, "
                             "so there is nothing to tie. Pass force_tie=True to tie them (training from scratch: "
                             "the output side takes the input embedding's weight)")
        for c in _text_configs(config):
            if hasattr(c, "tie_word_embeddings") or c is config:
                c.tie_word_embeddings = True
    try:
        inp = model.get_input_embeddings()
    except NotImplementedError:
        raise ValueError(f"tiedkernels.hf.patch: {type(model).__name__} has no input embeddings "
                         "(get_input_embeddings is not implemented: its inputs are not token ids), so there is "
                         "nothing to tie") from None
    out = model.get_output_embeddings()
    if out is None:
        raise ValueError(f"tiedkernels.hf.patch: {type(model).__name__} has no output embeddings to tie "
                         "(use a model with a language-modeling head)")
    if not isinstance(inp, nn.Embedding) or type(out) is not nn.Linear and not isinstance(out, nn.Linear):
        raise TypeError(f"tiedkernels.hf.patch: expected an nn.Embedding and an nn.Linear, got "
                        f"{type(inp).__name__} and {type(out).__name__} (is the model already wrapped, e.g. by PEFT? "
                        "patch the base model, or patch again after merge_and_unload)")
    if out.weight is not inp.weight:
        if not force_tie:
            _check_copies(model, inp.weight, out.weight)
        model.tie_weights()
        out = model.get_output_embeddings()
        if out.weight is not inp.weight:
            raise ValueError(f"tiedkernels.hf.patch: {type(model).__name__}'s output weight is not its input "
                             "embedding weight even after tie_weights()")
    head = HFTiedEmbedding.from_hf(inp, out, backend=backend)
    _check_embedding(model, inp, head)
    for c in _text_configs(config):
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = True
    try:
        labels_pos = list(inspect.signature(type(model).forward).parameters).index("labels") - 1
    except (ValueError, TypeError):
        labels_pos = None
    st = _PatchState(inp, out, fused_loss, return_logits, labels_pos)
    _install(model, head, head.output_embeddings)
    model.__dict__[_STATE] = st
    model.forward = types.MethodType(forward_like(type(model).forward), model)
    _tie(model)
    _check_tied(model)
    model.register_load_state_dict_pre_hook(_check_loaded_copies)
    return model


def _param_name(model, p):
    return next((n for n, q in model.named_parameters(remove_duplicate=False) if q is p), "(unregistered)")


def _weight_names(model):
    """`` (output NAME, input NAME)`` for a message, or nothing where the model has no such pair."""
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        return f" (output {_param_name(model, out.weight)}, input {_param_name(model, inp.weight)})"
    except Exception:  # noqa: BLE001 - no embeddings: the message goes without names
        return ""


def _check_copies(model, w_in, w_out):
    """Whether two separate input and output weights may be tied: only when they are equal copies,
    decided from the tensors and not the config. A checkpoint that stores its own output layer (T5
    v1.1, Flan-T5: ``T5Config`` says ``tie_word_embeddings=True`` on transformers v5) is loaded by
    ``from_pretrained`` as a tensor of its own, and the stock model computes with it; tying would drop
    that trained layer and change every logit, so it is refused.

    Meta tensors hold no values yet: there transformers' own decision stands (the caller has checked
    it ties), as it does for stock in that flow. accelerate's ``init_empty_weights`` gives every
    registration a fresh meta tensor, so a tied model always looks untied there, and the user ties
    it (``tie_weights()``) before loading. The values that come later are checked when they come: a
    state dict holding two different copies of the tied weight is refused at load
    (``_check_loaded_copies``)."""
    if w_in.device.type == "meta" or w_out.device.type == "meta":
        return
    if w_in.shape != w_out.shape or w_in.dtype != w_out.dtype or w_in.device != w_out.device \
            or not same_values(w_in, w_out):
        raise ValueError(f"tiedkernels.hf.patch: {type(model).__name__}'s output weight {_param_name(model, w_out)} "
                         f"and input embedding weight {_param_name(model, w_in)} are separate tensors with "
                         "different values (e.g. a checkpoint that stores its own output layer, as T5 v1.1 and "
                         "Flan-T5 do: the stock model computes its logits with it, whatever the config's "
                         "tie_word_embeddings says). Tying them would replace the trained output layer, so the "
                         "model is not patched. Pass force_tie=True to tie them anyway (the output side then "
                         "takes the input embedding's weight)")


def _check_loaded_copies(model, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a patched model: every name of the tied weight present in the
    state dict must hold the same values, or loading would keep one of them and silently drop the
    other (a separately stored output layer loaded into a model tied before its values came, e.g.
    built under ``init_empty_weights``)."""
    w = model.get_input_embeddings().weight
    names = [prefix + n for n, p in model.named_parameters(remove_duplicate=False) if p is w]
    present = [n for n in names if state_dict.get(n) is not None]
    for n in present[1:]:
        a, b = state_dict[present[0]], state_dict[n]
        if a.device.type == "meta" or b.device.type == "meta" or a.data_ptr() == b.data_ptr() and a.shape == b.shape:
            continue
        if a.shape != b.shape or not same_values(a, b.to(a.device)):
            raise ValueError(f"tiedkernels.hf: the state dict holds {present[0]} and {n} with different values, but "
                             f"{type(model).__name__} is patched and ties them into one weight: loading would "
                             "keep one and drop the other (a separately stored output layer). Unpatch, or load "
                             "one copy")


def _remove_load_check(model):
    for k, h in list(model._load_state_dict_pre_hooks.items()):
        if getattr(h, "hook", h) is _check_loaded_copies:
            del model._load_state_dict_pre_hooks[k]


def _check_tied(model):
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(inp, HFTiedEmbedding) or out is not inp.output_embeddings or out.weight is not inp.weight:
        raise RuntimeError("tiedkernels.hf.patch: the model did not keep the tied head in place "
                           f"(input {type(inp).__name__}, output {type(out).__name__})")


def unpatch(model):
    """Put stock modules back (the ones ``patch`` replaced, holding the current weight). Idempotent."""
    st = model.__dict__.get(_STATE)
    if st is None:
        return model
    head = model.get_input_embeddings()
    out_now = model.get_output_embeddings()
    w = head.weight
    inp, out = st.orig_in, st.orig_out
    inp.weight = w
    inp.num_embeddings = w.shape[0]
    inp.padding_idx = head.padding_idx
    for name, buf in head._buffers.items():
        if name in inp._buffers:
            inp._buffers[name] = buf
    for name, p in head._parameters.items():  # T5Gemma2's eoi_embedding (to_empty re-creates it)
        if name not in ("weight", "bias") and name in inp._parameters:
            inp._parameters[name] = p
    out.weight = w
    out.out_features, out.in_features = w.shape
    bias = getattr(out_now, "bias", None) if isinstance(out_now, HFTiedOutput) else head.output_embeddings.bias
    if "bias" in out._parameters:
        out.bias = bias
    _install(model, inp, out)
    model.__dict__.pop("forward", None)
    del model.__dict__[_STATE]
    _remove_load_check(model)
    _tie(model)
    return model
