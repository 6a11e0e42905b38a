// Matrix-vector tasks (mpk/ops/linear.py): a task owns output columns [c0, c1) for all B sequences
// and streams those weight rows once. Two strategies compute the dot products (one per variant, at
// compile time): tensor cores (gemv_mma.cuh) for 2..8 sequences when the input fits in shared memory
// and a warp's share is not small (small_tile_on_cuda_cores, below), CUDA cores (gemv_simt.cuh)
// otherwise. Both end in the op's epilogue, called per column on every lane of a warp with that
// column's sums acc[RPC][B].
//
// The same ops over many rows (a prefill chunk, a decode batch of more than 8) are tiled by rows too
// and run as GEMMs on tensor cores (gemm.cuh); codegen says so with COLS = -BN, the task's weight
// rows. The ops below write each output element in one place, `out(b, c, v[RPC])`, that both paths
// call (`product`).
#pragma once

#include <type_traits>

#include "gemm.cuh"
#include "gemv_mma.cuh"
#include "gemv_simt.cuh"

namespace mpk {

// MPK_GEMV=simt at build time keeps every GEMV on CUDA cores (for A/B comparisons).
#ifdef MPK_GEMV_SIMT
constexpr bool kGemvMma = false;
#else
constexpr bool kGemvMma = true;
#endif

// Batches up to 4 keep a GEMV on CUDA cores while a warp's share is small: at most MPK_SIMT_ROWS
// weight rows (RPC x COLS), and B x their bytes at most MPK_SIMT_WORK_KB. Such a task is a load round
// or two, which the CUDA-core GEMV's 512 contiguous bytes per warp load stream faster than the tensor
// cores' 8 rows of 64; past either bound its B FMAs per weight cost more than that gains. On an H200
// (docs/perf.md) this made qwen3-0.6b's batch-4 step 7% faster, qwen3-8b's batch 2 2% and
// llama-3.2-1b's batch 4 1%, where qwen3-8b's batch-4 QKV and O projections (128-192 KB) and
// qwen3-0.6b's batch-4 gate/up (8 rows) were slower on CUDA cores. Both bounds are build knobs; 0
// turns it off.
#ifndef MPK_SIMT_ROWS
#define MPK_SIMT_ROWS 6
#endif
#ifndef MPK_SIMT_WORK_KB
#define MPK_SIMT_WORK_KB 96
#endif
template <int RPC, int B, int K, int COLS> constexpr bool small_tile_on_cuda_cores() {
  const long long work = static_cast<long long>(B) * RPC * COLS * K * 2;  // B x the warp's weight bytes
  return B <= 4 && RPC * COLS <= MPK_SIMT_ROWS && work <= MPK_SIMT_WORK_KB * 1024ll;
}

// COLS > 0: the most columns one warp owns in the op's tiles (ceil(tile / kWarps)).
template <int RPC, int B, int K, bool NORM, class A, int COLS>
using Gemv = std::conditional_t<kGemvMma && MmaGemv<RPC, B, K, NORM, A>::kUsable &&
                                    !small_tile_on_cuda_cores<RPC, B, K, COLS>(),
                                MmaGemv<RPC, B, K, NORM, A>, SimtGemv<RPC, B, K, NORM, A, COLS>>;

// Output columns [c0, c1) of column tile i, out of n in tiles of `tile`.
__device__ __forceinline__ void tile_span(int i, long long n, long long tile, int& c0, int& c1) {
  c0 = i * static_cast<int>(tile);
  c1 = min(static_cast<int>(n), c0 + static_cast<int>(tile));
  MPK_ASSERT(c0 < c1);
}
__device__ __forceinline__ void tile_span(const TaskCtx& t, long long n, long long tile, int& c0, int& c1) {
  tile_span(t.tile[0], n, tile, c0, c1);
}

// The strategy of a product: COLS < 0 is a row-tiled GEMM of -COLS weight rows per task (never
// instantiating a GEMV over its rows). LDK: the row length of x and the weight, of which a GEMM
// multiplies K columns (a slice of a product split along K); a GEMV takes whole rows.
template <int RPC, int B, int K, bool NORM, class A, int COLS, int LDK, bool GEMM = (COLS < 0)> struct StrategyOf {
  static_assert(LDK == K, "a GEMV multiplies whole rows");
  using type = Gemv<RPC, B, K, NORM, A, COLS>;
};
template <int RPC, int B, int K, bool NORM, class A, int COLS, int LDK>
struct StrategyOf<RPC, B, K, NORM, A, COLS, LDK, true> {
  using type = MmaGemm<RPC, B, K, NORM, A, -COLS, LDK>;
};
template <int RPC, int B, int K, bool NORM, class A, int COLS, int LDK = K>
using Strategy = typename StrategyOf<RPC, B, K, NORM, A, COLS, LDK>::type;

// All threads: this task's share of x (B x K, RMS-normalised if NORM) @ W^T, calling
// out(b, c, v[RPC]) once per output element (row b, column c of n). A GEMV task owns column tile
// t.tile[0] of every row; a GEMM task (COLS < 0) rows tile t.tile[0] x column tile t.tile[1], over
// K columns of rows LDK long (x and w point at the first). A GEMV calls out from several lanes at
// once (ElementOut, gemv_base.cuh).
template <int RPC, int B, int K, bool NORM, class A, int COLS, int LDK = K, class Out>
__device__ __forceinline__ void product(const TaskCtx& t, const OpDesc& op, const typename A::T* x, const bf16* norm,
                                        const bf16* w, long long n, long long tile, float eps, unsigned char* smem,
                                        Out&& out) {
  int c0, c1;
  if constexpr (COLS < 0) {
    using G = MmaGemm<RPC, B, K, NORM, A, -COLS, LDK>;
    tile_span(t.tile[1], n, tile, c0, c1);
    const int r0 = t.tile[0] * G::BM;
    G::run(x, norm, w, r0, min(B, r0 + G::BM), c0, c1, eps, smem, out);
  } else {
    tile_span(t, n, tile, c0, c1);
    Gemv<RPC, B, K, NORM, A, COLS>::run(x, norm, w, c0, c1, eps, smem, t, ElementOut<RPC, B, Out>{out});
  }
}

// rmsnorm_linear: out[:, c0:c1] = rmsnorm(x) @ W[c0:c1]^T (+ bias).
template <class S, int B, int K, bool BIAS, class A, int COLS> struct RmsnormLinear {
  using T = typename A::T;
  static constexpr int SMEM = Strategy<1, B, K, true, A, COLS>::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const bf16* bias = op.arg<const bf16>(S::bias);
    T* out = op.arg<T>(S::out);
    const long long n = op.i[S::n];
    product<1, B, K, true, A, COLS>(t, op, op.arg<const T>(S::x), op.arg<const bf16>(S::norm),
                                    op.arg<const bf16>(S::weight), n, op.i[S::tile], op.f[S::eps], smem,
                                    [&](int b, int c, const float (&v)[1]) {
      act_store(out + b * n + c, v[0] + (BIAS ? to_f(__ldg(bias + c)) : 0.f));
    });
  }
};

// rmsnorm_gate_up_silu: out[:, c] = silu(gate) * up with gate/up rows 2c, 2c+1 of the fused weight,
// stored as O (the activation type, or bf16 where only a product over bf16 inputs reads it).
template <class S, int B, int K, class A, int COLS, class O = typename A::T> struct RmsnormGateUpSilu {
  using T = typename A::T;
  static constexpr int SMEM = Strategy<2, B, K, true, A, COLS>::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    O* out = op.arg<O>(S::out);
    const long long n = op.i[S::n];
    product<2, B, K, true, A, COLS>(t, op, op.arg<const T>(S::x), op.arg<const bf16>(S::norm),
                                    op.arg<const bf16>(S::weight), n, op.i[S::tile], op.f[S::eps], smem,
                                    [&](int b, int c, const float (&v)[2]) {
      // In bf16, F.linear rounds gate and up, F.silu rounds, the product rounds.
      const float g = A::round(v[0]), u = A::round(v[1]);
      act_store(out + b * n + c, A::round(g / (1.f + expf(-g))) * u);
    });
  }
};

// linear_residual: out[:, c0:c1] = residual[:, c0:c1] + x @ W[c0:c1]^T, x of A's type, the residual and
// out of R's (float32 under ActF32Bf16X).
template <class S, int B, int K, class A, int COLS, class R = typename A::T> struct LinearResidual {
  using T = typename A::T;
  static constexpr int SMEM = Strategy<1, B, K, false, A, COLS>::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const R* res = op.arg<const R>(S::residual);
    R* out = op.arg<R>(S::out);
    const long long n = op.i[S::n];
    product<1, B, K, false, A, COLS>(t, op, op.arg<const T>(S::x), nullptr, op.arg<const bf16>(S::weight), n,
                                     op.i[S::tile], 0.f, smem, [&](int b, int c, const float (&v)[1]) {
      act_store(out + b * n + c, act_f(res[b * n + c]) + A::round(v[0]));
    });
  }
};

// linear: out[:, c0:c1] = x[:, k0:k0+K] @ W[c0:c1, k0:k0+K]^T in float32 (rows LDK long), one rank's
// partial sum of a row-parallel projection, or one K slice's (rounded to the activation precision
// first, as the reference's matmul is).
template <class S, int B, int K, class A, int COLS, int LDK> struct Linear {
  using T = typename A::T;
  static constexpr int SMEM = Strategy<1, B, K, false, A, COLS, LDK>::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    float* out = op.arg<float>(S::out);
    const long long n = op.i[S::n], k0 = op.i[S::k0];
    product<1, B, K, false, A, COLS, LDK>(t, op, op.arg<const T>(S::x) + k0, nullptr, op.arg<const bf16>(S::weight) + k0,
                                          n, op.i[S::tile], 0.f, smem, [&](int b, int c, const float (&v)[1]) {
      out[b * n + c] = A::round(v[0]);
    });
  }
};

// linear_tagged: one rank's partial x @ W[c0:c1]^T (rounded to the activation precision, as linear's)
// pushed as tagged words into slot `slot` (this rank's) of every rank's inbox [RANKS, B, n]:
// allreduce_tagged polls them in its own memory, with no counter between them (mpk/ops/linear.py,
// LinearTagged). A peer's words cross NVLink as stores.
template <class S, int B, int K, class A, int COLS, int RANKS> struct LinearTagged {
  using T = typename A::T;
  static constexpr int SMEM = Strategy<1, B, K, false, A, COLS>::SMEM;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    unsigned long long* const* inbox = op.ranks<unsigned long long>(S::inbox);
    const long long n = op.i[S::n], slot = op.i[S::slot] * B * n;
    const unsigned tag = t.step_tag();
    unsigned long long* to[RANKS];
#pragma unroll
    for (int r = 0; r < RANKS; ++r) to[r] = inbox[r] + slot;
    product<1, B, K, false, A, COLS>(t, op, op.arg<const T>(S::x), nullptr, op.arg<const bf16>(S::weight), n,
                                     op.i[S::tile], 0.f, smem, [&](int b, int c, const float (&v)[1]) {
      const unsigned long long w = tagged_word(A::round(v[0]), tag);
#pragma unroll
      for (int r = 0; r < RANKS; ++r) st_word(to[r] + b * n + c, w);
    });
  }
};

// rmsnorm_lm_head_argmax: logits[:, v0:v1] and the tile's argmax candidate per sequence.
template <class S, int B, int K, class A, int COLS> struct RmsnormLmHeadArgmax {
  using P = Strategy<1, B, K, true, A, COLS>;
  static constexpr int kBestOffset = P::SMEM;
  // A GEMV task keeps each warp's best column per sequence after the strategy's shared memory.
  static constexpr int SMEM = COLS < 0 ? P::SMEM : kBestOffset + align16(kWarps * B * 4) + align16(kWarps * B * 4);
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    if constexpr (COLS < 0) {
      run_gemm(t, op, smem);
    } else {
      run_gemv(t, op, smem);
    }
  }

  // A GEMM task: its block of rows x vocab columns, then each row's candidate from the logits it wrote.
  __device__ static void run_gemm(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    float* logits = op.arg<float>(S::logits);
    const int vocab = static_cast<int>(op.i[S::vocab]);
    product<1, B, K, true, A, COLS>(t, op, op.arg<const typename A::T>(S::x), op.arg<const bf16>(S::norm),
                                    op.arg<const bf16>(S::weight), vocab, op.i[S::tile], op.f[S::eps], smem,
                                    [&](int b, int c, const float (&v)[1]) {
      logits[static_cast<size_t>(b) * vocab + c] = A::round(v[0]);
    });
    __syncthreads();  // the block's logits are visible to the whole CTA
    int c0, c1;
    tile_span(t.tile[1], vocab, op.i[S::tile], c0, c1);
    const int r0 = t.tile[0] * P::BM;
    for (int b = r0 + warp_id(); b < min(B, r0 + P::BM); b += kWarps) {
      float best = kNegInf;
      long long at = c0;
      for (int c = c0 + lane_id(); c < c1; c += 32) {
        const float y = logits[static_cast<size_t>(b) * vocab + c];
        if (y > best) best = y, at = c;  // a lane's columns ascend: its first maximum stays
      }
      warp_argmax(best, at);
      if (lane_id() == 0) emit_candidate(op, b, t.tile[1], best, at);
    }
  }

  // A GEMV task: vocab columns of every sequence, each warp keeping its best column per sequence.
  __device__ static void run_gemv(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    float* logits = op.arg<float>(S::logits);
    const int vocab = static_cast<int>(op.i[S::vocab]);
    int c0, c1;
    tile_span(t, vocab, op.i[S::tile], c0, c1);
    float best[B];
    int best_at[B];
#pragma unroll
    for (int b = 0; b < B; ++b) best[b] = kNegInf, best_at[b] = c0;
    P::run(op.arg<const typename A::T>(S::x), op.arg<const bf16>(S::norm), op.arg<const bf16>(S::weight), c0, c1,
           op.f[S::eps], smem, t,
           [&](int c, const float (&acc)[1][B]) {
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
      emit_candidate(op, b, t.tile[0], v, at);
    }
  }

  // Sequence b's candidate of vocab tile i: its largest logit and that logit's (first) column.
  __device__ static void emit_candidate(const OpDesc& op, int b, int i, float v, long long at) {
    const int n_tiles = static_cast<int>(op.i[S::n_tiles]);
    MPK_ASSERT(i < n_tiles);
    op.arg<float>(S::cand_val)[b * n_tiles + i] = v;
    op.arg<long long>(S::cand_idx)[b * n_tiles + i] = op.i[S::vocab_start] + at;
  }
};

}  // namespace mpk
