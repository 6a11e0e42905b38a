// What code an SM has not run lately costs it: a persistent grid (one CTA of 256 threads per SM) runs
// tasks one after another, each a straight run of F KB of independent FMAs executed once, as a
// megakernel task runs its prologue and epilogue once. The tasks cycle through N distinct bodies
// (different constants, so the compiler cannot share their code): with N x F past the instruction
// cache each task starts cold and fetches its code from L2, with N = 1 it is always warm. Prints us
// per task and the cold cost per KB of code (against N = 1). The megakernel is 318-388 KB of SASS
// over five to eight op templates (scripts/ptxas_report.py), so this prices what a task's first
// instructions may cost it.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/icache scripts/icache.cu && /tmp/icache
#include <utility>

#include "microbench.cuh"

constexpr const char* kProgram = "icache";
constexpr int kThreads = 256, kTasks = 2000, kMaxBodies = 16;

// F KB of code: F * 64 FFMAs (16 bytes each) over 8 independent accumulators, constants unique to
// body I, so each body is its own code.
template <int I, int F> __device__ __noinline__ float body(float x) {
  float a[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) a[j] = x + j;
#pragma unroll
  for (int j = 0; j < F * 64; ++j) a[j % 8] = fmaf(a[j % 8], 1.0f + (I * 131 + j) * 1e-7f, (I + 1) * 1e-3f);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += a[j];
  return s;
}

template <int F, std::size_t... I> __device__ float run_body(int which, float x, std::index_sequence<I...>) {
  float r = 0.f;
  ((which == static_cast<int>(I) ? (r = body<static_cast<int>(I), F>(x), 0) : 0), ...);
  return r;
}

template <int F> __global__ void __launch_bounds__(kThreads, 1) tasks(int bodies, float* sink) {
  float x = threadIdx.x * 1e-3f;
  for (int t = 0; t < kTasks; ++t) {
    x = run_body<F>(t % bodies, x, std::make_index_sequence<kMaxBodies>{});
    __syncthreads();  // tasks end together, as the megakernel's do
  }
  sink[blockIdx.x * kThreads + threadIdx.x] = x;
}

template <int F> void row(int sms, float* sink) {
  float base = 0.f;
  for (int n : {1, 2, 4, 8, 16}) {
    const float ms = best_ms(kProgram, [] {}, [&] { tasks<F><<<sms, kThreads>>>(n, sink); });
    const float us = 1e3f * ms / kTasks;
    if (n == 1) base = us;
    std::printf("%6d %6d %10d %12.3f %14.1f\n", F, n, n * F, us, n == 1 ? 0.f : 1e3f * (us - base) / F);
  }
}

int main() {
  const cudaDeviceProp prop = device_props(kProgram);
  const int sms = prop.multiProcessorCount;
  float* sink;
  CHECK(cudaMalloc(&sink, sms * kThreads * sizeof(float)));
  std::printf("%s, %d SMs, one CTA of %d threads each, %d tasks\n", prop.name, sms, kThreads, kTasks);
  std::printf("%6s %6s %10s %12s %14s\n", "KB", "bodies", "KB in all", "us per task", "cold ns per KB");
  row<4>(sms, sink);
  row<16>(sms, sink);
  row<32>(sms, sink);
  CHECK(cudaFree(sink));
  return 0;
}
