// Matrix products over many rows (a prefill chunk) on tensor cores: a task owns a BM x BN block of
// the output, rows [r0, r1) x weight rows [n0, n1), and runs the whole K loop over it.
//
// mma.sync m16n8k16 (bf16 in, fp32 accumulate) with x as A ([rows][k]) and the weight as B (its rows
// are B's columns, k-contiguous, as mma's "col" layout wants). Eight warps tile the block 2 x 4, a
// warp 64 rows x 32 weight rows: 4 x 4 mmas per 16 k, fragments through ldmatrix. The K loop stages
// BK-wide slices of x and the weight in shared memory, double-buffered: each thread loads the next
// slice into registers before the mmas of the current one and stores it after, so the loads are in
// flight while the tensor cores work. x is rounded to bf16 as it is staged (the inputs of PyTorch's
// fast prefill GEMMs), times the RMSNorm weight when the op norms its input; the row's 1/rms comes
// from the sums of squares of the same loads and scales the sums in the epilogue.
#pragma once

#include "gemv_base.cuh"
#include "gemv_mma.cuh"  // mma_16816, pack_bf2

namespace mpk {

// Four 8x8 b16 matrices from shared memory, one row address per lane (lanes 8i..8i+7: matrix i).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row))));
}

template <int RPC, int M, int K, bool NORM, class A> struct MmaGemm {
  using T = typename A::T;
  static constexpr int BM = 128, BN = 128, BK = 64;  // BN: weight rows (RPC of them per output column)
  static constexpr int LD = BK + 8;  // bf16 per staged row: 144 bytes, so ldmatrix's 8 rows hit 8 bank groups
  static constexpr int kStage = (BM + BN) * LD * 2;
  static constexpr int kInvOffset = 2 * kStage;
  static constexpr int SMEM = kInvOffset + BM * 4;
  static constexpr int kSlices = (K + BK - 1) / BK;
  static constexpr int kColumns = BN / RPC;  // output columns of a task
  // Each thread stages half a row (32 k) of x and of the weight per slice.
  static constexpr int kHalf = BK / 2;
  static constexpr bool kVecX = K % 8 == 0;  // whole 16-byte loads (K % 8: every slice stays aligned)
  static_assert(BN % RPC == 0 && kThreads == 2 * BM && kThreads == 2 * BN, "two threads stage each row");

  struct Regs {  // one thread's share of a slice, in flight: 32 x values (as floats) and 32 weights
    float x[kHalf];
    uint4 w[kHalf / 8];
  };

  __device__ static void load(const T* x, const bf16* w, int rows, int wrows, int slice, Regs& r) {
    const int row = threadIdx.x >> 1, k0 = slice * BK + (threadIdx.x & 1) * kHalf;
    const bool x_in = row < rows, w_in = row < wrows;
    const T* xr = x + static_cast<size_t>(row) * K + k0;
    const bf16* wr = w + static_cast<size_t>(row) * K + k0;
    if constexpr (kVecX) {
      constexpr int V = 16 / sizeof(T);
#pragma unroll
      for (int j = 0; j < kHalf / V; ++j) {
        float f[V];
        if (x_in && k0 + j * V < K) {
          load_vec<V>(xr + j * V, f);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) f[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) r.x[j * V + e] = f[e];
      }
#pragma unroll
      for (int j = 0; j < kHalf / 8; ++j)
        r.w[j] = w_in && k0 + j * 8 < K ? ld_weight<8>(wr + j * 8) : make_uint4(0, 0, 0, 0);
    } else {  // odd K: element by element
#pragma unroll
      for (int e = 0; e < kHalf; ++e) r.x[e] = x_in && k0 + e < K ? act_f(xr[e]) : 0.f;
#pragma unroll
      for (int j = 0; j < kHalf / 8; ++j) {
        unsigned short h[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int k = k0 + j * 8 + e;
          h[e] = w_in && k < K ? __ldg(reinterpret_cast<const unsigned short*>(wr) + j * 8 + e) : 0;
        }
        r.w[j] = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
      }
    }
  }

  // The RMSNorm weights of k .. k + 7 (0 past K).
  __device__ static void norm_weights(const bf16* norm, int k, float (&nw)[8]) {
    if constexpr (kVecX) {
      if (k < K) {
        unpack<8>(ld_weight<8>(norm + k), nw);
        return;
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) nw[e] = k + e < K ? to_f(norm[k + e]) : 0.f;
  }

  // The slice into a stage: x (times the norm weight) as bf16; sum of squares of raw x into ss.
  __device__ static void store(unsigned char* stage, const bf16* norm, int slice, const Regs& r, float& ss) {
    const int row = threadIdx.x >> 1, half = threadIdx.x & 1, k0 = slice * BK + half * kHalf;
    bf16* xs = reinterpret_cast<bf16*>(stage) + row * LD + half * kHalf;
    bf16* ws = reinterpret_cast<bf16*>(stage) + (BM + row) * LD + half * kHalf;
#pragma unroll
    for (int j = 0; j < kHalf / 8; ++j) {
      float f[8], nw[8];
      if constexpr (NORM) norm_weights(norm, k0 + j * 8, nw);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        f[e] = r.x[j * 8 + e];
        if constexpr (NORM) {
          ss = fmaf(f[e], f[e], ss);
          f[e] *= nw[e];
        }
      }
      *reinterpret_cast<uint4*>(xs + j * 8) =
          make_uint4(pack_bf2(f[0], f[1]), pack_bf2(f[2], f[3]), pack_bf2(f[4], f[5]), pack_bf2(f[6], f[7]));
      *reinterpret_cast<uint4*>(ws + j * 8) = r.w[j];
    }
  }

  // One warp's mmas over a staged slice: acc[m-tile][n-tile][fragment].
  __device__ static void mma_slice(const unsigned char* stage, float (&acc)[4][4][4]) {
    const int lane = lane_id(), wm = warp_id() >> 2, wn = warp_id() & 3;
    const bf16* xs = reinterpret_cast<const bf16*>(stage) + (wm * 64) * LD;
    const bf16* ws = reinterpret_cast<const bf16*>(stage) + (BM + wn * 32) * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned a[4][4], b[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) ldmatrix_x4(a[mt], xs + (mt * 16 + (lane & 15)) * LD + kk + (lane >> 4) * 8);
      // b[p]: n-tiles 2p and 2p + 1, k halves 0 and 8 of each.
#pragma unroll
      for (int p = 0; p < 2; ++p)
        ldmatrix_x4(b[p], ws + (p * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const unsigned* bb = b[nt >> 1] + (nt & 1) * 2;
          mma_16816(acc[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], bb[0], bb[1]);
        }
    }
  }

  // All threads: the block rows [r0, r1) x output columns [c0, c1) (c1 - c0 <= kColumns), then
  // epilogue(row, column, v[RPC]) once per output element, v the RPC weight rows' sums (normed).
  template <class Epilogue>
  __device__ static void run(const T* x, const bf16* norm, const bf16* w, int r0, int r1, int c0, int c1, float eps,
                             unsigned char* smem, Epilogue&& epilogue) {
    MPK_ASSERT(r1 - r0 <= BM && c1 - c0 <= kColumns);
    const int rows = r1 - r0, wrows = (c1 - c0) * RPC;
    x += static_cast<size_t>(r0) * K;
    w += static_cast<size_t>(c0) * RPC * K;
    float acc[4][4][4] = {};
    float ss = 0.f;
    Regs regs;
    load(x, w, rows, wrows, 0, regs);
    store(smem, norm, 0, regs, ss);
    __syncthreads();
#pragma unroll 1
    for (int s = 0; s < kSlices; ++s) {
      const bool more = s + 1 < kSlices;
      if (more) load(x, w, rows, wrows, s + 1, regs);
      mma_slice(smem + (s & 1) * kStage, acc);
      if (more) store(smem + ((s + 1) & 1) * kStage, norm, s + 1, regs, ss);
      __syncthreads();
    }
    float* inv = reinterpret_cast<float*>(smem + kInvOffset);
    if constexpr (NORM) {
      ss += __shfl_xor_sync(0xffffffffu, ss, 1);  // the row's other half
      if ((threadIdx.x & 1) == 0) inv[threadIdx.x >> 1] = rsqrtf(ss / K + eps);
      __syncthreads();
    }
    const int lane = lane_id(), g = lane >> 2, q = lane & 3, wm = warp_id() >> 2, wn = warp_id() & 3;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // fragment rows g and g + 8
        const int row = wm * 64 + mt * 16 + g + h * 8;
        if (row >= rows) continue;
        const float scale = NORM ? inv[row] : 1.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int n = wn * 32 + nt * 8 + 2 * q;  // weight rows n, n + 1 of the block
          const float v0 = acc[mt][nt][2 * h] * scale, v1 = acc[mt][nt][2 * h + 1] * scale;
          if constexpr (RPC == 2) {  // one output column: its two rows are the fragment's pair
            if (n / 2 < c1 - c0) epilogue(r0 + row, c0 + n / 2, {v0, v1});
          } else {
            if (n < c1 - c0) epilogue(r0 + row, c0 + n, {v0});
            if (n + 1 < c1 - c0) epilogue(r0 + row, c0 + n + 1, {v1});
          }
        }
      }
  }
};

}  // namespace mpk
