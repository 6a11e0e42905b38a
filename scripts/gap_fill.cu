// Can weights fill an attention gap? A layer's attention phases keep a few SMs busy on latency (a
// chain of small dependent steps) while the rest wait, HBM idle, for the O projection. This models
// one such layer, L times over distinct weights:
//   A: CTAs [0, kBusy) spin for `gap` us (the attention pair), then release a counter;
//   B: every CTA with rows waits for A, then computes its 32 rows of a 4096 x 4096 bf16 GEMV (256 KB,
//      the O projection's tile at qwen3-8b's width);
//   C: the same GEMV shape on the next weights, after all of B (the next operator).
// Ways B's tile can get on the SM before A ends, each issued by thread 0 as the CTA finishes C of the
// layer before (weights depend on nothing):
//   static:   nothing; B streams its tile after the wait (the megakernel today).
//   l2:       cp.async.bulk.prefetch.L2 of the whole tile; B streams it from L2.
//   head H:   bulk copies of the tile's first H KB into shared memory (one mbarrier); B reads those
//             rows from there and streams the rest.
//   head+l2:  head 192 KB and the rest prefetched into L2.
//   !A:       head 192 KB on the SMs that do not run A only (A's SMs stream their whole tile).
//   w1:       head 192 KB, issued by warp 1 instead of thread 0, the thread that releases counters.
//   rows:     head 192 KB on the SMs that do not run A, each 8 KB row on its own mbarrier, all at once.
//   paced P:  head 192 KB on the SMs that do not run A, one 8 KB row every P ns while the CTA waits
//             for A (the rest at once when A is done), each row on its own mbarrier: the gap filled
//             at a rate that leaves the memory system's latency alone (1 / P of 8 KB per SM).
// Prints us per layer for each beside the same chain without A (gap 0): what B costs when nothing hides it.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/gap_fill scripts/gap_fill.cu && /tmp/gap_fill [timeline]
#include <cuda_bf16.h>

#include <algorithm>
#include <string>

#include "microbench.cuh"

using mpk::global_timer;
using mpk::ld_acquire;
using mpk::red_release;
using mpk::smem_addr;
using mpk::warp_sum;

constexpr const char* kProgram = "gap_fill";
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int K = 4096, N = 4096, kRows = 32, kCtas = N / kRows;  // 128 CTAs with rows
constexpr int kRowsPerWarp = kRows / kWarps, kVecPerLane = K / 8 / 32;
constexpr int kRowBytes = K * 2, kTileBytes = kRows * kRowBytes;  // 8 KB, 256 KB
constexpr int kBusy = 16;                                         // CTAs of the attention phases

enum Mode {
  kStatic, kL2, kHead64, kHead128, kHead192, kHeadL2, kHeadNotA, kHeadWarp1, kRowsAtOnce, kPaced250, kPaced500, kPaced1000, kModes
};
constexpr const char* kModeNames[kModes] = {"static",        "l2",          "head 64KB",    "head 128KB",
                                            "head 192KB",    "head 192KB+l2", "head 192KB !A", "head 192KB w1",
                                            "rows 192KB !A", "paced 250ns",  "paced 500ns",   "paced 1000ns"};
// Row by row (a barrier per row, issued by warp 1, none on A's SMs): paced, or all at once (pace 0).
__host__ __device__ constexpr bool rowwise(Mode m) { return m >= kRowsAtOnce; }
__host__ __device__ constexpr int pace_ns(Mode m) {
  return m == kPaced250 ? 250 : m == kPaced500 ? 500 : m == kPaced1000 ? 1000 : 0;
}
__host__ __device__ constexpr int head_kb(Mode m) {
  return m == kHead64 ? 64 : m == kHead128 ? 128 : m == kStatic || m == kL2 ? 0 : 192;
}

// 16 bytes of weights past L1, as ld_stream, but volatile: issued exactly where the code says.
__device__ __forceinline__ uint4 stream16(const __nv_bfloat16* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// The CTA's 32 rows of `w` (rows [0, kHeadRows) from `head` in shared memory) against x; writes out.
// row_bars (paced heads): row r's own mbarrier, whose phase of parity `parity` is waited for before it is read.
// The head rows are a template argument so that only the streamed rows hold registers: their loads go
// out first, then the head rows are summed straight from shared memory (each after its barrier) while
// those loads fly. With the split decided at run time the row barriers' wait loops sat between loads
// and sums of every row, and the compiler spilled 500-700 bytes a thread in the row-by-row modes (now
// none; 68 bytes with a 64 KB head, whose three streamed rows stay live across the head's sums).
template <int kHeadRows>
__device__ __forceinline__ void gemv_tile(const __nv_bfloat16* w, const unsigned char* head, const float* x, float* out,
                                          unsigned long long* row_bars = nullptr, uint32_t parity = 0) {
  static_assert(kHeadRows % kWarps == 0, "whole rounds of rows in the head");
  constexpr int kHeadRounds = kHeadRows / kWarps, kStreamRounds = kRowsPerWarp - kHeadRounds;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto emit = [&](int r, float acc) {
    acc = warp_sum(acc);
    if (lane == 0) out[r] = acc * (1.f / 64.f);
  };
  uint4 wv[kStreamRounds > 0 ? kStreamRounds : 1][kVecPerLane];
#pragma unroll
  for (int i = 0; i < kStreamRounds; ++i) {
    const int r = warp + (kHeadRounds + i) * kWarps;
#pragma unroll
    for (int v = 0; v < kVecPerLane; ++v) wv[i][v] = stream16(w + static_cast<size_t>(r) * K + (v * 32 + lane) * 8);
  }
#pragma unroll
  for (int i = 0; i < kHeadRounds; ++i) {
    const int r = warp + i * kWarps;
    if (row_bars) mbar_wait_parity(row_bars + r, parity);
    float acc = 0.f;
#pragma unroll 4
    for (int v = 0; v < kVecPerLane; ++v)
      acc += dot8(reinterpret_cast<const uint4*>(head + r * kRowBytes)[v * 32 + lane], x + (v * 32 + lane) * 8);
    emit(r, acc);
  }
#pragma unroll
  for (int i = 0; i < kStreamRounds; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int v = 0; v < kVecPerLane; ++v) acc += dot8(wv[i][v], x + (v * 32 + lane) * 8);
    emit(warp + (kHeadRounds + i) * kWarps, acc);
  }
}

// wb, wc: [L][N][K]; y: [N] (B's and C's input, the host's); out: [2][N]; counters: [3][L] (A, B, C).
template <Mode M>
__global__ void __launch_bounds__(kThreads, 1) layers(const __nv_bfloat16* wb, const __nv_bfloat16* wc, const float* y,
                                                      float* out, unsigned long long* counters, int L, int gap_ns,
                                                      unsigned long long* stamps) {
  extern __shared__ __align__(128) unsigned char head[];
  __shared__ float x[K];
  __shared__ __align__(8) unsigned long long bar, row_bars[kRows];
  __shared__ volatile int a_seen;
  constexpr bool kPaced = rowwise(M);  // rows on their own barriers, pace_ns(M) apart
  constexpr int kHeadBytes = head_kb(M) * 1024;
  const int cta = blockIdx.x;
  const bool has_head = kHeadBytes && !((M == kHeadNotA || kPaced) && cta < kBusy);
  const int head_rows = has_head ? kHeadBytes / kRowBytes : 0;
  const unsigned issuer = M == kHeadWarp1 || kPaced ? 32 : 0;  // the thread that issues the copies
  if (cta >= kCtas) return;
  unsigned long long *ca = counters, *cb = counters + L, *cc = counters + 2 * L;
  if (has_head && threadIdx.x == issuer) {
    mbar_init_count(&bar, 1);
    for (int r = 0; r < kRows; ++r) mbar_init_count(row_bars + r, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  for (int i = threadIdx.x; i < K; i += kThreads) x[i] = y[i];
  __syncthreads();
  for (int l = 0; l < L; ++l) {
    unsigned long long* st = stamps && l == L / 2 ? stamps + cta * 8 : nullptr;  // one layer's timeline
    if (st && threadIdx.x == 0) st[0] = global_timer();
    const __nv_bfloat16* tile_b = wb + (static_cast<size_t>(l) * N + cta * kRows) * K;
    const __nv_bfloat16* tile_c = wc + (static_cast<size_t>(l) * N + cta * kRows) * K;
    if (threadIdx.x == issuer) {  // B's tile, before anything of this layer waits
      const unsigned long long src = reinterpret_cast<unsigned long long>(tile_b);
      if constexpr (M == kL2 || M == kHeadL2)
        for (int off = kHeadBytes; off < kTileBytes; off += 32 * 1024)
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + off), "r"(32 * 1024) : "memory");
      if (has_head && !kPaced) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the last layer's reads before the copy's writes
        mpk::bulk_load(head, src, kHeadBytes, &bar);
      }
    }
    if (cta < kBusy) {  // A: the attention pair, latency only
      if (l > 0) wait_counter(cc + l - 1, kCtas);
      if (threadIdx.x == 0) {
        const unsigned long long until = global_timer() + gap_ns;
        while (global_timer() < until) {
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) red_release(ca + l, 1ull);
    }
    if (kPaced && has_head) {  // thread 0 waits for A while the issuer paces the head's rows
      if (threadIdx.x == 0) a_seen = 0;
      __syncthreads();
      if (threadIdx.x == 0) {
        while (ld_acquire(ca + l) < kBusy) {
        }
        a_seen = 1;
      } else if (threadIdx.x == issuer) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        unsigned long long policy;
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
        unsigned long long next = global_timer();
        for (int r = 0; r < head_rows; ++r) {
          while (!a_seen && global_timer() < next) {
          }
          next += pace_ns(M);
          asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}"
                       ::"r"(smem_addr(row_bars + r)), "r"(kRowBytes) : "memory");
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
              ::"r"(smem_addr(head + r * kRowBytes)), "l"(tile_b + static_cast<size_t>(r) * K), "r"(kRowBytes),
              "r"(smem_addr(row_bars + r)), "l"(policy) : "memory");
        }
        if (st) {
          st[6] = global_timer();
          for (int r = 0; r < head_rows; ++r) mbar_wait_parity(row_bars + r, l & 1);
          st[7] = global_timer();
        }
      }
      __syncthreads();
    } else {
      wait_counter(ca + l, kBusy);
    }
    if (st && threadIdx.x == 0) st[1] = global_timer();
    if (has_head && !kPaced) {
      uint32_t done = 0;
      while (!done)
        asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n selp.u32 %0, 1, 0, q;\n}"
                     : "=r"(done) : "r"(smem_addr(&bar)), "r"(l & 1) : "memory");
    }
    if (st && threadIdx.x == 0) st[2] = global_timer();
    if (head_rows)
      gemv_tile<kHeadBytes / kRowBytes>(tile_b, head, x, out + cta * kRows, kPaced ? row_bars : nullptr, l & 1);
    else
      gemv_tile<0>(tile_b, nullptr, x, out + cta * kRows);
    __syncthreads();  // every thread is done with the head before the next layer's copy lands in it
    if (st && threadIdx.x == 0) st[3] = global_timer();
    if (threadIdx.x == 0) red_release(cb + l, 1ull);
    wait_counter(cb + l, kCtas);
    if (st && threadIdx.x == 0) st[4] = global_timer();
    gemv_tile<0>(tile_c, nullptr, x, out + N + cta * kRows);
    __syncthreads();
    if (st && threadIdx.x == 0) st[5] = global_timer();
    if (threadIdx.x == 0) red_release(cc + l, 1ull);
  }
}

int main(int argc, char** argv) {
  const bool timeline_only = argc > 1 && std::string(argv[1]) == "timeline";
  const cudaDeviceProp prop = device_props(kProgram);
  const int sms = prop.multiProcessorCount;
  if (sms < kCtas) {
    std::fprintf(stderr, "gap_fill: needs %d SMs, the GPU has %d\n", kCtas, sms);
    return 1;
  }
  const int L = 64;
  const size_t wbytes = static_cast<size_t>(L) * N * K * 2;
  __nv_bfloat16 *wb, *wc;
  float *y, *out;
  unsigned long long* counters;
  CHECK(cudaMalloc(&wb, wbytes));
  CHECK(cudaMalloc(&wc, wbytes));
  CHECK(cudaMemset(wb, 0x3c, wbytes));
  CHECK(cudaMemset(wc, 0x3c, wbytes));
  CHECK(cudaMalloc(&y, K * sizeof(float)));
  CHECK(cudaMemset(y, 0, K * sizeof(float)));
  CHECK(cudaMalloc(&out, 2 * N * sizeof(float)));
  CHECK(cudaMalloc(&counters, 3 * L * sizeof(unsigned long long)));
  using Kernel = void (*)(const __nv_bfloat16*, const __nv_bfloat16*, const float*, float*, unsigned long long*, int, int,
                         unsigned long long*);
  const Kernel kernels[kModes] = {layers<kStatic>,    layers<kL2>,         layers<kHead64>,   layers<kHead128>,
                                  layers<kHead192>,   layers<kHeadL2>,     layers<kHeadNotA>, layers<kHeadWarp1>,
                                  layers<kRowsAtOnce>, layers<kPaced250>,  layers<kPaced500>, layers<kPaced1000>};
  unsigned long long* stamps;
  CHECK(cudaMalloc(&stamps, kCtas * 8 * sizeof(unsigned long long)));
  auto time_it = [&](int m, int gap_ns, bool stamp = false) {
    const int smem = head_kb(static_cast<Mode>(m)) * 1024;
    CHECK(cudaFuncSetAttribute(kernels[m], cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float ms = best_ms(
        kProgram, [&] { CHECK(cudaMemset(counters, 0, 3 * L * sizeof(unsigned long long))); },
        [&] { kernels[m]<<<sms, kThreads, smem>>>(wb, wc, y, out, counters, L, gap_ns, stamp ? stamps : nullptr); });
    return 1e3f * ms / L;  // us per layer
  };
  std::printf("%s, %d SMs (%d with rows), %d layers; B and C: 4096x4096 bf16 GEMVs (33.6 MB each); us per layer\n",
              prop.name, sms, kCtas, L);
  std::printf("%-16s %10s %10s %10s\n", "mode", "gap 0", "gap 6 us", "gap 12 us");
  for (int m = 0; m < kModes && !timeline_only; ++m)
    std::printf("%-16s %10.2f %10.2f %10.2f\n", kModeNames[m], time_it(m, 0), time_it(m, 6000), time_it(m, 12000));
  // One layer's timeline at gap 12 us, us from the earliest layer start: median and last CTA.
  std::printf("timeline at gap 12 us (median / last CTA): layer start, A done seen, head in, B done, C start, C done[, paced: issued, landed]\n");
  for (int m = 0; m < kModes; ++m) {
    if (m != kStatic && m != kHead192 && !rowwise(static_cast<Mode>(m))) continue;
    CHECK(cudaMemset(stamps, 0, kCtas * 8 * sizeof(unsigned long long)));
    time_it(m, 12000, true);
    unsigned long long h[kCtas * 8];
    CHECK(cudaMemcpy(h, stamps, sizeof h, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull;
    for (int c = 0; c < kCtas; ++c) t0 = h[c * 8] < t0 ? h[c * 8] : t0;
    std::printf("%-16s", kModeNames[m]);
    for (int k = 0; k < 8; ++k) {
      double v[kCtas];
      int n = 0;
      for (int c = 0; c < kCtas; ++c)
        if (h[c * 8 + k]) v[n++] = (h[c * 8 + k] - t0) / 1e3;
      std::sort(v, v + n);
      if (n) std::printf(" %6.2f/%6.2f", v[n / 2], v[n - 1]);
    }
    std::printf("\n");
  }
  return 0;
}
