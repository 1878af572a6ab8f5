// Helpers shared by the CUDA bindings (host code; includes torch).
#pragma once
// (ATen/cuda/CUDAContext.h is avoided: it pulls in cuSPARSE / cuBLAS headers that a minimal
// toolkit may lack; the stream and guard come from c10 alone.)
#include <atomic>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

namespace vmq::cuda {

// A launcher returns cudaErrorNotSupported for a combination of dtypes or sizes that no kernel is
// compiled for; the bindings' checks refuse those first, so reaching it is a bug in vmq.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorNotSupported, op, ": no CUDA kernel for these dtypes / sizes (the binding should "
              "have refused them: a bug in vmq)");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// the compute capability of a device, 10 * major + minor, queried once per device (every GEMM call asks)
inline int compute_capability(int device, const char* op) {
  constexpr int kCached = 64;
  static std::atomic<int> cached[kCached] = {};  // 0: not asked yet
  if (device >= 0 && device < kCached) {
    const int cc = cached[device].load(std::memory_order_relaxed);
    if (cc != 0) return cc;
  }
  int major = 0, minor = 0;
  check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), op);
  check_launch(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), op);
  const int cc = 10 * major + minor;
  if (device >= 0 && device < kCached) cached[device].store(cc, std::memory_order_relaxed);
  return cc;
}

// the tensor-core kernels use mma.sync shapes of sm_80 and later
inline void check_tensor_cores(const at::Tensor& t, const char* op) {
  const int cc = compute_capability(t.get_device(), op);
  TORCH_CHECK(cc >= 80, op, ": needs a GPU of compute capability 8.0 or newer, this one is ", cc / 10, ".", cc % 10);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == ref.get_device(), op, ": ", name, " must be on ", ref.device());
}

}  // namespace vmq::cuda
