// Fused bidirectional selective scan on CPU (inference): vmq::bidirectional_scan.
//
// Both directions of a bimamba v2 mixer in one call, every tensor in the original time order
// (the backward direction walks t = L-1 .. 0 by index; nothing is flipped or copied):
//   dt = softplus(delta)                 (optional)
//   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = <h_t, C_t> + D u_t      (per direction)
//   out = (y_fwd + y_bwd) [/ 2] * silu(z)
// u and delta may be int8 with one scale per token (value = q * scale[t]).
// The twin is vmq.ops.scan.bidirectional_scan_ref on the dequantized inputs.
//
// Work is split over (batch, blocks of 8 channels); the 8 channels of a block sit in the lanes
// of one vector and B_t, C_t are broadcast. Inputs are read in place through their strides:
// token-major u, delta and z (channel stride 1, how in_proj and dt_proj lay them out) load as
// vectors, other layouts are gathered. The output is token-major (batch, seqlen, d_inner), what
// out_proj takes, returned as a (batch, d_inner, seqlen) view.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/vec_math.h"

namespace {

using vmq::cpu::v8f;
using vmq::cpu::splat;

// A (batch, d_inner, seqlen) float or int8 tensor read through its strides.
struct Strided {
  const void* p;
  bool int8;
  int64_t s0, s1, s2;
};

// One direction's inputs.
struct Direction {
  Strided u, delta;
  const float* u_scale;      // (l,) or null
  const float* delta_scale;  // (l,) or null
  const float* A_t;          // (n, d): A transposed
  const float* B;            // B[b, n, t] at b*sB0 + n*sB1 + t*sB2
  const float* C;
  int64_t sB0, sB1, sB2, sC0, sC1, sC2;
  const float* D;            // (d,) or null
};

struct Problem {
  int64_t batch, dim, len, ns;
  bool softplus, divide_out;
  Strided z;  // z.p null: no gate
  float* out;      // (b, l, d)
};

// channels [e0, e0 + nc) of token t, dequantized when int8 (times scale[t])
inline v8f load_input(const Strided& x, const float* scale, int64_t b, int64_t e0, int64_t t, int nc) {
  const int64_t off = b * x.s0 + e0 * x.s1 + t * x.s2;
  v8f v;
  if (x.s1 == 1) {
    if (x.int8) {
      v = vmq::cpu::load8_i8(static_cast<const int8_t*>(x.p) + off, nc);
    } else {
      const float* f = static_cast<const float*>(x.p) + off;
      v = nc == 8 ? vmq::cpu::load8(f) : vmq::cpu::load_partial(f, nc);
    }
  } else {
    float tmp[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (x.int8) {
      const int8_t* q = static_cast<const int8_t*>(x.p) + off;
      for (int i = 0; i < nc; ++i) tmp[i] = static_cast<float>(q[i * x.s1]);
    } else {
      const float* f = static_cast<const float*>(x.p) + off;
      for (int i = 0; i < nc; ++i) tmp[i] = f[i * x.s1];
    }
    v = vmq::cpu::load8(tmp);
  }
  return scale ? v * splat(scale[t]) : v;
}

// One direction over one block of channels [e0, e0 + nc); adds into out (reverse: t = L-1 .. 0).
// State and decay rates of one block, in registers when the state size is a compile-time constant.
template <int kNs>
struct State {
  v8f h[kNs], A[kNs];
  explicit State(int64_t) {}
};
template <>
struct State<0> {
  std::vector<v8f> hv, Av;
  v8f *h, *A;
  explicit State(int64_t ns) : hv(ns), Av(ns), h(hv.data()), A(Av.data()) {}
};

// One direction over one block of channels [e0, e0 + nc); adds into y (reverse: t = L-1 .. 0).
template <int kNs>
void scan_block(const Problem& g, const Direction& dir, int64_t b, int64_t e0, int nc, bool reverse,
                float* __restrict y, float* __restrict bc) {
  const int64_t ns = kNs > 0 ? kNs : g.ns;
  const int64_t d = g.dim, len = g.len;
  State<kNs> st(ns);
  for (int64_t n = 0; n < ns; ++n) {
    st.h[n] = splat(0.f);
    const float* row = dir.A_t + n * d + e0;
    st.A[n] = nc == 8 ? vmq::cpu::load8(row) : vmq::cpu::load_partial(row, nc);
  }
  const v8f Dv = dir.D ? (nc == 8 ? vmq::cpu::load8(dir.D + e0) : vmq::cpu::load_partial(dir.D + e0, nc))
                       : splat(0.f);
  const float* Bb = dir.B + b * dir.sB0;
  const float* Cb = dir.C + b * dir.sC0;
  for (int64_t s = 0; s < len; ++s) {
    const int64_t t = reverse ? len - 1 - s : s;
    const v8f u = load_input(dir.u, dir.u_scale, b, e0, t, nc);
    v8f dt = load_input(dir.delta, dir.delta_scale, b, e0, t, nc);
    if (g.softplus) dt = vmq::cpu::vsoftplus(dt);
    const v8f du = dt * u;
    // B_t and C_t of this token, gathered once
    for (int64_t n = 0; n < ns; ++n) {
      bc[n] = Bb[n * dir.sB1 + t * dir.sB2];
      bc[ns + n] = Cb[n * dir.sC1 + t * dir.sC2];
    }
    v8f acc = Dv * u;
    for (int64_t n = 0; n < ns; ++n) {
      const v8f a = vmq::cpu::vexp(dt * st.A[n]);
      st.h[n] = a * st.h[n] + du * splat(bc[n]);
      acc += st.h[n] * splat(bc[ns + n]);
    }
    float* yt = y + t * 8;
    vmq::cpu::store8(yt, vmq::cpu::load8(yt) + acc);
  }
}

template <int kNs>
void run(const Problem& g, const Direction& fwd, const Direction* bwd) {
  const int64_t blocks = (g.dim + 7) / 8;
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(g.len * 8), bc(2 * g.ns);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, e0 = (task % blocks) * 8;
      const int nc = static_cast<int>(std::min<int64_t>(8, g.dim - e0));
      std::fill(y.begin(), y.end(), 0.f);
      scan_block<kNs>(g, fwd, b, e0, nc, false, y.data(), bc.data());
      if (bwd) scan_block<kNs>(g, *bwd, b, e0, nc, true, y.data(), bc.data());
      for (int64_t t = 0; t < g.len; ++t) {
        const int64_t off = (b * g.len + t) * g.dim + e0;
        v8f v = vmq::cpu::load8(y.data() + t * 8);
        if (g.divide_out) v = v * splat(0.5f);
        if (g.z.p) v = v * vmq::cpu::vsilu(load_input(g.z, nullptr, b, e0, t, nc));
        if (nc == 8) {
          vmq::cpu::store8(g.out + off, v);
        } else {
          vmq::cpu::store_partial(g.out + off, v, nc);
        }
      }
    }
  });
}

Strided strided(const at::Tensor& x) {
  return Strided{x.data_ptr(), x.scalar_type() == at::kChar, x.stride(0), x.stride(1), x.stride(2)};
}

void check_value(const at::Tensor& x, const std::optional<at::Tensor>& scale, const char* name,
                 at::IntArrayRef shape) {
  TORCH_CHECK(x.device().is_cpu(), "bidirectional_scan: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.sizes() == shape, "bidirectional_scan: ", name, " must be (batch, d_inner, seqlen) = ", shape,
              ", got ", x.sizes());
  if (x.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value(), "bidirectional_scan: int8 ", name, " needs its per-token scale");
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->dim() == 1 &&
                    scale->size(0) == shape[2],
                "bidirectional_scan: the scale of ", name, " must be float32 (seqlen,)");
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "bidirectional_scan: ", name, " must be float32 or int8, got ",
                x.scalar_type());
    TORCH_CHECK(!scale.has_value(), "bidirectional_scan: a scale goes with int8 ", name, " only");
  }
}

Direction make_direction(std::vector<at::Tensor>& held,  // tensors that must outlive the call
                          const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& u_scale, const std::optional<at::Tensor>& delta_scale,
                         const char* which) {
  const auto shape = u.sizes();
  check_value(u, u_scale, "u", shape);
  check_value(delta, delta_scale, "delta", shape);
  const int64_t batch = shape[0], dim = shape[1], len = shape[2];
  TORCH_CHECK(A.device().is_cpu() && A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == dim,
              "bidirectional_scan: A", which, " must be float32 (d_inner, d_state)");
  const int64_t ns = A.size(1);
  for (const auto* t : {&B, &C}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == batch &&
                    t->size(1) == ns && t->size(2) == len,
                "bidirectional_scan: B", which, " and C", which, " must be float32 (batch, d_state, seqlen)");
  }
  if (D.has_value()) {
    TORCH_CHECK(D->device().is_cpu() && D->scalar_type() == at::kFloat && D->dim() == 1 && D->size(0) == dim,
                "bidirectional_scan: D", which, " must be float32 (d_inner,)");
  }
  Direction dir{};
  const at::Tensor At = A.t().contiguous();
  held.push_back(At);
  dir.u = strided(u);
  dir.delta = strided(delta);
  if (u_scale) {
    const at::Tensor s = u_scale->contiguous();
    held.push_back(s);
    dir.u_scale = s.data_ptr<float>();
  }
  if (delta_scale) {
    const at::Tensor s = delta_scale->contiguous();
    held.push_back(s);
    dir.delta_scale = s.data_ptr<float>();
  }
  dir.A_t = At.data_ptr<float>();
  dir.B = B.data_ptr<float>();
  dir.C = C.data_ptr<float>();
  dir.sB0 = B.stride(0), dir.sB1 = B.stride(1), dir.sB2 = B.stride(2);
  dir.sC0 = C.stride(0), dir.sC1 = C.stride(1), dir.sC2 = C.stride(2);
  if (D) {
    const at::Tensor dc = D->contiguous();
    held.push_back(dc);
    dir.D = dc.data_ptr<float>();
  }
  return dir;
}

at::Tensor bidirectional_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D, const at::Tensor& u_b,
                              const at::Tensor& delta_b, const at::Tensor& A_b, const at::Tensor& B_b,
                              const at::Tensor& C_b, const std::optional<at::Tensor>& D_b,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& u_scale,
                              const std::optional<at::Tensor>& delta_scale,
                              const std::optional<at::Tensor>& u_b_scale,
                              const std::optional<at::Tensor>& delta_b_scale, bool delta_softplus, bool divide_out) {
  TORCH_CHECK(u.dim() == 3, "bidirectional_scan: u must be (batch, d_inner, seqlen), got ", u.sizes());
  std::vector<at::Tensor> held;
  const Direction fwd = make_direction(held, u, delta, A, B, C, D, u_scale, delta_scale, "");
  TORCH_CHECK(u_b.sizes() == u.sizes() && A_b.sizes() == A.sizes(),
              "bidirectional_scan: both directions must have the same shapes");
  const Direction bwd = make_direction(held, u_b, delta_b, A_b, B_b, C_b, D_b, u_b_scale, delta_b_scale, "_b");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  Strided zs{nullptr, false, 0, 0, 0};
  if (z) {
    TORCH_CHECK(z->device().is_cpu() && z->scalar_type() == at::kFloat && z->sizes() == u.sizes(),
                "bidirectional_scan: z must be float32 (batch, d_inner, seqlen)");
    zs = strided(*z);
  }
  at::Tensor out = at::empty({batch, len, dim}, u.options().dtype(at::kFloat));
  const Problem g{batch, dim, len, A.size(1), delta_softplus, divide_out, zs, out.data_ptr<float>()};
  if (batch * dim * len > 0) {
    if (g.ns == 16) {
      run<16>(g, fwd, &bwd);
    } else {
      run<0>(g, fwd, &bwd);
    }
  }
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) { m.impl("bidirectional_scan", &bidirectional_scan); }
