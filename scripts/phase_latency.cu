// What one dependent phase costs with no weights at all: every CTA of a persistent grid reads the
// slices its group of `fan` CTAs wrote in the phase before (fan = all: the whole vector, as a norm
// GEMV reads x; a few: as an attention merge reads its group's splits), then writes its own slice,
// phase after phase. Two ways of saying "the slice is ready":
//   counter: the megakernel's way. Write the slice, __syncthreads, thread 0 red.release.gpu on its
//            group's counter of the phase; a reader's thread 0 polls it with ld.acquire.gpu,
//            __syncthreads, then every thread loads the group's slices.
//   tagged:  each value travels with its phase in one 8-byte word (value bits | phase << 32, one
//            single-copy-atomic store); readers load the words directly and reload any whose tag is
//            not yet the phase. No fence, no counter, no second round trip.
//   hinted:  the tagged words, read once a relaxed counter (no fence on either side) says the group
//            has written; a word that is not yet of the phase is read again.
// Prints microseconds per phase for each, for a few slice widths (floats per CTA) and fans.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/phase_latency scripts/phase_latency.cu && /tmp/phase_latency
#include "microbench.cuh"

using mpk::red_release;

constexpr const char* kProgram = "phase_latency";
constexpr int kThreads = 256;
constexpr int kBatch = 8;  // loads in flight per thread

// CTA c's group: CTAs [first, first + members) with first = c / fan * fan; its slices are the
// vector's [first * slice, (first + members) * slice).
struct Group {
  int id, first, members;
  __device__ Group(int fan) : id(blockIdx.x / fan), first(id * fan), members(min(fan, gridDim.x - id * fan)) {}
};

// vec: two buffers of n floats; phase p reads buffer (p - 1) % 2 and writes buffer p % 2. counters:
// one per group and phase. sink keeps the sums live. Phase 0's input is written by the host.
__global__ void counter_phases(float* vec, unsigned long long* counters, int n, int slice, int fan, int phases,
                               float* sink) {
  __shared__ float red[kThreads / 32];
  const Group g(fan);
  const int groups = (gridDim.x + fan - 1) / fan, all = n;
  n = g.members * slice;
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    if (threadIdx.x == 0 && p > 1)
      mpk::poll_counter<false>(counters + (p - 1) * groups + g.id, g.members, [](unsigned) { return 0; });
    __syncthreads();
    const float* in = vec + ((p - 1) & 1) * all + g.first * slice;
    float s = 0.f;
    for (int i0 = threadIdx.x; i0 < n; i0 += kThreads * kBatch) {
      float v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) v[j] = i0 + j * kThreads < n ? in[i0 + j * kThreads] : 0.f;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) s += v[j];
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
    float* out = vec + (p & 1) * all + blockIdx.x * slice;
    for (int i = threadIdx.x; i < slice; i += kThreads) out[i] = total * 1e-9f + i;
    acc += total;
    __syncthreads();
    if (threadIdx.x == 0) red_release(counters + p * groups + g.id, 1ull);
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

// counters null: tagged; else hinted. The writer's thread 0 adds to its group's counter with a relaxed
// reduction after the CTA's barrier (no fence: the count may arrive before the words), and the
// reader's thread 0 polls it (relaxed) before the CTA loads anything, so words are read about once.
__global__ void tagged_phases(unsigned long long* vec, unsigned long long* counters, int n, int slice, int fan,
                              int phases, float* sink) {
  __shared__ float red[kThreads / 32];
  const Group g(fan);
  const int groups = (gridDim.x + fan - 1) / fan, all = n;
  n = g.members * slice;
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    if (counters) {
      if (threadIdx.x == 0 && p > 1)
        while (ld_relaxed_gpu(counters + (p - 1) * groups + g.id) < static_cast<unsigned long long>(g.members)) {
        }
      __syncthreads();
    }
    const unsigned long long* in = vec + ((p - 1) & 1) * all + g.first * slice;
    const unsigned want = static_cast<unsigned>(p - 1);
    float s = 0.f;
    for (int i0 = threadIdx.x; i0 < n; i0 += kThreads * kBatch) {
      unsigned long long w[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        w[j] = i0 + j * kThreads < n ? ld_relaxed_gpu(in + i0 + j * kThreads) : mpk::tagged_word(0.f, want);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        while (mpk::word_tag(w[j]) != want) w[j] = ld_relaxed_gpu(in + i0 + j * kThreads);
        s += mpk::word_value(w[j]);
      }
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
    // Buffer p % 2 was read in phase p - 1, only by this CTA's group. This CTA has seen every group
    // member's phase p - 1 slice, and each wrote it after its phase p - 1 reads (the barrier above):
    // no CTA still reads what is overwritten.
    unsigned long long* out = vec + (p & 1) * all + blockIdx.x * slice;
    for (int i = threadIdx.x; i < slice; i += kThreads)
      st_relaxed_gpu(out + i, mpk::tagged_word(total * 1e-9f + i, p));
    acc += total;
    __syncthreads();  // red[] is reused next phase; every thread's words are issued before the count
    if (counters && threadIdx.x == 0)
      asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(counters + p * groups + g.id) : "memory");
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

int main() {
  const int phases = 4000;
  const int sms = phase_chain_header(kProgram, kThreads, phases);
  std::printf("%-6s %-6s %12s %12s %12s\n", "slice", "fan", "counter", "tagged", "hinted");
  float* sink;
  CHECK(cudaMalloc(&sink, sms * sizeof(float)));
  for (int slice : {8, 32, 128}) {
    const int n = slice * sms;
    float* vec;
    unsigned long long *counters, *tagged;
    CHECK(cudaMalloc(&vec, 2 * n * sizeof(float)));
    CHECK(cudaMalloc(&counters, (phases + 1) * sms * sizeof(unsigned long long)));
    CHECK(cudaMalloc(&tagged, 2 * n * sizeof(unsigned long long)));
    auto reset = [&] {
      CHECK(cudaMemset(vec, 0, 2 * n * sizeof(float)));
      CHECK(cudaMemset(counters, 0, (phases + 1) * sms * sizeof(unsigned long long)));
    };
    auto reset_tagged = [&] { CHECK(cudaMemset(tagged, 0, 2 * n * sizeof(unsigned long long))); };  // phase 0: tag 0
    for (int fan : {3, 16, sms}) {
      auto reset_hinted = [&] { reset(), reset_tagged(); };
      const float ms[3] = {
          best_ms(kProgram, reset, [&] { counter_phases<<<sms, kThreads>>>(vec, counters, n, slice, fan, phases, sink); }),
          best_ms(kProgram, reset_tagged,
                  [&] { tagged_phases<<<sms, kThreads>>>(tagged, nullptr, n, slice, fan, phases, sink); }),
          best_ms(kProgram, reset_hinted,
                  [&] { tagged_phases<<<sms, kThreads>>>(tagged, counters, n, slice, fan, phases, sink); })};
      std::printf("%-6d %-6d %12.3f %12.3f %12.3f\n", slice, fan, 1e3f * ms[0] / phases, 1e3f * ms[1] / phases,
                  1e3f * ms[2] / phases);
    }
    CHECK(cudaFree(vec));
    CHECK(cudaFree(counters));
    CHECK(cudaFree(tagged));
  }
  CHECK(cudaFree(sink));
  return 0;
}
