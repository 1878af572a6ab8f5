// VQ-weight GEMM on CUDA: the kernel of vmq::vq_linear.
//
// Each block computes 64 x 64 outputs with 4 warps (each 32 x 32: 2 x 4 mma tiles of
// m16n8k16, fp16 inputs, fp32 accumulation). Per step of 32 input features, the block decodes
// its 64 weight rows from their codes: codeword codes[n, k / dim] of the row's codebook, element
// k % dim, times the row's scale; the decoded tile goes to shared memory as fp16 and straight
// into the tensor cores (no weight matrix in global memory). Activations (fp32 or fp16) are
// converted to fp16 on their way into shared memory. Rows are padded to 40 halves (80 bytes) so
// that fragment loads are free of bank conflicts.
#include <cuda_fp16.h>

#include "cuda/launchers.h"

namespace vmq::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32, kLds = kBK + 8, kThreads = 128;

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the bindings refuse devices below sm_80
#endif
}

__global__ void __launch_bounds__(kThreads) vq_gemm_kernel(VqGemmArgs a) {
  __shared__ __align__(16) __half xs[kBM * kLds];
  __shared__ __align__(16) __half ws[kBN * kLds];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const __half* cb = reinterpret_cast<const __half*>(a.codebook);
  const __half* sc = reinterpret_cast<const __half*>(a.scale);
  float acc[2][4][4] = {};

  for (int64_t k0 = 0; k0 < a.k; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t row = m0 + r, col = k0 + kk;
      float v = 0.f;
      if (row < a.m && col < a.k) {
        v = a.x_half ? __half2float(static_cast<const __half*>(a.x)[row * a.k + col])
                     : static_cast<const float*>(a.x)[row * a.k + col];
      }
      xs[r * kLds + kk] = __float2half(v);
    }
    for (int e = tid; e < kBN * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t row = n0 + r, col = k0 + kk;
      float v = 0.f;
      if (row < a.n && col < a.k) {
        const int64_t j = col / a.dim, i = col - j * a.dim, grp = row / a.rows_per_group;
        const int64_t code = a.codes[row * a.cols + j];
        v = __half2float(cb[(grp * a.size + code) * a.dim + i]);
        if (sc) v *= __half2float(sc[row]);
      }
      ws[r * kLds + kk] = __float2half(v);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const __half* base = xs + (wm * 32 + mi * 16 + g) * kLds + ks + 2 * t;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(base);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kLds);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kLds + 8);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const __half* base = ws + (wn * 32 + ni * 8 + g) * kLds + ks + 2 * t;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(base);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(base + 8);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_f16(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + wm * 32 + mi * 16 + g + half * 8;
      if (row >= a.m) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = n0 + wn * 32 + ni * 8 + 2 * t + e;
          if (col < a.n) a.out[row * a.n + col] = acc[mi][ni][half * 2 + e] + (a.bias ? a.bias[col] : 0.f);
        }
      }
    }
  }
}

}  // namespace

cudaError_t launch_vq_gemm(const VqGemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.n + kBN - 1) / kBN), static_cast<unsigned>((a.m + kBM - 1) / kBM));
  vq_gemm_kernel<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace vmq::cuda
