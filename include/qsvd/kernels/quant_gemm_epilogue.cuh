// The dequantizing epilogue of quant_gemm, shared by the CUTLASS 2.x
// (sm80) and 3.x (sm90) epilogue visitor trees:
//
//   v = ((float)acc * a_scale[m]) * b_scale[n] + bias[n]
//
// The visitor node converts its inputs to fp32 first (int32 -> fp32 and
// bias -> fp32, both round-to-nearest, the latter exact) and the result to
// the output type afterwards (round-to-nearest-even): one rounding. The
// intrinsics keep nvcc from contracting the multiply and add into an FMA,
// so v is the CPU kernel's value bit for bit. Without a bias the broadcast
// node feeds -0.0f: x + (-0) == x for every x, signed zeros and NaN included.
#pragma once

#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "qsvd/formats.h"

namespace qsvd {
namespace gemm {

// ComputeFn of VisitorCompute / Sm90Compute: instantiated with
// Array<float, N> (and, for the Arguments probe of Sm90Compute, float).
template <class T>
struct DequantScaleBias {
  template <int N>
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& acc,
                                                     cutlass::Array<float, N> const& a_scale,
                                                     cutlass::Array<float, N> const& b_scale,
                                                     cutlass::Array<float, N> const& bias) const {
    cutlass::Array<float, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = __fadd_rn(__fmul_rn(__fmul_rn(acc[i], a_scale[i]), b_scale[i]), bias[i]);
    return out;
  }
};

// The CUTLASS element of the output dtype (fp32 unless fp16/bf16).
template <DType kOut>
struct OutElementOf {
  using type = float;
};
template <>
struct OutElementOf<DType::kF16> {
  using type = cutlass::half_t;
};
template <>
struct OutElementOf<DType::kBF16> {
  using type = cutlass::bfloat16_t;
};

}  // namespace gemm
}  // namespace qsvd
