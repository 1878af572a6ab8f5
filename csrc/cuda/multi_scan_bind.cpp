// CUDA binding of vmq::multi_scan: checks, strides and dtypes, then the launcher.
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cuda/binding.h"

namespace {

using vmq::cuda::ScanTensor;
using vmq::cuda::ScanType;

constexpr const char* kOp = "multi_scan";

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

// a float32 (K, n) tensor on ref's device, contiguous, or null
const float* parameter(std::vector<at::Tensor>& held, const std::optional<at::Tensor>& t, const at::Tensor& ref,
                       const char* name, int64_t K, int64_t n) {
  if (!t) return nullptr;
  vmq::cuda::check_cuda(*t, ref, kOp, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == K && t->size(1) == n, kOp, ": ", name,
              " must be float32 (", K, ", ", n, "), got ", t->scalar_type(), " ", t->sizes());
  held.push_back(t->contiguous());
  return held.back().data_ptr<float>();
}

const int64_t* index(std::vector<at::Tensor>& held, const at::Tensor& t, const at::Tensor& ref, const char* name,
                     int64_t K, int64_t steps) {
  vmq::cuda::check_cuda(t, ref, kOp, name);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == K && t.size(1) == steps, kOp, ": ", name,
              " must be int64 (", K, ", ", steps, "), got ", t.scalar_type(), " ", t.sizes());
  held.push_back(t.contiguous());
  return held.back().data_ptr<int64_t>();
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
  const at::Tensor& ref = u[0];
  TORCH_CHECK(ref.is_cuda() && ref.dim() == 3, kOp, ": u[k] must be CUDA tensors (batch, d_inner, positions)");
  TORCH_CHECK(seqlen >= 0, kOp, ": seqlen must be >= 0, got ", seqlen);
  const int64_t batch = ref.size(0), dim = ref.size(1), positions = ref.size(2);
  vmq::cuda::check_cuda(A, ref, kOp, "A");
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.dim() == 3 && A.size(0) == K && A.size(1) == dim, kOp,
              ": A must be float32 (", K, ", ", dim, ", d_state), got ", A.sizes());
  const int64_t ns = A.size(2);
  TORCH_CHECK(ns <= vmq::cuda::kScanMaxState, kOp, ": d_state up to ", vmq::cuda::kScanMaxState,
              " is supported, got ", ns);
  TORCH_CHECK(batch <= 65535, kOp, ": the CUDA kernel takes up to 65535 samples, got ", batch);
  const ScanType value_type = type_of(ref), float_type = type_of(B[0]);
  TORCH_CHECK(float_type != ScanType::kInt8, kOp, ": B and C must be float32 or float16");
  TORCH_CHECK(value_type != ScanType::kFloat || float_type == ScanType::kFloat, kOp,
              ": float32 u and delta go with float32 B, C and z");
  TORCH_CHECK(value_type != ScanType::kHalf || float_type == ScanType::kHalf, kOp,
              ": float16 u and delta go with float16 B, C and z");
  const bool int8 = value_type == ScanType::kInt8;
  TORCH_CHECK(u_scale.has_value() == int8 && delta_scale.has_value() == int8, kOp,
              int8 ? ": int8 u and delta need their scales (K, positions)" : ": scales go with int8 u and delta only");
  const c10::cuda::CUDAGuard guard(ref.device());
  std::vector<at::Tensor> held;
  const float* us = parameter(held, u_scale, ref, "u_scale", K, positions);
  const float* ds = parameter(held, delta_scale, ref, "delta_scale", K, positions);
  const float* Dp = parameter(held, D, ref, "D", K, dim);
  const float* bias = parameter(held, delta_bias, ref, "delta_bias", K, dim);
  held.push_back(A.contiguous());
  const float* Ap = held.back().data_ptr<float>();
  TORCH_CHECK(out_index.dim() == 2 && out_index.size(0) == K, kOp, ": out_index must be (", K, ", steps), got ",
              out_index.sizes());
  const int64_t steps = out_index.size(1);
  vmq::cuda::MultiScanArgs a{};
  a.out_index = index(held, out_index, ref, "out_index", K, steps);
  if (in_index) {
    a.in_index = index(held, *in_index, ref, "in_index", K, steps);
  } else {
    TORCH_CHECK(positions == steps, kOp, ": inputs in scan order (no in_index) need ", steps, " positions, got ",
                positions);
  }
  std::vector<vmq::cuda::MultiScanDirection> dirs(K);
  for (int64_t k = 0; k < K; ++k) {
    for (const at::Tensor* t : {&u[k], &delta[k]}) {
      vmq::cuda::check_cuda(*t, ref, kOp, "u / delta");
      TORCH_CHECK(t->sizes() == ref.sizes(), kOp, ": u[", k, "] and delta[", k, "] must be ", ref.sizes(), ", got ",
                  t->sizes());
      TORCH_CHECK(type_of(*t) == value_type, kOp, ": every u and delta must share one dtype");
    }
    for (const at::Tensor* t : {&B[k], &C[k]}) {
      vmq::cuda::check_cuda(*t, ref, kOp, "B / C");
      TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == ns && t->size(2) == positions, kOp, ": B[", k,
                  "] and C[", k, "] must be (", batch, ", ", ns, ", ", positions, "), got ", t->sizes());
      TORCH_CHECK(type_of(*t) == float_type, kOp, ": B, C and z must share one float dtype");
    }
    dirs[k] = {view(u[k]), view(delta[k]), view(B[k]), view(C[k]),
               us ? us + k * positions : nullptr, ds ? ds + k * positions : nullptr, Ap + k * dim * ns,
               Dp ? Dp + k * dim : nullptr, bias ? bias + k * dim : nullptr};
  }
  if (z) {
    vmq::cuda::check_cuda(*z, ref, kOp, "z");
    TORCH_CHECK(z->dim() == 3 && z->size(0) == batch && z->size(1) == dim && z->size(2) == seqlen &&
                    type_of(*z) == float_type,
                kOp, ": z must be (", batch, ", ", dim, ", ", seqlen, ") in the dtype of B and C");
    a.z = view(*z);
  }
  a.dirs = dirs.data();
  a.value_type = value_type;
  a.float_type = float_type;
  a.batch = batch;
  a.dim = dim;
  a.positions = positions;
  a.steps = steps;
  a.seqlen = seqlen;
  a.d_state = ns;
  a.K = K;
  a.softplus = delta_softplus;
  a.merge = merge == "sum" ? vmq::cuda::ScanMerge::kSum
            : merge == "mean" ? vmq::cuda::ScanMerge::kMean : vmq::cuda::ScanMerge::kNone;
  const auto opts = ref.options().dtype(at::kFloat);
  const bool apart = a.merge == vmq::cuda::ScanMerge::kNone;
  at::Tensor out = apart ? at::empty({batch, K, seqlen, dim}, opts) : at::empty({batch, seqlen, dim}, opts);
  a.out = out.data_ptr<float>();
  vmq::cuda::check_launch(vmq::cuda::launch_multi_scan(a, vmq::cuda::current_stream()), kOp);
  // (batch, [K,] d_inner, seqlen) view of the token-major result
  return apart ? out.transpose(2, 3) : out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) { m.impl("multi_scan", &multi_scan); }
