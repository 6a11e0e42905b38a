// Host side of the generated .so: launch, and the C entry points the Python runtime calls through
// ctypes. Included once, by the generated translation unit.
#pragma once

#include <cuda_runtime.h>
#include <cstring>

#include "mpk_runtime.cuh"

namespace mpk {

// Cooperative launch: the driver refuses (instead of deadlocking) if the grid cannot be resident.
template <class Kernel> int launch(Kernel kernel, int smem_bytes, const MpkParams& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  MpkParams copy = p;
  void* args[] = {&copy};
  err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(p.num_sms)),
                                    dim3(kThreads), args, smem_bytes, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <class Kernel> int blocks_per_sm(Kernel kernel, int smem_bytes, int* out) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, kThreads, smem_bytes);
}

}  // namespace mpk

namespace mpk {

// Constants the host needs, exported by name so Python reads them instead of copying them.
struct AbiConstant {
  const char* name;
  long long value;
};
constexpr AbiConstant kAbiConstants[] = {
    {"kCtlWords", kCtlWords},           {"kCtlSampled", kCtlSampled},     {"kCtlStopStep", kCtlStopStep},
    {"kFlagWords", kFlagWords},         {"kFlagAbort", kFlagAbort},       {"kFlagStopRequest", kFlagStopRequest},
    {"kProgressWords", kProgressWords}, {"kPrSeq", kPrSeq},               {"kPrTask", kPrTask},
    {"kPrStep", kPrStep},               {"kPrEvent", kPrEvent},           {"kPrState", kPrState},
    {"kStateIdle", kStateIdle},         {"kStateWaiting", kStateWaiting}, {"kStateDone", kStateDone},
    {"kStateStopped", kStateStopped},   {"kStateAborted", kStateAborted}, {"kTraceWords", kTraceWords},
};

}  // namespace mpk

extern "C" {

int mpk_abi_count() { return sizeof(mpk::kAbiConstants) / sizeof(mpk::kAbiConstants[0]); }
const char* mpk_abi_name(int i) { return mpk::kAbiConstants[i].name; }
long long mpk_abi_value(int i) { return mpk::kAbiConstants[i].value; }

int mpk_params_size() { return sizeof(mpk::MpkParams); }
int mpk_task_desc_size() { return sizeof(mpk::TaskDesc); }
int mpk_op_desc_size() { return sizeof(mpk::OpDesc); }
int mpk_queue_entry_size() { return sizeof(mpk::QueueEntry); }
int mpk_num_threads() { return mpk::kThreads; }
const char* mpk_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// The .so links its own CUDA runtime; both it and PyTorch's use the device's primary context.
int mpk_set_device(int device) { return cudaSetDevice(device); }

// Tensor parallelism: `device` reads and signals `peer`'s memory directly (NVLink or PCIe).
// Returns -1 when the pair has no peer access at all.
int mpk_enable_peer_access(int device, int peer) {
  int can = 0;
  cudaError_t err = cudaDeviceCanAccessPeer(&can, device, peer);
  if (err != cudaSuccess) return err;
  if (!can) return -1;
  if ((err = cudaSetDevice(device)) != cudaSuccess) return err;
  err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // not an error here; clear it so it is not reported by a later call
    return cudaSuccess;
  }
  return err;
}

// Pinned host memory the GPU reads and writes directly (PyTorch's pin_memory is not mapped);
// portable, so the kernels of every rank's GPU can use it.
int mpk_host_alloc(size_t bytes, void** host, void** dev) {
  cudaError_t err = cudaHostAlloc(host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) return err;
  std::memset(*host, 0, bytes);
  return cudaHostGetDevicePointer(dev, *host, 0);
}

int mpk_host_free(void* host) { return cudaFreeHost(host); }

}  // extern "C"
