// What one tensor-parallel exchange costs between two GPUs, with no weights: a persistent grid on
// each GPU, and in every phase each CTA c sums slice c of both GPUs' vectors from the phase before
// and writes slice c of its own GPU's next vector, phase after phase (the allreduce hop of a layer,
// as a chain). Three ways to move a slice and say it is ready:
//   pull:    the megakernel's way today. Write the slice to local memory, __syncthreads, thread 0
//            red.release.sys on both GPUs' counters; a reader polls its local counter with
//            ld.acquire.sys, then reads its own slice locally and the peer's over NVLink.
//   push:    write the slice into both GPUs' memory (the peer's by NVLink stores), then the same
//            counters; every read is then local.
//   tagged:  write the slice into both GPUs' memory as 8-byte words (value bits | phase << 32, one
//            single-copy-atomic store each, NCCL's LL format), no fence and no counter; a reader
//            polls its slice's words in local memory until their tags are the phase.
// Unlike scripts/phase_latency.cu, a CTA reads only its own slice (as an allreduce task does), so
// few words are polled. Prints microseconds per phase for each, for a few slice widths.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/tp_phase_latency scripts/tp_phase_latency.cu && /tmp/tp_phase_latency
#include "microbench.cuh"

using mpk::ld_acquire_sys;
using mpk::red_release_sys;

constexpr const char* kProgram = "tp_phase_latency";
constexpr int kThreads = 128;

// One GPU's view. vec[r][p % 2]: GPU r's vector of phase p (n floats), in this GPU's memory for the
// push and tagged modes; peer_vec: the same buffers in the peer's memory. counters: this GPU's, one
// per phase; peer_counters: the peer's. Phase 0's vectors are written by the host.
struct Side {
  float* vec[2][2];
  float* peer_vec[2][2];
  unsigned long long* tagged[2][2];       // n words each
  unsigned long long* peer_tagged[2][2];
  unsigned long long* counters;
  unsigned long long* peer_counters;
  int rank;
};

enum Mode { kPull, kPush, kTagged };

template <Mode M> __global__ void exchange(Side s, int slice, int phases, float* sink) {
  const int c0 = blockIdx.x * slice, me = s.rank, other = 1 - me;
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    const int in = (p - 1) & 1, out = p & 1;
    float v = 0.f;
    if constexpr (M == kTagged) {
      if (threadIdx.x < slice) {
        const unsigned want = static_cast<unsigned>(p - 1);
        unsigned long long a = ld_relaxed_sys(s.tagged[0][in] + c0 + threadIdx.x);
        unsigned long long b = ld_relaxed_sys(s.tagged[1][in] + c0 + threadIdx.x);
        while (static_cast<unsigned>(a >> 32) != want) a = ld_relaxed_sys(s.tagged[0][in] + c0 + threadIdx.x);
        while (static_cast<unsigned>(b >> 32) != want) b = ld_relaxed_sys(s.tagged[1][in] + c0 + threadIdx.x);
        v = __uint_as_float(static_cast<unsigned>(a)) + __uint_as_float(static_cast<unsigned>(b));
      }
    } else {
      if (threadIdx.x == 0 && p > 1)
        while (ld_acquire_sys(s.counters + p - 1) < 2ull * gridDim.x) {
        }
      __syncthreads();
      if (threadIdx.x < slice) {
        const float* mine = s.vec[me][in] + c0;
        // pull: the peer's slice is read where it was written; push: it was written here.
        const float* theirs = M == kPull ? s.peer_vec[other][in] + c0 : s.vec[other][in] + c0;
        v = ld_relaxed_sys(mine + threadIdx.x) + ld_relaxed_sys(theirs + threadIdx.x);
      }
    }
    const float next = v * 0.5f + 1.f;
    acc += v;
    if (threadIdx.x < slice) {
      if constexpr (M == kTagged) {
        const unsigned long long w = (static_cast<unsigned long long>(p) << 32) | __float_as_uint(next);
        st_relaxed_sys(s.tagged[me][out] + c0 + threadIdx.x, w);
        st_relaxed_sys(s.peer_tagged[me][out] + c0 + threadIdx.x, w);
      } else {
        s.vec[me][out][c0 + threadIdx.x] = next;
        if (M == kPush) s.peer_vec[me][out][c0 + threadIdx.x] = next;
      }
    }
    if constexpr (M != kTagged) {
      __syncthreads();
      if (threadIdx.x == 0) red_release_sys(s.counters + p, 1ull), red_release_sys(s.peer_counters + p, 1ull);
    }
    // Buffers alternate by phase: a slice of phase p + 1 overwrites phase p - 1's, which every reader
    // of it consumed before writing the phase p slice this writer has already seen.
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

struct Gpu {
  int dev;
  Side side;
  float* sink;
  cudaStream_t stream;
  cudaEvent_t start, stop;
};

template <Mode M> float run(Gpu (&g)[2], int n, int slice, int phases, int sms) {
  for (auto& x : g) {
    CHECK(cudaSetDevice(x.dev));
    for (int r = 0; r < 2; ++r)
      for (int b = 0; b < 2; ++b) {
        CHECK(cudaMemsetAsync(x.side.vec[r][b], 0, n * sizeof(float), x.stream));
        CHECK(cudaMemsetAsync(x.side.tagged[r][b], 0, n * sizeof(unsigned long long), x.stream));  // phase 0: tag 0
      }
    CHECK(cudaMemsetAsync(x.side.counters, 0, (phases + 1) * sizeof(unsigned long long), x.stream));
  }
  for (auto& x : g) {
    CHECK(cudaSetDevice(x.dev));
    CHECK(cudaStreamSynchronize(x.stream));
  }
  for (auto& x : g) {
    CHECK(cudaSetDevice(x.dev));
    CHECK(cudaEventRecord(x.start, x.stream));
    exchange<M><<<sms, kThreads, 0, x.stream>>>(x.side, slice, phases, x.sink);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(x.stop, x.stream));
  }
  float worst = 0.f;
  for (auto& x : g) {
    CHECK(cudaSetDevice(x.dev));
    CHECK(cudaEventSynchronize(x.stop));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, x.start, x.stop));
    worst = ms > worst ? ms : worst;
  }
  return 1e3f * worst / phases;
}

int main() {
  int count = 0;
  CHECK(cudaGetDeviceCount(&count));
  if (count < 2) {
    std::fprintf(stderr, "tp_phase_latency: needs two GPUs, found %d\n", count);
    return 1;
  }
  int can = 0;
  CHECK(cudaDeviceCanAccessPeer(&can, 0, 1));
  if (!can) {
    std::fprintf(stderr, "tp_phase_latency: GPUs 0 and 1 have no peer access\n");
    return 1;
  }
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  sms = sms < 128 ? sms : 128;  // a TP=2 layer's tasks per op
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int phases = 4000, max_slice = kThreads;
  const int n = max_slice * sms;
  Gpu g[2];
  for (int r = 0; r < 2; ++r) {
    g[r].dev = r;
    CHECK(cudaSetDevice(r));
    CHECK(cudaDeviceEnablePeerAccess(1 - r, 0));
    CHECK(cudaStreamCreateWithFlags(&g[r].stream, cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&g[r].start));
    CHECK(cudaEventCreate(&g[r].stop));
    CHECK(cudaMalloc(&g[r].sink, sms * sizeof(float)));
    CHECK(cudaMalloc(&g[r].side.counters, (phases + 1) * sizeof(unsigned long long)));
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        CHECK(cudaMalloc(&g[r].side.vec[a][b], n * sizeof(float)));
        CHECK(cudaMalloc(&g[r].side.tagged[a][b], n * sizeof(unsigned long long)));
      }
    g[r].side.rank = r;
  }
  for (int r = 0; r < 2; ++r) {
    g[r].side.peer_counters = g[1 - r].side.counters;
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        g[r].side.peer_vec[a][b] = g[1 - r].side.vec[a][b];
        g[r].side.peer_tagged[a][b] = g[1 - r].side.tagged[a][b];
      }
  }
  std::printf("2x %s, %d CTAs of %d threads per GPU, %d phases\n", prop.name, sms, kThreads, phases);
  std::printf("%-8s %12s %12s %12s\n", "slice", "pull us", "push us", "tagged us");
  for (int slice : {8, 32, 128}) {
    float best[3] = {1e30f, 1e30f, 1e30f};
    for (int rep = 0; rep < 3; ++rep) {  // the best of three: the first also warms up
      const float t[3] = {run<kPull>(g, n, slice, phases, sms), run<kPush>(g, n, slice, phases, sms),
                          run<kTagged>(g, n, slice, phases, sms)};
      for (int k = 0; k < 3; ++k) best[k] = t[k] < best[k] ? t[k] : best[k];
    }
    std::printf("%-8d %12.3f %12.3f %12.3f\n", slice, best[0], best[1], best[2]);
  }
  return 0;
}
