// Device-generic chunked driver for the fused linear + cross-entropy.
//
// The driver owns the row-chunk loop and the GEMMs (through ATen, so cuBLAS on
// CUDA and MKL/oneDNN on the CPU); a device supplies one "row kernel" that turns
// a chunk of raw logits into per-row statistics and, when asked, overwrites the
// chunk in place with dL/dz.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace tiedkernels {

// Options shared by every loss kernel.  All vocabulary indices are global:
// local column j of the weight shard is vocabulary entry vocab_start + j, and
// entries at or beyond vocab_total are padding (masked to -inf).
struct LossOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;  // 0 disables the softcap
  double logit_scale = 1.0;
  int64_t vocab_start = 0;
  int64_t vocab_total = 0;  // 0 means "the local vocabulary is the whole vocabulary"
};

// What the row kernel must do with one chunk.
struct RowTask {
  at::Tensor logits;      // [rows, V] raw logits (h W^T + b), input dtype; dL/dz on return if write_grad
  at::Tensor labels;      // [rows] int64, global ids
  at::Tensor grad_scale;  // [rows] fp32, or 0-dim fp32, or undefined (=1)
  at::Tensor lse_in;      // [rows] fp32 given (backward, or global lse) or undefined
  at::Tensor lse_out;     // [rows] fp32 or undefined
  at::Tensor loss_out;    // [rows] fp32 or undefined
  at::Tensor stats_out;   // [3, rows] fp32 (local lse, target logit, sum of (weighted) logits) or undefined
  // Class weights (all undefined without): this shard's columns' weights [V] (0 in padding), the
  // rows' target weights c[y] [rows] (0 at ignored rows), and the whole vocabulary's sum (0-dim).
  at::Tensor class_w, target_w, class_w_sum;
  at::Tensor grad_lse;  // [rows] incoming gradient of lse (Backward), or undefined
  at::Tensor pred_out;  // [rows] int64 global argmax of the final logits, or undefined
  at::Tensor ent_out;   // [rows] entropy of the softmax, or undefined
  bool write_grad = false;
};

using RowKernel = void (*)(const RowTask& task, const LossOptions& opt);

struct LossResult {
  at::Tensor loss, lse, stats, dh, dw, db, pred, ent;
};

// The optional inputs and outputs of a call (see tiedkernels/_schemas.py).
struct LossExtras {
  c10::optional<at::Tensor> class_weight;  // [vocab_total]
  c10::optional<at::Tensor> grad_lse;      // [N] (Backward)
  bool return_stats = false;               // (Forward) argmax and entropy per row
  // Gradient filter (0: exact).  Per chunk, vocabulary column j is left out of the dh and dW GEMMs
  // when |dz_ij| <= grad_filter * s_i in every row i, s_i = |incoming gradient of row i's loss|
  // (0 at an ignored row) + |incoming gradient of its lse|.  Loss, lse, statistics and db stay exact.
  double grad_filter = 0.0;
};

enum class LossMode { Forward, Backward, Stats };

// hidden [N, D], weight [V, D], bias [V] or undefined, labels [N] (any integer type).
// grad_scale: undefined, 0-dim, or [N] fp32.  lse_in: [N] fp32 (Backward mode).
LossResult lce_chunked(LossMode mode, const at::Tensor& hidden, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                       const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& lse_in,
                       const LossOptions& opt, int64_t chunk_size, bool compute_dh, bool compute_dw,
                       bool compute_db, RowKernel row_kernel, const LossExtras& extras = LossExtras());

// True where ATen's CPU GEMM for this low-precision dtype has no native instructions to run on
// (bf16 without AVX512-BF16/AMX, fp16 without AVX512-FP16/AMX): a scalar fallback there.
bool cpu_lowp_gemm_is_slow(at::ScalarType t);

// Whether this torch build exports MKL's mixed-precision GEMM for the dtype (bf16 or fp16 operands,
// fp32 sums and output): x86-64 builds with MKL do.
bool cpu_mixed_gemm_available(at::ScalarType t);

// Tests only: take the fp32 tiles (1), ATen's own GEMM (0) or MKL's mixed GEMM for every
// low-precision GEMM (2) on any CPU, or let the CPU decide (-1, the default), so that each path is
// tested on every machine. Returns the previous setting.
int set_cpu_lowp_gemm_path(int path);

// CPU GEMM c = a @ b (+ bias, a [n] row added before the one rounding), or c += a @ b when
// accumulate (c fp32). Low-precision operands into a c of their own dtype: ATen's own GEMM where
// the CPU has native instructions for them, else fp32 tiles of the operands rounded once. Into an
// fp32 c: MKL's mixed GEMM where the CPU has those instructions (it runs on them: fp32 products and
// sums), else the fp32 tiles (the same values up to the order of the fp32 sums).
void cpu_mm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate = false,
            const c10::optional<at::Tensor>& bias = c10::nullopt);

// Argument checks shared by every device (the user-facing messages live in Python;
// these guard direct calls of the ops).
void check_loss_args(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& labels, int64_t chunk_size);

// Labels must be ignore_index or inside [0, vocab_total).  Reports the first bad one.
void check_labels_host(const at::Tensor& labels, int64_t ignore_index, int64_t vocab_total);

// Entry points with the op schemas' argument lists; each device wraps them with its
// own row kernel (and label check).
using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FwdResult lce_fwd_entry(RowKernel rk, const at::Tensor& hidden, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                        const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
                        double z_loss, double softcap, double logit_scale, int64_t vocab_start, int64_t vocab_total,
                        int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
                        const c10::optional<at::Tensor>& class_weight, bool return_stats, double grad_filter = 0.0);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_bwd_entry(
    RowKernel rk, const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, const c10::optional<at::Tensor>& grad_lse,
    double grad_filter = 0.0);

at::Tensor lce_stats_entry(RowKernel rk, const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
                           double softcap, double logit_scale, int64_t vocab_start, int64_t vocab_total,
                           int64_t chunk_size, const c10::optional<at::Tensor>& class_weight);

}  // namespace tiedkernels
