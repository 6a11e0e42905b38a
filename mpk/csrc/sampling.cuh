// Sampling one token from a logits row on the GPU, by one CTA: what mpk/sampling.py computes on the
// CPU. Tokens are ordered by scaled logit (descending, ties to the lower id); top-k keeps the first
// k, top-p the shortest prefix whose mass reaches p, and the draw is the inverse CDF of what is left
// at u = uniform(seed, position). No sort: each cut is a radix select over a 64-bit key (scaled
// logit bits, then the inverted id), one 8-bit digit per pass over the row, with the digit's count
// and probability mass per bin; a top-k draw first narrows the row to its top few thousand tokens in
// shared memory, so its cuts pass over those instead. Masses are fixed-point integers, so their sums do not depend on the
// order atomics land in: a seed gives the same token on every run.
#pragma once

#include "mpk_runtime.cuh"

namespace mpk {

// splitmix64's finalizer, as mpk.sampling.mix64.
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// mpk.sampling.uniform: the draw of position `pos` of a sequence seeded with `seed`, in [0, 1).
__device__ __forceinline__ double uniform_draw(unsigned long long seed, unsigned long long pos) {
  return static_cast<double>(mix64(mix64(seed) ^ pos) >> 11) * 0x1.0p-53;
}

// A float's bits as an unsigned integer in the same order (NaN last of all).
__device__ __forceinline__ unsigned order_bits(float f) {
  const unsigned u = __float_as_uint(f);
  if (f != f) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr double kMassOne = 1099511627776.0;  // 2^40: a probability weight of 1 in fixed point
constexpr int kCandidates = 4096;  // tokens a top-k draw narrows the row to, in shared memory

struct SampleScratch {
  unsigned count[256];
  unsigned long long mass[256];
  unsigned long long found, above_count, above_mass, prefix;
  int digit;
  float warp_best[kWarps];
  long long token;  // the CTA's result, for every thread to read
  unsigned n_cand;
  float cand_s[kCandidates];  // the narrowed row: scaled logits and token ids
  int cand_id[kCandidates];
};

// One sequence's logits, split over RANKS GPUs by vocabulary (rank r holds tokens
// [r * per_rank, min(vocab, (r + 1) * per_rank)), as mpk.graph.shard_of splits them).
template <int RANKS> struct LogitsRow {
  const float* const* rows;
  long long vocab, per_rank;
  int b;
  float temperature;

  __device__ long long rank_len(int r) const {
    const long long start = r * per_rank;
    return max(0ll, min(vocab, start + per_rank) - start);
  }

  // f(scaled logit, token id, valid) for every token: every thread calls f the same number of times
  // (warp-wide intrinsics inside f stay converged); `valid` is false past the end. Each thread loads
  // kLoads logits before using any, so a pass over the row is not one L2 round trip per token.
  static constexpr int kLoads = 8;
  template <class F> __device__ void for_each(F&& f) const {
#pragma unroll 1
    for (int r = 0; r < RANKS; ++r) {
      const long long n = rank_len(r);
      const float* row = rows[r] + b * n;
      for (long long base = 0; base < n; base += kThreads * kLoads) {
        float v[kLoads];
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const long long j = base + u * kThreads + threadIdx.x;
          v[u] = j < n ? row[j] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          const long long j = base + u * kThreads + threadIdx.x;
          f(v[u] / temperature, r * per_rank + j, j < n);
        }
      }
    }
  }
};

// The tokens a top-k draw narrowed a row to (`narrow_to_top`), in shared memory, with LogitsRow's
// interface. Their order is the order atomics landed in; nothing below depends on it.
struct CandidateRow {
  const float* s;
  const int* id;
  unsigned n;
  long long vocab;

  template <class F> __device__ void for_each(F&& f) const {
    for (unsigned base = 0; base < n; base += kThreads) {
      const unsigned j = base + threadIdx.x;
      const bool valid = j < n;
      f(valid ? s[j] : 0.f, valid ? static_cast<long long>(id[j]) : 0ll, valid);
    }
  }
};

__device__ __forceinline__ unsigned long long sample_key(float s, long long id) {
  return (static_cast<unsigned long long>(order_bits(s)) << 32) | (0xffffffffull - static_cast<unsigned long long>(id));
}

__device__ __forceinline__ unsigned long long fixed_mass(float s, float s_max) {
  return static_cast<unsigned long long>(static_cast<double>(expf(s - s_max)) * kMassOne);
}

// All threads: the largest scaled logit.
template <class Row> __device__ float row_max(const Row& row, SampleScratch& sc) {
  float m = kNegInf;
  row.for_each([&](float s, long long, bool valid) {
    if (valid) m = fmaxf(m, s);
  });
  m = warp_max(m);
  if (lane_id() == 0) sc.warp_best[warp_id()] = m;
  __syncthreads();
  float all = kNegInf;
  for (int w = 0; w < kWarps; ++w) all = fmaxf(all, sc.warp_best[w]);
  __syncthreads();
  return all;
}

// All threads: the total fixed-point mass of the tokens whose key is at least `floor`.
template <class Row> __device__ unsigned long long row_mass(const Row& row, float s_max, unsigned long long floor,
                                                            SampleScratch& sc) {
  unsigned long long m = 0;
  row.for_each([&](float s, long long id, bool valid) {
    if (valid && sample_key(s, id) >= floor) m += fixed_mass(s, s_max);
  });
  if (threadIdx.x == 0) sc.above_mass = 0;
  __syncthreads();
  atomicAdd(&sc.above_mass, m);
  __syncthreads();
  const unsigned long long total = sc.above_mass;
  __syncthreads();
  return total;
}

struct Cut {
  unsigned long long key;   // the boundary token's key: the cut keeps the keys >= it
  unsigned long long mass;  // mass of the kept tokens
};

// All threads: walking the tokens with key >= `floor` in order, the first whose running count (or
// mass) reaches `target` (target >= 1 and at most the total).
template <class Row> __device__ Cut select_cut(const Row& row, float s_max, unsigned long long floor, bool by_count,
                                               unsigned long long target, SampleScratch& sc) {
  unsigned long long prefix = 0, above_count = 0, above_mass = 0;
  for (int shift = 56;; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sc.count[i] = 0, sc.mass[i] = 0;
    __syncthreads();
    row.for_each([&](float s, long long id, bool valid) {
      const unsigned long long key = sample_key(s, id);
      const bool in = valid && key >= floor && (shift == 56 || (key >> (shift + 8)) == prefix);
      const unsigned digit = static_cast<unsigned>(key >> shift) & 255u;
      const unsigned long long mass = in ? fixed_mass(s, s_max) : 0ull;
      // The warp's candidates add up digit by digit: one shared atomic per digit and warp, not per
      // token (most tokens share the first digits). Masses <= 2^40 split in 20-bit halves, so 32 of
      // them sum in 32-bit reductions.
      for (unsigned pending = __ballot_sync(0xffffffffu, in); pending;) {
        const unsigned d = __shfl_sync(0xffffffffu, digit, __ffs(pending) - 1);
        const bool mine = in && digit == d;
        const unsigned group = __ballot_sync(0xffffffffu, mine);
        const unsigned hi = __reduce_add_sync(0xffffffffu, mine ? static_cast<unsigned>(mass >> 20) : 0u);
        const unsigned lo = __reduce_add_sync(0xffffffffu, mine ? static_cast<unsigned>(mass & 0xfffffu) : 0u);
        if (lane_id() == __ffs(group) - 1) {
          atomicAdd(&sc.count[d], static_cast<unsigned>(__popc(group)));
          atomicAdd(&sc.mass[d], (static_cast<unsigned long long>(hi) << 20) + lo);
        }
        pending &= ~group;
      }
    });
    __syncthreads();
    if (warp_id() == 0) {  // the digit where the running total reaches the target, from the top bin down
      const int lane = lane_id();
      unsigned long long c = 0, m = 0;
      for (int k = 0; k < 8; ++k) c += sc.count[255 - 8 * lane - k], m += sc.mass[255 - 8 * lane - k];
      unsigned long long c_before = c, m_before = m;  // exclusive prefix over the lanes above this one
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long oc = __shfl_up_sync(0xffffffffu, c_before, o);
        const unsigned long long om = __shfl_up_sync(0xffffffffu, m_before, o);
        if (lane >= o) c_before += oc, m_before += om;
      }
      c_before -= c, m_before -= m;
      const unsigned long long base = by_count ? above_count : above_mass;
      const unsigned long long lo = base + (by_count ? c_before : m_before), hi = lo + (by_count ? c : m);
      const bool here = lo < target && target <= hi;
      const unsigned owner = __ballot_sync(0xffffffffu, here);
      if (here && lane == __ffs(owner) - 1) {
        unsigned long long rc = above_count + c_before, rm = above_mass + m_before;
        int d = 255 - 8 * lane;
        for (;; --d) {
          const unsigned long long nc = rc + sc.count[d], nm = rm + sc.mass[d];
          if ((by_count ? nc : nm) >= target) break;
          rc = nc, rm = nm;
        }
        sc.digit = d, sc.above_count = rc, sc.above_mass = rm;
      }
      if (owner == 0 && lane == 0) sc.digit = -1;  // the target is past the total: a caller's bug
    }
    __syncthreads();
    const int d = sc.digit;
    MPK_ASSERT(d >= 0);
    prefix = (prefix << 8) | static_cast<unsigned>(d < 0 ? 0 : d);
    above_count = sc.above_count, above_mass = sc.above_mass;
    const unsigned in_bin = sc.count[d < 0 ? 0 : d];
    const unsigned long long bin_mass = sc.mass[d < 0 ? 0 : d];
    __syncthreads();
    MPK_ASSERT(in_bin == 1 || shift > 0);  // keys are unique: the last digit leaves one token
    if (in_bin == 1 && shift == 0) return {prefix, above_mass + bin_mass};
    if (in_bin == 1) {  // one token left with this prefix: find its whole key
      row.for_each([&](float s, long long id, bool valid) {
        const unsigned long long key = sample_key(s, id);
        if (valid && key >= floor && (key >> shift) == prefix) sc.found = key;
      });
      __syncthreads();
      const unsigned long long key = sc.found;
      __syncthreads();
      return {key, above_mass + bin_mass};
    }
  }
}

// All threads: gather the tokens with key >= `floor` (at most kCandidates) into the scratch.
template <class Row> __device__ void gather_candidates(const Row& row, unsigned long long floor, SampleScratch& sc) {
  if (threadIdx.x == 0) sc.n_cand = 0;
  __syncthreads();
  const unsigned lane = static_cast<unsigned>(lane_id());
  row.for_each([&](float s, long long id, bool valid) {
    const bool in = valid && sample_key(s, id) >= floor;
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    unsigned base = 0;
    if (lane == 0 && ballot) base = atomicAdd(&sc.n_cand, static_cast<unsigned>(__popc(ballot)));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (in) {
      const unsigned at = base + static_cast<unsigned>(__popc(ballot & ((1u << lane) - 1u)));
      MPK_ASSERT(at < kCandidates);
      sc.cand_s[at] = s, sc.cand_id[at] = static_cast<int>(id);
    }
  });
  __syncthreads();
}

// All threads: narrow a row to the top of its key order: the fewest leading digits of the k-th
// largest key whose bin and everything above it hold at most kCandidates tokens, found one 8-bit
// digit per counting pass (no masses, so a pass is cheap); those tokens are gathered into the
// scratch. The k largest keys, and so every later cut and draw of a top-k draw, lie among them.
// False when three digits still leave more than kCandidates (then the caller works on the row).
template <class Row> __device__ bool narrow_to_top(const Row& row, long long k, SampleScratch& sc) {
  unsigned long long prefix = 0, above = 0;
  const unsigned lane = static_cast<unsigned>(lane_id());
  for (int shift = 56; shift >= 40; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sc.count[i] = 0;
    __syncthreads();
    row.for_each([&](float s, long long id, bool valid) {
      const unsigned long long key = sample_key(s, id);
      const bool in = valid && (shift == 56 || (key >> (shift + 8)) == prefix);
      const unsigned digit = static_cast<unsigned>(key >> shift) & 255u;
      // One shared atomic per digit and warp: lanes off the prefix form groups of their own.
      const unsigned peers = __match_any_sync(0xffffffffu, in ? digit : 256u + lane);
      if (in && lane == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&sc.count[digit], static_cast<unsigned>(__popc(peers)));
    });
    __syncthreads();
    if (warp_id() == 0) {  // the digit where the count from the top reaches k
      unsigned long long c = 0;
      for (int j = 0; j < 8; ++j) c += sc.count[255 - 8 * static_cast<int>(lane) - j];
      unsigned long long before = c;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long oc = __shfl_up_sync(0xffffffffu, before, o);
        if (static_cast<int>(lane) >= o) before += oc;
      }
      before -= c;
      const bool here = above + before < static_cast<unsigned long long>(k) && static_cast<unsigned long long>(k) <= above + before + c;
      const unsigned owner = __ballot_sync(0xffffffffu, here);
      if (here && lane == static_cast<unsigned>(__ffs(owner) - 1)) {
        unsigned long long run = above + before;
        int d = 255 - 8 * static_cast<int>(lane);
        while (run + sc.count[d] < static_cast<unsigned long long>(k)) run += sc.count[d--];
        sc.digit = d, sc.above_count = run;
      }
      if (owner == 0 && lane == 0) sc.digit = -1;  // fewer than k tokens: a caller's bug
    }
    __syncthreads();
    const int d = sc.digit;
    MPK_ASSERT(d >= 0);
    if (d < 0) return false;
    const unsigned long long above_bin = sc.above_count, in_bin = sc.count[d];
    __syncthreads();
    prefix = (prefix << 8) | static_cast<unsigned>(d);
    if (above_bin + in_bin <= kCandidates) {
      gather_candidates(row, prefix << shift, sc);
      return true;
    }
    above = above_bin;
  }
  return false;
}

// All threads: the draw of sample_row once the largest scaled logit is known.
template <class Row> __device__ long long draw_from(const Row& row, float s_max, long long top_k, float top_p,
                                                   unsigned long long seed, unsigned long long position,
                                                   SampleScratch& sc);

// All threads: the sampled token id for one logits row (temperature > 0). `top_k` <= 0 keeps all,
// `top_p` >= 1 keeps all. A top-k draw of at most kCandidates tokens first narrows the row to its top
// in shared memory (a few counting passes over the row instead of a dozen full ones).
template <class Row> __device__ long long sample_row(const Row& row, long long top_k, float top_p,
                                                    unsigned long long seed, unsigned long long position,
                                                    SampleScratch& sc) {
  if (top_k > 0 && top_k <= kCandidates && top_k < row.vocab && narrow_to_top(row, top_k, sc)) {
    const CandidateRow top{sc.cand_s, sc.cand_id, sc.n_cand, row.vocab};
    return draw_from(top, row_max(top, sc), top_k, top_p, seed, position, sc);  // the row's largest is among them
  }
  return draw_from(row, row_max(row, sc), top_k, top_p, seed, position, sc);
}

template <class Row> __device__ long long draw_from(const Row& row, float s_max, long long top_k, float top_p,
                                                   unsigned long long seed, unsigned long long position,
                                                   SampleScratch& sc) {
  unsigned long long floor = 0, mass;
  if (top_k > 0 && top_k < row.vocab) {
    const Cut k = select_cut(row, s_max, 0, true, static_cast<unsigned long long>(top_k), sc);
    floor = k.key, mass = k.mass;
  } else {
    mass = row_mass(row, s_max, 0, sc);
  }
  if (top_p < 1.f) {
    const double want = ceil(static_cast<double>(top_p) * static_cast<double>(mass));
    const Cut p = select_cut(row, s_max, floor, false, max(1ull, static_cast<unsigned long long>(want)), sc);
    floor = p.key, mass = p.mass;
  }
  const unsigned long long at = static_cast<unsigned long long>(uniform_draw(seed, position) * static_cast<double>(mass));
  const Cut draw = select_cut(row, s_max, floor, false, min(at + 1, mass), sc);
  return static_cast<long long>(0xffffffffull - (draw.key & 0xffffffffull));
}

}  // namespace mpk
