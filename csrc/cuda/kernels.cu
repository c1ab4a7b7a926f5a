// CUDA kernels of every op, in one translation unit (each .cu file that includes the torch
// headers costs about 90 s per GPU architecture to compile).
//
// * Embedding: a checked gather; the backward either atomically adds rows (fp32 weights,
//   outside deterministic mode) or sums each vocabulary row's contributions in fp32 in a fixed
//   order (ids sorted stably; one block per run of equal ids, or per run and tile of D for long
//   runs) and adds them once: deterministic, and one rounding for bf16/fp16.
// * Logits: GEMMs through cuBLAS (ATen), the scale/softcap and its derivative elementwise here.
// * Fused loss: the device-generic chunked driver (lce_driver.h) runs the GEMMs through cuBLAS;
//   the row kernel below turns one chunk's logits into lse/loss/stats and overwrites it with
//   dL/dz, one thread block per row, fp32 (fp64 for fp64) accumulation.
//
// Bad ids and labels: the kernels never read out of bounds with them (a bad id gives a NaN
// row, a bad label a NaN loss and gradient row).  To raise a Python IndexError, a tiny check
// kernel records the first bad position and its value, the record is copied to pinned host
// memory asynchronously, the op's own kernels are queued, and only then does the host wait
// for that copy (see IndexCheck).  Under CUDA graph capture the wait is impossible and is
// skipped, and TIEDKERNELS_CHECK_INDICES=0 skips it everywhere; the NaN then marks the bad
// token.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../lce_driver.h"

namespace tiedkernels {
namespace {

constexpr int kRowThreads = 512;
constexpr int kEmbThreads = 128;
constexpr int kElemThreads = 256;

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// ------------------------------------------------------------------------------------------
// index check

__global__ void find_bad_kernel(const int64_t* __restrict__ x, int64_t n, int64_t bound, bool has_ignore,
                                int64_t ignore, unsigned long long* __restrict__ first) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t y = x[i];
  const bool ok = (has_ignore && y == ignore) || (y >= 0 && y < bound);
  if (!ok) atomicMin(first, static_cast<unsigned long long>(i));
}

__global__ void bad_record_kernel(const int64_t* __restrict__ x, int64_t n,
                                  const unsigned long long* __restrict__ first, int64_t* __restrict__ record) {
  const unsigned long long pos = *first;
  const bool bad = pos < static_cast<unsigned long long>(n);
  record[0] = bad ? 1 : 0;
  record[1] = bad ? static_cast<int64_t>(pos) : -1;
  record[2] = bad ? x[pos] : 0;
}

// The device-side check of one index tensor; finish() waits for its 3-word record only.
struct IndexCheck {
  bool active = false;
  at::Tensor host;
  at::Tensor record;  // on the device: (bad?, position, value); kernels that write in place read [0]
  at::cuda::CUDAEvent event;
  int64_t bound = 0, ignore = 0;
  bool has_ignore = false;
  const char* what = "";

  void finish() {
    if (!active) return;
    event.synchronize();
    const int64_t* r = host.data_ptr<int64_t>();
    if (r[0] == 0) return;
    if (has_ignore) {
      TORCH_CHECK_INDEX(false, "tiedkernels: ", what, " ", r[2], " at position ", r[1], " is outside [0, V) for V=",
                        bound, " and is not ignore_index=", ignore);
    }
    TORCH_CHECK_INDEX(false, "tiedkernels: ", what, " ", r[2], " at position ", r[1], " is outside [0, V) for V=",
                      bound);
  }
};

bool capturing() { return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None; }

// TIEDKERNELS_CHECK_INDICES=0 turns the host-side report off (read at every call, as the
// Python backends do, so tests and users can switch it).
bool checks_enabled() {
  const char* v = std::getenv("TIEDKERNELS_CHECK_INDICES");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// `flat` must be a contiguous int64 tensor on the current device.
void start_check(IndexCheck& chk, const at::Tensor& flat, int64_t bound, bool has_ignore, int64_t ignore,
                 const char* what) {
  chk.bound = bound;
  chk.has_ignore = has_ignore;
  chk.ignore = ignore;
  chk.what = what;
  const int64_t n = flat.numel();
  if (n == 0 || !checks_enabled() || capturing()) return;
  auto first = at::full({1}, std::numeric_limits<int64_t>::max(), flat.options());
  chk.record = at::empty({3}, flat.options());
  auto& record = chk.record;
  auto* first_p = reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>());
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  find_bad_kernel<<<blocks, threads, 0, stream()>>>(flat.data_ptr<int64_t>(), n, bound, has_ignore, ignore, first_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bad_record_kernel<<<1, 1, 0, stream()>>>(flat.data_ptr<int64_t>(), n, first_p, record.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  chk.host = at::empty({3}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  chk.host.copy_(record, /*non_blocking=*/true);
  chk.event.record(at::cuda::getCurrentCUDAStream());
  chk.active = true;
}

at::Tensor flat_long(const at::Tensor& x) { return x.reshape({-1}).to(at::kLong).contiguous(); }

// ------------------------------------------------------------------------------------------
// embedding

template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ w, const int64_t* __restrict__ ids,
                              scalar_t* __restrict__ out, int64_t d, int64_t v, int64_t stride_wv, int64_t stride_wd) {
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t];
  const bool bad = id < 0 || id >= v;
  scalar_t* dst = out + t * d;
  if (bad) {
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) dst[k] = static_cast<scalar_t>(NAN);
    return;
  }
  const scalar_t* src = w + id * stride_wv;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) dst[k] = src[k * stride_wd];
}

// `bad` (the check's device record, or null): when it reports a bad id nothing is written, so
// an in-place accumulation that raises leaves the buffer as it was, without a host wait.
__global__ void scatter_atomic_kernel(const int64_t* __restrict__ ids, const float* __restrict__ g,
                                      float* __restrict__ out, int64_t d, int64_t v, int64_t pad, int64_t stride_ov,
                                      int64_t stride_od, const int64_t* __restrict__ bad) {
  if (bad != nullptr && bad[0] != 0) return;
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t];
  if (id < 0 || id >= v || id == pad) return;
  const float* src = g + t * d;
  float* dst = out + id * stride_ov;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) atomicAdd(dst + k * stride_od, src[k]);
}

// Runs of at least this many equal ids are summed by one block per tile of columns (a frequent id
// is then no single-block tail); shorter ones by one block over all of D, as many blocks as ids.
constexpr int64_t kLongRun = 32;

// out[row] += the sum of the gradient rows of one run of equal ids, in fp32 (fp64 for fp64), each
// column summed in the same order (the run's sorted positions) whichever launch and tile sums it:
// * run_starts null: one block per sorted position; the first position of a run shorter than
//   kLongRun sums all of D;
// * else one block per (position p = blockIdx.x * kLongRun, tile of `cols` columns), run_starts
//   holding the start of p's run: a run of kLongRun or more ids covers at least one such p, and
//   its first one sums the run's columns of the tile.
template <typename scalar_t, typename acc_t>
__global__ void scatter_sorted_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ perm,
                                      const int64_t* __restrict__ run_end, const int64_t* __restrict__ run_starts,
                                      const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t d, int64_t v,
                                      int64_t pad, int64_t stride_ov, int64_t stride_od, int64_t cols,
                                      const int64_t* __restrict__ bad) {
  if (bad != nullptr && bad[0] != 0) return;
  int64_t p, start, k0, k1;
  if (run_starts == nullptr) {
    p = blockIdx.x;
    if (p > 0 && sorted[p - 1] == sorted[p]) return;  // not the first of its run
    if (run_end[p] - p >= kLongRun) return;           // the tiled launch's
    start = p;
    k0 = 0;
    k1 = d;
  } else {
    p = static_cast<int64_t>(blockIdx.x) * kLongRun;
    start = run_starts[blockIdx.x];
    if (run_end[p] - start < kLongRun || p - start >= kLongRun) return;  // short, or not its first p
    k0 = static_cast<int64_t>(blockIdx.y) * cols;
    k1 = k0 + cols < d ? k0 + cols : d;
  }
  const int64_t row = sorted[p];
  if (row < 0 || row >= v || row == pad) return;
  const int64_t end = run_end[p];
  scalar_t* dst = out + row * stride_ov;
  for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
    acc_t acc = 0;
    for (int64_t q = start; q < end; ++q) acc += static_cast<acc_t>(g[perm[q] * d + k]);
    dst[k * stride_od] = static_cast<scalar_t>(static_cast<acc_t>(dst[k * stride_od]) + acc);
  }
}

void scatter_into(at::Tensor& out, const at::Tensor& grad, const at::Tensor& ids_flat,
                  c10::optional<int64_t> padding_idx, const IndexCheck& chk) {
  const int64_t* bad = chk.active ? chk.record.data_ptr<int64_t>() : nullptr;
  const int64_t v = out.size(0), d = out.size(1);
  const int64_t t = ids_flat.numel();
  if (t == 0 || d == 0) return;
  TORCH_CHECK(grad.numel() == t * d, "tiedkernels: grad ", grad.sizes(), " does not match ", t, " ids of D=", d);
  auto g = grad.reshape({t, d}).contiguous();
  TORCH_CHECK(g.scalar_type() == out.scalar_type(), "tiedkernels: gradient dtype ", g.scalar_type(),
              " does not match the weight's ", out.scalar_type());
  const int64_t pad = padding_idx.has_value() ? *padding_idx : -1;
  if (out.scalar_type() == at::kFloat && !at::globalContext().deterministicAlgorithms()) {
    scatter_atomic_kernel<<<t, kEmbThreads, 0, stream()>>>(ids_flat.data_ptr<int64_t>(), g.data_ptr<float>(),
                                                            out.data_ptr<float>(), d, v, pad, out.stride(0),
                                                            out.stride(1), bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_CHECK(t <= std::numeric_limits<int32_t>::max(),
              "tiedkernels: the embedding backward takes at most 2^31 - 1 ids on CUDA, got ", t);
  auto sorted = at::sort(ids_flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& keys = std::get<0>(sorted);
  const auto& perm = std::get<1>(sorted);
  auto run_end = at::searchsorted(keys, keys, /*out_int32=*/false, /*right=*/true);
  // The tiled launch: the run starts of every kLongRun-th position; tiles of kEmbThreads columns, wider
  // where D has more than 65535 of them (the grid's y limit).
  const bool long_runs = t >= kLongRun;
  const auto run_starts = long_runs ? at::searchsorted(keys, keys.slice(0, 0, t, kLongRun).contiguous(),
                                                       /*out_int32=*/false, /*right=*/false)
                                    : at::Tensor();
  const int64_t cols = kEmbThreads * ((d + kEmbThreads * 65535 - 1) / (kEmbThreads * 65535));
  const dim3 tiled_grid(static_cast<unsigned>((t + kLongRun - 1) / kLongRun),
                        static_cast<unsigned>((d + cols - 1) / cols));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "tiedkernels_scatter_sorted", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scatter_sorted_kernel<scalar_t, acc_t><<<t, kEmbThreads, 0, stream()>>>(
        keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), run_end.data_ptr<int64_t>(), nullptr,
        g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d, v, pad, out.stride(0), out.stride(1), d, bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (long_runs) {
      scatter_sorted_kernel<scalar_t, acc_t><<<tiled_grid, kEmbThreads, 0, stream()>>>(
          keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), run_end.data_ptr<int64_t>(),
          run_starts.data_ptr<int64_t>(), g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d, v, pad, out.stride(0),
          out.stride(1), cols, bad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void check_ids_dtype(const at::Tensor& ids) {
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool,
              "tiedkernels: ids must be an integer tensor, got ", ids.scalar_type());
}

at::Tensor embedding_fwd_cuda(const at::Tensor& weight, const at::Tensor& ids, c10::optional<int64_t> padding_idx) {
  TORCH_CHECK(weight.dim() == 2, "tiedkernels: weight must be [V, D], got ", weight.sizes());
  check_ids_dtype(ids);
  const at::cuda::OptionalCUDAGuard guard(weight.device());
  const int64_t v = weight.size(0), d = weight.size(1);
  auto flat = flat_long(ids);
  IndexCheck chk;
  start_check(chk, flat, v, false, 0, "id");
  const int64_t t = flat.numel();
  auto out = at::empty({t, d}, weight.options());
  if (t > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "tiedkernels_gather", [&] {
      gather_kernel<scalar_t><<<t, kEmbThreads, 0, stream()>>>(weight.data_ptr<scalar_t>(), flat.data_ptr<int64_t>(),
                                                               out.data_ptr<scalar_t>(), d, v, weight.stride(0),
                                                               weight.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  chk.finish();
  auto shape = ids.sizes().vec();
  shape.push_back(d);
  return out.view(shape);
}

at::Tensor embedding_bwd_cuda(const at::Tensor& grad, const at::Tensor& ids, int64_t num_weights,
                              c10::optional<int64_t> padding_idx) {
  check_ids_dtype(ids);
  TORCH_CHECK(grad.dim() == ids.dim() + 1, "tiedkernels: grad ", grad.sizes(), " does not match ids ", ids.sizes());
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  auto flat = flat_long(ids);
  IndexCheck chk;
  start_check(chk, flat, num_weights, false, 0, "id");
  auto gw = at::zeros({num_weights, grad.size(-1)}, grad.options());
  scatter_into(gw, grad, flat, padding_idx, chk);
  chk.finish();
  return gw;
}

void embedding_bwd_acc_cuda(at::Tensor& grad_weight, const at::Tensor& grad, const at::Tensor& ids,
                            c10::optional<int64_t> padding_idx) {
  check_ids_dtype(ids);
  TORCH_CHECK(grad_weight.dim() == 2 && grad.size(-1) == grad_weight.size(1), "tiedkernels: grad ", grad.sizes(),
              " does not match the gradient buffer ", grad_weight.sizes());
  const at::cuda::OptionalCUDAGuard guard(grad_weight.device());
  auto flat = flat_long(ids);
  IndexCheck chk;
  start_check(chk, flat, grad_weight.size(0), false, 0, "id");
  scatter_into(grad_weight, grad, flat, padding_idx, chk);
  chk.finish();
}

// ------------------------------------------------------------------------------------------
// logits

template <typename scalar_t, typename acc_t>
__global__ void transform_kernel(scalar_t* __restrict__ z, int64_t numel, acc_t scale, acc_t cap, acc_t inv_cap) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t x = static_cast<acc_t>(z[i]) * scale;
    if (cap > acc_t(0)) x = cap * tanh(x * inv_cap);
    z[i] = static_cast<scalar_t>(x);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void transform_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ z,
                                     scalar_t* __restrict__ out, int64_t numel, acc_t scale, acc_t inv_cap) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t x = static_cast<acc_t>(g[i]) * scale;
    if (inv_cap > acc_t(0)) {
      const acc_t t = static_cast<acc_t>(z[i]) * inv_cap;
      x *= acc_t(1) - t * t;
    }
    out[i] = static_cast<scalar_t>(x);
  }
}

int64_t elem_blocks(int64_t numel) {
  const int64_t want = (numel + kElemThreads - 1) / kElemThreads;
  return std::max<int64_t>(1, std::min<int64_t>(want, 65535LL * 8));
}

at::Tensor logits_fwd_cuda(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           double logit_scale, double softcap) {
  TORCH_CHECK(weight.dim() == 2 && hidden.size(-1) == weight.size(1), "tiedkernels: hidden ", hidden.sizes(),
              " does not match weight ", weight.sizes());
  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  auto h2 = hidden.reshape({-1, hidden.size(-1)});
  auto z = bias.has_value() ? at::addmm(*bias, h2, weight.t()) : at::mm(h2, weight.t());
  if ((logit_scale != 1.0 || softcap > 0) && z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "tiedkernels_logits_fwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      transform_kernel<scalar_t, acc_t><<<elem_blocks(z.numel()), kElemThreads, 0, stream()>>>(
          z.data_ptr<scalar_t>(), z.numel(), static_cast<acc_t>(logit_scale), static_cast<acc_t>(softcap),
          softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto shape = hidden.sizes().vec();
  shape.back() = weight.size(0);
  return z.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                               const at::Tensor& hidden, const at::Tensor& weight,
                                                               const c10::optional<at::Tensor>& bias,
                                                               double logit_scale, double softcap, bool compute_dh,
                                                               bool compute_dw, bool compute_db) {
  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  const int64_t v = weight.size(0), d = weight.size(1);
  auto g = grad.reshape({-1, v}).contiguous();
  auto h2 = hidden.reshape({-1, d});
  at::Tensor dz = g;
  if ((logit_scale != 1.0 || softcap > 0) && g.numel() > 0) {
    dz = at::empty_like(g);
    auto z = softcap > 0 ? logits.reshape({-1, v}).contiguous() : g;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "tiedkernels_logits_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      transform_bwd_kernel<scalar_t, acc_t><<<elem_blocks(g.numel()), kElemThreads, 0, stream()>>>(
          g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), g.numel(),
          static_cast<acc_t>(logit_scale), softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor dh = compute_dh ? at::mm(dz, weight).view(hidden.sizes()) : at::empty({0}, hidden.options());
  at::Tensor dw = compute_dw ? at::mm(dz.t(), h2) : at::empty({0}, weight.options());
  at::Tensor db = (compute_db && bias.has_value())
                      ? at::sum(dz, {0}, false, at::toOpMathType(dz.scalar_type())).to(dz.scalar_type())
                      : at::empty({0}, weight.options());
  return {dh, dw, db};
}

// ------------------------------------------------------------------------------------------
// the loss row kernel

template <typename acc_t>
struct RowParams {
  int64_t v, valid, ignore_index, vocab_start, vocab_total;
  acc_t scale, cap, inv_cap, eps, z_loss, inv_vocab;
  const int64_t* labels;
  const acc_t* gs;
  bool gs_scalar;
  const acc_t* lse_in;
  acc_t* lse_out;
  acc_t* loss_out;
  acc_t* stats;
  int64_t stats_stride;
  bool write_grad;
  // class weights (null without): this shard's columns [v], the rows' c[y], the vocabulary's sum
  const acc_t* cw;
  const acc_t* cy;
  const acc_t* cw_sum;
  const acc_t* gl;  // incoming gradient of lse per row, or null
  int64_t* pred;    // per-row global argmax, or null (then ent is null too)
  acc_t* ent;
};

template <typename acc_t>
__device__ __forceinline__ acc_t transform(acc_t x, const RowParams<acc_t>& p) {
  x *= p.scale;
  if (p.cap > acc_t(0)) x = p.cap * tanh(x * p.inv_cap);
  return x;
}

// (max, sum of exp(x - max)) pairs: merge b into a.  -inf maxima carry no mass.
template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (m2 == ninf && !(s2 != s2)) return;
  if (m == ninf && !(s != s)) {
    m = m2;
    s = s2;
    return;
  }
  const acc_t mm = m > m2 ? m : m2;
  s = s * exp(m - mm) + s2 * exp(m2 - mm);
  m = mm;
}

// Block-wide reduction of (m, s, sum of f, target logit) through shared memory.
template <typename acc_t>
__device__ void block_reduce(acc_t& m, acc_t& s, acc_t& sf, acc_t& zy) {
  __shared__ acc_t sm[32], ss[32], ssf[32], szy[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    const acc_t m2 = __shfl_down_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_down_sync(0xffffffffu, s, off);
    sf += __shfl_down_sync(0xffffffffu, sf, off);
    zy += __shfl_down_sync(0xffffffffu, zy, off);
    lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
    ssf[warp] = sf;
    szy[warp] = zy;
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  if (warp == 0) {
    m = lane < warps ? sm[lane] : -std::numeric_limits<acc_t>::infinity();
    s = lane < warps ? ss[lane] : acc_t(0);
    sf = lane < warps ? ssf[lane] : acc_t(0);
    zy = lane < warps ? szy[lane] : acc_t(0);
    for (int off = 16; off > 0; off /= 2) {
      const acc_t m2 = __shfl_down_sync(0xffffffffu, m, off);
      const acc_t s2 = __shfl_down_sync(0xffffffffu, s, off);
      sf += __shfl_down_sync(0xffffffffu, sf, off);
      zy += __shfl_down_sync(0xffffffffu, zy, off);
      lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
      sm[0] = m;
      ss[0] = s;
      ssf[0] = sf;
      szy[0] = zy;
    }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
  sf = ssf[0];
  zy = szy[0];
}

// The entropy's sum_j exp(x_j - max) x_j rides along the (max, sum) pair: merge b into a.
template <typename acc_t>
__device__ __forceinline__ void lse_merge_t(acc_t& m, acc_t& s, acc_t& t, acc_t m2, acc_t s2, acc_t t2) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (m2 == ninf && !(s2 != s2)) return;
  if (m == ninf && !(s != s)) {
    m = m2;
    s = s2;
    t = t2;
    return;
  }
  const acc_t mm = m > m2 ? m : m2;
  const acc_t e1 = exp(m - mm), e2 = exp(m2 - mm);
  s = s * e1 + s2 * e2;
  t = t * e1 + t2 * e2;
  m = mm;
}

// torch.argmax's order: a NaN beats everything, then the larger value, then the smaller index.
template <typename acc_t>
__device__ __forceinline__ void argmax_merge(acc_t& v, int& i, acc_t v2, int i2) {
  if (i2 < 0) return;
  const bool n1 = v != v, n2 = v2 != v2;
  bool take;
  if (i < 0) {
    take = true;
  } else if (n1 || n2) {
    take = n2 && (!n1 || i2 < i);
  } else {
    take = v2 > v || (v2 == v && i2 < i);
  }
  if (take) {
    v = v2;
    i = i2;
  }
}

// Block-wide (max, sum, entropy term) and argmax of one row: the return_stats pass.
template <typename acc_t>
__device__ __noinline__ void block_reduce_stats(acc_t& m, acc_t& s, acc_t& t, acc_t& av, int& ai) {
  __shared__ acc_t sm[32], ss[32], st[32], sav[32];
  __shared__ int sai[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto warp_reduce = [&]() {
    for (int off = 16; off > 0; off /= 2) {
      const acc_t m2 = __shfl_down_sync(0xffffffffu, m, off);
      const acc_t s2 = __shfl_down_sync(0xffffffffu, s, off);
      const acc_t t2 = __shfl_down_sync(0xffffffffu, t, off);
      const acc_t av2 = __shfl_down_sync(0xffffffffu, av, off);
      const int ai2 = __shfl_down_sync(0xffffffffu, ai, off);
      lse_merge_t(m, s, t, m2, s2, t2);
      argmax_merge(av, ai, av2, ai2);
    }
  };
  warp_reduce();
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
    st[warp] = t;
    sav[warp] = av;
    sai[warp] = ai;
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  if (warp == 0) {
    m = lane < warps ? sm[lane] : -std::numeric_limits<acc_t>::infinity();
    s = lane < warps ? ss[lane] : acc_t(0);
    t = lane < warps ? st[lane] : acc_t(0);
    av = lane < warps ? sav[lane] : acc_t(0);
    ai = lane < warps ? sai[lane] : -1;
    warp_reduce();
    if (lane == 0) {
      sm[0] = m;
      ss[0] = s;
      st[0] = t;
      sav[0] = av;
      sai[0] = ai;
    }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
  t = st[0];
  av = sav[0];
  ai = sai[0];
}

// 16 bytes of a row, read or written by one instruction.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int n = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t x[n];
};

// Rows of 2- and 4-byte elements go 16 bytes at a time; fp64 rows keep their 8-byte loads (their
// two-element vectors made ptxas spill the fp64 row kernel on sm_90).
template <typename scalar_t>
constexpr bool kVectorRows = sizeof(scalar_t) <= 4;

// Where the 16-byte loads of a row x[0, n) go: x[head, body_end) is whole aligned vectors; the
// elements before (up to the first 16-byte boundary: a row of an odd length starts anywhere) and
// after (less than a vector) are read one by one, and so is every element of a pointer not aligned
// to its own element size.
struct RowSpans {
  int64_t head, body_end;
};

template <typename scalar_t>
__device__ __forceinline__ RowSpans row_spans(const scalar_t* x, int64_t n) {
  constexpr int64_t vec = Vec16<scalar_t>::n;
  const auto addr = reinterpret_cast<uintptr_t>(x);
  if (addr % sizeof(scalar_t) != 0) return {n, n};
  const auto to_boundary = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(scalar_t));
  const int64_t head = to_boundary < n ? to_boundary : n;
  return {head, head + (n - head) / vec * vec};
}

// f(j, x[j]) for every j in [0, n), the block's threads sharing them.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_in_row(const scalar_t* x, int64_t n, F&& f) {
  if constexpr (kVectorRows<scalar_t>) {
    constexpr int vec = Vec16<scalar_t>::n;
    const RowSpans r = row_spans(x, n);
    for (int64_t j = threadIdx.x; j < r.head; j += blockDim.x) f(j, x[j]);
    for (int64_t j = r.head + static_cast<int64_t>(threadIdx.x) * vec; j < r.body_end;
         j += static_cast<int64_t>(blockDim.x) * vec) {
      const Vec16<scalar_t> u = *reinterpret_cast<const Vec16<scalar_t>*>(x + j);
#pragma unroll
      for (int k = 0; k < vec; ++k) f(j + k, u.x[k]);
    }
    for (int64_t j = r.body_end + threadIdx.x; j < n; j += blockDim.x) f(j, x[j]);
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j, x[j]);
  }
}

// x[j] = f(j, x[j]) for every j in [0, n), 16 bytes per load and store where for_each_in_row reads
// 16 bytes.
template <typename scalar_t, typename F>
__device__ __forceinline__ void map_row(scalar_t* x, int64_t n, F&& f) {
  if constexpr (kVectorRows<scalar_t>) {
    constexpr int vec = Vec16<scalar_t>::n;
    const RowSpans r = row_spans(x, n);
    for (int64_t j = threadIdx.x; j < r.head; j += blockDim.x) x[j] = f(j, x[j]);
    for (int64_t j = r.head + static_cast<int64_t>(threadIdx.x) * vec; j < r.body_end;
         j += static_cast<int64_t>(blockDim.x) * vec) {
      auto* u = reinterpret_cast<Vec16<scalar_t>*>(x + j);
      Vec16<scalar_t> w = *u;
#pragma unroll
      for (int k = 0; k < vec; ++k) w.x[k] = f(j + k, w.x[k]);
      *u = w;
    }
    for (int64_t j = r.body_end + threadIdx.x; j < n; j += blockDim.x) x[j] = f(j, x[j]);
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = f(j, x[j]);
  }
}

// STATS: the return_stats variant (argmax and entropy), a kernel of its own so that the plain
// one carries none of its registers.
template <typename scalar_t, typename acc_t, bool STATS>
__global__ void __launch_bounds__(kRowThreads) row_kernel(scalar_t* __restrict__ z, RowParams<acc_t> p) {
  const int64_t row = blockIdx.x;
  scalar_t* zr = z + row * p.v;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t y = p.labels[row];
  const bool ignored = y == p.ignore_index;
  const bool bad = !ignored && (y < 0 || y >= p.vocab_total);
  const int64_t local = y - p.vocab_start;
  const int64_t target = (!ignored && !bad && local >= 0 && local < p.valid) ? local : -1;

  // The max/sum pass over the row, skipped where its lse is given and nothing else is asked for
  // (the backward recomputing dL/dz from the forward's lse reads the row once). The condition is
  // the same in every thread, so the block reductions' barriers are reached by all or by none.
  const bool pass = p.lse_in == nullptr || p.lse_out != nullptr || p.loss_out != nullptr || p.stats != nullptr || STATS;
  acc_t lse = 0;
  if (pass) {
    acc_t m = ninf, s = 0, sf = 0, zy = 0;
    acc_t t = 0, av = 0;  // return_stats: sum of exp(f - m) f; the argmax's value and (local) index
    int ai = -1;
    for_each_in_row(zr, p.valid, [&](int64_t j, scalar_t raw) {
      const acc_t f = transform(static_cast<acc_t>(raw), p);
      sf += p.cw ? p.cw[j] * f : f;
      if (j == target) zy = f;
      if (STATS) argmax_merge(av, ai, f, static_cast<int>(j));
      if (f == ninf) return;
      if (f > m) {
        const acc_t r = exp(m - f);
        s = s * r + acc_t(1);
        if (STATS) t = t * r + f;
        m = f;
      } else {
        const acc_t e = exp(f - m);
        s += e;  // NaN f: f > m is false, and the NaN lands in s
        if (STATS) t += e * f;
      }
    });
    if (STATS) {
      acc_t m2 = m, s2 = s;
      block_reduce_stats(m2, s2, t, av, ai);
    }
    block_reduce(m, s, sf, zy);
    if (s > acc_t(0) || s != s) {
      lse = m + log(s);
    } else {
      lse = sf != sf ? sf : ninf;
    }
    if (sf != sf) lse = sf;
    // A +inf logit: NaN, as PyTorch's log_softmax is across such a row (exp(inf - inf)). The block
    // merge gives NaN wherever the +inf meets another thread's entries, but a thread's own entries
    // after its +inf add exp(-inf) = 0: this makes the NaN independent of how the row is spread.
    const bool pinf = m == std::numeric_limits<acc_t>::infinity();
    if (pinf) lse = std::numeric_limits<acc_t>::quiet_NaN();
    // The lse handed out is torch.logsumexp's: +inf for a row holding +inf and no NaN (sf is NaN when
    // the row holds a NaN, and also when it holds -inf beside the +inf: NaN there, a documented edge).
    // The backward maps a given +inf back to NaN (below), so its gradient row is NaN as PyTorch's.
    const acc_t lse_rep = pinf && !(sf != sf) ? std::numeric_limits<acc_t>::infinity() : lse;
    if (threadIdx.x == 0) {
      if (p.lse_out) p.lse_out[row] = lse_rep;
      if (STATS) {
        p.pred[row] = static_cast<int64_t>(ai >= 0 ? ai : 0) + p.vocab_start;
        p.ent[row] = lse - (s > acc_t(0) ? t / s : acc_t(0));
      }
      if (p.loss_out) {
        // the smoothing term only when eps > 0: a -inf logit never meets 0 * inf
        acc_t loss;
        if (p.cw) {
          loss = p.cy[row] * ((acc_t(1) - p.eps) * (lse - zy) + p.z_loss * lse * lse);
          if (p.eps != acc_t(0)) loss += p.eps * p.inv_vocab * (*p.cw_sum * lse - sf);
        } else {
          loss = (acc_t(1) - p.eps) * (lse - zy) + p.z_loss * lse * lse;
          if (p.eps != acc_t(0)) loss += p.eps * (lse - sf * p.inv_vocab);
        }
        if (ignored) loss = 0;
        if (bad) loss = NAN;
        p.loss_out[row] = loss;
      }
      if (p.stats) {
        p.stats[row] = lse_rep;  // merged across shards as the CPU backend's: +inf stays, NaN for the loss
        p.stats[p.stats_stride + row] = zy;
        p.stats[2 * p.stats_stride + row] = sf;
      }
    }
  }
  if (!p.write_grad) return;
  const acc_t gl = p.gl ? p.gl[row] : acc_t(0);
  acc_t l = p.lse_in ? p.lse_in[row] : lse;
  if (l == std::numeric_limits<acc_t>::infinity()) l = std::numeric_limits<acc_t>::quiet_NaN();  // a +inf logit
  if (bad || (ignored && gl == acc_t(0) && isfinite(l))) {
    const scalar_t fill = static_cast<scalar_t>(ignored ? acc_t(0) : acc_t(NAN));
    for (int64_t j = threadIdx.x; j < p.v; j += blockDim.x) zr[j] = j < p.valid ? fill : scalar_t(0);
    return;
  }
  // (an ignored row whose softmax is NaN, a NaN logit or a row of -inf, gets 0 * NaN as in PyTorch,
  // through g = 0 below)
  const acc_t g = ignored ? acc_t(0) : (p.gs ? (p.gs_scalar ? p.gs[0] : p.gs[row]) : acc_t(1));
  const acc_t cy = p.cw ? p.cy[row] : acc_t(1);
  const acc_t a = (p.cw ? g * (cy * ((acc_t(1) - p.eps) + acc_t(2) * p.z_loss * l) + p.eps * p.inv_vocab * *p.cw_sum)
                        : g * (acc_t(1) + acc_t(2) * p.z_loss * l)) + gl;
  const acc_t b = g * p.eps * p.inv_vocab;
  const acc_t gt = g * cy * (acc_t(1) - p.eps);
  map_row(zr, p.v, [&](int64_t j, scalar_t raw) {
    if (j >= p.valid) return scalar_t(0);
    const acc_t f = transform(static_cast<acc_t>(raw), p);
    acc_t chain = p.scale;
    if (p.cap > acc_t(0)) {
      const acc_t t = f * p.inv_cap;
      chain *= acc_t(1) - t * t;
    }
    acc_t dz = a * exp(f - l) - (p.cw ? b * p.cw[j] : b);
    if (j == target) dz -= gt;
    return static_cast<scalar_t>(dz * chain);
  });
}

void cuda_row_kernel(const RowTask& t, const LossOptions& o) {
  const int64_t rows = t.logits.size(0), v = t.logits.size(1);
  if (rows == 0) return;
  TORCH_CHECK(t.logits.is_contiguous(), "tiedkernels: the chunk of logits must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.logits.scalar_type(), "tiedkernels_cuda_row", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowParams<acc_t> p;
    p.v = v;
    p.valid = std::max<int64_t>(0, std::min<int64_t>(v, o.vocab_total - o.vocab_start));
    p.ignore_index = o.ignore_index;
    p.vocab_start = o.vocab_start;
    p.vocab_total = o.vocab_total;
    p.scale = static_cast<acc_t>(o.logit_scale);
    p.cap = static_cast<acc_t>(o.softcap);
    p.inv_cap = o.softcap > 0 ? static_cast<acc_t>(1.0 / o.softcap) : acc_t(0);
    p.eps = static_cast<acc_t>(o.label_smoothing);
    p.z_loss = static_cast<acc_t>(o.z_loss);
    p.inv_vocab = static_cast<acc_t>(1.0 / static_cast<double>(o.vocab_total));
    p.labels = t.labels.data_ptr<int64_t>();
    p.gs = t.grad_scale.defined() ? t.grad_scale.data_ptr<acc_t>() : nullptr;
    p.gs_scalar = t.grad_scale.defined() && t.grad_scale.dim() == 0;
    p.lse_in = t.lse_in.defined() ? t.lse_in.data_ptr<acc_t>() : nullptr;
    p.lse_out = t.lse_out.defined() ? t.lse_out.data_ptr<acc_t>() : nullptr;
    p.loss_out = t.loss_out.defined() ? t.loss_out.data_ptr<acc_t>() : nullptr;
    p.stats = t.stats_out.defined() ? t.stats_out.data_ptr<acc_t>() : nullptr;
    p.stats_stride = t.stats_out.defined() ? t.stats_out.stride(0) : 0;
    p.write_grad = t.write_grad;
    p.cw = t.class_w.defined() ? t.class_w.data_ptr<acc_t>() : nullptr;
    p.cy = t.class_w.defined() ? t.target_w.data_ptr<acc_t>() : nullptr;
    p.cw_sum = t.class_w.defined() ? t.class_w_sum.data_ptr<acc_t>() : nullptr;
    p.gl = t.grad_lse.defined() ? t.grad_lse.data_ptr<acc_t>() : nullptr;
    p.pred = t.pred_out.defined() ? t.pred_out.data_ptr<int64_t>() : nullptr;
    p.ent = t.ent_out.defined() ? t.ent_out.data_ptr<acc_t>() : nullptr;
    TORCH_CHECK(!p.pred || v < std::numeric_limits<int>::max(), "tiedkernels: return_stats needs fewer than 2^31 "
                "columns per shard on CUDA, got ", v);
    if (p.pred) {
      row_kernel<scalar_t, acc_t, true><<<rows, kRowThreads, 0, stream()>>>(t.logits.data_ptr<scalar_t>(), p);
    } else {
      row_kernel<scalar_t, acc_t, false><<<rows, kRowThreads, 0, stream()>>>(t.logits.data_ptr<scalar_t>(), p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t total_vocab(int64_t vocab_start, int64_t vocab_total, const at::Tensor& weight) {
  return vocab_total > 0 ? vocab_total : vocab_start + weight.size(0);
}

FwdResult lce_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, bool return_stats, double grad_filter) {
  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  check_loss_args(hidden, weight, bias, labels, chunk_size);
  IndexCheck chk;
  start_check(chk, flat_long(labels), total_vocab(vocab_start, vocab_total, weight), true, ignore_index, "label");
  auto r = lce_fwd_entry(cuda_row_kernel, hidden, weight, bias, labels, grad_scale, ignore_index, label_smoothing,
                         z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk_size, compute_dh, compute_dw,
                         compute_db, class_weight, return_stats, grad_filter);
  chk.finish();
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, double logit_scale, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_size, bool compute_dh, bool compute_dw, bool compute_db,
    const c10::optional<at::Tensor>& class_weight, const c10::optional<at::Tensor>& grad_lse,
    double grad_filter) {
  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  check_loss_args(hidden, weight, bias, labels, chunk_size);
  IndexCheck chk;
  start_check(chk, flat_long(labels), total_vocab(vocab_start, vocab_total, weight), true, ignore_index, "label");
  auto r = lce_bwd_entry(cuda_row_kernel, grad_loss, hidden, weight, bias, labels, lse, ignore_index,
                         label_smoothing, z_loss, softcap, logit_scale, vocab_start, vocab_total, chunk_size,
                         compute_dh, compute_dw, compute_db, class_weight, grad_lse, grad_filter);
  chk.finish();
  return r;
}

at::Tensor lce_stats_cuda(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& labels, int64_t ignore_index, double softcap, double logit_scale,
                          int64_t vocab_start, int64_t vocab_total, int64_t chunk_size,
                          const c10::optional<at::Tensor>& class_weight) {
  const at::cuda::OptionalCUDAGuard guard(hidden.device());
  check_loss_args(hidden, weight, bias, labels, chunk_size);
  IndexCheck chk;
  start_check(chk, flat_long(labels), total_vocab(vocab_start, vocab_total, weight), true, ignore_index, "label");
  auto r = lce_stats_entry(cuda_row_kernel, hidden, weight, bias, labels, ignore_index, softcap, logit_scale,
                           vocab_start, vocab_total, chunk_size, class_weight);
  chk.finish();
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(tiedkernels, CUDA, m) {
  m.impl("embedding_fwd", &embedding_fwd_cuda);
  m.impl("embedding_bwd", &embedding_bwd_cuda);
  m.impl("embedding_bwd_acc_", &embedding_bwd_acc_cuda);
  m.impl("logits_fwd", &logits_fwd_cuda);
  m.impl("logits_bwd", &logits_bwd_cuda);
  m.impl("lce_fwd", &lce_fwd_cuda);
  m.impl("lce_bwd", &lce_bwd_cuda);
  m.impl("lce_stats", &lce_stats_cuda);
}

}  // namespace tiedkernels
