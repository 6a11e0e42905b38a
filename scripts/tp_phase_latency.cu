// What one tensor-parallel exchange costs between two GPUs, with no weights: a persistent grid on
// each GPU, and in every phase each CTA c sums slice c of both GPUs' vectors from the phase before
// and writes slice c of its own GPU's next vector, phase after phase (the allreduce hop of a layer,
// as a chain). Ways to move a slice and say it is ready:
//   pull:      write the slice to local memory, __syncthreads, thread 0 red.release.sys on both GPUs'
//              counters; a reader polls its local counter with ld.acquire.sys until every CTA of both
//              GPUs has signalled, then reads its own slice locally and the peer's over NVLink.
//   push:      write the slice into both GPUs' memory (the peer's by NVLink stores), then the same
//              counters; every read is then local.
//   pair:      pull, but slice c's counter waits only for the two CTAs c (one a GPU) that write it:
//              the megakernel's allreduce task, which waits for its tile's two partial tasks.
//   tagged:    write the slice into both GPUs' memory as 8-byte words (value bits | phase << 32, one
//              single-copy-atomic store each, NCCL's LL format), no fence and no counter; a reader
//              polls its slice's words in local memory until their tags are the phase.
//   tagged-all: tagged, but every CTA waits for the whole vector of both GPUs (a consumer that
//              needs all of x, as a norm-GEMV does, fed straight by the partials' producers).
// Two more chain a layer's real pair of phases per iteration: the cross-GPU hop (pair or tagged),
// then a same-GPU all-to-all phase on the megakernel's gpu-scope counter (the next norm-GEMV, which
// needs every slice of the sum):
//   pair+local, tagged+local.
// Prints microseconds per iteration for each, for a few slice widths.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/tp_phase_latency scripts/tp_phase_latency.cu && /tmp/tp_phase_latency
#include "microbench.cuh"

using mpk::ld_acquire;
using mpk::ld_acquire_sys;
using mpk::red_release;
using mpk::red_release_sys;
using mpk::ld_word;
using mpk::st_word;
using mpk::tagged_word;
using mpk::word_tag;
using mpk::word_value;

constexpr const char* kProgram = "tp_phase_latency";
constexpr int kThreads = 128;

// One GPU's view. vec[r][p % 2]: GPU r's vector of phase p (n floats), in this GPU's memory for the
// push and tagged modes; peer_vec: the same buffers in the peer's memory. counters: this GPU's, a row
// of CTAs + 1 a phase (one per slice, then one for all); peer_counters: the peer's. local: the
// same-GPU phase's vectors (two, alternating). Phase 0's vectors are written by the host.
struct Side {
  float* vec[2][2];
  float* peer_vec[2][2];
  unsigned long long* tagged[2][2];       // n words each
  unsigned long long* peer_tagged[2][2];
  unsigned long long* counters;
  unsigned long long* peer_counters;
  float* local;
  int rank;
};

enum Mode { kPull, kPush, kPair, kTagged, kTaggedAll, kPairLocal, kTaggedLocal, kModes };
constexpr const char* kModeNames[kModes] = {"pull", "push", "pair", "tagged", "tagged-all", "pair+local", "tagged+local"};

// Set when a poll outlasts kPatienceNs: the mode is reported as hung instead of holding the GPUs.
__device__ int g_hung;
constexpr unsigned long long kPatienceNs = 2000000000ull;

// True once a poll that began at `since` has waited too long, or another has (checked every 256 polls).
__device__ __forceinline__ bool given_up(unsigned& polls, unsigned long long since) {
  if (++polls % 256) return false;
  if (*static_cast<volatile int*>(&g_hung)) return true;
  if (mpk::global_timer() - since < kPatienceNs) return false;
  atomicExch(&g_hung, 1);
  return true;
}

// Polls one tagged word in local memory until it carries phase `want`.
__device__ __forceinline__ float wait_word(const unsigned long long* p, unsigned want) {
  unsigned long long w = ld_word(p);
  unsigned polls = 0;
  const unsigned long long since = mpk::global_timer();
  while (word_tag(w) != want && !given_up(polls, since)) w = ld_word(p);
  return word_value(w);
}

// The sum of words [0, n) of two tagged vectors once all carry phase `want`, this thread's share:
// kBatch words of each vector are loaded before any is checked, so the loads overlap.
__device__ float wait_all_words(const unsigned long long* a, const unsigned long long* b, int n, unsigned want) {
  constexpr int kBatch = 8;
  float v = 0.f;
  for (int i0 = threadIdx.x; i0 < n; i0 += kBatch * blockDim.x) {
    unsigned long long w[2][kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = min(i0 + k * static_cast<int>(blockDim.x), n - 1);
      w[0][k] = ld_word(a + i), w[1][k] = ld_word(b + i);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = i0 + k * static_cast<int>(blockDim.x);
      if (i >= n) break;
      const float x = word_tag(w[0][k]) == want ? word_value(w[0][k]) : wait_word(a + i, want);
      const float y = word_tag(w[1][k]) == want ? word_value(w[1][k]) : wait_word(b + i, want);
      v += x + y;
    }
  }
  return v;
}

template <Mode M> __global__ void exchange(Side s, int slice, int phases, float* sink) {
  constexpr bool kTag = M == kTagged || M == kTaggedAll || M == kTaggedLocal;
  constexpr bool kLocal = M == kPairLocal || M == kTaggedLocal;
  const int c0 = blockIdx.x * slice, me = s.rank, other = 1 - me, row = gridDim.x + 1, n = gridDim.x * slice;
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    const int in = (p - 1) & 1, out = p & 1;
    float v = 0.f;
    if constexpr (M == kTaggedAll) {
      const unsigned want = static_cast<unsigned>(p - 1);
      v = wait_all_words(s.tagged[0][in], s.tagged[1][in], n, want) / n;
      __syncthreads();  // every thread's polls of phase p - 1 end before any writes phase p: the next
                        // phase to reuse these buffers waits for those writes
    } else if constexpr (kTag) {
      if (threadIdx.x < slice) {
        const unsigned want = static_cast<unsigned>(p - 1);
        v = wait_word(s.tagged[0][in] + c0 + threadIdx.x, want) + wait_word(s.tagged[1][in] + c0 + threadIdx.x, want);
      }
    } else {
      const unsigned long long* ready = s.counters + (p - 1) * row + (M == kPull || M == kPush ? gridDim.x : blockIdx.x);
      const unsigned long long target = M == kPull || M == kPush ? 2ull * gridDim.x : 2ull;
      if (threadIdx.x == 0 && p > 1) {
        unsigned polls = 0;
        const unsigned long long since = mpk::global_timer();
        while (ld_acquire_sys(ready) < target && !given_up(polls, since)) {
        }
      }
      __syncthreads();
      if (threadIdx.x < slice) {
        const float* mine = s.vec[me][in] + c0;
        // pull and pair: the peer's slice is read where it was written; push: it was written here.
        const float* theirs = M == kPush ? s.vec[other][in] + c0 : s.peer_vec[other][in] + c0;
        v = ld_relaxed_sys(mine + threadIdx.x) + ld_relaxed_sys(theirs + threadIdx.x);
      }
    }
    if constexpr (kLocal) {
      // The same-GPU phase: write the sum's slice, every CTA waits for every slice, reads one.
      float* local = s.local + (p & 1) * n;  // alternating, as the vectors: see the note below
      if (threadIdx.x < slice) local[c0 + threadIdx.x] = v;
      __syncthreads();
      unsigned long long* all = s.counters + p * row + gridDim.x;
      if (threadIdx.x == 0) {
        red_release(all, 1ull);
        unsigned polls = 0;
        const unsigned long long since = mpk::global_timer();
        while (ld_acquire(all) < gridDim.x && !given_up(polls, since)) {
        }
      }
      __syncthreads();
      if (threadIdx.x < slice) v = local[(c0 + slice + threadIdx.x) % n];
    }
    const float next = v * 0.5f + 1.f;
    acc += v;
    if (threadIdx.x < slice) {
      if constexpr (kTag) {
        const unsigned long long w = tagged_word(next, p);
        st_word(s.tagged[me][out] + c0 + threadIdx.x, w);
        st_word(s.peer_tagged[me][out] + c0 + threadIdx.x, w);
      } else {
        s.vec[me][out][c0 + threadIdx.x] = next;
        if (M == kPush) s.peer_vec[me][out][c0 + threadIdx.x] = next;
      }
    }
    if constexpr (!kTag) {
      __syncthreads();
      const int at = M == kPull || M == kPush ? gridDim.x : blockIdx.x;
      if (threadIdx.x == 0) red_release_sys(s.counters + p * row + at, 1ull), red_release_sys(s.peer_counters + p * row + at, 1ull);
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
    CHECK(cudaMemsetAsync(x.side.counters, 0, (phases + 1) * (sms + 1) * sizeof(unsigned long long), x.stream));
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
  bool hung = false;
  for (auto& x : g) {
    CHECK(cudaSetDevice(x.dev));
    int h = 0;
    CHECK(cudaMemcpyFromSymbol(&h, g_hung, sizeof h));
    hung |= h != 0;
    h = 0;
    CHECK(cudaMemcpyToSymbol(g_hung, &h, sizeof h));
  }
  if (hung) return -1.f;  // a poll gave up: no time to report
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
  const cudaDeviceProp prop = device_props(kProgram);
  const int sms = prop.multiProcessorCount < 128 ? prop.multiProcessorCount : 128;  // a TP=2 layer's tasks per op
  const int phases = 2000, max_slice = kThreads;
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
    CHECK(cudaMalloc(&g[r].side.counters, (phases + 1) * (sms + 1) * sizeof(unsigned long long)));
    CHECK(cudaMalloc(&g[r].side.local, 2 * n * sizeof(float)));
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
  using Runner = float (*)(Gpu (&)[2], int, int, int, int);
  const Runner runners[kModes] = {run<kPull>, run<kPush>, run<kPair>, run<kTagged>, run<kTaggedAll>, run<kPairLocal>, run<kTaggedLocal>};
  std::printf("%-6s", "slice");
  for (const char* name : kModeNames) std::printf(" %13s", name);
  std::printf("   (us per iteration)\n");
  for (int slice : {8, 32, 128}) {
    float best[kModes];
    for (float& b : best) b = 1e30f;
    for (int rep = 0; rep < 3; ++rep)  // the best of three: the first also warms up
      for (int k = 0; k < kModes; ++k) {
        const float t = runners[k](g, n, slice, phases, sms);
        best[k] = t < 0.f || best[k] < 0.f ? -1.f : fminf(best[k], t);
      }
    std::printf("%-6d", slice);
    for (float b : best) b < 0.f ? std::printf(" %13s", "hung") : std::printf(" %13.3f", b);
    std::printf("\n");
  }
  return 0;
}
