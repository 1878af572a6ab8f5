// W8A8 / W4A8 GEMM on the int8 tensor cores (mma.sync m16n8k32, u8 x s8 -> s32) with the fused
// epilogue of vmq.ops.linear.int8_linear_ref: zero-point correction, per-token x per-channel
// scales, bias, and optionally the requantization of the output for the next layer.
//
// Tiles (warp_tile.cuh): 64 x 64 outputs per block of 4 warps, K in stages of 64. Activations
// and weights are staged in shared memory with rows padded to 80 bytes (conflict-free fragments). 4-bit weights
// are unpacked to int8 on their way into shared memory. Partial tiles are zero-filled: a zero
// activation times a zero weight adds nothing, and the zero-point term uses the true row sums.
//
// The integer sum is exact; the epilogue uses correctly rounded operations (__fmul_rn, ...)
// in the twin's order, so the result is bit-identical to int8_linear_ref. (The CUDA sources are
// built without --use_fast_math, whose flush-to-zero would change subnormal results.)
#if !defined(__CUDACC_RTC__)  // host code (NVRTC compiles the kernels only)
#include <algorithm>
#endif

#include "cuda/launchers.h"
#include "cuda/warp_tile.cuh"

namespace vmq::cuda {
namespace {

using tile::kBM;
using tile::kBN;
using tile::kThreads;
constexpr int kBK = 64, kLds = tile::kRowBytes;  // two 32-byte k-steps per stage

__device__ __forceinline__ void mma_u8s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the bindings refuse devices below sm_80
#endif
}

// 16 bytes of a row-major byte matrix (rows x cols), zero outside it; vec: 16-byte aligned rows
__device__ __forceinline__ uint4 load16(const uint8_t* p, int64_t row, int64_t rows, int64_t col, int64_t cols,
                                        int64_t ld, bool vec) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (row >= rows) return v;
  const uint8_t* src = p + row * ld + col;
  if (vec && col + 16 <= cols) return *reinterpret_cast<const uint4*>(src);
  uint8_t* b = reinterpret_cast<uint8_t*>(&v);
  for (int i = 0; i < 16; ++i) {
    if (col + i < cols) b[i] = src[i];
  }
  return v;
}

// 8 packed bytes (16 signed 4-bit weights, low nibble first) -> 16 int8
__device__ __forceinline__ void unpack_int4(uint2 packed, uint8_t* dst) {
  const uint8_t* b = reinterpret_cast<const uint8_t*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int lo = ((b[i] & 15) ^ 8) - 8, hi = ((b[i] >> 4) ^ 8) - 8;
    dst[2 * i] = static_cast<uint8_t>(static_cast<int8_t>(lo));
    dst[2 * i + 1] = static_cast<uint8_t>(static_cast<int8_t>(hi));
  }
}

template <int kWBits>
__global__ void __launch_bounds__(kThreads) int_gemm_kernel(GemmArgs a, bool vec_x, bool vec_w) {
  __shared__ __align__(16) uint8_t xs[kBM * kLds];
  __shared__ __align__(16) uint8_t ws[kBN * kLds];
  const int tid = threadIdx.x;
  const tile::Lane lane;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const uint8_t* w8 = static_cast<const uint8_t*>(a.w);
  int acc[2][4][4] = {};

  for (int64_t k0 = 0; k0 < a.k; k0 += kBK) {
    // stage 64 x 64 activations: 256 chunks of 16 bytes, 2 per thread
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + j * kThreads, r = c >> 2, cc = (c & 3) * 16;
      *reinterpret_cast<uint4*>(xs + r * kLds + cc) = load16(a.x, m0 + r, a.m, k0 + cc, a.k, a.k, vec_x);
    }
    if constexpr (kWBits == 8) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tid + j * kThreads, r = c >> 2, cc = (c & 3) * 16;
        *reinterpret_cast<uint4*>(ws + r * kLds + cc) = load16(w8, n0 + r, a.n, k0 + cc, a.k, a.k, vec_w);
      }
    } else {
      // 64 rows x 32 packed bytes: 256 chunks of 8 bytes (16 weights), 2 per thread
      const int64_t kb = a.k / 2;  // packed bytes per row (k is even)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tid + j * kThreads, r = c >> 2, cb = (c & 3) * 8;
        uint2 v = make_uint2(0u, 0u);
        alignas(16) uint8_t tmp[16];
        const int64_t row = n0 + r, byte0 = k0 / 2 + cb;
        if (row < a.n) {
          const uint8_t* src = w8 + row * kb + byte0;
          if (vec_w && byte0 + 8 <= kb) {
            v = *reinterpret_cast<const uint2*>(src);
          } else {
            uint8_t* vb = reinterpret_cast<uint8_t*>(&v);
            for (int i = 0; i < 8; ++i) vb[i] = byte0 + i < kb ? src[i] : 0;
          }
        }
        unpack_int4(v, tmp);
        // the padding must be 0 (an odd tail nibble or a row past n is not): clear it
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          if (row >= a.n || k0 + 2 * cb + i >= a.k) tmp[i] = 0;
        }
        *reinterpret_cast<uint4*>(ws + r * kLds + 2 * cb) = *reinterpret_cast<const uint4*>(tmp);
      }
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      uint32_t af[2][4], bf[4][2];
      tile::load_fragments(xs, ws, ks, lane, af, bf);
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_u8s8(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    __syncthreads();
  }

  // epilogue, in the twin's order: (acc - zp * sum w) * (x_scale * w_scale) + bias [-> requantize]
  const float qmax = static_cast<float>((1 << a.out_bits) - 1);
  tile::for_each_output(acc, m0, n0, a.m, a.n, lane, [&](int64_t row, int64_t col, int32_t sum) {
    const int64_t r = row % a.rows_per_param;
    float y = __fmul_rn(__int2float_rn(sum - a.x_zero_point[r] * a.w_sum[col]), __fmul_rn(a.x_scale[r], a.w_scale[col]));
    if (a.bias) y = __fadd_rn(y, a.bias[col]);
    if (a.out_scale) {
      const float q = rintf(__fdiv_rn(y, a.out_scale[r])) + static_cast<float>(a.out_zero_point[r]);
      a.out_q[row * a.n + col] = static_cast<uint8_t>(fminf(fmaxf(q, 0.f), qmax));
    } else {
      a.out_f[row * a.n + col] = y;
    }
  });
}

__global__ void quantize_kernel(const float* __restrict__ x, const float* __restrict__ scale,
                                const float* __restrict__ zero_point, uint8_t* __restrict__ q, int64_t rows,
                                int64_t cols, int64_t rows_per_param, float qmax) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = (i / cols) % rows_per_param;
    float v = rintf(__fdiv_rn(x[i], scale[r])) + zero_point[r];
    q[i] = static_cast<uint8_t>(fminf(fmaxf(v, 0.f), qmax));
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launchers (NVRTC compiles the kernels only)
cudaError_t launch_int_gemm(const GemmArgs& a, int w_bits, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  // rows on x (up to 2^31 - 1 blocks), output channels on y
  const dim3 grid(static_cast<unsigned>((a.m + kBM - 1) / kBM), static_cast<unsigned>((a.n + kBN - 1) / kBN));
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec_x = a.k % 16 == 0 && aligned(a.x);
  if (w_bits == 8) {
    int_gemm_kernel<8><<<grid, kThreads, 0, stream>>>(a, vec_x, a.k % 16 == 0 && aligned(a.w));
  } else if (w_bits == 4) {
    int_gemm_kernel<4><<<grid, kThreads, 0, stream>>>(a, vec_x, (a.k / 2) % 8 == 0 && (reinterpret_cast<uintptr_t>(a.w) & 7) == 0);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_per_token(const float* x, const float* scale, const float* zero_point, uint8_t* q,
                                      int64_t rows, int64_t cols, int64_t rows_per_param, int bits,
                                      cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  quantize_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, scale, zero_point, q, rows, cols,
                                                                         rows_per_param,
                                                                         static_cast<float>((1 << bits) - 1));
  return cudaGetLastError();
}
#endif

}  // namespace vmq::cuda
