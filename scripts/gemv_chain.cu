// What an operator boundary costs when every phase streams weights: a chain of L square GEMVs
// y_{l+1} = W_l y_l (K = N = 4096, bf16 weights, float32 vectors, batch 1), one persistent CTA per SM,
// each CTA owning 32 rows of every W_l, as the megakernel's norm GEMVs do at qwen3-8b's width. Each
// op needs all of the op before's output, so the chain is an all-to-all dependency per op. Three
// ways to cross the boundary:
//   static:   the megakernel's way today. Thread 0 waits for the op's counter (every CTA of the op
//             before), then the CTA loads y and streams its rows.
//   ahead:    the same wait, but each warp loads its first rows' weights into registers before it
//             (weights depend on nothing): the wait overlaps one round of weight loads.
//   chunked:  y arrives in C = 8 chunks of 512 values, each with its own counter (the 16 CTAs whose
//             rows make it). A CTA keeps two chunks' weights in flight, waits for one chunk of y at
//             a time and folds it into its row sums: it starts on the first chunks while the last
//             ones' producers finish (split-K partial dependencies, an idea in docs/perf.md).
//   claimed:  the static wait, but rows are taken in blocks of 8 (one per warp) from a ticket per op
//             (an atomic add, the next one claimed while the current block streams), so an SM that
//             runs fast takes more blocks: how much of an op's tail dynamic claiming flattens.
//   ring S:   a ninth warp streams the CTA's rows of every op, in order, into a shared-memory ring of
//             S row slots (8 KB each) with bulk copies completing on mbarriers, and never waits for
//             a counter: weights depend on nothing. The eight compute warps wait for the op's
//             counter, then read their rows from the ring. The ring fills while they wait, so HBM
//             stays busy across the boundary as long as the wait is shorter than the ring.
//             "free" is the same with no counter at all: the ring's own floor.
// Prints microseconds per op and the weights' GB/s for each, beside a plain read of the same
// weights (no dependencies at all): the floor the boundaries are measured against.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/gemv_chain scripts/gemv_chain.cu && /tmp/gemv_chain
#include <cuda_bf16.h>

#include "microbench.cuh"

using mpk::ld_acquire;
using mpk::ld_stream;
using mpk::red_release;
using mpk::warp_sum;

constexpr const char* kProgram = "gemv_chain";
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int K = 4096, N = 4096, kRows = 32;  // rows per CTA: N / kRows = 128 CTAs have rows
constexpr int kChunks = 8, kChunk = K / kChunks;  // y in chunks of 512 values
constexpr int kRowsPerWarp = kRows / kWarps;      // 4
constexpr int kVecPerLaneRow = K / 8 / 32;        // uint4 (8 bf16) per lane for a whole row: 16
constexpr int kVecPerLaneChunk = kChunk / 8 / 32; // per lane for one chunk of a row: 2

enum Mode { kStatic, kAhead, kChunked, kModes };
constexpr const char* kModeNames[kModes + 1] = {"static", "ahead", "chunked", "claimed"};
constexpr int kBlocks = N / kWarps;  // claimed: blocks of one row per warp

// The warp's rows warp + i * kWarps of a CTA's tile: their sums into out (scaled to keep the values bounded).
__device__ __forceinline__ void store_rows(const float (&acc)[kRowsPerWarp], float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const float s = warp_sum(acc[i]);
    if (lane == 0) out[warp + i * kWarps] = s * (1.f / 64.f);
  }
}

// w: [L][N][K]; ys: [L + 1][N] (ys[0] written by the host); counters: [L + 1][kChunks] (chunked) or
// [L + 1] (static, ahead); chunk_target[j]: CTAs whose rows fall in chunk j.
template <Mode M>
__global__ void chain(const __nv_bfloat16* w, float* ys, unsigned long long* counters, const int* chunk_target, int L) {
  __shared__ float x[K];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kRows;
  if (row0 >= N) return;  // CTAs past the rows: idle, as the megakernel's SMs past an op's tiles
  for (int l = 0; l < L; ++l) {
    const float* y = ys + static_cast<size_t>(l) * N;
    const __nv_bfloat16* wl = w + static_cast<size_t>(l) * N * K;
    float acc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = 0.f;
    if constexpr (M == kChunked) {
      // Two chunks' weights in flight: chunk j + 1's load while chunk j waits and folds.
      uint4 wv[kRowsPerWarp][kVecPerLaneChunk], next[kRowsPerWarp][kVecPerLaneChunk];
      auto load_chunk = [&](int j, uint4 (&to)[kRowsPerWarp][kVecPerLaneChunk]) {
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int v = 0; v < kVecPerLaneChunk; ++v)
            to[i][v] = ld_stream<8>(wl + static_cast<size_t>(row0 + warp + i * kWarps) * K + j * kChunk + (v * 32 + lane) * 8);
      };
      load_chunk(0, wv);
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        if (j + 1 < kChunks) load_chunk(j + 1, next);
        if (l > 0) wait_counter(counters + l * kChunks + j, chunk_target[j]);
        for (int i = threadIdx.x; i < kChunk; i += kThreads) x[j * kChunk + i] = y[j * kChunk + i];
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int v = 0; v < kVecPerLaneChunk; ++v) acc[i] += dot8(wv[i][v], x + j * kChunk + (v * 32 + lane) * 8);
        if (j + 1 < kChunks)
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
            for (int v = 0; v < kVecPerLaneChunk; ++v) wv[i][v] = next[i][v];
      }
    } else {
      uint4 first[kVecPerLaneRow];  // ahead: row 0's weights of this warp, loaded before the wait
      if constexpr (M == kAhead)
#pragma unroll
        for (int v = 0; v < kVecPerLaneRow; ++v) first[v] = ld_stream<8>(wl + static_cast<size_t>(row0 + warp) * K + (v * 32 + lane) * 8);
      if (l > 0) wait_counter(counters + l, N / kRows);  // every CTA with rows
      for (int i = threadIdx.x; i < K; i += kThreads) x[i] = y[i];
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        uint4 wv[kVecPerLaneRow];
#pragma unroll
        for (int v = 0; v < kVecPerLaneRow; ++v)
          wv[v] = M == kAhead && i == 0 ? first[v]
                                        : ld_stream<8>(wl + static_cast<size_t>(row0 + warp + i * kWarps) * K + (v * 32 + lane) * 8);
#pragma unroll
        for (int v = 0; v < kVecPerLaneRow; ++v) acc[i] += dot8(wv[v], x + (v * 32 + lane) * 8);
      }
    }
    store_rows(acc, ys + static_cast<size_t>(l + 1) * N + row0);
    __syncthreads();
    if (threadIdx.x == 0)
      red_release(M == kChunked ? counters + (l + 1) * kChunks + row0 / kChunk : counters + l + 1, 1ull);
  }
}

// claimed: tickets[l] hands out op l's blocks; counters[l + 1] counts op l's finished blocks.
__global__ void claimed_chain(const __nv_bfloat16* w, float* ys, unsigned long long* counters, unsigned* tickets,
                              int L) {
  __shared__ float x[K];
  __shared__ unsigned s_block[2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int l = 0; l < L; ++l) {
    if (threadIdx.x == 0) s_block[0] = atomicAdd(tickets + l, 1u);  // depends on nothing: before the wait
    if (l > 0) wait_counter(counters + l, kBlocks);
    const float* y = ys + static_cast<size_t>(l) * N;
    for (int i = threadIdx.x; i < K; i += kThreads) x[i] = y[i];
    __syncthreads();
    const __nv_bfloat16* wl = w + static_cast<size_t>(l) * N * K;
    float* out = ys + static_cast<size_t>(l + 1) * N;
    unsigned done = 0;
    for (int b = 0;; b ^= 1) {
      const unsigned block = s_block[b];
      if (block >= kBlocks) break;
      if (threadIdx.x == 0) s_block[b ^ 1] = atomicAdd(tickets + l, 1u);  // the next claim streams with this block
      const int row = block * kWarps + warp;
      uint4 wv[kVecPerLaneRow];
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) wv[v] = ld_stream<8>(wl + static_cast<size_t>(row) * K + (v * 32 + lane) * 8);
      float acc = 0.f;
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) acc += dot8(wv[v], x + (v * 32 + lane) * 8);
      acc = warp_sum(acc);
      if (lane == 0) out[row] = acc * (1.f / 64.f);
      ++done;
      __syncthreads();  // s_block[b ^ 1] is written; s_block[b] is free for the claim after
    }
    __syncthreads();
    if (threadIdx.x == 0 && done) red_release(counters + l + 1, static_cast<unsigned long long>(done));
  }
}

// --- ring: a producer warp feeding row slots through bulk copies on mbarriers

constexpr int kRowBytes = K * sizeof(__nv_bfloat16);  // one slot: 8 KB

// The eight compute warps only: the producer warp never joins their barriers.
__device__ __forceinline__ void compute_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory"); }

// S slots of R rows each; Deps: wait for each op's counter; Hint: copies marked L2 evict-first.
template <int S, int R, bool Deps, bool Hint>
__global__ void __launch_bounds__(kThreads + 32) ring_chain(const __nv_bfloat16* w, float* ys, unsigned long long* counters, int L) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int kSlotBytes = R * kRowBytes;
  unsigned char* ring = smem;
  float* x = reinterpret_cast<float*>(smem + S * kSlotBytes);
  unsigned long long* full = reinterpret_cast<unsigned long long*>(x + K);
  unsigned long long* empty = full + S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kRows;
  if (row0 >= N) return;
  if (threadIdx.x == 0)
    for (int i = 0; i < S; ++i) mbar_init_count(full + i, 1), mbar_init_count(empty + i, R);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  const int slots = L * kRows / R;  // the CTA's rows of every op, in stream order: row s = l * kRows + r
  if (warp == kWarps) {
    if (lane == 0) {
      unsigned long long policy;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
      for (int c = 0; c < slots; ++c) {
        const int slot = c % S, use = c / S, s = c * R;
        if (use > 0) mbar_wait_parity(empty + slot, (use - 1) & 1);
        const __nv_bfloat16* src = w + (static_cast<size_t>(s / kRows) * N + row0 + s % kRows) * K;
        asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}"
                     ::"r"(mpk::smem_addr(full + slot)), "r"(kSlotBytes) : "memory");
        if constexpr (Hint)
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
              ::"r"(mpk::smem_addr(ring + slot * kSlotBytes)), "l"(src), "r"(kSlotBytes), "r"(mpk::smem_addr(full + slot)),
              "l"(policy) : "memory");
        else
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                       ::"r"(mpk::smem_addr(ring + slot * kSlotBytes)), "l"(src), "r"(kSlotBytes),
                       "r"(mpk::smem_addr(full + slot)) : "memory");
      }
    }
    return;
  }
  for (int l = 0; l < L; ++l) {
    if (Deps && l > 0 && threadIdx.x == 0)
      while (ld_acquire(counters + l) < static_cast<unsigned long long>(N / kRows)) {
      }
    compute_sync();
    const float* y = ys + static_cast<size_t>(l) * N;
    for (int i = threadIdx.x; i < K; i += kThreads) x[i] = y[i];
    compute_sync();
    float acc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int s = l * kRows + warp + i * kWarps, c = s / R, slot = c % S;
      mbar_wait_parity(full + slot, (c / S) & 1);
      const uint4* row = reinterpret_cast<const uint4*>(ring + slot * kSlotBytes + (s % R) * kRowBytes);
      uint4 wv[kVecPerLaneRow];
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) wv[v] = row[v * 32 + lane];
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + slot);
      acc[i] = 0.f;
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) acc[i] += dot8(wv[v], x + (v * 32 + lane) * 8);
    }
    store_rows(acc, ys + static_cast<size_t>(l + 1) * N + row0);
    compute_sync();
    if (threadIdx.x == 0) red_release(counters + l + 1, 1ull);
  }
}

// The floor: every CTA streams its rows of every W_l with no dependency between ops.
__global__ void stream_only(const __nv_bfloat16* w, float* sink, int L) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = blockIdx.x * kRows;
  if (row0 >= N) return;
  float acc = 0.f;
  for (int l = 0; l < L; ++l)
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const __nv_bfloat16* row = w + (static_cast<size_t>(l) * N + row0 + warp + i * kWarps) * K;
      uint4 wv[kVecPerLaneRow];
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) wv[v] = ld_stream<8>(row + (v * 32 + lane) * 8);
#pragma unroll
      for (int v = 0; v < kVecPerLaneRow; ++v) acc += __uint_as_float(wv[v].x << 16);
    }
  if (lane == 0) sink[blockIdx.x * kWarps + warp] = acc;
}

int main() {
  const cudaDeviceProp prop = device_props(kProgram);
  const int sms = prop.multiProcessorCount;
  const int L = 64;
  const size_t wbytes = static_cast<size_t>(L) * N * K * sizeof(__nv_bfloat16);
  __nv_bfloat16* w;
  float *ys, *sink;
  unsigned long long* counters;
  unsigned* tickets;
  int* chunk_target;
  CHECK(cudaMalloc(&w, wbytes));
  CHECK(cudaMemset(w, 0x3c, wbytes));  // every weight ~0.0117: finite sums
  CHECK(cudaMalloc(&ys, static_cast<size_t>(L + 1) * N * sizeof(float)));
  CHECK(cudaMalloc(&sink, sms * kWarps * sizeof(float)));
  CHECK(cudaMalloc(&counters, (L + 1) * kChunks * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&chunk_target, kChunks * sizeof(int)));
  CHECK(cudaMalloc(&tickets, L * sizeof(unsigned)));
  int targets[kChunks];
  for (int j = 0; j < kChunks; ++j) targets[j] = kChunk / kRows;  // rows of a chunk / rows per CTA
  CHECK(cudaMemcpy(chunk_target, targets, sizeof targets, cudaMemcpyHostToDevice));
  if (sms < N / kRows) {
    std::fprintf(stderr, "gemv_chain: needs %d SMs for one CTA per 32 rows, the GPU has %d\n", N / kRows, sms);
    return 1;
  }
  auto time_it = [&](auto launch) {
    const float ms = best_ms(
        kProgram,
        [&] {
          CHECK(cudaMemset(counters, 0, (L + 1) * kChunks * sizeof(unsigned long long)));
          CHECK(cudaMemset(tickets, 0, L * sizeof(unsigned)));
          CHECK(cudaMemset(ys, 0, static_cast<size_t>(L + 1) * N * sizeof(float)));
        },
        launch);
    return 1e3f * ms / L;  // us per op
  };
  const double op_bytes = static_cast<double>(N) * K * sizeof(__nv_bfloat16);
  std::printf("%s, %d SMs (%d with rows), %d ops of %dx%d bf16 (%.1f MB each), batch 1\n", prop.name, sms, N / kRows,
              L, N, K, op_bytes / 1e6);
  std::printf("%-10s %10s %10s\n", "mode", "us/op", "GB/s");
  const float floor_us = time_it([&] { stream_only<<<sms, kThreads>>>(w, sink, L); });
  std::printf("%-10s %10.3f %10.0f\n", "no deps", floor_us, op_bytes / floor_us / 1e3);
  using Kernel = void (*)(const __nv_bfloat16*, float*, unsigned long long*, const int*, int);
  const Kernel kernels[kModes] = {chain<kStatic>, chain<kAhead>, chain<kChunked>};
  for (int m = 0; m < kModes; ++m) {
    const float us = time_it([&] { kernels[m]<<<sms, kThreads>>>(w, ys, counters, chunk_target, L); });
    std::printf("%-10s %10.3f %10.0f\n", kModeNames[m], us, op_bytes / us / 1e3);
  }
  const float us = time_it([&] { claimed_chain<<<sms, kThreads>>>(w, ys, counters, tickets, L); });
  std::printf("%-10s %10.3f %10.0f\n", kModeNames[kModes], us, op_bytes / us / 1e3);
  auto ring = [&](auto kernel, int slots, int rows_per_slot, const char* what) {
    const int bytes = slots * rows_per_slot * kRowBytes + K * sizeof(float) + 2 * slots * sizeof(unsigned long long);
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    const float ring_us = time_it([&] { kernel<<<sms, kThreads + 32, bytes>>>(w, ys, counters, L); });
    char name[48];
    std::snprintf(name, sizeof name, "ring %dx%dKB%s", slots, rows_per_slot * kRowBytes / 1024, what);
    std::printf("%-22s %10.3f %10.0f\n", name, ring_us, op_bytes / ring_us / 1e3);
  };
  ring(ring_chain<8, 1, true, true>, 8, 1, "");
  ring(ring_chain<16, 1, true, true>, 16, 1, "");
  ring(ring_chain<24, 1, true, true>, 24, 1, "");
  ring(ring_chain<24, 1, true, false>, 24, 1, " no hint");
  ring(ring_chain<12, 2, true, true>, 12, 2, "");
  ring(ring_chain<6, 4, true, true>, 6, 4, "");
  ring(ring_chain<24, 1, false, true>, 24, 1, " free");
  ring(ring_chain<24, 1, false, false>, 24, 1, " free no hint");
  ring(ring_chain<12, 2, false, true>, 12, 2, " free");
  ring(ring_chain<6, 4, false, true>, 6, 4, " free");
  return 0;
}
