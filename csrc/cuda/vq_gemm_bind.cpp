// CUDA binding of vmq::vq_linear. The codes are not range-checked here: that would synchronise
// with the host on every call (and cannot run inside a CUDA graph). vmq.layers.VQLinear checks
// them once, when it is built or loaded; the kernel reads an out-of-range code as NaN.
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <c10/util/accumulate.h>

#include "cuda/binding.h"

namespace {

constexpr const char* kOp = "vq_linear";

at::Tensor vq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook, int64_t rows_per_group,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf) && x.dim() >= 1, kOp,
              ": x must be a float32 or float16 CUDA tensor (..., in_features)");
  vmq::cuda::check_cuda(codes, x, kOp, "codes");
  vmq::cuda::check_cuda(codebook, x, kOp, "codebook");
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.dim() == 2, kOp, ": codes must be int32 (out_features, cols)");
  TORCH_CHECK(codebook.scalar_type() == at::kHalf && codebook.dim() == 3, kOp,
              ": codebook must be float16 (groups, size, dim)");
  vmq::cuda::check_tensor_cores(x, kOp);
  const int64_t k = x.size(-1), n = codes.size(0), cols = codes.size(1), groups = codebook.size(0),
                size = codebook.size(1), dim = codebook.size(2);
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(m * k <= kMax32 && m * n <= kMax32 && n * cols <= kMax32 && groups * size * dim <= kMax32, kOp,
              ": the CUDA kernel indexes with 32-bit offsets: x, the output, the codes and the codebooks must each "
              "hold fewer than 2^31 values, got x ", x.sizes(), ", codes ", codes.sizes(), ", codebook ",
              codebook.sizes());
  TORCH_CHECK(cols * dim >= k && (cols - 1) * dim < k, kOp, ": ", cols, " codes of dim ", dim, " per row do not cover ",
              k, " inputs");
  TORCH_CHECK(rows_per_group >= 1 && (n + rows_per_group - 1) / rows_per_group == groups, kOp, ": ", n,
              " rows in groups of ", rows_per_group, " need ", (n + rows_per_group - 1) / std::max<int64_t>(rows_per_group, 1),
              " codebooks, got ", groups);
  if (scale) {
    vmq::cuda::check_cuda(*scale, x, kOp, "scale");
    TORCH_CHECK(scale->scalar_type() == at::kHalf && scale->numel() == n, kOp, ": scale must be float16 (out_features,)");
  }
  if (bias) {
    vmq::cuda::check_cuda(*bias, x, kOp, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, kOp, ": bias must be float32 (out_features,)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), cbc = codebook.contiguous();
  const at::Tensor sc = scale ? scale->contiguous() : at::Tensor(), bc = bias ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  vmq::cuda::VqGemmArgs a{xc.data_ptr(),
                          x.scalar_type() == at::kHalf,
                          cc.data_ptr<int32_t>(),
                          reinterpret_cast<const uint16_t*>(cbc.data_ptr()),
                          scale ? reinterpret_cast<const uint16_t*>(sc.data_ptr()) : nullptr,
                          bias ? bc.data_ptr<float>() : nullptr,
                          out.data_ptr<float>(),
                          m, n, k, cols, size, dim, rows_per_group};
  vmq::cuda::check_launch(vmq::cuda::launch_vq_gemm(a, vmq::cuda::current_stream()), kOp);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) { m.impl("vq_linear", &vq_linear); }
