// Branch-free exp and tanh that compilers vectorize (no libm calls in the hot loops).
// NaN inputs propagate; results are within a few ulp of libm for the ranges the
// softmax uses (arguments <= 0 after the max is subtracted).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define TK_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TK_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TK_TARGET_CLONES
#endif

namespace tiedkernels {

TK_ALWAYS_INLINE float exp_fast(float x) {
  // exp(x) = 2^n * exp(r), r = x - n*ln2, Cephes polynomial for exp(r) on |r| <= ln2/2.
  const float lo = -87.33654f, hi = 88.72283f;
  const bool under = x < lo;
  float xc = under ? lo : x;
  xc = xc > hi ? hi : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float res = y * two_n;
  return under ? 0.0f : res;
}

TK_ALWAYS_INLINE double exp_fast(double x) { return std::exp(x); }

TK_ALWAYS_INLINE float tanh_fast(float x) {
  const float ax = x < 0.0f ? -x : x;
  // tanh(|x|) = 1 - 2 / (exp(2|x|) + 1); for tiny |x| use the odd series to keep relative accuracy.
  const float e = exp_fast(2.0f * (ax > 44.0f ? 44.0f : ax));
  float t = 1.0f - 2.0f / (e + 1.0f);
  const float x2 = ax * ax;
  const float series = ax * (1.0f - x2 * (1.0f / 3.0f - x2 * (2.0f / 15.0f)));
  t = ax < 0.0625f ? series : t;
  t = ax != ax ? ax : t;
  return x < 0.0f ? -t : t;
}

TK_ALWAYS_INLINE double tanh_fast(double x) { return std::tanh(x); }

}  // namespace tiedkernels
