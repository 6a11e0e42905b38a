// What the standalone microbenchmarks in scripts/ share: a CUDA-call check that ends the program in one
// line, relaxed loads and stores within one GPU, a bf16 dot product, a counter wait, mbarrier helpers,
// the GPU's properties, and a best-of timer. Counters' acquire and release and the tagged words are the megakernel's own
// (mpk_runtime.cuh). Build with -Impk/csrc.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "mpk_runtime.cuh"

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s: %s: %s\n", kProgram, #x, cudaGetErrorString(e));     \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

// Relaxed loads and stores of tagged words within one GPU (mpk::ld_word / st_word are the cross-GPU
// ones), and loads of a peer's floats across GPUs.
__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_gpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ float ld_relaxed_sys(const float* p) {
  float v;
  asm volatile("ld.relaxed.sys.global.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

// The dot product of 8 bf16 weights (one 16-byte load) with 8 floats of x.
__device__ __forceinline__ float dot8(uint4 w, const float* x) {
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(__uint_as_float(u[i] << 16), x[2 * i], s);
    s = fmaf(__uint_as_float(u[i] & 0xffff0000u), x[2 * i + 1], s);
  }
  return s;
}

// Thread 0 spins until *c >= target (acquire); then the CTA may read what those producers wrote.
__device__ __forceinline__ void wait_counter(const unsigned long long* c, unsigned long long target) {
  if (threadIdx.x == 0) mpk::poll_counter<false>(c, static_cast<long long>(target), [](unsigned) { return 0; });
  __syncthreads();
}

// mbarriers in shared memory: init with an arrival count, a plain arrival, a spin until the phase of
// parity `parity` has completed.
__device__ __forceinline__ void mbar_init_count(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(mpk::smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(mpk::smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait_parity(unsigned long long* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n selp.u32 %0, 1, 0, q;\n}"
                 : "=r"(done) : "r"(mpk::smem_addr(bar)), "r"(parity) : "memory");
}

// The current GPU's properties (the header lines print its name and multiProcessorCount), with stdout
// line-buffered so that each row shows as it is measured. Ends the program in one line without a GPU.
inline cudaDeviceProp device_props(const char* program) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int dev = 0;
  cudaDeviceProp prop;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaGetDeviceProperties(&prop, dev);
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: no usable CUDA GPU: %s\n", program, cudaGetErrorString(e));
    std::exit(1);
  }
  return prop;
}

// The phase-chain benchmarks' first line (one CTA of `threads` per SM, `phases` dependent phases, times
// in us per phase); returns the SM count, the CTAs they launch.
inline int phase_chain_header(const char* program, int threads, int phases) {
  const cudaDeviceProp prop = device_props(program);
  std::printf("%s, %d SMs, one CTA of %d threads per SM, %d phases; us per phase\n", prop.name,
              prop.multiProcessorCount, threads, phases);
  return prop.multiProcessorCount;
}

// Milliseconds of `launch()` at its best over three timed runs after a warm-up, `reset()` before each.
// (`kProgram` is the name CHECK prints.)
template <class Reset, class Launch> float best_ms(const char* kProgram, Reset&& reset, Launch&& launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  float best = 1e30f;
  for (int rep = 0; rep < 4; ++rep) {
    reset();
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    if (rep > 0) best = ms < best ? ms : best;
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return best;
}
