"""The modules ``patch`` installs: a ``TiedEmbeddingHead`` that keeps the replaced embedding's scale,
and its output side, which hands back ``LazyLogits`` while the model computes a fused loss."""

import torch

from ..module import TiedEmbeddingHead, TiedOutputEmbedding
from ._lazy import lazy_logits


class HFTiedEmbedding(TiedEmbeddingHead):
    """``TiedEmbeddingHead`` installed in a transformers model.

    ``embed_scale`` reproduces the replaced module's scaling exactly: a buffer (Gemma on
    transformers v5: ``embedding * embed_scale.to(weight.dtype)``), a number (BART's
    ``BartScaledWordEmbedding``: ``embedding * embed_scale``) or None.
    """

    @classmethod
    def from_hf(cls, embedding, lm_head, *, backend="auto"):
        head = cls.from_modules(embedding, lm_head, backend=backend, register_bias=False)
        bias = getattr(lm_head, "bias", None)
        head.__dict__["output_embeddings"] = HFTiedOutput(head, bias)
        buf = embedding._buffers.get("embed_scale")
        if buf is not None:
            persistent = "embed_scale" not in embedding._non_persistent_buffers_set
            head.register_buffer("embed_scale", buf, persistent=persistent)
            if hasattr(embedding, "scalar_embed_scale"):
                head.scalar_embed_scale = embedding.scalar_embed_scale
        elif "embed_scale" in embedding.__dict__:
            head.embed_scale = embedding.__dict__["embed_scale"]
        return head

    def forward(self, input):
        out = self.embed(input)
        scale = getattr(self, "embed_scale", None)
        if scale is None:
            return out
        if isinstance(scale, torch.Tensor):
            return out * scale.to(self.weight.dtype)
        return out * scale


class HFTiedOutput(TiedOutputEmbedding):
    """The output side. ``lazy`` (set by the patched forward while it computes a loss from
    ``labels``) makes ``forward`` return ``LazyLogits`` instead of the ``[*, V]`` logits."""

    def __init__(self, head, bias=None):
        super().__init__(head, bias)
        self.__dict__["lazy"] = False

    def real_forward(self, hidden):
        return super().forward(hidden)

    def forward(self, hidden, _lazy_loss=None, **opts):
        if _lazy_loss is not None:
            # The fused loss of LazyLogits this layer returned, computed inside this layer's call
            # (module hooks that gather the parameters, DeepSpeed ZeRO-3's, see it; see _lazy.py).
            lazy, target, loss_opts = _lazy_loss
            return lazy.fused_loss(target, loss_opts)
        # Eager: storage-less placeholder logits; under torch.compile, the real logits recorded the
        # same way, which the compiler drops once the fused loss is taken (see _lazy.py).
        if self.__dict__.get("lazy") and not opts \
                and isinstance(hidden, torch.Tensor) \
                and hidden.shape[-1] == self.weight.shape[1] and hidden.dtype == self.weight.dtype:
            return lazy_logits(hidden, self)
        return super().forward(hidden, **opts)
