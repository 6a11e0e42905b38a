// Whether the GEMV prologue's read of x is slowed by every SM reading the same lines: each phase,
// every CTA of a persistent grid reads the whole vector the phase before wrote (as a GEMV task
// stages its x) and then writes its own slice of the next one. The vector is kept in R copies: a
// writer stores its slice into every copy, and CTA c reads copy c % R, so each line is read by
// SMs / R CTAs instead of all of them. If the lines' L2 slices are what limits the read, a phase
// gets faster with R at equal bytes; if the latency of a round trip is, R changes nothing.
// Prints microseconds per phase for vectors of 4 to 128 KB (float32: a batch-4 x is 32-192 KB).
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/x_copies scripts/x_copies.cu && /tmp/x_copies
#include "microbench.cuh"

using mpk::red_release;

constexpr const char* kProgram = "x_copies";
constexpr int kThreads = 256;
constexpr int kBatch = 8;  // float4 loads in flight per thread

// vec: two buffers (phase parity) of `copies` x n floats; counters: one per phase. sink keeps the sums live.
__global__ void phases_kernel(float* vec, unsigned long long* counters, int n, int slice, int copies, int phases,
                              float* sink) {
  __shared__ float red[kThreads / 32];
  const int n4 = n / 4;
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    if (threadIdx.x == 0 && p > 1)
      mpk::poll_counter<false>(counters + p - 1, gridDim.x, [](unsigned) { return 0; });
    __syncthreads();
    const float4* in = reinterpret_cast<const float4*>(vec + (((p - 1) & 1) * copies + blockIdx.x % copies) * n);
    float s = 0.f;
    for (int i0 = threadIdx.x; i0 < n4; i0 += kThreads * kBatch) {
      float4 v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) v[j] = i0 + j * kThreads < n4 ? __ldcg(in + i0 + j * kThreads) : make_float4(0, 0, 0, 0);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) s += v[j].x + v[j].y + v[j].z + v[j].w;
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
    float* out = vec + (p & 1) * copies * n + blockIdx.x * slice;
    for (int i = threadIdx.x; i < slice * copies; i += kThreads) out[(i / slice) * n + i % slice] = total * 1e-9f + i;
    acc += total;
    __syncthreads();
    if (threadIdx.x == 0) red_release(counters + p, 1ull);
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

int main() {
  constexpr int kPhases = 2000;
  const int sms = phase_chain_header(kProgram, kThreads, kPhases);
  constexpr int kMaxCopies = 16, kMaxSlice = 256;
  float *vec, *sink;
  unsigned long long* counters;
  CHECK(cudaMalloc(&vec, sizeof(float) * 2 * kMaxCopies * sms * kMaxSlice));
  CHECK(cudaMalloc(&sink, sizeof(float) * sms));
  CHECK(cudaMalloc(&counters, sizeof(unsigned long long) * (kPhases + 1)));
  CHECK(cudaMemset(vec, 0, sizeof(float) * 2 * kMaxCopies * sms * kMaxSlice));
  const int copies[] = {1, 2, 4, 8, 16};
  std::printf("%10s", "vector KB");
  for (int r : copies) std::printf("  copies %-3d", r);
  std::printf("\n");
  for (int slice : {8, 32, 64, 128, 256}) {  // floats per CTA, a multiple of 4
    const int n = slice * sms;
    std::printf("%10.1f", n * 4 / 1024.0);
    for (int r : copies) {
      auto reset = [&] { CHECK(cudaMemset(counters, 0, sizeof(unsigned long long) * (kPhases + 1))); };
      auto launch = [&] { phases_kernel<<<sms, kThreads>>>(vec, counters, n, slice, r, kPhases, sink); };
      std::printf("  %10.3f", best_ms(kProgram, reset, launch) * 1e3f / kPhases);
    }
    std::printf("\n");
  }
  return 0;
}
