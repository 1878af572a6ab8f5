// One time step of the training scan for one channel, over its d_state states: the arithmetic
// shared by the CPU kernel (csrc/cpu/selective_scan_train.cpp) and the CUDA kernel
// (csrc/cuda/scan_train.cu), so that the CPU tests hold both to the twins of vmq.ops.scan_train.
// Torch-free and standard-library-free; host code under g++, host and device code under nvcc
// (and NVRTC). It sits in csrc/cuda so that it ships with the CUDA sources.
//
// With a = exp(delta_t A) (computed by the caller: std::exp on the CPU, __expf on the GPU),
//   forward:   h <- a h + (delta_t u_t) B_t,  y_t = <h, C_t>
//   backward:  with g = dL/dh_t arriving as a_{t+1} g_{t+1} (zero after the last step),
//              gn = g + gy_t C_t;  dC_t += gy_t h_t;  dB_t += gn delta_t u_t;
//              d(delta_t A) = gn h_{t-1} a, to delta_t (times A) and to A (times delta_t);
//              d(delta_t u_t) = <gn, B_t>;  g <- gn a for step t-1.
// kN > 0: the loops run over kN states with n < ns guarding (register arrays on the GPU, or
// ns == kN known to the compiler on the CPU); kN == 0: over ns states.
#pragma once

#ifdef __CUDACC__
#define VMQ_SCAN_HD __host__ __device__ __forceinline__
#define VMQ_SCAN_UNROLL _Pragma("unroll")
#else
#define VMQ_SCAN_HD inline __attribute__((always_inline))
#define VMQ_SCAN_UNROLL
#endif

namespace vmq::scan_train {

// h <- a h + du B over the states; returns <h, C>
template <int kN>
VMQ_SCAN_HD float forward_step(float* __restrict__ h, const float* __restrict__ a, float du,
                               const float* __restrict__ B, const float* __restrict__ C, int ns) {
  float acc = 0.f;
  VMQ_SCAN_UNROLL
  for (int n = 0; n < (kN > 0 ? kN : ns); ++n) {
    if (kN == 0 || n < ns) {
      h[n] = a[n] * h[n] + du * B[n];
      acc += h[n] * C[n];
    }
  }
  return acc;
}

// the gradients of one step that are not per state
struct StepGrads {
  float gdelta;  // dL/d(delta_t) through exp(delta_t A), without the du term
  float gdu;     // dL/d(delta_t u_t)
};

// One backward step at t over the states, for a step with (kPrev) or without h_{t-1}.
template <int kN, bool kAddBC, bool kPrev>
VMQ_SCAN_HD StepGrads backward_loop(float* __restrict__ g, float* __restrict__ gA, float* __restrict__ gB,
                                    float* __restrict__ gC, const float* a, const float* h, const float* hp,
                                    const float* A, const float* B, const float* C, float delta, float du, float gy,
                                    int ns) {
  float gdelta = 0.f, gdu = 0.f;
  VMQ_SCAN_UNROLL
  for (int n = 0; n < (kN > 0 ? kN : ns); ++n) {
    if (kN == 0 || n < ns) {
      const float gn = g[n] + gy * C[n];
      if (kAddBC) gC[n] += gy * h[n]; else gC[n] = gy * h[n];
      const float gdA = kPrev ? gn * hp[n] * a[n] : 0.f;
      gdelta += gdA * A[n];
      gA[n] += gdA * delta;
      gdu += gn * B[n];
      if (kAddBC) gB[n] += gn * du; else gB[n] = gn * du;
      g[n] = gn * a[n];
    }
  }
  return {gdelta, gdu};
}

// One backward step at t. g: dL/dh_t less its gy_t C_t term, updated to a_t times the full
// dL/dh_t; gA: += dL/dA of this step; gB, gC: dL/dB_t, dL/dC_t of this channel, added to
// (kAddBC) or stored. h: h_t; hp: h_{t-1}, or null for zeros (t = 0); A: the channel's row of A.
// (Two loops rather than a null test inside one: g++ vectorises these, as it did the CPU kernel's
// loop before the steps moved here.)
template <int kN, bool kAddBC>
VMQ_SCAN_HD StepGrads backward_step(float* g, float* gA, float* gB, float* gC, const float* a, const float* h,
                                    const float* hp, const float* A, const float* B, const float* C, float delta,
                                    float du, float gy, int ns) {
  return hp ? backward_loop<kN, kAddBC, true>(g, gA, gB, gC, a, h, hp, A, B, C, delta, du, gy, ns)
            : backward_loop<kN, kAddBC, false>(g, gA, gB, gC, a, h, hp, A, B, C, delta, du, gy, ns);
}

// dL/du_t and dL/d(delta_t) from a step's StepGrads
VMQ_SCAN_HD float grad_u(const StepGrads& s, float delta) { return s.gdu * delta; }
VMQ_SCAN_HD float grad_delta(const StepGrads& s, float u) { return s.gdelta + s.gdu * u; }

}  // namespace vmq::scan_train
