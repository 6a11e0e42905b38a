// Shared device helpers: bf16 rounding that mirrors PyTorch, packed bf16 vectors, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#ifdef MPK_DEBUG
#include <cassert>
#define MPK_ASSERT(cond) assert(cond)
#else
#define MPK_ASSERT(cond) ((void)0)
#endif

namespace mpk {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;  // one CTA of 8 warps per SM
// Dynamic shared memory one CTA may use on the target architecture: the build sets it
// (mpk/runtime/build.py knows the table).
#ifndef MPK_SMEM_CAP
#define MPK_SMEM_CAP (99 * 1024)
#endif
constexpr int kSmemCap = MPK_SMEM_CAP;
// The runtime's static shared memory (queues, barriers) comes on top of a kernel's dynamic bytes.
constexpr int kStaticSmem = 2048;
// Bulk asynchronous copies into shared memory (sm_90 and newer; the build says).
#ifndef MPK_BULK_COPY
#define MPK_BULK_COPY 0
#endif
constexpr bool kBulkCopy = MPK_BULK_COPY;
// Cap on each weight-head buffer in KB (build-time knob; negative: as large as fits). Off by
// default: on an H200 the heads did not pay (docs/perf.md).
#ifndef MPK_HEAD_KB
#define MPK_HEAD_KB 0
#endif
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 to_bf(float x) { return __float2bfloat16_rn(x); }
// The value a bf16 tensor would hold: PyTorch rounds every bf16 op's fp32 result once.
__device__ __forceinline__ float round_bf(float x) { return to_f(to_bf(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// argmax over a warp: the largest value, ties to the lowest index (NaN never wins).
__device__ __forceinline__ void warp_argmax(float& v, long long& i) {
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const long long oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
  }
}

// N packed bf16 values as one load: 16 bytes for N = 8.
template <int N> struct Packed;
template <> struct Packed<1> { using T = unsigned short; };
template <> struct Packed<2> { using T = unsigned int; };
template <> struct Packed<4> { using T = uint2; };
template <> struct Packed<8> { using T = uint4; };
template <int N> using packed_t = typename Packed<N>::T;

// The 16-byte weight loads may ask L2 to fetch kFetch bytes around each request from memory (PTX's
// .L2::NB prefetch size: 64, 128 or 256; 0 for no hint), so a row's next chunks are on their way
// before their own loads. Each asm names its qualifiers literally, hence one branch per size.
#ifndef MPK_L2_FETCH
#define MPK_L2_FETCH -1  // the tensor-core GEMV's own choice (gemv_mma.cuh); a size, for A/B
#endif
#define MPK_LD16(QUAL, v, p) \
  asm("ld.global.nc" QUAL ".v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p))
template <int kFetch, bool kNoL1> __device__ __forceinline__ uint4 ld16(const bf16* p) {
  static_assert(kFetch == 0 || kFetch == 64 || kFetch == 128 || kFetch == 256, "L2 fetch sizes: 0, 64, 128, 256");
  uint4 v;
  if constexpr (kNoL1) {
    if constexpr (kFetch == 0) MPK_LD16(".L1::no_allocate", v, p);
    else if constexpr (kFetch == 64) MPK_LD16(".L1::no_allocate.L2::64B", v, p);
    else if constexpr (kFetch == 128) MPK_LD16(".L1::no_allocate.L2::128B", v, p);
    else MPK_LD16(".L1::no_allocate.L2::256B", v, p);
  } else {
    if constexpr (kFetch == 0) MPK_LD16("", v, p);
    else if constexpr (kFetch == 64) MPK_LD16(".L2::64B", v, p);
    else if constexpr (kFetch == 128) MPK_LD16(".L2::128B", v, p);
    else MPK_LD16(".L2::256B", v, p);
  }
  return v;
}
#undef MPK_LD16

// Loads of constant data (weights): read-only path.
template <int N, int kFetch = 0> __device__ __forceinline__ packed_t<N> ld_weight(const bf16* p) {
  if constexpr (N == 8) return ld16<kFetch, false>(p);
  else return __ldg(reinterpret_cast<const packed_t<N>*>(p));
}
// Loads of the weights a GEMV streams, each byte once a step: read-only path, and no L1 line taken,
// so the stream does not evict what the task reads again (staged inputs, norm weights). On an H200
// this made qwen3-8b's batch-1 step 5.5% faster (docs/perf.md).
template <int N, int kFetch = 0> __device__ __forceinline__ packed_t<N> ld_stream(const bf16* p) {
  if constexpr (N == 8) {
    return ld16<kFetch, true>(p);
  } else if constexpr (N == 4) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
  } else if constexpr (N == 2) {
    unsigned v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
  } else {
    return ld_weight<N>(p);
  }
}
// 16 bytes global -> shared, asynchronously, cached in L2 only; `valid` false fills zeros (rows or k
// past the end). One thread's copies complete, in commit groups, for that thread: cp_async_wait<N>
// leaves at most N of its groups in flight.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// A 16-byte load from shared memory (a weight head), through an explicit shared-space address.
__device__ __forceinline__ uint4 ld_shared16(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
  return v;
}

// Loads of data other SMs write during the launch (activations, KV cache): coherent path only.
template <int N> __device__ __forceinline__ packed_t<N> ld_act(const bf16* p) {
  return *reinterpret_cast<const packed_t<N>*>(p);
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the float.
template <int N> __device__ __forceinline__ void unpack(const packed_t<N>& r, float (&f)[N]) {
  if constexpr (N == 1) {
    f[0] = __uint_as_float(static_cast<unsigned>(r) << 16);
  } else {
    unsigned w[N / 2];
    if constexpr (N == 2) {
      w[0] = r;
    } else if constexpr (N == 4) {
      w[0] = r.x, w[1] = r.y;
    } else {
      w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
    }
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      f[2 * j] = __uint_as_float(w[j] << 16);
      f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
}

// Loads of N activation values as floats, packed: bf16 (16 bytes for N = 8) or float (16 bytes per 4).
template <int N> __device__ __forceinline__ void load_vec(const bf16* p, float (&f)[N]) { unpack<N>(ld_act<N>(p), f); }
template <int N> __device__ __forceinline__ void load_vec(const float* p, float (&f)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
      const float4 v = reinterpret_cast<const float4*>(p)[j];
      f[4 * j] = v.x, f[4 * j + 1] = v.y, f[4 * j + 2] = v.z, f[4 * j + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    f[0] = v.x, f[1] = v.y;
  } else {
    f[0] = *p;
  }
}

__device__ __forceinline__ float act_f(bf16 x) { return to_f(x); }
__device__ __forceinline__ float act_f(float x) { return x; }
__device__ __forceinline__ void act_store(bf16* p, float v) { *p = to_bf(v); }
__device__ __forceinline__ void act_store(float* p, float v) { *p = v; }

// Activation precision of a graph (mpk.graph `activations`): the element type of activations and
// the KV cache, and `round`, applied wherever the op references round an intermediate result.
// `input` is what a matrix product multiplies an element of its x by (Precision.matmul_inputs).
struct ActBf16 {
  using T = bf16;
  static constexpr bool kBf16Inputs = true;
  __device__ __forceinline__ static float round(float x) { return round_bf(x); }
  __device__ __forceinline__ static float input(float x) { return x; }
};
struct ActF32 {
  using T = float;
  static constexpr bool kBf16Inputs = false;
  __device__ __forceinline__ static float round(float x) { return x; }
  __device__ __forceinline__ static float input(float x) { return x; }
};
// Float32 activations whose matrix products take x rounded to bf16 (one tensor-core pass).
struct ActF32Bf16Inputs : ActF32 {
  static constexpr bool kBf16Inputs = true;
  __device__ __forceinline__ static float input(float x) { return round_bf(x); }
};
// The same product over an x its producer already stored rounded to bf16 (mpk.graph.product_input_dtype:
// the attention's output and the MLP's hidden activation from batch 2): x is read as bf16, half the
// bytes, and nothing else changes.
struct ActF32Bf16X : ActF32Bf16Inputs {
  using T = bf16;
};

// Widest packing that divides n (rows of n elements then stay aligned).
__host__ __device__ constexpr int vec_width(int n) { return n % 8 == 0 ? 8 : n % 4 == 0 ? 4 : n % 2 == 0 ? 2 : 1; }
__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int align16(int bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ constexpr int align_up(int bytes, int to) { return (bytes + to - 1) / to * to; }

// Bytes of each of the two weight-head buffers of a kernel whose variants need `scratch` bytes:
// what shared memory has left (less kStaticSmem), halved, in whole 4 KB; none below 16 KB.
__host__ __device__ constexpr int head_buffer_bytes(int scratch) {
  const int fit = (kSmemCap - scratch - kStaticSmem) / 2 / 4096 * 4096;
  const int capped = MPK_HEAD_KB >= 0 && fit > MPK_HEAD_KB * 1024 ? MPK_HEAD_KB * 1024 / 4096 * 4096 : fit;
  return kBulkCopy && capped >= 16 * 1024 ? capped : 0;
}

}  // namespace mpk
