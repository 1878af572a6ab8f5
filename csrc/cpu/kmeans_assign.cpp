// k-means on CPU, fp32, for vmq's codebooks (vmq/ops/kmeans.py): nearest-centroid assignment and
// the centroid update.
//
// Assignment. For a point x (d values, optional per-coordinate weights w) the distance to c_k is
//   sum_j w_j (x_j - c_kj)^2 = sum_j w_j x_j^2 + [ sum_j w_j c_kj^2 - 2 w_j x_j c_kj ].
// The first term does not depend on k and is added at the end. The bracket is computed in
// registers for 8 centroids at a time (centroids transposed to (d, K) so they load as vectors),
// for P points at once so that each loaded centroid vector serves P points, with the per-point
// factors (-2 w_j x_j, w_j) broadcast once per point. Per block of centroids the values go to a
// small buffer while a running vector minimum is kept; only when a block beats the best so far is
// the buffer searched for its first index. No N x K matrix exists; ties go to the lowest index.
// Every point's value is the same sequence of operations whatever the tiling or thread count, so
// the result does not depend on either (the file is built without -ffast-math, which would let
// the compiler reassociate the sums differently in the P-point and the 1-point versions).
//
// Update. Each cluster's (weighted) mean, coordinate by coordinate, accumulated in double in point
// order (one pass, serial: deterministic); a coordinate with no weight keeps the old centroid.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <optional>
#include <tuple>
#include <vector>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

typedef float vec8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 256;  // centroids per block: buffer and centroid slice stay in L1
constexpr float kPad = 1e30f;    // bracket value of the padding centroids: never the nearest

inline vec8 splat(float v) { return vec8{} + v; }
inline vec8 load(const float* p) { vec8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec8 v) { __builtin_memcpy(p, &v, sizeof v); }
inline vec8 vmin(vec8 a, vec8 b) { return a < b ? a : b; }
inline float hmin(vec8 v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::min(m, v[l]);
  return m;
}

// First index q < n (n a multiple of kLanes) with v[q] == m; m is known to be there.
inline int64_t first_equal(const float* v, int64_t n, float m) {
#ifdef __AVX__
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t q = 0; q < n; q += kLanes) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + q), mv, _CMP_EQ_OQ));
    if (mask) return q + __builtin_ctz(mask);
  }
#else
  for (int64_t q = 0; q < n; ++q) {
    if (v[q] == m) return q;
  }
#endif
  return n - 1;  // not reached
}

struct Problem {
  int64_t d, k, kp;     // dimension; number of centroids, and that padded to a multiple of kLanes
  const float* x;       // (n, d)
  const float* w;       // (n, d) or null
  const float* ct;      // (d, kp) centroids, transposed; padding columns 0
  const float* ct2;     // (d, kp) their squares (weighted form)
  const float* base;    // (kp,) start of the bracket: |c_k|^2 (plain) or 0 (weighted); kPad on padding
  int64_t* codes;
  float* dist;
};

// Points i0 .. i0+P-1. D > 0: the dimension as a constant (unrolled); D == 0: g.d at run time.
// buf: P * kBlock floats; coef_rt: 2 * P * d floats (run-time dimension only).
template <int D, int P, bool W>
void assign_points(const Problem& g, int64_t i0, float* buf, float* coef_rt) {
  const int64_t d = D > 0 ? D : g.d;
  constexpr int kMaxUnrolled = 8;
  constexpr int DC = D > 0 ? D : kMaxUnrolled;  // coefficient slots held in registers
  float xx[P], best[P];
  int64_t arg[P];
  vec8 v2[P][DC], vw[P][W ? DC : 1];
  for (int p = 0; p < P; ++p) {
    const float* xi = g.x + (i0 + p) * d;
    const float* wi = W ? g.w + (i0 + p) * d : nullptr;
    xx[p] = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      const float wv = W ? wi[j] : 1.0f;
      xx[p] += wv * xi[j] * xi[j];
      if (D > 0) {
        v2[p][j] = splat(-2.0f * wv * xi[j]);
        if (W) vw[p][j] = splat(wv);
      } else {
        coef_rt[p * d + j] = -2.0f * wv * xi[j];
        coef_rt[(P + p) * d + j] = wv;
      }
    }
    best[p] = FLT_MAX;
    arg[p] = 0;
  }
  for (int64_t k0 = 0; k0 < g.kp; k0 += kBlock) {
    const int64_t kb = std::min(kBlock, g.kp - k0);
    vec8 mn[P];
    for (int p = 0; p < P; ++p) mn[p] = splat(FLT_MAX);
    for (int64_t q = 0; q < kb; q += kLanes) {
      const int64_t col = k0 + q;
      vec8 acc[P];
      const vec8 b = load(g.base + col);
      for (int p = 0; p < P; ++p) acc[p] = b;
      for (int64_t j = 0; j < d; ++j) {
        const vec8 cv = load(g.ct + j * g.kp + col);
        if (W) {
          const vec8 c2v = load(g.ct2 + j * g.kp + col);
          for (int p = 0; p < P; ++p)
            acc[p] += (D > 0 ? vw[p][j] : splat(coef_rt[(P + p) * d + j])) * c2v;
        }
        for (int p = 0; p < P; ++p) acc[p] += (D > 0 ? v2[p][j] : splat(coef_rt[p * d + j])) * cv;
      }
      for (int p = 0; p < P; ++p) {
        store(buf + p * kBlock + q, acc[p]);
        mn[p] = vmin(mn[p], acc[p]);
      }
    }
    for (int p = 0; p < P; ++p) {
      const float m = hmin(mn[p]);
      if (m < best[p]) {  // rare after the first blocks: find the first index holding it
        best[p] = m;
        arg[p] = k0 + first_equal(buf + p * kBlock, kb, m);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    g.codes[i0 + p] = std::min(arg[p], g.k - 1);  // a padding column can only win on absurd (>1e30) distances
    g.dist[i0 + p] = std::max(best[p] + xx[p], 0.0f);
  }
}

template <int D, bool W>
void assign_all(const Problem& g, int64_t n) {
  constexpr int P = D == 0 ? 1 : (D <= 2 ? 4 : 2);  // points per tile
  at::parallel_for(0, (n + P - 1) / P, 64, [&](int64_t t0, int64_t t1) {
    alignas(64) float buf[P * kBlock];
    std::vector<float> coef_rt(D == 0 ? 2 * P * g.d : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * P;
      if (i0 + P <= n) {
        assign_points<D, P, W>(g, i0, buf, coef_rt.data());
      } else {
        for (int64_t i = i0; i < n; ++i) assign_points<D, 1, W>(g, i, buf, coef_rt.data());
      }
    }
  });
}

template <bool W>
void dispatch(const Problem& g, int64_t n) {
  switch (g.d) {
    case 1: return assign_all<1, W>(g, n);
    case 2: return assign_all<2, W>(g, n);
    case 3: return assign_all<3, W>(g, n);
    case 4: return assign_all<4, W>(g, n);
    case 6: return assign_all<6, W>(g, n);
    case 8: return assign_all<8, W>(g, n);
    default: return assign_all<0, W>(g, n);
  }
}

void check_points(const at::Tensor& x, const at::Tensor& w, const at::Tensor& c, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && c.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat, op, ": float32 expected");
  TORCH_CHECK(x.dim() == 2 && c.dim() == 2 && x.size(1) == c.size(1), op,
              ": points (N, D) and centroids (K, D) expected");
  TORCH_CHECK(x.size(1) >= 1 && c.size(0) >= 1, op, ": at least one dimension and one centroid");
  if (w.numel() > 0) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.sizes() == x.sizes(), op,
                ": float32 CPU weights shaped like the points expected");
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const std::optional<at::Tensor>& w_opt,
                                                  const at::Tensor& c) {
  const at::Tensor w = w_opt.has_value() ? *w_opt : at::empty({0}, x.options());
  check_points(x, w, c, "kmeans_assign");
  const bool weighted = w.numel() > 0;
  const int64_t n = x.size(0), d = x.size(1), k = c.size(0);
  const int64_t kp = (k + kLanes - 1) / kLanes * kLanes;
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weighted ? w.contiguous() : w;
  at::Tensor ct = at::zeros({d, kp}, x.options());
  ct.narrow(1, 0, k).copy_(c.t());
  const at::Tensor ct2 = ct * ct;
  at::Tensor base = at::full({kp}, kPad, x.options());
  if (weighted) {
    base.narrow(0, 0, k).zero_();
  } else {
    base.narrow(0, 0, k).copy_(ct2.narrow(1, 0, k).sum(0));
  }
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({n}, x.options());
  const Problem g{d, k, kp, xc.data_ptr<float>(), weighted ? wc.data_ptr<float>() : nullptr, ct.data_ptr<float>(),
                  ct2.data_ptr<float>(), base.data_ptr<float>(), codes.data_ptr<int64_t>(), dist.data_ptr<float>()};
  if (weighted) {
    dispatch<true>(g, n);
  } else {
    dispatch<false>(g, n);
  }
  return {codes, dist};
}

at::Tensor kmeans_update(const at::Tensor& x, const std::optional<at::Tensor>& w_opt, const at::Tensor& codes,
                         const at::Tensor& c) {
  const at::Tensor w = w_opt.has_value() ? *w_opt : at::empty({0}, x.options());
  check_points(x, w, c, "kmeans_update");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kLong && codes.dim() == 1 &&
                  codes.size(0) == x.size(0),
              "kmeans_update: codes (N,) int64 on the CPU expected");
  const bool weighted = w.numel() > 0;
  const int64_t n = x.size(0), d = x.size(1), k = c.size(0);
  const at::Tensor xc = x.contiguous(), cc = c.contiguous(), codes_c = codes.contiguous();
  const at::Tensor wc = weighted ? w.contiguous() : w;
  const float* xp = xc.data_ptr<float>();
  const float* wp = weighted ? wc.data_ptr<float>() : nullptr;
  const int64_t* cp = codes_c.data_ptr<int64_t>();
  std::vector<double> num(k * d, 0.0), den(weighted ? k * d : k, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ci = cp[i];
    TORCH_CHECK(ci >= 0 && ci < k, "kmeans_update: code ", ci, " out of range for ", k, " centroids");
    const float* xi = xp + i * d;
    double* ni = num.data() + ci * d;
    if (weighted) {
      const float* wi = wp + i * d;
      double* di = den.data() + ci * d;
      for (int64_t j = 0; j < d; ++j) {
        ni[j] += double(wi[j]) * xi[j];
        di[j] += wi[j];
      }
    } else {
      for (int64_t j = 0; j < d; ++j) ni[j] += xi[j];
      den[ci] += 1.0;
    }
  }
  at::Tensor out = cc.clone();
  float* op = out.data_ptr<float>();
  for (int64_t q = 0; q < k; ++q) {
    for (int64_t j = 0; j < d; ++j) {
      const double dv = weighted ? den[q * d + j] : den[q];
      if (dv > 0.0) op[q * d + j] = float(num[q * d + j] / dv);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign);
  m.impl("kmeans_update", &kmeans_update);
}
