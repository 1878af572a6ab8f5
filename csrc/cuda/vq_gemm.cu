// VQ-weight GEMM on CUDA: the kernel of vmq::vq_linear.
//
// Codes are trusted to index the codebook (checking them on the host would synchronise every
// call; vmq.layers.VQLinear checks them when it is built or loaded): an out-of-range code reads
// as NaN, never outside the codebook. Grid: row blocks of 64 on x, output-row blocks of 64 on y
// (at most 65535; each block loops over y, y + gridDim.y, ...). Offsets are 32-bit: the binding
// keeps every operand below 2^31 elements.
//
// Each block computes 64 x 64 outputs with 4 warps (warp_tile.cuh; mma m16n8k16, fp32
// accumulation). Per step of 32 input features, the block decodes its 64 weight rows from their
// codes: codeword codes[n, k / dim] of the row's codebook, element k % dim; the decoded tile goes
// to shared memory and straight into the tensor cores (no weight matrix in global memory). The
// row scale and the bias are applied to the sums: y = scale[n] * sum_k x c + bias[n]. fp16
// activations and the fp16 codewords go in as they are (.f16); fp32 activations are rounded to
// bfloat16 with the codewords (.bf16: fp32's range, |x| beyond 65504 stays finite) rather than
// converted to fp16 on their way into shared memory.
#include <cuda_fp16.h>

#include "cuda/launchers.h"
#include "cuda/warp_tile.cuh"

namespace vmq::cuda {
namespace {

using tile::kBM;
using tile::kBN;
using tile::kThreads;
constexpr int kBK = 32, kLds = tile::kRowBytes / 2;  // 32 values (two 16-value k-steps) per stage, rows of 40
constexpr int kRowsPerPass = kThreads / kBK;              // tile rows staged per pass of the block: 4

// float -> bfloat16 bits, rounded to nearest even (NaN stays NaN)
__device__ __forceinline__ uint16_t bf16_bits(float v) {
  uint16_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
#endif
  return r;
}

// one stage's operand value as the mma takes it: fp16 bits as they are, or bfloat16 bits
template <bool kBf16>
__device__ __forceinline__ uint16_t operand(uint16_t half_bits) {
  return kBf16 ? bf16_bits(__half2float(__ushort_as_half(half_bits))) : half_bits;
}

// The 64 x 64 output tile at rows m0.., output rows n0.. (xs, ws: the block's staging buffers;
// cb_row: the codebook offset of each of the tile's 64 weight rows, in codewords). Thread tid
// stages column tid % 32 of every stage, in rows tid / 32 + 4 i: one division per stage
// finds its codeword and element.
template <bool kBf16>
__device__ __forceinline__ void vq_tile(const VqGemmArgs& a, int m, int n, int k, int m0, int n0, uint16_t* xs,
                                        uint16_t* ws, int* cb_row) {
  const int tid = threadIdx.x, kk = tid % kBK, r0 = tid / kBK;
  const tile::Lane lane;
  const int cols = static_cast<int>(a.cols), size = static_cast<int>(a.size), dim = static_cast<int>(a.dim);
  const int rows_per_group = static_cast<int>(a.rows_per_group < n ? a.rows_per_group : n);  // one group past n
  const uint16_t nan_bits = kBf16 ? 0x7fc0 : 0x7e00;
  if (tid < kBN) cb_row[tid] = n0 + tid < n ? (n0 + tid) / rows_per_group * size : 0;
  __syncthreads();  // (the previous tile read cb_row before its last barrier)
  float acc[2][4][4] = {};

  for (int k0 = 0; k0 < k; k0 += kBK) {
    const int col = k0 + kk;
    const bool in_k = col < k;
    const int j = col / dim, i = col - j * dim;  // codeword j of a row, element i
#pragma unroll 4
    for (int r = r0; r < kBM; r += kRowsPerPass) {
      const int row = m0 + r;
      uint16_t v = 0;
      if (row < m && in_k) {
        v = kBf16 ? bf16_bits(static_cast<const float*>(a.x)[row * k + col])
                  : static_cast<const uint16_t*>(a.x)[row * k + col];
      }
      xs[r * kLds + kk] = v;
    }
#pragma unroll 4
    for (int r = r0; r < kBN; r += kRowsPerPass) {
      const int row = n0 + r;
      uint16_t v = 0;
      if (row < n && in_k) {
        const int code = a.codes[row * cols + j];
        v = static_cast<unsigned>(code) < static_cast<unsigned>(size)
                ? operand<kBf16>(a.codebook[(cb_row[r] + code) * dim + i])
                : nan_bits;
      }
      ws[r * kLds + kk] = v;
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
        for (int ni = 0; ni < 4; ++ni) tile::mma_16816<kBf16>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    __syncthreads();
  }
  tile::for_each_output(acc, m0, n0, m, n, lane, [&](int row, int col, float v) {
    if (a.scale) v *= __half2float(__ushort_as_half(a.scale[col]));
    a.out[row * n + col] = a.bias ? v + a.bias[col] : v;
  });
}

template <bool kBf16>
__global__ void __launch_bounds__(kThreads) vq_gemm_kernel(VqGemmArgs a) {
  __shared__ __align__(16) uint16_t xs[kBM * kLds];
  __shared__ __align__(16) uint16_t ws[kBN * kLds];
  __shared__ int cb_row[kBN];
  const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
  const int n_blocks = (n + kBN - 1) / kBN;
  for (int nb = blockIdx.y; nb < n_blocks; nb += gridDim.y) {
    vq_tile<kBf16>(a, m, n, k, blockIdx.x * kBM, nb * kBN, xs, ws, cb_row);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launcher (NVRTC compiles the kernels only)
cudaError_t launch_vq_gemm(const VqGemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  // rows on x (up to 2^31 - 1 blocks), output rows on y (blocks loop past 65535)
  const int64_t n_blocks = (a.n + kBN - 1) / kBN;
  const dim3 grid(static_cast<unsigned>((a.m + kBM - 1) / kBM), static_cast<unsigned>(n_blocks < 65535 ? n_blocks : 65535));
  if (a.x_half) {
    vq_gemm_kernel<false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    vq_gemm_kernel<true><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}
#endif

}  // namespace vmq::cuda
