// Integer linear layer on CPU: vmq::int8_linear and vmq::quantize_per_token.
//
//   acc[m, n] = sum_k (x_q[m, k] - zp[m]) * w[n, k]            exact, int32
//   y[m, n]   = float(acc) * (x_scale[m] * w_scale[n]) + bias[n]  fp32, in this order
//   optional int8 output: clamp(round_half_even(y / out_scale[m]) + out_zp[m], 0, 2^bits - 1)
// The twin is vmq.ops.linear.int8_linear_ref; the result is bit-identical to it.
//
// x_q is uint8 (0..255) and w int8, so the AVX2 "u8 x s8 -> saturating s16 pair sum"
// instruction (vpmaddubsw) could overflow: 2 * 255 * 128 > 32767. Two exact schemes instead:
// * AVX-512 VNNI (vpdpbusd: u8 x s8 products, four at a time, added into int32 lanes without
//   saturation), used when the build targets it: 64 products per instruction;
// * otherwise AVX2: both operands widened to int16 and multiplied with vpmaddwd (s16 x s16 ->
//   exact s32 pair sums): 16 products per instruction.
// sum_k x_q w is accumulated and zp[m] * sum_k w[n, k] subtracted at the end.
//
// Weights are repacked per call into blocks of 16 output channels, kGk consecutive inputs per
// lane (a pass over N x K bytes, small next to the M x N x K product); a register tile
// accumulates kMr rows x 16 channels at a time. The row sums of the weights come with the call
// (w_sum, cached by the layer) or are summed during the repacking.
//
// Per-token parameters (x_scale, x_zero_point, out_scale, out_zero_point) are shaped (tokens,)
// or x.shape[:-1], as the twin requires, and all four of one kind: row m reads entry
// m % numel of each.
#include <torch/library.h>
#include <c10/util/accumulate.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/vec_math.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define VMQ_INT8_VNNI 1
#endif

namespace {

using vmq::cpu::splat;
using vmq::cpu::v8f;

constexpr int64_t kNr = 16;  // output channels per block
#ifdef VMQ_INT8_VNNI
constexpr int64_t kMr = 8;   // rows per register tile
constexpr int64_t kGk = 4;   // consecutive inputs per weight lane (one vpdpbusd quad)
using XLane = uint8_t;       // activations as they are
#else
constexpr int64_t kMr = 6;
constexpr int64_t kGk = 2;   // one vpmaddwd pair
using XLane = int16_t;       // activations widened
#endif

struct Epilogue {
  const float *x_scale, *w_scale, *bias, *out_scale;
  const int32_t *x_zp, *out_zp, *w_sum;
  int64_t param_rows;  // per-token parameters have this many entries: row m uses m % param_rows
  int64_t n;
  float qmax;
  float* out_f;
  uint8_t* out_q;
};

using vmq::cpu::v16f;
using vmq::cpu::v16i;

// The epilogue of one tile: columns [n0, n0 + cols) of rows m0 .. m0 + rows - 1 from their raw
// sums acc[r][0..16). Same operations and order as the twin, lane by lane, and no multiply-add
// fusion. param_row[r]: row r's index into the per-token parameters. The channel parameters are
// padded to whole blocks (Epilogue::w_scale, bias: kNr-aligned copies), loaded once per tile;
// only the store is partial. kBias / kRequant: bias present / uint8 output.
template <bool kBias, bool kRequant>
inline void finish_tile(const Epilogue& e, int64_t m0, int rows, const int64_t* param_row, int64_t n0, int64_t cols,
                        const int32_t (*acc_raw)[kNr]) {
  v16i w_sum;
  v16f w_scale, bias{};
  std::memcpy(&w_sum, e.w_sum + n0, sizeof(w_sum));
  std::memcpy(&w_scale, e.w_scale + n0, sizeof(w_scale));
  if constexpr (kBias) std::memcpy(&bias, e.bias + n0, sizeof(bias));
  for (int i = 0; i < rows; ++i) {
    const int64_t m = m0 + i, r = param_row[i];
    v16i acc;
    std::memcpy(&acc, acc_raw[i], sizeof(acc));
    const v16i corrected = acc - e.x_zp[r] * w_sum;
    const v16f s = e.x_scale[r] * w_scale;
    v16f y = __builtin_convertvector(corrected, v16f) * s;
    y = vmq::cpu::opaque(y);  // keep y * s + bias from becoming one fused multiply-add
    if constexpr (kBias) y = y + bias;
    if constexpr (!kRequant) {
      if (cols == kNr) {
        std::memcpy(e.out_f + m * e.n + n0, &y, sizeof(y));
      } else {
        std::memcpy(e.out_f + m * e.n + n0, &y, sizeof(float) * cols);
      }
    } else {
      // requantize: clamp(round_half_even(y / scale) + zero point, 0, qmax)
      const v16f q = vmq::cpu::quantize_codes(y, vmq::cpu::splat<v16f>(e.out_scale[r]),
                                              static_cast<float>(e.out_zp[r]), e.qmax);
      const v16i qi = __builtin_convertvector(q, v16i);
      uint8_t* dst = e.out_q + m * e.n + n0;
      typedef uint8_t v16u8 __attribute__((vector_size(16)));
      const v16u8 qb = __builtin_convertvector(qi, v16u8);
      if (cols == kNr) {
        std::memcpy(dst, &qb, sizeof(qb));
      } else {
        std::memcpy(dst, &qb, cols);
      }
    }
  }
}

// Weights (N, K) int8 -> blocks of kNr channels: for block j, group p, kNr lanes of
// (w[n, kGk p], ..., w[n, kGk p + kGk - 1]), zero past the edges; and, unless w_sum is null,
// the row sums.
void pack_weights(const int8_t* w, int64_t n, int64_t k, int8_t* packed, int32_t* w_sum) {
  const int64_t kp = (k + kGk - 1) / kGk, full = k / kGk, blocks = (n + kNr - 1) / kNr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) {
      int8_t* dst = packed + j * kp * kGk * kNr;
      for (int64_t l = 0; l < kNr; ++l) {
        const int64_t row = j * kNr + l;
        int8_t* lane = dst + l * kGk;  // group p of this lane at lane + p * kNr * kGk
        if (row >= n) {
          for (int64_t p = 0; p < kp; ++p) std::memset(lane + p * kNr * kGk, 0, kGk);
          continue;
        }
        const int8_t* src = w + row * k;
        for (int64_t p = 0; p < full; ++p) std::memcpy(lane + p * kNr * kGk, src + p * kGk, kGk);
        if (full < kp) {  // the last, partial group: zero past k
          int8_t tail[kGk] = {};
          std::memcpy(tail, src + full * kGk, k - full * kGk);
          std::memcpy(lane + full * kNr * kGk, tail, kGk);
        }
        if (w_sum) {
          int32_t sum = 0;
          for (int64_t c = 0; c < k; ++c) sum += src[c];
          w_sum[row] = sum;
        }
      }
    }
  });
}

// rows [m0, m0 + rows) x one channel block over all kp input groups. xw: the rows, kp * kGk
// lanes each (zero padded); wb: the block's packed weights.
#if defined(VMQ_INT8_VNNI)
template <int kRows>
void tile(const XLane* xw, int64_t kp, const int8_t* wb, int32_t out[kMr][kNr]) {
  __m512i acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t p = 0; p < kp; ++p) {
    const __m512i w = _mm512_loadu_si512(wb + p * kGk * kNr);
    for (int r = 0; r < kRows; ++r) {
      int32_t quad;
      std::memcpy(&quad, xw + (r * kp + p) * kGk, sizeof(quad));
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(quad), w);
    }
  }
  for (int r = 0; r < kRows; ++r) _mm512_storeu_si512(out[r], acc[r]);
}
#elif defined(__AVX2__)
template <int kRows>
void tile(const XLane* xw, int64_t kp, const int8_t* wb, int32_t out[kMr][kNr]) {
  __m256i acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < kp; ++p) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + p * 2 * kNr)));
    const __m256i w1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + p * 2 * kNr + kNr)));
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, xw + (r * kp + p) * 2, sizeof(pair));
      const __m256i x = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 8), acc[r][1]);
  }
}
#else
template <int kRows>
void tile(const XLane* xw, int64_t kp, const int8_t* wb, int32_t out[kMr][kNr]) {
  for (int r = 0; r < kRows; ++r) {
    for (int64_t l = 0; l < kNr; ++l) {
      int32_t s = 0;
      for (int64_t p = 0; p < kp; ++p) {
        for (int64_t h = 0; h < kGk; ++h) s += int32_t(xw[(r * kp + p) * kGk + h]) * wb[(p * kNr + l) * kGk + h];
      }
      out[r][l] = s;
    }
  }
}
#endif

template <int kRows = kMr>
void tile_rows(int rows, const XLane* xw, int64_t kp, const int8_t* wb, int32_t out[kMr][kNr]) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return tile_rows<kRows - 1>(rows, xw, kp, wb, out);
  }
  tile<kRows>(xw, kp, wb, out);
}

// a row of activations into the tile buffer (uint8 -> XLane); __restrict: a plain loop over
// uint8 pointers may alias anything and stays a byte-by-byte copy
inline void widen(const uint8_t* __restrict src, int16_t* __restrict dst, int64_t k) {
  for (int64_t c = 0; c < k; ++c) dst[c] = src[c];
}
inline void widen(const uint8_t* __restrict src, uint8_t* __restrict dst, int64_t k) { std::memcpy(dst, src, k); }

// q = clamp(round_half_even(x / scale) + zero_point, 0, qmax) of one row of c values, x first
// divided by the smoothing scales when there are any: the operations of quantize_per_token_ref,
// 8 at a time (vmq::cpu::quantize_codes), the tail one by one
template <class T>
void quantize_row(const float* __restrict x, const float* __restrict smooth, float s, float z, float qmax,
                  T* __restrict out, int64_t c) {
  typedef T v8t __attribute__((vector_size(8 * sizeof(T))));
  const v8f vs = splat(s);
  int64_t i = 0;
  for (; i + 8 <= c; i += 8) {
    v8f v = vmq::cpu::loadv<v8f>(x + i);
    if (smooth) v = v / vmq::cpu::loadv<v8f>(smooth + i);
    v = vmq::cpu::quantize_codes(v, vs, z, qmax);
    const v8t q = __builtin_convertvector(__builtin_convertvector(v, vmq::cpu::v8i), v8t);
    std::memcpy(out + i, &q, sizeof(q));
  }
  for (; i < c; ++i) {
    float v = smooth ? x[i] / smooth[i] : x[i];
    v = std::nearbyint(v / s) + z;
    out[i] = static_cast<T>(std::min(std::max(v, 0.f), qmax));
  }
}

// GEMM activation rows: already quantized uint8 ...
struct QuantizedRows {
  const uint8_t* x;
  int64_t k;
  void operator()(int64_t m, XLane* dst) const { widen(x + m * k, dst, k); }
};

// ... or float rows quantized on the way into the tile (smoothing, per-token scale / zero point)
struct FloatRows {
  const float* x;
  const float* smooth;  // (k,) or null
  const float* scale;
  const float* zero_point;
  int64_t param_rows, k;
  float qmax;
  void operator()(int64_t m, XLane* dst) const {
    const int64_t r = m % param_rows;
    quantize_row(x + m * k, smooth, scale[r], zero_point[r], qmax, dst, k);
  }
};

template <bool kBias, bool kRequant, class Rows>
void gemm(const Rows& load_row, int64_t m, int64_t k, const int8_t* packed, int64_t n, const Epilogue& e) {
  const int64_t kp = (k + kGk - 1) / kGk, blocks = (n + kNr - 1) / kNr, tiles = (m + kMr - 1) / kMr;
  // tasks: groups of row tiles; each prepares its rows once and sweeps every channel block
  constexpr int64_t kTilesPerTask = 8;
  const int64_t tasks = (tiles + kTilesPerTask - 1) / kTilesPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<XLane> xw(kMr * kp * kGk);
    alignas(64) int32_t out[kMr][kNr];
    for (int64_t task = t0; task < t1; ++task) {
      for (int64_t tile = task * kTilesPerTask; tile < std::min(tiles, (task + 1) * kTilesPerTask); ++tile) {
        const int64_t m0 = tile * kMr;
        const int rows = static_cast<int>(std::min<int64_t>(kMr, m - m0));
        for (int r = 0; r < rows; ++r) {
          XLane* dst = xw.data() + r * kp * kGk;
          load_row(m0 + r, dst);
          for (int64_t c = k; c < kp * kGk; ++c) dst[c] = 0;
        }
        int64_t param_row[kMr];
        for (int r = 0; r < rows; ++r) param_row[r] = (m0 + r) % e.param_rows;
        for (int64_t j = 0; j < blocks; ++j) {
          tile_rows(rows, xw.data(), kp, packed + j * kp * kGk * kNr, out);
          const int64_t cols = std::min<int64_t>(kNr, n - j * kNr);
          finish_tile<kBias, kRequant>(e, m0, rows, param_row, j * kNr, cols, out);
        }
      }
    }
  });
}

// The vector quantizers clamp x / scale to +-2^22 before rounding (the rounding trick's range)
// and then add the zero point; that equals the twin's round(x / scale) + zero_point followed by
// the clamp to [0, qmax] whenever |zero_point| < 2^21 (a value clamped at 2^22 then saturates
// either way). Zero points are codes in [0, qmax]; this only refuses absurd ones.
void check_zero_points(const char* op, const at::Tensor& zp_float) {
  const float* z = zp_float.data_ptr<float>();
  for (int64_t i = 0; i < zp_float.numel(); ++i) {
    TORCH_CHECK(std::fabs(z[i]) < 2097152.f, op, ": zero points must lie within +-2^21, got ", z[i]);
  }
}

// a per-token parameter: shape (tokens,) or x.shape[:-1] (vmq.ops.quantize.check_per_token)
void check_token_shape(const char* op, const at::Tensor& t, at::IntArrayRef x_sizes, const char* what) {
  const at::IntArrayRef rows = x_sizes.slice(0, x_sizes.size() - 1), tokens = x_sizes.slice(x_sizes.size() - 2, 1);
  TORCH_CHECK(t.sizes() == tokens || t.sizes() == rows, op, ": ", what, " must be (", tokens[0], ",) or ", rows,
              " (one value per token or per row), got ", t.sizes());
}

void check_per_token(const char* op, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef x_sizes,
                     const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, op, ": ", what, " must be a CPU ", dtype,
              " tensor, got ", t.scalar_type());
  check_token_shape(op, t, x_sizes, what);
}

// The weight-side and epilogue checks shared by both entry points; returns the output.
template <class Rows>
at::Tensor run_linear(const char* op, const Rows& rows, at::IntArrayRef x_sizes, const at::TensorOptions& opts,
                      int64_t m, int64_t k, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                      const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_zero_point,
                      int64_t out_bits, const std::optional<at::Tensor>& w_sum_given) {
  TORCH_CHECK(w_q.device().is_cpu() && w_q.scalar_type() == at::kChar && w_q.dim() == 2, op,
              ": w_q must be an int8 CPU tensor (out_features, in_features)");
  const int64_t n = w_q.size(0);
  TORCH_CHECK(w_q.size(1) == k, op, ": in_features differ: ", k, " vs ", w_q.size(1));
  TORCH_CHECK(w_scale.device().is_cpu() && w_scale.scalar_type() == at::kFloat && w_scale.numel() == n, op,
              ": w_scale must be float32 (out_features,)");
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == n, op,
                ": bias must be float32 (out_features,)");
  }
  TORCH_CHECK(out_scale.has_value() == out_zero_point.has_value(), op, ": out_scale and out_zero_point go together");
  if (out_scale) {
    TORCH_CHECK(out_bits >= 2 && out_bits <= 8, op, ": out_bits must be 2..8, got ", out_bits);
    check_per_token(op, *out_scale, at::kFloat, x_sizes, "out_scale");
    check_per_token(op, *out_zero_point, at::kInt, x_sizes, "out_zero_point");
    TORCH_CHECK(out_scale->numel() == x_scale.numel() && out_zero_point->numel() == x_scale.numel(), op,
                ": out_scale and out_zero_point must be of x_scale's kind (all per token or all per row), got ",
                out_scale->sizes(), " and ", out_zero_point->sizes(), " with x_scale ", x_scale.sizes());
  }
  if (w_sum_given) {
    TORCH_CHECK(w_sum_given->device().is_cpu() && w_sum_given->scalar_type() == at::kInt && w_sum_given->dim() == 1 &&
                    w_sum_given->size(0) == n,
                op, ": w_sum must be the int32 (", n, ",) row sums of the weights on the CPU, got ",
                w_sum_given->scalar_type(), " ", w_sum_given->sizes(), " on ", w_sum_given->device());
  }
  const at::Tensor wc = w_q.contiguous(), xs = x_scale.contiguous(), xz = x_zero_point.contiguous(),
                   ws = w_scale.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor os = out_scale ? out_scale->contiguous() : at::Tensor();
  const at::Tensor oz = out_zero_point ? out_zero_point->contiguous() : at::Tensor();
  if (out_zero_point) check_zero_points(op, oz.to(at::kFloat));
  std::vector<int64_t> shape(x_sizes.begin(), x_sizes.end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, opts.dtype(out_scale ? at::kByte : at::kFloat));
  if (m == 0 || n == 0) return out;
  const int64_t kp = (k + kGk - 1) / kGk, blocks = (n + kNr - 1) / kNr;
  std::vector<int8_t> packed(std::max<int64_t>(blocks * kp * kGk * kNr, 1));
  std::vector<int32_t> w_sum(blocks * kNr, 0);  // padded to whole blocks for the epilogue's loads
  if (w_sum_given) std::copy_n(w_sum_given->contiguous().data_ptr<int32_t>(), n, w_sum.begin());
  pack_weights(wc.data_ptr<int8_t>(), n, k, packed.data(), w_sum_given ? nullptr : w_sum.data());
  std::vector<float> w_scale_pad(blocks * kNr, 0.f), bias_pad(bias ? blocks * kNr : 0, 0.f);
  std::copy_n(ws.data_ptr<float>(), n, w_scale_pad.begin());
  if (bias) std::copy_n(bc.data_ptr<float>(), n, bias_pad.begin());
  const Epilogue e{xs.data_ptr<float>(),
                   w_scale_pad.data(),
                   bias ? bias_pad.data() : nullptr,
                   out_scale ? os.data_ptr<float>() : nullptr,
                   xz.data_ptr<int32_t>(),
                   out_scale ? oz.data_ptr<int32_t>() : nullptr,
                   w_sum.data(),
                   xs.numel(),
                   n,
                   static_cast<float>((1 << out_bits) - 1),
                   out_scale ? nullptr : out.data_ptr<float>(),
                   out_scale ? out.data_ptr<uint8_t>() : nullptr};
  if (bias) {
    out_scale ? gemm<true, true>(rows, m, k, packed.data(), n, e) : gemm<true, false>(rows, m, k, packed.data(), n, e);
  } else {
    out_scale ? gemm<false, true>(rows, m, k, packed.data(), n, e) : gemm<false, false>(rows, m, k, packed.data(), n, e);
  }
  return out;
}

at::Tensor int8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_zero_point,
                       int64_t out_bits, const std::optional<at::Tensor>& w_sum) {
  TORCH_CHECK(x_q.device().is_cpu() && x_q.scalar_type() == at::kByte && x_q.dim() >= 2,
              "int8_linear: x_q must be a uint8 CPU tensor (..., tokens, in_features)");
  const int64_t k = x_q.size(-1);
  const int64_t m = c10::multiply_integers(x_q.sizes().begin(), x_q.sizes().end() - 1);  // rows, also when k = 0
  check_per_token("int8_linear", x_scale, at::kFloat, x_q.sizes(), "x_scale");
  check_per_token("int8_linear", x_zero_point, at::kInt, x_q.sizes(), "x_zero_point");
  TORCH_CHECK(x_scale.numel() == x_zero_point.numel(), "int8_linear: x_scale and x_zero_point must be of one kind "
              "(per token or per row), got ", x_scale.sizes(), " and ", x_zero_point.sizes());
  const at::Tensor xc = x_q.contiguous();
  return run_linear("int8_linear", QuantizedRows{xc.data_ptr<uint8_t>(), k}, x_q.sizes(), x_q.options(), m, k,
                    x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum);
}

// float activations: optional smoothing (x / smooth_scale), per-token quantization to x_bits,
// then int8_linear, in one pass; the twin is int8_linear_from_float_ref.
at::Tensor int8_linear_from_float(const at::Tensor& x, const std::optional<at::Tensor>& smooth_scale,
                                  const at::Tensor& x_scale, const at::Tensor& x_zero_point, int64_t x_bits,
                                  const at::Tensor& w_q, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "int8_linear_from_float";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 2, kOp,
              ": x must be a float32 CPU tensor (..., tokens, in_features)");
  TORCH_CHECK(x_bits >= 2 && x_bits <= 8, kOp, ": x_bits must be 2..8, got ", x_bits);
  const int64_t k = x.size(-1);
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  check_per_token(kOp, x_scale, at::kFloat, x.sizes(), "x_scale");
  check_per_token(kOp, x_zero_point, at::kInt, x.sizes(), "x_zero_point");
  TORCH_CHECK(x_scale.numel() == x_zero_point.numel(), kOp, ": x_scale and x_zero_point must be of one kind "
              "(per token or per row), got ", x_scale.sizes(), " and ", x_zero_point.sizes());
  if (smooth_scale) {
    TORCH_CHECK(smooth_scale->device().is_cpu() && smooth_scale->scalar_type() == at::kFloat &&
                    smooth_scale->numel() == k,
                kOp, ": smooth_scale must be float32 (in_features,)");
  }
  const at::Tensor xc = x.contiguous(), sc = smooth_scale ? smooth_scale->contiguous() : at::Tensor();
  const at::Tensor xs = x_scale.contiguous(), zf = x_zero_point.to(at::kFloat).contiguous();
  check_zero_points(kOp, zf);
  const FloatRows rows{xc.data_ptr<float>(), smooth_scale ? sc.data_ptr<float>() : nullptr, xs.data_ptr<float>(),
                       zf.data_ptr<float>(), xs.numel(), k, static_cast<float>((1 << x_bits) - 1)};
  return run_linear(kOp, rows, x.sizes(), x.options(), m, k, x_scale, x_zero_point, w_q, w_scale, bias,
                    std::nullopt, std::nullopt, 8, std::nullopt);
}

// q = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1): the twin is quantize_per_token_ref
at::Tensor quantize_per_token(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t bits) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 2,
              "quantize_per_token: x must be a float32 CPU tensor (..., tokens, channels)");
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantize_per_token: bits must be 2..8, got ", bits);
  const int64_t c = x.size(-1);
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // rows, also when c = 0
  check_per_token("quantize_per_token", scale, at::kFloat, x.sizes(), "scale");
  TORCH_CHECK(zero_point.device().is_cpu() && (zero_point.scalar_type() == at::kInt || zero_point.scalar_type() == at::kFloat),
              "quantize_per_token: zero_point must be an int32 or float32 CPU tensor");
  check_token_shape("quantize_per_token", zero_point, x.sizes(), "zero_point");
  TORCH_CHECK(zero_point.numel() == scale.numel(), "quantize_per_token: scale and zero_point must be of one kind "
              "(per token or per row), got ", scale.sizes(), " and ", zero_point.sizes());
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous(), zc = zero_point.to(at::kFloat).contiguous();
  check_zero_points("quantize_per_token", zc);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const float *px = xc.data_ptr<float>(), *ps = sc.data_ptr<float>(), *pz = zc.data_ptr<float>();
  uint8_t* pq = q.data_ptr<uint8_t>();
  const int64_t pr = sc.numel();
  const float qmax = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(px + r * c, nullptr, ps[r % pr], pz[r % pr], qmax, pq + r * c, c);
  });
  return q;
}

// W4A8: two signed 4-bit weights per byte, low nibble first (vmq.pack.bits), unpacked to int8 and
// multiplied by the kernel above; the twin is w4a8_linear_ref.
at::Tensor w4a8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& w_packed, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_zero_point,
                       int64_t out_bits, const std::optional<at::Tensor>& w_sum) {
  TORCH_CHECK(w_packed.device().is_cpu() && w_packed.scalar_type() == at::kByte && w_packed.dim() == 2,
              "w4a8_linear: w_packed must be a uint8 CPU tensor (out_features, in_features / 2)");
  TORCH_CHECK(x_q.dim() >= 1 && x_q.size(-1) == 2 * w_packed.size(1),
              "w4a8_linear: w_packed must hold in_features / 2 bytes per row, got ", w_packed.sizes(),
              " for in_features ", x_q.size(-1));
  const at::Tensor p = w_packed.contiguous();
  at::Tensor w = at::empty({p.size(0), 2 * p.size(1)}, p.options().dtype(at::kChar));
  const uint8_t* src = p.data_ptr<uint8_t>();
  int8_t* dst = w.data_ptr<int8_t>();
  for (int64_t i = 0; i < p.numel(); ++i) {
    dst[2 * i] = static_cast<int8_t>(((src[i] & 15) ^ 8) - 8);
    dst[2 * i + 1] = static_cast<int8_t>(((src[i] >> 4) ^ 8) - 8);
  }
  return int8_linear(x_q, x_scale, x_zero_point, w, w_scale, bias, out_scale, out_zero_point, out_bits, w_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("int8_linear_from_float", &int8_linear_from_float);
  m.impl("quantize_per_token", &quantize_per_token);
}
