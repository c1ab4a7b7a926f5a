// CPU kernels of the embedding: a checked gather, and a deterministic scatter-add
// backward that sums each vocabulary row's contributions in fp32 before one add.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace tiedkernels {
namespace {

void check_ids(const at::Tensor& ids, int64_t v) {
  TORCH_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool,
              "tiedkernels: ids must be an integer tensor, got ", ids.scalar_type());
  auto flat = ids.to(at::kLong).contiguous();
  const int64_t* p = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < v, "tiedkernels: id ", p[i], " at position ", i,
                      " is outside [0, V) for V=", v);
  }
}

at::Tensor embedding_fwd_cpu(const at::Tensor& weight, const at::Tensor& ids, c10::optional<int64_t> padding_idx) {
  TORCH_CHECK(weight.dim() == 2, "tiedkernels: weight must be [V, D], got ", weight.sizes());
  check_ids(ids, weight.size(0));
  auto out_shape = ids.sizes().vec();
  out_shape.push_back(weight.size(1));
  auto flat = ids.reshape({-1}).to(at::kLong);
  return at::index_select(weight.contiguous(), 0, flat).view(out_shape);
}

// grad_weight[ids[i]] += grad[i] for every i whose id is not padding_idx.
void scatter_add_rows(at::Tensor& grad_weight, const at::Tensor& grad, const at::Tensor& ids,
                      c10::optional<int64_t> padding_idx) {
  const int64_t v = grad_weight.size(0), d = grad_weight.size(1);
  check_ids(ids, v);
  TORCH_CHECK(grad_weight.is_contiguous(), "tiedkernels: the gradient buffer must be contiguous");
  auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t t = flat.numel();
  auto g = grad.reshape({t, d}).contiguous();
  TORCH_CHECK(g.scalar_type() == grad_weight.scalar_type(), "tiedkernels: gradient dtype ", g.scalar_type(),
              " does not match the weight's ", grad_weight.scalar_type());
  const int64_t* id = flat.data_ptr<int64_t>();
  std::vector<int64_t> order(t);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id[a] < id[b]; });
  std::vector<int64_t> run_start;
  for (int64_t i = 0; i < t; ++i) {
    if (i == 0 || id[order[i]] != id[order[i - 1]]) run_start.push_back(i);
  }
  run_start.push_back(t);
  const int64_t runs = static_cast<int64_t>(run_start.size()) - 1;
  const int64_t pad = padding_idx.has_value() ? *padding_idx : -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "tiedkernels_embedding_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = grad_weight.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d));  // small calls: one thread
    at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = id[order[run_start[r]]];
        if (row == pad) continue;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = run_start[r]; i < run_start[r + 1]; ++i) {
          const scalar_t* src = gp + order[i] * d;
          for (int64_t k = 0; k < d; ++k) acc[k] += static_cast<acc_t>(src[k]);
        }
        scalar_t* dst = out + row * d;
        for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<scalar_t>(static_cast<acc_t>(dst[k]) + acc[k]);
      }
    });
  });
}

at::Tensor embedding_bwd_cpu(const at::Tensor& grad, const at::Tensor& ids, int64_t num_weights,
                             c10::optional<int64_t> padding_idx) {
  TORCH_CHECK(grad.size(-1) >= 0 && grad.dim() == ids.dim() + 1, "tiedkernels: grad ", grad.sizes(),
              " does not match ids ", ids.sizes());
  auto gw = at::zeros({num_weights, grad.size(-1)}, grad.options());
  scatter_add_rows(gw, grad, ids, padding_idx);
  return gw;
}

void embedding_bwd_acc_cpu(at::Tensor& grad_weight, const at::Tensor& grad, const at::Tensor& ids,
                           c10::optional<int64_t> padding_idx) {
  TORCH_CHECK(grad_weight.dim() == 2 && grad.size(-1) == grad_weight.size(1), "tiedkernels: grad ", grad.sizes(),
              " does not match the gradient buffer ", grad_weight.sizes());
  scatter_add_rows(grad_weight, grad, ids, padding_idx);
}

}  // namespace

TORCH_LIBRARY_IMPL(tiedkernels, CPU, m) {
  m.impl("embedding_fwd", &embedding_fwd_cpu);
  m.impl("embedding_bwd", &embedding_bwd_cpu);
  m.impl("embedding_bwd_acc_", &embedding_bwd_acc_cpu);
}

}  // namespace tiedkernels
