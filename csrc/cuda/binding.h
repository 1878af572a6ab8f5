// Helpers shared by the CUDA bindings (host code; includes torch).
#pragma once
// (ATen/cuda/CUDAContext.h is avoided: it pulls in cuSPARSE / cuBLAS headers that a minimal
// toolkit may lack; the stream and guard come from c10 alone.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

namespace vmq::cuda {

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// the tensor-core kernels use mma.sync shapes of sm_80 and later
inline void check_tensor_cores(const at::Tensor& t, const char* op) {
  int major = 0, minor = 0;
  check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()), op);
  check_launch(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, t.get_device()), op);
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, this one is ", major, ".", minor);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == ref.get_device(), op, ": ", name, " must be on ", ref.device());
}

}  // namespace vmq::cuda
