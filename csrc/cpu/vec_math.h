// Eight-lane float math on GCC vector types (AVX2 registers where the build targets them, SSE
// pairs or scalar code elsewhere): exp, log, softplus and SiLU, for the fused CPU kernels.
// Accuracy: a few ulp over the ranges the scan uses (a test holds the kernels to their
// PyTorch twins).
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace vmq {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// ``n`` (< 8) lanes from p, the rest zero
inline v8f load_partial(const float* p, int n) {
  v8f v = splat(0.f);
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

inline void store_partial(float* p, v8f v, int n) { std::memcpy(p, &v, sizeof(float) * n); }

inline v8f load8_i8(const int8_t* p, int n = 8) {
  v8b b = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(&b, p, n);
  return __builtin_convertvector(b, v8f);
}

// a > b ? a : b and a < b ? a : b (b where either is NaN): one instruction on AVX
#ifdef __AVX__
inline v8f vmax(v8f a, v8f b) { return reinterpret_cast<v8f>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
inline v8f vmin(v8f a, v8f b) { return reinterpret_cast<v8f>(_mm256_min_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
#else
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
inline v8f vmin(v8f a, v8f b) { return a < b ? a : b; }
#endif

// round to nearest (ties to even) for |x| < 2^22: adding 1.5 * 2^23 leaves no fraction bits
inline v8f round_nearest(v8f x) {
  const v8f magic = splat(12582912.f);
  v8f t = x + magic;
  asm("" : "+x"(t));  // keep the compiler from folding the add and the subtract
  return t - magic;
}

// exp(x) for x <= 88 (larger x gives exp(88)): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by a
// degree-6 polynomial, 2^k (k in [-126, 127]) written into the exponent bits
inline v8f vexp(v8f x) {
  x = vmin(vmax(x, splat(-87.33654f)), splat(88.f));
  const v8f k = round_nearest(x * splat(1.44269504088896341f));
  v8f r = x - k * splat(0.693359375f);
  r = r - k * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.f);
  const v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 2^x, x clamped to [-125, 127]: x = k + f with k an integer and |f| <= 1/2; 2^f by a degree-5
// polynomial (relative error 2.4e-7, a minimax fit on [-1/2, 1/2] made for vmq), and k added to
// the exponent bits. Adding 1.5 * 2^23 rounds x to k and leaves k in the low mantissa bits, so a
// shift by 23 yields k << 23 without a conversion. Cheaper than vexp: the scan's decay
// exp(dt A) is evaluated as vexp2(dt * (A log2 e)).
inline v8f vexp2(v8f x) {
  x = vmin(vmax(x, splat(-125.f)), splat(127.f));
  const v8f magic = splat(12582912.f);
  v8f t = x + magic;
  asm("" : "+x"(t));
  const v8f f = x - (t - magic);
  v8f p = splat(1.3276472455e-3f);
  p = p * f + splat(9.6755409613e-3f);
  p = p * f + splat(5.5507130921e-2f);
  p = p * f + splat(2.4022120237e-1f);
  p = p * f + splat(6.9314694405e-1f);
  p = p * f + splat(1.0000001192f);
  v8i kb, pb;
  std::memcpy(&kb, &t, sizeof(kb));
  std::memcpy(&pb, &p, sizeof(pb));
  pb += kb << 23;
  std::memcpy(&p, &pb, sizeof(p));
  return p;
}

// natural log of x in [1, 2]: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial in m - 1
inline v8f vlog_1_2(v8f x) {
  const auto big = x > splat(1.41421356f);
  const v8f m = big ? x * splat(0.5f) : x;
  const v8f e = big ? splat(1.f) : splat(0.f);
  const v8f f = m - splat(1.f);
  const v8f z = f * f;
  v8f p = splat(7.0376836292e-2f);
  p = p * f + splat(-1.1514610310e-1f);
  p = p * f + splat(1.1676998740e-1f);
  p = p * f + splat(-1.2420140846e-1f);
  p = p * f + splat(1.4249322787e-1f);
  p = p * f + splat(-1.6668057665e-1f);
  p = p * f + splat(2.0000714765e-1f);
  p = p * f + splat(-2.4999993993e-1f);
  p = p * f + splat(3.3333331174e-1f);
  v8f y = p * f * z;
  y = y + e * splat(-2.12194440e-4f);
  y = y - splat(0.5f) * z;
  return f + y + e * splat(0.693359375f);
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); x itself above 20 (as torch does)
inline v8f vsoftplus(v8f x) {
  const v8f ax = vmax(x, -x);
  const v8f t = vexp(-ax);  // (0, 1]
  const v8f w = splat(1.f) + t;
  // log1p(t) = log(w) * t / (w - 1), exact where w rounds to 1 (then log1p(t) = t)
  const v8f wm1 = w - splat(1.f);
  const v8f l1p = (wm1 == splat(0.f)) ? t : vlog_1_2(w) * (t / (wm1 == splat(0.f) ? splat(1.f) : wm1));
  const v8f sp = vmax(x, splat(0.f)) + l1p;
  return x > splat(20.f) ? x : sp;
}

// silu(x) = x / (1 + exp(-x))
inline v8f vsilu(v8f x) { return x / (splat(1.f) + vexp(-x)); }

}  // namespace cpu
}  // namespace vmq
