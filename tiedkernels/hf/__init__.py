"""Hugging Face transformers integration.

``patch(model)`` swaps one ``TiedEmbeddingHead`` into a tied transformers model in place (same
``Parameter``, same state-dict keys) and makes a training-mode forward with ``labels`` compute its loss
with the fused projection + cross-entropy (the logits then unbuilt: a placeholder, built exactly if read;
in eval mode the forward is the stock one); ``unpatch(model)`` restores stock modules;
``inspect_ties(model)`` reports which parameters share storage and which declared ties are broken.
``modeling_tiny`` is a template for a model built on ``TiedEmbeddingHead`` from the start.
"""

from ._patch import is_patched, patch, unpatch
from ._ties import TieReport, inspect_ties

__all__ = ["patch", "unpatch", "is_patched", "inspect_ties", "TieReport"]
