// VQ-weight linear layer on CPU: the CPU kernel of vmq::vq_linear.
//
// The weight is decoded row by row from its codes (codeword codes[n, j] of the row's codebook,
// times the row's fp16 scale, in fp32), then multiplied with one BLAS call; the twin is
// vmq.ops.linear.vq_linear_ref. On CUDA the decode happens tile by tile in shared memory instead.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <vector>

namespace {

at::Tensor vq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook, int64_t rows_per_group,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "vq_linear: x must be a float32 CPU tensor (..., in_features)");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kInt && codes.dim() == 2,
              "vq_linear: codes must be an int32 CPU tensor (out_features, cols)");
  TORCH_CHECK(codebook.device().is_cpu() && codebook.scalar_type() == at::kHalf && codebook.dim() == 3,
              "vq_linear: codebook must be a float16 CPU tensor (groups, size, dim)");
  const int64_t k = x.size(-1), n = codes.size(0), cols = codes.size(1), groups = codebook.size(0),
                size = codebook.size(1), dim = codebook.size(2);
  TORCH_CHECK(cols * dim >= k && (cols - 1) * dim < k, "vq_linear: ", cols, " codes of dim ", dim,
              " per row do not cover ", k, " inputs");
  TORCH_CHECK(rows_per_group >= 1 && (n + rows_per_group - 1) / rows_per_group == groups, "vq_linear: ", n,
              " rows in groups of ", rows_per_group, " do not match ", groups, " codebooks");
  if (scale) {
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kHalf && scale->numel() == n,
                "vq_linear: scale must be float16 (out_features,)");
  }
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->numel() == n,
                "vq_linear: bias must be float32 (out_features,)");
  }
  const at::Tensor cc = codes.contiguous(), cb = codebook.to(at::kFloat).contiguous();
  const at::Tensor sc = scale ? scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor w = at::empty({n, k}, x.options());
  const int32_t* pc = cc.data_ptr<int32_t>();
  const float* pcb = cb.data_ptr<float>();
  const float* ps = scale ? sc.data_ptr<float>() : nullptr;
  float* pw = w.data_ptr<float>();
  bool in_range = true;
  for (int64_t i = 0; i < cc.numel(); ++i) in_range &= pc[i] >= 0 && pc[i] < size;
  TORCH_CHECK(in_range, "vq_linear: codes must index the ", size, " codewords");
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* book = pcb + (r / rows_per_group) * size * dim;
      float* row = pw + r * k;
      for (int64_t col = 0; col < k; ++col) {
        const float v = book[pc[r * cols + col / dim] * dim + col % dim];
        row[col] = ps ? v * ps[r] : v;
      }
    }
  });
  at::Tensor y = at::matmul(x, w.t());
  if (bias) y = y + *bias;
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CPU, m) { m.impl("vq_linear", &vq_linear); }
