// Attention tasks (mpk/ops/attention.py): q/k-norm + RoPE + KV append, split-KV attention, merge.
// A task covers one sequence b and one KV group g, whose QPK query heads share one K/V head.
#pragma once

#include "mpk_runtime.cuh"

namespace mpk {

// A head of HD elements spread over a warp: lane l holds [l*E, l*E + E), packed when HD % 32 == 0.
template <int HD> struct HeadLanes {
  static constexpr int E = (HD + 31) / 32;
  static constexpr bool kPacked = HD % 32 == 0 && (E == 1 || E == 2 || E == 4 || E == 8);

  template <class T> __device__ __forceinline__ static void load(const T* head, float (&f)[E]) {
    const int d0 = lane_id() * E;
    if constexpr (kPacked) {
      load_vec<E>(head + d0, f);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) f[e] = d0 + e < HD ? act_f(head[d0 + e]) : 0.f;
    }
  }
};

// qk_norm_rope_append: q = rope(norm(q)); k = rope(norm(k)); append k, v at row `step` of the cache.
template <class S, int QPK, int HD, bool QKNORM, class A> struct QkNormRopeAppend {
  using T = typename A::T;
  static constexpr int SMEM = kWarps * HD * 4;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    const T* qkv = op.arg<const T>(S::qkv);
    const float* cos_t = op.arg<const float>(S::cos);
    const float* sin_t = op.arg<const float>(S::sin);
    const bf16* q_norm = op.arg<const bf16>(S::q_norm);
    const bf16* k_norm = op.arg<const bf16>(S::k_norm);
    T* q_out = op.arg<T>(S::q);
    T* k_cache = op.arg<T>(S::k_cache);
    T* v_cache = op.arg<T>(S::v_cache);
    const int G = static_cast<int>(op.i[S::groups]), seq = static_cast<int>(op.i[S::seq]);
    const int b = t.tile[0], g = t.tile[1];
    const long long step = t.step;
    MPK_ASSERT(g < G && step < seq);
    constexpr int H2 = HD / 2;
    const T* src = qkv + (static_cast<size_t>(b) * G + g) * (QPK + 2) * HD;
    const size_t kv_row = ((static_cast<size_t>(b) * seq + step) * G + g) * HD;
    float* buf = reinterpret_cast<float*>(smem) + warp_id() * HD;
    for (int h = warp_id(); h < QPK + 2; h += kWarps) {
      const T* x = src + h * HD;
      if (h == QPK + 1) {
        for (int d = lane_id(); d < HD; d += 32) v_cache[kv_row + d] = x[d];
        continue;
      }
      float ss = 0.f;
      for (int d = lane_id(); d < HD; d += 32) {
        const float v = act_f(x[d]);
        buf[d] = v;
        ss += v * v;
      }
      if constexpr (QKNORM) {
        const float inv = rsqrtf(warp_sum(ss) / HD + op.f[S::eps]);
        const bf16* nw = h < QPK ? q_norm : k_norm;
        for (int d = lane_id(); d < HD; d += 32) buf[d] = A::round(to_f(__ldg(nw + d)) * A::round(buf[d] * inv));
      }
      __syncwarp();
      T* dst = h < QPK ? q_out + ((static_cast<size_t>(b) * G + g) * QPK + h) * HD : k_cache + kv_row;
      // Rotate-half RoPE as the sim computes it in the activation dtype: cos/sin and each product rounded.
      for (int d = lane_id(); d < HD; d += 32) {
        const int j = d < H2 ? d : d - H2;
        const float c = A::round(__ldg(cos_t + step * H2 + j)), s = A::round(__ldg(sin_t + step * H2 + j));
        const float rot = d < H2 ? -buf[d + H2] : buf[d - H2];
        act_store(dst + d, A::round(buf[d] * c) + A::round(rot * s));
      }
      __syncwarp();
    }
  }
};

// attention_split: softmax attention of group g's query heads over KV rows [max(c0, lo), min(c1, step+1))
// with online softmax per warp, then a merge of the 8 warps. Writes the split's normalised output and
// log-sum-exp; an empty split writes zeros and -inf (the merge gives it weight 0).
template <class S, int QPK, int HD, class A> struct AttentionSplit {
  using L = HeadLanes<HD>;
  static constexpr int E = L::E;
  static constexpr int SMEM = align16(2 * kWarps * QPK * 4) + kWarps * QPK * HD * 4;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char* smem) {
    using T = typename A::T;
    const T* q = op.arg<const T>(S::q);
    const T* k_cache = op.arg<const T>(S::k_cache);
    const T* v_cache = op.arg<const T>(S::v_cache);
    const int G = static_cast<int>(op.i[S::groups]), seq = static_cast<int>(op.i[S::seq]);
    const int splits = static_cast<int>(op.i[S::splits]), chunk = static_cast<int>(op.i[S::chunk]);
    const long long window = op.i[S::window];
    const float scale = op.f[S::scale];
    const int b = t.tile[0], g = t.tile[1], s = t.tile[2];
    MPK_ASSERT(g < G && s < splits && t.step < seq);
    float* part = op.arg<float>(S::part) + ((static_cast<size_t>(b) * G + g) * splits + s) * QPK * HD;
    float* lse = op.arg<float>(S::lse) + ((static_cast<size_t>(b) * G + g) * splits + s) * QPK;
    const long long c0 = static_cast<long long>(s) * chunk, c1 = min(static_cast<long long>(seq), c0 + chunk);
    const long long lo = window > 0 ? max(0ll, t.step + 1 - window) : 0ll;
    const long long a = max(c0, lo), z = min(c1, t.step + 1);
    if (z <= a) {  // uniform over the CTA
      for (int i = threadIdx.x; i < QPK * HD; i += kThreads) part[i] = 0.f;
      for (int i = threadIdx.x; i < QPK; i += kThreads) lse[i] = kNegInf;
      return;
    }
    const int lane = lane_id(), warp = warp_id();
    float qf[QPK][E], m[QPK], l[QPK], acc[QPK][E];
#pragma unroll
    for (int h = 0; h < QPK; ++h) {
      L::load(q + ((static_cast<size_t>(b) * G + g) * QPK + h) * HD, qf[h]);
      m[h] = kNegInf, l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
    }
    for (long long j = a + warp; j < z; j += kWarps) {
      const size_t row = ((static_cast<size_t>(b) * seq + j) * G + g) * HD;
      float kf[E], vf[E];
      L::load(k_cache + row, kf);
      L::load(v_cache + row, vf);
#pragma unroll
      for (int h = 0; h < QPK; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(qf[h][e], kf[e], dot);
        const float sc = warp_sum(dot) * scale;
        const float mn = fmaxf(m[h], sc);
        const float corr = expf(m[h] - mn), p = expf(sc - mn);
        l[h] = l[h] * corr + p;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(acc[h][e], corr, p * vf[e]);
        m[h] = mn;
      }
    }
    float* s_m = reinterpret_cast<float*>(smem);
    float* s_l = s_m + kWarps * QPK;
    float* s_acc = reinterpret_cast<float*>(smem + align16(2 * kWarps * QPK * 4));
#pragma unroll
    for (int h = 0; h < QPK; ++h) {
      if (lane == 0) s_m[warp * QPK + h] = m[h], s_l[warp * QPK + h] = l[h];
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (lane * E + e < HD) s_acc[(warp * QPK + h) * HD + lane * E + e] = acc[h][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < QPK * HD; i += kThreads) {
      const int h = i / HD;
      float mx = kNegInf;
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * QPK + h]);
      float den = 0.f, num = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        if (s_m[w * QPK + h] == kNegInf) continue;  // a warp that saw no rows
        const float f = expf(s_m[w * QPK + h] - mx);
        den += s_l[w * QPK + h] * f;
        num += s_acc[(w * QPK) * HD + i] * f;
      }
      part[i] = num / den;
      if (i % HD == 0) lse[h] = mx + logf(den);
    }
  }
};

// attention_merge: out = sum over splits of softmax(lse) * part.
template <class S, int QPK, int HD, class A> struct AttentionMerge {
  static constexpr int SMEM = 0;
  __device__ static void run(const TaskCtx& t, const OpDesc& op, unsigned char*) {
    const int G = static_cast<int>(op.i[S::groups]), splits = static_cast<int>(op.i[S::splits]);
    const int b = t.tile[0], g = t.tile[1];
    MPK_ASSERT(g < G);
    const size_t bg = static_cast<size_t>(b) * G + g;
    const float* part = op.arg<const float>(S::part) + bg * splits * QPK * HD;
    const float* lse = op.arg<const float>(S::lse) + bg * splits * QPK;
    typename A::T* out = op.arg<typename A::T>(S::out) + bg * QPK * HD;
    for (int i = threadIdx.x; i < QPK * HD; i += kThreads) {
      const int h = i / HD;
      float mx = kNegInf;
      for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse[s * QPK + h]);
      float den = 0.f, num = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float ls = lse[s * QPK + h];
        if (ls == kNegInf) continue;  // empty split
        const float w = expf(ls - mx);
        den += w;
        num += w * part[s * QPK * HD + i];
      }
      act_store(out + i, num / den);
    }
  }
};

}  // namespace mpk
