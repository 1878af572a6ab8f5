// RMSNorm on CPU: vmq::rms_norm. For x (..., n) and weight (n,):
//   y = x * (1 / sqrt(mean(x^2) + eps)) * weight        fp32, in this order, one pass per row
// The twin is vmq.ops.norm.rms_norm_ref (five PyTorch kernels); the sums differ in order only.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/vec_math.h"

namespace {

using vmq::cpu::VecF;
constexpr int kW = vmq::cpu::VecTraits<VecF>::kLanes;

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "rms_norm: x must be a float32 CPU tensor (..., features)");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                  weight.size(0) == n,
              "rms_norm: weight must be float32 (", n, ",)");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() == 0) return y;
  const float *px = xc.data_ptr<float>(), *pw = wc.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = px + r * n;
      float* yr = py + r * n;
      VecF acc{};
      int64_t i = 0;
      for (; i + kW <= n; i += kW) {
        const VecF v = vmq::cpu::loadv<VecF>(xr + i);
        acc += v * v;
      }
      float ss = 0.f;
      for (int l = 0; l < kW; ++l) ss += acc[l];
      for (; i < n; ++i) ss += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + epsf);
      i = 0;
      for (; i + kW <= n; i += kW) {
        vmq::cpu::storev(yr + i, vmq::cpu::loadv<VecF>(xr + i) * inv * vmq::cpu::loadv<VecF>(pw + i));
      }
      for (; i < n; ++i) yr[i] = xr[i] * inv * pw[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) { m.impl("rms_norm", &rms_norm); }
