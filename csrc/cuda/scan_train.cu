// Training scan on CUDA, fp32: the kernels of vmq::scan_train_fwd and vmq::scan_train_bwd.
//
// Core recurrence only, the arithmetic of scan_train_step.h (shared with the CPU kernel):
//   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = <h_t, C_t>
//
// One thread per (batch, channel) with its state in registers; a block holds 64 channels of one
// sample (small blocks: batch x d_inner threads are all there is to spread over the GPU) and walks
// the sequence in chunks of 16 tokens. Per chunk, B_t and C_t (shared by every
// channel) and the block's u, delta (and grad_y) are staged in shared memory with coalesced loads;
// y (gu, gdelta) go back through the same tiles with coalesced stores.
// Backward: a first forward sweep stores each channel's state at every chunk start (scratch
// checkpoints); then the chunks are walked in reverse: a chunk's states are recomputed from its
// checkpoint into a thread-local buffer, and its steps are run backwards carrying dL/dh in
// registers. gu, gdelta are per thread; dA accumulates per thread over time (summed over the
// batch by the binding); dB_t, dC_t are sums over channels: a warp reduce-scatter by shuffles,
// then one atomicAdd per lane and state group.
#include "cuda/launchers.h"
#include "cuda/scan_train_step.h"

namespace vmq::cuda {
namespace {

constexpr int kThreads = 64, kChunk = kScanTrainChunk, kTileStride = kChunk + 1;
constexpr unsigned kFullMask = 0xffffffffu;

using vmq::scan_train::StepGrads;

// B_t, C_t of the chunk's tokens: bc[s][0][n] = B, bc[s][1][n] = C (coalesced: token-major rows)
template <int kMaxN>
__device__ __forceinline__ void stage_bc(float (*bc)[2][kMaxN], const ScanTrainArgs& a, int64_t b, int64_t t0,
                                         int steps) {
  const int ns = static_cast<int>(a.d_state);
  const int64_t base = (b * a.len + t0) * a.d_state;
  for (int i = threadIdx.x; i < steps * ns; i += kThreads) {
    const int s = i / ns, n = i % ns;
    bc[s][0][n] = a.B[base + i];
    bc[s][1][n] = a.C[base + i];
  }
}

// tile[r][s] = x[b, e0 + r, t0 + s] (zero outside the tensor); 16 consecutive tokens per row
__device__ __forceinline__ void load_tile(float (*tile)[kTileStride], const float* x, const ScanTrainArgs& a,
                                          int64_t b, int64_t e0, int64_t t0, int steps) {
  for (int i = threadIdx.x; i < kThreads * kChunk; i += kThreads) {
    const int r = i / kChunk, s = i % kChunk;
    const int64_t e = e0 + r;
    tile[r][s] = (e < a.dim && s < steps) ? x[(b * a.dim + e) * a.len + t0 + s] : 0.f;
  }
}

__device__ __forceinline__ void store_tile(float* x, const float (*tile)[kTileStride], const ScanTrainArgs& a,
                                           int64_t b, int64_t e0, int64_t t0, int steps) {
  for (int i = threadIdx.x; i < kThreads * kChunk; i += kThreads) {
    const int r = i / kChunk, s = i % kChunk;
    const int64_t e = e0 + r;
    if (e < a.dim && s < steps) x[(b * a.dim + e) * a.len + t0 + s] = tile[r][s];
  }
}

// Forward over the whole sequence: y (when not null) and, when ckpt is not null, the state
// before every chunk, ckpt[b, c, n, e] (zeros for chunk 0).
template <int kMaxN>
__global__ void __launch_bounds__(kThreads) scan_train_fwd_kernel(ScanTrainArgs a, float* y, float* ckpt) {
  __shared__ float bc[kChunk][2][kMaxN];
  __shared__ float tile_u[kThreads][kTileStride], tile_d[kThreads][kTileStride];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.y, e0 = static_cast<int64_t>(blockIdx.x) * kThreads, e = e0 + tid;
  const bool active = e < a.dim;
  const int ns = static_cast<int>(a.d_state);
  const int64_t chunks = (a.len + kChunk - 1) / kChunk;
  float h[kMaxN], A[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    h[n] = 0.f;
    A[n] = (active && n < ns) ? a.A[e * ns + n] : 0.f;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kChunk;
    const int steps = static_cast<int>(a.len - t0 < kChunk ? a.len - t0 : kChunk);
    if (ckpt && active) {
#pragma unroll
      for (int n = 0; n < kMaxN; ++n)
        if (n < ns) ckpt[((b * chunks + c) * ns + n) * a.dim + e] = h[n];
    }
    __syncthreads();  // the previous chunk's tiles are consumed
    stage_bc<kMaxN>(bc, a, b, t0, steps);
    load_tile(tile_u, a.u, a, b, e0, t0, steps);
    load_tile(tile_d, a.delta, a, b, e0, t0, steps);
    __syncthreads();
    for (int s = 0; s < steps; ++s) {
      const float d = tile_d[tid][s], du = d * tile_u[tid][s];
      float dA[kMaxN];
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) dA[n] = n < ns ? __expf(d * A[n]) : 0.f;
      tile_u[tid][s] = vmq::scan_train::forward_step<kMaxN>(h, dA, du, bc[s][0], bc[s][1], ns);  // y over u
    }
    if (y) {
      __syncthreads();
      store_tile(y, tile_u, a, b, e0, t0, steps);
    }
  }
}

// One stage of a warp reduce-scatter: lanes l and l ^ kHalf each keep one half of v[0, 2 kHalf)
// (l's upper half when its bit kHalf is set) and add the partner's copy of that half.
template <int kHalf, int kV>
__device__ __forceinline__ void halve(float (&v)[kV], int lane) {
  const bool upper = (lane & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = upper ? v[i] : v[i + kHalf];
    const float keep = upper ? v[i + kHalf] : v[i];
    v[i] = keep + __shfl_xor_sync(kFullMask, send, kHalf);
  }
  if constexpr (kHalf > 1) halve<kHalf / 2>(v, lane);
}

// The sum over the warp of v[lane % kV] (kV a power of two <= 32): recursive halving, then a
// butterfly over the lane bits above kV. kV - 1 + log2(32 / kV) shuffles.
template <int kV>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[kV], int lane) {
  static_assert(kV >= 2 && kV <= 32 && (kV & (kV - 1)) == 0, "kV: a power of two in [2, 32]");
  halve<kV / 2>(v, lane);
  float r = v[0];
#pragma unroll
  for (int m = kV; m < 32; m *= 2) r += __shfl_xor_sync(kFullMask, r, m);
  return r;
}

// Backward: the chunks in reverse from their checkpoints. Every thread of the block runs the
// same steps (inactive channels with zero inputs), as the warp reductions need all lanes.
template <int kMaxN>
__global__ void __launch_bounds__(kThreads) scan_train_bwd_kernel(ScanTrainArgs a, ScanTrainGrads gr) {
  constexpr int kGroup = kMaxN < 16 ? kMaxN : 16;  // states per warp reduction of dB, dC
  constexpr bool kASmem = kMaxN > 16;  // the channel's A row in shared memory, else in registers
  __shared__ float bc[kChunk][2][kMaxN];
  __shared__ float tile_u[kThreads][kTileStride], tile_d[kThreads][kTileStride], tile_g[kThreads][kTileStride];
  __shared__ float A_smem[kASmem ? kThreads : 1][kMaxN + 1];
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t b = blockIdx.y, e0 = static_cast<int64_t>(blockIdx.x) * kThreads, e = e0 + tid;
  const bool active = e < a.dim;
  const int ns = static_cast<int>(a.d_state);
  const int64_t chunks = (a.len + kChunk - 1) / kChunk;
  float A_reg[kASmem ? 1 : kMaxN], g[kMaxN], gA[kMaxN];
  float* A = kASmem ? A_smem[tid] : A_reg;  // read by this thread only
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    A[n] = (active && n < ns) ? a.A[e * ns + n] : 0.f;
    g[n] = 0.f;
    gA[n] = 0.f;
  }
  // hs[0]: the state before the chunk; hs[s + 1]: the state after its step s
  float hs[(kChunk + 1) * kMaxN];
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int steps = static_cast<int>(a.len - t0 < kChunk ? a.len - t0 : kChunk);
    __syncthreads();  // the previous chunk's tiles are consumed (and its gu, gdelta stored)
    stage_bc<kMaxN>(bc, a, b, t0, steps);
    load_tile(tile_u, a.u, a, b, e0, t0, steps);
    load_tile(tile_d, a.delta, a, b, e0, t0, steps);
    load_tile(tile_g, gr.grad_y, a, b, e0, t0, steps);
    __syncthreads();
    float h[kMaxN];
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      h[n] = (active && n < ns) ? gr.ckpt[((b * chunks + c) * ns + n) * a.dim + e] : 0.f;
      hs[n] = h[n];
    }
    for (int s = 0; s < steps; ++s) {
      const float d = tile_d[tid][s], du = d * tile_u[tid][s];
      float dA[kMaxN];
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) dA[n] = n < ns ? __expf(d * A[n]) : 0.f;
      vmq::scan_train::forward_step<kMaxN>(h, dA, du, bc[s][0], bc[s][1], ns);  // y unused
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) hs[(s + 1) * kMaxN + n] = h[n];
    }
    for (int s = steps - 1; s >= 0; --s) {
      const float d = tile_d[tid][s], ut = tile_u[tid][s], gy = tile_g[tid][s], du = d * ut;
      const float* ht = hs + (s + 1) * kMaxN;
      const float* hp = hs + s * kMaxN;
      const int64_t row = (b * a.len + t0 + s) * a.d_state;  // dB_t, dC_t of this token
      StepGrads sum{0.f, 0.f};
#pragma unroll
      for (int n0 = 0; n0 < kMaxN; n0 += kGroup) {
        if (n0 < ns) {  // uniform over the block
          float dA[kGroup], v[2 * kGroup];  // v: this channel's dB_t, then dC_t, of the group
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            dA[j] = n0 + j < ns ? __expf(d * A[n0 + j]) : 0.f;
            v[j] = 0.f;
            v[kGroup + j] = 0.f;
          }
          const StepGrads part = vmq::scan_train::backward_step<kGroup, false>(
              g + n0, gA + n0, v, v + kGroup, dA, ht + n0, hp + n0, A + n0, bc[s][0] + n0, bc[s][1] + n0, d, du, gy,
              ns - n0);
          sum.gdelta += part.gdelta;
          sum.gdu += part.gdu;
          const float total = warp_reduce_scatter<2 * kGroup>(v, lane);
          const int j = lane % (2 * kGroup), n = n0 + j % kGroup;
          if (lane < 2 * kGroup && n < ns) atomicAdd((j < kGroup ? gr.gB : gr.gC) + row + n, total);
        }
      }
      tile_u[tid][s] = vmq::scan_train::grad_u(sum, d);      // gu over u
      tile_d[tid][s] = vmq::scan_train::grad_delta(sum, ut);  // gdelta over delta
    }
    __syncthreads();
    store_tile(gr.gu, tile_u, a, b, e0, t0, steps);
    store_tile(gr.gdelta, tile_d, a, b, e0, t0, steps);
  }
  if (active) {
#pragma unroll
    for (int n = 0; n < kMaxN; ++n)
      if (n < ns) gr.gA_part[(b * ns + n) * a.dim + e] = gA[n];
  }
}

#if !defined(__CUDACC_RTC__)  // host code (an NVRTC build compiles the kernels only)
dim3 grid_of(const ScanTrainArgs& a) {
  return dim3(static_cast<unsigned>((a.dim + kThreads - 1) / kThreads), static_cast<unsigned>(a.batch));
}

template <int kMaxN>
cudaError_t launch_bwd_typed(const ScanTrainArgs& a, const ScanTrainGrads& gr, cudaStream_t stream) {
  scan_train_fwd_kernel<kMaxN><<<grid_of(a), kThreads, 0, stream>>>(a, nullptr, gr.ckpt);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_train_bwd_kernel<kMaxN><<<grid_of(a), kThreads, 0, stream>>>(a, gr);
  return cudaGetLastError();
}

bool empty(const ScanTrainArgs& a) { return a.batch == 0 || a.dim == 0 || a.len == 0; }
#endif

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launchers
cudaError_t launch_scan_train_fwd(const ScanTrainArgs& a, float* y, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  if (a.d_state <= 4) {
    scan_train_fwd_kernel<4><<<grid_of(a), kThreads, 0, stream>>>(a, y, nullptr);
  } else if (a.d_state <= 16) {
    scan_train_fwd_kernel<16><<<grid_of(a), kThreads, 0, stream>>>(a, y, nullptr);
  } else if (a.d_state <= kScanTrainMaxState) {
    scan_train_fwd_kernel<kScanTrainMaxState><<<grid_of(a), kThreads, 0, stream>>>(a, y, nullptr);
  } else {
    return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

cudaError_t launch_scan_train_bwd(const ScanTrainArgs& a, const ScanTrainGrads& gr, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  if (a.d_state <= 4) return launch_bwd_typed<4>(a, gr, stream);
  if (a.d_state <= 16) return launch_bwd_typed<16>(a, gr, stream);
  if (a.d_state <= kScanTrainMaxState) return launch_bwd_typed<kScanTrainMaxState>(a, gr, stream);
  return cudaErrorNotSupported;
}
#endif

}  // namespace vmq::cuda
