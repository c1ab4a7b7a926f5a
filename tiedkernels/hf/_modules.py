"""The modules ``patch`` installs: a ``TiedEmbeddingHead`` that keeps the replaced embedding's scale,
and its output side, which hands back ``LazyLogits`` while the model computes a fused loss."""

import torch
from torch import nn

from ..module import TiedEmbeddingHead, TiedOutputEmbedding
from ._lazy import lazy_logits


class HFTiedEmbedding(TiedEmbeddingHead):
    """``TiedEmbeddingHead`` installed in a transformers model.

    ``embed_scale`` reproduces the replaced module's scaling exactly: a buffer (Gemma on
    transformers v5: ``embedding * embed_scale.to(weight.dtype)``), a number (BART's
    ``BartScaledWordEmbedding``: ``embedding * embed_scale``) or None. ``eoi_embedding`` (T5Gemma2)
    is the row that replaces the embedding of ``eoi_token_index``.

    Built by ``from_hf``, the head is also an instance of the replaced embedding's class (a subclass
    of both, see ``_tied_class``) and carries that module's parameters, buffers and attributes under
    their names: model code keyed on the class, above all ``_init_weights`` (Gemma's sets
    ``embed_scale``, a non-persistent buffer that ``to_empty()`` leaves as garbage; T5Gemma2's zeroes
    ``eoi_embedding``), then treats the head exactly as it treats the stock module.
    """

    # stock's values are the replaced module's class, for pickling the generated subclass
    _stock_class = None

    @classmethod
    def from_hf(cls, embedding, lm_head, *, backend="auto"):
        head = _tied_class(type(embedding)).from_modules(embedding, lm_head, backend=backend, register_bias=False)
        bias = getattr(lm_head, "bias", None)
        head.__dict__["output_embeddings"] = HFTiedOutput(head, bias)
        for name, p in embedding._parameters.items():
            if name != "weight" and p is not None:
                head.register_parameter(name, p)
        for name, buf in embedding._buffers.items():
            if buf is not None:
                head.register_buffer(name, buf, persistent=name not in embedding._non_persistent_buffers_set)
        for k, v in vars(embedding).items():
            # plain attributes the class's code reads (scalar_embed_scale, eoi_token_index, BART's
            # float embed_scale); the head's own (nn.Module's bookkeeping, sizes, options) stay
            if not k.startswith("_") and k not in head.__dict__ and not hasattr(HFTiedEmbedding, k):
                head.__dict__[k] = v
        return head

    def forward(self, input):
        out = self.embed(input)
        scale = getattr(self, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            out = out * scale.to(self.weight.dtype)
        elif scale is not None:
            out = out * scale
        eoi = self._parameters.get("eoi_embedding")
        if eoi is not None:
            out[input == self.eoi_token_index] = eoi.to(out.dtype)
        return out

    def __reduce_ex__(self, protocol):
        # the generated subclass is not importable by name: pickle (torch.save of a whole model)
        # rebuilds it from the stock class, which is
        if self._stock_class is None:
            return super().__reduce_ex__(protocol)
        return _new_tied, (self._stock_class,), self.__getstate__()


_TIED_CLASSES = {}


def _tied_class(stock):
    """``HFTiedEmbedding`` that is also a ``stock`` (the class of the embedding it replaces), one class
    per stock class. ``HFTiedEmbedding`` comes first in the method order, so the head's own forward,
    embedding and head methods win; ``stock``'s ``__init__`` is never called."""
    if stock is nn.Embedding or issubclass(HFTiedEmbedding, stock):
        return HFTiedEmbedding
    if issubclass(stock, HFTiedEmbedding):
        return stock
    cls = _TIED_CLASSES.get(stock)
    if cls is None:
        cls = type(f"HFTied{stock.__name__}", (HFTiedEmbedding, stock),
                   {"__module__": __name__, "__doc__": HFTiedEmbedding.__doc__, "_stock_class": stock})
        _TIED_CLASSES[stock] = cls
    return cls


def _new_tied(stock):
    cls = _tied_class(stock)
    return cls.__new__(cls)


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
