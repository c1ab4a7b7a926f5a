#include "lce_driver.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>

#include <cerrno>
#endif

namespace tiedkernels {

// MKL's GEMMs of bf16 / fp16 operands with fp32 products, fp32 sums and an fp32 output
// (c = alpha a b + beta c), exported by PyTorch's x86-64 CPU builds, which link MKL in. They run on
// AMX or AVX512-BF16/FP16 where the CPU has them and convert in their own packing elsewhere. Weak:
// null where the torch build has no MKL (then cpu_mm takes its fp32 tiles). The int arguments are
// MKL's LP64 MKL_INT and its CBLAS enums.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const void* a, int lda, const void* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const void* a, int lda, const void* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace {

at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Bytes per tile when a low-precision chunk's dW contribution is rounded once to the input
// dtype and added into the fp32 accumulator (devices other than the CPU and CUDA, which have
// no GEMM with an fp32 output from low-precision inputs here), and of cpu_mm's fp32 tiles.
constexpr int64_t kDwTileBytes = 8LL << 20;

// A fresh CPU buffer of many MiB (the chunk's logits, dW, dh) is advised to 2 MiB pages and
// faulted in here, in 32 MiB ranges across the threads (MADV_POPULATE_WRITE, Linux 5.14+; without
// it the GEMM faults the pages in itself), before a GEMM writes it. Left to the GEMM, the faults
// land inside its tiled writes and stall it: on 2 threads MKL's sgemm writing a fresh 512 MiB fp32
// dW (V=131072, D=1024, 512 rows) took 1.7-2.1 s into advised, untouched pages and 0.85-1.05 s into
// populated ones. Populating costs 43-56 ms per 512 MiB while the freed memory is still backed; on
// a VM whose host takes freed memory back (free page reporting) it can cost as much as the stall
// did, where 4 KiB pages fault in 0.15-0.21 s. Over the report's fp32 shapes on such a VM, in
// rounds seconds apart, the fused step took 1.02-1.16x the three GEMMs advised and populated,
// 1.05-1.26x on 4 KiB pages, 1.08-1.35x advised only. Only whole pages inside the buffer are
// advised or populated, so resident memory does not grow; the content is left undefined: every
// buffer here is written before it is read. The logits op's output, a tensor the caller keeps, is
// left to 4 KiB pages: populated huge pages cost it more than they saved there (N=2048, D=1024,
// V=32768, calls 0.5 s apart: 1.42-1.45x its GEMM against 1.03-1.11x).
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
void prepare_fresh(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20, kPage = 4096;
  if (!t.defined() || !t.is_cpu() || t.nbytes() < 4 * kHuge) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  // Whole pages inside the buffer, in 32 MiB ranges.
  const uintptr_t pb = (p + kPage - 1) & ~(kPage - 1), pe = (p + t.nbytes()) & ~(kPage - 1);
  constexpr int64_t kRange = 32 << 20;
  const int64_t ranges = static_cast<int64_t>((pe - pb + kRange - 1) / kRange);
  static std::atomic<bool> unsupported{false};
  if (pe <= pb || unsupported.load(std::memory_order_relaxed)) return;
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    const uintptr_t s = pb + static_cast<uintptr_t>(r0) * kRange;
    const uintptr_t f = std::min<uintptr_t>(pe, pb + static_cast<uintptr_t>(r1) * kRange);
    if (madvise(reinterpret_cast<void*>(s), f - s, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
      unsupported.store(true, std::memory_order_relaxed);
    }
  });
#endif
}

// Tests only (set_cpu_lowp_gemm_path): -1 the CPU decides, 0 ATen's own GEMM, 1 the fp32 tiles,
// 2 MKL's mixed-precision GEMM for every low-precision GEMM.
std::atomic<int> lowp_gemm_path{-1};

// Gradient filter: bytes of gathered weight rows (and of the fp32 dW part) per GEMM of the
// filtered path; the kept columns are walked in tiles of this size, so its temporaries stay bounded
// whatever the kept fraction.
constexpr int64_t kFilterTileBytes = 64LL << 20;
// Rows of dz per pass of the per-row filter test (its temporaries: this many rows of |dz|).
constexpr int64_t kFilterTestBytes = 8LL << 20;

// The vocabulary columns of the chunk's dz [rows, V] to keep: some row i has |dz_ij| > thr_i (or a
// NaN there), thr 0-dim or [rows] (sdt).  A bool [V] mask.
at::Tensor filter_keep(const at::Tensor& dz, const at::Tensor& thr) {
  const int64_t rows = dz.size(0), v = dz.size(1);
  if (dz.is_cpu() && dz.stride(1) == 1) {
    // One pass over the chunk, columns split over the threads (ATen's reductions over dim 0 and
    // comparisons with a per-row threshold are several times slower here).
    auto keep = at::zeros({v}, dz.options().dtype(at::kBool));
    const auto th = thr.dim() == 0 ? thr.expand({rows}).contiguous() : thr.contiguous();
    bool* k = keep.data_ptr<bool>();
    const int64_t ld = dz.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dz.scalar_type(), "filter_keep", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto th_acc = th.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const acc_t* tp = th_acc.data_ptr<acc_t>();
      const scalar_t* p = dz.data_ptr<scalar_t>();
      at::parallel_for(0, v, 4096, [&](int64_t j0, int64_t j1) {
        for (int64_t i = 0; i < rows; ++i) {
          const acc_t t = tp[i];
          const scalar_t* row = p + i * ld;
          for (int64_t j = j0; j < j1; ++j) {
            const acc_t a = std::abs(static_cast<acc_t>(row[j]));
            k[j] = k[j] | !(a <= t);  // a NaN (or a NaN threshold) keeps the column
          }
        }
      });
    });
    return keep;
  }
  if (thr.dim() == 0) {
    // max_i dz_ij <= thr and min_i dz_ij >= -thr for a skipped column (a NaN fails both: kept)
    auto mm = at::aminmax(dz, 0);
    const auto lo = std::get<0>(mm).to(thr.scalar_type()), hi = std::get<1>(mm).to(thr.scalar_type());
    return at::logical_not(at::logical_and(hi <= thr, lo >= -thr));
  }
  const int64_t step = std::max<int64_t>(1, kFilterTestBytes / std::max<int64_t>(1, v * dz.element_size()));
  at::Tensor skip;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t r = std::min(step, rows - r0);
    auto s = (dz.narrow(0, r0, r).abs().to(thr.scalar_type()) <= thr.narrow(0, r0, r).unsqueeze(1)).all(0);
    skip = skip.defined() ? skip.logical_and_(s) : s;
  }
  return skip.defined() ? at::logical_not(skip) : at::ones({v}, dz.options().dtype(at::kBool));
}

// z[:, idx] as a contiguous [rows, k] tensor (the CPU: rows split over the threads; index_select
// along dim 1 is slow there for bf16).
at::Tensor gather_columns(const at::Tensor& z, const at::Tensor& idx) {
  if (!z.is_cpu() || z.stride(1) != 1) return z.index_select(1, idx);
  const int64_t rows = z.size(0), k = idx.size(0), ld = z.stride(0);
  auto out = at::empty({rows, k}, z.options());
  const auto ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "gather_columns", [&] {
    const scalar_t* src = z.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t* a = src + i * ld;
        scalar_t* b = dst + i * k;
        for (int64_t c = 0; c < k; ++c) b[c] = a[ip[c]];
      }
    });
  });
  return out;
}

// w[idx] as a contiguous [k, D] tensor (the CPU: a copy per row, rows split over the threads).
at::Tensor gather_rows(const at::Tensor& w, const at::Tensor& idx) {
  if (!w.is_cpu() || !w.is_contiguous()) return w.index_select(0, idx);
  const int64_t k = idx.size(0), d = w.size(1);
  auto out = at::empty({k, d}, w.options());
  const auto ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  const auto* src = static_cast<const char*>(w.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t bytes = d * w.element_size();
  at::parallel_for(0, k, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, bytes)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * bytes, src + ip[r] * bytes, bytes);
  });
  return out;
}

// acc[idx[r]] += part[r] for the distinct rows idx (the CPU: rows split over the threads; index_add_
// goes through a scatter there that is several times slower than the dW GEMM it follows).
void add_rows(const at::Tensor& acc, const at::Tensor& idx, const at::Tensor& part) {
  if (!acc.is_cpu() || !acc.is_contiguous() || part.scalar_type() != acc.scalar_type()) {
    acc.index_add_(0, idx, part);
    return;
  }
  const auto pc = part.contiguous(), ic = idx.contiguous();
  const int64_t k = idx.size(0), d = acc.size(1);
  const int64_t* ip = ic.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "add_rows", [&] {
    scalar_t* a = acc.data_ptr<scalar_t>();
    const scalar_t* p = pc.data_ptr<scalar_t>();
    at::parallel_for(0, k, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = a + ip[r] * d;
        const scalar_t* src = p + r * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
      }
    });
  });
}

using MixedGemm = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int, float, float*,
                           int);

MixedGemm mixed_gemm_for(at::ScalarType t) {
  return t == at::kBFloat16 ? &cblas_gemm_bf16bf16f32 : t == at::kHalf ? &cblas_gemm_f16f16f32 : nullptr;
}

// A [rows, cols] operand as MKL reads it: row-major, transposed or not, with its leading dimension.
struct MklOperand {
  at::Tensor t;
  int trans;
  int64_t ld;
};

MklOperand mkl_operand(const at::Tensor& x) {
  constexpr int kNoTrans = 111, kTrans = 112;
  const int64_t r = x.size(0), c = x.size(1);
  if (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, c)) return {x, kNoTrans, x.stride(0)};
  if (x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(1, r)) return {x, kTrans, x.stride(1)};
  auto y = x.contiguous();
  return {y, kNoTrans, std::max<int64_t>(1, c)};
}

// c [m, n] (fp32, unit column stride) = a [m, k] b [k, n] + beta c through MKL's mixed GEMM: fp32
// products of the low-precision values (exact) summed in fp32. False where this cannot run (no
// MKL in this torch build, sizes past MKL's 32-bit ints, a c with strided columns): the caller
// takes its fp32 tiles then.
bool mixed_gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, float beta) {
  const MixedGemm fn = mixed_gemm_for(a.scalar_type());
  if (fn == nullptr || b.scalar_type() != a.scalar_type() || c.scalar_type() != at::kFloat) return false;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (c.stride(1) != 1 || c.stride(0) < std::max<int64_t>(1, n)) return false;
  const auto x = mkl_operand(a), y = mkl_operand(b);
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  for (const int64_t s : {m, n, k, x.ld, y.ld, c.stride(0)}) {
    if (s > kMax) return false;
  }
  constexpr int kRowMajor = 101;
  fn(kRowMajor, x.trans, y.trans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
     x.t.data_ptr(), static_cast<int>(x.ld), y.t.data_ptr(), static_cast<int>(y.ld), beta,
     c.data_ptr<float>(), static_cast<int>(c.stride(0)));
  return true;
}

}  // namespace

int set_cpu_lowp_gemm_path(int path) {
  TORCH_CHECK(path >= -1 && path <= 2, "tiedkernels: the low-precision GEMM path is -1, 0, 1 or 2, not ", path);
  TORCH_CHECK(path != 2 || cpu_mixed_gemm_available(at::kBFloat16),
              "tiedkernels: this torch build has no MKL mixed-precision GEMM (cblas_gemm_bf16bf16f32)");
  return lowp_gemm_path.exchange(path);
}

bool cpu_lowp_gemm_is_slow(at::ScalarType t) {
  // ATen's CPU GEMM in bf16/fp16 is native only where the CPU has those instructions; elsewhere it
  // is a scalar fallback (measured on an AVX2 CPU: 500 times slower than MKL's fp32 GEMM on the
  // [N, V] x [V, D] layout of dh, 6 to 30 times on the others).
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const int forced = lowp_gemm_path.load();
  if (forced >= 0) return forced != 0;
  static const std::array<bool, 2> slow = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    auto has = [&](const char* k) {
      const auto it = caps.find(k);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return std::array<bool, 2>{!(has("avx512_bf16") || has("amx_bf16")), !(has("avx512_fp16") || has("amx_fp16"))};
  }();
  return t == at::kBFloat16 ? slow[0] : t == at::kHalf ? slow[1] : false;
}

bool cpu_mixed_gemm_available(at::ScalarType t) { return mixed_gemm_for(t) != nullptr; }

void cpu_mm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
            const c10::optional<at::Tensor>& bias) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool c32 = c.scalar_type() == at::kFloat;
  TORCH_CHECK(!accumulate || c32, "tiedkernels: cpu_mm accumulates into fp32 only");
  if (c.scalar_type() == a.scalar_type() && !cpu_lowp_gemm_is_slow(a.scalar_type())) {  // ATen's own GEMM
    at::Tensor out = c;
    if (accumulate) {
      out.addmm_(a, b);
    } else if (bias.has_value()) {
      at::addmm_out(out, *bias, a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  if (m == 0 || n == 0) return;
  const auto f = at::kFloat;
  const auto bias32 = bias.has_value() ? bias->to(f) : at::Tensor();
  // Products of bf16/fp16 values are exact in fp32 and the sums are fp32: a low-precision GEMM
  // with fp32 accumulation, rounded once into c. The largest of m, n, k is walked in tiles of
  // about kDwTileBytes of fp32, so the big operand (the weight) is never converted whole.
  if (k == 0) {
    if (!accumulate) {
      if (bias32.defined()) {
        c.copy_(bias32.expand({m, n}));
      } else {
        c.zero_();
      }
    }
    return;
  }
  // MKL's mixed GEMM where the CPU has bf16/fp16 instructions (AMX, AVX512-BF16/FP16), which it
  // runs on: an fp32 c (dW summed over chunks, exact logits) at the speed of a native GEMM, where
  // the fp32 tiles would run at fp32's. Without them MKL converts to fp32 in its packing, no faster
  // than the tiles (timed on an AVX2 CPU: 1.0-1.25 times their time per GEMM), so the tiles stay.
  const int forced = lowp_gemm_path.load();
  const bool mixed = mixed_gemm_for(a.scalar_type()) != nullptr &&
                     (forced == 2 || (forced != 1 && !cpu_lowp_gemm_is_slow(a.scalar_type())));
  if (mixed) {
    // No fp32 copy of either operand. Into an fp32 c directly (the bias, if any, written first and
    // summed in by beta); into a low-precision c through an fp32 tile of about kDwTileBytes along
    // its longer side, rounded once.
    auto run = [&](const at::Tensor& out, const at::Tensor& x, const at::Tensor& y, const at::Tensor& b32,
                   bool acc) {
      if (!acc && b32.defined()) out.copy_(b32.expand({out.size(0), out.size(1)}));
      return mixed_gemm(out, x, y, acc || b32.defined() ? 1.0f : 0.0f);
    };
    bool done = true;
    if (c32) {
      done = run(c, a, b, bias32, accumulate);
    } else if (m >= n) {
      const int64_t t = std::max<int64_t>(1, kDwTileBytes / (n * 4));
      auto tmp = at::empty({std::min(t, m), n}, c.options().dtype(f));
      for (int64_t i = 0; i < m && done; i += t) {
        const int64_t r = std::min(t, m - i);
        auto o = tmp.narrow(0, 0, r);
        done = run(o, a.narrow(0, i, r), b, bias32, false);
        if (done) c.narrow(0, i, r).copy_(o);
      }
    } else {
      const int64_t t = std::max<int64_t>(1, kDwTileBytes / (m * 4));
      auto tmp = at::empty({m, std::min(t, n)}, c.options().dtype(f));
      for (int64_t j = 0; j < n && done; j += t) {
        const int64_t r = std::min(t, n - j);
        auto o = tmp.narrow(1, 0, r);
        done = run(o, a, b.narrow(1, j, r), bias32.defined() ? bias32.narrow(0, j, r) : at::Tensor(), false);
        if (done) c.narrow(1, j, r).copy_(o);
      }
    }
    if (done) return;
  }
  auto store = [&](at::Tensor out, const at::Tensor& x32, const at::Tensor& y32, const at::Tensor& b32) {
    if (c32 && accumulate) {
      out.addmm_(x32, y32);
    } else if (c32 && !b32.defined()) {
      at::mm_out(out, x32, y32);
    } else {
      out.copy_(b32.defined() ? at::addmm(b32, x32, y32) : at::mm(x32, y32));
    }
  };
  if (m >= n && m >= k) {
    const auto b32 = b.to(f);
    const int64_t t = std::max<int64_t>(1, kDwTileBytes / (k * 4));
    for (int64_t i = 0; i < m; i += t) {
      const int64_t r = std::min(t, m - i);
      store(c.narrow(0, i, r), a.narrow(0, i, r).to(f), b32, bias32);
    }
  } else if (n >= k) {
    const auto a32 = a.to(f);
    const int64_t t = std::max<int64_t>(1, kDwTileBytes / (k * 4));
    for (int64_t j = 0; j < n; j += t) {
      const int64_t r = std::min(t, n - j);
      store(c.narrow(1, j, r), a32, b.narrow(1, j, r).to(f), bias32.defined() ? bias32.narrow(0, j, r) : at::Tensor());
    }
  } else {
    at::Tensor acc = c32 ? c : at::empty({m, n}, c.options().dtype(f));
    const int64_t t = std::max<int64_t>(1, kDwTileBytes / (std::max(m, n) * 4));
    for (int64_t l = 0; l < k; l += t) {
      const int64_t r = std::min(t, k - l);
      const auto x32 = a.narrow(1, l, r).to(f), y32 = b.narrow(0, l, r).to(f);
      if (l == 0 && !accumulate) {
        at::mm_out(acc, x32, y32);
      } else {
        acc.addmm_(x32, y32);
      }
    }
    if (bias32.defined()) acc.add_(bias32);
    if (!c32) c.copy_(acc);
  }
}

void check_loss_args(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& labels, int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "tiedkernels: hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "tiedkernels: weight must be [V, D], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "tiedkernels: hidden ", hidden.sizes(), " and weight ",
              weight.sizes(), " disagree on D");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "tiedkernels: hidden is ", hidden.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "tiedkernels: hidden must be floating point");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "tiedkernels: labels ", labels.sizes(),
              " do not match hidden ", hidden.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "tiedkernels: labels must be an integer tensor");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "tiedkernels: bias ", bias->sizes(),
                " does not match weight ", weight.sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "tiedkernels: bias dtype must match weight");
  }
  TORCH_CHECK(chunk_size > 0, "tiedkernels: chunk_size must be positive, got ", chunk_size);
}

void check_labels_host(const at::Tensor& labels, int64_t ignore_index, int64_t vocab_total) {
  auto lab = labels.to(at::kLong).contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.numel(); ++i) {
    const int64_t y = p[i];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < vocab_total), "tiedkernels: label ", y,
                      " at position ", i, " is outside [0, V) for V=", vocab_total,
                      " and is not ignore_index=", ignore_index);
  }
}

LossResult lce_chunked(LossMode mode, const at::Tensor& hidden, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                       const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& lse_in,
                       const LossOptions& opt, int64_t chunk_size, bool compute_dh, bool compute_dw,
                       bool compute_db, RowKernel row_kernel, const LossExtras& extras) {
  check_loss_args(hidden, weight, bias, labels, chunk_size);
  const auto h = hidden.contiguous();
  const auto w = weight.contiguous();
  const auto lab = labels.to(at::kLong).contiguous();
  const int64_t n = h.size(0), v = w.size(0), d = w.size(1);
  const auto dtype = h.scalar_type();
  const auto sdt = stat_dtype(dtype);
  const auto sopt = h.options().dtype(sdt);

  const bool grads = mode == LossMode::Backward ||
                     (mode == LossMode::Forward && grad_scale.has_value() && (compute_dh || compute_dw || compute_db));
  at::Tensor gs;
  if (grad_scale.has_value()) {
    gs = grad_scale->to(sdt).contiguous();
    TORCH_CHECK(gs.dim() == 0 || (gs.dim() == 1 && gs.size(0) == n), "tiedkernels: grad scale must be 0-dim or [N]");
  }
  at::Tensor lse_given;
  if (mode == LossMode::Backward) {
    TORCH_CHECK(lse_in.has_value() && lse_in->dim() == 1 && lse_in->size(0) == n, "tiedkernels: lse must be [N]");
    lse_given = lse_in->to(sdt).contiguous();
  }

  // Class weights: this shard's columns (0 in padding), each row's c[y] (0 when ignored; a bad
  // label reads a clamped entry, its row is flagged by the label check), and their sum.
  at::Tensor cw_local, cw_target, cw_sum;
  if (extras.class_weight.has_value()) {
    const auto& cw = *extras.class_weight;
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == opt.vocab_total, "tiedkernels: class_weight must be [vocab_total] = [",
                opt.vocab_total, "], got ", cw.sizes());
    TORCH_CHECK(cw.device() == h.device(), "tiedkernels: class_weight is on ", cw.device(), " but hidden on ",
                h.device());
    TORCH_CHECK(at::isFloatingType(cw.scalar_type()), "tiedkernels: class_weight must be floating point");
    const auto c = cw.to(sdt).contiguous();
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(v, opt.vocab_total - opt.vocab_start));
    cw_local = at::zeros({v}, sopt);
    if (valid > 0) cw_local.narrow(0, 0, valid).copy_(c.narrow(0, opt.vocab_start, valid));
    const auto ignored = lab == opt.ignore_index;
    const auto idx = at::where(ignored, at::zeros_like(lab), lab).clamp(0, std::max<int64_t>(0, opt.vocab_total - 1));
    cw_target = opt.vocab_total > 0 ? at::where(ignored, at::zeros({}, sopt), c.index_select(0, idx))
                                    : at::zeros({n}, sopt);
    cw_sum = c.sum();
  }
  at::Tensor gl;
  if (extras.grad_lse.has_value()) {
    TORCH_CHECK(mode == LossMode::Backward, "tiedkernels: grad_lse is an input of the backward only");
    TORCH_CHECK(extras.grad_lse->dim() == 1 && extras.grad_lse->size(0) == n, "tiedkernels: grad_lse must be [N] = [",
                n, "], got ", extras.grad_lse->sizes());
    gl = extras.grad_lse->to(sdt).contiguous();
  }
  const bool stats_on = mode == LossMode::Forward && extras.return_stats;
  const double gfilter = extras.grad_filter;
  TORCH_CHECK(std::isfinite(gfilter) && gfilter >= 0, "tiedkernels: grad_filter must be a finite number >= 0, got ",
              gfilter);

  LossResult r;
  r.pred = at::empty({stats_on ? n : 0}, h.options().dtype(at::kLong));
  r.ent = at::empty({stats_on ? n : 0}, sopt);
  at::Tensor loss_vec;
  if (mode == LossMode::Forward) {
    loss_vec = at::empty({n}, sopt);
    r.lse = at::empty({n}, sopt);
  } else if (mode == LossMode::Stats) {
    r.stats = at::empty({3, n}, sopt);
  }
  const bool want_dh = grads && compute_dh, want_dw = grads && compute_dw, want_db = grads && compute_db;
  r.dh = want_dh ? at::empty({n, d}, h.options()) : at::empty({0}, h.options());
  const bool low_precision = dtype != sdt;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, n));
  const int64_t chunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  // CPU, low precision, where the CPU has no native GEMM for it: the logits and dh GEMMs through
  // fp32 tiles (cpu_mm).
  const bool f32_gemm = low_precision && h.is_cpu() && cpu_lowp_gemm_is_slow(dtype);
  // CPU, low precision, dW: with a single chunk, that chunk's GEMM straight into the output (cpu_mm:
  // ATen's own where the CPU has a native GEMM, as a stock model computes it, else the fp32 tiles,
  // rounded once). With more chunks each chunk's dzᵀ h is added into the fp32 dW through fp32 tiles
  // (cpu_mm into an fp32 c), never rounded to the input dtype first: a chunk's rounded contribution
  // carries an error of its own size, and contributions of opposite sign leave it all in a small
  // sum (1.4 times the RMS error of a stock bf16 GEMM at 16 chunks). Elsewhere the first chunk
  // writes dW (no zero fill).
  // With the gradient filter on, any chunk may add only its kept rows (index_add_): dW is one fp32
  // (or fp64) accumulator filled with zeros first, every chunk adding into it.
  const bool filtering = gfilter > 0 && (want_dh || want_dw) && n > 0 && v > 0;
  const bool direct_dw = want_dw && low_precision && h.is_cpu() && chunks == 1 && !filtering;
  at::Tensor dw_part = direct_dw ? at::empty({v, d}, w.options()) : at::Tensor();
  at::Tensor dw_acc = !want_dw || direct_dw ? at::Tensor()
                      : (chunks == 0 || filtering) ? at::zeros({v, d}, w.options().dtype(sdt))
                                                   : at::empty({v, d}, w.options().dtype(sdt));
  at::Tensor db_acc = want_db ? at::zeros({v}, w.options().dtype(sdt)) : at::Tensor();
  const int64_t dw_tile = std::max<int64_t>(1, kDwTileBytes / std::max<int64_t>(1, d * h.element_size()));

  // Low precision with a bias, a softcap or a logit scale: the chunk's logits stay in fp32 (no
  // rounding to the input dtype before those are applied, so the lse is as exact as fp32 allows);
  // dL/dz is then rounded once into the input dtype for the dh/dW GEMMs.  Without them the logits
  // are the input dtype's GEMM output, exactly what a stock model computes.
  const bool exact_logits = low_precision && (bias.has_value() || opt.softcap > 0 || opt.logit_scale != 1.0);
  at::Tensor zbuf = (!exact_logits || grads) ? at::empty({n == 0 ? 0 : chunk, v}, h.options()) : at::Tensor();
  at::Tensor z32buf = exact_logits ? at::empty({n == 0 ? 0 : chunk, v}, sopt) : at::Tensor();
  const auto bias32 = exact_logits && bias.has_value() ? bias->to(sdt) : at::Tensor();
  for (const auto& t : {zbuf, z32buf, r.dh, dw_part, dw_acc}) prepare_fresh(t);
  const auto wt = w.t();
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t rows = std::min(chunk, n - start);
    const auto hc = h.narrow(0, start, rows);
    at::Tensor z = zbuf.defined() ? zbuf.narrow(0, 0, rows) : at::Tensor();
    at::Tensor zf = z;  // the logits the row kernel works on
    if (exact_logits) {
      zf = z32buf.narrow(0, 0, rows);
      if (!h.is_cpu()) {
        at::mm_out(zf, hc, wt, sdt);  // cuBLAS: fp32 accumulation and output
        if (bias32.defined()) zf.add_(bias32);
      } else {
        cpu_mm(zf, hc, wt, /*accumulate=*/false, bias);  // fp32 tiles of the weight
      }
    } else if (f32_gemm) {
      cpu_mm(z, hc, wt);  // no bias here: a low-precision bias takes the exact path above
    } else if (bias.has_value()) {
      at::addmm_out(z, *bias, hc, wt);
    } else {
      at::mm_out(z, hc, wt);
    }
    RowTask t;
    t.logits = zf;
    t.labels = lab.narrow(0, start, rows);
    if (gs.defined()) t.grad_scale = gs.dim() == 0 ? gs : gs.narrow(0, start, rows);
    if (lse_given.defined()) t.lse_in = lse_given.narrow(0, start, rows);
    if (mode == LossMode::Forward) {
      t.lse_out = r.lse.narrow(0, start, rows);
      t.loss_out = loss_vec.narrow(0, start, rows);
    }
    if (mode == LossMode::Stats) t.stats_out = r.stats.narrow(1, start, rows);
    if (cw_local.defined()) {
      t.class_w = cw_local;
      t.target_w = cw_target.narrow(0, start, rows);
      t.class_w_sum = cw_sum;
    }
    if (gl.defined()) t.grad_lse = gl.narrow(0, start, rows);
    if (stats_on) {
      t.pred_out = r.pred.narrow(0, start, rows);
      t.ent_out = r.ent.narrow(0, start, rows);
    }
    t.write_grad = grads;
    row_kernel(t, opt);
    if (!grads) continue;
    if (exact_logits) z.copy_(zf);  // dL/dz, rounded once
    if (want_db) db_acc.add_(at::sum(z, {0}, false, sdt));  // exact: every column
    if (filtering) {
      // The row scales s_i of the threshold: |incoming gradient of the loss| (0 at an ignored
      // row: its dz is 0 but for the lse's gradient) + |incoming gradient of the lse|.
      at::Tensor thr;
      if (t.grad_lse.defined() || (t.grad_scale.defined() && t.grad_scale.dim() == 1)) {
        auto g = t.grad_scale.defined() ? t.grad_scale.abs().expand({rows}) : at::ones({rows}, sopt);
        g = at::where(t.labels == opt.ignore_index, at::zeros({}, sopt), g);
        if (t.grad_lse.defined()) g = g + t.grad_lse.abs();
        thr = g * gfilter;
      } else {
        thr = (t.grad_scale.defined() ? t.grad_scale.abs() : at::ones({}, sopt)) * gfilter;
      }
      // One host sync per chunk on a GPU (nonzero's count).
      const auto idx = at::nonzero(filter_keep(z, thr)).squeeze(1);
      const int64_t kept = idx.size(0);
      if (kept < v) {
        const int64_t tile = std::max<int64_t>(1, kFilterTileBytes / std::max<int64_t>(1, d * 4));
        const int64_t ntiles = (kept + tile - 1) / tile;
        at::Tensor dh32;  // several tiles of a low-precision dh: summed in fp32, rounded once
        if (want_dh && low_precision && ntiles > 1) dh32 = at::zeros({rows, d}, sopt);
        if (want_dh && kept == 0) r.dh.narrow(0, start, rows).zero_();
        for (int64_t k0 = 0; k0 < kept; k0 += tile) {
          const int64_t kt = std::min(tile, kept - k0);
          const auto it = idx.narrow(0, k0, kt);
          const auto zk = gather_columns(z, it);  // [rows, kt]
          if (want_dh) {
            const auto wk = gather_rows(w, it);  // [kt, d]
            auto dhc = r.dh.narrow(0, start, rows);
            if (dh32.defined()) {
              if (h.is_cpu()) {
                cpu_mm(dh32, zk, wk, /*accumulate=*/true);
              } else if (h.is_cuda()) {
                at::addmm_out(dh32, dh32, zk, wk, sdt);
              } else {
                dh32.add_(at::mm(zk, wk));
              }
            } else if (k0 == 0) {
              if (f32_gemm) {
                cpu_mm(dhc, zk, wk);
              } else {
                at::mm_out(dhc, zk, wk);
              }
            } else {
              dhc.addmm_(zk, wk);  // fp32 / fp64: several tiles summed in place
            }
          }
          if (want_dw) {
            at::Tensor part;
            if (!low_precision) {
              part = at::mm(zk.t(), hc);
            } else if (h.is_cpu()) {
              part = at::empty({kt, d}, sopt);
              cpu_mm(part, zk.t(), hc);  // fp32 output
            } else if (h.is_cuda()) {
              part = at::empty({kt, d}, sopt);
              at::mm_out(part, zk.t(), hc, sdt);
            } else {
              part = at::mm(zk.t(), hc).to(sdt);
            }
            add_rows(dw_acc, it, part);
          }
        }
        if (dh32.defined()) r.dh.narrow(0, start, rows).copy_(dh32);
        continue;
      }
    }
    if (want_dh) {
      auto dhc = r.dh.narrow(0, start, rows);
      if (f32_gemm) {
        cpu_mm(dhc, z, w);
      } else {
        at::mm_out(dhc, z, w);
      }
    }
    if (want_dw) {
      const bool first = start == 0 && !filtering;
      if (!low_precision) {
        if (first) {
          at::mm_out(dw_acc, z.t(), hc);
        } else {
          dw_acc.addmm_(z.t(), hc);
        }
      } else if (h.is_cpu()) {
        if (direct_dw) {
          cpu_mm(dw_part, z.t(), hc);
        } else {
          cpu_mm(dw_acc, z.t(), hc, /*accumulate=*/!first);
        }
      } else if (h.is_cuda()) {
        // cuBLAS: this chunk's dzᵀ h accumulated by the GEMM itself into the fp32 dW (fp32
        // output from low-precision inputs): no rounding of the chunk's contribution, no tiles.
        if (first) {
          at::mm_out(dw_acc, z.t(), hc, sdt);
        } else {
          at::addmm_out(dw_acc, dw_acc, z.t(), hc, sdt);
        }
      } else {
        if (first) dw_acc.zero_();
        // One rounding of this chunk's contribution, then fp32 accumulation across chunks,
        // in vocabulary tiles so the temporary stays small.
        for (int64_t v0 = 0; v0 < v; v0 += dw_tile) {
          const int64_t vt = std::min(dw_tile, v - v0);
          dw_acc.narrow(0, v0, vt).add_(at::mm(z.narrow(1, v0, vt).t(), hc));
        }
      }
    }
  }

  if (mode == LossMode::Forward) {
    r.loss = gs.defined() ? (gs.dim() == 0 ? loss_vec.sum() * gs : (loss_vec * gs).sum()) : loss_vec;
  }
  r.dw = !want_dw ? at::empty({0}, w.options())
         : direct_dw ? dw_part
         : (low_precision ? dw_acc.to(dtype) : dw_acc);
  r.db = want_db ? (low_precision ? db_acc.to(dtype) : db_acc) : at::empty({0}, w.options());
  return r;
}

namespace {
LossOptions make_options(int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                         double logit_scale, int64_t vocab_start, int64_t vocab_total, int64_t v_local) {
  LossOptions o;
  o.ignore_index = ignore_index;
  o.label_smoothing = label_smoothing;
  o.z_loss = z_loss;
  o.softcap = softcap;
  o.logit_scale = logit_scale;
  o.vocab_start = vocab_start;
  o.vocab_total = vocab_total > 0 ? vocab_total : v_local + vocab_start;
  TORCH_CHECK(vocab_start >= 0, "tiedkernels: vocab_start must be >= 0");
  TORCH_CHECK(softcap >= 0, "tiedkernels: softcap must be positive (0 disables it)");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "tiedkernels: label_smoothing must be in [0, 1]");
  return o;
}
}  // namespace

FwdResult lce_fwd_entry(RowKernel rk, const at::Tensor& hidden, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                        const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
                        double z_loss, double softcap, double logit_scale, int64_t vocab_start, int64_t vocab_total,
                        int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
                        const c10::optional<at::Tensor>& class_weight, bool return_stats, double grad_filter) {
  const auto o = make_options(ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start,
                              vocab_total, weight.size(0));
  LossExtras x;
  x.class_weight = class_weight;
  x.return_stats = return_stats;
  x.grad_filter = grad_filter;
  auto r = lce_chunked(LossMode::Forward, hidden, weight, bias, labels, grad_scale, c10::nullopt, o, chunk_size,
                       compute_dh, compute_dw, compute_db, rk, x);
  return {r.loss, r.lse, r.dh, r.dw, r.db, r.pred, r.ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_bwd_entry(
    RowKernel rk, const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, const c10::optional<at::Tensor>& grad_lse,
    double grad_filter) {
  const auto o = make_options(ignore_index, label_smoothing, z_loss, softcap, logit_scale, vocab_start,
                              vocab_total, weight.size(0));
  LossExtras x;
  x.class_weight = class_weight;
  x.grad_lse = grad_lse;
  x.grad_filter = grad_filter;
  auto r = lce_chunked(LossMode::Backward, hidden, weight, bias, labels, grad_loss, lse, o, chunk_size,
                       compute_dh, compute_dw, compute_db, rk, x);
  return {r.dh, r.dw, r.db};
}

at::Tensor lce_stats_entry(RowKernel rk, const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
                           double softcap, double logit_scale, int64_t vocab_start, int64_t vocab_total,
                           int64_t chunk_size, const c10::optional<at::Tensor>& class_weight) {
  const auto o = make_options(ignore_index, 0.0, 0.0, softcap, logit_scale, vocab_start, vocab_total, weight.size(0));
  LossExtras x;
  x.class_weight = class_weight;
  auto r = lce_chunked(LossMode::Stats, hidden, weight, bias, labels, c10::nullopt, c10::nullopt, o, chunk_size,
                       false, false, false, rk, x);
  return r.stats;
}

}  // namespace tiedkernels
