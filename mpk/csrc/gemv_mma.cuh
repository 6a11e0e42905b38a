// GEMV on tensor cores for small batches (2..8 sequences): mma.sync m16n8k16 with 16 weight rows as
// the A operand and the batch as N (8, zero-padded), fp32 accumulation. A float32 input is split
// into bf16 planes hi + lo (x = hi + lo to 2^-17 relative) and both are multiplied, so the result is
// the float32 product of the bf16 weights and x, as on CUDA cores, for a fraction of the
// instructions and shared-memory reads per weight byte. With bf16 matrix-product inputs
// (Precision.matmul_inputs, A::kBf16Inputs) x is rounded once and hi alone is multiplied.
//
// A dot product may sum k in any order, so the k order inside an mma is chosen to suit the loads:
// lane (g = lane / 4, q = lane % 4) loads 16 contiguous bytes (8 k) of weight rows g and g + 8 and
// of x row g at k-chunk 4t + q of k-step t, and feeds the first 4 k to one mma and the last 4 to a
// second. A warp's load of one weight row covers 64 contiguous bytes.
#pragma once

#include "gemv_simt.cuh"  // ld_w
#include "mma.cuh"

namespace mpk {

__host__ __device__ constexpr int gcd_int(int a, int b) { return b ? gcd_int(b, a % b) : a; }

template <int RPC, int B, int K, bool NORM, class A> struct MmaGemv {
  using T = typename A::T;
  static constexpr bool kSplit = !A::kBf16Inputs;  // float32 x: hi and lo planes (Precision.matmul_inputs)
  static constexpr int kPlanes = kSplit ? 2 : 1;
  // Bytes per staged row, = 64 mod 128: the 4 rows a warp's x load touches land in different banks.
  static constexpr int kStride = (K * 2 + 127) / 128 * 128 + 64;
  static constexpr int kSteps = K / 32;  // k-steps: 4 lanes x 8 k
  static constexpr int kInvOffset = B * kPlanes * kStride;
  static constexpr int kRedOffset = kInvOffset + align16(B * 4);
  static constexpr int kPartOffset = kRedOffset + align16(kWarps * B * 4);
  // A task of fewer 16-row blocks than this splits K between warps so that all 8 work; partial
  // sums meet in shared memory, added in a fixed order so that a run repeats bit for bit. Larger
  // tasks give each warp whole blocks.
  static constexpr int kSplitBelow = 24;
  static constexpr int kBlockFloats = 16 * 8;  // a block's sums, [row][8]
  // Each item (a block's K slice) leaves its sums in a slot of its own, so warps stream item after
  // item with no barrier between; the slices meet once, at the end. A task of more items than
  // there are slots (what shared memory leaves, up to kMaxSlots) goes in rounds of kWarps items
  // instead, the slots of a round reused by the next.
  static constexpr int kMaxSlots = 48;
  static constexpr int kSlotOffset = kPartOffset + cmax(kSplitBelow, kWarps) * kBlockFloats * 4;
  // Weights stream past L1 up to batch 4; beyond, through L1. On an H200 streaming made qwen3-8b's
  // batch-4 step 2.5% faster and its batch-8 step 5.5% slower (docs/perf.md).
  static constexpr bool kStreamLoads = B <= 4;
  // k-steps of weight loads in flight per lane (2 rows x 16 B each). Through L1 (batches 5-8) the
  // loads in flight must fit the L1 that shared memory leaves (28 KB beside qwen3-8b's 225 KB at
  // batch 8): U = 8 is 64 KB an SM, U = 4 32 KB. On an H200, U = 4 made batch 8 0.4-7.4% faster and
  // batch 4 4-7% slower; U = 2 and 6 were slower at batch 8 than both (docs/perf.md).
  static constexpr int U = kStreamLoads ? 8 : 4;
  // Each weight load asks L2 to fetch the bytes around it from memory (ld16): 128 where the loads
  // stream, 256 through L1. On an H200, 128 made qwen3-8b and llama-3.2-1b 2.2-2.3% faster at batch 4
  // (256 0.8% and even), and 256 made qwen3-8b 6% faster at batch 8 (128 3.5%); on the CUDA-core GEMV
  // of batch 1, 256 made qwen3-8b 4% slower, so the hint is here only (docs/perf.md). MPK_L2_FETCH
  // (build knob) sets one size for both, for A/B.
#if MPK_L2_FETCH >= 0
  static constexpr int kL2Fetch = MPK_L2_FETCH;
#else
  static constexpr int kL2Fetch = kStreamLoads ? 128 : 256;
#endif
  static constexpr int kSlots = cmax(kWarps, cmin(kMaxSlots, (kSmemCap - kStaticSmem - kSlotOffset) / (kBlockFloats * 4)));
  // A normed x too large for registers is staged through shared memory as float32 when it is larger
  // than MPK_RAW_STAGE_KB (stage_normed_via_smem: one L2 pass, then one through shared memory, over the
  // partial sums and slots, not in use yet), and otherwise read twice from L2. On an H200 the two passes
  // made llama-3.2-1b's batch-4 step 1.5-2.0% faster at its 32 KB, and qwen3-8b's 1.0% slower at 64 KB
  // (docs/perf.md). The bound is a build knob (0: always shared memory) for A/B.
#ifndef MPK_RAW_STAGE_KB
#define MPK_RAW_STAGE_KB 32
#endif
  static constexpr bool kRawStage = NORM && !XRegs<B, K, 8>::kFits && B * K * 4 > MPK_RAW_STAGE_KB * 1024 &&
                                    kPartOffset + B * K * 4 <= kSmemCap - kStaticSmem;
  static constexpr int SMEM = cmax(kSlotOffset + kSlots * kBlockFloats * 4, kRawStage ? kPartOffset + B * K * 4 : 0);
  static constexpr bool kUsable = B >= 2 && B <= 8 && K % 32 == 0 && SMEM <= kSmemCap - kStaticSmem;

  // Vector v (8 values) of sequence b as bf16 planes: hi, and for float32 x what bf16 rounding left out.
  __device__ static void store(unsigned char* s, int b, int v, const float (&f)[8]) {
    unsigned hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) pack_bf2_split(f[2 * j], f[2 * j + 1], hi[j], lo[j]);
    unsigned char* row = s + b * kPlanes * kStride + v * 16;
    *reinterpret_cast<uint4*>(row) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    if constexpr (kSplit) *reinterpret_cast<uint4*>(row + kStride) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }

  // x (RMS-normalised if NORM) as bf16 planes: row (b, plane p) at s + (b * kPlanes + p) * kStride.
  __device__ static void stage(const T* x, const bf16* norm, float eps, unsigned char* s) {
    if constexpr (!NORM && std::is_same_v<T, bf16>) {  // already the one plane (store would keep its bits)
      copy_x_rows<B, K>(x, s, kPlanes * kStride);
      return;
    }
    float* inv = reinterpret_cast<float*>(s + kInvOffset);
    using X = XRegs<B, K, 8>;
    if constexpr (NORM && X::kFits) {  // one pass over x
      X::template stage_normed<A>(x, norm, eps, inv, reinterpret_cast<float*>(s + kRedOffset),
                                  [&](int b, int v, const float (&f)[8]) { store(s, b, v, f); });
      return;
    }
    if constexpr (kRawStage) {
      stage_normed_via_smem<B, K, 8, A>(x, norm, eps, inv, reinterpret_cast<float*>(s + kRedOffset),
                                        reinterpret_cast<float*>(s + kPartOffset),
                                        [&](int b, int v, const float (&f)[8]) { store(s, b, v, f); });
      return;
    }
    if constexpr (NORM) row_inv_rms<B, K>(x, eps, inv, reinterpret_cast<float*>(s + kRedOffset));
    for_each_x_vec<B, K, 8, NORM, A>(x, norm, inv, [&](int b, int v, const float (&f)[8]) { store(s, b, v, f); });
    __syncthreads();
  }

  // One k-step of a warp's block: the lane's 16 bytes a of row g and b of row g + 8 at k-chunk kc,
  // against the staged x row g (zeros for the padding lanes g >= B).
  __device__ __forceinline__ static void mma_step(const unsigned char* xrow, bool has_x, int kc, const uint4& a,
                                                  const uint4& b, float (&acc)[4]) {
#pragma unroll
    for (int p = 0; p < kPlanes; ++p) {
      const uint4 xv = has_x ? *reinterpret_cast<const uint4*>(xrow + p * kStride + kc * 16) : make_uint4(0, 0, 0, 0);
      mma_16816(acc, a.x, b.x, a.y, b.y, xv.x, xv.y);
      mma_16816(acc, a.z, b.z, a.w, b.w, xv.z, xv.w);
    }
  }

  // One warp: acc += W[rows ra, rb] . x over k-steps [t0, t1) (the lane's C fragment: rows g and
  // g + 8, sequences 2q and 2q + 1). kShared: the rows are in a weight head in shared memory.
  template <bool kShared>
  __device__ static void block_dots(const unsigned char* s, const bf16* wa, const bf16* wb, int t0, int t1,
                                    float (&acc)[4]) {
    const int g = lane_id() >> 2, q = lane_id() & 3;
    const bool has_x = g < B;
    const unsigned char* xrow = s + (has_x ? g : 0) * kPlanes * kStride;
#pragma unroll 1
    for (int t = t0; t < t1; t += U) {
      uint4 ra[U], rb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kc = (t + u) * 4 + q;
        const bool in = t + u < t1;
        ra[u] = in ? ld_w<8, kShared, kStreamLoads, kL2Fetch>(wa + kc * 8) : make_uint4(0, 0, 0, 0);
        rb[u] = in ? ld_w<8, kShared, kStreamLoads, kL2Fetch>(wb + kc * 8) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (t + u >= t1) break;
        mma_step(xrow, has_x, (t + u) * 4 + q, ra[u], rb[u], acc);
      }
    }
  }

  // The epilogues of columns first, first + step, ... (< end) of a warp, from sums laid out [row][8]
  // with column c's first row at base + RPC * (c - cbase) * 8. An ElementOut takes 32 / B columns at
  // once, lane l column l / B's sequence l % B; any other epilogue gets (c, acc[RPC][B]) on every lane.
  template <class Epilogue>
  __device__ static void emit(const float* base, int cbase, int first, int end, int step, Epilogue& epilogue) {
    if constexpr (IsElementOut<std::decay_t<Epilogue>>::value) {
      constexpr int G = 32 / B;
      const int j = lane_id() / B, b = lane_id() % B;
      if (j < G)
        for (int c = first + step * j; c < end; c += step * G) epilogue.element(c, base + RPC * (c - cbase) * 8, b);
    } else {
      for (int c = first; c < end; c += step) {
        const float* rows = base + RPC * (c - cbase) * 8;
        float acc[RPC][B];
#pragma unroll
        for (int r = 0; r < RPC; ++r)
#pragma unroll
          for (int b = 0; b < B; ++b) acc[r][b] = rows[r * 8 + b];
        epilogue(c, acc);
      }
    }
  }

  template <class Epilogue>
  __device__ static void run(const T* x, const bf16* norm, const bf16* w, int c0, int c1, float eps,
                             unsigned char* smem, const TaskCtx& t, Epilogue&& epilogue) {
    const int head_rows = static_cast<int>(t.head_bytes / (2u * K));  // whole 16-row blocks
    const bf16* head = reinterpret_cast<const bf16*>(t.head);
    const int r0 = RPC * c0, r1 = RPC * c1;  // the task's weight rows
    const int nblocks = (r1 - r0 + 15) / 16;
    const int split = nblocks >= kSplitBelow ? 1 : kWarps / gcd_int(nblocks, kWarps);
    float* part = reinterpret_cast<float*>(smem + kPartOffset);
    float* slots = reinterpret_cast<float*>(smem + kSlotOffset);
    const bool rounds = split > 1 && nblocks * split > kSlots;
    stage(x, norm, eps, smem);  // first: a float32 x may be staged over `part`
    mark_staged();
    if (rounds)  // add_round's first barrier orders the zeroing before any sum
      for (int i = threadIdx.x; i < nblocks * kBlockFloats; i += kThreads) part[i] = 0.f;
    const int g = lane_id() >> 2, q = lane_id() & 3;
    // With split > 1 there are lcm(nblocks, 8) items: every warp runs the same number of rounds.
    for (int item = warp_id(); item < nblocks * split; item += kWarps) {
      const int blk = item / split, slice = item - blk * split;
      const int row = r0 + 16 * blk;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      const int s0 = slice * kSteps / split, s1 = (slice + 1) * kSteps / split;
      if (16 * blk + 16 <= head_rows) {
        block_dots<true>(smem, head + static_cast<size_t>(16 * blk + g) * K, head + static_cast<size_t>(16 * blk + g + 8) * K,
                         s0, s1, acc);
      } else {
        const bf16* wa = w + static_cast<size_t>(min(row + g, r1 - 1)) * K;  // past the end: a duplicate row, unused
        const bf16* wb = w + static_cast<size_t>(min(row + g + 8, r1 - 1)) * K;
        block_dots<false>(smem, wa, wb, s0, s1, acc);
      }
      float* sc = split == 1 ? part + warp_id() * kBlockFloats : slots + (rounds ? warp_id() : item) * kBlockFloats;
      sc[g * 8 + 2 * q] = acc[0], sc[g * 8 + 2 * q + 1] = acc[1];
      sc[(g + 8) * 8 + 2 * q] = acc[2], sc[(g + 8) * 8 + 2 * q + 1] = acc[3];
      if (split == 1) {  // this warp has the whole block: its own epilogues
        __syncwarp();
        const int cb = c0 + 16 / RPC * blk;
        emit(sc, cb, cb, min(c1, cb + 16 / RPC), 1, epilogue);
        __syncwarp();
      } else if (rounds) {
        add_round(part, slots, item - warp_id(), split);
      }
    }
    mark_share_done();
    if (split > 1) {
      __syncthreads();
      if (!rounds) {  // each block's slices in slice order, as the rounds add them: the same bits
        for (int i = threadIdx.x; i < nblocks * kBlockFloats; i += kThreads) {
          const int blk = i / kBlockFloats, e = i % kBlockFloats;
          float sum = 0.f;
          for (int slice = 0; slice < split; ++slice) sum += slots[(blk * split + slice) * kBlockFloats + e];
          part[i] = sum;
        }
        __syncthreads();
      }
      emit(part, c0, c0 + warp_id(), c1, kWarps, epilogue);
    }
  }

  // All threads: add the round of items [first, first + kWarps) (warp w's sums in round[w]) to their
  // blocks' sums, slice after slice, so the order of the additions never depends on timing.
  __device__ static void add_round(float* part, const float* round, int first, int split) {
    __syncthreads();  // every warp's sums are in
    const int blk0 = first / split, nblk = (first + kWarps - 1) / split - blk0 + 1;
    for (int i = threadIdx.x; i < nblk * kBlockFloats; i += kThreads) {
      const int blk = blk0 + i / kBlockFloats, e = i % kBlockFloats;
      float s = part[blk * kBlockFloats + e];
      for (int w = max(0, blk * split - first); w < min(kWarps, (blk + 1) * split - first); ++w) s += round[w * kBlockFloats + e];
      part[blk * kBlockFloats + e] = s;
    }
    __syncthreads();  // the round's scratch is free again
  }
};

}  // namespace mpk
