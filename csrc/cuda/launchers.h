// Launchers of vmq's CUDA kernels: raw pointers and sizes only, so that the .cu files compile
// without torch headers. The .cpp bindings beside them check tensors, pick the stream and call
// these; each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>

#include "cuda/nvrtc_std.h"  // <cstdint>, also under NVRTC

namespace vmq::cuda {

// ---- integer GEMM (int8_gemm.cu) ------------------------------------------------------------
// y[m, n] = (sum_k x[m,k] w[n,k] - zp[r] * w_sum[n]) * (x_scale[r] * w_scale[n]) + bias[n],
// r = m % rows_per_param; with out_scale: requantized to uint8 (quantize_per_token_ref).
// x: uint8 (M, K) row-major; w: int8 (N, K) (w_bits 8) or two 4-bit values per byte, low nibble
// first, (N, K/2) (w_bits 4).
struct GemmArgs {
  const uint8_t* x;
  const void* w;
  const int32_t* w_sum;
  const float* x_scale;
  const int32_t* x_zero_point;
  const float* w_scale;
  const float* bias;        // or null
  const float* out_scale;   // or null: float output
  const int32_t* out_zero_point;
  float* out_f;             // (M, N) when out_scale is null
  uint8_t* out_q;           // (M, N) when out_scale is set
  int64_t m, n, k, rows_per_param;
  int out_bits;
};
cudaError_t launch_int_gemm(const GemmArgs& a, int w_bits, cudaStream_t stream);

// q = clamp(rint(x / scale[r]) + zero_point[r], 0, 2^bits - 1), r = row % rows_per_param
cudaError_t launch_quantize_per_token(const float* x, const float* scale, const float* zero_point, uint8_t* q,
                                      int64_t rows, int64_t cols, int64_t rows_per_param, int bits,
                                      cudaStream_t stream);

// ---- fused bidirectional scan (selective_scan.cu) --------------------------------------------
enum class ScanType { kFloat, kHalf, kInt8 };

struct ScanTensor {  // (batch, d_inner, seqlen) or (batch, d_state, seqlen) read through strides
  const void* p;
  int64_t s0, s1, s2;
};

struct ScanDirection {
  ScanTensor u, delta, B, C;
  const float* u_scale;      // (seqlen,) when u is int8
  const float* delta_scale;  // (seqlen,) when delta is int8
  const float* A;            // (d_inner, d_state) contiguous
  const float* D;            // (d_inner,) or null
};

struct ScanArgs {
  ScanDirection fwd, bwd;
  ScanTensor z;              // z.p null: no gate
  ScanType value_type;       // u, delta
  ScanType float_type;       // B, C, z: kFloat or kHalf
  int64_t batch, dim, len, d_state;
  bool softplus, divide_out;
  float* out;                // (batch, seqlen, d_inner) contiguous
};
constexpr int kScanMaxState = 64;
cudaError_t launch_bidirectional_scan(const ScanArgs& a, cudaStream_t stream);

// ---- K-direction scan (multi_scan.cu) ---------------------------------------------------------
// Direction k, step s: inputs at position in_index[k, s] (s without in_index; zero inputs where
// it is -1), y to token out_index[k, s] (dropped where -1); positions or tokens out of range
// count as -1. Merged (sum, mean) or kept apart (none), times silu(z). Types as ScanArgs.
struct MultiScanDirection {
  ScanTensor u, delta, B, C;  // (batch, d_inner | d_state, positions)
  const float* u_scale;       // (positions,) when u is int8
  const float* delta_scale;   // (positions,) when delta is int8
  const float* A;             // (d_inner, d_state) contiguous
  const float* D;             // (d_inner,) or null
  const float* delta_bias;    // (d_inner,) or null
};

enum class ScanMerge { kSum, kMean, kNone };

struct MultiScanArgs {
  const MultiScanDirection* dirs;  // K directions (host memory; passed to the kernels by value)
  const int64_t* in_index;         // (K, steps) contiguous, or null: position s at step s
  const int64_t* out_index;        // (K, steps) contiguous
  ScanTensor z;                    // (batch, d_inner, seqlen); z.p null: no gate
  ScanType value_type;             // u, delta
  ScanType float_type;             // B, C, z: kFloat or kHalf
  int64_t batch, dim, positions, steps, seqlen, d_state, K;
  bool softplus;
  ScanMerge merge;
  float* out;                      // (batch, seqlen, d_inner) or, merge none, (batch, K, seqlen, d_inner) contiguous
};
cudaError_t launch_multi_scan(const MultiScanArgs& a, cudaStream_t stream);

// ---- VQ-weight GEMM (vq_gemm.cu) -------------------------------------------------------------
// y[m, n] = scale[n] * sum_k x[m, k] * c[n, k] + bias[n], c[n, j*d + i] = codebook[n / rows_per_group,
// codes[n, j], i]; the codeword tile is decoded into shared memory and multiplied on the tensor
// cores with fp32 accumulation: fp16 x with the fp16 codewords, fp32 x as bfloat16 (codewords
// too). Codes are trusted (an out-of-range one reads as NaN).
struct VqGemmArgs {
  const void* x;        // (M, K) float32 or float16, row-major
  bool x_half;
  const int32_t* codes; // (N, cols)
  const uint16_t* codebook;  // fp16 bits, (G, size, dim)
  const uint16_t* scale;     // fp16 bits, (N,) or null
  const float* bias;    // (N,) or null
  float* out;           // (M, N)
  int64_t m, n, k, cols, size, dim, rows_per_group;
};
cudaError_t launch_vq_gemm(const VqGemmArgs& a, cudaStream_t stream);

// ---- k-means assignment (kmeans_assign.cu) ---------------------------------------------------
// codes[i] = argmin_k sum_j w[i,j] (x[i,j] - c[k,j])^2 (lowest index on ties), dist[i] its value.
constexpr int kKmeansMaxDim = 32;
cudaError_t launch_kmeans_assign(const float* x, const float* w, int64_t w_row_stride, const float* centroids,
                                 int64_t n, int64_t k, int64_t d, int64_t* codes, float* dist,
                                 cudaStream_t stream);

// ---- training scan, forward and backward (scan_train.cu) -------------------------------------
// The core recurrence of vmq::scan_train_fwd / scan_train_bwd (scan_train_step.h), fp32, all
// contiguous: u, delta, y, grad_y, gu, gdelta (batch, dim, len); A (dim, d_state);
// B, C, gB, gC (batch, len, d_state). batch <= 65535 (grid.y), d_state <= kScanTrainMaxState.
struct ScanTrainArgs {
  const float *u, *delta, *A, *B, *C;
  int64_t batch, dim, len, d_state;
};
struct ScanTrainGrads {
  const float* grad_y;
  float* ckpt;     // scratch (batch, ceil(len / kScanTrainChunk), d_state, dim)
  float *gu, *gdelta;
  float* gA_part;  // (batch, d_state, dim): dA of each sample (written when len > 0)
  float *gB, *gC;  // zero on entry: accumulated with atomics
};
constexpr int kScanTrainChunk = 16, kScanTrainMaxState = 64;
cudaError_t launch_scan_train_fwd(const ScanTrainArgs& a, float* y, cudaStream_t stream);
cudaError_t launch_scan_train_bwd(const ScanTrainArgs& a, const ScanTrainGrads& g, cudaStream_t stream);

}  // namespace vmq::cuda
