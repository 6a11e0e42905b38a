// What it costs to end a phase with a sum over every SM instead of a slice from each: the price of
// folding two dependent GEMVs (gate/up, then down) into one phase, each SM adding its K-slice's
// partial output into the residual. Every phase, each CTA of a persistent grid (one per SM) reads the
// whole n-vector its predecessors produced, then produces its share, then signals one counter
// (release); the next phase's readers poll it (acquire), as the megakernel's events do. Shares:
//   slice:  the kernel's way today: CTA c writes floats [c * n / grid, (c + 1) * n / grid).
//   fixed:  CTA c adds a whole n-vector into the sum as 64-bit fixed point (red.add.u64): integer
//           adds commute, so the sum is the same bit for bit whatever order the adds land in.
//   f32x4:  the same with red.add.v4.f32: a quarter of the requests, but the order changes the bits.
// Each CTA starts its adds at its own offset so that the grid does not queue on one line at a time.
// Prints us per phase for each, at the residual widths of the presets (n = 1024 for qwen3-0.6b to
// 5120 for qwen3-32b); fixed minus slice is what one fewer phase would have to save.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/reduce_phase scripts/reduce_phase.cu && /tmp/reduce_phase
#include "microbench.cuh"

constexpr const char* kProgram = "reduce_phase";
constexpr int kThreads = 256;
constexpr double kFixedOne = 4294967296.0;  // 2^32: the fixed-point scale

enum class Share { slice, fixed, f32x4 };

__device__ __forceinline__ void red_add_u64(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void red_add_f32x4(float* p, float a, float b, float c, float d) {
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}
__device__ __forceinline__ float load_value(const float* v, int i) { return v[i]; }
__device__ __forceinline__ float load_value(const unsigned long long* v, int i) {
  return static_cast<float>(static_cast<double>(static_cast<long long>(v[i])) * (1.0 / kFixedOne));
}

// vec: two buffers of n values (float, or 64-bit fixed point for `fixed`); phase p reads buffer
// (p - 1) % 2 and adds or writes into buffer p % 2. counters: one per phase.
template <Share S, class V>
__global__ void phases_kernel(V* vec, unsigned long long* counters, int n, int phases, float* sink) {
  __shared__ float red[kThreads / 32];
  float acc = 0.f;
  for (int p = 1; p <= phases; ++p) {
    if (threadIdx.x == 0 && p > 1) mpk::poll_counter<false>(counters + p - 1, gridDim.x, [](unsigned) { return 0; });
    __syncthreads();
    const V* in = vec + ((p - 1) & 1) * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += kThreads) s += load_value(in, i);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = s;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
    V* out = vec + (p & 1) * n;
    const float part = total * 1e-9f + blockIdx.x;
    if constexpr (S == Share::slice) {
      const int first = static_cast<int>(static_cast<long long>(blockIdx.x) * n / gridDim.x);
      const int last = static_cast<int>(static_cast<long long>(blockIdx.x + 1) * n / gridDim.x);
      for (int i = first + threadIdx.x; i < last; i += kThreads) out[i] = part + i;
    } else if constexpr (S == Share::fixed) {
      const int start = static_cast<int>(static_cast<long long>(blockIdx.x) * n / gridDim.x);
      for (int j = threadIdx.x; j < n; j += kThreads) {
        const int i = (start + j) % n;
        red_add_u64(out + i, static_cast<unsigned long long>(__double2ll_rn((part + i) * 1e-3 * kFixedOne)));
      }
    } else {
      const int start = static_cast<int>(static_cast<long long>(blockIdx.x) * n / gridDim.x) / 4 * 4;
      for (int j = 4 * threadIdx.x; j < n; j += 4 * kThreads) {
        const int i = (start + j) % n;
        red_add_f32x4(out + i, part + i, part, part, part);
      }
    }
    acc += total;
    __syncthreads();
    if (threadIdx.x == 0) mpk::red_release(counters + p, 1ull);
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = acc;
}

int main() {
  const int phases = 4000;
  const int sms = phase_chain_header(kProgram, kThreads, phases);
  std::printf("%-6s %10s %10s %10s %14s\n", "n", "slice", "fixed", "f32x4", "fixed - slice");
  float* sink;
  CHECK(cudaMalloc(&sink, sms * sizeof(float)));
  unsigned long long* counters;
  CHECK(cudaMalloc(&counters, (phases + 1) * sizeof(unsigned long long)));
  for (int n : {1024, 2048, 4096, 5120}) {
    float* vec;
    unsigned long long* fixed;
    CHECK(cudaMalloc(&vec, 2 * n * sizeof(float)));
    CHECK(cudaMalloc(&fixed, 2 * n * sizeof(unsigned long long)));
    auto reset = [&] {
      CHECK(cudaMemset(vec, 0, 2 * n * sizeof(float)));
      CHECK(cudaMemset(fixed, 0, 2 * n * sizeof(unsigned long long)));
      CHECK(cudaMemset(counters, 0, (phases + 1) * sizeof(unsigned long long)));
    };
    const float slice =
        best_ms(kProgram, reset, [&] { phases_kernel<Share::slice><<<sms, kThreads>>>(vec, counters, n, phases, sink); });
    const float fx =
        best_ms(kProgram, reset, [&] { phases_kernel<Share::fixed><<<sms, kThreads>>>(fixed, counters, n, phases, sink); });
    const float f4 =
        best_ms(kProgram, reset, [&] { phases_kernel<Share::f32x4><<<sms, kThreads>>>(vec, counters, n, phases, sink); });
    const float us = 1e3f / phases;
    std::printf("%-6d %10.3f %10.3f %10.3f %14.3f\n", n, slice * us, fx * us, f4 * us, (fx - slice) * us);
    CHECK(cudaFree(vec));
    CHECK(cudaFree(fixed));
  }
  CHECK(cudaFree(counters));
  CHECK(cudaFree(sink));
  return 0;
}
