// What every CUDA launcher of csrc/cuda/ shares: the one launch-error check
// (the torch dtype -> qsvd::DType converter, to_dtype, is checks.h's, shared
// with the CPU kernels). Host code, compiled by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "../checks.h"
#include "qsvd/formats.h"

namespace qsvd_torch {

// Raises (RuntimeError, "qsvd.<op>: <what> failed: <CUDA error>") when err is
// not cudaSuccess. It first clears the runtime's last error, which a failed
// launch, attribute call, occupancy query or CUTLASS initialize leaves set:
// otherwise the next, unrelated CUDA call in the process would report it.
template <typename... Args>
inline void check_launch(const char* op, cudaError_t err, const Args&... what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  if constexpr (sizeof...(Args) == 0) {
    QSVD_CHECK(false, op, "CUDA kernel launch failed: ", cudaGetErrorString(err));
  } else {
    QSVD_CHECK(false, op, what..., ": ", cudaGetErrorString(err));
  }
}

}  // namespace qsvd_torch
