// How the shape of a warp's weight loads sets the tensor-core GEMV's rate: the same bytes, the same
// loads in flight per lane (U k-steps of two 16-byte loads) and the same mma.sync work, three layouts.
//   rows:    the kernel's today. Lane (g, q) loads 16 bytes of weight rows g and g + 8 at k-chunk
//            4t + q: one warp-wide load touches 8 rows x 64 bytes, 8 cache lines.
//   blocked: the weights stored in mma order (a 16-row block's k-step t is 2 x 512 contiguous bytes,
//            [row a or b][lane][8 bf16]): one warp-wide load is 512 contiguous bytes, 4 lines.
//   simt:    the batch-1 GEMV's shape for comparison (a warp's load is 512 bytes of one row),
//            with the same mma work on what it loads.
//   lines:   the kernel's layout and fragments, loaded as whole lines: quads g and g ^ 1 load one row's
//            128 bytes together (4 rows x 128 bytes a warp-wide load), then each lane swaps the half
//            that belongs to the other quad's row with it (one shfl per register).
// Each layout runs with and without the L2 fetch-size hint the kernel gives its loads (128 bytes).
// Each CTA streams its own 384 x 4096 bf16 tile (3 MB, a qwen3-8b gate/up task) against 4 staged bf16
// x rows; GB/s on one SM and on all of them.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/load_pattern scripts/load_pattern.cu && /tmp/load_pattern
#include "microbench.cuh"
#include "mma.cuh"

using mpk::bf16;

constexpr const char* kProgram = "load_pattern";
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int K = 4096, kRows = 384, kBlocks = kRows / 16;
constexpr int kStride = K * 2 + 64;  // staged x rows, 64 mod 128 bytes apart

enum Layout { kRowsLayout, kBlockedLayout, kSimtLayout, kLinesLayout };

// The address of lane (g, q)'s 16 bytes of k-step t, row a (which 0) or b (which 1), in block blk.
template <Layout L> __device__ __forceinline__ const bf16* piece(const bf16* w, int blk, int t, int which) {
  const int lane = mpk::lane_id(), g = lane >> 2, q = lane & 3;
  if constexpr (L == kRowsLayout)
    return w + static_cast<size_t>(16 * blk + g + 8 * which) * K + (t * 4 + q) * 8;
  else if constexpr (L == kBlockedLayout)
    return w + static_cast<size_t>(blk) * 16 * K + ((t * 2 + which) * 32 + lane) * 8;
  else if constexpr (L == kSimtLayout)  // rows 2 blk + which, 512 bytes of each a k-step
    return w + static_cast<size_t>(2 * blk + which) * K + (t * 32 + lane) * 8;
  else {  // lines: k-steps t and t + 1 (t even) of rows g & ~1 (which 0) or g | 1 (which 1), + 8 for the b rows
    const int b = which >> 1, y = which & 1, half = (g & 1) ^ y;
    return w + static_cast<size_t>(16 * blk + 8 * b + (g & ~1) + y) * K + ((t / 2) * 8 + half * 4 + q) * 8;
  }
}

// lines: from the pair x (row g & ~1) and y (row g | 1) of k-steps t, t + 1, the lane's own row at k-step t
// and, from its partner quad, at k-step t + 1.
__device__ __forceinline__ void own_pair(const uint4& x, const uint4& y, uint4& first, uint4& second) {
  const bool odd = (mpk::lane_id() >> 2) & 1;
  first = odd ? y : x;
  const uint4 send = odd ? x : y;
  second = make_uint4(__shfl_xor_sync(~0u, send.x, 4), __shfl_xor_sync(~0u, send.y, 4),
                      __shfl_xor_sync(~0u, send.z, 4), __shfl_xor_sync(~0u, send.w, 4));
}

template <Layout L, int U, int F> __global__ void __launch_bounds__(kThreads) stream(const bf16* w, float* out, int k) {
  extern __shared__ unsigned char x[];
  for (int i = threadIdx.x; i < 4 * kStride / 4; i += kThreads) reinterpret_cast<unsigned*>(x)[i] = 0x3f803f80u * (i & 1);
  __syncthreads();
  const bf16* tile = w + static_cast<size_t>(blockIdx.x) * kRows * K;
  const int lane = mpk::lane_id(), g = lane >> 2, q = lane & 3;
  const unsigned char* xrow = x + (g & 3) * kStride;
  const int blocks = L == kSimtLayout ? kRows / 2 : kBlocks;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int blk = mpk::warp_id(); blk < blocks; blk += kWarps) {
    const int steps = L == kSimtLayout ? k / 256 : k / 32;  // at run time, as in the kernel
#pragma unroll 1
    for (int t = 0; t < steps; t += U) {
      uint4 ra[U], rb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = t + u < steps;  // as the kernel's loop: predicated loads, all issued before any use
        if constexpr (L == kLinesLayout) {  // ra, rb: pieces x, y of the a rows at u, of the b rows at u + 1
          ra[u] = in ? mpk::ld_stream<8, F>(piece<L>(tile, blk, t + (u & ~1), 2 * (u & 1))) : make_uint4(0, 0, 0, 0);
          rb[u] = in ? mpk::ld_stream<8, F>(piece<L>(tile, blk, t + (u & ~1), 2 * (u & 1) + 1)) : make_uint4(0, 0, 0, 0);
        } else {
          ra[u] = in ? mpk::ld_stream<8, F>(piece<L>(tile, blk, t + u, 0)) : make_uint4(0, 0, 0, 0);
          rb[u] = in ? mpk::ld_stream<8, F>(piece<L>(tile, blk, t + u, 1)) : make_uint4(0, 0, 0, 0);
        }
      }
      if constexpr (L == kLinesLayout) {
#pragma unroll
        for (int u = 0; u < U; u += 2) {
          uint4 a0, a1, b0, b1;
          own_pair(ra[u], rb[u], a0, a1);
          own_pair(ra[u + 1], rb[u + 1], b0, b1);
          ra[u] = a0, ra[u + 1] = a1, rb[u] = b0, rb[u + 1] = b1;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (t + u >= steps) break;
        const uint4 xv = *reinterpret_cast<const uint4*>(xrow + ((t + u) * 4 + q) % (K / 8) * 16);
        mpk::mma_16816(acc, ra[u].x, rb[u].x, ra[u].y, rb[u].y, xv.x, xv.y);
        mpk::mma_16816(acc, ra[u].z, rb[u].z, ra[u].w, rb[u].w, xv.z, xv.w);
      }
    }
  }
  out[blockIdx.x * kThreads + threadIdx.x] = acc[0] + acc[1] + acc[2] + acc[3];
}

template <Layout L, int U, int F = 0> float gbps(const bf16* w, float* out, int ctas) {
  const int smem = 4 * kStride;
  auto launch = [&] { stream<L, U, F><<<ctas, kThreads, smem>>>(w, out, K); };
  const float ms = best_ms(kProgram, [] {}, launch);
  return static_cast<double>(ctas) * kRows * K * 2 / (ms * 1e6);
}

int main() {
  const cudaDeviceProp prop = device_props(kProgram);
  const int sms = prop.multiProcessorCount;
  const size_t bytes = static_cast<size_t>(sms) * kRows * K * 2;
  bf16* w;
  float* out;
  CHECK(cudaMalloc(&w, bytes));
  CHECK(cudaMalloc(&out, sms * kThreads * sizeof(float)));
  CHECK(cudaMemset(w, 0x3c, bytes));
  std::printf("%s, %d SMs; GB/s per SM streaming a 384 x 4096 bf16 tile per CTA (mma.sync, batch 4)\n", prop.name, sms);
  std::printf("%-8s %3s %5s %10s %10s %12s\n", "layout", "U", "L2 B", "1 SM", "all SMs", "all (TB/s)");
  auto row = [&](const char* name, int u, int f, float one, float all) {
    std::printf("%-8s %3d %5d %10.1f %10.1f %12.2f\n", name, u, f, one, all / sms, all / 1e3);
  };
  row("rows", 8, 0, gbps<kRowsLayout, 8>(w, out, 1), gbps<kRowsLayout, 8>(w, out, sms));
  row("rows", 8, 128, gbps<kRowsLayout, 8, 128>(w, out, 1), gbps<kRowsLayout, 8, 128>(w, out, sms));
  row("lines", 8, 0, gbps<kLinesLayout, 8>(w, out, 1), gbps<kLinesLayout, 8>(w, out, sms));
  row("lines", 8, 128, gbps<kLinesLayout, 8, 128>(w, out, 1), gbps<kLinesLayout, 8, 128>(w, out, sms));
  row("blocked", 8, 0, gbps<kBlockedLayout, 8>(w, out, 1), gbps<kBlockedLayout, 8>(w, out, sms));
  row("simt", 8, 0, gbps<kSimtLayout, 8>(w, out, 1), gbps<kSimtLayout, 8>(w, out, sms));
  row("simt", 8, 128, gbps<kSimtLayout, 8, 128>(w, out, 1), gbps<kSimtLayout, 8, 128>(w, out, sms));
  row("rows", 16, 0, gbps<kRowsLayout, 16>(w, out, 1), gbps<kRowsLayout, 16>(w, out, sms));
  row("lines", 16, 0, gbps<kLinesLayout, 16>(w, out, 1), gbps<kLinesLayout, 16>(w, out, sms));
  row("simt", 16, 0, gbps<kSimtLayout, 16>(w, out, 1), gbps<kSimtLayout, 16>(w, out, sms));
  return 0;
}
