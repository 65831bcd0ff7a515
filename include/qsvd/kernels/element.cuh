// Element conversions and vector words shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qsvd {

// fp32 value of an element (exact for every type here).
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
// Exact, without I2F (a quarter-rate conversion, and the latent kernels
// convert every code once per head): 0x4B400000 is 1.5 * 2^23, where the
// fp32 spacing is 1, so adding v to its bits gives the float 1.5 * 2^23 + v.
template <>
__device__ __forceinline__ float to_float<int8_t>(int8_t v) {
  return __fsub_rn(__int_as_float(0x4B400000 + static_cast<int>(v)), 12582912.f);
}

// One rounding (to nearest even) of an fp32 value to an element type.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The unsigned word type of a vector access of kBytes bytes.
template <int kBytes>
struct VectorOf;
template <> struct VectorOf<16> { using type = uint4; };
template <> struct VectorOf<8> { using type = uint2; };
template <> struct VectorOf<4> { using type = uint32_t; };
template <> struct VectorOf<2> { using type = uint16_t; };
template <> struct VectorOf<1> { using type = uint8_t; };

}  // namespace qsvd
