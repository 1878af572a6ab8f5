// K-direction selective scan on CPU (inference): vmq::multi_scan.
//
// K scan directions over the same tokens, each through its own token order, in one call
// (the twin is vmq.ops.multi_scan.multi_scan_ref). Direction k, scan step s:
//   p = in_index[k, s] (s when in_index is absent): the input position read; -1: zero inputs
//   dt = softplus(delta[k][p] + delta_bias[k])        (softplus optional; delta = 0 when p = -1)
//   h = exp(dt A[k]) h + dt u[k][p] B[k][p],   y = <h, C[k][p]> + D[k] u[k][p]   (u, B, C = 0 when p = -1)
//   y goes to token out_index[k, s] (dropped when -1)
// then merge: sum, mean (over K) or none (one output per direction), times silu(z) in token order.
// u and delta may be int8 with one scale per direction and input position (value = q * scale[k, p]).
//
// The work is that of the bidirectional kernel (selective_scan.cpp), generalised: split over
// (batch, blocks of kW channels); per block and direction, dt and dt * u are computed once into
// buffers in scan order, then the states are scanned two at a time over all steps with the fast
// 2^x (index-free pointer walks where a direction's positions and tokens are affine in s, as
// Vim's and VMamba's row orders are). The inputs are read where they lie, through their strides,
// at each step's input position (no gathered or flipped copies of the tensors; K directions may
// share one u): token-major u and delta (channel stride 1, what Linear layers produce) load as
// vectors; other layouts are staged per block, position-major, once per tensor (a shared u once
// for all K directions). Each step's y goes straight to its token's slot of a token-order
// buffer (steps whose output is dropped, or whose inputs are padding and so contribute 0, go to
// a spare slot), so the directions' outputs meet in one buffer without a scatter pass. The
// output is token-major, (batch, seqlen, d_inner) or (batch, K, seqlen, d_inner), returned as a
// (batch, [K,] d_inner, seqlen) view; the gate silu(z) is applied as it is written.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/vec_math.h"

namespace {

using vmq::cpu::VecF;
constexpr int kW = vmq::cpu::VecTraits<VecF>::kLanes;  // channels per block: 16 with AVX-512, else 8
inline VecF splat(float x) { return vmq::cpu::splat<VecF>(x); }
using vmq::cpu::load_lanes;
using vmq::cpu::loadv;
using vmq::cpu::storev;

constexpr const char* kOp = "multi_scan";

// A (batch, d_inner, positions) float or int8 tensor read through its strides.
struct Strided {
  const void* p;
  bool int8;
  int64_t s0, s1, s2;
};

struct Direction {
  Strided u, delta;
  const float* u_scale;      // (S_in,) or null
  const float* delta_scale;  // (S_in,) or null
  const float* A_t;          // (n, d): A[k] transposed
  const float* B;            // B[k][b, n, p] at b*sB0 + n*sB1 + p*sB2
  const float* C;
  int64_t sB0, sB1, sB2, sC0, sC1, sC2;
  const float* D;            // (d,) or null
  const float* bias;         // (d,) or null
  const int64_t* in;         // (S,) input position of each step, -1: zero inputs; null: position s
  const int64_t* pos;        // (S,) max(in, 0): where B and C are read (unused where the inputs are zero)
  const int64_t* slot;       // (S,) y slot of each step: its token, or seqlen (spare) when dropped or padding
  bool affine;               // no padding steps, pos[s] = pos[0] + s * dpos and slot[s] = slot[0] + s * dslot
  int64_t dpos, dslot;
};

enum class Merge { kSum, kMean, kNone };

struct Problem {
  int64_t batch, dim, s_in, steps, seqlen, ns, K;
  bool softplus;
  Merge merge;
  Strided z;   // z.p null: no gate
  float* out;  // (b, l, d) or (b, K, l, d)
};

// channels [e0, e0 + nc) of z (float) at token t: a vector when token-major, else lane by lane
inline VecF load_gate(const Strided& z, int64_t b, int64_t e0, int64_t t, int nc) {
  const float* f = static_cast<const float*>(z.p) + b * z.s0 + e0 * z.s1 + t * z.s2;
  if (z.s1 == 1) return load_lanes<VecF>(f, nc);
  float tmp[kW] = {};
  for (int i = 0; i < nc; ++i) tmp[i] = f[i * z.s1];
  return loadv<VecF>(tmp);
}

// Where a block reads u or delta: kW lanes at base + p * step (int8 or float). Token-major
// tensors are read in place; others are staged per block, position-major (int8 converted): the
// scan reads each position up to once per direction, in any order, as one vector. A stage is
// filled once per (tensor, block), so directions sharing a u stage it once.
struct Source {
  const void* base;
  bool int8;
  int64_t step;
};

struct Stage {
  std::vector<float> buf;
  Strided x{};
  int64_t b = -1, e0 = -1;

  // channels [e0, e0 + nc) of sample b of t
  Source of(const Strided& t, int64_t b_, int64_t e0_, int nc, int64_t s_in) {
    const int64_t off = b_ * t.s0 + e0_ * t.s1;
    if (t.s1 == 1) {
      return {t.int8 ? static_cast<const void*>(static_cast<const int8_t*>(t.p) + off)
                     : static_cast<const void*>(static_cast<const float*>(t.p) + off),
              t.int8, t.s2};
    }
    const bool same = t.p == x.p && t.int8 == x.int8 && t.s0 == x.s0 && t.s1 == x.s1 && t.s2 == x.s2;
    if (!(same && b_ == b && e0_ == e0)) {
      x = t, b = b_, e0 = e0_;
      buf.assign(s_in * kW, 0.f);
      constexpr int64_t kTile = 64;  // positions per tile: the tile's rows of buf stay in L1
      for (int64_t p0 = 0; p0 < s_in; p0 += kTile) {
        const int64_t p1 = std::min(s_in, p0 + kTile);
        for (int i = 0; i < nc; ++i) {
          float* dst = buf.data() + i;
          if (t.int8) {
            const int8_t* q = static_cast<const int8_t*>(t.p) + off + i * t.s1;
            for (int64_t p = p0; p < p1; ++p) dst[p * kW] = static_cast<float>(q[p * t.s2]);
          } else {
            const float* f = static_cast<const float*>(t.p) + off + i * t.s1;
            for (int64_t p = p0; p < p1; ++p) dst[p * kW] = f[p * t.s2];
          }
        }
      }
    }
    return {buf.data(), false, kW};
  }
};

template <typename T>
inline VecF load_at(const T* base, int64_t p, int64_t step, int nc) {
  if constexpr (std::is_same_v<T, int8_t>) {
    return vmq::cpu::loadv_i8<VecF>(base + p * step, nc);
  } else {
    return load_lanes<VecF>(base + p * step, nc);
  }
}

// states scanned together: 2, as in the bidirectional kernel
constexpr int kGroup = 2;

// G states n0 .. n0 + G - 1 of one direction over one block of channels, all steps (state loop
// outermost: each state and its decay rate stay in registers while s runs). dt and du = dt * u
// are per-step buffers of kW lanes in scan order; y is the token-order buffer, step s adding
// into slot[s].
template <int G, bool kAffine>
inline void scan_states(const Direction& dir, int64_t b, int64_t e0, int nc, int64_t n0, int64_t dim,
                        int64_t steps, const float* __restrict dt, const float* __restrict du,
                        float* __restrict y) {
  // exp(dt A) = 2^(dt A log2 e), by vexp2_fast (whose argument comes scaled by kExp2FastScale)
  constexpr float kScale = 1.44269504088896341f * vmq::cpu::kExp2FastScale<VecF>;
  VecF A2[G], h[G];
  const float* Bp[G];
  const float* Cp[G];
  for (int g = 0; g < G; ++g) {
    A2[g] = load_lanes<VecF>(dir.A_t + (n0 + g) * dim + e0, nc) * kScale;
    h[g] = splat(0.f);
    Bp[g] = dir.B + b * dir.sB0 + (n0 + g) * dir.sB1;
    Cp[g] = dir.C + b * dir.sC0 + (n0 + g) * dir.sC1;
  }
  const int64_t sB = dir.sB2, sC = dir.sC2;
  const int64_t* __restrict pos = dir.pos;
  const int64_t* __restrict slot = dir.slot;
  // affine orders (Vim's two, VMamba's row-major ones): positions and slots by induction, as the
  // bidirectional kernel walks them
  const int64_t dB = dir.dpos * sB, dC = dir.dpos * sC, dy = dir.dslot * kW;
  int64_t oB = dir.pos[0] * sB, oC = dir.pos[0] * sC;
  float* ys = y + dir.slot[0] * kW;
  for (int64_t s = 0; s < steps; ++s) {
    const VecF dtv = loadv<VecF>(dt + s * kW), duv = loadv<VecF>(du + s * kW);
    if (!kAffine) {
      oB = pos[s] * sB, oC = pos[s] * sC;
      ys = y + slot[s] * kW;
    }
    VecF acc = loadv<VecF>(ys);
    for (int g = 0; g < G; ++g) {
      const VecF a = vmq::cpu::vexp2_fast(dtv * A2[g]);
      h[g] = a * h[g] + duv * Bp[g][oB];
      acc += h[g] * Cp[g][oC];
    }
    storev(ys, acc);
    if (kAffine) {
      oB += dB, oC += dC;
      ys += dy;
    }
  }
}

template <int G>
inline void scan_group(const Direction& dir, int64_t b, int64_t e0, int nc, int64_t n0, int64_t dim,
                       int64_t steps, const float* dt, const float* du, float* y) {
  if (dir.affine) {
    scan_states<G, true>(dir, b, e0, nc, n0, dim, steps, dt, du, y);
  } else {
    scan_states<G, false>(dir, b, e0, nc, n0, dim, steps, dt, du, y);
  }
}

// The first pass of one direction over one block: each step's inputs, dt and du = dt * u into
// the step buffers and D u into the step's y slot. TU, TD: how the sources of u and delta store
// them (int8 or float); kAffine: positions and slots by induction (no padding steps).
template <typename TU, typename TD, bool kAffine>
void prepare(const Problem& g, const Direction& dir, const Source& su, const Source& sd, VecF Dv, VecF bias, int nc,
             float* __restrict y, float* __restrict dt, float* __restrict du) {
  const TU* ub = static_cast<const TU*>(su.base);
  const TD* db = static_cast<const TD*>(sd.base);
  const int64_t ustep = su.step, dstep = sd.step, dp = dir.dpos, dy = dir.dslot * kW;
  int64_t p = dir.pos[0];
  float* ys = y + dir.slot[0] * kW;
  for (int64_t s = 0; s < g.steps; ++s) {
    if (!kAffine) {
      p = dir.in ? dir.in[s] : s;
      ys = y + dir.slot[s] * kW;
    }
    VecF u = splat(0.f), d = bias;
    if (kAffine || p >= 0) {
      u = load_at(ub, p, ustep, nc);
      VecF draw = load_at(db, p, dstep, nc);
      if (dir.u_scale) u *= dir.u_scale[p];  // int8 (in place or staged)
      if (dir.delta_scale) draw *= dir.delta_scale[p];
      d += draw;
    }
    if (g.softplus) d = vmq::cpu::vsoftplus(d);
    storev(dt + s * kW, d);
    storev(du + s * kW, d * u);
    storev(ys, loadv<VecF>(ys) + Dv * u);
    if (kAffine) p += dp, ys += dy;
  }
}

template <bool kAffine>
void prepare(const Problem& g, const Direction& dir, const Source& su, const Source& sd, VecF Dv, VecF bias, int nc,
             float* y, float* dt, float* du) {
  if (su.int8) {
    if (sd.int8) return prepare<int8_t, int8_t, kAffine>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
    return prepare<int8_t, float, kAffine>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
  }
  if (sd.int8) return prepare<float, int8_t, kAffine>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
  prepare<float, float, kAffine>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
}

// One direction over one block of channels [e0, e0 + nc); adds into the token-order y.
void scan_block(const Problem& g, const Direction& dir, int64_t b, int64_t e0, int nc, Stage& stage_u,
                Stage& stage_delta, float* __restrict y, float* __restrict dt, float* __restrict du) {
  if (g.steps == 0) return;
  const VecF Dv = dir.D ? load_lanes<VecF>(dir.D + e0, nc) : splat(0.f);
  const VecF bias = dir.bias ? load_lanes<VecF>(dir.bias + e0, nc) : splat(0.f);
  const Source su = stage_u.of(dir.u, b, e0, nc, g.s_in), sd = stage_delta.of(dir.delta, b, e0, nc, g.s_in);
  if (dir.affine) {
    prepare<true>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
  } else {
    prepare<false>(g, dir, su, sd, Dv, bias, nc, y, dt, du);
  }
  int64_t n = 0;
  for (; n + kGroup <= g.ns; n += kGroup) scan_group<kGroup>(dir, b, e0, nc, n, g.dim, g.steps, dt, du, y);
  for (; n < g.ns; ++n) scan_group<1>(dir, b, e0, nc, n, g.dim, g.steps, dt, du, y);
}

// y (token order) times scale and the gate into out rows (b, t, e0 ..) of a (.., seqlen, dim) tensor
void write_out(const Problem& g, const float* y, float scale, int64_t b, int64_t e0, int nc, float* out) {
  for (int64_t t = 0; t < g.seqlen; ++t) {
    VecF v = loadv<VecF>(y + t * kW) * scale;
    if (g.z.p) v = v * vmq::cpu::vsilu(load_gate(g.z, b, e0, t, nc));
    vmq::cpu::store_lanes(out + t * g.dim + e0, v, nc);
  }
}

void run(const Problem& g, const std::vector<Direction>& dirs) {
  const int64_t blocks = (g.dim + kW - 1) / kW;
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // token slots 0 .. seqlen - 1 and the spare slot seqlen
    std::vector<float> y((g.seqlen + 1) * kW), dt(g.steps * kW), du(g.steps * kW);
    Stage stage_u, stage_delta;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, e0 = (task % blocks) * kW;
      const int nc = static_cast<int>(std::min<int64_t>(kW, g.dim - e0));
      std::fill(y.begin(), y.end(), 0.f);
      for (int64_t k = 0; k < g.K; ++k) {
        scan_block(g, dirs[k], b, e0, nc, stage_u, stage_delta, y.data(), dt.data(), du.data());
        if (g.merge == Merge::kNone) {
          write_out(g, y.data(), 1.f, b, e0, nc, g.out + (b * g.K + k) * g.seqlen * g.dim);
          std::fill(y.begin(), y.end(), 0.f);
        }
      }
      if (g.merge != Merge::kNone) {
        const float scale = g.merge == Merge::kMean ? 1.f / static_cast<float>(g.K) : 1.f;
        write_out(g, y.data(), scale, b, e0, nc, g.out + b * g.seqlen * g.dim);
      }
    }
  });
}

Strided strided(const at::Tensor& x) {
  return Strided{x.data_ptr(), x.scalar_type() == at::kChar, x.stride(0), x.stride(1), x.stride(2)};
}

bool is_cpu_float(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

// u[k] or delta[k]: float32 without scales, int8 with them (the (K, S_in) scale checked by the caller)
void check_value(const at::Tensor& x, bool scaled, const char* name, int64_t k, at::IntArrayRef shape) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": ", name, "[", k, "] must be a CPU tensor");
  TORCH_CHECK(x.sizes() == shape, kOp, ": ", name, "[", k, "] must be (batch, d_inner, positions) = ", shape,
              ", got ", x.sizes());
  if (scaled) {
    TORCH_CHECK(x.scalar_type() == at::kChar, kOp, ": a scale goes with int8 ", name, " only, ", name, "[", k,
                "] is ", x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() != at::kChar, kOp, ": int8 ", name, " needs its scales (K, positions)");
    TORCH_CHECK(x.scalar_type() == at::kFloat, kOp, ": ", name, "[", k, "] must be float32 or int8, got ",
                x.scalar_type());
  }
}

// a (K, n) float32 tensor (D, delta_bias, scales), contiguous, or null
const float* parameter(std::vector<at::Tensor>& held, const std::optional<at::Tensor>& t, const char* name,
                       int64_t K, int64_t n) {
  if (!t) return nullptr;
  TORCH_CHECK(is_cpu_float(*t) && t->dim() == 2 && t->size(0) == K && t->size(1) == n, kOp, ": ", name,
              " must be a float32 CPU tensor (", K, ", ", n, "), got ", t->sizes());
  held.push_back(t->contiguous());
  return held.back().data_ptr<float>();
}

// an int64 (K, S) index tensor, contiguous, its values in [-1, limit)
const int64_t* index(std::vector<at::Tensor>& held, const at::Tensor& t, const char* name, int64_t limit) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2, kOp, ": ", name,
              " must be an int64 CPU tensor (K, steps)");
  held.push_back(t.contiguous());
  const at::Tensor& c = held.back();
  if (c.numel() > 0) {
    const int64_t lo = c.min().item<int64_t>(), hi = c.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < limit, kOp, ": ", name, " values must lie in [-1, ", limit, "), got [", lo, ", ",
                hi, "]");
  }
  return c.data_ptr<int64_t>();
}

at::Tensor multi_scan(at::TensorList u, at::TensorList delta, const at::Tensor& A, at::TensorList B, at::TensorList C,
                      const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& delta_bias,
                      const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& in_index,
                      const at::Tensor& out_index, const std::optional<at::Tensor>& u_scale,
                      const std::optional<at::Tensor>& delta_scale, int64_t seqlen, bool delta_softplus,
                      c10::string_view merge) {
  const int64_t K = static_cast<int64_t>(u.size());
  TORCH_CHECK(K >= 1 && delta.size() == u.size() && B.size() == u.size() && C.size() == u.size(), kOp,
              ": u, delta, B and C need one tensor per direction, got ", u.size(), ", ", delta.size(), ", ",
              B.size(), ", ", C.size());
  TORCH_CHECK(merge == "sum" || merge == "mean" || merge == "none", kOp, ": merge must be sum, mean or none, got ",
              std::string(merge));
  TORCH_CHECK(u[0].dim() == 3, kOp, ": u[k] must be (batch, d_inner, positions), got ", u[0].sizes());
  TORCH_CHECK(seqlen >= 0, kOp, ": seqlen must be >= 0, got ", seqlen);
  const auto shape = u[0].sizes();
  const int64_t batch = shape[0], dim = shape[1], s_in = shape[2];
  TORCH_CHECK(is_cpu_float(A) && A.dim() == 3 && A.size(0) == K && A.size(1) == dim, kOp,
              ": A must be a float32 CPU tensor (", K, ", ", dim, ", d_state), got ", A.sizes());
  const int64_t ns = A.size(2);
  std::vector<at::Tensor> held;
  const float* us = parameter(held, u_scale, "u_scale", K, s_in);  // int8 u / delta: (K, S_in) scales
  const float* ds = parameter(held, delta_scale, "delta_scale", K, s_in);
  TORCH_CHECK(out_index.dim() == 2 && out_index.size(0) == K, kOp, ": out_index must be (", K, ", steps), got ",
              out_index.sizes());
  const int64_t steps = out_index.size(1);
  const int64_t* out_idx = index(held, out_index, "out_index", seqlen);
  const int64_t* in_idx = nullptr;
  if (in_index) {
    TORCH_CHECK(in_index->sizes() == out_index.sizes(), kOp, ": in_index must have out_index's shape ",
                out_index.sizes(), ", got ", in_index->sizes());
    in_idx = index(held, *in_index, "in_index", s_in);
  } else {
    TORCH_CHECK(s_in == steps, kOp, ": inputs in scan order (no in_index) need ", steps, " positions, got ", s_in);
  }
  Strided zs{nullptr, false, 0, 0, 0};
  if (z) {
    TORCH_CHECK(is_cpu_float(*z) && z->dim() == 3 && z->size(0) == batch && z->size(1) == dim && z->size(2) == seqlen,
                kOp, ": z must be a float32 CPU tensor (", batch, ", ", dim, ", ", seqlen, "), got ", z->sizes());
    zs = strided(*z);
  }
  const float* Dp = parameter(held, D, "D", K, dim);
  const float* bias = parameter(held, delta_bias, "delta_bias", K, dim);
  const at::Tensor At = A.transpose(1, 2).contiguous();  // (K, n, d)
  // per step: where B and C are read, and the y slot (the token, or the spare slot seqlen)
  std::vector<int64_t> pos(K * steps), slot(K * steps);
  for (int64_t i = 0; i < K * steps; ++i) {
    const int64_t p = in_idx ? in_idx[i] : i % std::max<int64_t>(steps, 1);
    pos[i] = std::max<int64_t>(p, 0);
    slot[i] = (p < 0 || out_idx[i] < 0) ? seqlen : out_idx[i];
  }
  std::vector<Direction> dirs(K);
  for (int64_t k = 0; k < K; ++k) {
    check_value(u[k], us != nullptr, "u", k, shape);
    check_value(delta[k], ds != nullptr, "delta", k, shape);
    for (const at::Tensor* t : {&B[k], &C[k]}) {
      TORCH_CHECK(is_cpu_float(*t) && t->dim() == 3 && t->size(0) == batch && t->size(1) == ns && t->size(2) == s_in,
                  kOp, ": B[", k, "] and C[", k, "] must be float32 CPU tensors (", batch, ", ", ns, ", ", s_in,
                  "), got ", t->sizes());
    }
    Direction& d = dirs[k];
    d.u = strided(u[k]);
    d.delta = strided(delta[k]);
    d.u_scale = us ? us + k * s_in : nullptr;
    d.delta_scale = ds ? ds + k * s_in : nullptr;
    d.A_t = At.data_ptr<float>() + k * ns * dim;
    d.B = B[k].data_ptr<float>();
    d.C = C[k].data_ptr<float>();
    d.sB0 = B[k].stride(0), d.sB1 = B[k].stride(1), d.sB2 = B[k].stride(2);
    d.sC0 = C[k].stride(0), d.sC1 = C[k].stride(1), d.sC2 = C[k].stride(2);
    d.D = Dp ? Dp + k * dim : nullptr;
    d.bias = bias ? bias + k * dim : nullptr;
    d.in = in_idx ? in_idx + k * steps : nullptr;
    d.pos = pos.data() + k * steps;
    d.slot = slot.data() + k * steps;
    if (steps > 0) {
      d.dpos = steps > 1 ? d.pos[1] - d.pos[0] : 0;
      d.dslot = steps > 1 ? d.slot[1] - d.slot[0] : 0;
      d.affine = !d.in || std::all_of(d.in, d.in + steps, [](int64_t p) { return p >= 0; });
      for (int64_t s = 0; s < steps && d.affine; ++s) {
        d.affine = d.pos[s] == d.pos[0] + s * d.dpos && d.slot[s] == d.slot[0] + s * d.dslot;
      }
    }
  }
  const Merge m = merge == "sum" ? Merge::kSum : merge == "mean" ? Merge::kMean : Merge::kNone;
  const auto opts = u[0].options().dtype(at::kFloat);
  at::Tensor out = m == Merge::kNone ? at::empty({batch, K, seqlen, dim}, opts) : at::empty({batch, seqlen, dim}, opts);
  const Problem g{batch, dim, s_in, steps, seqlen, ns, K, delta_softplus, m, zs, out.data_ptr<float>()};
  if (batch * dim * seqlen > 0) run(g, dirs);
  return m == Merge::kNone ? out.transpose(2, 3) : out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) { m.impl("multi_scan", &multi_scan); }
