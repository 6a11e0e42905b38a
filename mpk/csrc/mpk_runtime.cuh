// The persistent megakernel: tables the host builds from the TaskGraph, event wait/signal, and the
// per-SM loop that walks its queue step after step.
//
// Memory ordering (PTX model): a task's threads finish their writes, __syncthreads, then thread 0
// increments each event counter it signals with a release (cumulative over the barrier). A waiter's thread 0 spins on an
// acquire load of the counter, then __syncthreads releases the CTA: every thread's later loads see
// the producers' writes (the acquire also drops the SM's stale L1 lines). Activations are therefore
// never read through the non-coherent (__ldg) path; only weights are.
//
// Tensor parallelism: one kernel per GPU, each walking its rank's queues. Every rank keeps a
// counter per event; a producer signals the counter on each rank that has consumers of the event,
// a peer's over NVLink at system scope, and a consumer of an event with producers on another rank
// acquires at system scope. Peer tensors are read through their owners' addresses (peer access).
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace mpk {

// One task of the graph. `tile` holds the op's tile coordinates, unused ones are 0.
struct TaskDesc {
  int variant;  // index into the generated dispatch switch
  int op;       // index into MpkParams::ops
  int tile[3];
  int wait;     // event to wait on, -1 for none
  int sig_off;  // its signalled events are signals[sig_off, sig_off + sig_cnt)
  int sig_cnt;
};
static_assert(sizeof(TaskDesc) == 32, "TaskDesc is mirrored by mpk/runtime/abi.py");

// One op instance: tensor pointers and run-time scalars. Templates index them only through the
// Slots struct codegen generates from the op kind (mpk/ops): op.arg<const bf16>(S::weight),
// op.i[S::tile], op.f[S::eps]. Shapes that decide register layouts are template arguments instead.
constexpr int kOpPtrs = 8, kOpInts = 8, kOpFloats = 4;
struct OpDesc {
  void* ptr[kOpPtrs];
  long long i[kOpInts];
  float f[kOpFloats];

  template <class T> __device__ __forceinline__ T* arg(int slot) const { return static_cast<T*>(ptr[slot]); }
  // A per-rank operand: its slot points to one address per tensor-parallel rank.
  template <class T> __device__ __forceinline__ T* const* ranks(int slot) const {
    return static_cast<T* const*>(ptr[slot]);
  }
};
static_assert(sizeof(OpDesc) == 144, "OpDesc is mirrored by mpk/runtime/abi.py");

// One queue position by value: every table entry thread 0 reads around a task (the task, its op,
// its event's target and lag, the counters it signals, the next position's L2 range), so the whole
// record comes with asynchronous copies issued one task ahead, and neither the wake path nor the
// signal holds a dependent load.
constexpr int kEntrySignals = 4;  // counters an entry names; a task's further signals read the tables
struct QueueEntry {
  TaskDesc task;
  OpDesc op;
  int id;         // the task's id (progress words, traces)
  int ev_target;  // the wait event's producers per step (0 without an event)
  int ev_lag;
  int ev_sys;     // 1: producers on another rank (system-scope acquire)
  unsigned long long next_l2[2];  // (address, bytes): the next queue position's weights to prefetch into L2
  unsigned long long* sig[kEntrySignals];  // the first counters the task increments, on their own GPUs
  int sig_sys;                             // bit k: sig[k] is a peer's (system-scope release)
  int ev_polled;  // 1: the task polls its inputs' tagged words itself (poll_tagged); no counter to wait on
  int pad[2];
};
static_assert(sizeof(QueueEntry) == 256 && sizeof(QueueEntry) % 16 == 0, "QueueEntry is mirrored by mpk/runtime/abi.py");

// ctl: small device-side state of one run, zeroed/initialised by the host before a launch.
enum : int { kCtlSampled = 0, kCtlStopStep = 1, kCtlWords = 4 };
// host_flags: host-mapped words the host writes while the kernel runs.
enum : int { kFlagAbort = 0, kFlagStopRequest = 1, kFlagWords = 4 };
// progress: host-mapped, kProgressWords ints per SM, read by the host watchdog.
enum : int { kPrSeq = 0, kPrTask = 1, kPrStep = 2, kPrEvent = 3, kPrState = 4, kProgressWords = 8 };
enum : int { kStateIdle = 0, kStateWaiting = 1, kStateDone = 2, kStateStopped = 3, kStateAborted = 4 };
// trace: per step and task, %globaltimer ns at: its wait, its start, its end, then three marks inside
// it: the inputs staged (the prologue's end, mark_staged), warp 0 and the last warp through their share
// of the work (mark_share_done). A template that sets no mark leaves 0 there, and so does a kernel
// built without MPK_TASK_MARKS.
enum : int { kTrWait = 0, kTrStart = 1, kTrEnd = 2, kTrStaged = 3, kTrWarp0 = 4, kTrWarps = 5, kTraceWords = 6 };
constexpr int kMaxRanks = 8;  // tensor-parallel GPUs one graph may span

// Kernel parameters. Every field is 8 bytes, so the ctypes mirror in mpk/runtime/abi.py has no
// padding questions; mpk_params_size() lets the host check.
struct MpkParams {
  const int* signals;      // event ids
  const int* signal_rank;  // per entry of signals: the rank whose counter it increments
  const int* queue_off;    // [num_sms + 1]
  const int* queue_tasks;  // task ids, queue by queue
  const QueueEntry* entries;  // queue by queue, as queue_tasks
  unsigned long long* counters;  // one per event, zeroed before each launch
  long long* ctl;                // kCtlWords
  int* seq_done;                 // [batch]: sequence hit EOS or its token limit
  const long long* eos;          // [n_eos]
  const long long* max_new;      // [batch]: new tokens allowed per sequence
  const long long* pos_offset;   // [batch]: sequence b is at position step - pos_offset[b]
  int* out_tokens;               // host-mapped [max_seq_len * batch]: token of (step - first_step, b)
  long long* steps_done;         // host-mapped: absolute steps completed
  int* progress;                 // host-mapped [num_sms * kProgressWords]
  int* host_flags;               // host-mapped kFlagWords
  const unsigned long long* prefetch;  // [num_tasks][kPrefetchWords]: the weight head for shared memory, the L2 range
  unsigned long long* trace;           // null, or [num_steps][num_tasks][kTraceWords] (kTr*)
  unsigned long long* const* peer_counters;  // [tp_size]: every rank's counters (this rank's too)
  long long* const* peer_ctl;                // [tp_size]: every rank's ctl
  const int* kv_blocks;          // null (contiguous KV rows), or the block table [batch][kv_blocks_per_seq] (mpk.paging)
  long long first_step;          // absolute position of the launch's first step
  long long num_steps;
  long long num_sms;
  long long n_eos;
  long long n_sample;  // sample tasks per step
  long long batch;
  long long rank;  // this GPU's tensor-parallel rank
  long long tp_size;
  long long kv_block_rows;     // with kv_blocks: KV rows per block
  long long kv_blocks_per_seq;
  long long tag_base;  // step rel of this launch is tagged tag_base + rel + 1 in tagged words (step_tag)
};

// Dynamic shared memory the kernel needs: the most any variant uses.
template <class... V> constexpr int max_smem() {
  int m = 0;
  ((m = cmax(m, V::SMEM)), ...);
  return m;
}

// What a task's code sees besides its OpDesc.
struct TaskCtx {
  int tile[3];
  long long step;  // the kernel's step (steps count on across launches)
  long long rel;   // step within this launch (event thresholds, sample counting)
  const MpkParams* p;
  const unsigned char* head;  // shared memory: the first head_bytes of the task's weight tile, or null
  unsigned head_bytes;
  // For a wait inside the task (poll_tagged): the CTA's give-up word in shared memory, the progress
  // words' sequence number (thread 0's), the task's queue entry (its id and event, in shared memory)
  // and its trace record (or null), whose start the wait moves to its end.
  volatile int* give_up;
  int seq;
  const QueueEntry* entry;
  unsigned long long* trace_rec;

  // The tag of this step's words in a mailbox: never 0 (a zeroed mailbox holds no step's words) and
  // never repeated while the kernel is loaded (mpk.runtime.megakernel advances tag_base).
  __device__ __forceinline__ unsigned step_tag() const { return static_cast<unsigned>(p->tag_base + rel + 1); }

  // Sequence b's position this step (its RoPE row and KV row): sequences join a batch at any step.
  __device__ long long position(int b) const { return step - p->pos_offset[b]; }

  // Where row r of sequence b sits in a KV cache of `seq` rows per sequence, in rows of the cache
  // tensor: b * seq + r, or with a paged cache the row of its block in the pool. Blocks hold a power
  // of two rows (mpk.paging), so the lookup is a predicated load, a shift and selects: no branch and
  // no division, and a warp's row loads in the attention loop issue back to back.
  __device__ __forceinline__ size_t kv_row(int b, long long r, int seq) const {
    const int* table = p->kv_blocks;
    const bool paged = table != nullptr;
    const unsigned row = static_cast<unsigned>(r);
    const unsigned shift = paged ? static_cast<unsigned>(__ffsll(p->kv_block_rows) - 1) : 0u;
    const int block = paged ? table[b * p->kv_blocks_per_seq + (row >> shift)] : 0;
    const size_t in_pool = (static_cast<size_t>(block) << shift) | (row & ((1u << shift) - 1u));
    return paged ? in_pool : static_cast<size_t>(b) * seq + row;
  }
};

__device__ __forceinline__ unsigned long long global_timer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Marks inside a task are compiled in only where asked (codegen's task_marks, for profiles): the kernel
// that serves and is timed carries none of their code.
#ifndef MPK_TASK_MARKS
#define MPK_TASK_MARKS 0
#endif

// The running task's trace record (traced runs only, else null), set and read by thread 0. It lives in
// shared memory, not in TaskCtx, so that a template's marks keep no register live across its loops.
__shared__ unsigned long long* s_trace_rec;

// Warps of the running task through their share (mark_share_done), zeroed as each task begins.
__shared__ unsigned s_warps_done;

// Thread 0, in a traced run of a kernel built with marks, once the task's inputs are staged: stamp
// kTrStaged of the running task's record.
__device__ __forceinline__ void mark_staged() {
  if constexpr (MPK_TASK_MARKS)
    if (threadIdx.x == 0 && s_trace_rec) s_trace_rec[kTrStaged] = global_timer();
}

// All threads, once a warp is through its share of the task's work: warp 0 stamps kTrWarp0 and the
// last warp kTrWarps, so that a task's end splits into the warps' spread and what follows them.
__device__ __forceinline__ void mark_share_done() {
  if constexpr (MPK_TASK_MARKS) {
    if (lane_id() != 0 || !s_trace_rec) return;
    if (warp_id() == 0) s_trace_rec[kTrWarp0] = global_timer();
    // The last warp reads the clock after its count, so after warp 0's stamp: a time read before the
    // count could be older than warp 0's, if warp 0 read and counted in between.
    if (atomicAdd(&s_warps_done, 1u) == kWarps - 1) s_trace_rec[kTrWarps] = global_timer();
  }
}

__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void red_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

template <class T> __device__ __forceinline__ T ld_volatile(const T* p) {
  return *reinterpret_cast<const volatile T*>(p);
}
template <class T> __device__ __forceinline__ void st_volatile(T* p, T v) { *reinterpret_cast<volatile T*>(p) = v; }

__device__ __forceinline__ void publish(const MpkParams& p, int sm, int seq, int task, long long step, int event,
                                        int state) {
  int* w = p.progress + sm * kProgressWords;
  st_volatile(w + kPrTask, task);
  st_volatile(w + kPrStep, static_cast<int>(step));
  st_volatile(w + kPrEvent, event);
  st_volatile(w + kPrState, state);
  st_volatile(w + kPrSeq, seq);
}

__device__ __forceinline__ bool stopped_before(const MpkParams& p, long long step) {
  return step > ld_volatile(p.ctl + kCtlStopStep);
}

// The run stops after `step` on every rank: a rank that runs ahead into the next step meets the
// stop in its waits (which poll the stop word), so no rank waits for a peer that has left.
__device__ __forceinline__ void stop_all_ranks(const MpkParams& p, long long step) {
  for (long long r = 0; r < p.tp_size; ++r) atomicMin_system(p.peer_ctl[r] + kCtlStopStep, step);
}

// Whether a task waiting on `ev` may be the first of its step to run after the run stopped: only
// a task on no event, or on a lag-1 event (the previous step's sampled token), can. Every other
// task's producers are of its own step, so they ran only if the step was not stopped; such a task
// skips the stop check on its wake path (one L2 round trip) and meets a stop in its poll loop.
__device__ __forceinline__ bool starts_a_step(const QueueEntry& e) { return e.task.wait < 0 || e.ev_lag > 0; }

// Why a wait gave up (for a wait inside a task, the CTA's give-up word): the host aborted, or the
// run stopped before the task's step (its producers, a peer's included, will never come).
enum : int { kGiveUpAborted = 1, kGiveUpStopped = 2 };

// Thread 0, after poll `spin` of a wait that has not ended: back off, tell the host once the wait
// has lasted (the SM's progress words), and meet a stop of the run or the host's abort. 0 to poll
// again, else a kGiveUp reason.
__device__ __forceinline__ int keep_waiting(const MpkParams& p, int sm, int seq, int task, long long step, int ev,
                                            unsigned spin) {
  constexpr unsigned kQuietPolls = 512;  // ~ tens of microseconds before the host hears of the wait
  if (spin >= 64) __nanosleep(spin < 256 ? 32 : 128);
  if (spin == kQuietPolls) publish(p, sm, seq, task, step, ev, kStateWaiting);
  if ((spin & 63) == 63 && stopped_before(p, step)) return kGiveUpStopped;
  // The abort flag lives in host memory: read it rarely (a PCIe round trip).
  if ((spin & 1023) == 1023 && ld_volatile(p.host_flags + kFlagAbort)) return kGiveUpAborted;
  return 0;
}

// Thread 0: poll *ctr with acquire loads until it reaches `need`; `still(poll)` after each poll that
// fell short returns 0 to go on, else a reason to give up, which this returns (0 once the count is
// reached). Relaxed polls kept in flight with a fence after the one that sees the count measured
// slower (docs/perf.md).
template <bool kSys, class Still>
__device__ __forceinline__ int poll_counter(const unsigned long long* ctr, long long need, Still&& still) {
  for (unsigned poll = 0;; ++poll) {
    if (static_cast<long long>(kSys ? ld_acquire_sys(ctr) : ld_acquire(ctr)) >= need) return 0;
    if (const int why = still(poll)) return why;
  }
}

// Thread 0 only. True when the task may run; false when the kernel must exit (the run stopped
// before this step, or the host asked to abort). The first polls spin; the SM's progress words
// (host-mapped, a PCIe write) are published only once the wait has lasted, so a short wait costs
// one acquire load per poll and nothing else.
__device__ bool wait_event(const MpkParams& p, int sm, int seq, const QueueEntry& e, long long step, long long rel) {
  const int task = e.id, ev = e.task.wait;
  if (starts_a_step(e) && stopped_before(p, step)) return publish(p, sm, seq, task, step, ev, kStateStopped), false;
  if (ev < 0 || e.ev_polled) return true;
  MPK_ASSERT(e.ev_lag == 0 || e.ev_lag == 1);
  const long long need = static_cast<long long>(e.ev_target) * (rel + 1 - e.ev_lag);
  const unsigned long long* ctr = p.counters + ev;
  auto still = [&](unsigned poll) { return keep_waiting(p, sm, seq, task, step, ev, poll); };
  const int why = e.ev_sys ? poll_counter<true>(ctr, need, still) : poll_counter<false>(ctr, need, still);
  if (why) publish(p, sm, seq, task, step, ev, why == kGiveUpStopped ? kStateStopped : kStateAborted);
  return !why;
}

// --- weight heads: the first bytes of a task's weight tile, resident in shared memory before it runs

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// Thread 0: announce `bytes` of copies completing on `bar`, then issue them (16-byte multiples).
__device__ __forceinline__ void bulk_load(unsigned char* dst, unsigned long long src, uint32_t bytes,
                                          unsigned long long* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  // Evict-first: a weight is read once per step, so it should not push activations out of L2.
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  constexpr uint32_t kPiece = 32 * 1024;
  for (uint32_t off = 0; off < bytes; off += kPiece) {
    const uint32_t n = bytes - off < kPiece ? bytes - off : kPiece;
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
        ::"r"(smem_addr(dst + off)), "l"(src + off), "r"(n), "r"(smem_addr(bar)), "l"(policy) : "memory");
  }
#endif
}

// All threads: spin until `ready()`. Thread 0 reads the host's abort flag now and then (a PCIe
// round trip) and raises the CTA's `abort` word in shared memory; false when the CTA must give up.
// Every wait inside a task goes through here, so a hang inside a task ends like a stalled event.
template <class Ready> __device__ __forceinline__ bool wait_or_abort(const MpkParams& p, volatile int* abort, Ready&& ready) {
  for (unsigned spin = 0;; ++spin) {
    if (ready()) return true;
    if (*abort) return false;
    if (threadIdx.x == 0 && (spin & 0xfff) == 0xfff && ld_volatile(p.host_flags + kFlagAbort)) *abort = kGiveUpAborted;
  }
}

// A mailbox word: a float32 value in the low half, its step's tag in the high half, written with one
// 8-byte store so a reader sees both or neither.
__device__ __forceinline__ unsigned long long tagged_word(float v, unsigned tag) {
  return static_cast<unsigned long long>(tag) << 32 | __float_as_uint(v);
}
__device__ __forceinline__ unsigned word_tag(unsigned long long w) { return static_cast<unsigned>(w >> 32); }
__device__ __forceinline__ float word_value(unsigned long long w) { return __uint_as_float(static_cast<unsigned>(w)); }
__device__ __forceinline__ unsigned long long ld_word(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_word(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// All threads, uniformly: rounds of `ready()` (each thread checks its own words and reloads the
// ones not yet of this step) until every thread's holds. Thread 0 watches as wait_event does
// (keep_waiting, naming the event whose producers write the words). False when the task must give
// up (t.give_up says why).
template <class Ready> __device__ bool poll_tagged(const TaskCtx& t, Ready&& ready) {
  for (unsigned spin = 0;; ++spin) {
    if (__syncthreads_and(ready())) {
      if (threadIdx.x == 0 && t.trace_rec) t.trace_rec[kTrStart] = global_timer();  // the task starts once its words are in
      return true;
    }
    if (threadIdx.x == 0)
      if (const int why = keep_waiting(*t.p, blockIdx.x, t.seq, t.entry->id, t.step, t.entry->task.wait, spin))
        *t.give_up = why;
    __syncthreads();
    if (*t.give_up) return false;
  }
}

// All threads: wait until the copies on `bar` of phase `parity` have landed (false: aborted).
__device__ __forceinline__ bool mbar_wait(const MpkParams& p, volatile int* abort, unsigned long long* bar,
                                          uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return wait_or_abort(p, abort, [&] {
    uint32_t done;
    asm volatile("{\n .reg .pred q;\n mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n selp.u32 %0, 1, 0, q;\n}"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    return done != 0;
  });
#else
  return true;
#endif
}

// Per task: [head address, head bytes, L2 address, L2 bytes] (mpk/runtime/tables.py). The head, the
// first rows of the task's streamed weight tile (whole 16-row blocks at batch 2+), is copied into shared memory;
// the following bytes are prefetched into L2.
constexpr int kPrefetchWords = 4;

// Thread 0 only: pull the L2 range of a task's weight tile. Weights depend on nothing, so this runs
// before the task's event fires and keeps HBM busy across operator boundaries.
__device__ __forceinline__ void prefetch_l2(unsigned long long addr, unsigned long long bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr unsigned kChunk = 32 * 1024;
  for (unsigned long long off = 0; off < bytes; off += kChunk) {
    const unsigned n = static_cast<unsigned>(bytes - off < kChunk ? bytes - off : kChunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr + off), "r"(n) : "memory");
  }
#endif
}

// Two head buffers after the variants' scratch: task n reads buffer n % 2 while task n + 1's head
// lands in the other, so at an operator boundary the next weights are already on the SM.
template <int kScratch, int kHeadBytes> struct HeadRing {
  unsigned long long* bar;  // [2], in static shared memory
  unsigned char* base;
  // Bit b: parity of buffer b's next completion (every thread tracks it); thread 0: buffer b has a
  // copy issued and not yet waited for. Bit masks, not arrays: a run-time index would put them on
  // the stack.
  uint32_t phase = 0, in_flight = 0;

  __device__ unsigned char* buffer(int b) const { return base + kScratch + b * kHeadBytes; }

  __device__ static unsigned head_bytes(const MpkParams& p, int task) {
    return kHeadBytes ? static_cast<unsigned>(p.prefetch[kPrefetchWords * task + 1]) : 0u;
  }

  // Thread 0: start task `task`'s head into buffer b (its previous reader has passed a CTA barrier).
  __device__ void issue(const MpkParams& p, int task, int b) {
    const unsigned bytes = head_bytes(p, task);
    if (!bytes) return;
    MPK_ASSERT(bytes <= kHeadBytes && !(in_flight >> b & 1));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // earlier generic reads before the copy's writes
    bulk_load(buffer(b), p.prefetch[kPrefetchWords * task], bytes, bar + b);
    in_flight |= 1u << b;
  }

  // All threads, for a task with a head in buffer b: wait for it.
  __device__ const unsigned char* acquire(const MpkParams& p, volatile int* abort, int b) {
    if (!mbar_wait(p, abort, bar + b, phase >> b & 1)) return nullptr;  // aborted: still in flight
    phase ^= 1u << b;
    in_flight &= ~(1u << b);
    return buffer(b);
  }

  // Thread 0, before the CTA exits: no copy may still be writing into its shared memory. Copies in
  // flight always land, so this ignores the abort flag.
  __device__ void drain(const MpkParams& p) {
    int never = 0;
    for (int b = 0; b < 2; ++b)
      if (in_flight >> b & 1) acquire(p, &never, b);
  }
};

// Thread 0 only, after the CTA's barrier: count the task done. The barrier orders every thread's
// writes before thread 0's release, and release is cumulative, so one red.release publishes them
// (at system scope when the counter is a peer's).
__device__ __forceinline__ void signal_events(const MpkParams& p, const QueueEntry& e) {
  for (int k = 0; k < e.task.sig_cnt; ++k) {
    unsigned long long* counter;
    bool sys;
    if (k < kEntrySignals) {
      counter = e.sig[k], sys = e.sig_sys >> k & 1;
    } else {
      const int at = e.task.sig_off + k, r = p.signal_rank[at];
      sys = r != p.rank;
      counter = (sys ? p.peer_counters[r] : p.counters) + p.signals[at];
    }
    if (sys) red_release_sys(counter, 1ull);
    else red_release(counter, 1ull);
  }
}

// Test hooks, compiled in only when the build asks (MPK_INJECT=hang:TASK or fault:TASK): task TASK
// hangs inside itself until the host aborts, or writes to an illegal address.
__device__ __forceinline__ void inject_faults(const MpkParams& p, int task, volatile int* abort) {
#ifdef MPK_INJECT_HANG
  if (task == MPK_INJECT_HANG) wait_or_abort(p, abort, [] { return false; });
#endif
#ifdef MPK_INJECT_FAULT
  if (task == MPK_INJECT_FAULT && threadIdx.x == 0) *reinterpret_cast<volatile int*>(16) = 1;
#endif
}

// Thread 0: queue entry `e` copied into shared memory `to` by asynchronous copies (cp.async, no
// registers held while they land); fetch_entry_wait makes every copy thread 0 issued visible to it.
__device__ __forceinline__ void fetch_entry(QueueEntry* to, const QueueEntry* e) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(to));
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(QueueEntry)) / 16; ++k)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 16 * k), "l"(reinterpret_cast<const char*>(e) + 16 * k)
                 : "memory");
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void fetch_entry_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Each CTA walks queue blockIdx.x for steps [first_step, first_step + num_steps): issue the next
// task's weight head, wait for this task's event, run it, signal. A task's queue entry (its task and
// op descriptors, its event's target) was copied into shared memory while the task before it ran.
template <class Dispatch, int kScratch, int kHeadBytes> __device__ void persistent_loop(const MpkParams& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) unsigned long long s_bar[2];
  __shared__ __align__(16) QueueEntry s_entry[2];  // entry n of the walk in s_entry[n % 2]
  __shared__ unsigned s_head_bytes;
  __shared__ int s_go;
  __shared__ int s_abort;  // raised by a wait inside a task (wait_or_abort, poll_tagged): a kGiveUp reason
  const int sm = blockIdx.x;
  const int q0 = p.queue_off[sm], qn = p.queue_off[sm + 1] - q0;
  // MPK_CODE_PAD (build knob, bytes): code that never runs ahead of the loop, so that the rest of the
  // kernel lands that much further on. The kernel is several times an SM's instruction cache, so an A/B
  // measured at a few pads tells a change's own effect from where its code happens to land.
#ifndef MPK_CODE_PAD
#define MPK_CODE_PAD 0
#endif
#if MPK_CODE_PAD > 0
  if (qn < 0)
#pragma unroll
    for (int i = 0; i < MPK_CODE_PAD / 16; ++i) asm volatile("membar.cta;" ::: "memory");
#endif
  const long long total = p.num_steps * qn;  // tasks this CTA runs, counted across steps
  HeadRing<kScratch, kHeadBytes> heads{s_bar, smem};
  if (threadIdx.x == 0) s_abort = 0;
  if (threadIdx.x == 0 && kHeadBytes) {
    mbar_init(s_bar), mbar_init(s_bar + 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (total > 0) heads.issue(p, p.queue_tasks[q0], 0);
  }
  if (threadIdx.x == 0 && total > 0) fetch_entry(&s_entry[0], p.entries + q0);
  __syncthreads();
  int seq = 0;
  for (long long n = 0; n < total; ++n) {
    const long long rel = n / qn, step = p.first_step + rel;
    const int i = static_cast<int>(n - rel * qn), b = static_cast<int>(n & 1);
    // Profiling: one record per task and step, indexed by queue position (unique across SMs).
    unsigned long long* rec = p.trace ? p.trace + (rel * p.queue_off[p.num_sms] + q0 + i) * kTraceWords : nullptr;
    const QueueEntry& e = s_entry[b];
    if (threadIdx.x == 0) {
      if (rec) rec[kTrWait] = global_timer();
      if constexpr (MPK_TASK_MARKS) s_trace_rec = rec, s_warps_done = 0;
      fetch_entry_wait();
      if (n + 1 < total) {  // the next task's entry, and its weights, stream while this one waits and runs
        const int next = (i + 1) % qn;
        fetch_entry(&s_entry[b ^ 1], p.entries + q0 + next);
        if (kHeadBytes) heads.issue(p, p.queue_tasks[q0 + next], b ^ 1);
        prefetch_l2(e.next_l2[0], e.next_l2[1]);
      }
      s_head_bytes = heads.head_bytes(p, e.id);
      bool go = wait_event(p, sm, ++seq, e, step, rel);
      // A stop decided by the step this task depends on is visible after the acquire.
      if (go && starts_a_step(e) && stopped_before(p, step))
        go = false, publish(p, sm, seq, e.id, step, e.task.wait, kStateStopped);
      s_go = go;
      if (!go) heads.drain(p), fetch_entry_wait();  // nothing lands in shared memory after the CTA leaves
    }
    __syncthreads();
    if (!s_go) return;
    if (rec && threadIdx.x == 0) rec[kTrStart] = global_timer();
    const unsigned char* head = s_head_bytes ? heads.acquire(p, &s_abort, b) : nullptr;
    const TaskCtx ctx{{e.task.tile[0], e.task.tile[1], e.task.tile[2]}, step, rel, &p, head, s_head_bytes,
                      &s_abort, seq, &e, rec};
    inject_faults(p, e.id, &s_abort);
    if (!s_abort) Dispatch::run(e.task.variant, ctx, e.op, smem);
    __syncthreads();
    if (s_abort) {  // a wait inside this task gave up: leave it unfinished, unsignalled
      if (threadIdx.x == 0) {
        const bool stopped = s_abort == kGiveUpStopped;
        publish(p, sm, ++seq, e.id, step, stopped ? e.task.wait : -1, stopped ? kStateStopped : kStateAborted);
        heads.drain(p), fetch_entry_wait();
      }
      return;
    }
    if (threadIdx.x == 0) {
      if (rec) rec[kTrEnd] = global_timer();  // before the signal: a consumer never starts before this
      signal_events(p, e);
    }
  }
  if (threadIdx.x == 0) publish(p, sm, ++seq, -1, p.first_step + p.num_steps, -1, kStateDone);
}

}  // namespace mpk
