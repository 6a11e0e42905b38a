// The tensor-parallel allreduce (mpk/ops/linear.py, allreduce_residual): one task sums a column
// tile of every rank's partial projection and adds the residual. Partials stay on the GPU that
// made them; a rank reads its peers' through their addresses over NVLink, after the event's
// system-scope acquire (mpk_runtime.cuh). On one GPU the same op sums the K slices of a decode
// GEMM split along K (mpk.graph.k_splits), all of them local.
#pragma once

#include "mpk_runtime.cuh"

namespace mpk {

// out[:, c0:c1] = residual + (partial_0 + ... + partial_{RANKS-1}), summed in order in float32 so
// every rank computes the same bits.
template <class S, int B, int RANKS, class A> struct AllreduceResidual {
  static_assert(1 <= RANKS && RANKS <= kMaxRanks, "tensor parallelism spans 1 to kMaxRanks GPUs");
  using T = typename A::T;
  static constexpr int SMEM = 0;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char*) {
    const float* const* partial = op.ranks<const float>(S::partial);
    const T* res = op.arg<const T>(S::residual);
    T* out = op.arg<T>(S::out);
    const int n = static_cast<int>(op.i[S::n]);
    const int c0 = t.tile[0] * static_cast<int>(op.i[S::tile]);
    const int width = min(n, c0 + static_cast<int>(op.i[S::tile])) - c0;
    const float* from[RANKS];
#pragma unroll
    for (int r = 0; r < RANKS; ++r) from[r] = partial[r];
    for (int e = threadIdx.x; e < B * width; e += kThreads) {
      const int at = e / width * n + c0 + e % width;
      float sum = from[0][at];
#pragma unroll
      for (int r = 1; r < RANKS; ++r) sum += from[r][at];
      act_store(out + at, act_f(res[at]) + A::round(sum));
    }
  }
};

// allreduce_tagged: the same sum from this rank's own memory, where every rank's linear_tagged pushed
// its partial (inbox [RANKS, B, n]) as tagged words. No counter says they are ready: the task polls
// them until each carries the step's tag, the whole CTA in rounds (poll_tagged), so a stop or an
// abort still ends the wait. The residual it reads as a plain tensor, loaded before the poll: the
// task runs right after this rank's producer of its tile, on the same SM, whose wait acquired it.
template <class S, int B, int RANKS, class A> struct AllreduceTagged {
  static_assert(2 <= RANKS && RANKS <= kMaxRanks, "tagged partials come from 2 to kMaxRanks GPUs");
  using T = typename A::T;
  static constexpr int SMEM = 0;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char*) {
    const unsigned long long* inbox = op.arg<const unsigned long long>(S::inbox);
    const T* res = op.arg<const T>(S::residual);
    T* out = op.arg<T>(S::out);
    const int n = static_cast<int>(op.i[S::n]);
    const int c0 = t.tile[0] * static_cast<int>(op.i[S::tile]);
    const int width = min(n, c0 + static_cast<int>(op.i[S::tile])) - c0;
    const unsigned tag = t.step_tag();
    for (int e0 = 0; e0 < B * width; e0 += kThreads) {  // the same rounds in every thread: poll_tagged syncs
      const int e = e0 + threadIdx.x;
      const bool mine = e < B * width;
      const int at = mine ? e / width * n + c0 + e % width : 0;
      const float residual = mine ? act_f(res[at]) : 0.f;
      const unsigned long long* from[RANKS];  // every rank's partial
#pragma unroll
      for (int r = 0; r < RANKS; ++r) from[r] = inbox + static_cast<long long>(r) * B * n + at;
      unsigned long long w[RANKS];
#pragma unroll
      for (int r = 0; r < RANKS; ++r) w[r] = mine ? ld_word(from[r]) : tagged_word(0.f, tag);
      const bool ready = poll_tagged(t, [&] {
        bool all = true;
#pragma unroll
        for (int r = 0; r < RANKS; ++r)
          if (word_tag(w[r]) != tag) all = false, w[r] = ld_word(from[r]);
        return all;
      });
      if (!ready) return;
      if (mine) {
        float sum = word_value(w[0]);
#pragma unroll
        for (int r = 1; r < RANKS; ++r) sum += word_value(w[r]);
        act_store(out + at, residual + A::round(sum));
      }
    }
  }
};

}  // namespace mpk
