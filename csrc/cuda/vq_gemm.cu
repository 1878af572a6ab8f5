// VQ-weight GEMM on CUDA: the kernel of vmq::vq_linear.
//
// Each block computes 64 x 64 outputs with 4 warps (warp_tile.cuh; mma m16n8k16, fp16 inputs,
// fp32 accumulation). Per step of 32 input features, the block decodes
// its 64 weight rows from their codes: codeword codes[n, k / dim] of the row's codebook, element
// k % dim, times the row's scale; the decoded tile goes to shared memory as fp16 and straight
// into the tensor cores (no weight matrix in global memory). Activations (fp32 or fp16) are
// converted to fp16 on their way into shared memory.
#include <cuda_fp16.h>

#include "cuda/launchers.h"
#include "cuda/warp_tile.cuh"

namespace vmq::cuda {
namespace {

using tile::kBM;
using tile::kBN;
using tile::kThreads;
constexpr int kBK = 32, kLds = tile::kRowBytes / 2;  // 32 halves (two 16-half k-steps) per stage, rows of 40 halves

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
  const int tid = threadIdx.x;
  const tile::Lane lane;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
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
      tile::load_fragments(reinterpret_cast<const uint8_t*>(xs), reinterpret_cast<const uint8_t*>(ws), 2 * ks, lane,
                           af, bf);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_f16(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    __syncthreads();
  }
  tile::for_each_output(acc, m0, n0, a.m, a.n, lane, [&](int64_t row, int64_t col, float v) {
    a.out[row * a.n + col] = a.bias ? v + a.bias[col] : v;
  });
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launcher (NVRTC compiles the kernels only)
cudaError_t launch_vq_gemm(const VqGemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.m + kBM - 1) / kBM), static_cast<unsigned>((a.n + kBN - 1) / kBN));
  vq_gemm_kernel<<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}
#endif

}  // namespace vmq::cuda
