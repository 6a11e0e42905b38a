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

  // Vector f of sequence b, chunk v into the staged planes.
  __device__ static void store(unsigned char* s, int b, int v, const float (&f)[VEC]) {
#pragma unroll
    for (int j = 0; j < NP; ++j)
#pragma unroll
      for (int e = 0; e < PW; ++e) act_store(reinterpret_cast<T*>(s) + slot(b, v, j) + e, A::input(f[j * PW + e]));
  }

  // All threads: 1/rms per sequence, then stage x (packed loads shared by the whole CTA).
  __device__ void prepare(float eps, unsigned char* s) const {
    float* inv = reinterpret_cast<float*>(s + kInvOffset);
    using X = XRegs<B, K, VEC>;
    if constexpr (NORM && kStaged && X::kFits) {  // one pass over x
      X::template stage_normed<A>(x, norm, eps, inv, reinterpret_cast<float*>(s + kRedOffset),
                                  [&](int b, int v, const float (&f)[VEC]) { store(s, b, v, f); });
      return;
    }
    if constexpr (NORM) row_inv_rms<B, K>(x, eps, inv, reinterpret_cast<float*>(s + kRedOffset));
    if constexpr (kStaged && !NORM && !kF32 && K % 8 == 0) {  // bf16 rows, staged as they are (store keeps their bits)
      copy_x_rows<B, K>(x, s, kRowBytes);
    } else if constexpr (kStaged) {
      // Vectors in rounds, all of a round's loads before its stores: 4 at batch 1 (qwen3-8b's down
      // projection, 6 float32 vectors a thread, waits out 2 round trips, not 6); one beyond, where
      // more spill (qwen3-8b batch 2).
      for_each_x_vec<B, K, VEC, NORM, A, B == 1 ? 4 : 1>(x, norm, inv, [&](int b, int v, const float (&f)[VEC]) { store(s, b, v, f); });
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
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = A::input(f[e]);
    }
  }
};

// N weights from a weight head in shared memory, else from global memory: streamed past L1
// (ld_stream), or with kStream false through the read-only path (ld_weight); kFetch: the L2
// prefetch size each load asks for (ld16).
template <int N, bool kShared, bool kStream = true, int kFetch = 0>
__device__ __forceinline__ packed_t<N> ld_w(const bf16* p) {
  if constexpr (kShared && N == 8) return ld_shared16(p);
  else if constexpr (kStream) return ld_stream<N, kFetch>(p);
  else return ld_weight<N, kFetch>(p);
}

// Loads in flight per row per lane when a warp streams `rows` rows of K at once: kLoadsPerLane
// shared between them, no more than a row has.
__host__ __device__ constexpr int loads_per_row(int rows, int K, int VEC) {
  return cmax(1, cmin(kLoadsPerLane / rows, (K / VEC + 31) / 32));
}

// One warp: acc[r][b] = dot(W row r, x[b]) for R weight rows; every lane gets the sums.
// kShared: the rows are in shared memory (a weight head).
template <int R, bool kShared, class In>
__device__ __forceinline__ void warp_dots(const In& in, const bf16* const (&rows)[R], float (&acc)[R][In::kBatch]) {
  constexpr int B = In::kBatch, K = In::kK;
  constexpr int VEC = In::VEC, NV = K / VEC;
  constexpr int U = loads_per_row(R, K, VEC);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
  const int lane = lane_id();
#pragma unroll 1
  for (int v0 = lane; v0 < NV; v0 += 32 * U) {
    packed_t<VEC> w[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        w[r][u] = v0 + 32 * u < NV ? ld_w<VEC, kShared>(rows[r] + (v0 + 32 * u) * VEC) : packed_t<VEC>{};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + 32 * u;
      if (v >= NV) break;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float xf[VEC];
        in.load(b, v, xf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[VEC];
          unpack<VEC>(w[r][u], wf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][b] = fmaf(wf[e], xf[e], acc[r][b]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

// Load rounds (each a full memory latency) warp_dots takes for `cols` columns of RPC rows each.
__host__ __device__ constexpr int load_rounds(int RPC, int K, int VEC, int cols) {
  const int per_row = (K / VEC + 31) / 32;  // loads per lane per row
  const int u = loads_per_row(RPC * cols, K, VEC);
  return (per_row + u - 1) / u;
}

// Columns a warp computes at once. With a short K one column's rows give a lane few loads, so the
// warp loads several of its columns together to keep kLoadsPerLane loads in flight. With a long K
// a column takes more than one round, the last one part-full (K = 12288: 32 loads, then 16), so
// the count with the fewest rounds per column wins (there two columns in three rounds of 2 x 16).
// COLS is the most a warp owns in the op's tiles (codegen knows the tile), so none is loaded for
// nothing.
template <int RPC, int K, int VEC, int COLS> __host__ __device__ constexpr int columns_at_once() {
  int best = cmax(1, cmin(COLS, kLoadsPerLane / (RPC * loads_per_row(RPC, K, VEC))));
  if (load_rounds(RPC, K, VEC, 1) > 1)
    for (int c = 2; c <= COLS && RPC * c <= kLoadsPerLane; ++c)
      if (load_rounds(RPC, K, VEC, c) * best < load_rounds(RPC, K, VEC, best) * c) best = c;
  return best;
}

// Warp w takes columns c0 + w, c0 + w + kWarps, ... of [c0, c1), CPW of them at a time: the dot
// products of each column's RPC weight rows (rows RPC * c ..) with x, then `epilogue(c, acc)` on
// every lane of the warp, columns ascending. The tile's first head_rows rows are in the weight head
// in shared memory; a group of columns that lies wholly inside it is read from there.
template <int RPC, int CPW, class In, class Epilogue>
__device__ __forceinline__ void for_each_column(const In& in, const bf16* w, int c0, int c1, const bf16* head,
                                                int head_rows, Epilogue&& epilogue) {
  constexpr int K = In::kK, R = RPC * CPW;
  for (int first = c0 + warp_id(); first < c1; first += kWarps * CPW) {
    // Columns first, first + kWarps, ...; one past c1 repeats the last real one (loaded, not emitted).
    const int last = first + kWarps * (CPW - 1) < c1 ? first + kWarps * (CPW - 1) : first + (c1 - 1 - first) / kWarps * kWarps;
    const bool shared = In::VEC == 8 && RPC * (last - c0) + RPC <= head_rows;
    const bf16* rows[R];
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      const int c = min(first + kWarps * j, last);
#pragma unroll
      for (int r = 0; r < RPC; ++r)
        rows[j * RPC + r] = shared ? head + static_cast<size_t>(RPC * (c - c0) + r) * K
                                   : w + (static_cast<size_t>(RPC) * c + r) * K;
    }
    float acc[R][In::kBatch];
    if (shared)
      warp_dots<R, true>(in, rows, acc);
    else
      warp_dots<R, false>(in, rows, acc);
#pragma unroll
    for (int j = 0; j < CPW; ++j) {
      const int c = first + kWarps * j;
      if (c >= c1) break;
      float col[RPC][In::kBatch];
#pragma unroll
      for (int r = 0; r < RPC; ++r)
#pragma unroll
        for (int b = 0; b < In::kBatch; ++b) col[r][b] = acc[j * RPC + r][b];
      epilogue(c, col);
    }
  }
}

// The CUDA-core strategy behind the ops' common interface (see gemv.cuh).
template <int RPC, int B, int K, bool NORM, class A, int COLS> struct SimtGemv {
  using In = GemvInput<B, K, NORM, A>;
  static constexpr int SMEM = In::SMEM;
  template <class Epilogue>
  __device__ static void run(const typename A::T* x, const bf16* norm, const bf16* w, int c0, int c1, float eps,
                             unsigned char* smem, const TaskCtx& t, Epilogue&& epilogue) {
    const In in{x, norm, smem};
    in.prepare(eps, smem);
    mark_staged();
    const int head_rows = static_cast<int>(t.head_bytes / (2u * K));
    constexpr int CPW = columns_at_once<RPC, K, In::VEC, COLS>();
    for_each_column<RPC, CPW>(in, w, c0, c1, reinterpret_cast<const bf16*>(t.head), head_rows, epilogue);
    mark_share_done();
  }
};

}  // namespace mpk
