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
__device__ __forceinline__ uint4 load16(const uint8_t* p, int row, int rows, int col, int cols, int ld, bool vec) {
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

// The epilogue of the thread's 2 x 4 mma tiles, in the twin's order:
// (acc - zp * sum w) * (x_scale * w_scale) + bias [-> requantize]. Each of its 8 columns'
// parameters is loaded once, its 4 rows' once per 8 columns (holding all of them would cost
// registers, and occupancy); pairs of adjacent columns go out in one store when every row
// starts at an even column (n even).
__device__ __forceinline__ void epilogue(const GemmArgs& a, const int (&acc)[2][4][4], int m0, int n0, int m, int n,
                                         const tile::Lane& l) {
  int r[4];
  const int rows_per_param = static_cast<int>(a.rows_per_param);
#pragma unroll
  for (int h = 0; h < 4; ++h) {  // row h: mma tile h / 2, half h % 2
    const int row = m0 + l.wm * 32 + (h >> 1) * 16 + l.g + (h & 1) * 8;
    r[h] = row < m ? row % rows_per_param : -1;
  }
  const float qmax = static_cast<float>((1 << a.out_bits) - 1);
  const bool pairs = (n & 1) == 0;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int col = n0 + l.wn * 32 + ni * 8 + 2 * l.t;  // and col + 1
    if (col >= n) continue;
    const bool second = col + 1 < n;
    const int32_t w_sum[2] = {a.w_sum[col], second ? a.w_sum[col + 1] : 0};
    const float w_scale[2] = {a.w_scale[col], second ? a.w_scale[col + 1] : 0.f};
    float bias[2] = {0.f, 0.f};
    if (a.bias) bias[0] = a.bias[col], bias[1] = second ? a.bias[col + 1] : 0.f;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      if (r[h] < 0) continue;
      const int row = m0 + l.wm * 32 + (h >> 1) * 16 + l.g + (h & 1) * 8;
      const int32_t zp = a.x_zero_point[r[h]];
      const float xs = a.x_scale[r[h]];
      float y[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        y[e] = __fmul_rn(__int2float_rn(acc[h >> 1][ni][(h & 1) * 2 + e] - zp * w_sum[e]), __fmul_rn(xs, w_scale[e]));
        if (a.bias) y[e] = __fadd_rn(y[e], bias[e]);
      }
      const int i = row * n + col;
      if (a.out_scale) {
        const float os = a.out_scale[r[h]], oz = static_cast<float>(a.out_zero_point[r[h]]);
        uint8_t q[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) q[e] = static_cast<uint8_t>(fminf(fmaxf(rintf(__fdiv_rn(y[e], os)) + oz, 0.f), qmax));
        if (pairs) {
          *reinterpret_cast<uchar2*>(a.out_q + i) = make_uchar2(q[0], q[1]);
        } else {
          a.out_q[i] = q[0];
          if (second) a.out_q[i + 1] = q[1];
        }
      } else if (pairs) {
        *reinterpret_cast<float2*>(a.out_f + i) = make_float2(y[0], y[1]);
      } else {
        a.out_f[i] = y[0];
        if (second) a.out_f[i + 1] = y[1];
      }
    }
  }
}

// the 64 x 64 output tile at rows m0.., channels n0.. (xs, ws: the block's staging buffers)
template <int kWBits>
__device__ __forceinline__ void gemm_tile(const GemmArgs& a, int m, int n, int k, int m0, int n0, bool vec_x,
                                          bool vec_w, uint8_t* xs, uint8_t* ws) {
  const int tid = threadIdx.x;
  const tile::Lane lane;
  const uint8_t* w8 = static_cast<const uint8_t*>(a.w);
  int acc[2][4][4] = {};

  for (int k0 = 0; k0 < k; k0 += kBK) {
    // stage 64 x 64 activations: 256 chunks of 16 bytes, 2 per thread
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + j * kThreads, r = c >> 2, cc = (c & 3) * 16;
      *reinterpret_cast<uint4*>(xs + r * kLds + cc) = load16(a.x, m0 + r, m, k0 + cc, k, k, vec_x);
    }
    if constexpr (kWBits == 8) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tid + j * kThreads, r = c >> 2, cc = (c & 3) * 16;
        *reinterpret_cast<uint4*>(ws + r * kLds + cc) = load16(w8, n0 + r, n, k0 + cc, k, k, vec_w);
      }
    } else {
      // 64 rows x 32 packed bytes: 256 chunks of 8 bytes (16 weights), 2 per thread
      const int kb = k / 2;  // packed bytes per row (k is even)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tid + j * kThreads, r = c >> 2, cb = (c & 3) * 8;
        uint2 v = make_uint2(0u, 0u);
        alignas(16) uint8_t tmp[16];
        const int row = n0 + r, byte0 = k0 / 2 + cb;
        if (row < n) {
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
          if (row >= n || k0 + 2 * cb + i >= k) tmp[i] = 0;
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
  epilogue(a, acc, m0, n0, m, n, lane);
}

// Grid: row blocks of 64 on x, output-channel blocks of 64 on y (at most 65535; each block loops
// over the channel blocks y, y + gridDim.y, ...). Offsets are 32-bit: the binding keeps
// M x K, N x K and M x N below 2^31.
template <int kWBits>
__global__ void __launch_bounds__(kThreads) int_gemm_kernel(GemmArgs a, bool vec_x, bool vec_w) {
  __shared__ __align__(16) uint8_t xs[kBM * kLds];
  __shared__ __align__(16) uint8_t ws[kBN * kLds];
  const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
  const int n_blocks = (n + kBN - 1) / kBN;
  for (int nb = blockIdx.y; nb < n_blocks; nb += gridDim.y) {
    gemm_tile<kWBits>(a, m, n, k, blockIdx.x * kBM, nb * kBN, vec_x, vec_w, xs, ws);
  }
}

// quantize_per_token: rows of cols values. A block of kQuantThreads threads takes
// kQuantThreads >> lanes_log2 rows with 2^lanes_log2 threads each (enough for a row's values, 4
// per thread, up to the whole block); grid.x: groups of rows, grid.y: chunks of columns (at most
// 65535, looping beyond). A row's parameters are loaded once per thread; vec: rows of a multiple
// of 4 values, 16-byte aligned x (float4 loads, 4-byte stores).
constexpr int kQuantThreads = 256;

__device__ __forceinline__ uint8_t quantize_value(float v, float s, float z, float qmax) {
  return static_cast<uint8_t>(fminf(fmaxf(rintf(__fdiv_rn(v, s)) + z, 0.f), qmax));
}

__global__ void __launch_bounds__(kQuantThreads)
    quantize_kernel(const float* __restrict__ x, const float* __restrict__ scale, const float* __restrict__ zero_point,
                    uint8_t* __restrict__ q, int64_t rows, int64_t cols, int64_t rows_per_param, float qmax,
                    int lanes_log2, bool vec) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kQuantThreads >> lanes_log2) + (threadIdx.x >> lanes_log2);
  if (row >= rows) return;
  const int lanes = 1 << lanes_log2, lane = threadIdx.x & (lanes - 1);
  const int64_t r = row % rows_per_param;
  const float s = scale[r], z = zero_point[r];
  const float* xr = x + row * cols;
  uint8_t* qr = q + row * cols;
  const int64_t step = static_cast<int64_t>(gridDim.y) * lanes * 4;
#pragma unroll 1
  for (int64_t c = (static_cast<int64_t>(blockIdx.y) * lanes + lane) * 4; c < cols; c += step) {
    if (vec) {
      const float4 v = *reinterpret_cast<const float4*>(xr + c);
      *reinterpret_cast<uchar4*>(qr + c) = make_uchar4(quantize_value(v.x, s, z, qmax), quantize_value(v.y, s, z, qmax),
                                                       quantize_value(v.z, s, z, qmax), quantize_value(v.w, s, z, qmax));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (c + i < cols) qr[c + i] = quantize_value(xr[c + i], s, z, qmax);
      }
    }
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launchers (NVRTC compiles the kernels only)
cudaError_t launch_int_gemm(const GemmArgs& a, int w_bits, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  // rows on x (up to 2^31 - 1 blocks), output channels on y (blocks loop past 65535)
  const dim3 grid(static_cast<unsigned>((a.m + kBM - 1) / kBM),
                  static_cast<unsigned>(std::min<int64_t>((a.n + kBN - 1) / kBN, 65535)));
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec_x = a.k % 16 == 0 && aligned(a.x);
  if (w_bits == 8) {
    int_gemm_kernel<8><<<grid, kThreads, 0, stream>>>(a, vec_x, a.k % 16 == 0 && aligned(a.w));
  } else if (w_bits == 4) {
    int_gemm_kernel<4><<<grid, kThreads, 0, stream>>>(a, vec_x, (a.k / 2) % 8 == 0 && (reinterpret_cast<uintptr_t>(a.w) & 7) == 0);
  } else {
    return cudaErrorNotSupported;  // the binding passes 8 or 4
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_per_token(const float* x, const float* scale, const float* zero_point, uint8_t* q,
                                      int64_t rows, int64_t cols, int64_t rows_per_param, int bits,
                                      cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  int lanes_log2 = 0;  // threads per row: 4 values each, a power of two up to the block
  while ((int64_t{4} << lanes_log2) < cols && (1 << lanes_log2) < kQuantThreads) ++lanes_log2;
  const int64_t rows_per_block = kQuantThreads >> lanes_log2, col_step = int64_t{4} << lanes_log2;
  const dim3 grid(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(std::min<int64_t>((cols + col_step - 1) / col_step, 65535)));
  const bool vec = cols % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(q) & 3) == 0;
  quantize_kernel<<<grid, kQuantThreads, 0, stream>>>(x, scale, zero_point, q, rows, cols, rows_per_param,
                                                      static_cast<float>((1 << bits) - 1), lanes_log2, vec);
  return cudaGetLastError();
}
#endif

}  // namespace vmq::cuda
