// What a dependent phase costs inside a thread-block cluster, against the megakernel's global counter:
// a persistent grid of clusters of C CTAs (one CTA per SM), phase after phase each CTA reads the
// slices its cluster's C CTAs wrote in the phase before and writes its own. Three ways:
//   counter: the megakernel's way at fan-in C (slices in global memory, red.release.gpu on the
//            cluster's counter of the phase, thread 0 polls it with ld.acquire.gpu);
//   barrier: slices in global memory, barrier.cluster.arrive.release / wait.acquire between phases;
//   dsmem:   each CTA stores its slice into every member's shared memory (st.shared::cluster), then
//            the cluster barrier; readers read their own shared memory.
// The question it answers: whether phases joined inside a cluster (QKV tiles of one KV group and
// their attention, attention splits and their merge) would cost much less than a global phase.
// Each phase's sums are checked against the host's, so a mode that reads stale data says so.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -Iscripts -o /tmp/cluster_phase scripts/cluster_phase.cu && /tmp/cluster_phase
#include <cooperative_groups.h>

#include <algorithm>
#include <vector>

#include "microbench.cuh"

namespace cg = cooperative_groups;

constexpr const char* kProgram = "cluster_phase";
constexpr int kThreads = 256;
constexpr int kMaxSlice = 128;
constexpr int kSmem = 120 * 1024;  // over half an SM's 228 KB: one CTA per SM, as the megakernel

enum Mode { kCounter = 0, kBarrier = 1, kDsmem = 2 };

__device__ __forceinline__ void cluster_sync_acq_rel() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Every thread's value of slice element i in phase p of CTA c: what the reader checks.
__device__ __host__ inline float value(int p, int c, int i) { return static_cast<float>((p * 131 + c * 7 + i) % 1024); }

// vec: two buffers of [grid][slice] floats (counter and barrier modes); counters [phases + 1][clusters];
// bad: phases whose sums were wrong, per CTA.
template <Mode M>
__global__ void phases_kernel(float* vec, unsigned long long* counters, int slice, int phases, int* bad) {
  extern __shared__ float inbox[];  // dsmem: two buffers of [C][slice]
  __shared__ float red[kThreads / 32];
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks()), me = static_cast<int>(cluster.block_rank());
  const int id = blockIdx.x / C, first = id * C, clusters = gridDim.x / C, all = gridDim.x * slice;
  int wrong = 0;
  for (int p = 1; p <= phases; ++p) {
    // Read the members' phase p - 1 slices (phase 0: the host's zeros, not checked).
    float s = 0.f;
    for (int i = threadIdx.x; i < C * slice; i += kThreads) {
      if constexpr (M == kDsmem) s += inbox[((p - 1) & 1) * C * slice + i];
      else s += vec[((p - 1) & 1) * all + first * slice + i];
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0 && p > 1) {
      float total = 0.f, want = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) total += red[w];
      for (int c = 0; c < C; ++c)
        for (int i = 0; i < slice; ++i) want += value(p - 1, first + c, i);
      wrong += total != want;
    }
    // Write this phase's slice.
    if constexpr (M == kDsmem) {
      for (int i = threadIdx.x; i < C * slice; i += kThreads) {
        const int to = i / slice, e = i % slice;
        float* dst = cluster.map_shared_rank(inbox, to) + (p & 1) * C * slice + me * slice + e;
        *dst = value(p, blockIdx.x, e);
      }
    } else {
      for (int i = threadIdx.x; i < slice; i += kThreads) vec[(p & 1) * all + blockIdx.x * slice + i] = value(p, blockIdx.x, i);
    }
    __syncthreads();  // red[] and this phase's reads are done
    if constexpr (M == kCounter) {
      if (threadIdx.x == 0) {
        mpk::red_release(counters + p * clusters + id, 1ull);
        mpk::poll_counter<false>(counters + p * clusters + id, C, [](unsigned) { return 0; });
      }
      __syncthreads();
    } else {
      cluster_sync_acq_rel();
    }
  }
  if (threadIdx.x == 0) bad[blockIdx.x] = wrong;
}

// A launch of `grid` CTAs in clusters of C (`attr` holds the cluster dimension the config points to).
cudaLaunchConfig_t cluster_launch(int grid, int C, cudaLaunchAttribute& attr) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = C, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid), cfg.blockDim = dim3(kThreads), cfg.dynamicSmemBytes = kSmem, cfg.attrs = &attr, cfg.numAttrs = 1;
  return cfg;
}

template <Mode M> float run(int grid, int C, int slice, int phases, float* vec, unsigned long long* counters, int* bad,
                            int* wrong) {
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch(grid, C, attr);
  const int clusters = grid / C;
  auto reset = [&] {
    CHECK(cudaMemset(vec, 0, 2 * grid * kMaxSlice * sizeof(float)));
    CHECK(cudaMemset(counters, 0, (phases + 1) * clusters * sizeof(unsigned long long)));
  };
  const float ms = best_ms(kProgram, reset, [&] { CHECK(cudaLaunchKernelEx(&cfg, phases_kernel<M>, vec, counters, slice, phases, bad)); });
  std::vector<int> h(grid);
  CHECK(cudaMemcpy(h.data(), bad, grid * sizeof(int), cudaMemcpyDeviceToHost));
  *wrong = 0;
  for (int v : h) *wrong += v;
  return 1e3f * ms / phases;
}

template <Mode M> void allow(int C) {
  CHECK(cudaFuncSetAttribute(phases_kernel<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  if (C > 8) CHECK(cudaFuncSetAttribute(phases_kernel<M>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

int main() {
  const int phases = 4000;
  const int sms = phase_chain_header(kProgram, kThreads, phases);
  float* vec;
  unsigned long long* counters;
  int* bad;
  CHECK(cudaMalloc(&vec, 2 * sms * kMaxSlice * sizeof(float)));
  CHECK(cudaMalloc(&counters, (phases + 1) * sms * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&bad, sms * sizeof(int)));
  std::printf("%-8s %-9s %-6s %10s %10s %10s   %s\n", "cluster", "clusters", "slice", "counter", "barrier", "dsmem",
              "phases with wrong sums (counter/barrier/dsmem)");
  for (int C : {2, 4, 8, 16}) {
    allow<kCounter>(C), allow<kBarrier>(C), allow<kDsmem>(C);
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_launch(sms / C * C, C, attr);
    int active = 0;
    if (cudaOccupancyMaxActiveClusters(&active, phases_kernel<kBarrier>, &cfg) != cudaSuccess || active == 0) {
      std::printf("%-8d clusters of %d CTAs cannot be resident here\n", C, C);
      cudaGetLastError();
      continue;
    }
    active = std::min(active, sms / C);  // the buffers hold one CTA per SM
    const int grid = active * C;  // every CTA resident: the phases wait on each other
    for (int slice : {8, 128}) {
      int w[3];
      const float t0 = run<kCounter>(grid, C, slice, phases, vec, counters, bad, &w[0]);
      const float t1 = run<kBarrier>(grid, C, slice, phases, vec, counters, bad, &w[1]);
      const float t2 = run<kDsmem>(grid, C, slice, phases, vec, counters, bad, &w[2]);
      std::printf("%-8d %-9d %-6d %10.3f %10.3f %10.3f   %d/%d/%d\n", C, active, slice, t0, t1, t2, w[0], w[1], w[2]);
    }
  }
  CHECK(cudaFree(vec));
  CHECK(cudaFree(counters));
  CHECK(cudaFree(bad));
  return 0;
}
