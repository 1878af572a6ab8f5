// CUDA bindings of vmq::int8_linear, vmq::w4a8_linear and vmq::quantize_per_token.
//
// Per-token parameters (x_scale, x_zero_point, out_scale, out_zero_point; scale and zero_point)
// are shaped (tokens,) or x.shape[:-1], as the twins require, and all of one kind: the kernels
// read entry row % numel of each.
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <c10/util/accumulate.h>

#include "cuda/binding.h"

namespace {

using vmq::cuda::check_cuda;

// a per-token parameter: shape (tokens,) or x.shape[:-1] (vmq.ops.quantize.check_per_token)
void check_token_shape(const at::Tensor& p, const at::Tensor& x, const char* op, const char* name) {
  const at::IntArrayRef rows = x.sizes().slice(0, x.dim() - 1), tokens = x.sizes().slice(x.dim() - 2, 1);
  TORCH_CHECK(p.sizes() == tokens || p.sizes() == rows, op, ": ", name, " must be (", tokens[0], ",) or ", rows,
              " (one value per token or per row), got ", p.sizes());
}

void check_per_token(const at::Tensor& p, const at::Tensor& x, at::ScalarType dtype, const char* op,
                     const char* name) {
  check_cuda(p, x, op, name);
  TORCH_CHECK(p.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", p.scalar_type());
  check_token_shape(p, x, op, name);
}

at::Tensor int_linear(const char* op, int w_bits, const at::Tensor& x_q, const at::Tensor& x_scale,
                      const at::Tensor& x_zero_point, const at::Tensor& w, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                      const std::optional<at::Tensor>& out_zero_point, int64_t out_bits,
                      const std::optional<at::Tensor>& w_sum_given) {
  TORCH_CHECK(x_q.is_cuda() && x_q.scalar_type() == at::kByte && x_q.dim() >= 2, op,
              ": x_q must be a uint8 CUDA tensor (..., tokens, in_features)");
  const char* w_name = w_bits == 8 ? "w_q" : "w_packed";
  check_cuda(w, x_q, op, w_name);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == (w_bits == 8 ? at::kChar : at::kByte), op, ": ", w_name,
              " must be ", w_bits == 8 ? "int8 (out_features, in_features)" : "uint8 (out_features, in_features / 2)");
  vmq::cuda::check_tensor_cores(x_q, op);
  const int64_t k = x_q.size(-1), n = w.size(0);
  const int64_t m = c10::multiply_integers(x_q.sizes().begin(), x_q.sizes().end() - 1);  // rows, also when k = 0
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(m * k <= kMax32 && n * k <= kMax32 && m * n <= kMax32, op, ": the CUDA kernel indexes with 32-bit "
              "offsets: rows x in_features, out_features x in_features and rows x out_features must each be below "
              "2^31, got rows ", m, ", in_features ", k, ", out_features ", n);
  if (w_bits == 8) {
    TORCH_CHECK(w.size(1) == k, op, ": in_features differ: ", k, " vs ", w.size(1));
  } else {
    TORCH_CHECK(k % 2 == 0 && w.size(1) * 2 == k, op, ": w_packed must hold in_features / 2 bytes per row "
                "(in_features even), got ", w.sizes(), " for in_features ", k);
  }
  check_per_token(x_scale, x_q, at::kFloat, op, "x_scale");
  check_per_token(x_zero_point, x_q, at::kInt, op, "x_zero_point");
  TORCH_CHECK(x_scale.numel() == x_zero_point.numel(), op, ": x_scale and x_zero_point must be of one kind "
              "(per token or per row), got ", x_scale.sizes(), " and ", x_zero_point.sizes());
  check_cuda(w_scale, x_q, op, "w_scale");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == n, op, ": w_scale must be float32 (out_features,)");
  if (bias) {
    check_cuda(*bias, x_q, op, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, op, ": bias must be float32 (out_features,)");
  }
  TORCH_CHECK(out_scale.has_value() == out_zero_point.has_value(), op, ": out_scale and out_zero_point go together");
  if (out_scale) {
    TORCH_CHECK(out_bits >= 2 && out_bits <= 8, op, ": out_bits must be 2..8, got ", out_bits);
    check_per_token(*out_scale, x_q, at::kFloat, op, "out_scale");
    check_per_token(*out_zero_point, x_q, at::kInt, op, "out_zero_point");
    // the epilogue reads all four with one row index: out_zero_point[r] past its end otherwise
    TORCH_CHECK(out_scale->numel() == x_scale.numel() && out_zero_point->numel() == x_scale.numel(), op,
                ": out_scale and out_zero_point must be of x_scale's kind (all per token or all per row), got ",
                out_scale->sizes(), " and ", out_zero_point->sizes(), " with x_scale ", x_scale.sizes());
  }
  if (w_sum_given) {
    check_cuda(*w_sum_given, x_q, op, "w_sum");
    TORCH_CHECK(w_sum_given->scalar_type() == at::kInt && w_sum_given->dim() == 1 && w_sum_given->size(0) == n, op,
                ": w_sum must be the int32 (", n, ",) row sums of the weights, got ", w_sum_given->scalar_type(), " ",
                w_sum_given->sizes());
  }
  const c10::cuda::CUDAGuard guard(x_q.device());
  const at::Tensor xc = x_q.contiguous(), wc = w.contiguous(), xs = x_scale.contiguous(),
                   xz = x_zero_point.contiguous(), ws = w_scale.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor os = out_scale ? out_scale->contiguous() : at::Tensor();
  const at::Tensor oz = out_zero_point ? out_zero_point->contiguous() : at::Tensor();
  at::Tensor w_sum;  // exact row sums of the weights, for the zero-point term: given (cached by the layer) or summed
  if (w_sum_given) {
    w_sum = w_sum_given->contiguous();
  } else if (w_bits == 8) {
    w_sum = wc.sum(1, false, at::kInt);
  } else {
    const at::Tensor p = wc.to(at::kInt);
    w_sum = ((p.bitwise_and(15).bitwise_xor(8) - 8) + (p.bitwise_right_shift(4).bitwise_and(15).bitwise_xor(8) - 8))
                .sum(1, false, at::kInt);
  }
  std::vector<int64_t> shape(x_q.sizes().begin(), x_q.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x_q.options().dtype(out_scale ? at::kByte : at::kFloat));
  vmq::cuda::GemmArgs a{xc.data_ptr<uint8_t>(),
                        wc.data_ptr(),
                        w_sum.data_ptr<int32_t>(),
                        xs.data_ptr<float>(),
                        xz.data_ptr<int32_t>(),
                        ws.data_ptr<float>(),
                        bias ? bc.data_ptr<float>() : nullptr,
                        out_scale ? os.data_ptr<float>() : nullptr,
                        out_scale ? oz.data_ptr<int32_t>() : nullptr,
                        out_scale ? nullptr : out.data_ptr<float>(),
                        out_scale ? out.data_ptr<uint8_t>() : nullptr,
                        m,
                        n,
                        k,
                        xs.numel(),
                        static_cast<int>(out_bits)};
  vmq::cuda::check_launch(vmq::cuda::launch_int_gemm(a, w_bits, vmq::cuda::current_stream()), op);
  return out;
}

at::Tensor int8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_zero_point,
                       int64_t out_bits, const std::optional<at::Tensor>& w_sum) {
  return int_linear("int8_linear", 8, x_q, x_scale, x_zero_point, w_q, w_scale, bias, out_scale, out_zero_point,
                    out_bits, w_sum);
}

at::Tensor w4a8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                       const at::Tensor& w_packed, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& out_zero_point,
                       int64_t out_bits, const std::optional<at::Tensor>& w_sum) {
  return int_linear("w4a8_linear", 4, x_q, x_scale, x_zero_point, w_packed, w_scale, bias, out_scale,
                    out_zero_point, out_bits, w_sum);
}

at::Tensor quantize_per_token(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                              int64_t bits) {
  const char* op = "quantize_per_token";
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() >= 2, op,
              ": x must be a float32 CUDA tensor (..., tokens, channels)");
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be 2..8, got ", bits);
  const int64_t c = x.size(-1);
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // rows, also when c = 0
  check_per_token(scale, x, at::kFloat, op, "scale");
  check_cuda(zero_point, x, op, "zero_point");
  TORCH_CHECK(zero_point.scalar_type() == at::kInt || zero_point.scalar_type() == at::kFloat, op,
              ": zero_point must be int32 or float32, got ", zero_point.scalar_type());
  check_token_shape(zero_point, x, op, "zero_point");
  TORCH_CHECK(zero_point.numel() == scale.numel(), op, ": scale and zero_point must be of one kind (per token or "
              "per row), got ", scale.sizes(), " and ", zero_point.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous(), zc = zero_point.to(at::kFloat).contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  vmq::cuda::check_launch(vmq::cuda::launch_quantize_per_token(xc.data_ptr<float>(), sc.data_ptr<float>(),
                                                               zc.data_ptr<float>(), q.data_ptr<uint8_t>(), m, c,
                                                               sc.numel(), static_cast<int>(bits),
                                                               vmq::cuda::current_stream()),
                          op);
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("quantize_per_token", &quantize_per_token);
}
