// What both GEMV strategies share: the shared-memory budget for the staged input, and the RMS
// scale of each input row.
#pragma once

#include "mpk_runtime.cuh"

namespace mpk {

// Bytes of shared memory for the staged input x: what a CTA may use on this architecture, less
// room for the other scratch (task descriptor, reductions, attention).
constexpr int kXBudget = kSmemCap - 16 * 1024;

// transformers' RMSNorm: normalise in fp32, round to the activation dtype, scale by the weight, round.
template <class A> __device__ __forceinline__ float rms_normed(float v, float inv, float w) {
  return A::round(w * A::round(v * inv));
}

// All threads: inv[b] = 1 / rms(x[b]) for the B rows of x [B, K]. Every thread takes a share of
// packed loads, so this costs a couple of L2 round trips, not one per 32 elements of a row.
// `red` is kWarps * B floats of scratch. Ends with a barrier.
template <int B, int K, class T> __device__ void row_inv_rms(const T* x, float eps, float* inv, float* red) {
  constexpr int VEC = vec_width(K), NV = K / VEC;
  float part[B];
#pragma unroll
  for (int b = 0; b < B; ++b) part[b] = 0.f;
  for (int v = threadIdx.x; v < NV; v += kThreads) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float f[VEC];
      load_vec<VEC>(x + b * K + v * VEC, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) part[b] = fmaf(f[e], f[e], part[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const float w = warp_sum(part[b]);
    if (lane_id() == 0) red[warp_id() * B + b] = w;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < B; b += kThreads) {
    float ss = 0.f;
    for (int w = 0; w < kWarps; ++w) ss += red[w * B + b];
    inv[b] = rsqrtf(ss / K + eps);
  }
  __syncthreads();
}

}  // namespace mpk
