// Launch helpers shared by the torch-free kernels (CUDA runtime only).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>

namespace qsvd {

// Returns err after clearing the runtime's last error: a failed attribute
// call, occupancy query or launch leaves it set, and the next, unrelated CUDA
// call in the process would report it.
inline cudaError_t clear_and_return(cudaError_t err) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

// The current device's opt-in shared memory per block (a device property,
// cached per device).
inline cudaError_t device_smem_optin(int* bytes) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cache[kMaxCachedDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return clear_and_return(err);
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) {
      *bytes = v;
      return cudaSuccess;
    }
  }
  int v = 0;
  err = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return clear_and_return(err);
  if (cacheable) cache[device].store(v, std::memory_order_relaxed);
  *bytes = v;
  return cudaSuccess;
}

// Lets `kernel` launch with up to `smem` bytes of dynamic shared memory.
// Launches that need no more than the default 48 KB skip the call. Others set
// the attribute to the device's opt-in maximum, not to their own need: the
// value is then the same for every caller, so two host threads launching
// different shapes cannot race each other's setting into an "invalid
// argument". It is set on each such launch (one host call) rather than
// cached, because function attributes belong to the context and a context
// reset (cudaDeviceReset) would silently drop a cached setting.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem) {
  if (smem <= (48u << 10)) return cudaSuccess;
  int optin = 0;
  cudaError_t err = device_smem_optin(&optin);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  return clear_and_return(err);
}

}  // namespace qsvd
