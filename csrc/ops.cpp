// The op schemas (defined once, here) and the extension's small Python module.
// Kernels register per device: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include "lce_driver.h"

TORCH_LIBRARY(tiedkernels, m) {
  // Embedding: out = weight[ids]; backward scatters rows back (padding_idx rows get none).
  m.def("embedding_fwd(Tensor weight, Tensor ids, int? padding_idx) -> Tensor");
  m.def("embedding_bwd(Tensor grad, Tensor ids, SymInt num_weights, int? padding_idx) -> Tensor");
  m.def("embedding_bwd_acc_(Tensor(a!) grad_weight, Tensor grad, Tensor ids, int? padding_idx) -> ()");
  // Logits: z = softcap((h W^T + b) * logit_scale); softcap 0 disables it.
  m.def("logits_fwd(Tensor hidden, Tensor weight, Tensor? bias, float logit_scale, float softcap) -> Tensor");
  m.def(
      "logits_bwd(Tensor grad, Tensor logits, Tensor hidden, Tensor weight, Tensor? bias, float logit_scale, "
      "float softcap, bool compute_dh, bool compute_dw, bool compute_db) -> (Tensor, Tensor, Tensor)");
  // Fused linear + cross-entropy over row chunks.  Returns (loss, lse, dh, dw, db, argmax, entropy):
  // loss is [N] per token, or the scalar sum(loss * grad_scale) when grad_scale is given, in which
  // case the requested gradients of that scalar are computed in the same pass (empty [0] tensors
  // otherwise); argmax (int64) and entropy are [N] with return_stats, else empty.  class_weight is
  // [vocab_total] (F.cross_entropy's weight=; see tiedkernels/_schemas.py for the formula).
  m.def(
      "lce_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? grad_scale, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float logit_scale, int vocab_start, int vocab_total, "
      "int chunk_size, bool compute_dh, bool compute_dw, bool compute_db, Tensor? class_weight=None, "
      "bool return_stats=False, float grad_filter=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_filter (lce_fwd with gradients, lce_bwd): 0 is exact; t > 0 leaves out of the dh and dW GEMMs
  // the vocabulary columns of a chunk whose |dL/dz| is at most t times each row's incoming gradient
  // scale in every row of the chunk (see tiedkernels/_schemas.py); loss, lse, statistics and db exact.
  // Recompute backward: gradients of sum(grad_loss * loss) (+ sum(grad_lse * lse)) given the (global) lse.
  m.def(
      "lce_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, float logit_scale, int vocab_start, "
      "int vocab_total, int chunk_size, bool compute_dh, bool compute_dw, bool compute_db, Tensor? class_weight=None, "
      "Tensor? grad_lse=None, float grad_filter=0.0) -> (Tensor, Tensor, Tensor)");
  // Per-row statistics of a vocabulary shard: [3, N] = (local lse, target logit or 0, sum of logits,
  // or of class_weight[j] * logit_j with class weights).
  m.def(
      "lce_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, float softcap, "
      "float logit_scale, int vocab_start, int vocab_total, int chunk_size, Tensor? class_weight=None) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef TIEDKERNELS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
#else
  d["openmp"] = 0;
#endif
  d["torch"] = TIEDKERNELS_TORCH_VERSION;
  d["compiler"] = __VERSION__;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tiedkernels compiled kernels";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("_set_cpu_lowp_gemm_path", &tiedkernels::set_cpu_lowp_gemm_path,
        "Tests only: bf16/fp16 CPU GEMMs through fp32 tiles (1), ATen (0), MKL's mixed GEMM (2) or as "
        "the CPU decides (-1)");
  m.def("_cpu_mixed_gemm_available", [](bool bf16) {
    return tiedkernels::cpu_mixed_gemm_available(bf16 ? at::kBFloat16 : at::kHalf);
  }, "Whether this torch build has MKL's bf16 (or fp16) GEMM with fp32 output");
  m.def("_cpu_lowp_gemm_is_slow", [](bool bf16) {
    return tiedkernels::cpu_lowp_gemm_is_slow(bf16 ? at::kBFloat16 : at::kHalf);
  }, "Whether bf16 (or fp16) CPU GEMMs avoid ATen's own (the fp32 tiles or MKL's mixed GEMM)");
}
