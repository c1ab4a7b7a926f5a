// CPU kernels of the fused linear + cross-entropy: the row kernel (logsumexp, loss and
// dL/dz in place on a chunk of logits), run by the device-generic chunked driver.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../lce_driver.h"
#include "../vec_math.h"

namespace tiedkernels {
namespace {

template <typename acc_t>
struct RowIn {
  int64_t valid;   // columns [0, valid) are real vocabulary entries, the rest padding
  int64_t v;       // columns in the row
  int64_t target;  // local column of the label, or -1 (ignored, or held by another shard)
  bool ignored;
  bool have_lse;
  bool grad;
  bool stats;      // argmax and entropy wanted
  acc_t lse_given;
  acc_t g;
  acc_t cy;        // the target's class weight (1 without class weights)
  acc_t gl;        // incoming gradient of lse (0 without)
};

template <typename acc_t>
struct Consts {
  acc_t scale, softcap, inv_softcap, eps, z_loss, inv_vocab;
  const acc_t* cw;  // this shard's class weights [v] (0 in padding), or null
  acc_t cw_sum;     // sum of the class weights over the whole vocabulary (V without)
};

template <typename acc_t>
struct RowOut {
  acc_t lse = 0, loss = 0, zy = 0, sumf = 0, entropy = 0;
  int64_t argmax = -1;  // local column (first of the maximum; the first NaN if any)
};

// A saved lse as the gradient's softmax needs it: a reported +inf (a row holding +inf) is the
// cross-entropy's NaN there, as in the forward.
template <typename acc_t>
TK_ALWAYS_INLINE acc_t ce_lse(acc_t lse) {
  return lse == std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::quiet_NaN() : lse;
}

// Per token, with c the class weights (1 without), S = sum(c):
//   loss = c[y]((1-eps)(lse - z_y) + lam lse^2) + (eps/V)(S lse - sum_j c_j z_j)
//   dL/dz_j = g(((1-eps)c[y] + (eps/V)S + 2 lam c[y] lse) p_j - (1-eps)c[y][j=y] - (eps/V)c_j) + gl p_j
// The smoothing term is skipped when eps = 0, so a -inf logit (a masked entry) never meets 0 * inf.
template <typename acc_t>
TK_ALWAYS_INLINE void process_row(acc_t* f, const RowIn<acc_t>& in, const Consts<acc_t>& c, RowOut<acc_t>& out) {
  const int64_t valid = in.valid;
  const acc_t scale = c.scale, cap = c.softcap, inv_cap = c.inv_softcap;
  const acc_t* cw = c.cw;
  if (scale != acc_t(1)) {
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) f[j] *= scale;
  }
  if (cap > acc_t(0)) {
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) f[j] = cap * tanh_fast(f[j] * inv_cap);
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < valid; ++j) m = f[j] > m ? f[j] : m;
  if (in.stats) {
    // torch.argmax: the first NaN if there is one, else the first maximum.
    int64_t idx = valid > 0 ? 0 : -1;
    for (int64_t j = 0; j < valid; ++j) {
      if (f[j] == m) {
        idx = j;
        break;
      }
    }
    for (int64_t j = 0; j < valid; ++j) {
      if (f[j] != f[j]) {
        idx = j;
        break;
      }
    }
    out.argmax = idx;
  }
  acc_t s = 0, sf = 0, spz = 0;
  // The fp32 hot path (gradient in forward, no softcap, finite max): keep exp(z - m) in place, so the
  // gradient pass is a multiply-add instead of a second exp. fp64 keeps one formula for both passes,
  // so a second backward (which recomputes from the saved lse) matches the first bit for bit.
  const bool fused = std::is_same<acc_t, float>::value && in.grad && !in.ignored && !in.have_lse &&
                     !(cap > acc_t(0)) && valid > 0 && std::isfinite(m);
  const acc_t zy_raw = in.target >= 0 ? f[in.target] : acc_t(0);
  // The sums run vectorized over blocks and the block sums add up in double: one running fp32
  // sum per SIMD lane over a 128k-entry row would lose ~1e-4 of the logsumexp.
  constexpr int64_t kBlock = 512;
  if (fused || (valid > 0 && m != -std::numeric_limits<acc_t>::infinity())) {
    double s_acc = 0, sf_acc = 0, pz_acc = 0;
    for (int64_t j0 = 0; j0 < valid; j0 += kBlock) {
      const int64_t j1 = std::min<int64_t>(valid, j0 + kBlock);
      acc_t bs = 0, bf = 0, bpz = 0;
      if (cw) {
#pragma omp simd reduction(+ : bf)
        for (int64_t j = j0; j < j1; ++j) bf += cw[j] * f[j];
      } else {
#pragma omp simd reduction(+ : bf)
        for (int64_t j = j0; j < j1; ++j) bf += f[j];
      }
      if (in.stats) {
        // sum_j exp(z_j - m) z_j for the entropy; an entry of weight 0 adds 0, even at z = -inf
#pragma omp simd reduction(+ : bpz)
        for (int64_t j = j0; j < j1; ++j) {
          const acc_t e = exp_fast(f[j] - m);
          bpz += e > acc_t(0) ? e * f[j] : acc_t(0);
        }
      }
      if (fused) {
#pragma omp simd reduction(+ : bs)
        for (int64_t j = j0; j < j1; ++j) {
          const acc_t e = exp_fast(f[j] - m);
          bs += e;
          f[j] = e;
        }
      } else {
#pragma omp simd reduction(+ : bs)
        for (int64_t j = j0; j < j1; ++j) bs += exp_fast(f[j] - m);
      }
      s_acc += bs;
      sf_acc += bf;
      pz_acc += bpz;
    }
    s = static_cast<acc_t>(s_acc);
    sf = static_cast<acc_t>(sf_acc);
    spz = static_cast<acc_t>(pz_acc);
  } else {
    // An all-padding shard (or -inf logits): no mass here.  NaNs still reach s through sf.
    for (int64_t j = 0; j < valid; ++j) sf += cw ? cw[j] * f[j] : f[j];
  }
  // lse is the cross-entropy's: NaN on a row whose max is +inf, as PyTorch's log_softmax is there
  // (exp(z - m) = exp(inf - inf)).  The lse reported is torch.logsumexp's, which special-cases that
  // max: +inf, or NaN if the row also holds a NaN.
  const acc_t lse = s > acc_t(0) || s != s ? m + std::log(s) : (sf != sf ? sf : -std::numeric_limits<acc_t>::infinity());
  const acc_t zy = zy_raw;
  out.lse = lse;
  out.zy = zy;
  out.sumf = sf;
  if (in.stats) out.entropy = lse - (s > acc_t(0) ? spz / s : acc_t(0));
  if (m == std::numeric_limits<acc_t>::infinity()) {
    bool nan = false;
    for (int64_t j = 0; j < valid; ++j) nan |= f[j] != f[j];
    out.lse = nan ? lse : m;
    // softmax is NaN on every entry there, so is Σ p z and the entropy (TRL's logsumexp(z) - Σ p z;
    // only entries of probability exactly 0 are left out of the sum)
    if (in.stats) out.entropy = std::numeric_limits<acc_t>::quiet_NaN();
  }
  const acc_t eps = c.eps;
  if (in.ignored) {
    out.loss = 0;
  } else if (!cw) {
    out.loss = (acc_t(1) - eps) * (lse - zy) + c.z_loss * lse * lse;
    if (eps != acc_t(0)) out.loss += eps * (lse - sf * c.inv_vocab);
  } else {
    out.loss = in.cy * ((acc_t(1) - eps) * (lse - zy) + c.z_loss * lse * lse);
    if (eps != acc_t(0)) out.loss += eps * c.inv_vocab * (c.cw_sum * lse - sf);
  }
  if (!in.grad) return;
  if (in.ignored && in.gl == acc_t(0)) {
    // 0 * softmax: zeros, unless the softmax itself is NaN (a NaN logit, a row of -inf or holding
    // +inf), where PyTorch's gradient is NaN too
    const acc_t l = in.have_lse ? ce_lse(in.lse_given) : lse;
    if (std::isfinite(l)) {
      for (int64_t j = 0; j < in.v; ++j) f[j] = 0;
    } else {
      for (int64_t j = 0; j < valid; ++j) f[j] = acc_t(0) * exp_fast(f[j] - l);
      for (int64_t j = valid; j < in.v; ++j) f[j] = 0;
    }
    return;
  }
  const acc_t g = in.ignored ? acc_t(0) : in.g;
  const acc_t l = in.have_lse ? ce_lse(in.lse_given) : lse;
  // a: the coefficient of p_j; b: of the smoothing's constant (times c_j with class weights)
  const acc_t a = (cw ? g * (in.cy * ((acc_t(1) - eps) + acc_t(2) * c.z_loss * l) + eps * c.inv_vocab * c.cw_sum)
                      : g * (acc_t(1) + acc_t(2) * c.z_loss * l)) + in.gl;
  const acc_t b = g * eps * c.inv_vocab;
  if (fused) {
    // f holds exp(z - m); softmax = f / s since lse = m + log(s).
    const acc_t c1 = a * scale / s, c0 = b * scale;
    if (cw) {
#pragma omp simd
      for (int64_t j = 0; j < valid; ++j) f[j] = f[j] * c1 - c0 * cw[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < valid; ++j) f[j] = f[j] * c1 - c0;
    }
  } else if (cap > acc_t(0)) {
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) {
      const acc_t t = f[j] * inv_cap;
      f[j] = (a * exp_fast(f[j] - l) - b * (cw ? cw[j] : acc_t(1))) * (acc_t(1) - t * t) * scale;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < valid; ++j) f[j] = (a * exp_fast(f[j] - l) - b * (cw ? cw[j] : acc_t(1))) * scale;
  }
  if (in.target >= 0 && !in.ignored) {
    const acc_t t = zy * inv_cap;
    const acc_t chain = (cap > acc_t(0) ? acc_t(1) - t * t : acc_t(1)) * scale;
    f[in.target] -= g * (cw ? in.cy : acc_t(1)) * (acc_t(1) - eps) * chain;
  }
  for (int64_t j = valid; j < in.v; ++j) f[j] = 0;
}

// One compiled clone per instruction set; the loader picks the best at run time.
TK_TARGET_CLONES void process_row_f32(float* f, const RowIn<float>& in, const Consts<float>& c, RowOut<float>& out) {
  process_row<float>(f, in, c, out);
}

void process_row_f64(double* f, const RowIn<double>& in, const Consts<double>& c, RowOut<double>& out) {
  process_row<double>(f, in, c, out);
}

inline void run_row(float* f, const RowIn<float>& in, const Consts<float>& c, RowOut<float>& out) {
  process_row_f32(f, in, c, out);
}
inline void run_row(double* f, const RowIn<double>& in, const Consts<double>& c, RowOut<double>& out) {
  process_row_f64(f, in, c, out);
}

// The row in the accumulation type: the chunk itself when the types agree, else a converted copy.
// bf16 <-> fp32 rows in vector code (c10's scalar conversions do not vectorize); the rounding is
// c10's: to nearest even, NaN to 0x7FC0.
TK_TARGET_CLONES void bf16_row_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(src[j]) << 16;
    std::memcpy(dst + j, &u, sizeof(float));
  }
}

TK_TARGET_CLONES void f32_row_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, sizeof(u));
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    dst[j] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

template <typename scalar_t, typename acc_t>
acc_t* load_row(scalar_t* zr, std::vector<acc_t>& buf, int64_t v) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return zr;
  } else if constexpr (std::is_same<scalar_t, at::BFloat16>::value && std::is_same<acc_t, float>::value) {
    bf16_row_to_f32(reinterpret_cast<const uint16_t*>(zr), buf.data(), v);
    return buf.data();
  } else {
    for (int64_t j = 0; j < v; ++j) buf[j] = static_cast<acc_t>(zr[j]);
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
void store_row(scalar_t* zr, const acc_t* f, int64_t v) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value && std::is_same<acc_t, float>::value) {
    f32_row_to_bf16(f, reinterpret_cast<uint16_t*>(zr), v);
  } else if constexpr (!std::is_same<scalar_t, acc_t>::value) {
    for (int64_t j = 0; j < v; ++j) zr[j] = static_cast<scalar_t>(f[j]);
  }
}

void cpu_row_kernel(const RowTask& t, const LossOptions& o) {
  const int64_t rows = t.logits.size(0), v = t.logits.size(1);
  const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(v, o.vocab_total - o.vocab_start));
  const int64_t* labels = t.labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.logits.scalar_type(), "tiedkernels_cpu_row", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* z = t.logits.data_ptr<scalar_t>();
    const acc_t* gs = t.grad_scale.defined() ? t.grad_scale.data_ptr<acc_t>() : nullptr;
    const bool gs_scalar = t.grad_scale.defined() && t.grad_scale.dim() == 0;
    const acc_t* lse_in = t.lse_in.defined() ? t.lse_in.data_ptr<acc_t>() : nullptr;
    acc_t* lse_out = t.lse_out.defined() ? t.lse_out.data_ptr<acc_t>() : nullptr;
    acc_t* loss_out = t.loss_out.defined() ? t.loss_out.data_ptr<acc_t>() : nullptr;
    acc_t* stats = t.stats_out.defined() ? t.stats_out.data_ptr<acc_t>() : nullptr;
    const int64_t stats_stride = t.stats_out.defined() ? t.stats_out.stride(0) : 0;
    Consts<acc_t> c;
    c.scale = static_cast<acc_t>(o.logit_scale);
    c.softcap = static_cast<acc_t>(o.softcap);
    c.inv_softcap = o.softcap > 0 ? static_cast<acc_t>(1.0 / o.softcap) : acc_t(0);
    c.eps = static_cast<acc_t>(o.label_smoothing);
    c.z_loss = static_cast<acc_t>(o.z_loss);
    c.inv_vocab = static_cast<acc_t>(1.0 / static_cast<double>(o.vocab_total));
    c.cw = t.class_w.defined() ? t.class_w.data_ptr<acc_t>() : nullptr;
    c.cw_sum = t.class_w.defined() ? t.class_w_sum.item<acc_t>() : static_cast<acc_t>(o.vocab_total);
    const acc_t* cy = t.target_w.defined() ? t.target_w.data_ptr<acc_t>() : nullptr;
    const acc_t* gl = t.grad_lse.defined() ? t.grad_lse.data_ptr<acc_t>() : nullptr;
    int64_t* pred = t.pred_out.defined() ? t.pred_out.data_ptr<int64_t>() : nullptr;
    acc_t* ent = t.ent_out.defined() ? t.ent_out.data_ptr<acc_t>() : nullptr;
    // Rows per task so that a task holds at least ~64k logits: small calls stay on one thread.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, v));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(std::is_same<scalar_t, acc_t>::value ? 0 : v);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* zr = z + r * v;
        acc_t* f = load_row<scalar_t, acc_t>(zr, buf, v);
        RowIn<acc_t> in;
        const int64_t y = labels[r];
        in.ignored = y == o.ignore_index;
        const int64_t local = y - o.vocab_start;
        in.target = (!in.ignored && local >= 0 && local < valid) ? local : -1;
        in.valid = valid;
        in.v = v;
        in.have_lse = lse_in != nullptr;
        in.lse_given = lse_in ? lse_in[r] : acc_t(0);
        in.g = gs ? (gs_scalar ? gs[0] : gs[r]) : acc_t(1);
        in.grad = t.write_grad;
        in.stats = pred != nullptr;
        in.cy = cy ? cy[r] : acc_t(1);
        in.gl = gl ? gl[r] : acc_t(0);
        RowOut<acc_t> out;
        run_row(f, in, c, out);
        if (pred) {
          pred[r] = out.argmax >= 0 ? out.argmax + o.vocab_start : o.vocab_start;
          ent[r] = out.entropy;
        }
        if (lse_out) lse_out[r] = out.lse;
        if (loss_out) loss_out[r] = out.loss;
        if (stats) {
          stats[r] = out.lse;
          stats[stats_stride + r] = out.zy;
          stats[2 * stats_stride + r] = out.sumf;
        }
        if (t.write_grad) store_row<scalar_t, acc_t>(zr, f, v);
      }
    });
  });
}

FwdResult lce_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, bool return_stats, double grad_filter) {
  check_labels_host(labels, ignore_index, vocab_total > 0 ? vocab_total : vocab_start + weight.size(0));
  return lce_fwd_entry(cpu_row_kernel, hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing,
                       z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw,
                       compute_db, class_weight, return_stats, grad_filter);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, const c10::optional<at::Tensor>& grad_lse,
    double grad_filter) {
  check_labels_host(labels, ignore_index, vocab_total > 0 ? vocab_total : vocab_start + weight.size(0));
  return lce_bwd_entry(cpu_row_kernel, grad_loss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing,
                       z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw,
                       compute_db, class_weight, grad_lse, grad_filter);
}

at::Tensor lce_stats_cpu(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& labels, int64_t ignore_index, double softcap, double logit_scale,
                         int64_t vocab_start, int64_t vocab_total, int64_t chunk_size,
                         const c10::optional<at::Tensor>& class_weight) {
  check_labels_host(labels, ignore_index, vocab_total > 0 ? vocab_total : vocab_start + weight.size(0));
  return lce_stats_entry(cpu_row_kernel, hidden, weight, bias, labels, ignore_index, softcap, logit_scale,
                         vocab_start, vocab_total, chunk_size, class_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(tiedkernels, CPU, m) {
  m.impl("lce_fwd", &lce_fwd_cpu);
  m.impl("lce_bwd", &lce_bwd_cpu);
  m.impl("lce_stats", &lce_stats_cpu);
}

}  // namespace tiedkernels
