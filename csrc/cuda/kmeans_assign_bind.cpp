// CUDA binding of vmq::kmeans_assign.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/binding.h"

namespace {

constexpr const char* kOp = "kmeans_assign";

std::tuple<at::Tensor, at::Tensor> kmeans_assign(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                                 const at::Tensor& centroids) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 2, kOp,
              ": points must be a float32 CUDA tensor (N, d)");
  const int64_t n = x.size(0), d = x.size(1);
  vmq::cuda::check_cuda(centroids, x, kOp, "centroids");
  TORCH_CHECK(centroids.scalar_type() == at::kFloat && centroids.dim() == 2 && centroids.size(1) == d &&
                  centroids.size(0) >= 1,
              kOp, ": centroids must be float32 (K >= 1, d)");
  TORCH_CHECK(d >= 1 && d <= vmq::cuda::kKmeansMaxDim, kOp, ": the CUDA kernel takes 1 to ",
              vmq::cuda::kKmeansMaxDim, " dimensions, got ", d);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = centroids.contiguous();
  at::Tensor wc;
  int64_t w_stride = 0;
  if (w) {
    vmq::cuda::check_cuda(*w, x, kOp, "w");
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->sizes() == x.sizes(), kOp,
                ": weights must be float32 shaped like the points");
    // a (d,) weight expanded over the points keeps row stride 0: no copy
    wc = (w->stride(1) == 1 && (w->stride(0) == 0 || w->stride(0) == d)) ? *w : w->contiguous();
    w_stride = wc.stride(0);
  }
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kLong)), dist = at::empty({n}, x.options());
  vmq::cuda::check_launch(vmq::cuda::launch_kmeans_assign(xc.data_ptr<float>(), w ? wc.data_ptr<float>() : nullptr,
                                                          w_stride, cc.data_ptr<float>(), n, cc.size(0), d,
                                                          codes.data_ptr<int64_t>(), dist.data_ptr<float>(),
                                                          vmq::cuda::current_stream()),
                          kOp);
  return {codes, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(vmq, CUDA, m) { m.impl("kmeans_assign", &kmeans_assign); }
