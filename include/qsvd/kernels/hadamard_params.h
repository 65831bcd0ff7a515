// Launch interface of the CUDA Hadamard kernels: raw pointers, sizes, a
// stream, a cudaError_t. Host code (the torch launcher, a C++ benchmark)
// includes only this; the kernels live in hadamard_kernel.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "qsvd/formats.h"

namespace qsvd {
namespace hadamard {

// What the kernel writes after the rotation.
enum class OutputKind : int {
  kRotated = 0,  // y in the input's element type, [rows, K]
  kInt8 = 1,     // codes int8 [rows, K] + one fp32 scale per row
  kInt4 = 2,     // packed INT4 codes uint8 [rows, K/2] + one fp32 scale per row
};

struct HadamardParams {
  const void* x = nullptr;       // [rows, K], row stride x_row_stride elements, unit column stride
  int64_t x_row_stride = 0;
  DType x_type = DType::kF32;        // kF32, kF16 or kBF16
  const float* signs = nullptr;  // [K] or nullptr: multiplies x before the rotation
  void* out = nullptr;           // contiguous, see OutputKind
  float* scale = nullptr;        // [rows] (quantizing kinds only)
  int64_t rows = 0;
  int64_t K = 0;                 // qsvd::hadamard::is_supported_dim(K)
  float norm = 0.f;              // qsvd::hadamard::norm_factor(K)
  float clip_ratio = 1.f;        // (0, 1]
  OutputKind kind = OutputKind::kRotated;
  // Run-time knob: the compiled variant with at least this many elements per
  // thread (1, 2, 4, 8 or 32) that serves K; 0 or none serving K: the
  // built-in choice (the fewest elements per thread).
  int min_elems_per_thread = 0;
};

// One definition per element type, each in its own translation unit
// (csrc/cuda/hadamard_kernels_*.cu) so the instantiations compile in parallel.
cudaError_t launch_hadamard_f32(const HadamardParams& p, cudaStream_t stream);
cudaError_t launch_hadamard_f16(const HadamardParams& p, cudaStream_t stream);
cudaError_t launch_hadamard_bf16(const HadamardParams& p, cudaStream_t stream);

// Returns cudaErrorInvalidValue for an unsupported K, element type or kind;
// callers validate arguments first and report them by name.
inline cudaError_t launch_hadamard(const HadamardParams& p, cudaStream_t stream) {
  switch (p.x_type) {
    case DType::kF32: return launch_hadamard_f32(p, stream);
    case DType::kF16: return launch_hadamard_f16(p, stream);
    case DType::kBF16: return launch_hadamard_bf16(p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace hadamard
}  // namespace qsvd
