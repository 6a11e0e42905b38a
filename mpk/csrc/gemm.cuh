// Matrix products over many rows on tensor cores (a prefill chunk, or a decode batch of more than 8
// sequences): a task owns a BM x BN block of the output, rows [r0, r1) x weight rows [n0, n1), and
// runs the whole K loop over it.
//
// mma.sync m16n8k16 (bf16 in, fp32 accumulate) with x as A ([rows][k]) and the weight as B (its rows
// are B's columns, k-contiguous, as mma's "col" layout wants). Eight warps tile the block 2 x 4, a
// warp BM / 2 rows x BN / 4 weight rows: MT x NT mmas per 16 k, fragments through ldmatrix. BM is the
// op's rows up to 128 (32 or 64 for a decode batch), BN 64 or 128 (the compiler's choice: enough
// tasks for every SM).
//
// The K loop streams BK-wide slices of x (as stored: float or bf16) and of the weight through a ring
// of kStages slots with cp.async, so kStages - 1 slices are in flight while the tensor cores work on
// one. Each slice of x is then converted once into a bf16 tile (times the RMSNorm weight when the op
// norms its input: the inputs of PyTorch's fast prefill GEMMs); the row's 1/rms comes from the sums
// of squares taken in the same pass and scales the sums in the epilogue.
#pragma once

#include "gemv_base.cuh"
#include "mma.cuh"

namespace mpk {

// K columns of rows LDK long: a slice of a product split along K (x and w then point at its first column).
template <int RPC, int M, int K, bool NORM, class A, int BN = 128, int LDK = K> struct MmaGemm {
  using T = typename A::T;
  static_assert(!NORM || LDK == K, "an RMSNorm needs its rows whole");
  static constexpr int BM = M <= 32 ? 32 : M <= 64 ? 64 : 128;
  static_assert(BN == 64 || BN == 128, "a GEMM task's weight rows: 64 or 128");
  static constexpr int MT = BM / 32, NT = BN / 32;  // a warp's m-tiles (16 rows) and n-tiles (8 weight rows)
  static constexpr int kColumns = BN / RPC;  // output columns of a task
  // Slice width and ring depth: the deepest ring (up to 4) of 64-wide slices that fits, else 32-wide ones.
  static constexpr int stage_bytes(int bk) { return BM * bk * static_cast<int>(sizeof(T)) + BN * (bk + 8) * 2; }
  static constexpr int fixed_bytes(int bk) { return BM * (bk + 8) * 2 + BM * 4; }
  static constexpr int stages_for(int bk) { return cmin(4, (kXBudget - fixed_bytes(bk)) / stage_bytes(bk)); }
  static constexpr int BK = stages_for(64) >= 2 ? 64 : 32;
  static constexpr int kStages = stages_for(BK);
  static_assert(kStages >= 2, "a GEMM ring needs two slices of shared memory");
  static constexpr int LD = BK + 8;  // bf16 per tile row: 16 bytes of pad put ldmatrix's 8 rows in 8 bank groups
  static constexpr int kRawBytes = BM * BK * static_cast<int>(sizeof(T));  // a slot's x, as stored
  static constexpr int kStage = stage_bytes(BK);
  static constexpr int kTileOffset = kStages * kStage;  // the bf16 x tile the mmas read
  static constexpr int kInvOffset = kTileOffset + BM * LD * 2;
  static constexpr int SMEM = kInvOffset + BM * 4;
  static constexpr int kSlices = (K + BK - 1) / BK;
  static constexpr bool kAsync = K % 8 == 0 && LDK % 8 == 0;  // 16-byte pieces stay aligned (else element loads)
  // A 16-byte piece of x holds E values; a row of a slice is CPR pieces; a thread converts the same
  // piece column of kPasses rows of every slice (consecutive threads: consecutive pieces).
  static constexpr int E = 16 / sizeof(T), CPR = BK / E, kRowsPerPass = kThreads / CPR, kPasses = BM / kRowsPerPass;
  static_assert(kThreads % CPR == 0 && BM % kRowsPerPass == 0 && BN * BK / 8 % kThreads == 0, "even staging shares");

  // Slice s of x and the weight into ring slot `slot`: cp.async, or element loads when K is odd.
  __device__ static void issue(const T* x, const bf16* w, int rows, int wrows, int s, unsigned char* slot) {
    const int k0 = s * BK;
    T* xr = reinterpret_cast<T*>(slot);
    bf16* wr = reinterpret_cast<bf16*>(slot + kRawBytes);
    for (int i = threadIdx.x; i < BM * CPR; i += kThreads) {
      const int row = i / CPR, k = k0 + (i % CPR) * E;
      T* dst = xr + row * BK + (i % CPR) * E;
      if constexpr (kAsync) {
        const bool in = row < rows && k < K;
        cp_async16(dst, in ? x + static_cast<size_t>(row) * LDK + k : x, in);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) dst[e] = row < rows && k + e < K ? x[static_cast<size_t>(row) * LDK + k + e] : T(0.f);
      }
    }
    for (int i = threadIdx.x; i < BN * BK / 8; i += kThreads) {
      const int row = i / (BK / 8), k = k0 + (i % (BK / 8)) * 8;
      bf16* dst = wr + row * LD + (i % (BK / 8)) * 8;
      if constexpr (kAsync) {
        const bool in = row < wrows && k < K;
        cp_async16(dst, in ? w + static_cast<size_t>(row) * LDK + k : w, in);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = row < wrows && k + e < K ? w[static_cast<size_t>(row) * LDK + k + e] : to_bf(0.f);
      }
    }
    cp_async_commit();  // an empty group when nothing was issued: the wait counts stay in step
  }

  // Slice s of x from its ring slot into the bf16 tile (times the norm weight); sums of squares of
  // the raw values into ss[pass].
  __device__ static void convert(const unsigned char* slot, const bf16* norm, int s, unsigned char* tile,
                                 float (&ss)[kPasses]) {
    const int piece = threadIdx.x % CPR, k = s * BK + piece * E;
    float nw[E];
#pragma unroll
    for (int e = 0; e < E; ++e) nw[e] = 1.f;
    if constexpr (NORM) {
#pragma unroll
      for (int e = 0; e < E; ++e) nw[e] = k + e < K ? to_f(norm[k + e]) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int row = threadIdx.x / CPR + p * kRowsPerPass;
      float f[E];
      load_vec<E>(reinterpret_cast<const T*>(slot) + row * BK + piece * E, f);
      unsigned packed[E / 2];
#pragma unroll
      for (int e = 0; e < E; e += 2) {
        ss[p] = fmaf(f[e], f[e], fmaf(f[e + 1], f[e + 1], ss[p]));
        packed[e / 2] = pack_bf2(f[e] * nw[e], f[e + 1] * nw[e + 1]);
      }
      unsigned char* dst = tile + (row * LD + piece * E) * 2;
      if constexpr (E == 8) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      } else {
        *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
      }
    }
  }

  // One warp's mmas over the x tile and a slot's weight slice: acc[m-tile][n-tile][fragment].
  __device__ static void mma_slice(const unsigned char* tile, const unsigned char* slot, float (&acc)[MT][NT][4]) {
    const int lane = lane_id(), wm = warp_id() >> 2, wn = warp_id() & 3;
    const bf16* xs = reinterpret_cast<const bf16*>(tile) + (wm * BM / 2) * LD;
    const bf16* ws = reinterpret_cast<const bf16*>(slot + kRawBytes) + (wn * BN / 4) * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned a[MT][4], b[NT / 2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], xs + (mt * 16 + (lane & 15)) * LD + kk + (lane >> 4) * 8);
      // b[p]: n-tiles 2p and 2p + 1, k halves 0 and 8 of each.
#pragma unroll
      for (int p = 0; p < NT / 2; ++p)
        ldsm_x4(b[p], ws + (p * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
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
    x += static_cast<size_t>(r0) * LDK;
    w += static_cast<size_t>(c0) * RPC * LDK;
    unsigned char* tile = smem + kTileOffset;
    float acc[MT][NT][4] = {};
    float ss[kPasses] = {};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < kSlices) {
        issue(x, w, rows, wrows, s, smem + s * kStage);
      } else {
        cp_async_commit();
      }
    }
#pragma unroll 1
    for (int s = 0; s < kSlices; ++s) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // slice s has landed for every thread, and every warp is done with slice s - 1
      convert(smem + (s % kStages) * kStage, norm, s, tile, ss);
      const int next = s + kStages - 1;  // into the slot slice s - 1 used
      if (next < kSlices) {
        issue(x, w, rows, wrows, next, smem + (next % kStages) * kStage);
      } else {
        cp_async_commit();
      }
      __syncthreads();  // the x tile is whole
      mma_slice(tile, smem + (s % kStages) * kStage, acc);
    }
    float* inv = reinterpret_cast<float*>(smem + kInvOffset);
    if constexpr (NORM) {
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
#pragma unroll
        for (int o = 1; o < CPR; o <<= 1) ss[p] += __shfl_xor_sync(0xffffffffu, ss[p], o);  // the row's pieces
        if (threadIdx.x % CPR == 0) inv[threadIdx.x / CPR + p * kRowsPerPass] = rsqrtf(ss[p] / K + eps);
      }
      __syncthreads();
    }
    const int lane = lane_id(), g = lane >> 2, q = lane & 3, wm = warp_id() >> 2, wn = warp_id() & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // fragment rows g and g + 8
        const int row = wm * BM / 2 + mt * 16 + g + h * 8;
        if (row >= rows) continue;
        const float scale = NORM ? inv[row] : 1.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = wn * BN / 4 + nt * 8 + 2 * q;  // weight rows n, n + 1 of the block
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
