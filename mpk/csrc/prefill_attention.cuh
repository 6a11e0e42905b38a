// prefill_attention (mpk/ops/prefill.py): causal attention over a chunk of positions [start, start + rows),
// flash attention on tensor cores (mma.sync m16n8k16: bf16 inputs, fp32 accumulation, fp32 online softmax).
//
// A task covers sequence b, KV group g and the chunk's query rows [r0, r1), r0 = j R. Warp w takes item w:
// 16 query rows of one head, whose Q (normed, roped, bf16) stays in registers as A fragments. Key blocks of
// KB keys cover [lo, start + r1) (lo from the sliding window): the CTA stages each block's K and V in shared
// memory as bf16, keys before the chunk from the cache and the chunk's own computed from the QKV rows, so no
// task waits for another of the op; each warp then takes S = Q K^T, masks it, updates its softmax and adds
// P V. Staging writes the task's own rows [r0, r1) of k and v to the cache, once.
#pragma once

#include "attention.cuh"  // kv_round, norm_rope_head, kLog2e
#include "mma.cuh"

namespace mpk {

__device__ __forceinline__ void store2(bf16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// 16 bytes of cache row as bf16 in shared memory: 8 bf16 as they are, or 4 floats rounded.
__device__ __forceinline__ void stage16(const bf16* src, bf16* dst) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
__device__ __forceinline__ void stage16(const float* src, bf16* dst) {
  const float4 v = *reinterpret_cast<const float4*>(src);
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf2(v.x, v.y), pack_bf2(v.z, v.w));
}

template <class S, int QPK, int HD, int R, bool NORM, class A, class KT> struct PrefillAttention {
  static_assert(HD % 16 == 0 && 16 <= HD && HD <= 256, "head_dim must be a multiple of 16 within 16..256");
  static_assert(1 <= QPK && QPK <= 8, "1 to 8 query heads per KV head");
  static_assert(R % 16 == 0 && R / 16 * QPK <= kWarps, "one warp per 16 query rows of one head");
  using T = typename A::T;
  // Keys per block. A lane holds S (KB / 2 registers), O (HD / 2) and Q (HD / 4): at HD 256, 32 keys spill.
  static constexpr int KB = HD <= 128 ? 64 : 16;
  static constexpr int LD = HD + 8;  // bf16 per staged row: the 16-byte pad puts ldmatrix's 8 rows in distinct banks
  static constexpr int kItems = R / 16 * QPK;
  static constexpr int kKvChunks = HD * static_cast<int>(sizeof(KT)) / 16;  // 16-byte pieces of a cache row
  // K block [KB][LD] then V block [KB][LD]; before the key loop the same bytes hold the Q tiles [kItems][16][LD].
  static constexpr int kTileBytes = cmax(2 * KB * LD * 2, kItems * 16 * LD * 2);
  static constexpr int kBufOff = kTileBytes;  // float [kWarps][HD]: the head row a warp norms and ropes
  static constexpr int SMEM = kBufOff + kWarps * HD * 4;

  struct Task {
    const T* qkv;    // chunk row 0 of group g: its q heads, k, v
    size_t ld;       // between qkv rows
    const float* rope;
    const bf16* k_norm;
    KT* k_col;       // column g of the cache: sequence b's row p at + at(p)
    KT* v_col;
    size_t kv_ld;    // between cache rows
    const TaskCtx* t;
    int b, seq;
    int start, r0, kend;  // kend: one past the last key, start + r1
    float eps;
    __device__ __forceinline__ size_t at(long long p) const { return t->kv_row(b, p, seq) * kv_ld; }
  };

  // Keys [k0, k0 + KB) into ks / vs: the cached ones before the chunk, the chunk's computed from its QKV rows
  // (k normed, roped; both rounded to the cache's type) and, for the task's own rows, stored in the cache; zeros
  // past kend (masked, but P V must not meet a NaN).
  __device__ static void stage(const Task& c, int k0, bf16* ks, bf16* vs, float* buf) {
    const int n_past = max(0, min(KB, c.start - k0)), n_new = max(0, min(KB, c.kend - k0));
    for (int i = threadIdx.x; i < KB * kKvChunks; i += kThreads) {
      const int r = i / kKvChunks, e = (i % kKvChunks) * 16 / static_cast<int>(sizeof(KT));
      if (r < n_past) {
        const size_t at = c.at(k0 + r) + e;
        stage16(c.k_col + at, ks + r * LD + e);
        stage16(c.v_col + at, vs + r * LD + e);
      } else if (r >= n_new) {
        for (int d = e; d < e + 16 / static_cast<int>(sizeof(KT)); ++d) ks[r * LD + d] = vs[r * LD + d] = to_bf(0.f);
      }
    }
    const int lane = lane_id();
    for (int r = n_past + warp_id(); r < n_new; r += kWarps) {
      const int p = k0 + r, row = p - c.start;
      const T* src = c.qkv + row * c.ld + QPK * HD;
      norm_rope_head<HD, NORM, A>(src, c.k_norm, c.eps, c.rope + static_cast<size_t>(p) * HD, buf);
      const bool own = row >= c.r0;
      for (int d = lane; d < HD; d += 32) {
        const float k = kv_round<KT>(buf[d]), v = kv_round<KT>(act_f(src[HD + d]));
        ks[r * LD + d] = to_bf(k);
        vs[r * LD + d] = to_bf(v);
        if (own) {
          act_store(c.k_col + c.at(p) + d, k);
          act_store(c.v_col + c.at(p) + d, v);
        }
      }
      __syncwarp();
    }
  }

  // Cached rows of the block at k0 into L2, while the warps work on the block before.
  __device__ static void prefetch(const Task& c, int k0) {
    constexpr int kLineElems = 128 / static_cast<int>(sizeof(KT)), kLines = (HD + kLineElems - 1) / kLineElems;
    const int n = max(0, min(KB, c.start - k0));
    for (int i = threadIdx.x; i < 2 * n * kLines; i += kThreads) {
      const int r = i / 2 / kLines, line = i / 2 % kLines;
      prefetch_l2((i & 1 ? c.v_col : c.k_col) + c.at(k0 + r) + line * kLineElems);
    }
  }

  // One warp, one key block: S = Q K^T in the log2 domain, the causal and window mask for query positions p0
  // (rows lane / 4) and p0 + 8, the online softmax (m: running max, l: this lane's share of the sum), O += P V.
  __device__ static void attend_block(const unsigned (&qf)[HD / 16][4], const bf16* ks, const bf16* vs, int k0,
                                      int p0, int window, float qscale, float (&m)[2], float (&l)[2],
                                      float (&o)[HD / 8][4]) {
    const int lane = lane_id();
    float s[KB / 8][4];
#pragma unroll
    for (int n = 0; n < KB / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    // K rows as B fragments (k-contiguous: the col layout), two key tiles per ldmatrix.
#pragma unroll
    for (int kt = 0; kt < HD / 16; ++kt)
#pragma unroll
      for (int n = 0; n < KB / 8; n += 2) {
        unsigned kf[4];
        ldsm_x4(kf, ks + (n * 8 + (lane & 7) + (lane >> 4) * 8) * LD + kt * 16 + (lane >> 3 & 1) * 8);
        mma_16816(s[n], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], kf[0], kf[1]);
        mma_16816(s[n + 1], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], kf[2], kf[3]);
      }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < KB / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + n * 8 + 2 * (lane & 3) + (e & 1), qp = p0 + (e >> 1) * 8;
        const bool ok = key <= qp && (window <= 0 || key > qp - window);
        s[n][e] = ok ? s[n][e] * qscale : kNegInf;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
      }
    float ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // a row's 4 lanes share its max
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      ref[h] = mx[h] == kNegInf ? 0.f : mx[h];  // a row with no key yet keeps l = o = 0
      const float corr = exp2f(m[h] - ref[h]);
      l[h] *= corr;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) o[d][2 * h] *= corr, o[d][2 * h + 1] *= corr;
      m[h] = mx[h];
    }
#pragma unroll
    for (int n = 0; n < KB / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - ref[e >> 1]);
        l[e >> 1] += s[n][e];
      }
    // P (bf16) as A fragments straight from S's accumulator layout; V rows through ldmatrix.trans as B.
#pragma unroll
    for (int kt = 0; kt < KB / 16; ++kt) {
      const float(&lo)[4] = s[2 * kt], (&hi)[4] = s[2 * kt + 1];  // keys 16 kt .. + 7, then + 8 .. + 15
      const unsigned a0 = pack_bf2(lo[0], lo[1]), a1 = pack_bf2(lo[2], lo[3]);
      const unsigned a2 = pack_bf2(hi[0], hi[1]), a3 = pack_bf2(hi[2], hi[3]);
#pragma unroll
      for (int d = 0; d < HD / 8; d += 2) {
        unsigned vf[4];
        ldsm_x4_t(vf, vs + (kt * 16 + (lane & 7) + (lane >> 3 & 1) * 8) * LD + d * 8 + (lane >> 4) * 8);
        mma_16816(o[d], a0, a1, a2, a3, vf[0], vf[1]);
        mma_16816(o[d + 1], a0, a1, a2, a3, vf[2], vf[3]);
      }
    }
  }

  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const int rows = static_cast<int>(op.i[S::rows]), G = static_cast<int>(op.i[S::groups]);
    const int seq = static_cast<int>(op.i[S::seq]), window = static_cast<int>(op.i[S::window]);
    const int b = t.tile[0], g = t.tile[1], r0 = t.tile[2] * R;
    Task c;
    c.start = static_cast<int>(op.i[S::start]);
    c.r0 = r0;
    const int r1 = min(rows, r0 + R);
    c.kend = c.start + r1;
    MPK_ASSERT(g < G && r0 < rows && c.start + rows <= seq);
    c.ld = static_cast<size_t>(G) * (QPK + 2) * HD;
    c.qkv = op.arg<const T>(S::qkv) + static_cast<size_t>(b) * rows * c.ld + static_cast<size_t>(g) * (QPK + 2) * HD;
    c.rope = op.arg<const float>(S::rope);
    c.k_norm = op.arg<const bf16>(S::k_norm);
    c.kv_ld = static_cast<size_t>(G) * HD;
    c.t = &t, c.b = b, c.seq = seq;
    c.k_col = op.arg<KT>(S::k_cache) + static_cast<size_t>(g) * HD;
    c.v_col = op.arg<KT>(S::v_cache) + static_cast<size_t>(g) * HD;
    c.eps = op.f[S::eps];

    const int warp = warp_id(), lane = lane_id();
    const int qr = r0 + 16 * (warp / QPK), h = warp % QPK;  // the warp's first query row and its head
    const bool active = warp < kItems && qr < r1;
    bf16* tiles = reinterpret_cast<bf16*>(smem);
    float* buf = reinterpret_cast<float*>(smem + kBufOff) + warp * HD;

    // Q: 16 rows normed and roped as the sim does, then bf16 A fragments (rows past r1 zero, never stored).
    unsigned qf[HD / 16][4];
    if (active) {
      bf16* q_tile = tiles + warp * 16 * LD;
      for (int i = 0; i < 16; ++i) {
        const int r = qr + i;
        if (r < r1)
          norm_rope_head<HD, NORM, A>(c.qkv + r * c.ld + h * HD, op.arg<const bf16>(S::q_norm), c.eps,
                                      c.rope + static_cast<size_t>(c.start + r) * HD, buf);
        for (int d = lane; d < HD; d += 32) q_tile[i * LD + d] = to_bf(r < r1 ? buf[d] : 0.f);
        __syncwarp();
      }
#pragma unroll
      for (int kt = 0; kt < HD / 16; ++kt)
        ldsm_x4(qf[kt], q_tile + ((lane & 7) + (lane >> 3 & 1) * 8) * LD + kt * 16 + (lane >> 4) * 8);
    }
    __syncthreads();  // the Q tiles' bytes now take K and V blocks

    float o[HD / 8][4], m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    const float qscale = op.f[S::scale] * kLog2e;
    const int first = c.start + qr, last = c.start + min(qr + 15, r1 - 1);  // the warp's query positions
    const int lo = window > 0 ? max(0, c.start + r0 + 1 - window) : 0;
    bf16* ks = tiles;
    bf16* vs = tiles + KB * LD;
    for (int k0 = lo; k0 < c.kend; k0 += KB) {
      stage(c, k0, ks, vs, buf);
      __syncthreads();
      prefetch(c, k0 + KB);
      const bool masked = k0 > last || (window > 0 && k0 + KB - 1 <= first - window);  // every key, every row
      if (active && !masked) attend_block(qf, ks, vs, k0, first + (lane >> 2), window, qscale, m, l, o);
      __syncthreads();
    }

    if (!active) return;
    T* out = op.arg<T>(S::out) + static_cast<size_t>(b) * rows * G * QPK * HD + (static_cast<size_t>(g) * QPK + h) * HD;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
      l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
      const int r = qr + (lane >> 2) + 8 * hr;
      if (r >= r1) continue;
      const float inv = 1.f / l[hr];  // > 0: every position attends to itself
      T* dst = out + static_cast<size_t>(r) * G * QPK * HD + 2 * (lane & 3);
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) store2(dst + d * 8, o[d][2 * hr] * inv, o[d][2 * hr + 1] * inv);
    }
  }
};

}  // namespace mpk
