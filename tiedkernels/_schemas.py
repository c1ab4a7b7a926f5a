"""Op signatures of the Python-defined backends (torch, triton).

The compiled ops are defined once in ``csrc/ops.cpp``; a Python backend registers its
own copy of each op under a prefixed name with the same signature, so that it exists
when the extension is not built.  ``tests/test_ops.py`` checks that the two agree.

The fused-loss ops (``lce_*``) take every vocabulary index as global: the weight holds rows
``[vocab_start, vocab_start + V_local)`` of a vocabulary of ``vocab_total`` entries (0: the weight
is the whole vocabulary).  Their optional arguments:

* ``class_weight``: ``[vocab_total]`` per-class weights ``c`` (the whole vocabulary's, on every
  shard), ``F.cross_entropy(weight=)``'s semantics: per token
  ``c[y]·((1-ε)(lse - z_y) + λ·lse²) + (ε/V)(lse·Σ_j c_j - Σ_j c_j z_j)``; ``lce_stats``' third
  row becomes ``Σ_j c_j z_j`` over the shard.  Dividing by ``Σ c[y]`` (the weighted mean) is the
  caller's job, as every other reduction is.
* ``return_stats`` (``lce_fwd``): outputs 6 and 7 are the per-token predicted token (argmax of
  the final logits, first index on ties as ``torch.argmax``; int64 ``[N]``) and the entropy of the
  softmax (``lse - Σ_j p_j z_j``; fp32, fp64 for fp64, ``[N]``), for every token, ignored ones
  included; empty ``[0]`` tensors otherwise.
* ``grad_lse`` (``lce_bwd``): ``[N]`` incoming gradient of the returned ``lse``; adds
  ``grad_lse_i · softmax(z_i)`` to ``dL/dz`` (through softcap and scale), ignored tokens included.
* ``grad_filter`` (``lce_fwd`` computing gradients, ``lce_bwd``): ``t >= 0``, 0 exact.  Per row chunk,
  after ``dz = dL/dz`` (the gradient with respect to the raw logits ``h W^T + b``, after the softcap
  and scale chain; rounded to the input dtype) is known, vocabulary column ``j`` is left out of the
  ``dh`` and ``dW`` GEMMs when ``|dz_ij| <= t * s_i`` for every row ``i`` of the chunk, where
  ``s_i = |g_i| * [y_i != ignore_index] + |grad_lse_i|`` (``g`` the incoming gradient of the loss:
  ``grad_scale`` or ``grad_loss``).  The loss, lse, statistics and ``db`` are exact.  A chunk that
  keeps every column takes the exact path.
"""

SCHEMAS = {
    "embedding_fwd": "(Tensor weight, Tensor ids, int? padding_idx) -> Tensor",
    "embedding_bwd": "(Tensor grad, Tensor ids, SymInt num_weights, int? padding_idx) -> Tensor",
    "embedding_bwd_acc_": "(Tensor(a!) grad_weight, Tensor grad, Tensor ids, int? padding_idx) -> ()",
    "logits_fwd": "(Tensor hidden, Tensor weight, Tensor? bias, float logit_scale, float softcap) -> Tensor",
    "logits_bwd": (
        "(Tensor grad, Tensor logits, Tensor hidden, Tensor weight, Tensor? bias, float logit_scale, "
        "float softcap, bool compute_dh, bool compute_dw, bool compute_db) -> (Tensor, Tensor, Tensor)"
    ),
    "lce_fwd": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? grad_scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap, float logit_scale, int vocab_start, int vocab_total, "
        "int chunk_size, bool compute_dh, bool compute_dw, bool compute_db, Tensor? class_weight=None, "
        "bool return_stats=False, float grad_filter=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "lce_bwd": (
        "(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
        "int ignore_index, float label_smoothing, float z_loss, float softcap, float logit_scale, int vocab_start, "
        "int vocab_total, int chunk_size, bool compute_dh, bool compute_dw, bool compute_db, Tensor? class_weight=None, "
        "Tensor? grad_lse=None, float grad_filter=0.) -> (Tensor, Tensor, Tensor)"
    ),
    "lce_stats": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, float softcap, "
        "float logit_scale, int vocab_start, int vocab_total, int chunk_size, Tensor? class_weight=None) -> Tensor"
    ),
}

OP_NAMES = tuple(SCHEMAS)
