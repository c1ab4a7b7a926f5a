// CPU kernels of the logits projection z = softcap((h W^T + b) * scale) and its backward.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lce_driver.h"
#include "../vec_math.h"

namespace tiedkernels {
namespace {

at::Tensor logits_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          double logit_scale, double softcap) {
  TORCH_CHECK(weight.dim() == 2 && hidden.size(-1) == weight.size(1), "tiedkernels: hidden ", hidden.sizes(),
              " does not match weight ", weight.sizes());
  auto h2 = hidden.reshape({-1, hidden.size(-1)});
  auto z = at::empty({h2.size(0), weight.size(0)}, hidden.options());
  cpu_mm(z, h2, weight.t(), /*accumulate=*/false, bias);
  if (logit_scale != 1.0 || softcap > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "tiedkernels_logits_fwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* p = z.data_ptr<scalar_t>();
      const acc_t s = static_cast<acc_t>(logit_scale), c = static_cast<acc_t>(softcap);
      const acc_t ic = softcap > 0 ? acc_t(1) / c : acc_t(0);
      at::parallel_for(0, z.numel(), 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t x = static_cast<acc_t>(p[i]) * s;
          if (softcap > 0) x = c * tanh_fast(x * ic);
          p[i] = static_cast<scalar_t>(x);
        }
      });
    });
  }
  auto shape = hidden.sizes().vec();
  shape.back() = weight.size(0);
  return z.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                              const at::Tensor& hidden, const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              double logit_scale, double softcap, bool compute_dh,
                                                              bool compute_dw, bool compute_db) {
  const int64_t v = weight.size(0), d = weight.size(1);
  auto g = grad.reshape({-1, v}).contiguous();
  auto h2 = hidden.reshape({-1, d});
  at::Tensor dz = g;
  if (logit_scale != 1.0 || softcap > 0) {
    dz = at::empty_like(g);
    auto z = logits.reshape({-1, v}).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "tiedkernels_logits_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* out = dz.data_ptr<scalar_t>();
      const acc_t s = static_cast<acc_t>(logit_scale);
      const acc_t ic = softcap > 0 ? acc_t(1) / static_cast<acc_t>(softcap) : acc_t(0);
      at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t x = static_cast<acc_t>(gp[i]) * s;
          if (softcap > 0) {
            const acc_t t = static_cast<acc_t>(zp[i]) * ic;
            x *= acc_t(1) - t * t;
          }
          out[i] = static_cast<scalar_t>(x);
        }
      });
    });
  }
  auto mm = [&](const at::Tensor& a, const at::Tensor& b) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    cpu_mm(out, a, b);
    return out;
  };
  at::Tensor dh = compute_dh ? mm(dz, weight).view(hidden.sizes()) : at::empty({0}, hidden.options());
  at::Tensor dw = compute_dw ? mm(dz.t(), h2) : at::empty({0}, weight.options());
  at::Tensor db = (compute_db && bias.has_value())
                      ? at::sum(dz, {0}, false, at::toOpMathType(dz.scalar_type())).to(dz.scalar_type())
                      : at::empty({0}, weight.options());
  return {dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(tiedkernels, CPU, m) {
  m.impl("logits_fwd", &logits_fwd_cpu);
  m.impl("logits_bwd", &logits_bwd_cpu);
}

}  // namespace tiedkernels
