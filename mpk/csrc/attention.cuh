// Attention tasks (mpk/ops/attention.py): flash-decoding splits and their merge, with q/k-norm, RoPE and
// the KV append folded in, or for graphs of short contexts one pass per (b, g) that does both. A task
// covers one sequence b and one KV group g, whose QPK query heads share one K/V head; the group's QKV
// rows are its q heads, then k, then v. The KV cache's element type KT (bf16 or float) is chosen apart
// from the activation policy A.
#pragma once

#include <type_traits>

#include "mma.cuh"
#include "mpk_runtime.cuh"

namespace mpk {

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// The value a KV cache of element type KT holds.
template <class KT> __device__ __forceinline__ float kv_round(float x) {
  if constexpr (std::is_same_v<KT, bf16>) {
    return round_bf(x);
  } else {
    return x;
  }
}

// Rows [r0, r1) that split s of `splits` attends to at `step`: an even share of [lo, step], lo from the
// sliding window (mpk.ops.attention.split_rows). The last split always holds `step` itself.
__device__ __forceinline__ void split_rows(long long step, long long window, int s, int splits, long long& r0,
                                           long long& r1) {
  const long long lo = window > 0 ? max(0ll, step + 1 - window) : 0ll;
  const long long n = step + 1 - lo;
  r0 = lo + n * s / splits;
  r1 = lo + n * (s + 1) / splits;
}

// One warp: a head's HD activations into registers, lane l holding elements l, l + 32, ... (0 past HD).
// Callers load the whole head before any store: their stores go through generic pointers that may
// alias x, so a store between two loads would hold the second behind the first's round trip.
template <int HD, class T> __device__ __forceinline__ void load_head(const T* x, float (&v)[(HD + 31) / 32]) {
#pragma unroll
  for (int e = 0; e < (HD + 31) / 32; ++e) v[e] = lane_id() + 32 * e < HD ? act_f(x[lane_id() + 32 * e]) : 0.f;
}

// One warp: buf[0, HD) = rope(norm(x)) of one head as the sim computes it in the activation precision (norm
// output, cos/sin and each product rounded). `rope` is the position's table row: cos, then sin. The norm
// weights and the RoPE row depend on nothing the step computes, so they load with x: one round trip
// before the head's arithmetic, not three in a row.
template <int HD, bool NORM, class A>
__device__ void norm_rope_head(const typename A::T* x, const bf16* w, float eps, const float* rope, float* buf) {
  constexpr int H2 = HD / 2, E = (HD + 31) / 32;
  const int lane = lane_id();
  float wn[E], c[E], s[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e, j = d < H2 ? d : d - H2;
    wn[e] = NORM && d < HD ? to_f(__ldg(w + d)) : 0.f;
    c[e] = d < HD ? A::round(__ldg(rope + j)) : 0.f;
    s[e] = d < HD ? A::round(__ldg(rope + H2 + j)) : 0.f;
  }
  float xv[E];
  load_head<HD>(x, xv);
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (lane + 32 * e < HD) buf[lane + 32 * e] = xv[e];
    ss += xv[e] * xv[e];
  }
  if constexpr (NORM) {
    const float inv = rsqrtf(warp_sum(ss) / HD + eps);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      if (d < HD) buf[d] = A::round(wn[e] * A::round(buf[d] * inv));
    }
  }
  __syncwarp();
  float out[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d < HD) {
      const float rot = d < H2 ? -buf[d + H2] : buf[d - H2];
      out[e] = A::round(A::round(buf[d] * c[e]) + A::round(rot * s[e]));
    }
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (lane + 32 * e < HD) buf[lane + 32 * e] = out[e];
  __syncwarp();
}

// How a warp reads K/V rows of HD elements of type KT: a row is C chunks of V elements (16 bytes when HD
// allows), LPR lanes share a row (chunks sub, sub + LPR, ...), so a warp holds RPW rows per load.
template <int HD, class KT> struct KvLanes {
  static constexpr int largest_vec(int v) { return HD % v == 0 ? v : largest_vec(v / 2); }
  static constexpr int pow2_at_least(int n, int p = 1) { return p >= n ? p : pow2_at_least(n, 2 * p); }
  static constexpr int V = largest_vec(16 / static_cast<int>(sizeof(KT)));
  static constexpr int C = HD / V;
  static constexpr int LPR = cmin(32, pow2_at_least(C));
  static constexpr int RPW = 32 / LPR;
  static constexpr int NV = (C + LPR - 1) / LPR;  // chunks per lane
  static constexpr int E = NV * V;                // elements per lane
  static constexpr int NW = V * static_cast<int>(sizeof(KT)) / 4;  // 32-bit words per chunk
  static_assert(NW >= 1 && C * V == HD, "K/V rows must be whole 32-bit words");

  // One chunk as raw words (coherent loads: other SMs write the cache during the launch).
  __device__ __forceinline__ static void load(const KT* p, unsigned (&w)[NW]) {
    if constexpr (NW == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (NW == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x, w[1] = v.y;
    } else {
      w[0] = *reinterpret_cast<const unsigned*>(p);
    }
  }
  // Element i of a chunk (exact: bf16 is the top half of a float).
  __device__ __forceinline__ static float elem(const unsigned (&w)[NW], int i) {
    if constexpr (std::is_same_v<KT, bf16>) {
      return __uint_as_float(i & 1 ? w[i / 2] & 0xffff0000u : w[i / 2] << 16);
    } else {
      return __uint_as_float(w[i]);
    }
  }
  // A lane's E elements of a row, from its NV chunks.
  __device__ __forceinline__ static void unpack_row(const unsigned (&w)[NV][NW], float (&f)[E]) {
#pragma unroll
    for (int j = 0; j < NV; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) f[j * V + i] = elem(w[j], i);
  }
};

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// attention_split: softmax attention of group g's query heads over split s's rows [r0, r1) of [lo, step].
// Rows below `step` come from the cache; row `step` (last split only) is this step's k and v, computed here
// from the QKV output (the merge appends them to the cache). Each warp takes a round of rows at a time
// (16-byte loads, the next rounds streaming into L2) with an online softmax in float32 (log2 domain): on
// tensor cores for bf16 caches (mma_rows), else on CUDA cores (simt_rows); warps and the current row
// meet at the end.
// Writes the split's normalised output and log-sum-exp; an empty split writes zeros and -inf.
// ONE_PASS: the only split of (b, g) (attention, no merge): writes the attention output itself and
// appends this step's k and v at row `step` of the cache, which it does not read.
template <class S, int QPK, int HD, bool QKNORM, class A, class KT, bool RING = false, bool ONE_PASS = false,
          class O = typename A::T>
struct AttentionSplit {
  using T = typename A::T;
  using L = KvLanes<HD, KT>;
  static constexpr int E = L::E;
  // U row loads in flight per lane: q and acc take 2 QPK E registers, each of the U rows its raw words and
  // QPK scores; a total of ~165 leaves room for the rest within 255 registers. U <= 8, <= 32 rows a warp.
  static constexpr int kRegs = 165 - 2 * QPK * E, kPerRow = 2 * L::NV * L::NW + QPK;
  static constexpr int U = cmax(1, cmin(cmin(8, kRegs / kPerRow), 32 / L::RPW));
  // Tensor cores where the cache is bf16, a row is whole 32-dim blocks and a group's query heads fit
  // an mma's 8 rows (mma_rows); CUDA cores otherwise (simt_rows).
  static constexpr bool kMma = std::is_same_v<KT, bf16> && HD % 32 == 0 && QPK <= 8;
  static constexpr int kRowsPerWarp = kMma ? 16 : U * L::RPW;  // rows in flight per warp
  static constexpr long long kCtaRows = static_cast<long long>(kWarps) * kRowsPerWarp;  // a round of the CTA
  static constexpr int kHeadsOff = 0;               // float [QPK + 2][HD]: q heads, k, v of this step
  static constexpr int kNowOff = kHeadsOff + align16((QPK + 2) * HD * 4);  // float [QPK]: scores of row step
  static constexpr int kStatOff = kNowOff + align16(QPK * 4);              // float [2][kWarps][QPK]: m, l
  static constexpr int kAccOff = kStatOff + align16(2 * kWarps * QPK * 4);  // float [kWarps][QPK][HD]
  // RING (splits that may hold mpk.graph.ATTN_RING_ROWS rows or more): attention on tensor cores keeps
  // kRing rounds of a warp's K/V rows in a shared-memory ring filled by cp.async, kRing - 1 of them in
  // flight while one is used, instead of one round in registers behind an L2 prefetch (whose loads
  // ptxas serialises: the V loads wait for the scores, which wait for the K loads). The first rounds
  // are issued as the task starts, before the heads' prologue: the cache rows below `step` depend on
  // nothing the step computes, and in shared memory they hold no registers across the prologue. On an
  // H200 the ring made qwen3-8b's batch-4 step at 4,096 positions 6% faster, and its batch-1 step
  // (2-3 rounds a warp) 1.2% slower (docs/perf.md); one kernel with both paths chosen at run time was
  // slower than either. Head dims under 128 keep the registers: llama-3.2-1b's (64) batch-4 step at
  // 4,096 positions was 1.3% slower with 2 stages of its 4 KB rounds, 4.8% with 4. A stage holds a
  // lane's 16-byte pieces (k0, k1, v0, v1 of each 32-dim block), piece-major so that a warp's read of
  // one piece is 512 contiguous bytes; each lane reads back only what it copied, so no barrier. A ring
  // that does not fit in shared memory is not built. MPK_ATTN_RING (build knob) sets kRing for A/B
  // (0: no ring).
#ifndef MPK_ATTN_RING
#define MPK_ATTN_RING 2
#endif
  static constexpr int kPieces = 4 * (HD / 32);
  static constexpr int kStageBytes = kPieces * 32 * 16;
  static constexpr int kRingOff = kAccOff + kWarps * QPK * HD * 4;  // uint4 [kWarps][kRing][kPieces][32]
  static constexpr bool kRingFits = kRingOff + kWarps * MPK_ATTN_RING * kStageBytes <= kSmemCap - kStaticSmem;
  static constexpr int kRing = RING && kMma && HD >= 128 && kRingFits ? MPK_ATTN_RING : 0;
  // A split without the ring issues each round's 16 loads at once (mma_rows), and takes Q's fragments
  // from a per-warp copy in shared memory (uint4 [kWarps][HD / 32][2][32], where the ring would be) to
  // make room for them in registers. The one-pass attention of short contexts (a round or two a warp)
  // keeps the compiler's order: there the same change made qwen3-0.6b's batch-1 step 1% slower on an
  // H200, where batch 1 at 4,096 positions (16 splits of 259 rows) was 2.1% faster (docs/perf.md).
  static constexpr bool kLoadsFirst = kMma && kRing == 0 && !ONE_PASS;
  static constexpr int kQFragBytes = kLoadsFirst ? kWarps * (HD / 32) * 2 * 32 * 16 : 0;
  static constexpr int SMEM = kRingOff + cmax(kWarps * kRing * kStageBytes, kQFragBytes);

  // Warp-wide: pull sequence b's K and V rows [r, r + kRowsPerWarp) below `end` into L2 (128-byte lines).
  __device__ __forceinline__ static void prefetch_rows(const TaskCtx& t, int b, int seq, const KT* k, const KT* v,
                                                       size_t stride, long long r, long long end) {
    constexpr int kLineElems = 128 / static_cast<int>(sizeof(KT)), kLines = (HD + kLineElems - 1) / kLineElems;
    constexpr int kPerTensor = kRowsPerWarp * kLines;
    for (int i = lane_id(); i < 2 * kPerTensor; i += 32) {
      const int rest = i % kPerTensor;
      const long long row = r + rest / kLines;
      if (row < end)
        prefetch_l2((i < kPerTensor ? k : v) + t.kv_row(b, row, seq) * stride + (rest % kLines) * kLineElems);
    }
  }

  // One warp on CUDA cores: U x RPW rows per load round (lanes split across rows when HD is small), an
  // online softmax per row slot; the slots meet, then the warp's m, l and unnormalised output go to
  // s_m, s_l and s_acc.
  __device__ static void simt_rows(const TaskCtx& t, int b, int seq, const KT* k_col, const KT* v_col, size_t stride,
                                   long long r0, long long end, const float* heads, float qscale, float* s_m,
                                   float* s_l, float* s_acc) {
    const int lane = lane_id(), warp = warp_id();
    const int slot = lane / L::LPR, sub = lane % L::LPR;
    float qf[QPK][E], m[QPK], l[QPK], acc[QPK][E];
#pragma unroll
    for (int h = 0; h < QPK; ++h) {
#pragma unroll
      for (int j = 0; j < L::NV; ++j) {
        const int c = sub + j * L::LPR;
#pragma unroll
        for (int i = 0; i < L::V; ++i) qf[h][j * L::V + i] = c < L::C ? heads[h * HD + c * L::V + i] * qscale : 0.f;
      }
      m[h] = kNegInf, l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
    }

    for (long long base = r0 + warp * kRowsPerWarp; base < end; base += kCtaRows) {
      prefetch_rows(t, b, seq, k_col, v_col, stride, base + 2 * kCtaRows, end);
      unsigned kw[U][L::NV][L::NW], vw[U][L::NV][L::NW];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const long long row = min(base + u * L::RPW + slot, end - 1);  // past the end: a valid row, masked below
        const size_t at = t.kv_row(b, row, seq) * stride;
#pragma unroll
        for (int j = 0; j < L::NV; ++j) {
          const int c = sub + j * L::LPR;
          if (c < L::C) {
            L::load(k_col + at + c * L::V, kw[u][j]);
            L::load(v_col + at + c * L::V, vw[u][j]);
          } else {
#pragma unroll
            for (int w = 0; w < L::NW; ++w) kw[u][j][w] = vw[u][j][w] = 0u;
          }
        }
      }
      float sc[U][QPK];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float kf[E];
        L::unpack_row(kw[u], kf);
        const bool valid = base + u * L::RPW + slot < end;
#pragma unroll
        for (int h = 0; h < QPK; ++h) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) dot = fmaf(qf[h][e], kf[e], dot);
#pragma unroll
          for (int o = L::LPR / 2; o; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
          sc[u][h] = valid ? dot : kNegInf;
        }
      }
      // One rescale per head for all U rows: the new max, then every row's weight against it.
      float ref[QPK];
#pragma unroll
      for (int h = 0; h < QPK; ++h) {
        float mx = m[h];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[u][h]);
        ref[h] = mx == kNegInf ? 0.f : mx;  // a slot with no rows yet keeps l = acc = 0
        const float corr = exp2f(m[h] - ref[h]);
        l[h] *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] *= corr;
        m[h] = mx;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float vf[E];
        L::unpack_row(vw[u], vf);
#pragma unroll
        for (int h = 0; h < QPK; ++h) {
          const float p = exp2f(sc[u][h] - ref[h]);
          l[h] += p;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
        }
      }
    }

    // The warp's row slots meet (lanes sub of every slot hold the same dims), then the warps in shared memory.
#pragma unroll
    for (int o = L::LPR; o < 32; o <<= 1) {
#pragma unroll
      for (int h = 0; h < QPK; ++h) {
        const float mo = __shfl_xor_sync(0xffffffffu, m[h], o), lo = __shfl_xor_sync(0xffffffffu, l[h], o);
        const float mx = fmaxf(m[h], mo), ref = mx == kNegInf ? 0.f : mx;
        const float fa = exp2f(m[h] - ref), fb = exp2f(mo - ref);
        l[h] = l[h] * fa + lo * fb;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = acc[h][e] * fa + __shfl_xor_sync(0xffffffffu, acc[h][e], o) * fb;
        m[h] = mx;
      }
    }
    if (slot == 0) {
#pragma unroll
      for (int h = 0; h < QPK; ++h) {
        if (lane == 0) s_m[warp * QPK + h] = m[h], s_l[warp * QPK + h] = l[h];
#pragma unroll
        for (int j = 0; j < L::NV; ++j) {
          const int c = sub + j * L::LPR;
          if (c < L::C)
#pragma unroll
            for (int i = 0; i < L::V; ++i) s_acc[(warp * QPK + h) * HD + c * L::V + i] = acc[h][j * L::V + i];
        }
      }
    }
  }

  // One warp: the ring's rounds of [first, end) and this lane's stage pieces (uint4 [kRing][kPieces][32]).
  __device__ __forceinline__ static int ring_rounds(long long first, long long end) {
    return first < end ? static_cast<int>((end - first + kCtaRows - 1) / kCtaRows) : 0;
  }
  __device__ __forceinline__ static uint4* ring_of_lane(unsigned char* smem) {
    return reinterpret_cast<uint4*>(smem + kRingOff) + static_cast<size_t>(warp_id()) * kRing * kPieces * 32 + lane_id();
  }
  // One warp: round i of its rows [first, end) copied into stage i % kRing (lane (g, q): rows g and 8 + g,
  // past the end a valid row, masked later, at dims 32 blk + 8 q). Commits no group.
  __device__ static void issue_round(const TaskCtx& t, int b, int seq, const KT* k_col, const KT* v_col, size_t stride,
                                     long long first, long long end, int i, uint4* mine) {
    constexpr int NB = HD / 32;
    const int g = lane_id() >> 2, q = lane_id() & 3;
    const long long base = first + i * kCtaRows;
    const size_t at0 = t.kv_row(b, min(base + g, end - 1), seq) * stride + 8 * q;
    const size_t at1 = t.kv_row(b, min(base + 8 + g, end - 1), seq) * stride + 8 * q;
    uint4* stage = mine + (i % kRing) * kPieces * 32;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk) {
      cp_async16(stage + (4 * blk + 0) * 32, k_col + at0 + 32 * blk, true);
      cp_async16(stage + (4 * blk + 1) * 32, k_col + at1 + 32 * blk, true);
      cp_async16(stage + (4 * blk + 2) * 32, v_col + at0 + 32 * blk, true);
      cp_async16(stage + (4 * blk + 3) * 32, v_col + at1 + 32 * blk, true);
    }
  }

  // One warp on tensor cores, 16 rows of [r0, end) per round (lane (g, q) loads rows g and 8 + g, 16 bytes
  // of each 32-dim block: dims 32 blk + 8 q ..). Scores S = Q K^T take Q as mma's A with each head's bf16
  // hi part in row h and its lo part in row 8 + h, so a score is the float32 product to ~2^-17; the
  // softmax weights P go in the same way into O += P V. The score fragment of Q K^T is P's A fragment
  // (rows 2q, 2q + 1, 8 + 2q, 9 + 2q of the round); V's B fragment is its rows transposed in registers
  // (movmatrix), the dims of each n-tile permuted within the lane's 8-dim chunk. The dot products'
  // dim order is free (Q's fragments follow K's loads), so every load is a row's 16 contiguous bytes.
  //
  // Without the ring, a round's rows come straight from global memory, and ptxas would issue the V loads
  // after the scores, which wait for the K loads: two or three L2 round trips a round. In a split
  // (kLoadsFirst) the scores start from a zero that depends on every loaded word (`opaque_zero`, 0 at run
  // time but not to the compiler), so all 16 loads of a round are issued before its first product.
  __device__ static void mma_rows(const TaskCtx& t, int b, int seq, const KT* k_col, const KT* v_col, size_t stride,
                                  long long r0, long long end, const float* heads, float qscale, float* s_m,
                                  float* s_l, float* s_acc, unsigned char* smem, unsigned opaque_zero) {
    constexpr int NB = HD / 32;
    const int lane = lane_id(), warp = warp_id(), g = lane >> 2, q = lane & 3;
    const bool real = g < QPK;  // mma rows past the group's heads are zero
    uint4 qa[NB][2];
#pragma unroll
    for (int blk = 0; blk < NB; ++blk)
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = real ? heads[g * HD + 32 * blk + 8 * q + 4 * ks + e] * qscale : 0.f;
        pack_bf2_split(x[0], x[1], qa[blk][ks].x, qa[blk][ks].y);
        pack_bf2_split(x[2], x[3], qa[blk][ks].z, qa[blk][ks].w);
      }
    uint4* q_mine = reinterpret_cast<uint4*>(smem + kRingOff) + warp * NB * 2 * 32 + lane;  // kQFragBytes
    if constexpr (kLoadsFirst)
#pragma unroll
      for (int blk = 0; blk < NB; ++blk)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) q_mine[(2 * blk + ks) * 32] = qa[blk][ks];
    // Q's fragment (blk, ks): this lane's own copy in shared memory (kLoadsFirst), or its registers.
    auto q_frag = [&](int blk, int ks) -> uint4 {
      if constexpr (kLoadsFirst) {
        return ld_shared16(q_mine + (2 * blk + ks) * 32);  // volatile: not folded back into registers
      } else {
        return qa[blk][ks];
      }
    };
    float o[NB][4][4], m = kNegInf, l = 0.f;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[blk][j][e] = 0.f;

    // The round at base, its rows' pieces already in k0, k1, v0, v1.
    auto use_round = [&](long long base, const uint4 (&k0)[NB], const uint4 (&k1)[NB], const uint4 (&v0)[NB],
                     const uint4 (&v1)[NB]) {
      unsigned every = 0u;  // every loaded word, for the register path's zero
      if constexpr (kLoadsFirst)
#pragma unroll
        for (int blk = 0; blk < NB; ++blk)
          every |= k0[blk].x | k0[blk].y | k0[blk].z | k0[blk].w | k1[blk].x | k1[blk].y | k1[blk].z | k1[blk].w |
                   v0[blk].x | v0[blk].y | v0[blk].z | v0[blk].w | v1[blk].x | v1[blk].y | v1[blk].z | v1[blk].w;
      const float zero = __uint_as_float(every & opaque_zero);
      float s0[4] = {zero, 0.f, 0.f, 0.f}, s1[4] = {zero, 0.f, 0.f, 0.f};
#pragma unroll
      for (int blk = 0; blk < NB; ++blk) {
        const uint4 a0 = q_frag(blk, 0), a1 = q_frag(blk, 1);
        mma_16816(s0, a0.x, a0.y, a0.z, a0.w, k0[blk].x, k0[blk].y);
        mma_16816(s0, a1.x, a1.y, a1.z, a1.w, k0[blk].z, k0[blk].w);
        mma_16816(s1, a0.x, a0.y, a0.z, a0.w, k1[blk].x, k1[blk].y);
        mma_16816(s1, a1.x, a1.y, a1.z, a1.w, k1[blk].z, k1[blk].w);
      }
      // Head g's scores of rows base + 2q, + 1, base + 8 + 2q, + 1: hi part plus lo part.
      float sc[4] = {s0[0] + s0[2], s0[1] + s0[3], s1[0] + s1[2], s1[1] + s1[3]};
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (base + 8 * (i >> 1) + 2 * q + (i & 1) >= end) sc[i] = kNegInf;
      float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m, mx), ref = mn == kNegInf ? 0.f : mn, corr = exp2f(m - ref);
      float p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = exp2f(sc[i] - ref);
      l = l * corr + (p[0] + p[1]) + (p[2] + p[3]);
      m = mn;
      const bool rescale = __any_sync(0xffffffffu, corr != 1.f);  // none once the warp's maxima settle
      unsigned pa0, pa1, pa2, pa3;
      pack_bf2_split(p[0], p[1], pa0, pa1);
      pack_bf2_split(p[2], p[3], pa2, pa3);
#pragma unroll
      for (int blk = 0; blk < NB; ++blk) {
        const unsigned va[4] = {v0[blk].x, v0[blk].y, v0[blk].z, v0[blk].w};
        const unsigned vb[4] = {v1[blk].x, v1[blk].y, v1[blk].z, v1[blk].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (rescale)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[blk][j][e] *= corr;
          mma_16816(o[blk][j], pa0, pa1, pa2, pa3, transpose8x8(va[j]), transpose8x8(vb[j]));
        }
      }
    };
    const long long first = r0 + warp * kRowsPerWarp;
    if constexpr (kRing > 0) {  // run() has issued rounds 0 .. kRing - 1, a group each
      const int rounds = ring_rounds(first, end);
      uint4* mine = ring_of_lane(smem);
      for (int i = 0; i < rounds; ++i) {
        cp_async_wait<kRing - 1>();  // this lane's copies of round i are in
        const uint4* stage = mine + (i % kRing) * kPieces * 32;
        uint4 k0[NB], k1[NB], v0[NB], v1[NB];
#pragma unroll
        for (int blk = 0; blk < NB; ++blk) {
          k0[blk] = stage[(4 * blk + 0) * 32], k1[blk] = stage[(4 * blk + 1) * 32];
          v0[blk] = stage[(4 * blk + 2) * 32], v1[blk] = stage[(4 * blk + 3) * 32];
        }
        use_round(first + i * kCtaRows, k0, k1, v0, v1);
        // Round i + kRing into the stage just used: its pieces went into this round's products above.
        if (i + kRing < rounds) issue_round(t, b, seq, k_col, v_col, stride, first, end, i + kRing, mine);
        cp_async_commit();
      }
    } else {
      for (long long base = first; base < end; base += kCtaRows) {
        prefetch_rows(t, b, seq, k_col, v_col, stride, base + 2 * kCtaRows, end);
        const size_t at0 = t.kv_row(b, min(base + g, end - 1), seq) * stride + 8 * q;  // past the end: masked
        const size_t at1 = t.kv_row(b, min(base + 8 + g, end - 1), seq) * stride + 8 * q;
        uint4 k0[NB], k1[NB], v0[NB], v1[NB];
#pragma unroll
        for (int blk = 0; blk < NB; ++blk) {
          k0[blk] = *reinterpret_cast<const uint4*>(k_col + at0 + 32 * blk);
          k1[blk] = *reinterpret_cast<const uint4*>(k_col + at1 + 32 * blk);
          v0[blk] = *reinterpret_cast<const uint4*>(v_col + at0 + 32 * blk);
          v1[blk] = *reinterpret_cast<const uint4*>(v_col + at1 + 32 * blk);
        }
        use_round(base, k0, k1, v0, v1);
      }
    }
    // Lanes 4g .. 4g + 3 hold head g: their l parts meet; n-tile j of block blk holds dims 32 blk + 8 q + 2 j, + 1.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (!real) return;
    if (q == 0) s_m[warp * QPK + g] = m, s_l[warp * QPK + g] = l;
    float* acc = s_acc + (warp * QPK + g) * HD + 8 * q;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[32 * blk + 2 * j] = o[blk][j][0] + o[blk][j][2];
        acc[32 * blk + 2 * j + 1] = o[blk][j][1] + o[blk][j][3];
      }
  }

  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const int G = static_cast<int>(op.i[S::groups]), seq = static_cast<int>(op.i[S::seq]);
    int splits = 1;
    if constexpr (!ONE_PASS) splits = static_cast<int>(op.i[S::splits]);
    const int b = t.tile[0], g = t.tile[1], s = ONE_PASS ? 0 : t.tile[2];
    const long long pos = t.position(b);
    MPK_ASSERT(g < G && s < splits && 0 <= pos && pos < seq);
    const size_t bgs = (static_cast<size_t>(b) * G + g) * splits + s;
    float *part = nullptr, *lse = nullptr;
    if constexpr (!ONE_PASS) part = op.arg<float>(S::part) + bgs * QPK * HD, lse = op.arg<float>(S::lse) + bgs * QPK;
    long long r0, r1;
    split_rows(pos, op.i[S::window], s, splits, r0, r1);
    if (!ONE_PASS && r1 <= r0) {  // uniform over the CTA (ONE_PASS always holds row `pos`)
      for (int i = threadIdx.x; i < QPK * HD; i += kThreads) part[i] = 0.f;
      for (int i = threadIdx.x; i < QPK; i += kThreads) lse[i] = kNegInf;
      return;
    }
    const bool now = r1 == pos + 1;      // this split holds the current row
    const long long end = min(r1, pos);  // cache rows [r0, end)
    const size_t stride = static_cast<size_t>(G) * HD;  // between consecutive rows of one column
    const KT* k_col = op.arg<const KT>(S::k_cache) + g * HD;  // row r of sequence b: + t.kv_row(b, r, seq) * stride
    const KT* v_col = op.arg<const KT>(S::v_cache) + g * HD;
    const int lane = lane_id(), warp = warp_id();
    // The first rows stream in while the prologue below works on this step's heads: into the ring's
    // stages, or into L2.
    if constexpr (kRing > 0) {
      const long long first = r0 + warp * kRowsPerWarp;
      const int rounds = ring_rounds(first, end);
      uint4* mine = ring_of_lane(smem);
#pragma unroll
      for (int i = 0; i < kRing; ++i) {
        if (i < rounds) issue_round(t, b, seq, k_col, v_col, stride, first, end, i, mine);
        cp_async_commit();
      }
    } else {
      for (int k = 0; k < 2; ++k)
        prefetch_rows(t, b, seq, k_col, v_col, stride, r0 + k * kCtaRows + warp * kRowsPerWarp, end);
    }

    float* heads = reinterpret_cast<float*>(smem + kHeadsOff);
    float* s_now = reinterpret_cast<float*>(smem + kNowOff);
    const T* src = op.arg<const T>(S::qkv) + (static_cast<size_t>(b) * G + g) * (QPK + 2) * HD;
    const float* rope = op.arg<const float>(S::rope) + pos * HD;
    const float eps = op.f[S::eps];
    for (int h = warp; h < (now ? QPK + 2 : QPK); h += kWarps) {
      float* buf = heads + h * HD;
      if (h == QPK + 1) {
        constexpr int E = (HD + 31) / 32;
        float vv[E];
        load_head<HD>(src + h * HD, vv);
#pragma unroll
        for (int e = 0; e < E; ++e)
          if (lane + 32 * e < HD) buf[lane + 32 * e] = kv_round<KT>(vv[e]);
      } else {
        norm_rope_head<HD, QKNORM, A>(src + h * HD, op.arg<const bf16>(h < QPK ? S::q_norm : S::k_norm), eps, rope,
                                      buf);
        if (h == QPK)
          for (int d = lane; d < HD; d += 32) buf[d] = kv_round<KT>(buf[d]);
      }
    }
    __syncthreads();
    mark_staged();
    const float qscale = op.f[S::scale] * kLog2e;
    if (now) {
      for (int h = warp; h < QPK; h += kWarps) {
        float dot = 0.f;
        for (int d = lane; d < HD; d += 32) dot = fmaf(heads[h * HD + d], heads[QPK * HD + d], dot);
        dot = warp_sum(dot);
        if (lane == 0) s_now[h] = dot * qscale;
      }
    }

    float* s_m = reinterpret_cast<float*>(smem + kStatOff);
    float* s_l = s_m + kWarps * QPK;
    float* s_acc = reinterpret_cast<float*>(smem + kAccOff);
    if constexpr (kMma) {
      // A window is a count of positions, far below 2^62: its top bits are the zero mma_rows needs.
      const unsigned opaque_zero = static_cast<unsigned>(static_cast<unsigned long long>(op.i[S::window]) >> 62);
      mma_rows(t, b, seq, k_col, v_col, stride, r0, end, heads, qscale, s_m, s_l, s_acc, smem, opaque_zero);
    } else {
      simt_rows(t, b, seq, k_col, v_col, stride, r0, end, heads, qscale, s_m, s_l, s_acc);
    }
    mark_share_done();
    __syncthreads();
    const float* v_now = heads + (QPK + 1) * HD;
    for (int i = threadIdx.x; i < QPK * HD; i += kThreads) {
      const int h = i / HD, d = i % HD;
      float mx = now ? s_now[h] : kNegInf;
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * QPK + h]);
      float den = 0.f, num = 0.f;
      if (now) {
        den = exp2f(s_now[h] - mx);
        num = den * v_now[d];
      }
      for (int w = 0; w < kWarps; ++w) {
        if (s_m[w * QPK + h] == kNegInf) continue;  // a warp that saw no rows
        const float f = exp2f(s_m[w * QPK + h] - mx);
        den += s_l[w * QPK + h] * f;
        num += s_acc[(w * QPK + h) * HD + d] * f;
      }
      if constexpr (ONE_PASS) {
        act_store(op.arg<O>(S::out) + (static_cast<size_t>(b) * G + g) * QPK * HD + i, num / den);
      } else {
        part[i] = num / den;
        if (d == 0) lse[h] = (mx + log2f(den)) * kLn2;
      }
    }
    if constexpr (ONE_PASS) {  // row `pos`: read by no task of this step, by the next step's after the event chain
      const size_t row = (t.kv_row(b, pos, seq) * G + g) * HD;
      for (int d = threadIdx.x; d < HD; d += kThreads) {
        act_store(op.arg<KT>(S::k_cache) + row + d, heads[QPK * HD + d]);
        act_store(op.arg<KT>(S::v_cache) + row + d, v_now[d]);
      }
    }
  }
};

// attention: one task per (b, g) over all of [lo, step], for graphs whose context is short enough that
// splitting the rows would cost more (a merge phase) than it saves (mpk.graph.attention_splits). Its
// output is stored as O: the activation type, or bf16 where only a product over bf16 inputs reads it.
template <class S, int QPK, int HD, bool QKNORM, class A, class KT, class O = typename A::T>
struct Attention : AttentionSplit<S, QPK, HD, QKNORM, A, KT, false, true, O> {};

// attention_merge: out = sum over splits of softmax(lse) * part (stored as O, as attention's); and row
// `step` of the cache column gets this step's k (normed, roped) and v. The merge follows every split of
// (b, g), the only readers of the column.
template <class S, int QPK, int HD, bool KNORM, class A, class KT, class O = typename A::T> struct AttentionMerge {
  static constexpr int SMEM = HD * 4;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    using T = typename A::T;
    const int G = static_cast<int>(op.i[S::groups]), seq = static_cast<int>(op.i[S::seq]);
    const int splits = static_cast<int>(op.i[S::splits]);
    const int b = t.tile[0], g = t.tile[1];
    const long long pos = t.position(b);
    MPK_ASSERT(g < G && 0 <= pos && pos < seq);
    const size_t bg = static_cast<size_t>(b) * G + g;
    const T* src = op.arg<const T>(S::qkv) + bg * (QPK + 2) * HD;
    const size_t row = (t.kv_row(b, pos, seq) * G + g) * HD;
    if (warp_id() == 0) {
      float* buf = reinterpret_cast<float*>(smem);
      norm_rope_head<HD, KNORM, A>(src + QPK * HD, op.arg<const bf16>(S::k_norm), op.f[S::eps],
                                   op.arg<const float>(S::rope) + pos * HD, buf);
      for (int d = lane_id(); d < HD; d += 32) act_store(op.arg<KT>(S::k_cache) + row + d, buf[d]);
    } else if (warp_id() == 1) {
      constexpr int E = (HD + 31) / 32;
      float vv[E];
      load_head<HD>(src + (QPK + 1) * HD, vv);
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (lane_id() + 32 * e < HD) act_store(op.arg<KT>(S::v_cache) + row + lane_id() + 32 * e, vv[e]);
    }
    const float* part = op.arg<const float>(S::part) + bg * splits * QPK * HD;
    const float* lse = op.arg<const float>(S::lse) + bg * splits * QPK;
    O* out = op.arg<O>(S::out) + bg * QPK * HD;
    // Each thread merges kPer elements at once, kRound splits a round with an online softmax: every load
    // of a round (its parts and their lse) goes out before the round's sums, so a merge of S splits waits
    // out ceil(S / kRound) L2 round trips, not one per split. An empty split wrote zeros and lse -inf.
    constexpr int N = QPK * HD, kPer = (N + kThreads - 1) / kThreads, kRound = 8;
    float mx[kPer], den[kPer], num[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) mx[e] = kNegInf, den[e] = num[e] = 0.f;
    for (int s0 = 0; s0 < splits; s0 += kRound) {
      float ls[kPer][kRound], pv[kPer][kRound];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int i = threadIdx.x + e * kThreads, h = i / HD;
#pragma unroll
        for (int r = 0; r < kRound; ++r) {
          const bool in = i < N && s0 + r < splits;
          ls[e][r] = in ? lse[(s0 + r) * QPK + h] : kNegInf;
          pv[e][r] = in ? part[(s0 + r) * N + i] : 0.f;
        }
      }
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        float m = mx[e];
#pragma unroll
        for (int r = 0; r < kRound; ++r) m = fmaxf(m, ls[e][r]);
        if (m == kNegInf) continue;  // no rows yet
        const float corr = expf(mx[e] - m);  // 0 while mx is -inf
        den[e] *= corr, num[e] *= corr, mx[e] = m;
#pragma unroll
        for (int r = 0; r < kRound; ++r) {
          const float w = expf(ls[e][r] - m);  // 0 for an empty split
          den[e] += w;
          num[e] += w * pv[e][r];
        }
      }
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (threadIdx.x + e * kThreads < N) act_store(out + threadIdx.x + e * kThreads, num[e] / den[e]);
  }
};

}  // namespace mpk
