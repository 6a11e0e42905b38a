// Matrix-vector tasks (mpk/ops/linear.py): a task owns output columns [c0, c1) for all B sequences
// and streams those weight rows once. Warp w takes columns c0 + w, c0 + w + 8, ...; its lanes split
// the row into packed 16-byte loads, several in flight, and a butterfly reduction gives the sums.
#pragma once

#include "mpk_runtime.cuh"

namespace mpk {

// Bytes of shared memory for the staged input x: the build sets it per architecture (the largest
// dynamic shared memory a CTA may use there, less room for the other scratch).
#ifndef MPK_X_BUDGET
#define MPK_X_BUDGET (96 * 1024)
#endif
constexpr int kXBudget = MPK_X_BUDGET;
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

  // transformers' RMSNorm: normalise in fp32, round to the activation dtype, scale by the weight, round.
  __device__ __forceinline__ static float normed(float v, float inv, float w) { return A::round(w * A::round(v * inv)); }

  // Offset (in elements of T) of chunk v's plane j of sequence b in the staged x.
  __device__ __forceinline__ static int slot(int b, int v, int j) {
    return b * (kRowBytes / static_cast<int>(sizeof(T))) + (j * NV + v) * PW;
  }

  // All threads: 1/rms per sequence, then stage x. Every thread takes a share of packed loads, so the
  // task's start costs a couple of L2 round trips, not one per 32 elements of a row.
  __device__ void prepare(float eps, unsigned char* s) const {
    float* inv = reinterpret_cast<float*>(s + kInvOffset);
    if constexpr (NORM) {
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
      float* red = reinterpret_cast<float*>(s + kRedOffset);
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
    if constexpr (kStaged) {
      for (int i = threadIdx.x; i < B * NV; i += kThreads) {
        const int b = i / NV, v = i - b * NV;
        float f[VEC];
        load_vec<VEC>(x + b * K + v * VEC, f);
        if constexpr (NORM) {
          float w[VEC];
          unpack<VEC>(ld_weight<VEC>(norm + v * VEC), w);
#pragma unroll
          for (int e = 0; e < VEC; ++e) f[e] = normed(f[e], inv[b], w[e]);
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
        for (int e = 0; e < VEC; ++e) f[e] = normed(f[e], inv, w[e]);
      }
    }
  }
};

// One warp: acc[r][b] = dot(W row r0 + r, x[b]) for RPC consecutive rows; every lane gets the sums.
template <int RPC, class In>
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
        w[r][u] = v0 + 32 * u < NV ? ld_weight<VEC>(w_rows + r * K + (v0 + 32 * u) * VEC) : packed_t<VEC>{};
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
// RPC weight rows (rows RPC * c ..) with x, then `epilogue(c, acc)` on every lane of the warp.
template <int RPC, class In, class Epilogue>
__device__ __forceinline__ void for_each_column(const In& in, const bf16* w, int c0, int c1, Epilogue&& epilogue) {
  for (int c = c0 + warp_id(); c < c1; c += kWarps) {
    float acc[RPC][In::kBatch];
    warp_dots<RPC>(in, w + static_cast<size_t>(RPC) * c * In::kK, acc);
    epilogue(c, acc);
  }
}

__device__ __forceinline__ void tile_span(const TaskCtx& t, const OpDesc& op, int& c0, int& c1) {
  const int n = static_cast<int>(op.i[0]), tile = static_cast<int>(op.i[1]);
  c0 = t.tile[0] * tile;
  c1 = min(n, c0 + tile);
  MPK_ASSERT(c0 < c1);
}

// rmsnorm_linear: out[:, c0:c1] = rmsnorm(x) @ W[c0:c1]^T (+ bias).
// ptr {x, norm, weight, bias, out}; i {N, tile}; f {eps}
template <int B, int K, bool BIAS, class A> struct RmsnormLinear {
  using In = GemvInput<B, K, true, A>;
  using T = typename A::T;
  static constexpr int SMEM = In::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const In in{static_cast<const T*>(op.ptr[0]), static_cast<const bf16*>(op.ptr[1]), smem};
    const bf16* w = static_cast<const bf16*>(op.ptr[2]);
    const bf16* bias = static_cast<const bf16*>(op.ptr[3]);
    T* out = static_cast<T*>(op.ptr[4]);
    const int n = static_cast<int>(op.i[0]);
    int c0, c1;
    tile_span(t, op, c0, c1);
    in.prepare(op.f[0], smem);
    for_each_column<1>(in, w, c0, c1, [&](int c, const float (&acc)[1][B]) {
      if (lane_id() != 0) return;
      const float add = BIAS ? to_f(__ldg(bias + c)) : 0.f;
#pragma unroll
      for (int b = 0; b < B; ++b) act_store(out + b * n + c, acc[0][b] + add);
    });
  }
};

// rmsnorm_gate_up_silu: out[:, c] = silu(gate) * up with gate/up rows 2c, 2c+1 of the fused weight.
// ptr {x, norm, weight, out}; i {N, tile}; f {eps}
template <int B, int K, class A> struct RmsnormGateUpSilu {
  using In = GemvInput<B, K, true, A>;
  using T = typename A::T;
  static constexpr int SMEM = In::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const In in{static_cast<const T*>(op.ptr[0]), static_cast<const bf16*>(op.ptr[1]), smem};
    const bf16* w = static_cast<const bf16*>(op.ptr[2]);
    T* out = static_cast<T*>(op.ptr[3]);
    const int n = static_cast<int>(op.i[0]);
    int c0, c1;
    tile_span(t, op, c0, c1);
    in.prepare(op.f[0], smem);
    for_each_column<2>(in, w, c0, c1, [&](int c, const float (&acc)[2][B]) {
      if (lane_id() != 0) return;
#pragma unroll
      for (int b = 0; b < B; ++b) {
        // In bf16, F.linear rounds gate and up, F.silu rounds, the product rounds.
        const float g = A::round(acc[0][b]), u = A::round(acc[1][b]);
        act_store(out + b * n + c, A::round(g / (1.f + expf(-g))) * u);
      }
    });
  }
};

// linear_residual: out[:, c0:c1] = residual[:, c0:c1] + x @ W[c0:c1]^T.
// ptr {x, weight, residual, out}; i {N, tile}
template <int B, int K, class A> struct LinearResidual {
  using In = GemvInput<B, K, false, A>;
  using T = typename A::T;
  static constexpr int SMEM = In::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const In in{static_cast<const T*>(op.ptr[0]), nullptr, smem};
    const bf16* w = static_cast<const bf16*>(op.ptr[1]);
    const T* res = static_cast<const T*>(op.ptr[2]);
    T* out = static_cast<T*>(op.ptr[3]);
    const int n = static_cast<int>(op.i[0]);
    int c0, c1;
    tile_span(t, op, c0, c1);
    in.prepare(0.f, smem);
    for_each_column<1>(in, w, c0, c1, [&](int c, const float (&acc)[1][B]) {
      if (lane_id() != 0) return;
#pragma unroll
      for (int b = 0; b < B; ++b) act_store(out + b * n + c, act_f(res[b * n + c]) + A::round(acc[0][b]));
    });
  }
};

// rmsnorm_lm_head_argmax: logits[:, v0:v1] and the tile's argmax candidate per sequence.
// ptr {x, norm, weight, logits, cand_val, cand_idx}; i {V, tile, n_tiles, vocab_start}; f {eps}
template <int B, int K, class A> struct RmsnormLmHeadArgmax {
  using In = GemvInput<B, K, true, A>;
  static constexpr int kBestOffset = In::SMEM;
  static constexpr int SMEM = kBestOffset + align16(kWarps * B * 4) + align16(kWarps * B * 4);
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const In in{static_cast<const typename A::T*>(op.ptr[0]), static_cast<const bf16*>(op.ptr[1]), smem};
    const bf16* w = static_cast<const bf16*>(op.ptr[2]);
    float* logits = static_cast<float*>(op.ptr[3]);
    float* cand_val = static_cast<float*>(op.ptr[4]);
    long long* cand_idx = static_cast<long long*>(op.ptr[5]);
    const int vocab = static_cast<int>(op.i[0]), n_tiles = static_cast<int>(op.i[2]);
    const long long vocab_start = op.i[3];
    int c0, c1;
    tile_span(t, op, c0, c1);
    MPK_ASSERT(t.tile[0] < n_tiles);
    in.prepare(op.f[0], smem);
    float best[B];
    int best_at[B];
#pragma unroll
    for (int b = 0; b < B; ++b) best[b] = kNegInf, best_at[b] = c0;
    for_each_column<1>(in, w, c0, c1, [&](int c, const float (&acc)[1][B]) {
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float y = A::round(acc[0][b]);  // with bf16 activations the sim's logits are F.linear's bf16 output
        if (lane_id() == 0) logits[static_cast<size_t>(b) * vocab + c] = y;
        if (y > best[b]) best[b] = y, best_at[b] = c;  // columns ascend: the first maximum stays
      }
    });
    float* s_val = reinterpret_cast<float*>(smem + kBestOffset);
    int* s_at = reinterpret_cast<int*>(smem + kBestOffset + align16(kWarps * B * 4));
    if (lane_id() == 0)
#pragma unroll
      for (int b = 0; b < B; ++b) s_val[warp_id() * B + b] = best[b], s_at[warp_id() * B + b] = best_at[b];
    __syncthreads();
    for (int b = threadIdx.x; b < B; b += kThreads) {
      float v = s_val[b];
      int at = s_at[b];
      for (int k = 1; k < kWarps; ++k) {
        const float ov = s_val[k * B + b];
        const int oat = s_at[k * B + b];
        if (ov > v || (ov == v && oat < at)) v = ov, at = oat;
      }
      cand_val[b * n_tiles + t.tile[0]] = v;
      cand_idx[b * n_tiles + t.tile[0]] = vocab_start + at;
    }
  }
};

}  // namespace mpk
