"""tiedkernels: one weight for the input embedding, the logits and a fused cross-entropy."""

from . import _ext
from . import ops as _ops  # noqa: F401  (fake kernels and autograd of every backend)
from . import triton as _triton  # noqa: F401  (registers the Triton backend; Triton itself loads on first use)
from .distill import linear_distillation_loss
from .functional import TiedKernelsError, embedding, linear_cross_entropy, logits
from .objectives import grpo_loss, linear_token_objective, token_log_probs
from .module import TiedEmbeddingHead, TiedOutputEmbedding
def inspect_ties(model, **kw): from .hf import inspect_ties as f; return f(model, **kw)  # noqa: E302,E704 (lazy)

__version__ = "0.1.0"

__all__ = [
    "TiedEmbeddingHead",
    "TiedKernelsError",
    "TiedOutputEmbedding",
    "embedding",
    "grpo_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_token_objective",
    "logits",
    "token_log_probs",
]
