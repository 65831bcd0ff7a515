// What every CUDA launcher of csrc/cuda/ shares: the one converter from a
// torch dtype to the kernels' element enum (qsvd::DType, include/qsvd/formats.h)
// and the one launch-error check. Host code, compiled by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <c10/core/ScalarType.h>

#include "../checks.h"
#include "qsvd/formats.h"

namespace qsvd_torch {

// The kernels' element type of a torch dtype. Callers have checked the dtype
// against the op's allowed set, so anything else is an internal error.
inline qsvd::DType to_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return qsvd::DType::kF32;
    case at::kHalf: return qsvd::DType::kF16;
    case at::kBFloat16: return qsvd::DType::kBF16;
    case at::kChar: return qsvd::DType::kI8;
    case at::kByte: return qsvd::DType::kU8;
    default: break;
  }
  QSVD_CHECK(false, op, "internal error: no kernel element type for dtype ", t);
  return qsvd::DType::kF32;
}

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
