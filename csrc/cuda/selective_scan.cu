// Fused bidirectional selective scan on CUDA (inference): the kernel of vmq::bidirectional_scan.
//
// Same arithmetic as the CPU kernel and the twin vmq.ops.scan.bidirectional_scan_quantized_ref:
//   dt = softplus(delta) (optional);  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t;  y_t = <h_t, C_t> + D u_t
//   out = (y_fwd + y_bwd) [/ 2] * silu(z)
// u and delta may be int8 with one scale per token, or fp16 / fp32; B, C and z fp16 or fp32.
//
// B and C are staged zero-padded to the kernel's kMaxN states: with A = 0 and B = C = 0 a padded
// state stays 0 and adds 0 to y, so the state loop runs without a per-state guard. (Only a
// non-finite dt or dt * u, which already makes every real state non-finite, can turn an infinite
// output into NaN through the padding.) Grid: channel blocks on x, samples on y (at most 65535,
// checked by the binding).
//
// One thread per (batch, channel), its state in registers. A block holds 128 channels of one
// sample; the B_t and C_t of 32 tokens at a time are staged in shared memory (they are shared by
// every channel). The forward direction writes y_fwd into the token-major output; the backward
// direction walks t = L-1 .. 0 by index (nothing is flipped or copied), adds y_bwd, halves and
// gates, and writes the final value over it. Only the gated output is stored.
#include <cuda_fp16.h>

#include "cuda/launchers.h"

namespace vmq::cuda {
namespace {

constexpr int kThreads = 128, kChunk = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ float load(const ScanTensor& x, int64_t i0, int64_t i1, int64_t i2) {
  return to_float(static_cast<const T*>(x.p)[i0 * x.s0 + i1 * x.s1 + i2 * x.s2]);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }

// one direction over all tokens for channel e of sample b; adds into out (first: stores)
template <typename TV, typename TF, int kMaxN>
__device__ void run_direction(const ScanArgs& a, const ScanDirection& d, int64_t b, int64_t e, bool active,
                              bool reverse, float* bc) {
  const int ns = static_cast<int>(a.d_state);
  float h[kMaxN], A[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    h[n] = 0.f;
    A[n] = (active && n < ns) ? d.A[e * ns + n] : 0.f;
  }
  const float Dv = (active && d.D) ? d.D[e] : 0.f;
  for (int64_t c0 = 0; c0 < a.len; c0 += kChunk) {
    const int steps = static_cast<int>((a.len - c0 < kChunk ? a.len - c0 : kChunk));
    __syncthreads();  // the previous chunk's B, C are consumed
    for (int i = threadIdx.x; i < steps * kMaxN; i += blockDim.x) {
      const int s = i / kMaxN, n = i % kMaxN;
      const int64_t t = reverse ? a.len - 1 - (c0 + s) : c0 + s;
      bc[s * 2 * kMaxN + n] = n < ns ? load<TF>(d.B, b, n, t) : 0.f;
      bc[s * 2 * kMaxN + kMaxN + n] = n < ns ? load<TF>(d.C, b, n, t) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int s = 0; s < steps; ++s) {
      const int64_t t = reverse ? a.len - 1 - (c0 + s) : c0 + s;
      float u = load<TV>(d.u, b, e, t), dt = load<TV>(d.delta, b, e, t);
      if (d.u_scale) u *= d.u_scale[t];
      if (d.delta_scale) dt *= d.delta_scale[t];
      if (a.softplus) dt = softplus(dt);
      const float du = dt * u;
      const float* Bt = bc + s * 2 * kMaxN;
      float y = Dv * u;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {  // padded states: A = B = C = 0, h stays 0
        h[n] = __expf(dt * A[n]) * h[n] + du * Bt[n];
        y += h[n] * Bt[kMaxN + n];
      }
      float* o = a.out + (b * a.len + t) * a.dim + e;
      if (!reverse) {
        *o = y;
      } else {
        float v = *o + y;
        if (a.divide_out) v *= 0.5f;
        if (a.z.p) {
          const float zv = load<TF>(a.z, b, e, t);
          v *= zv / (1.f + __expf(-zv));
        }
        *o = v;
      }
    }
  }
}

// (blocks per SM: 7 with 16 states, 3 with 64; without the bound the unguarded state loop keeps
// all of B_t, C_t in registers at 64 states and drops to 2 blocks)
template <typename TV, typename TF, int kMaxN>
__global__ void __launch_bounds__(kThreads, kMaxN > 16 ? 3 : 7) bidirectional_scan_kernel(ScanArgs a) {
  __shared__ __align__(16) float bc[kChunk * 2 * kMaxN];
  const int64_t b = blockIdx.y, e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = e < a.dim;
  run_direction<TV, TF, kMaxN>(a, a.fwd, b, e, active, false, bc);
  run_direction<TV, TF, kMaxN>(a, a.bwd, b, e, active, true, bc);
}

#if !defined(__CUDACC_RTC__)  // host code (NVRTC compiles the kernels only)
template <typename TV, typename TF>
cudaError_t launch_typed(const ScanArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.dim + kThreads - 1) / kThreads), static_cast<unsigned>(a.batch));
  if (a.d_state <= 16) {
    bidirectional_scan_kernel<TV, TF, 16><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.d_state <= kScanMaxState) {
    bidirectional_scan_kernel<TV, TF, kScanMaxState><<<grid, kThreads, 0, stream>>>(a);
  } else {
    return cudaErrorNotSupported;  // the binding refuses d_state > kScanMaxState
  }
  return cudaGetLastError();
}
#endif

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launcher (NVRTC compiles the kernels only)
cudaError_t launch_bidirectional_scan(const ScanArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.dim == 0 || a.len == 0) return cudaSuccess;
  // cudaErrorNotSupported: combinations no kernel is compiled for, which the binding refuses first
  if (a.batch > 65535) return cudaErrorNotSupported;
  const bool half = a.float_type == ScanType::kHalf;
  switch (a.value_type) {
    case ScanType::kFloat:
      return half ? cudaErrorNotSupported : launch_typed<float, float>(a, stream);
    case ScanType::kHalf:
      return half ? launch_typed<__half, __half>(a, stream) : cudaErrorNotSupported;
    case ScanType::kInt8:
      return half ? launch_typed<int8_t, __half>(a, stream) : launch_typed<int8_t, float>(a, stream);
  }
  return cudaErrorNotSupported;
}
#endif

}  // namespace vmq::cuda
