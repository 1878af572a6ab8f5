// CUDA binding of vmq::scan_train_fwd and vmq::scan_train_bwd: checks, outputs and scratch, then
// the launchers of scan_train.cu.
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "cuda/binding.h"

namespace {

using vmq::cuda::kScanTrainChunk;
using vmq::cuda::kScanTrainMaxState;

// the layouts of the CPU kernel: u, delta (batch, d_inner, seqlen); A (d_inner, d_state);
// B, C (batch, seqlen, d_state); fp32, contiguous, one device
vmq::cuda::ScanTrainArgs check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const char* op) {
  TORCH_CHECK(u.is_cuda(), op, ": u must be a CUDA tensor");
  const std::pair<const at::Tensor*, const char*> inputs[] = {{&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"},
                                                              {&C, "C"}};
  for (const auto& [t, name] : inputs) {
    vmq::cuda::check_cuda(*t, u, op, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), op, ": u and delta must be (batch, d_inner, seqlen), got ",
              u.sizes(), " and ", delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), op, ": A must be (d_inner, d_state), got ", A.sizes());
  TORCH_CHECK(B.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == u.size(2) && B.size(2) == A.size(1), op,
              ": B must be (batch, seqlen, d_state), got ", B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), op, ": C must be (batch, seqlen, d_state), got ", C.sizes());
  TORCH_CHECK(A.size(1) <= kScanTrainMaxState, op, ": d_state up to ", kScanTrainMaxState, " is supported, got ",
              A.size(1));
  TORCH_CHECK(u.size(0) <= 65535, op, ": batch up to 65535 is supported (one grid row per sample), got ",
              u.size(0));
  return {u.data_ptr<float>(), delta.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(),
          C.data_ptr<float>(), u.size(0), u.size(1), u.size(2), A.size(1)};
}

at::Tensor scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C) {
  constexpr const char* kOp = "scan_train_fwd";
  const auto args = check_inputs(u, delta, A, B, C, kOp);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor y = at::empty_like(u);
  vmq::cuda::check_launch(vmq::cuda::launch_scan_train_fwd(args, y.data_ptr<float>(), vmq::cuda::current_stream()),
                          kOp);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const at::Tensor& grad_y) {
  constexpr const char* kOp = "scan_train_bwd";
  const auto args = check_inputs(u, delta, A, B, C, kOp);
  vmq::cuda::check_cuda(grad_y, u, kOp, "grad_y");
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && grad_y.sizes() == u.sizes(), kOp,
              ": grad_y must be float32 (batch, d_inner, seqlen) like u, got ", grad_y.scalar_type(), " ",
              grad_y.sizes());
  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor gy = grad_y.contiguous();
  const int64_t chunks = (args.len + kScanTrainChunk - 1) / kScanTrainChunk;
  at::Tensor ckpt = at::empty({args.batch, chunks, args.d_state, args.dim}, u.options());
  at::Tensor gu = at::empty_like(u), gdelta = at::empty_like(delta);
  at::Tensor gA_part = at::zeros({args.batch, args.d_state, args.dim}, A.options());
  at::Tensor gB = at::zeros_like(B), gC = at::zeros_like(C);  // the kernel adds into them
  vmq::cuda::ScanTrainGrads grads{gy.data_ptr<float>(), ckpt.data_ptr<float>(), gu.data_ptr<float>(),
                                  gdelta.data_ptr<float>(), gA_part.data_ptr<float>(), gB.data_ptr<float>(),
                                  gC.data_ptr<float>()};
  vmq::cuda::check_launch(vmq::cuda::launch_scan_train_bwd(args, grads, vmq::cuda::current_stream()), kOp);
  // dA: the per-sample parts summed over the batch, (d_state, d_inner) -> (d_inner, d_state)
  return std::make_tuple(gu, gdelta, gA_part.sum(0).t().contiguous(), gB, gC);
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) {
  m.impl("scan_train_fwd", &scan_fwd);
  m.impl("scan_train_bwd", &scan_bwd);
}
