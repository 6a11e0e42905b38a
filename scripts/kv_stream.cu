// How fast an attention split can stream its K/V rows, by cache layout and by how the rows are loaded.
// The shape of qwen3-8b at batch 4 with 4,096 positions: 128 CTAs, one per (sequence b, KV group g,
// split s), each reading 1,024 rows of K and of V (head_dim 128, bf16) as AttentionSplit::mma_rows
// does: a warp's round is 16 rows, lane (g, q) loading 16 bytes of rows g and 8 + g at dims
// 32 blk + 8 q, followed by the round's tensor-core work (Q K^T, a softmax's exp2 and shuffles, P V).
// Layouts of one layer's cache:
//   rows:   [sequence][row][group][dim], the megakernel's: a (b, g) row is 256 bytes, 2 KB from the next.
//   groups: [sequence][group][row][dim]: the rows of (b, g) are contiguous.
// Loads: `prefetch` asks L2 for the rows two rounds ahead (prefetch.global.L2, the kernel's); `none`
// does not; `double` keeps two rounds of loads in flight in registers. Each launch streams L layers in
// turn, so no layer's rows are still in L2 from the one before. GB/s per SM and for the GPU.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -Impk/csrc -o /tmp/kv_stream scripts/kv_stream.cu && /tmp/kv_stream
#include "microbench.cuh"
#include "mma.cuh"

using mpk::bf16;

constexpr const char* kProgram = "kv_stream";
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kBatch = 4, kGroups = 8, kSplits = 4, kSeq = 4096, kHd = 128, kLayers = 4;
constexpr int kRows = kSeq / kSplits, NB = kHd / 32;
constexpr size_t kLayerElems = static_cast<size_t>(kBatch) * kSeq * kGroups * kHd;  // of K, and of V

enum Layout { kRowsLayout, kGroupsLayout };
enum Loads { kPrefetch, kNone, kDouble };

// Element (b, row, g, dim 0) of one layer's cache.
template <Layout L> __device__ __forceinline__ size_t at(int b, int row, int g) {
  return L == kRowsLayout ? ((static_cast<size_t>(b) * kSeq + row) * kGroups + g) * kHd
                          : ((static_cast<size_t>(b) * kGroups + g) * kSeq + row) * kHd;
}

struct Round {
  uint4 k0[NB], k1[NB], v0[NB], v1[NB];
};

template <Layout L> __device__ __forceinline__ void load_round(const bf16* k, const bf16* v, int b, int g, int base,
                                                              Round& r) {
  const int lg = mpk::lane_id() >> 2, q = mpk::lane_id() & 3;
  const size_t a0 = at<L>(b, base + lg, g) + 8 * q, a1 = at<L>(b, base + 8 + lg, g) + 8 * q;
#pragma unroll
  for (int blk = 0; blk < NB; ++blk) {
    r.k0[blk] = *reinterpret_cast<const uint4*>(k + a0 + 32 * blk);
    r.k1[blk] = *reinterpret_cast<const uint4*>(k + a1 + 32 * blk);
    r.v0[blk] = *reinterpret_cast<const uint4*>(v + a0 + 32 * blk);
    r.v1[blk] = *reinterpret_cast<const uint4*>(v + a1 + 32 * blk);
  }
}

// The 16 rows' 128-byte lines of K and V from `base`, into L2 (the kernel's prefetch_rows).
template <Layout L> __device__ __forceinline__ void prefetch_round(const bf16* k, const bf16* v, int b, int g, int base,
                                                                  int end) {
  for (int i = mpk::lane_id(); i < 64; i += 32) {
    const int rest = i % 32, row = base + rest / 2;
    if (row < end)
      asm volatile("prefetch.global.L2 [%0];" ::"l"((i < 32 ? k : v) + at<L>(b, row, g) + (rest % 2) * 64));
  }
}

// A round's tensor-core work, shaped as mma_rows's: scores, their max across the quad, exp2, P V.
__device__ __forceinline__ void consume(const Round& r, const unsigned (&qa)[4], float (&o)[NB][4][4], float& m) {
  float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int blk = 0; blk < NB; ++blk) {
    mpk::mma_16816(s0, qa[0], qa[1], qa[2], qa[3], r.k0[blk].x, r.k0[blk].y);
    mpk::mma_16816(s0, qa[0], qa[1], qa[2], qa[3], r.k0[blk].z, r.k0[blk].w);
    mpk::mma_16816(s1, qa[0], qa[1], qa[2], qa[3], r.k1[blk].x, r.k1[blk].y);
    mpk::mma_16816(s1, qa[0], qa[1], qa[2], qa[3], r.k1[blk].z, r.k1[blk].w);
  }
  float mx = fmaxf(fmaxf(s0[0], s0[1]), fmaxf(s1[0], s1[1]));
  mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, 2));
  m = fmaxf(m, mx);
  unsigned p0, p1, p2, p3;
  mpk::pack_bf2_split(exp2f(s0[0] - m), exp2f(s0[1] - m), p0, p1);
  mpk::pack_bf2_split(exp2f(s1[0] - m), exp2f(s1[1] - m), p2, p3);
#pragma unroll
  for (int blk = 0; blk < NB; ++blk) {
    const unsigned va[4] = {r.v0[blk].x, r.v0[blk].y, r.v0[blk].z, r.v0[blk].w};
    const unsigned vb[4] = {r.v1[blk].x, r.v1[blk].y, r.v1[blk].z, r.v1[blk].w};
#pragma unroll
    for (int j = 0; j < 4; ++j)
      mpk::mma_16816(o[blk][j], p0, p1, p2, p3, mpk::transpose8x8(va[j]), mpk::transpose8x8(vb[j]));
  }
}

template <Layout L, Loads M> __global__ void __launch_bounds__(kThreads) stream(const bf16* k_all, const bf16* v_all,
                                                                               float* out) {
  const int s = blockIdx.x % kSplits, g = blockIdx.x / kSplits % kGroups, b = blockIdx.x / (kSplits * kGroups);
  const int r0 = s * kRows, end = r0 + kRows, step = kWarps * 16;
  const unsigned qa[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  float o[NB][4][4] = {}, m = -1e30f;
  for (int layer = 0; layer < kLayers; ++layer) {
    const bf16* k = k_all + layer * kLayerElems;
    const bf16* v = v_all + layer * kLayerElems;
    const int first = r0 + mpk::warp_id() * 16;
    if constexpr (M == kPrefetch)
      for (int i = 0; i < 2; ++i) prefetch_round<L>(k, v, b, g, first + i * step, end);
    if constexpr (M == kDouble) {
      Round cur, next;
      load_round<L>(k, v, b, g, first, cur);
      for (int base = first; base < end; base += step) {
        if (base + step < end) load_round<L>(k, v, b, g, base + step, next);
        consume(cur, qa, o, m);
        cur = next;
      }
    } else {
      for (int base = first; base < end; base += step) {
        if constexpr (M == kPrefetch) prefetch_round<L>(k, v, b, g, base + 2 * step, end);
        Round r;
        load_round<L>(k, v, b, g, base, r);
        consume(r, qa, o, m);
      }
    }
  }
  float sum = m;
#pragma unroll
  for (int blk = 0; blk < NB; ++blk)
#pragma unroll
    for (int j = 0; j < 4; ++j) sum += o[blk][j][0] + o[blk][j][3];
  out[blockIdx.x * kThreads + threadIdx.x] = sum;
}

template <Layout L, Loads M> float gbps(const bf16* k, const bf16* v, float* out) {
  const int ctas = kBatch * kGroups * kSplits;
  const float ms = best_ms(kProgram, [] {}, [&] { stream<L, M><<<ctas, kThreads>>>(k, v, out); });
  return 2.0 * ctas * kRows * kHd * 2 * kLayers / (ms * 1e6);  // K and V rows each CTA reads
}

int main() {
  const cudaDeviceProp prop = device_props(kProgram);
  const size_t elems = kLayerElems * kLayers;
  bf16 *k, *v;
  float* out;
  CHECK(cudaMalloc(&k, elems * sizeof(bf16)));
  CHECK(cudaMalloc(&v, elems * sizeof(bf16)));
  CHECK(cudaMalloc(&out, kBatch * kGroups * kSplits * kThreads * sizeof(float)));
  CHECK(cudaMemset(k, 0x3c, elems * sizeof(bf16)));
  CHECK(cudaMemset(v, 0x3c, elems * sizeof(bf16)));
  const int ctas = kBatch * kGroups * kSplits;
  std::printf("%s, %d SMs; %d CTAs, each streaming %d rows of K and V (head_dim %d, bf16) per layer, %d layers\n",
              prop.name, prop.multiProcessorCount, ctas, kRows, kHd, kLayers);
  std::printf("%-8s %-9s %12s %12s\n", "layout", "loads", "GB/s per SM", "all (TB/s)");
  auto row = [&](const char* layout, const char* loads, float all) {
    std::printf("%-8s %-9s %12.1f %12.2f\n", layout, loads, all / ctas, all / 1e3);
  };
  row("rows", "prefetch", gbps<kRowsLayout, kPrefetch>(k, v, out));
  row("rows", "none", gbps<kRowsLayout, kNone>(k, v, out));
  row("rows", "double", gbps<kRowsLayout, kDouble>(k, v, out));
  row("groups", "prefetch", gbps<kGroupsLayout, kPrefetch>(k, v, out));
  row("groups", "none", gbps<kGroupsLayout, kNone>(k, v, out));
  row("groups", "double", gbps<kGroupsLayout, kDouble>(k, v, out));
  return 0;
}
