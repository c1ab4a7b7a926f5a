"""TiedEmbeddingHead: one weight for the input embedding, the logits and the fused loss."""

import torch
import torch.nn.functional as F
from torch import nn

from . import _tie, backends
from . import functional as tkf


class TiedEmbeddingHead(nn.Embedding):
    """An ``nn.Embedding`` that also projects hidden states onto its weight and computes the
    fused projection + cross-entropy.

    ``forward(ids)`` / ``embed(ids)`` embed; ``logits(hidden, **opts)`` projects;
    ``loss(hidden, labels, **opts)`` is ``linear_cross_entropy`` on this weight.
    ``output_embeddings`` is an ``nn.Linear`` whose registered ``weight`` is this module's very
    ``Parameter``: use it wherever a model calls ``lm_head(hidden)``.

    ``logit_scale`` and ``softcap`` (attributes) are the defaults of ``logits``/``loss``.
    """

    def __new__(cls, *args, process_group=None, device_mesh=None, **kwargs):
        # A tensor-parallel group, a mesh or a Shard(0) DTensor weight: the vocabulary-parallel variant.
        if process_group is not None or device_mesh is not None or type(kwargs.get("_weight")).__name__ == "DTensor":
            from .distributed import VocabParallelTiedEmbeddingHead

            if not issubclass(cls, VocabParallelTiedEmbeddingHead):
                cls = VocabParallelTiedEmbeddingHead
        return super().__new__(cls)

    def __init__(self, num_embeddings, embedding_dim, *, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, bias=False, device=None, dtype=None, backend="auto",
                 logit_scale=1.0, softcap=None, _weight=None, _freeze=False):
        # max_norm, norm_type, scale_grad_by_freq, sparse: nn.Embedding's own, with its semantics (embed
        # defers to F.embedding; max_norm renormalizes the looked-up rows of the one weight in place, so
        # the head sees them renormalized too, as a stock tied model does).
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, device=device,
                         dtype=dtype, _weight=_weight, _freeze=_freeze)
        self.backend = backend
        self.logit_scale = logit_scale
        self.softcap = softcap
        b = None
        if bias:
            b = nn.Parameter(torch.zeros(num_embeddings, device=self.weight.device, dtype=self.weight.dtype))
            self.bias = b
        else:
            self.register_parameter("bias", None)
        self.__dict__["output_embeddings"] = TiedOutputEmbedding(self, b)

    @classmethod
    def from_modules(cls, embedding, lm_head=None, *, backend="auto", register_bias=True):
        """Build from an existing ``nn.Embedding`` (and optional ``nn.Linear`` head), reusing the
        embedding's ``Parameter`` and the head's bias ``Parameter``. With ``register_bias=False``
        the bias is registered only on ``output_embeddings`` (as in a model where the head owns it)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"tiedkernels: embedding must be an nn.Embedding, got {type(embedding).__name__}")
        weight = embedding.weight
        bias = None
        if lm_head is not None:
            if tuple(lm_head.weight.shape) != tuple(weight.shape):
                raise ValueError(f"tiedkernels: lm_head weight {tuple(lm_head.weight.shape)} does not match the "
                                 f"embedding weight {tuple(weight.shape)}")
            bias = getattr(lm_head, "bias", None)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        self.max_norm = embedding.max_norm
        self.norm_type = embedding.norm_type
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.sparse = embedding.sparse
        self.weight = weight
        self.backend = backend
        self.logit_scale = 1.0
        self.softcap = None
        if bias is not None and register_bias:
            self.bias = bias
        else:
            self.register_parameter("bias", None)
        self.__dict__["output_embeddings"] = TiedOutputEmbedding(self, bias)
        return self

    # -- the embedding ------------------------------------------------------------------
    def forward(self, input):
        return self.embed(input)

    def embed(self, ids):
        w = self.weight
        tkf.check_weight(w)
        tkf.check_index_dtype(ids, "ids")
        tkf.check_device(ids, "ids", w)
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            # Options only nn.Embedding implements: keep its exact semantics.
            return F.embedding(ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.sparse)
        if not _tie.usable(w):
            return tkf.embedding(ids, w, padding_idx=self.padding_idx, backend=self.backend)
        pad = tkf.normalize_padding_idx(self.padding_idx, w.shape[0])
        return _tie.embed(w, ids, pad, backends.resolve(self.backend, w.device))

    # -- the head -----------------------------------------------------------------------
    def _head_opts(self, opts):
        opts.setdefault("logit_scale", self.logit_scale)
        opts.setdefault("softcap", self.softcap)
        opts.setdefault("backend", self.backend)
        return opts

    def _filter_default(self, opts):
        if "grad_filter" not in opts and self.__dict__.get("grad_filter") is not None:
            opts["grad_filter"] = self.__dict__["grad_filter"]
        return opts

    def logits(self, hidden, **opts):
        opts = self._head_opts(opts)
        bias = opts.pop("bias", self.output_embeddings.bias)
        return tkf.logits(hidden, _tie.head_weight(self.weight), bias=bias, **opts)

    def loss(self, hidden, labels, **opts):
        """The fused loss of ``hidden`` against ``labels`` (``tkf.linear_cross_entropy``'s options).
        ``grad_filter`` defaults to the head's ``grad_filter`` attribute when one is set (a patched
        Hugging Face model's training forward sets it from ``patch(model, grad_filter=...)``)."""
        opts = self._filter_default(self._head_opts(opts))
        bias = opts.pop("bias", self.output_embeddings.bias)
        return tkf.linear_cross_entropy(hidden, _tie.head_weight(self.weight), labels, bias=bias, **opts)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # Whoever swaps the weight (FSDP2's sharded parameter, a user's assignment) swaps it for
        # both roles: the output side must never keep a stale Parameter.
        if name == "weight" and isinstance(value, nn.Parameter) and "output_embeddings" in self.__dict__:
            out = self.__dict__["output_embeddings"]
            if out.weight is not value:
                out.weight = value

    def extra_repr(self):
        s = super().extra_repr()
        if self.output_embeddings.bias is not None:
            s += ", bias=True"
        if self.logit_scale != 1.0:
            s += f", logit_scale={self.logit_scale}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        return s + f", backend={self.backend!r}"

    # -- token-level objectives and distillation on the head (tiedkernels.objectives, tiedkernels.distill) --
    def _token_opts(self, opts):
        opts = self._filter_default(self._head_opts(opts))
        opts.setdefault("bias", self.output_embeddings.bias)
        return opts

    def token_log_probs(self, hidden, labels, **opts):
        """Per-token log-probs, entropy and lse, differentiable (``tiedkernels.token_log_probs``)."""
        from . import objectives

        return objectives.token_log_probs(hidden, _tie.head_weight(self.weight), labels, **self._token_opts(opts))

    def token_objective(self, hidden, labels, objective=None, **opts):
        """A token-local objective, fused (``tiedkernels.linear_token_objective``)."""
        from . import objectives

        return objectives.linear_token_objective(hidden, _tie.head_weight(self.weight), labels, objective,
                                                 **self._token_opts(opts))

    def grpo_loss(self, hidden, completion_ids, advantages, **opts):
        """TRL's GRPO-family loss on this head (``tiedkernels.grpo_loss``)."""
        from . import objectives

        return objectives.grpo_loss(hidden, _tie.head_weight(self.weight), completion_ids, advantages,
                                    **self._token_opts(opts))

    def distillation_loss(self, hidden, labels, **opts):
        """Distillation of this head's distribution towards a teacher's
        (``tiedkernels.linear_distillation_loss``)."""
        from . import distill

        return distill.linear_distillation_loss(hidden, _tie.head_weight(self.weight), labels,
                                                **self._token_opts(opts))


class TiedOutputEmbedding(nn.Linear):
    """The output side: an ``nn.Linear`` whose registered ``weight`` is the head's ``Parameter``.

    ``in_features``/``out_features`` are plain attributes (resizing code writes them); the
    sizes used are always read from ``weight.shape``.
    """

    def __init__(self, head, bias=None):
        nn.Module.__init__(self)
        self.__dict__["head"] = head  # not a submodule: the two modules are registered apart
        self.weight = head.weight
        self.out_features, self.in_features = head.weight.shape
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    def forward(self, hidden, **opts):
        opts = self.head._head_opts(opts)
        bias = opts.pop("bias", self.bias)
        return tkf.logits(hidden, _tie.head_weight(self.weight), bias=bias, **opts)

    def extra_repr(self):
        v, d = self.weight.shape
        return f"in_features={d}, out_features={v}, bias={self.bias is not None}, tied=True"
