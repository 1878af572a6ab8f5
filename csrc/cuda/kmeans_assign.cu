// k-means assignment on CUDA for VQ codebook initialisation: the kernel of vmq::kmeans_assign.
//
// One thread per point, its coordinates and weights in registers. Centroids pass through shared
// memory in tiles of 256; each thread folds the distances of a tile into a running minimum, so
// the N x K distance matrix never exists. As on the CPU the distance is computed as
//   sum_j w_j x_j^2 + [ sum_j w_j c_kj^2 - 2 w_j x_j c_kj ]
// (the bracket decides the argmin; ties go to the lowest index) and clamped at zero.
#include "cuda/launchers.h"
#include "cuda/nvrtc_std.h"  // <cfloat>, also under NVRTC

namespace vmq::cuda {
namespace {

constexpr int kThreads = 128, kTile = 256;

template <int kMaxD>
__global__ void __launch_bounds__(kThreads) kmeans_assign_kernel(const float* __restrict__ x,
                                                                 const float* __restrict__ w, int64_t w_stride,
                                                                 const float* __restrict__ c, int64_t n, int64_t k,
                                                                 int d, int64_t* __restrict__ codes,
                                                                 float* __restrict__ dist) {
  __shared__ float tile[kTile * kMaxD];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < n;
  float wx2[kMaxD], wv[kMaxD];  // -2 w_j x_j and w_j
  float xx = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxD; ++j) {
    const float xj = (active && j < d) ? x[i * d + j] : 0.f;
    const float wj = (active && j < d) ? (w ? w[i * w_stride + j] : 1.f) : 0.f;
    wx2[j] = -2.f * wj * xj;
    wv[j] = wj;
    xx += wj * xj * xj;
  }
  float best = FLT_MAX;
  int64_t best_k = 0;
  for (int64_t k0 = 0; k0 < k; k0 += kTile) {
    const int count = static_cast<int>((k - k0 < kTile ? k - k0 : kTile));
    __syncthreads();
    for (int e = threadIdx.x; e < count * d; e += blockDim.x) tile[e] = c[k0 * d + e];
    __syncthreads();
    if (!active) continue;
    for (int kk = 0; kk < count; ++kk) {
      const float* cc = tile + kk * d;
      float v = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxD; ++j) {
        if (j < d) v += cc[j] * (wv[j] * cc[j] + wx2[j]);
      }
      if (v < best) {
        best = v;
        best_k = k0 + kk;
      }
    }
  }
  if (active) {
    codes[i] = best_k;
    dist[i] = fmaxf(best + xx, 0.f);
  }
}

}  // namespace

#if !defined(__CUDACC_RTC__)  // the host launcher (NVRTC compiles the kernels only)
cudaError_t launch_kmeans_assign(const float* x, const float* w, int64_t w_row_stride, const float* centroids,
                                 int64_t n, int64_t k, int64_t d, int64_t* codes, float* dist,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (k == 0 || d < 1 || d > kKmeansMaxDim) return cudaErrorNotSupported;  // the binding refuses these
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  if (d <= 8) {
    kmeans_assign_kernel<8><<<blocks, kThreads, 0, stream>>>(x, w, w_row_stride, centroids, n, k,
                                                             static_cast<int>(d), codes, dist);
  } else {
    kmeans_assign_kernel<kKmeansMaxDim><<<blocks, kThreads, 0, stream>>>(x, w, w_row_stride, centroids, n, k,
                                                                         static_cast<int>(d), codes, dist);
  }
  return cudaGetLastError();
}
#endif

}  // namespace vmq::cuda
