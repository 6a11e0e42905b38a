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
