// Tensor-core primitives the templates share: mma.sync m16n8k16 (bf16 in, fp32 accumulate), bf16
// pairs, and ldmatrix loads of 8x8 b16 matrices from shared memory.
#pragma once

#include "common.cuh"

namespace mpk {

// d += A (16x16, rows g and g+8 as a0..a3) * B (16x8, column g as b0, b1), PTX fragment layout.
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Two floats as a bf16 pair in one register (the first in the low half, as in memory).
__device__ __forceinline__ unsigned pack_bf2(float lo_k, float hi_k) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo_k, hi_k);
  return *reinterpret_cast<const unsigned*>(&v);
}

// Two floats as bf16 pairs hi + lo (lo: what rounding to bf16 left out), so that an mma over both
// multiplies the floats to ~2^-17 relative.
__device__ __forceinline__ void pack_bf2_split(float a, float b, unsigned& hi, unsigned& lo) {
  hi = pack_bf2(a, b);
  const float ha = __uint_as_float(hi << 16), hb = __uint_as_float(hi & 0xffff0000u);  // hi's halves as floats
  lo = pack_bf2(a - ha, b - hb);
}

// An 8x8 b16 matrix transposed across the warp: lane l holds row l / 4, columns 2 (l % 4) and + 1, and
// receives column l / 4, rows 2 (l % 4) and + 1 (the first in the low half).
__device__ __forceinline__ unsigned transpose8x8(unsigned x) {
  unsigned y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// Four 8x8 b16 matrices from shared memory: lanes 8i .. 8i + 7 give the row addresses of matrix i, and lane
// l receives row l / 4, columns 2 (l % 4) and + 1 of each (.trans: column l / 4, rows 2 (l % 4) and + 1).
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
}

}  // namespace mpk
