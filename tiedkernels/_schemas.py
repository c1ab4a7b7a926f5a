"""Op signatures of the Python-defined backends (torch, triton).

The compiled ops are defined once in ``csrc/ops.cpp``; a Python backend registers its
own copy of each op under a prefixed name with the same signature, so that it exists
when the extension is not built.  ``tests/test_ops.py`` checks that the two agree.
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
        "int chunk_size, bool compute_dh, bool compute_dw, bool compute_db) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "lce_bwd": (
        "(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
        "int ignore_index, float label_smoothing, float z_loss, float softcap, float logit_scale, int vocab_start, "
        "int vocab_total, int chunk_size, bool compute_dh, bool compute_dw, bool compute_db) -> (Tensor, Tensor, Tensor)"
    ),
    "lce_stats": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, float softcap, "
        "float logit_scale, int vocab_start, int vocab_total, int chunk_size) -> Tensor"
    ),
}

OP_NAMES = tuple(SCHEMAS)
