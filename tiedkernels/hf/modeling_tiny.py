"""A template: a causal LM built on ``TiedEmbeddingHead`` from the start, tied by transformers itself.

Copy this file when you write your own model. What transformers needs to tie it for you:

* the backbone (``TinyModel``) exposes the head through ``get_input_embeddings`` /
  ``set_input_embeddings``; the task model (``TinyForCausalLM``) registers the head's
  ``output_embeddings`` as ``lm_head`` (an ``nn.Linear`` whose ``weight`` is the head's ``Parameter``)
  and ``get_output_embeddings`` returns it;
* ``base_model_prefix = "model"`` and ``_tied_weights_keys``: a list of patterns on transformers v4,
  a ``{target: source}`` dict on v5. ``post_init`` → ``tie_weights`` then ties ``lm_head.weight`` to
  ``model.embed_tokens.weight``; ``from_pretrained`` re-ties after loading (the checkpoint stores
  only ``model.embed_tokens.weight``);
* with ``labels`` the forward calls ``head.loss(hidden, labels, shift=True, ...)``: the fused
  projection + cross-entropy, no ``[N, V]`` logits, ``logits=None`` in the output (pass
  ``return_logits=True`` to get them too).

The model itself is small and plain (learned positions, pre-norm blocks, no KV cache: generation
recomputes the prefix, fine for a template and for tests).
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from ..module import TiedEmbeddingHead

try:  # transformers v5: initializers that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # v4
    _init = nn.init

_V5 = int(transformers.__version__.split(".")[0]) >= 5


class TinyConfig(PretrainedConfig):
    model_type = "tiedkernels_tiny"

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=None, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.02,
                 tie_word_embeddings=True, backend="auto", use_cache=False, pad_token_id=None, bos_token_id=None,
                 eos_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.backend = backend
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, **kwargs)


class TinyRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class TinyBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.attn_norm = TinyRMSNorm(d, config.rms_norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = TinyRMSNorm(d, config.rms_norm_eps)
        self.up = nn.Linear(d, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x, attn_mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.silu(self.up(self.mlp_norm(x))))


class TinyPreTrainedModel(PreTrainedModel):
    config_class = TinyConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyBlock"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not hasattr(module, "head"):  # the tied view is the embedding
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TinyRMSNorm):
            _init.ones_(module.weight)


class TinyModel(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if not config.tie_word_embeddings:
            raise ValueError("TinyModel is built on TiedEmbeddingHead: tie_word_embeddings must be True")
        self.embed_tokens = TiedEmbeddingHead(config.vocab_size, config.hidden_size,
                                              padding_idx=config.pad_token_id, backend=config.backend)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TinyBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = TinyRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        x = x + self.embed_positions(torch.arange(t, device=x.device))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = (causal[None] & attention_mask[:, None, :].bool())[:, None]  # [B, 1, T, T]
            mask = mask | torch.eye(t, dtype=torch.bool, device=x.device)  # a padded row still sees itself
        for layer in self.layers:
            x = layer(x, mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class TinyForCausalLM(TinyPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyModel(config)
        # The head's nn.Linear view: its registered weight is the embedding's Parameter.
        self.lm_head = self.model.embed_tokens.output_embeddings
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, num_items_in_batch=None,
                logits_to_keep=0, return_logits=False, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            inputs_embeds=inputs_embeds).last_hidden_state
        loss = logits = None
        if labels is not None:
            # The fused loss on the weight lm_head holds (the same Parameter as the embedding).
            loss = self.model.embed_tokens.loss(hidden, labels, shift=True, num_items_in_batch=num_items_in_batch)
        if labels is None or return_logits:
            keep = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
            logits = self.lm_head(keep)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: every step sees the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def register():
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the template (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(TinyConfig.model_type, TinyConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(TinyConfig, TinyForCausalLM)
    except ValueError:
        pass
