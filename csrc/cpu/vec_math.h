// Float math on GCC vector types of 8 or 16 lanes (AVX2 / AVX-512 registers where the build
// targets them, narrower registers or scalar code elsewhere): 2^x, log1p, softplus and SiLU
// for the fused CPU kernels. Accuracy: a few ulp over the ranges the kernels use (vexp2: 2.4e-7
// relative; softplus and SiLU, built on it, below 5e-7); tests hold every kernel to its twin.
//
// VecF is the widest type the build targets (16 lanes with AVX-512, else 8): kernels that
// split channels into blocks of vector lanes use it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace vmq {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef int8_t v16b __attribute__((vector_size(16)));

// lanes and the matching int32 / int8 vector types
template <class V>
struct VecTraits;
template <>
struct VecTraits<v8f> {
  static constexpr int kLanes = 8;
  using I = v8i;
  using B = v8b;
};
template <>
struct VecTraits<v16f> {
  static constexpr int kLanes = 16;
  using I = v16i;
  using B = v16b;
};

#ifdef __AVX512F__
using VecF = v16f;
#else
using VecF = v8f;
#endif

template <class V = v8f>
inline V splat(float x) {
  return V{} + x;
}

template <class V = v8f>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V>
inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// ``n`` (<= lanes) lanes from p, the rest zero
template <class V = v8f>
inline V loadv_partial(const float* p, int n) {
  V v = V{};
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}

template <class V>
inline void storev_partial(float* p, V v, int n) {
  std::memcpy(p, &v, sizeof(float) * n);
}

// ``n`` int8 values from p as floats, the rest zero
template <class V = v8f>
inline V loadv_i8(const int8_t* p, int n) {
  typename VecTraits<V>::B b{};
  std::memcpy(&b, p, n);
  return __builtin_convertvector(b, V);
}

// the first n (1..lanes) lanes of a block: whole vectors when n is the full width
template <class V>
inline V load_lanes(const float* p, int n) {
  return n == VecTraits<V>::kLanes ? loadv<V>(p) : loadv_partial<V>(p, n);
}

template <class V>
inline void store_lanes(float* p, V v, int n) {
  if (n == VecTraits<V>::kLanes) {
    storev(p, v);
  } else {
    storev_partial(p, v, n);
  }
}

// a > b ? a : b and a < b ? a : b (b where either is NaN): one instruction where the ISA has it
#ifdef __AVX__
inline v8f vmax(v8f a, v8f b) { return reinterpret_cast<v8f>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
inline v8f vmin(v8f a, v8f b) { return reinterpret_cast<v8f>(_mm256_min_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b))); }
#else
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
inline v8f vmin(v8f a, v8f b) { return a < b ? a : b; }
#endif
#ifdef __AVX512F__
// (the all-lanes mask form: GCC 12's _mm512_max_ps draws a spurious uninitialised-value warning)
inline v16f vmax(v16f a, v16f b) {
  const __m512 x = reinterpret_cast<__m512>(a);
  return reinterpret_cast<v16f>(_mm512_mask_max_ps(x, 0xffff, x, reinterpret_cast<__m512>(b)));
}
inline v16f vmin(v16f a, v16f b) {
  const __m512 x = reinterpret_cast<__m512>(a);
  return reinterpret_cast<v16f>(_mm512_mask_min_ps(x, 0xffff, x, reinterpret_cast<__m512>(b)));
}
#else
inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }
inline v16f vmin(v16f a, v16f b) { return a < b ? a : b; }
#endif

// keeps the compiler from folding (x + c) - c
template <class V>
inline V opaque(V x) {
  asm("" : "+m"(x));
  return x;
}
#if defined(__AVX__)
inline v8f opaque(v8f x) {
  asm("" : "+x"(x));
  return x;
}
#endif
#if defined(__AVX512F__)
inline v16f opaque(v16f x) {
  asm("" : "+v"(x));
  return x;
}
#endif

template <class V>
inline V bits_as_float(typename VecTraits<V>::I i) {
  V v;
  std::memcpy(&v, &i, sizeof(v));
  return v;
}

template <class V>
inline typename VecTraits<V>::I float_bits(V v) {
  typename VecTraits<V>::I i;
  std::memcpy(&i, &v, sizeof(i));
  return i;
}

// 2^x, x clamped to [-125, 127]: x = k + f with k an integer and |f| <= 1/2; 2^f by a degree-5
// polynomial (relative error 2.4e-7, a minimax fit on [-1/2, 1/2] made for vmq), and k added to
// the exponent bits. Adding 1.5 * 2^23 rounds x to k and leaves k in the low mantissa bits, so a
// shift by 23 yields k << 23 without a conversion. exp(x) is vexp2(x * log2 e).
template <class V>
inline V vexp2(V x) {
  x = vmin(vmax(x, splat<V>(-125.f)), splat<V>(127.f));
  const V magic = splat<V>(12582912.f);
  const V t = opaque(x + magic);
  const V f = x - (t - magic);
  V p = splat<V>(1.3276472455e-3f);
  p = p * f + 9.6755409613e-3f;
  p = p * f + 5.5507130921e-2f;
  p = p * f + 2.4022120237e-1f;
  p = p * f + 6.9314694405e-1f;
  p = p * f + 1.0000001192f;
  return bits_as_float<V>(float_bits(p) + (float_bits(t) << 23));
}

// vexp2_fast(x * kExp2FastScale<V>) = 2^x, for the scan's decay, by the cheapest method the vector
// type has. AVX-512 (16 lanes): x * 32 = 32 k + j + r with j in 0..31 and |r| <= 1/2, so
// 2^x = 2^k * 2^(j/32) * 2^(r/32): 2^(j/32) from a 32-entry table held in two registers (one
// vpermi2ps), 2^(r/32) by a degree-2 polynomial (relative error 1.6e-7 overall, a minimax fit
// made for vmq), 2^k added to the exponent bits: 3 multiply-adds where vexp2 needs 5, for more
// integer and permute work; faster inside the scan, whose other work is multiply-adds (11.5 vs
// 8.8 G state updates/s on one Zen 4 core), slower alone. Other vector types: vexp2.
template <class V>
constexpr float kExp2FastScale = 1.f;

template <class V>
inline V vexp2_fast(V x) {
  return vexp2(x);
}

#ifdef __AVX512F__
template <>
constexpr float kExp2FastScale<v16f> = 32.f;

alignas(64) inline constexpr float kExp2Table32[32] = {
    1.000000000e+00f, 1.021897197e+00f, 1.044273734e+00f, 1.067140460e+00f,
    1.090507746e+00f, 1.114386797e+00f, 1.138788581e+00f, 1.163724899e+00f,
    1.189207077e+00f, 1.215247393e+00f, 1.241857767e+00f, 1.269050956e+00f,
    1.296839595e+00f, 1.325236678e+00f, 1.354255557e+00f, 1.383909941e+00f,
    1.414213538e+00f, 1.445180774e+00f, 1.476826191e+00f, 1.509164453e+00f,
    1.542210817e+00f, 1.575980902e+00f, 1.610490322e+00f, 1.645755529e+00f,
    1.681792855e+00f, 1.718619347e+00f, 1.756252170e+00f, 1.794709086e+00f,
    1.834008098e+00f, 1.874167681e+00f, 1.915206552e+00f, 1.957144141e+00f};  // 2^(j/32), rounded

template <>
inline v16f vexp2_fast(v16f x) {
  x = vmin(vmax(x, splat<v16f>(-125.f * 32)), splat<v16f>(127.f * 32));
  const v16f magic = splat<v16f>(12582912.f);
  const v16f t = opaque(x + magic);  // round(x) in the low mantissa bits
  const v16f r = x - (t - magic);     // [-1/2, 1/2]
  const v16i ti = float_bits(t);
  const v16f tab = reinterpret_cast<v16f>(_mm512_permutex2var_ps(
      _mm512_load_ps(kExp2Table32), reinterpret_cast<__m512i>(ti), _mm512_load_ps(kExp2Table32 + 16)));
  const v16f q = r * 2.3459618e-4f + 2.1661166e-2f;  // (2^(r/32) - 1) / r
  const v16f p = (tab * r) * q + tab;
  return bits_as_float<v16f>(float_bits(p) + ((ti >> 5) << 23));
}
#endif

// clamp(round_half_even(v / s) + z, 0, qmax) as floats: the operations of
// quantize_per_token_ref. The magic-number rounding is exact for |v / s| < 2^22, so v / s is
// clamped there first; beyond it the final clamp decides either way while |z| < 2^21.
template <class V>
inline V quantize_codes(V v, V s, float z, float qmax) {
  const V big = splat<V>(4194304.f), magic = splat<V>(12582912.f);
  v = vmin(vmax(v / s, -big), big);
  const V t = opaque(v + magic);  // no folding of (v + magic) - magic
  return vmin(vmax((t - magic) + z, splat<V>(0.f)), splat<V>(qmax));
}

// log1p(t) for t in [0, 1]: t P(t), P a degree-8 polynomial (relative error 2.1e-7, a minimax
// fit made for vmq)
template <class V>
inline V vlog1p_01(V t) {
  V p = splat<V>(5.2326950245e-3f);
  p = p * t + -2.9505241662e-2f;
  p = p * t + 7.8225962818e-2f;
  p = p * t + -1.3663247228e-1f;
  p = p * t + 1.9106006622e-1f;
  p = p * t + -2.4842981994e-1f;
  p = p * t + 3.3319097757e-1f;
  p = p * t + -4.9999493361e-1f;
  p = p * t + 9.9999994040e-1f;
  return p * t;
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); x itself above 20 (as torch
// does). exp by vexp2 and log1p by vlog1p_01: relative error below 5e-7.
template <class V>
inline V vsoftplus(V x) {
  // operand order: vmax(a, b) returns b where either is NaN, so a NaN x comes through
  const V ax = vmax(-x, x);
  const V sp = vmax(splat<V>(0.f), x) + vlog1p_01(vexp2(ax * -1.44269504088896341f));
  return x > 20.f ? x : sp;
}

// silu(x) = x / (1 + exp(-x)), exp by vexp2 (measured: the table exp2 and a reciprocal
// estimate are slower here than the polynomial and a division when nothing else competes for
// the multiply-add units)
template <class V>
inline V vsilu(V x) {
  return x / (splat<V>(1.f) + vexp2(x * -1.44269504088896341f));
}

}  // namespace cpu
}  // namespace vmq
