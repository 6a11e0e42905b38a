// GEMV on CUDA cores: warp w takes columns c0 + w, c0 + w + 8, ... of a task; its lanes split each
// weight row into packed 16-byte loads, several in flight, fp32 FMAs against the staged input, and
// a butterfly reduction gives the sums. Any batch, any K.
#pragma once

#include "gemv_base.cuh"

namespace mpk {

// 16-byte weight loads each lane issues before it uses the first: with one CTA of 8 warps per SM,
// 32 loads x 16 B x 256 threads = 128 KB in flight per SM, what HBM latency x per-SM bandwidth needs.
constexpr int kLoadsPerLane = 32;

// The GEMV input: x [B, K] (optionally RMS-normalised) in the activation type A::T, as the op
// references multiply it: bf16 activations give bf16 inputs, float32 activations float32 inputs
// (never rounded to the weights' dtype). Staged in shared memory when it fits, else read from
// global memory (L2) each time.
//
// Lane l multiplies weights [v*VEC, v*VEC + VEC) with v = v0 + l. bf16 rows are stored as they are
// (one 16-byte load per lane, consecutive lanes consecutive). A float32 VEC-chunk is 32 bytes, so
// it is split into NP planes of PW floats, plane j holding elements [v*VEC + j*PW, +PW) of every v:
// each load of a warp then reads one contiguous 512-byte span, free of bank conflicts.
template <int B, int K, bool NORM, class A> struct GemvInput {
  using T = typename A::T;
  static constexpr int VEC = vec_width(K);
  static constexpr int NV = K / VEC;
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int PW = kF32 ? cmin(VEC, 4) : VEC;  // elements per plane load
  static constexpr int NP = VEC / PW;
  static constexpr int kRowBytes = align16(K * static_cast<int>(sizeof(T)));
  static constexpr bool kStaged = B * kRowBytes <= kXBudget;
  static constexpr int kInvOffset = kStaged ? B * kRowBytes : 0;
  static constexpr int kRedOffset = kInvOffset + align16(B * 4);
  static constexpr int SMEM = kRedOffset + align16(kWarps * B * 4);
  static constexpr int kBatch = B, kK = K;

  const T* x;
  const bf16* norm;
  const unsigned char* smem;

  // Offset (in elements of T) of chunk v's plane j of sequence b in the staged x.
  __device__ __forceinline__ static int slot(int b, int v, int j) {
    return b * (kRowBytes / static_cast<int>(sizeof(T))) + (j * NV + v) * PW;
  }

  // All threads: 1/rms per sequence, then stage x (packed loads shared by the whole CTA).
  __device__ void prepare(float eps, unsigned char* s) const {
    float* inv = reinterpret_cast<float*>(s + kInvOffset);
    if constexpr (NORM) row_inv_rms<B, K>(x, eps, inv, reinterpret_cast<float*>(s + kRedOffset));
    if constexpr (kStaged) {
      for (int i = threadIdx.x; i < B * NV; i += kThreads) {
        const int b = i / NV, v = i - b * NV;
        float f[VEC];
        load_vec<VEC>(x + b * K + v * VEC, f);
        if constexpr (NORM) {
          float w[VEC];
          unpack<VEC>(ld_weight<VEC>(norm + v * VEC), w);
#pragma unroll
          for (int e = 0; e < VEC; ++e) f[e] = rms_normed<A>(f[e], inv[b], w[e]);
        }
#pragma unroll
        for (int j = 0; j < NP; ++j)
#pragma unroll
          for (int e = 0; e < PW; ++e) act_store(reinterpret_cast<T*>(s) + slot(b, v, j) + e, f[j * PW + e]);
      }
      __syncthreads();
    }
  }

  // x[b, v*VEC .. v*VEC + VEC) as floats.
  __device__ __forceinline__ void load(int b, int v, float (&f)[VEC]) const {
    if constexpr (kStaged) {
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        float part[PW];
        load_vec<PW>(reinterpret_cast<const T*>(smem) + slot(b, v, j), part);
#pragma unroll
        for (int e = 0; e < PW; ++e) f[j * PW + e] = part[e];
      }
    } else {
      load_vec<VEC>(x + b * K + v * VEC, f);
      if constexpr (NORM) {
        const float inv = reinterpret_cast<const float*>(smem + kInvOffset)[b];
        float w[VEC];
        unpack<VEC>(ld_weight<VEC>(norm + v * VEC), w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[e] = rms_normed<A>(f[e], inv, w[e]);
      }
    }
  }
};

// N weights from global memory (read-only path), or from a weight head in shared memory.
template <int N, bool kShared> __device__ __forceinline__ packed_t<N> ld_w(const bf16* p) {
  if constexpr (kShared && N == 8) return ld_shared16(p);
  else return ld_weight<N>(p);
}

// One warp: acc[r][b] = dot(W row r0 + r, x[b]) for RPC consecutive rows; every lane gets the sums.
// kShared: the rows are in shared memory (a weight head).
template <int RPC, bool kShared, class In>
__device__ __forceinline__ void warp_dots(const In& in, const bf16* w_rows, float (&acc)[RPC][In::kBatch]) {
  constexpr int B = In::kBatch, K = In::kK;
  constexpr int VEC = In::VEC, NV = K / VEC;
  constexpr int U = cmax(1, cmin(kLoadsPerLane / RPC, (NV + 31) / 32));  // loads in flight per row per lane
#pragma unroll
  for (int r = 0; r < RPC; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
  const int lane = lane_id();
#pragma unroll 1
  for (int v0 = lane; v0 < NV; v0 += 32 * U) {
    packed_t<VEC> w[RPC][U];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < RPC; ++r)
        w[r][u] = v0 + 32 * u < NV ? ld_w<VEC, kShared>(w_rows + r * K + (v0 + 32 * u) * VEC) : packed_t<VEC>{};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + 32 * u;
      if (v >= NV) break;
      float wf[RPC][VEC];
#pragma unroll
      for (int r = 0; r < RPC; ++r) unpack<VEC>(w[r][u], wf[r]);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float xf[VEC];
        in.load(b, v, xf);
#pragma unroll
        for (int r = 0; r < RPC; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][b] = fmaf(wf[r][e], xf[e], acc[r][b]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RPC; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

// Warp w takes columns c0 + w, c0 + w + kWarps, ... of [c0, c1): the dot products of each column's
// RPC weight rows (rows RPC * c ..) with x, then `epilogue(c, acc)` on every lane of the warp. The
// tile's first head_rows rows are read from the weight head in shared memory.
template <int RPC, class In, class Epilogue>
__device__ __forceinline__ void for_each_column(const In& in, const bf16* w, int c0, int c1, const bf16* head,
                                                int head_rows, Epilogue&& epilogue) {
  constexpr int K = In::kK;
  for (int c = c0 + warp_id(); c < c1; c += kWarps) {
    float acc[RPC][In::kBatch];
    const int local = RPC * (c - c0);  // the column's first row within the tile
    if (In::VEC == 8 && local + RPC <= head_rows)
      warp_dots<RPC, true>(in, head + static_cast<size_t>(local) * K, acc);
    else
      warp_dots<RPC, false>(in, w + static_cast<size_t>(RPC) * c * K, acc);
    epilogue(c, acc);
  }
}

// The CUDA-core strategy behind the ops' common interface (see gemv.cuh).
template <int RPC, int B, int K, bool NORM, class A> struct SimtGemv {
  using In = GemvInput<B, K, NORM, A>;
  static constexpr int SMEM = In::SMEM;
  template <class Epilogue>
  __device__ static void run(const typename A::T* x, const bf16* norm, const bf16* w, int c0, int c1, float eps,
                             unsigned char* smem, const TaskCtx& t, Epilogue&& epilogue) {
    const In in{x, norm, smem};
    in.prepare(eps, smem);
    const int head_rows = static_cast<int>(t.head_bytes / (2u * K));
    for_each_column<RPC>(in, w, c0, c1, reinterpret_cast<const bf16*>(t.head), head_rows, epilogue);
  }
};

}  // namespace mpk
