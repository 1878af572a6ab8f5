// CUDA binding of vmq::bidirectional_scan: checks, strides and dtypes, then the launcher.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/binding.h"

namespace {

using vmq::cuda::ScanTensor;
using vmq::cuda::ScanType;

constexpr const char* kOp = "bidirectional_scan";

ScanType type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScanType::kFloat;
    case at::kHalf: return ScanType::kHalf;
    case at::kChar: return ScanType::kInt8;
    default: TORCH_CHECK(false, kOp, ": inputs must be float32, float16 or int8, got ", t.scalar_type());
  }
  return ScanType::kFloat;
}

ScanTensor view(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

const float* per_token_scale(std::vector<at::Tensor>& held, const at::Tensor& x, const std::optional<at::Tensor>& s,
                             const char* name) {
  if (x.scalar_type() != at::kChar) {
    TORCH_CHECK(!s.has_value(), kOp, ": a scale goes with int8 ", name, " only");
    return nullptr;
  }
  TORCH_CHECK(s.has_value(), kOp, ": int8 ", name, " needs its per-token scale");
  vmq::cuda::check_cuda(*s, x, kOp, "scale");
  TORCH_CHECK(s->scalar_type() == at::kFloat && s->dim() == 1 && s->size(0) == x.size(2), kOp, ": the scale of ",
              name, " must be float32 (seqlen,)");
  held.push_back(s->contiguous());
  return held.back().data_ptr<float>();
}

vmq::cuda::ScanDirection direction(std::vector<at::Tensor>& held, const at::Tensor& u, const at::Tensor& delta,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                   const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& u_scale,
                                   const std::optional<at::Tensor>& delta_scale, const at::Tensor& ref,
                                   ScanType value_type, ScanType float_type) {
  const int64_t batch = ref.size(0), dim = ref.size(1), len = ref.size(2);
  for (const at::Tensor* t : {&u, &delta}) {
    vmq::cuda::check_cuda(*t, ref, kOp, "u / delta");
    TORCH_CHECK(t->sizes() == ref.sizes(), kOp, ": u and delta must be (batch, d_inner, seqlen) = ", ref.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(type_of(*t) == value_type, kOp, ": u, delta, u_b and delta_b must share one dtype");
  }
  vmq::cuda::check_cuda(A, ref, kOp, "A");
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == dim, kOp,
              ": A must be float32 (d_inner, d_state)");
  const int64_t ns = A.size(1);
  for (const at::Tensor* t : {&B, &C}) {
    vmq::cuda::check_cuda(*t, ref, kOp, "B / C");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == ns && t->size(2) == len, kOp,
                ": B and C must be (batch, d_state, seqlen)");
    TORCH_CHECK(type_of(*t) == float_type, kOp, ": B, C and z must share one float dtype");
  }
  held.push_back(A.contiguous());
  const float* Ap = held.back().data_ptr<float>();
  const float* Dp = nullptr;
  if (D) {
    vmq::cuda::check_cuda(*D, ref, kOp, "D");
    TORCH_CHECK(D->scalar_type() == at::kFloat && D->numel() == dim, kOp, ": D must be float32 (d_inner,)");
    held.push_back(D->contiguous());
    Dp = held.back().data_ptr<float>();
  }
  return {view(u), view(delta), view(B), view(C), per_token_scale(held, u, u_scale, "u"),
          per_token_scale(held, delta, delta_scale, "delta"), Ap, Dp};
}

at::Tensor bidirectional_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D, const at::Tensor& u_b,
                              const at::Tensor& delta_b, const at::Tensor& A_b, const at::Tensor& B_b,
                              const at::Tensor& C_b, const std::optional<at::Tensor>& D_b,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& u_scale,
                              const std::optional<at::Tensor>& delta_scale, const std::optional<at::Tensor>& u_b_scale,
                              const std::optional<at::Tensor>& delta_b_scale, bool delta_softplus, bool divide_out) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3, kOp, ": u must be a CUDA tensor (batch, d_inner, seqlen)");
  TORCH_CHECK(u.size(0) <= 65535, kOp, ": the CUDA kernel takes up to 65535 samples (its grid's y), got ", u.size(0));
  TORCH_CHECK(A.dim() == 2 && A.size(1) <= vmq::cuda::kScanMaxState, kOp, ": d_state up to ",
              vmq::cuda::kScanMaxState, " is supported, got ", A.sizes());
  const ScanType value_type = type_of(u), float_type = type_of(B);
  TORCH_CHECK(float_type != ScanType::kInt8, kOp, ": B and C must be float32 or float16");
  TORCH_CHECK(value_type != ScanType::kFloat || float_type == ScanType::kFloat, kOp,
              ": float32 u and delta go with float32 B, C and z");
  TORCH_CHECK(value_type != ScanType::kHalf || float_type == ScanType::kHalf, kOp,
              ": float16 u and delta go with float16 B, C and z");
  const c10::cuda::CUDAGuard guard(u.device());
  std::vector<at::Tensor> held;
  vmq::cuda::ScanArgs a{};
  a.fwd = direction(held, u, delta, A, B, C, D, u_scale, delta_scale, u, value_type, float_type);
  TORCH_CHECK(A_b.sizes() == A.sizes(), kOp, ": A_b must be shaped like A");
  a.bwd = direction(held, u_b, delta_b, A_b, B_b, C_b, D_b, u_b_scale, delta_b_scale, u, value_type, float_type);
  if (z) {
    vmq::cuda::check_cuda(*z, u, kOp, "z");
    TORCH_CHECK(z->sizes() == u.sizes() && type_of(*z) == float_type, kOp,
                ": z must be (batch, d_inner, seqlen) in the dtype of B and C");
    a.z = view(*z);
  }
  a.value_type = value_type;
  a.float_type = float_type;
  a.batch = u.size(0);
  a.dim = u.size(1);
  a.len = u.size(2);
  a.d_state = A.size(1);
  a.softplus = delta_softplus;
  a.divide_out = divide_out;
  at::Tensor out = at::empty({a.batch, a.len, a.dim}, u.options().dtype(at::kFloat));
  a.out = out.data_ptr<float>();
  vmq::cuda::check_launch(vmq::cuda::launch_bidirectional_scan(a, vmq::cuda::current_stream()), kOp);
  return out.transpose(1, 2);  // (batch, d_inner, seqlen) view of the token-major result
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) { m.impl("bidirectional_scan", &bidirectional_scan); }
