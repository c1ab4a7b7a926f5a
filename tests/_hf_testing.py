"""Tiny configs of the supported architectures and the zoo check, built in code (no hub): test helpers."""

import contextlib
import re

import torch

ARCHS = ("gpt2", "llama", "qwen2", "gemma", "gemma2", "bert", "t5", "bart")
CAUSAL = ("gpt2", "llama", "qwen2", "gemma", "gemma2", "cohere", "granite")
SCALED = ("cohere", "granite")  # logit scaling quirks, tested for the loss only


def build(arch, vocab=96, seed=0, dtype=torch.float64, **overrides):
    """A small ``arch`` model (2 layers, hidden 32) with every dropout at 0, seeded, in ``dtype``."""
    import transformers as T

    dec = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        cls = T.GPT2LMHeadModel
    elif arch == "llama":
        cfg, cls = T.LlamaConfig(**dec), T.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(**dec), T.Qwen2ForCausalLM
    elif arch == "gemma":
        cfg, cls = T.GemmaConfig(head_dim=8, **dec), T.GemmaForCausalLM
    elif arch == "gemma2":
        # A small cap so that the softcap really bends the logits of a tiny model.
        cfg = T.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=50.0, sliding_window=16,
                             query_pre_attn_scalar=8, **dec)
        cls = T.Gemma2ForCausalLM
    elif arch == "cohere":  # logits * logit_scale
        cfg, cls = T.CohereConfig(logit_scale=0.5, **dec), T.CohereForCausalLM
    elif arch == "granite":  # logits / logits_scaling
        cfg, cls = T.GraniteConfig(logits_scaling=4.0, **dec), T.GraniteForCausalLM
    elif arch == "bert":
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=0)
        cls = T.BertForMaskedLM
    elif arch == "t5":
        cfg = T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
        cls = T.T5ForConditionalGeneration
    elif arch == "bart":
        cfg = T.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           scale_embedding=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=2, forced_eos_token_id=None, tie_word_embeddings=True)
        cls = T.BartForConditionalGeneration
    else:
        raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    if arch == "bart":
        # Zero at init; make it matter in the tests.
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    if arch == "bert":
        with torch.no_grad():
            model.cls.predictions.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 2))
    return model.eval()


def _masked_labels(ids, g):
    """Masked-LM labels: about 40% of the positions (position 1 always) keep their id, the rest -100."""
    labels = torch.full_like(ids, -100)
    mask = torch.rand(ids.shape, generator=g) < 0.4
    mask[:, 1] = True
    labels[mask] = ids[mask]
    return labels


def batch(arch, model, batch_size=2, seq=9, seed=1):
    """Inputs with ``labels`` (some ignored) for ``model``'s task."""
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, v, (batch_size, seq), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    if arch == "bert":
        return {"input_ids": ids, "labels": _masked_labels(ids, g)}
    if arch in ("t5", "bart"):
        tgt = torch.randint(3, v, (batch_size, seq - 2), generator=g)
        tgt[1, -1] = -100
        return {"input_ids": ids, "labels": tgt}
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------------------------------------
# The zoo: every model type of transformers' causal-LM, masked-LM and seq2seq auto mappings, built
# from its own config class with the defaults shrunk to a tiny size (no hand list of models).

ZOO_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")
ZOO_VOCAB = 128
ZOO_SPECIAL = 100  # token ids >= this are special ones (image, audio, bos ...): the batches never draw them

_HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim", "embedding_size",
           "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "true_hidden_size",
           "intra_bottleneck_size", "attention_hidden_size", "lru_width", "d_latents", "emb_dim")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
          "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads", "attention_heads",
          "num_self_attention_heads", "num_cross_attention_heads", "swa_num_attention_heads", "index_n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "num_query_groups", "swa_num_key_value_heads")
_HEAD_DIM = ("head_dim", "d_kv", "d_head", "attention_head_dim", "kv_channels", "dim_head", "attention_head_size",
             "swa_head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "linear_key_head_dim",
             "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim",
             "index_head_dim")
_FFN = ("intermediate_size", "d_ff", "dff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_inner",
        "ffn_hidden_size", "feed_forward_size", "intermediate_size_mlp", "dim_ff", "dense_intermediate_size",
        "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
        "expert_ffn_hidden_size", "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size")
_SMALL = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
          "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
          "kv_lora_rank": 16, "q_lora_rank": 16, "qk_head_dim": 16, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4, "linear_num_heads": 4, "mamba_n_heads": 4, "n_mamba_heads": 4,
          "mamba_num_heads": 4, "ssm_state_size": 16, "mamba_d_state": 16, "state_size": 16, "mamba_d_ssm": 64,
          "mamba_dt_rank": 8, "time_step_rank": 8, "index_topk": 8, "num_codebooks": 2, "embedding_rank": 16,
          "max_position_embeddings": 128, "n_positions": 128, "max_source_positions": 128,
          "max_target_positions": 128, "n_ctx": 128, "max_2d_position_embeddings": 128, "sliding_window": 16,
          "sliding_window_size": 16, "attention_window_size": 16, "local_attention_window_len": 16,
          "image_size": 32, "patch_size": 8, "num_mel_bins": 16, "rotary_dim": 4}
_LAYERS = re.compile(r"^(num_|n_)?((hidden|encoder|decoder|text|vision|audio|speech_encoder)_)?layers?$"
                     r"|^num_(hidden_)?layers$|^(encoder|decoder)_layers$|^num_(encoder|decoder)_layers$")


def _shrink(d, vocab):
    """Shrink one config dict in place (sizes, layers, token ids), recursing into sub-configs."""
    old_layers = None
    orig = dict(d)
    for k in [k for k, v in d.items() if v is None]:
        del d[k]  # the config class derives it (head_dim from hidden_size, ...) from the shrunk sizes
    for k in list(d):
        v = d[k]
        if isinstance(v, dict) and "model_type" in v:
            _shrink(v, vocab)
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        if _LAYERS.match(k) and v > 2:
            if k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                old_layers = v
            d[k] = 2
        elif k in _HIDDEN and v > 32:
            d[k] = 32
        elif k in _HEADS and v > 4:
            d[k] = 4
        elif k in _KV_HEADS and v > 2:
            d[k] = 4 if v == orig.get("num_attention_heads", orig.get("n_head", -1)) else 2
        elif k in _HEAD_DIM and v > 8:
            d[k] = 8
        elif k in _FFN and v > 64:
            d[k] = 64
        elif k in _SMALL and v > _SMALL[k]:
            d[k] = _SMALL[k]
        elif k == "vocab_size" or k.endswith("_vocab_size") and v > vocab:
            d[k] = vocab
    if old_layers is not None:
        # per-layer lists (layer_types, ...) follow the layer count; keep one layer of each kind
        kinds = d.get("layer_types")
        n = 2
        if isinstance(kinds, list) and len(kinds) == old_layers and all(isinstance(x, str) for x in kinds):
            firsts = sorted({x: i for i, x in reversed(list(enumerate(kinds)))}.values())
            keep = (firsts + [i for i in range(old_layers) if i not in firsts])[:max(2, len(firsts))]
            keep.sort()
            n = len(keep)
        else:
            keep = [0, 1]
        for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if k in d:
                d[k] = n
        for k, v in list(d.items()):
            if isinstance(v, list) and len(v) == old_layers:
                d[k] = [v[i] for i in keep]
            elif isinstance(v, dict) and v and all(isinstance(x, int) for x in v):
                d[k] = {keep.index(i): x for i, x in v.items() if i in keep}
    # special token ids inside the small vocabulary, never drawn by the batches
    nxt = [vocab - 1]
    remap = {}

    def fix(x):
        if isinstance(x, bool) or not isinstance(x, int) or 0 <= x < ZOO_SPECIAL:
            return x
        if x not in remap:
            remap[x] = nxt[0]
            nxt[0] -= 1
        return remap[x]

    for k in list(d):
        if k.endswith(("token_id", "token_index", "token_ids")) or k in ("pad_token_id", "bos_token_id",
                                                                          "eos_token_id"):
            v = d[k]
            d[k] = [fix(x) for x in v] if isinstance(v, list) else fix(v)
    return d


def zoo_entries(major=None):
    """``(model_type, class name, task)`` for every entry of the three auto mappings (one per pair)."""
    from transformers.models.auto import modeling_auto

    seen, out = set(), []
    for name, task in zip(ZOO_MAPPINGS, ("causal", "masked", "seq2seq")):
        for mt, cls in getattr(modeling_auto, name, {}).items():
            if isinstance(cls, (tuple, list)):
                cls = cls[0]
            if (mt, cls) in seen:
                continue
            seen.add((mt, cls))
            out.append((mt, cls, task))
    return out


def tiny_config(model_type, vocab=ZOO_VOCAB, tie=None):
    """``model_type``'s own config class with its defaults shrunk; ``tie`` forces
    ``tie_word_embeddings`` on the config and every sub-config that has it."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = _shrink(cls().to_dict(), vocab)
    for k in ("transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype"):
        d.pop(k, None)
    for k in list(d):
        if k.endswith(("dropout", "pdrop", "_drop", "dropout_prob", "dropout_rate")) and isinstance(d[k], float):
            d[k] = 0.0
    if tie is not None:
        _set_tie(d, tie)
    if d.get("is_encoder_decoder") and d.get("decoder_start_token_id") is None:
        d["decoder_start_token_id"] = d.get("pad_token_id") or 0
    config = cls(**d)
    if "_experts_implementation" in vars(config) or hasattr(type(config), "_experts_implementation"):
        config._experts_implementation = "eager"  # v5's grouped-GEMM experts take no fp64: the reference loop
    return config


def _set_tie(d, tie):
    d["tie_word_embeddings"] = tie
    for v in d.values():
        if isinstance(v, dict) and "tie_word_embeddings" in v:
            _set_tie(v, tie)


def build_zoo(model_type, class_name, *, seed=0, tie=None, dtype=torch.float64):
    """A tiny ``class_name`` model of ``model_type`` (fp64, eval mode, seeded) from ``tiny_config``."""
    import transformers

    config = tiny_config(model_type, tie=tie)
    cls = getattr(transformers, class_name)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    return model.eval()


def zoo_batch(model, task, batch_size=2, seq=9, seed=1):
    """Ids below ``ZOO_SPECIAL`` (never a special token) with labels, some ignored, for ``task``."""
    g = torch.Generator().manual_seed(seed)
    try:
        emb = model.get_input_embeddings()
    except NotImplementedError:
        raise RuntimeError("no input embeddings (get_input_embeddings is not implemented: the model does not "
                           "read token ids)") from None
    hi = min(ZOO_SPECIAL, emb.weight.shape[0])
    ids = torch.randint(3, hi, (batch_size, seq), generator=g)
    if task == "masked":
        return {"input_ids": ids, "labels": _masked_labels(ids, g)}
    if task == "seq2seq" and model.config.is_encoder_decoder:
        tgt = torch.randint(3, hi, (batch_size, seq - 2), generator=g)
        tgt[1, -1] = -100
        return {"input_ids": ids, "labels": tgt}
    labels = ids.clone()
    labels[0, :2] = -100
    return {"input_ids": ids, "labels": labels}


class ZooResult:
    """What ``zoo_check`` found for one (model type, class): ``status`` is ``"pass"``, ``"refused"``
    (``patch`` raised and named the reason; the model was left as it was), ``"failed"`` (a wrong value
    or an unexpected error: a bug of this project) or ``"unbuilt"`` (the tiny stock model itself does
    not build or run: a limit of the builder, nothing to do with patching)."""

    def __init__(self, model_type, class_name, task):
        self.model_type, self.class_name, self.task = model_type, class_name, task
        self.status, self.reason, self.notes, self.fused, self.seconds = None, "", [], None, 0.0

    def __repr__(self):
        extra = f" ({self.reason})" if self.reason else ""
        notes = f" [{'; '.join(self.notes)}]" if self.notes else ""
        return f"{self.model_type}/{self.class_name}: {self.status}{extra}{notes}"


def _fingerprint(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules(remove_duplicate=False)],
            {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
            dict(model.__dict__.get("_tied_weights_keys") or {}) if isinstance(
                model.__dict__.get("_tied_weights_keys"), dict) else None)


def _close(a, b, what, atol, rtol):
    if a is None or b is None:
        if (a is None) != (b is None):
            raise AssertionError(f"{what}: one side is None")
        return
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    both_nan = a.isnan() & b.isnan()  # PyTorch's own NaN (e.g. Longformer's padded windows) is the value
    err = (a - b).abs().masked_fill(both_nan, 0)
    bound = atol + rtol * b.abs().masked_fill(both_nan, 0)
    if not bool((err <= bound).all()):
        raise AssertionError(f"{what}: max abs error {float(err.max()):.3g} (atol {atol}, rtol {rtol})")


@contextlib.contextmanager
def nan_empty():
    """Every ``torch.empty`` (``to_empty``'s storage too) filled with NaN while inside: what a path
    leaves unset is NaN on both sides, so stock and patched compare equal only when the patched
    model sets exactly what stock sets (and what stock itself leaves unset shows as NaN)."""
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(det, warn_only=warn)


def meta_init(cls, config, state_dict, *, patched, dtype=torch.float64, seed=0):
    """``cls`` built under ``torch.device("meta")``, cast to ``dtype``, patched (or not), then
    ``to_empty()`` (NaN-filled), ``init_weights()`` and ``load_state_dict(state_dict)``: the path of
    issue 17, item 3. Returns the model in eval mode."""
    import copy

    from tiedkernels.hf import _patch

    with torch.device("meta"):
        model = cls(copy.deepcopy(config))
    model = model.to(dtype)
    if patched:
        _patch.patch(model)
    with nan_empty():
        model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    model.load_state_dict(state_dict)
    return model.eval()


def fill_unset_buffers(model, built):
    """transformers v4's ``init_weights`` leaves the non-persistent buffers it does not build (rotary
    ``inv_freq``, BERT's ``position_ids``) as ``to_empty`` left them, stock and patched alike (check
    that with ``compare_models`` first): give them the built model's values, so that the logits
    compare. v5 sets every one of them: nothing to do there."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return
    with torch.no_grad():
        for n, buf in built.named_buffers():
            model.get_buffer(n).copy_(buf)


def compare_models(model, ref, what):
    """Every parameter and buffer of ``model`` (names with duplicates, so ties count) equal to
    ``ref``'s, NaN equal to NaN; the same names tie in both."""
    from tiedkernels.hf._ties import same_values

    for kind in ("parameters", "buffers"):
        got = dict(getattr(model, f"named_{kind}")(remove_duplicate=False))
        want = dict(getattr(ref, f"named_{kind}")(remove_duplicate=False))
        if sorted(got) != sorted(want):
            raise AssertionError(f"{what}: {kind} {sorted(set(got) ^ set(want))} on one side only")
        for n, t in want.items():
            if t is None or got[n] is None:
                if (t is None) != (got[n] is None):
                    raise AssertionError(f"{what}: {n} is None on one side")
                continue
            if t.dtype != got[n].dtype or not same_values(got[n], t):
                raise AssertionError(f"{what}: {kind[:-1]} {n} differs from stock's")
    ties = []
    for m in (model, ref):
        p = dict(m.named_parameters(remove_duplicate=False))
        ties.append({n: sorted(k for k in p if p[k] is p[n]) for n in p})
    if ties[0] != ties[1]:
        bad = sorted(n for n in ties[1] if ties[1][n] != ties[0].get(n))
        raise AssertionError(f"{what}: the parameters tied together differ from stock's, e.g. {bad[:3]}")


def _names_of(model, module):
    return [f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is module]


def save_with_separate_head(model, folder, *, seed=3):
    """``model.save_pretrained(folder)``, then its checkpoint rewritten to store the output layer's
    weight as a tensor of its own with other values (the T5 v1.1 / Flan-T5 layout). Returns
    ``(output key, input key)``."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    out_key, in_key = _names_of(model, out)[0], _names_of(model, inp)[0]
    w = inp.weight.detach()
    if out_key in sd:  # stored under the output name: the input one gets its own copy
        in_key = next((k for k in _names_of(model, inp) if k not in sd), in_key)
        sd[in_key] = w.clone().contiguous()
    g = torch.Generator().manual_seed(seed)
    sd[out_key] = (w + 0.5 * torch.randn(w.shape, generator=g, dtype=w.dtype)).contiguous()
    os.remove(path)
    save_file(sd, path, metadata={"format": "pt"})
    return out_key, in_key


def _why(e, n):
    """``Type: first line of the message`` (an exception may have no message: NotImplementedError())."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:n]}" if lines else type(e).__name__


def zoo_check(model_type, class_name, task, *, tie=None, generate=True, save=True, meta=True, separate_head=True,
              eval_labels=True, tmpdir=None):
    """Patch a tiny ``model_type`` model against its stock twin: patch, a training step (loss and
    every gradient), logits, save -> stock load, meta-device init (``meta``), a checkpoint with a
    separately stored output layer (``separate_head``), greedy generate, an eval-mode forward with
    labels (``eval_labels``). Returns a ``ZooResult``.

    Tolerances: the stock causal-LM loss rounds the fp64 logits to fp32 (``.float()``), so the loss and
    the gradients agree to ~1e-7 relative: atol 1e-6, rtol 1e-5 there; logits of the two fp64 models
    agree to 1e-10 (the same GEMM on the same numbers)."""
    import copy
    import tempfile
    import time
    import warnings

    import transformers

    from tiedkernels.hf import _forward, _lazy, _patch
    from tiedkernels.hf._lazy import LazyLogits

    res = ZooResult(model_type, class_name, task)
    t0 = time.perf_counter()
    # the once-per-name warnings say whether the logits were built: make them fire for this model too
    getattr(_lazy, "_warned", set()).clear()
    _forward._warned_unfused.clear()
    try:
        try:
            stock = build_zoo(model_type, class_name, tie=tie)
            model = copy.deepcopy(stock)  # before any forward: some models keep non-leaf tensors (Mega)
            b = zoo_batch(stock, task)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = stock(**b)
            if ref.loss is None:
                raise RuntimeError("the stock model returns no loss for labels")
        except Exception as e:  # noqa: BLE001 - the builder's limit, reported by name
            res.status, res.reason = "unbuilt", _why(e, 160)
            return res
        before = _fingerprint(model)
        try:
            _patch.patch(model)
        except (ValueError, TypeError) as e:
            if _patch.is_patched(model) or _fingerprint(model) != before:
                res.status, res.reason = "failed", f"patch raised but left the model changed: {e}"
            else:
                res.status, res.reason = "refused", str(e).replace("tiedkernels.hf.patch: ", "")
            return res
        w = model.get_input_embeddings().weight
        if stock.get_output_embeddings() is None or stock.get_output_embeddings().weight is not \
                stock.get_input_embeddings().weight:
            res.status, res.reason = "failed", "patch accepted a model whose weights are not tied"
            return res
        cls = getattr(transformers, class_name)
        # a training step: loss and every gradient (both in training mode, the same seed before each
        # call: every dropout is 0, and what else draws, e.g. a router's jitter, draws the same)
        stock.train()
        model.train()
        seed_step = 1234
        torch.manual_seed(seed_step)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref_t = stock(**b)
        except Exception as e:  # noqa: BLE001 - the builder's limit, reported by name
            res.status, res.reason = "unbuilt", f"in training mode: {_why(e, 140)}"
            return res
        stock.zero_grad(set_to_none=True)
        ref_t.loss.backward()
        torch.manual_seed(seed_step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(**b)
        built = [str(c.message) for c in caught if "builds the full logits" in str(c.message)
                 or "does not fuse" in str(c.message)]
        lg = getattr(out, "logits", None)
        res.fused = (lg is None or isinstance(lg, LazyLogits)) and not built
        if not res.fused:
            res.notes.append("logits built: " + (built[0][:120] if built else "no fused loss, no warning"))
            if not built:
                res.status, res.reason = "failed", "no fused loss and no warning saying so"
                return res
        out.loss.backward()
        _close(out.loss, ref_t.loss, "loss", 1e-6, 1e-5)
        grads = dict(stock.named_parameters())
        for n, p in model.named_parameters():
            _close(p.grad, grads[n].grad, f"grad {n}", 1e-6, 1e-5)
        if w.grad is None:
            raise AssertionError("the tied weight got no gradient")
        del out, ref_t
        stock.eval()
        model.eval()
        # logits without labels
        nolab = {k: v for k, v in b.items() if k != "labels"}
        if task == "seq2seq" and stock.config.is_encoder_decoder:
            nolab["decoder_input_ids"] = b["labels"].clamp_min(3)
        with torch.no_grad():
            lz_ref = stock(**nolab).logits
            lz = model(**nolab).logits
        _close(lz, lz_ref, "logits", 1e-10, 1e-10)
        # save patched -> load stock
        # (against the stock model's own checkpoint loaded the same way: a model loaded in fp64 computes
        # its non-persistent buffers, e.g. Gemma's embed_scale, in fp64, unlike one built and cast)
        if save:
            v5 = int(transformers.__version__.split(".")[0]) >= 5
            kw = {"dtype": torch.float64, "experts_implementation": "eager"} if v5 else {"torch_dtype": torch.float64}
            with tempfile.TemporaryDirectory(dir=tmpdir) as d:
                # the stock checkpoint first: where transformers cannot load or run its own model that
                # way (Nezha builds an fp32 buffer against fp64 weights in from_pretrained), the reload
                # is not compared, with a note; the patched checkpoint must then fail the same way
                stock.save_pretrained(d)
                try:
                    with warnings.catch_warnings(), torch.no_grad():
                        warnings.simplefilter("ignore")
                        ref_loaded = cls.from_pretrained(d, **kw).eval()
                        want = ref_loaded(**nolab).logits
                except Exception as e:  # noqa: BLE001 - transformers' own limit, said in the notes
                    res.notes.append(f"reload not compared: the stock model loaded from its own checkpoint "
                                     f"raises {_why(e, 100)}")
                    ref_loaded = None
                model.save_pretrained(d)
                if ref_loaded is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        loaded = cls.from_pretrained(d, **kw).eval()
                    if any(p.data_ptr() == q.data_ptr() for p in loaded.parameters()
                           for q in ref_loaded.parameters() if p.numel() and q.numel()):
                        raise AssertionError("the two loaded models share storage")
                    with torch.no_grad():
                        _close(loaded(**nolab).logits, want,
                               "logits of the stock model loaded from the patched checkpoint", 1e-10, 1e-10)
        # built on the meta device, patched there, to_empty(), init_weights(), a state-dict load: every
        # parameter and buffer equal to stock's through the same path (issue 17, item 3)
        # (compared before either runs: a forward may change its own parameters, e.g. SwitchTransformers
        # casts its router to float32)
        if meta:
            sd = stock.state_dict()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m_ref = meta_init(cls, stock.config, sd, patched=False)
                    m_probe = meta_init(cls, stock.config, sd, patched=False)
                    fill_unset_buffers(m_probe, stock)
                    with torch.no_grad():
                        want = m_probe(**nolab).logits
                del m_probe
            except Exception as e:  # noqa: BLE001 - transformers' own limit, said in the notes
                res.notes.append(f"meta init not compared: the stock model raises {_why(e, 100)} on that path")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m_new = meta_init(cls, stock.config, sd, patched=True)
                if not _patch.is_patched(m_new) or m_new.get_output_embeddings().weight is not \
                        m_new.get_input_embeddings().weight:
                    raise AssertionError("meta init: the patched model lost its tied head")
                compare_models(m_new, m_ref, "meta init")
                fill_unset_buffers(m_new, stock)
                with torch.no_grad():
                    _close(m_new(**nolab).logits, want, "meta init: logits", 1e-10, 1e-10)
                if bool(want.isnan().any()):
                    res.notes.append("meta init: stock's own logits hold NaN on that path")
                del m_ref, m_new
        # a checkpoint that stores its own output layer (T5 v1.1 layout): where from_pretrained keeps
        # it apart (v5), patch refuses by both names and leaves the model as loaded; where it ties
        # (v4, a config that ties), patch goes on and the logits stay the loaded model's
        if separate_head:
            v5 = int(transformers.__version__.split(".")[0]) >= 5
            kw = {"dtype": torch.float64, "experts_implementation": "eager"} if v5 else {"torch_dtype": torch.float64}
            with tempfile.TemporaryDirectory(dir=tmpdir) as d:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        keys = save_with_separate_head(stock, d)
                        loaded = cls.from_pretrained(d, **kw).eval()
                        with torch.no_grad():
                            want = loaded(**nolab).logits
                except Exception as e:  # noqa: BLE001 - transformers' own limit, said in the notes
                    res.notes.append(f"separate head not checked: the stock model raises {_why(e, 100)}")
                else:
                    twin = copy.deepcopy(loaded)
                    apart = loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
                    before = _fingerprint(twin)
                    if apart:
                        try:
                            _patch.patch(twin)
                        except ValueError as e:
                            # the output key, and the input weight by one of its names (ProphetNet's has two)
                            w_in = loaded.get_input_embeddings().weight
                            aliases = [n for n, p in loaded.named_parameters(remove_duplicate=False) if p is w_in]
                            if keys[0] not in str(e) or not any(n in str(e) for n in aliases):
                                raise AssertionError(f"separate head: the error does not name {keys}: {e}") from e
                        else:
                            raise AssertionError("separate head: patch accepted a separately stored output layer")
                        if _patch.is_patched(twin) or _fingerprint(twin) != before:
                            raise AssertionError("separate head: patch raised but left the model changed")
                    else:
                        _patch.patch(twin)
                    with torch.no_grad():
                        _close(twin(**nolab).logits, want, "separate head: logits", 1e-10, 1e-10)
                    del loaded, twin
        # greedy generate
        if generate and task != "masked":
            prompt = b["input_ids"][:1, :5]
            kw = dict(max_new_tokens=3, do_sample=False, num_beams=1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g_ref = stock.generate(prompt, **kw)
            except Exception as e:  # noqa: BLE001
                res.notes.append(f"generate not run: the stock model raises {type(e).__name__}")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = model.generate(prompt, **kw)
                if not torch.equal(g, g_ref):
                    raise AssertionError(f"generate: {g.tolist()} != stock {g_ref.tolist()}")
        # eval mode with labels (Trainer.evaluate): real logits and the loss, both stock's
        if eval_labels:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out_e = model(**b)
            lg = getattr(out_e, "logits", None)
            if not isinstance(lg, torch.Tensor) or isinstance(lg, LazyLogits):
                raise AssertionError(f"eval mode with labels: logits are {type(lg).__name__}, not stock's tensor")
            _close(lg, ref.logits, "eval mode with labels: logits", 1e-10, 1e-10)
            _close(out_e.loss, ref.loss, "eval mode with labels: loss", 1e-6, 1e-5)
        res.status = "pass"
        return res
    except Exception as e:  # noqa: BLE001 - a failure of this project, with its reason
        res.status, res.reason = "failed", _why(e, 200)
        return res
    finally:
        res.seconds = time.perf_counter() - t0
