// The warp tiling shared by the tensor-core GEMMs (int8_gemm.cu, vq_gemm.cu).
//
// A block of 4 warps computes a 64 x 64 output tile; warp w owns rows 32 * (w / 2) .. + 32 and
// columns 32 * (w % 2) .. + 32, as 2 x 4 mma tiles of 16 x 8. Both GEMMs stage their operands
// in shared memory as rows of 32-byte k-steps padded to a stride of 80 bytes (20 words: the 8 rows
// x 4 words of a fragment load fall in 32 distinct banks). For both mma shapes used here
// (m16n8k32 on 8-bit values, m16n8k16 on 16-bit values) one k-step is 32 bytes and the fragments
// are the same 32-bit words:
//   A (16 x k-step, row-major): a0 (row g, byte 4t), a1 (row g + 8, byte 4t), a2 (row g, byte
//   16 + 4t), a3 (row g + 8, byte 16 + 4t);  B (n-major): b0 (col g, byte 4t), b1 (col g, byte 16 + 4t);
//   C: c0, c1 at (row g, cols 2t, 2t + 1), c2, c3 at row g + 8;
// with g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k32 / m16n8k16").
// The m16n8k16 fragments are the same for .f16 and .bf16 operands.
#pragma once
#include "cuda/nvrtc_std.h"  // <cstdint>, also under NVRTC

namespace vmq::cuda::tile {

constexpr int kBM = 64, kBN = 64, kThreads = 128;
constexpr int kRowBytes = 80;  // shared-memory row stride

struct Lane {
  int g, t, wm, wn;
  __device__ Lane() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    g = lane >> 2;
    t = lane & 3;
    wm = warp >> 1;
    wn = warp & 1;
  }
};

__device__ __forceinline__ uint32_t word(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// c += a b on 16-bit operands, fp32 accumulation: fp16 (kBf16 false) or bfloat16 values
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the bindings refuse devices below sm_80
#endif
}

// fragments of the warp's 2 A tiles and 4 B tiles for the k-step starting at byte kb
__device__ __forceinline__ void load_fragments(const uint8_t* a_smem, const uint8_t* b_smem, int kb, const Lane& l,
                                               uint32_t (&af)[2][4], uint32_t (&bf)[4][2]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
    const uint8_t* p = a_smem + (l.wm * 32 + mi * 16 + l.g) * kRowBytes + kb + 4 * l.t;
    af[mi][0] = word(p);
    af[mi][1] = word(p + 8 * kRowBytes);
    af[mi][2] = word(p + 16);
    af[mi][3] = word(p + 8 * kRowBytes + 16);
  }
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const uint8_t* p = b_smem + (l.wn * 32 + ni * 8 + l.g) * kRowBytes + kb + 4 * l.t;
    bf[ni][0] = word(p);
    bf[ni][1] = word(p + 16);
  }
}

// f(row, col, value) for every accumulator element of the warp inside the (m, n) output (32-bit
// indices: the bindings keep the outputs below 2^31 elements)
template <typename T, typename F>
__device__ __forceinline__ void for_each_output(const T (&acc)[2][4][4], int m0, int n0, int m, int n, const Lane& l,
                                                F&& f) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + l.wm * 32 + mi * 16 + l.g + half * 8;
      if (row >= m) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + l.wn * 32 + ni * 8 + 2 * l.t + e;
          if (col < n) f(row, col, acc[mi][ni][half * 2 + e]);
        }
      }
    }
  }
}

}  // namespace vmq::cuda::tile
