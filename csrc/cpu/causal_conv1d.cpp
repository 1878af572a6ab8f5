// Depthwise causal conv1d + SiLU for both directions of a bimamba v2 mixer, on CPU:
// vmq::bidirectional_conv1d_silu. For x (batch, d_inner, seqlen) and kernels w, w_b (d_inner, k):
//   u[b, c, t]   = silu(bias[c]   + sum_j w[c, j]   x[b, c, t - (k - 1) + j])   (x = 0 before t = 0)
//   u_b[b, c, t] = silu(bias_b[c] + sum_j w_b[c, j] x[b, c, t + (k - 1) - j])   (x = 0 after t = L - 1)
// The second is the official "flip, causal conv, flip back", computed in place: no flipped copies.
// The twin is vmq.ops.conv.bidirectional_conv1d_silu_ref (F.conv1d on the flipped sequence).
//
// x is read through its strides (in_proj's token-major output loads as vectors); both outputs are
// written token-major (batch, seqlen, d_inner), the layout x_proj and the scan read best, and
// returned as (batch, d_inner, seqlen) views. Work: (batch, blocks of kW channels, the vector
// width); a block's inputs are staged once in a zero-padded buffer of kW lanes per token, so the taps need no
// bounds checks.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/vec_math.h"

namespace {

using vmq::cpu::VecF;
constexpr int kW = vmq::cpu::VecTraits<VecF>::kLanes;  // channels per block: 16 with AVX-512, else 8
using vmq::cpu::load_lanes;

struct Kernel {
  const float* w_t;   // (k, d): w transposed
  const float* bias;  // (d,) or null
};

// one direction of one block: out[t] = silu(bias + sum_j w_j xb[t + sign (j - (k - 1))]) for
// sign = +1 (forward, causal) or -1 (backward); xb holds the block's inputs, kW lanes per token,
// with k - 1 zero tokens of padding on each side (xb[-1] .. xb[-(k-1)] and xb[len] ..).
// kK: the kernel size when known at compile time (0: runtime k).
template <int kK>
void conv_block(const Kernel& kn, int64_t dim, int64_t k_rt, int64_t len, int64_t e0, int nc, bool reverse,
                const float* __restrict xb, float* __restrict out, int64_t out_stride) {
  const int64_t k = kK > 0 ? kK : k_rt;
  VecF w[kK > 0 ? kK : 16];
  for (int64_t j = 0; j < k; ++j) w[j] = load_lanes<VecF>(kn.w_t + j * dim + e0, nc);
  const VecF bias = kn.bias ? load_lanes<VecF>(kn.bias + e0, nc) : VecF{};
  // tap j reads token t + off + step * j
  const int64_t off = reverse ? k - 1 : -(k - 1), step = reverse ? -1 : 1;
  for (int64_t t = 0; t < len; ++t) {
    VecF acc = bias;
    const float* x0 = xb + (t + off) * kW;
    for (int64_t j = 0; j < k; ++j) acc += w[j] * vmq::cpu::loadv<VecF>(x0 + step * j * kW);
    const VecF y = vmq::cpu::vsilu(acc);
    vmq::cpu::store_lanes(out + t * out_stride, y, nc);
  }
}

void check_kernel(const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t dim, const char* which) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == dim &&
                  w.size(1) >= 1,
              "bidirectional_conv1d_silu: weight", which, " must be float32 (d_inner, kernel_size), got ",
              w.scalar_type(), " ", w.sizes());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == dim,
                "bidirectional_conv1d_silu: bias", which, " must be float32 (d_inner,)");
  }
}

std::tuple<at::Tensor, at::Tensor> bidirectional_conv1d_silu(const at::Tensor& x, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& weight_b,
                                                             const std::optional<at::Tensor>& bias_b) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3,
              "bidirectional_conv1d_silu: x must be a float32 CPU tensor (batch, d_inner, seqlen)");
  const int64_t batch = x.size(0), dim = x.size(1), len = x.size(2);
  check_kernel(weight, bias, dim, "");
  check_kernel(weight_b, bias_b, dim, "_b");
  TORCH_CHECK(weight_b.size(1) == weight.size(1), "bidirectional_conv1d_silu: both kernels must have one size");
  TORCH_CHECK(weight.size(1) <= 16, "bidirectional_conv1d_silu: kernel_size must be at most 16, got ", weight.size(1));
  const int64_t k = weight.size(1);
  const at::Tensor w_t = weight.t().contiguous(), w_b_t = weight_b.t().contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor(), bbc = bias_b ? bias_b->contiguous() : at::Tensor();
  const Kernel fwd{w_t.data_ptr<float>(), bias ? bc.data_ptr<float>() : nullptr};
  const Kernel bwd{w_b_t.data_ptr<float>(), bias_b ? bbc.data_ptr<float>() : nullptr};
  at::Tensor u = at::empty({batch, len, dim}, x.options()), u_b = at::empty({batch, len, dim}, x.options());
  const float* px = x.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  float *pu = u.data_ptr<float>(), *pub = u_b.data_ptr<float>();
  const int64_t blocks = (dim + kW - 1) / kW;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t pad = k - 1;
    std::vector<float> xbuf((len + 2 * pad) * kW, 0.f);  // zero padding stays zero
    float* xb = xbuf.data() + pad * kW;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, e0 = (task % blocks) * kW;
      const int nc = static_cast<int>(std::min<int64_t>(kW, dim - e0));
      for (int64_t t = 0; t < len; ++t) {
        const float* src = px + b * s0 + e0 * s1 + t * s2;
        float* dst = xb + t * kW;
        if (s1 == 1) {
          vmq::cpu::storev(dst, load_lanes<VecF>(src, nc));
        } else {
          for (int i = 0; i < kW; ++i) dst[i] = i < nc ? src[i * s1] : 0.f;
        }
      }
      const int64_t off = b * len * dim + e0;
      for (const bool reverse : {false, true}) {
        const Kernel& kn = reverse ? bwd : fwd;
        float* dst = (reverse ? pub : pu) + off;
        if (k == 4) {
          conv_block<4>(kn, dim, k, len, e0, nc, reverse, xb, dst, dim);
        } else {
          conv_block<0>(kn, dim, k, len, e0, nc, reverse, xb, dst, dim);
        }
      }
    }
  });
  return {u.transpose(1, 2), u_b.transpose(1, 2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) { m.impl("bidirectional_conv1d_silu", &bidirectional_conv1d_silu); }
