// What the standalone microbenchmarks in scripts/ share: a CUDA-call check that ends the program in one
// line, and the relaxed 8-byte loads and stores of tagged words (the counters' acquire and release
// are the megakernel's own, from mpk_runtime.cuh). Build with -Impk/csrc.
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

// Scope: "gpu" for one GPU's SMs, "sys" across GPUs.
#define MICROBENCH_RELAXED(scope)                                                                      \
  __device__ __forceinline__ unsigned long long ld_relaxed_##scope(const unsigned long long* p) {      \
    unsigned long long v;                                                                              \
    asm volatile("ld.relaxed." #scope ".global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");          \
    return v;                                                                                          \
  }                                                                                                    \
  __device__ __forceinline__ float ld_relaxed_##scope(const float* p) {                                \
    float v;                                                                                           \
    asm volatile("ld.relaxed." #scope ".global.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");          \
    return v;                                                                                          \
  }                                                                                                    \
  __device__ __forceinline__ void st_relaxed_##scope(unsigned long long* p, unsigned long long v) {    \
    asm volatile("st.relaxed." #scope ".global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");            \
  }
MICROBENCH_RELAXED(gpu)
MICROBENCH_RELAXED(sys)
#undef MICROBENCH_RELAXED

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
  if (threadIdx.x == 0)
    while (mpk::ld_acquire(c) < target) {
    }
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
