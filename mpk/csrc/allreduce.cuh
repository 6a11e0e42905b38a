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

}  // namespace mpk
