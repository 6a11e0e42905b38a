// The ends of a step (mpk/ops/tokens.py): token -> embedding row, and logits (or their argmax
// candidates) -> the next token, streamed to the host, plus the step's stop decision.
#pragma once

#include "mpk_runtime.cuh"
#include "sampling.cuh"

namespace mpk {

// embed: x[b] = table[tokens[b]].
template <class S, int H, class A> struct Embed {
  static constexpr int SMEM = 0;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char*) {
    constexpr int VEC = vec_width(H);
    const int b = t.tile[0];
    const long long tok = op.arg<const long long>(S::tokens)[b];
    MPK_ASSERT(tok >= 0 && tok < op.i[S::vocab]);
    const bf16* row = op.arg<const bf16>(S::table) + tok * H;
    typename A::T* out = op.arg<typename A::T>(S::out) + static_cast<size_t>(b) * H;
    for (int v = threadIdx.x; v < H / VEC; v += kThreads) {
      if constexpr (sizeof(typename A::T) == sizeof(bf16)) {
        *reinterpret_cast<packed_t<VEC>*>(out + v * VEC) = ld_weight<VEC>(row + v * VEC);
      } else {
        float f[VEC];
        unpack<VEC>(ld_weight<VEC>(row + v * VEC), f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[v * VEC + e] = f[e];
      }
    }
  }
};

__device__ __forceinline__ bool is_eos(const MpkParams& p, long long tok) {
  for (long long k = 0; k < p.n_eos; ++k)
    if (p.eos[k] == tok) return true;
  return false;
}

// sample: the next token of sequence b. Inside its prompt, the prompt's next token. Greedy
// (temperature 0): the best candidate over all LM-head tiles of all ranks (ties to the lowest token
// id). Otherwise a draw from the logits rows of all ranks under the sequence's temperature, top-k,
// top-p and seed (sampling.cuh). Writes tokens[b] (the next step's embed reads it) and
// out_tokens[launch step * batch + b] (host-mapped). The step's last sample task publishes steps_done and
// stops the run once every sequence has finished. With tensor parallelism every rank makes the
// same token from the same inputs (read from the peers).
template <class S, int RANKS> struct Sample {
  static_assert(1 <= RANKS && RANKS <= kMaxRanks, "tensor parallelism spans 1 to kMaxRanks GPUs");
  static constexpr int SMEM = sizeof(SampleScratch);

  // Warp 0: the best of the LM head's argmax candidates.
  __device__ static long long best_candidate(const OpDesc& op, int b) {
    const int n_tiles = static_cast<int>(op.i[S::n_tiles]);
    float best = kNegInf;
    long long best_idx = 0x7fffffffffffffffll;
#pragma unroll
    for (int r = 0; r < RANKS; ++r) {
      const float* cand_val = op.ranks<const float>(S::cand_val)[r] + static_cast<size_t>(b) * n_tiles;
      const long long* cand_idx = op.ranks<const long long>(S::cand_idx)[r] + static_cast<size_t>(b) * n_tiles;
      for (int k = lane_id(); k < n_tiles; k += 32) {
        const float v = cand_val[k];
        const long long i = cand_idx[k];
        if (v > best || (v == best && i < best_idx)) best = v, best_idx = i;
      }
    }
    warp_argmax(best, best_idx);
    return best_idx;
  }

  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const MpkParams& p = *t.p;
    SampleScratch& sc = *reinterpret_cast<SampleScratch*>(smem);
    const int b = t.tile[0];
    const long long pos = t.position(b);
    const long long plen = op.arg<const long long>(S::prompt_len)[b];
    const float temperature = op.arg<const float>(S::sample_floats)[2 * b];
    if (pos + 1 < plen) {
      if (threadIdx.x == 0) sc.token = op.arg<const long long>(S::prompt)[b * op.i[S::seq] + pos + 1];
    } else if (temperature > 0.f) {  // uniform over the CTA: every thread takes part in the draw
      const LogitsRow<RANKS> row{op.ranks<const float>(S::logits), op.i[S::vocab],
                                 (op.i[S::vocab] + RANKS - 1) / RANKS, b, temperature};
      const long long* ints = op.arg<const long long>(S::sample_ints) + 2 * b;
      const long long tok = sample_row(row, ints[0], op.arg<const float>(S::sample_floats)[2 * b + 1],
                                       static_cast<unsigned long long>(ints[1]), static_cast<unsigned long long>(pos + 1),
                                       sc);
      if (threadIdx.x == 0) sc.token = tok;
    } else if (warp_id() == 0) {
      const long long tok = best_candidate(op, b);
      if (lane_id() == 0) sc.token = tok;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;

    const long long tok = sc.token;
    op.arg<long long>(S::tokens)[b] = tok;
    st_volatile(p.out_tokens + t.rel * p.batch + b, static_cast<int>(tok));
    // Finished: hit EOS or its token limit (new tokens start at the prompt's last position).
    const bool generated = pos >= plen - 1;
    const bool done = ld_volatile(p.seq_done + b) || (generated && (is_eos(p, tok) || pos - plen + 2 >= p.max_new[b]));
    st_volatile(p.seq_done + b, static_cast<int>(done));
    __threadfence_system();  // out_tokens reach the host before steps_done says so
    const unsigned long long n = atomicAdd(reinterpret_cast<unsigned long long*>(p.ctl + kCtlSampled), 1ull);
    if (static_cast<long long>(n) != (t.rel + 1) * p.n_sample - 1) return;
    // Last sample task of the step: every sequence's token and finished flag is in.
    __threadfence();
    bool all_done = true;
    for (long long k = 0; k < p.batch; ++k) all_done = all_done && ld_volatile(p.seq_done + k);
    if (all_done || ld_volatile(p.host_flags + kFlagStopRequest)) stop_all_ranks(p, t.step);
    __threadfence_system();
    st_volatile(p.steps_done, t.step + 1);
  }
};

}  // namespace mpk
