// The persistent megakernel: tables the host builds from the TaskGraph, event wait/signal, and the
// per-SM loop that walks its queue step after step.
//
// Memory ordering (PTX model): a task's threads finish their writes, __syncthreads, then thread 0
// fences and increments each event counter it signals (release). A waiter's thread 0 spins on an
// acquire load of the counter, then __syncthreads releases the CTA: every thread's later loads see
// the producers' writes (the acquire also drops the SM's stale L1 lines). Activations are therefore
// never read through the non-coherent (__ldg) path; only weights are.
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
};
static_assert(sizeof(OpDesc) == 144, "OpDesc is mirrored by mpk/runtime/abi.py");

// ctl: small device-side state of one run, zeroed/initialised by the host before a launch.
enum : int { kCtlSampled = 0, kCtlStopStep = 1, kCtlWords = 4 };
// host_flags: host-mapped words the host writes while the kernel runs.
enum : int { kFlagAbort = 0, kFlagStopRequest = 1, kFlagWords = 4 };
// progress: host-mapped, kProgressWords ints per SM, read by the host watchdog.
enum : int { kPrSeq = 0, kPrTask = 1, kPrStep = 2, kPrEvent = 3, kPrState = 4, kProgressWords = 8 };
enum : int { kStateIdle = 0, kStateWaiting = 1, kStateDone = 2, kStateStopped = 3, kStateAborted = 4 };

// Kernel parameters. Every field is 8 bytes, so the ctypes mirror in mpk/runtime/abi.py has no
// padding questions; mpk_params_size() lets the host check.
struct MpkParams {
  const TaskDesc* tasks;
  const int* signals;
  const int* queue_off;    // [num_sms + 1]
  const int* queue_tasks;  // task ids, queue by queue
  const int* ev_target;
  const int* ev_lag;
  const OpDesc* ops;
  unsigned long long* counters;  // one per event, zeroed before each launch
  long long* ctl;                // kCtlWords
  int* seq_done;                 // [batch]: sequence hit EOS or its token limit
  const long long* eos;          // [n_eos]
  const long long* max_new;      // [batch]: new tokens allowed per sequence
  int* out_tokens;               // host-mapped [max_seq_len * batch]: token of (step, b)
  long long* steps_done;         // host-mapped: absolute steps completed
  int* progress;                 // host-mapped [num_sms * kProgressWords]
  int* host_flags;               // host-mapped kFlagWords
  const unsigned long long* prefetch;  // [num_tasks][2]: address and bytes of the task's weight tile (0: none)
  unsigned long long* trace;           // null, or [num_steps][num_tasks][3]: %globaltimer at wait, run, done
  long long first_step;          // absolute position of the launch's first step
  long long num_steps;
  long long num_sms;
  long long n_eos;
  long long n_sample;  // sample tasks per step
  long long batch;
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
  long long step;  // absolute position (RoPE row, KV row)
  long long rel;   // step within this launch (event thresholds, sample counting)
  const MpkParams* p;
};

__device__ __forceinline__ unsigned long long global_timer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long ld_acquire(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release(unsigned long long* p, unsigned long long v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
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

// Thread 0 only. True when the task may run; false when the kernel must exit (the run stopped
// before this step, or the host asked to abort).
__device__ bool wait_event(const MpkParams& p, int sm, int seq, int task, int ev, long long step, long long rel) {
  if (stopped_before(p, step)) return publish(p, sm, seq, task, step, ev, kStateStopped), false;
  if (ev < 0) return true;
  MPK_ASSERT(p.ev_lag[ev] == 0 || p.ev_lag[ev] == 1);
  const long long need = static_cast<long long>(p.ev_target[ev]) * (rel + 1 - p.ev_lag[ev]);
  const unsigned long long* ctr = p.counters + ev;
  if (need <= 0 || static_cast<long long>(ld_acquire(ctr)) >= need) return true;
  // The host watchdog reads this to say who waits on what if the graph ever stalls.
  publish(p, sm, seq, task, step, ev, kStateWaiting);
  unsigned ns = 32;
  for (unsigned spin = 1;; ++spin) {
    __nanosleep(ns);
    if (ns < 256) ns *= 2;
    if (static_cast<long long>(ld_acquire(ctr)) >= need) return true;
    if (stopped_before(p, step)) return publish(p, sm, seq, task, step, ev, kStateStopped), false;
    // The abort flag lives in host memory: read it rarely (a PCIe round trip).
    if ((spin & 1023) == 0 && ld_volatile(p.host_flags + kFlagAbort))
      return publish(p, sm, seq, task, step, ev, kStateAborted), false;
  }
}

// Thread 0 only: start pulling the head of a task's weight tile into L2. Weights depend on nothing, so
// this runs before the task's event fires and keeps HBM busy across operator boundaries, where the
// SM would otherwise idle until its inputs are ready.
__device__ __forceinline__ void prefetch_weights(const MpkParams& p, int task) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned long long addr = p.prefetch[2 * task], bytes = p.prefetch[2 * task + 1];
  constexpr unsigned kChunk = 32 * 1024;
  for (unsigned long long off = 0; off < bytes; off += kChunk) {
    const unsigned n = static_cast<unsigned>(bytes - off < kChunk ? bytes - off : kChunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr + off), "r"(n) : "memory");
  }
#endif
}

// Thread 0 only, after the CTA's barrier: make the task's writes visible, then count it done.
__device__ __forceinline__ void signal_events(const MpkParams& p, const TaskDesc& t) {
  __threadfence();
  for (int k = 0; k < t.sig_cnt; ++k) red_release(p.counters + p.signals[t.sig_off + k], 1ull);
}

// Each CTA walks queue blockIdx.x for steps [first_step, first_step + num_steps): wait, run, signal.
template <class Dispatch> __device__ void persistent_loop(const MpkParams& p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ TaskDesc s_task;
  __shared__ int s_go;
  const int sm = blockIdx.x;
  const int q0 = p.queue_off[sm], qn = p.queue_off[sm + 1] - q0;
  int seq = 0;
  for (long long rel = 0; rel < p.num_steps; ++rel) {
    const long long step = p.first_step + rel;
    for (int i = 0; i < qn; ++i) {
      // Profiling: one record per task and step, indexed by queue position (unique across SMs).
      unsigned long long* rec = p.trace ? p.trace + (rel * p.queue_off[p.num_sms] + q0 + i) * 3 : nullptr;
      if (threadIdx.x == 0) {
        if (rec) rec[0] = global_timer();
        const int id = p.queue_tasks[q0 + i];
        if (rel == 0 && i == 0) prefetch_weights(p, id);
        // One task ahead (the next step's first task after the last): its weights stream while this waits.
        if (qn > 0) prefetch_weights(p, p.queue_tasks[q0 + (i + 1) % qn]);
        s_task = p.tasks[id];
        bool go = wait_event(p, sm, ++seq, id, s_task.wait, step, rel);
        // A stop decided by the step this task depends on is visible after the acquire.
        if (go && stopped_before(p, step)) go = false, publish(p, sm, seq, id, step, s_task.wait, kStateStopped);
        s_go = go;
        __threadfence();  // belt and braces on the acquire: the CTA's loads below come after the wait
      }
      __syncthreads();
      if (!s_go) return;
      if (rec && threadIdx.x == 0) rec[1] = global_timer();
      const TaskCtx ctx{{s_task.tile[0], s_task.tile[1], s_task.tile[2]}, step, rel, &p};
      Dispatch::run(s_task.variant, ctx, p.ops[s_task.op], smem);
      __syncthreads();
      if (threadIdx.x == 0) {
        if (rec) rec[2] = global_timer();  // before the signal: a consumer never starts before this
        signal_events(p, s_task);
      }
    }
  }
  if (threadIdx.x == 0) publish(p, sm, ++seq, -1, p.first_step + p.num_steps, -1, kStateDone);
}

}  // namespace mpk
