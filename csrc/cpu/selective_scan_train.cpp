// Selective scan forward and backward on CPU, fp32, for training vmq's reference models.
//
// Core recurrence only (softplus, the D skip and the z gate stay in PyTorch autograd):
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,   y_t = <h_t, C_t>
// Layouts: u, delta, y: (batch, d_inner, seqlen); A: (d_inner, d_state);
//          B, C: (batch, seqlen, d_state)   (token-major, as x_proj produces them).
// The backward recomputes the states of one sequence into a small local buffer, so nothing
// of size batch x d_inner x seqlen x d_state is ever stored. The per-step arithmetic is that of
// cuda/scan_train_step.h, which the CUDA kernel runs too.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <tuple>
#include <vector>

// the recurrence's inner sums may be reassociated and vectorised (the file's historical flags)
#pragma GCC push_options
#pragma GCC optimize("fast-math")

// after the pragma: its inline steps are compiled (and inlined) like the loops here
#include "cuda/scan_train_step.h"

namespace {

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C) {
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan_train: CPU tensors expected");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "selective_scan_train: float32 expected");
    TORCH_CHECK(t->is_contiguous(), "selective_scan_train: contiguous tensors expected");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, d_inner, seqlen)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A must be (d_inner, d_state)");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == u.size(2) && B.size(2) == A.size(1),
              "B must be (batch, seqlen, d_state)");
  TORCH_CHECK(C.sizes() == B.sizes(), "C must be (batch, seqlen, d_state)");
}

}  // namespace

template <int kNs>
at::Tensor scan_fwd_impl(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  const int64_t ns = kNs > 0 ? kNs : A.size(1);
  auto y = at::empty_like(u);
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = B.data_ptr<float>(), *pC = C.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hv(ns), av(len * ns);
    float hfix[kNs > 0 ? kNs : 1];
    float* __restrict h = kNs > 0 ? hfix : hv.data();
    float* __restrict a = av.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / dim, e = i % dim;
      const float* Ae = pA + e * ns;
      const float* ui = pu + i * len;
      const float* di = pd + i * len;
      float* yi = py + i * len;
      // decay factors of the whole sequence first: one flat, vectorisable exp loop
      for (int64_t t = 0; t < len; ++t)
        for (int64_t n = 0; n < ns; ++n) a[t * ns + n] = di[t] * Ae[n];
      for (int64_t k = 0; k < len * ns; ++k) a[k] = std::exp(a[k]);
      std::fill(h, h + ns, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float du = di[t] * ui[t];
        const float* Bt = pB + (b * len + t) * ns;
        const float* Ct = pC + (b * len + t) * ns;
        yi[t] = vmq::scan_train::forward_step<kNs>(h, a + t * ns, du, Bt, Ct, static_cast<int>(ns));
      }
    }
  });
  return y;
}

template <int kNs>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_impl(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& gy) {
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  const int64_t ns = kNs > 0 ? kNs : A.size(1);
  auto gu = at::empty_like(u), gd = at::empty_like(delta);
  auto gB = at::zeros_like(B), gC = at::zeros_like(C);
  auto gA_part = at::zeros({batch, dim, ns}, A.options());
  const float *pu = u.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pA = A.data_ptr<float>();
  const float *pB = B.data_ptr<float>(), *pC = C.data_ptr<float>(), *pgy = gy.data_ptr<float>();
  float *pgu = gu.data_ptr<float>(), *pgd = gd.data_ptr<float>(), *pgB = gB.data_ptr<float>();
  float *pgC = gC.data_ptr<float>(), *pgA = gA_part.data_ptr<float>();
  // One batch row per task: gB[b], gC[b] and gA_part[b] are then written by one thread only.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hs(len * ns), as(len * ns), gv(ns), gAv(ns);
    float gfix[kNs > 0 ? kNs : 1], gAfix[kNs > 0 ? kNs : 1];
    float* __restrict g = kNs > 0 ? gfix : gv.data();
    float* __restrict gA = kNs > 0 ? gAfix : gAv.data();
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t e = 0; e < dim; ++e) {
        const int64_t i = b * dim + e;
        const float* Ae = pA + e * ns;
        const float *ui = pu + i * len, *di = pd + i * len, *gyi = pgy + i * len;
        float* gAi = pgA + i * ns;
        // recompute the decay factors and states of this sequence
        for (int64_t t = 0; t < len; ++t)
          for (int64_t n = 0; n < ns; ++n) as[t * ns + n] = di[t] * Ae[n];
        for (int64_t k = 0; k < len * ns; ++k) as[k] = std::exp(as[k]);
        for (int64_t t = 0; t < len; ++t) {
          const float du = di[t] * ui[t];
          const float* Bt = pB + (b * len + t) * ns;
          const float* at_ = as.data() + t * ns;
          float* ht = hs.data() + t * ns;
          if (t == 0) {
            for (int64_t n = 0; n < ns; ++n) ht[n] = du * Bt[n];
          } else {
            const float* hp = ht - ns;
            for (int64_t n = 0; n < ns; ++n) ht[n] = at_[n] * hp[n] + du * Bt[n];
          }
        }
        std::fill(g, g + ns, 0.f);
        std::fill(gA, gA + ns, 0.f);
        for (int64_t t = len - 1; t >= 0; --t) {
          const float d = di[t], ut = ui[t];
          const int64_t bt = (b * len + t) * ns;
          const auto s = vmq::scan_train::backward_step<kNs, true>(
              g, gA, pgB + bt, pgC + bt, as.data() + t * ns, hs.data() + t * ns,
              t > 0 ? hs.data() + (t - 1) * ns : nullptr, Ae,
              pB + bt, pC + bt, d, d * ut, gyi[t], static_cast<int>(ns));
          pgd[i * len + t] = vmq::scan_train::grad_delta(s, ut);
          pgu[i * len + t] = vmq::scan_train::grad_u(s, d);
        }
        for (int64_t n = 0; n < ns; ++n) gAi[n] = gA[n];
      }
    }
  });
  return std::make_tuple(gu, gd, gA_part.sum(0), gB, gC);
}

at::Tensor scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C) {
  check_inputs(u, delta, A, B, C);
  return A.size(1) == 16 ? scan_fwd_impl<16>(u, delta, A, B, C) : scan_fwd_impl<0>(u, delta, A, B, C);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const at::Tensor& gy_in) {
  check_inputs(u, delta, A, B, C);
  auto gy = gy_in.contiguous();
  TORCH_CHECK(gy.sizes() == u.sizes(), "grad_y must be (batch, d_inner, seqlen)");
  return A.size(1) == 16 ? scan_bwd_impl<16>(u, delta, A, B, C, gy) : scan_bwd_impl<0>(u, delta, A, B, C, gy);
}

#pragma GCC pop_options

TORCH_LIBRARY_IMPL(vmq, CPU, m) {
  m.impl("scan_train_fwd", &scan_fwd);
  m.impl("scan_train_bwd", &scan_bwd);
}
