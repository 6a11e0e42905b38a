// What both GEMV strategies share: the shared-memory budget for the staged input, and the RMS
// scale of each input row.
#pragma once

#include <type_traits>

#include "mpk_runtime.cuh"

namespace mpk {

// Bytes of shared memory for the staged input x: what a CTA may use on this architecture, less
// room for the other scratch (task descriptor, reductions, attention).
constexpr int kXBudget = kSmemCap - 16 * 1024;

// transformers' RMSNorm: normalise in fp32, round to the activation dtype, scale by the weight, round.
template <class A> __device__ __forceinline__ float rms_normed(float v, float inv, float w) {
  return A::round(w * A::round(v * inv));
}

// All threads: inv[b] = 1 / rms(x[b]) from each thread's partial sums of squares `part[b]`;
// `red` is kWarps * B floats of scratch. Ends with a barrier.
template <int B, int K> __device__ void inv_rms_from_parts(const float (&part)[B], float eps, float* inv, float* red) {
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

// All threads: inv[b] = 1 / rms(x[b]) for the B rows of x [B, K]. Every thread takes a share of
// packed loads, so this costs a couple of L2 round trips, not one per 32 elements of a row.
// `red` is kWarps * B floats of scratch. Ends with a barrier.
template <int B, int K, class T> __device__ void row_inv_rms(const T* x, float eps, float* inv, float* red) {
  constexpr int VEC = vec_width(K), NV = K / VEC;
  float part[B];
#pragma unroll
  for (int b = 0; b < B; ++b) part[b] = 0.f;
#pragma unroll  // a constant trip count, so that every round's loads go out together
  for (int k = 0; k < (NV + kThreads - 1) / kThreads; ++k) {
    const int v = threadIdx.x + k * kThreads;
    if (v >= NV) break;
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float f[VEC];
      load_vec<VEC>(x + b * K + v * VEC, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) part[b] = fmaf(f[e], f[e], part[b]);
    }
  }
  inv_rms_from_parts<B, K>(part, eps, inv, red);
}

// A GEMV's epilogue as `product` gives it, over out(b, c, v[RPC]) for one output element (row b,
// column c): lane b writes sequence b's element, so what an `out` loads (linear_residual's residual)
// is one warp-wide round trip, not B in a row behind its stores (generic pointers that may alias).
// A strategy holding a column's sums in every lane calls it per column; one holding them in shared
// memory may instead give each group of B lanes a column of its own (`element`).
template <int RPC, int B, class Out> struct ElementOut {
  Out& out;

  __device__ __forceinline__ void operator()(int c, const float (&acc)[RPC][B]) const {
    const int lane = lane_id();
    if (B == 1 ? lane != 0 : lane >= B) return;
    const int b = B == 1 ? 0 : lane;
    float v[RPC];
#pragma unroll
    for (int r = 0; r < RPC; ++r) {
      v[r] = acc[r][0];
#pragma unroll
      for (int s = 1; s < B; ++s) v[r] = b == s ? acc[r][s] : v[r];  // selects: acc stays in registers
    }
    out(b, c, v);
  }

  // Sequence b's element of column c from its sums laid out [row][8].
  __device__ __forceinline__ void element(int c, const float* rows, int b) const {
    float v[RPC];
#pragma unroll
    for (int r = 0; r < RPC; ++r) v[r] = rows[r * 8 + b];
    out(b, c, v);
  }
};
template <class E> struct IsElementOut : std::false_type {};
template <int RPC, int B, class Out> struct IsElementOut<ElementOut<RPC, B, Out>> : std::true_type {};

// All threads: fn(b, v, f) for each vector v (VEC values, as floats) of each row b of x [B, K],
// RMS-normalised as the op references do when NORM (inv[b] and the norm weights). Each thread loads
// kBatch vectors before handing any to fn: fn's stores to shared memory go through generic pointers
// that could alias x, so a plain loop would wait out one L2 round trip per vector. Such a read is
// bound by the bytes in flight (docs/perf.md, x_copies): 8 vectors up to batch 4 halve the round
// trips of a large x (qwen3-8b's batch-4 down projection: 3, not 6; 0.8% a step on an H200); at
// batch 8, beside the tensor-core GEMV's loads through L1, 8 were 1.5% slower than 4. A caller may set
// its own count (kRound) where the default would spill. MPK_X_BATCH (build knob) sets one count for
// every batch and caller, for A/B.
#ifndef MPK_X_BATCH
#define MPK_X_BATCH 0
#endif
template <int B, int K, int VEC, bool NORM, class A, int kRound = 0, class T, class Fn>
__device__ void for_each_x_vec(const T* x, const bf16* norm, const float* inv, Fn&& fn) {
  constexpr int NV = K / VEC, N = B * NV;
  constexpr int kBatch = MPK_X_BATCH > 0 ? MPK_X_BATCH : kRound > 0 ? kRound : B <= 4 ? 8 : 4;
  for (int i0 = threadIdx.x; i0 < N; i0 += kBatch * kThreads) {
    float f[kBatch][VEC];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j * kThreads;
      if (i >= N) break;
      load_vec<VEC>(x + (i / NV) * K + (i % NV) * VEC, f[j]);
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j * kThreads;
      if (i >= N) break;
      const int b = i / NV, v = i - b * NV;
      if constexpr (NORM) {
        float nw[VEC];  // read-only loads: free to move ahead of fn's stores
        unpack<VEC>(ld_weight<VEC>(norm + v * VEC), nw);
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[j][e] = rms_normed<A>(f[j][e], inv[b], nw[e]);
      }
      fn(b, v, f[j]);
    }
  }
}

// All threads: the B rows of a bf16 x [B, K] copied as they are into shared memory, row b at
// s + b * stride, by asynchronous copies: no registers held, so the whole x is in flight at once
// where loads in registers go in rounds (for_each_x_vec). Ends with a barrier.
template <int B, int K> __device__ void copy_x_rows(const bf16* x, unsigned char* s, int stride) {
  static_assert(K % 8 == 0, "16-byte pieces");
  constexpr int NV = K / 8;
  for (int i = threadIdx.x; i < B * NV; i += kThreads) {
    const int b = i / NV, v = i - b * NV;
    cp_async16(s + b * stride + v * 16, x + b * K + v * 8, true);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// The RMSNorm weight vectors a thread will scale with, loaded beside x so that they are in
// registers when the statistics' barriers end, not an L2 round trip after them. A prologue loop
// visits i = threadIdx.x + k * kThreads, vector v = i % NV of a row: when NV is a multiple of
// kThreads that is one of M = NV / kThreads vectors, number k % M; when NV divides kThreads it is
// always the same one. Callers pass k as an unrolled loop's constant, so w never leaves registers.
// Other shapes load at use.
template <int NV, int VEC> struct NormRegs {
  static constexpr bool kHeld = NV % kThreads == 0 || kThreads % NV == 0;
  static constexpr int M = kHeld ? cmax(1, NV / kThreads) : 1;  // a prologue loop unrolls by M
  packed_t<VEC> w[M];

  __device__ __forceinline__ void load(const bf16* norm) {
    if constexpr (kHeld) {
#pragma unroll
      for (int m = 0; m < M; ++m) w[m] = ld_weight<VEC>(norm + ((threadIdx.x + m * kThreads) % NV) * VEC);
    }
  }

  // Vector v = (threadIdx.x + k * kThreads) % NV's weights as floats.
  __device__ __forceinline__ void get(const bf16* norm, int k, int v, float (&f)[VEC]) const {
    if constexpr (kHeld) {
      unpack<VEC>(w[k % M], f);
    } else {
      unpack<VEC>(ld_weight<VEC>(norm + v * VEC), f);
    }
  }
};

// All threads: x [B, K] RMS-normalised (inv[b] and the norm weights, as the op references do) and
// handed to store(b, v, f) vector by vector, from one L2 pass over x: the pass keeps each vector
// in shared memory as float32 (`raw`, B * K floats) while it sums the squares, and the normalising
// pass reads it back from there. For an x too large to hold in registers (XRegs), where
// row_inv_rms + for_each_x_vec would read it from L2 twice. `raw` holds quarter q of vector i at
// raw + (q * N + i) * 4, so a warp's 16-byte accesses are contiguous. Ends with a barrier.
template <int B, int K, int VEC, class A, class T, class Store>
__device__ void stage_normed_via_smem(const T* x, const bf16* norm, float eps, float* inv, float* red, float* raw,
                                      Store&& store) {
  constexpr int NV = K / VEC, N = B * NV;
  static_assert(VEC % 4 == 0, "float4 quarters");
  float4* quarters = reinterpret_cast<float4*>(raw);
  NormRegs<NV, VEC> nw;
  nw.load(norm);
  float part[B];
#pragma unroll
  for (int b = 0; b < B; ++b) part[b] = 0.f;
  for_each_x_vec<B, K, VEC, false, A>(x, nullptr, nullptr, [&](int b, int v, const float (&f)[VEC]) {
    const int i = b * NV + v;
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) ss = fmaf(f[e], f[e], ss);
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) quarters[q * N + i] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
#pragma unroll
    for (int r = 0; r < B; ++r) part[r] += r == b ? ss : 0.f;
  });
  inv_rms_from_parts<B, K>(part, eps, inv, red);  // its barriers also publish `raw`
  constexpr int M = NormRegs<NV, VEC>::M;
  for (int i0 = threadIdx.x; i0 < N; i0 += M * kThreads) {
#pragma unroll
    for (int k = 0; k < M; ++k) {
      const int i = i0 + k * kThreads;
      if (i >= N) break;
      const int b = i / NV, v = i - b * NV;
      float f[VEC], w[VEC];
      nw.get(norm, k, v, w);
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        const float4 r = quarters[q * N + i];
        f[4 * q] = r.x, f[4 * q + 1] = r.y, f[4 * q + 2] = r.z, f[4 * q + 3] = r.w;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = rms_normed<A>(f[e], inv[b], w[e]);
      store(b, v, f);
    }
  }
  __syncthreads();
}

// The input vectors one thread handles in a GEMV prologue, held in registers: vectors
// i = threadIdx.x + j * kThreads of x's B x (K / VEC) vectors. When they are few (kFits, up to
// MPK_X_REGS a thread), the prologue reads x once: the RMS statistics and the staging both use these
// registers, one L2 pass over x instead of two on the path from the event to the first FMA. More than
// 2 puts part of the kernel in local memory (a stack frame of 16-144 bytes at 4 and of 496 at 8 on
// qwen3-8b batch 4, whose step was then 17% slower on an H200; docs/perf.md). MPK_X_REGS (build knob)
// sets the bound, for A/B.
#ifndef MPK_X_REGS
#define MPK_X_REGS 2
#endif
template <int B, int K, int VEC> struct XRegs {
  static constexpr int NV = K / VEC;
  static constexpr int PER = (B * NV + kThreads - 1) / kThreads;
  static constexpr bool kFits = PER <= MPK_X_REGS;
  float f[PER][VEC];

  __device__ static int index(int j) { return threadIdx.x + j * kThreads; }

  template <class T> __device__ void load(const T* x) {
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = index(j);
      if (i >= B * NV) break;
      load_vec<VEC>(x + (i / NV) * K + (i % NV) * VEC, f[j]);
    }
  }

  // All threads: inv[b] = 1 / rms(x[b]); `red` is kWarps * B floats of scratch. Ends with a barrier.
  __device__ void inv_rms(float eps, float* inv, float* red) const {
    float part[B];
#pragma unroll
    for (int b = 0; b < B; ++b) part[b] = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = index(j);
      if (i >= B * NV) break;
      float ss = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss = fmaf(f[j][e], f[j][e], ss);
#pragma unroll
      for (int b = 0; b < B; ++b)
        part[b] += i / NV == b ? ss : 0.f;  // a select: a branch here became an indexed store to local memory
    }
    inv_rms_from_parts<B, K>(part, eps, inv, red);
  }

  // Vector j normalised as the op references do (see rms_normed), in place.
  template <class A> __device__ void normalize(int j, const float* inv, const bf16* norm, const NormRegs<NV, VEC>& nw) {
    const int i = index(j);
    float w[VEC];
    nw.get(norm, j, i % NV, w);
#pragma unroll
    for (int e = 0; e < VEC; ++e) f[j][e] = rms_normed<A>(f[j][e], inv[i / NV], w[e]);
  }

  // All threads, when kFits: x read once, inv[b] = 1/rms(x[b]), then `store(b, v, f)` for every
  // normalised vector v of row b; ends with a barrier. `red` is kWarps * B floats of scratch.
  template <class A, class T, class Store>
  __device__ static void stage_normed(const T* x, const bf16* norm, float eps, float* inv, float* red, Store&& store) {
    XRegs r;
    r.load(x);
    NormRegs<NV, VEC> nw;
    nw.load(norm);
    r.inv_rms(eps, inv, red);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = index(j);
      if (i >= B * NV) break;
      r.template normalize<A>(j, inv, norm, nw);
      store(i / NV, i % NV, r.f[j]);
    }
    __syncthreads();
  }
};

}  // namespace mpk
