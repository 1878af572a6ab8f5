// K-direction selective scan on CUDA (inference): the kernel of vmq::multi_scan.
//
// Same arithmetic as the CPU kernel and the twin vmq.ops.multi_scan.multi_scan_ref; direction k,
// scan step s, input position p = in_index[k, s] (s without in_index; -1: zero inputs):
//   dt = softplus(delta[k][p] + delta_bias[k]) (optional);  h = exp(dt A[k]) h + dt u[k][p] B[k][p]
//   y = <h, C[k][p]> + D[k] u[k][p]  ->  token out_index[k, s] (dropped when -1)
//   out = sum / mean over k (or each k apart) of y, times silu(z)
// u and delta may be int8 with one scale per direction and position, or fp16 / fp32; B, C and z
// fp16 or fp32. Indices out of range count as -1 (no check on the host: that would synchronise).
//
// The bidirectional kernel (selective_scan.cu) generalised: one thread per (batch, channel), its
// state in registers; a block holds 128 channels of one sample. Per direction, the input
// positions and output tokens of 32 steps at a time are staged in shared memory with their
// B and C (shared by every channel; zero at padding steps, and zero-padded to the kernel's
// kMaxN states, which with A = 0 stay 0 and add 0 to y: see selective_scan.cu). Each thread first
// zeroes its column of the token-major output, every direction adds its y into it (walking its order by
// index: nothing is gathered or copied), and a last pass scales and gates the column. Up to 8
// directions go to one launch (passed by value); more take further launches on the stream.
#include <cuda_fp16.h>

#include "cuda/launchers.h"

namespace vmq::cuda {
namespace {

constexpr int kThreads = 128, kChunk = 32, kDirsPerLaunch = 8;

struct Launch {
  MultiScanDirection dir[kDirsPerLaunch];
  int k0, count;     // directions k0 .. k0 + count - 1
  bool first, last;  // zero the merged output first; scale and gate it last
};

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ float load(const ScanTensor& x, int64_t i0, int64_t i1, int64_t i2) {
  return to_float(static_cast<const T*>(x.p)[i0 * x.s0 + i1 * x.s1 + i2 * x.s2]);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// the input position of step s of direction k: -1 for zero inputs (or out of range)
__device__ __forceinline__ int64_t position(const MultiScanArgs& a, int64_t k, int64_t s) {
  const int64_t p = a.in_index ? a.in_index[k * a.steps + s] : s;
  return (p >= 0 && p < a.positions) ? p : -1;
}

// one direction over all steps for channel e of sample b: adds y into col (the thread's column
// of the token-major output, token t at col[t * dim])
template <typename TV, typename TF, int kMaxN>
__device__ void scan_direction(const MultiScanArgs& a, const MultiScanDirection& d, int64_t k, int64_t b, int64_t e,
                               bool active, float* col, float* bc, int64_t* pos_s, int64_t* tok_s) {
  const int ns = static_cast<int>(a.d_state);
  float h[kMaxN], A[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    h[n] = 0.f;
    A[n] = (active && n < ns) ? d.A[e * ns + n] : 0.f;
  }
  const float Dv = (active && d.D) ? d.D[e] : 0.f;
  const float bias = (active && d.delta_bias) ? d.delta_bias[e] : 0.f;
  for (int64_t c0 = 0; c0 < a.steps; c0 += kChunk) {
    const int steps = static_cast<int>((a.steps - c0 < kChunk ? a.steps - c0 : kChunk));
    __syncthreads();  // the previous chunk's indices, B and C are consumed
    for (int i = threadIdx.x; i < steps; i += blockDim.x) {
      const int64_t p = position(a, k, c0 + i), t = a.out_index[k * a.steps + c0 + i];
      pos_s[i] = p;
      tok_s[i] = (p >= 0 && t >= 0 && t < a.seqlen) ? t : -1;  // padding steps add 0: skipped
    }
    for (int i = threadIdx.x; i < steps * kMaxN; i += blockDim.x) {
      const int s = i / kMaxN, n = i % kMaxN;
      const int64_t p = n < ns ? position(a, k, c0 + s) : -1;
      bc[s * 2 * kMaxN + n] = p >= 0 ? load<TF>(d.B, b, n, p) : 0.f;
      bc[s * 2 * kMaxN + kMaxN + n] = p >= 0 ? load<TF>(d.C, b, n, p) : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int s = 0; s < steps; ++s) {
      const int64_t p = pos_s[s];
      float u = 0.f, dt = bias;
      if (p >= 0) {
        u = load<TV>(d.u, b, e, p);
        float draw = load<TV>(d.delta, b, e, p);
        if (d.u_scale) u *= d.u_scale[p];
        if (d.delta_scale) draw *= d.delta_scale[p];
        dt += draw;
      }
      if (a.softplus) dt = softplus(dt);
      const float du = dt * u;
      const float* Bt = bc + s * 2 * kMaxN;
      float y = Dv * u;
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) {  // padded states: A = B = C = 0, h stays 0
        h[n] = __expf(dt * A[n]) * h[n] + du * Bt[n];
        y += h[n] * Bt[kMaxN + n];
      }
      const int64_t t = tok_s[s];
      if (t >= 0) col[t * a.dim] += y;
    }
  }
}

// (blocks per SM: 8 up to 16 states, 3 with 64; without the bound the unguarded state loop keeps
// more of B_t, C_t in registers and drops below that)
template <typename TV, typename TF, int kMaxN>
__global__ void __launch_bounds__(kThreads, kMaxN > 16 ? 3 : 8) multi_scan_kernel(MultiScanArgs a, Launch l) {
  __shared__ __align__(16) float bc[kChunk * 2 * kMaxN];
  __shared__ int64_t pos_s[kChunk], tok_s[kChunk];
  const int64_t b = blockIdx.y, e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = e < a.dim;
  const bool apart = a.merge == ScanMerge::kNone;
  const int64_t slice = a.seqlen * a.dim;  // one (seqlen, dim) output
  auto column = [&](int64_t k) { return a.out + (apart ? b * a.K + k : b) * slice + e; };
  if (active && l.first && !apart) {
    float* col = column(0);
    for (int64_t t = 0; t < a.seqlen; ++t) col[t * a.dim] = 0.f;
  }
  for (int j = 0; j < l.count; ++j) {
    const int64_t k = l.k0 + j;
    float* col = column(k);
    if (active && apart) {
      for (int64_t t = 0; t < a.seqlen; ++t) col[t * a.dim] = 0.f;
    }
    scan_direction<TV, TF, kMaxN>(a, l.dir[j], k, b, e, active, col, bc, pos_s, tok_s);
  }
  if (!active || !l.last) return;
  const float scale = a.merge == ScanMerge::kMean ? 1.f / static_cast<float>(a.K) : 1.f;
  if (!apart) {
    float* col = column(0);
    for (int64_t t = 0; t < a.seqlen; ++t) {
      float v = col[t * a.dim] * scale;
      if (a.z.p) v *= silu(load<TF>(a.z, b, e, t));
      col[t * a.dim] = v;
    }
  } else if (a.z.p) {
    for (int64_t t = 0; t < a.seqlen; ++t) {
      const float gate = silu(load<TF>(a.z, b, e, t));
      for (int64_t k = 0; k < a.K; ++k) column(k)[t * a.dim] *= gate;
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host code (NVRTC compiles the kernels only)
template <typename TV, typename TF, int kMaxN>
cudaError_t launch_states(const MultiScanArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.dim + kThreads - 1) / kThreads), static_cast<unsigned>(a.batch));
  for (int64_t k0 = 0; k0 < a.K; k0 += kDirsPerLaunch) {
    Launch l{};
    l.k0 = static_cast<int>(k0);
    l.count = static_cast<int>(a.K - k0 < kDirsPerLaunch ? a.K - k0 : kDirsPerLaunch);
    for (int j = 0; j < l.count; ++j) l.dir[j] = a.dirs[k0 + j];
    l.first = k0 == 0;
    l.last = k0 + l.count == a.K;
    multi_scan_kernel<TV, TF, kMaxN><<<grid, kThreads, 0, stream>>>(a, l);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename TV, typename TF>
cudaError_t launch_typed(const MultiScanArgs& a, cudaStream_t stream) {
  if (a.d_state <= 4) return launch_states<TV, TF, 4>(a, stream);  // VMamba's d_state 1
  if (a.d_state <= 16) return launch_states<TV, TF, 16>(a, stream);
  if (a.d_state <= kScanMaxState) return launch_states<TV, TF, kScanMaxState>(a, stream);
  return cudaErrorNotSupported;  // the binding refuses d_state > kScanMaxState
}
#endif

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launcher (NVRTC compiles the kernels only)
cudaError_t launch_multi_scan(const MultiScanArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.dim == 0 || a.seqlen == 0) return cudaSuccess;
  // cudaErrorNotSupported: combinations no kernel is compiled for, which the binding refuses first
  if (a.K < 1 || a.batch > 65535) return cudaErrorNotSupported;
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
