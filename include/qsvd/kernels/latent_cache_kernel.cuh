// CUDA kernels of the paged latent cache. Torch-free; see
// latent_cache_params.h for the interface.
//
// cache_append: a group of threads per token row (one warp for r <= 1024,
// the whole 256-thread block beyond). Pass 1 reads the row and reduces
// max|x| (nan_propagating_max: any NaN wins, otherwise the max, so the
// reduction order cannot change the result); pass 2 reads the row again,
// quantizes with the numerics.h rules and stores the codes; one thread
// stores the scale. The result is therefore bit-identical to
// quantize_row_host on the CPU.
// Bandwidth: the op must move T (r sizeof(x) + r bits/8 + 4 + slot) bytes
// and is memory-bound (a few flops per byte). The second read of a row hits
// L1/L2 (a row is at most a few tens of KiB, read by the same SM a few
// hundred cycles earlier), so HBM traffic stays one read + one write. The
// vector path issues 16-byte loads and 8-/4-byte code stores, fully
// coalesced per warp; with 8 rows per 256-thread block and many blocks per
// SM, enough loads are in flight to approach HBM bandwidth at prefill sizes
// (T in the thousands). Decode (T = batch) is launch-latency-bound.
//
// gather_codes: one warp per packed row; binary search of the row's
// sequence in cu_seqlens, one block_table lookup (a block id outside
// [0, num_blocks) gives zero codes and a zero scale: never an out-of-bounds
// read), codes unpacked to fp16/bf16 (|code| <= 127 is exact in both).
//
// kv_epilogue: one thread per (row, kv head, 4 channels) (a rotary unit
// covers 4 channels and their rotate-half partners d_rope / 2 apart):
// k = (acc * token_scale) (* w_scale), then rotate-half RoPE over the first
// d_rope channels in fp32 with every product and sum rounded separately,
// one final rounding.
//
// copy_rope_keys: one thread per (row, kv head, channel < d_rope).
//
// rope_keys_append: one block per new row: its codes (unpacked) in shared
// memory, then one thread per (kv head, rotary pair) sums the r exact
// products down W_uk's two partner columns (consecutive threads read
// consecutive columns), scales as the CPU kernel does, rotates and stores
// fp16. Decode appends B rows per layer and step: launch-bound; a prefill of
// N rows reads W_uk's rotary columns N times from L2.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "qsvd/kernels/element.cuh"
#include "qsvd/kernels/latent_cache_params.h"
#include "qsvd/kernels/launch_util.cuh"
#include "qsvd/numerics.h"

namespace qsvd {
namespace latent_cache {
namespace detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Rows up to this rank get one warp each in cache_append; larger rows a block.
constexpr int64_t kWarpRowMaxRank = 1024;
// Grid cap of the grid-stride epilogue: plenty of blocks for any GPU.
constexpr int64_t kMaxEpilogueBlocks = 1 << 16;



// kN elements through kBytes-wide words (kBytes divides kN * sizeof(T));
// the caller proved the alignment. memcpy between registers is a move.
template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* src, T (&dst)[kN]) {
  constexpr int kTotal = kN * static_cast<int>(sizeof(T));
  constexpr int kW = kTotal >= 16 ? 16 : kTotal;
  using W = typename VectorOf<kW>::type;
  W words[kTotal / kW];
#pragma unroll
  for (int i = 0; i < kTotal / kW; ++i) words[i] = reinterpret_cast<const W*>(src)[i];
  memcpy(dst, words, kTotal);
}

template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* dst, const T (&src)[kN]) {
  constexpr int kTotal = kN * static_cast<int>(sizeof(T));
  constexpr int kW = kTotal >= 16 ? 16 : kTotal;
  using W = typename VectorOf<kW>::type;
  W words[kTotal / kW];
  memcpy(words, src, kTotal);
#pragma unroll
  for (int i = 0; i < kTotal / kW; ++i) reinterpret_cast<W*>(dst)[i] = words[i];
}

// ---------------------------------------------------------------------------
// latent_cache_append
// ---------------------------------------------------------------------------

constexpr int kChunk = 8;  // elements per vector access of a row

template <typename T>
__device__ __forceinline__ void load_chunk(const T* src, float (&v)[kChunk]) {
  T e[kChunk];
  load_vec<T, kChunk>(src, e);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) v[i] = to_float<T>(e[i]);
}

// max|x| over the row group: warp shuffles, then (block per row) the
// warps' partial results through shared memory. Order-independent.
template <int kWarpsPerRow>
__device__ __forceinline__ float row_group_amax(float amax) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    amax = nan_propagating_max(__shfl_xor_sync(kFullMask, amax, offset), amax);
  if constexpr (kWarpsPerRow > 1) {
    // One row per block and one reduction per launch: the array is never reused.
    __shared__ float warp_amax[kWarpsPerRow];
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerRow; ++w) amax = nan_propagating_max(warp_amax[w], amax);
  }
  return amax;
}

template <typename T, int kBits, int kWarpsPerRow>
__global__ void __launch_bounds__(kThreads) cache_append_kernel(const CacheAppendParams p) {
  constexpr int kRowThreads = 32 * kWarpsPerRow;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  constexpr int kQmax = qmax_for_bits(kBits);
  const int tid = static_cast<int>(threadIdx.x) % kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  // Uniform per row group (a warp, or the whole block for kWarpsPerRow > 1),
  // so the __syncthreads of the block reduction is reached by all or none.
  if (row >= p.T) return;
  const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[row]
                                       : static_cast<int64_t>(static_cast<const int32_t*>(p.slot_mapping)[row]);
  // Negative: padding. Past the end: only reachable with the host check
  // off (QSVD_SKIP_INDEX_CHECKS); skipped, never written out of bounds.
  if (slot < 0 || slot >= p.num_slots) return;
  const T* x = static_cast<const T*>(p.c) + row * p.c_row_stride;
  const int64_t r = p.r;

  float amax = 0.f;
  if (p.vectorized) {
#pragma unroll 2
    for (int64_t j = static_cast<int64_t>(tid) * kChunk; j < r; j += kRowThreads * kChunk) {
      float v[kChunk];
      load_chunk<T>(x + j, v);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) amax = nan_propagating_max(fabsf(v[i]), amax);
    }
  } else {
    for (int64_t j = tid; j < r; j += kRowThreads) amax = nan_propagating_max(fabsf(to_float<T>(x[j])), amax);
  }
  amax = row_group_amax<kWarpsPerRow>(amax);
  const float scale = quant_scale(amax, p.clip_ratio, kQmax);
  if (tid == 0) *p.cache.scale_of(slot) = scale;

  if constexpr (kBits == 8) {
    int8_t* out = reinterpret_cast<int8_t*>(p.cache.codes_of(slot));
    if (p.vectorized) {
      for (int64_t j = static_cast<int64_t>(tid) * kChunk; j < r; j += kRowThreads * kChunk) {
        float v[kChunk];
        load_chunk<T>(x + j, v);
        int8_t q[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) q[i] = static_cast<int8_t>(quantize_value(v[i], scale, kQmax));
        if (p.codes_8byte) {
          store_vec<int8_t, kChunk>(out + j, q);
        } else {  // packed rows: the stride r + 4 keeps rows 4-byte aligned only
          int8_t lo[kChunk / 2], hi[kChunk / 2];
#pragma unroll
          for (int i = 0; i < kChunk / 2; ++i) lo[i] = q[i], hi[i] = q[kChunk / 2 + i];
          store_vec<int8_t, kChunk / 2>(out + j, lo);
          store_vec<int8_t, kChunk / 2>(out + j + kChunk / 2, hi);
        }
      }
    } else {
      for (int64_t j = tid; j < r; j += kRowThreads)
        out[j] = static_cast<int8_t>(quantize_value(to_float<T>(x[j]), scale, kQmax));
    }
  } else {
    uint8_t* out = p.cache.codes_of(slot);
    if (p.vectorized) {
      for (int64_t j = static_cast<int64_t>(tid) * kChunk; j < r; j += kRowThreads * kChunk) {
        float v[kChunk];
        load_chunk<T>(x + j, v);
        uint8_t q[kChunk / 2];
#pragma unroll
        for (int i = 0; i < kChunk / 2; ++i)
          q[i] = pack_int4(quantize_value(v[2 * i], scale, kQmax), quantize_value(v[2 * i + 1], scale, kQmax));
        store_vec<uint8_t, kChunk / 2>(out + j / 2, q);
      }
    } else {
      for (int64_t i = tid; i < r / 2; i += kRowThreads)
        out[i] = pack_int4(quantize_value(to_float<T>(x[2 * i]), scale, kQmax),
                           quantize_value(to_float<T>(x[2 * i + 1]), scale, kQmax));
    }
  }
}

template <typename T, int kBits, int kWarpsPerRow>
cudaError_t launch_cache_append_config(const CacheAppendParams& p, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kWarps / kWarpsPerRow;
  const int64_t blocks = (p.T + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  cache_append_kernel<T, kBits, kWarpsPerRow><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_cache_append_impl(const CacheAppendParams& p, cudaStream_t stream) {
  if (p.T < 0 || p.r < 0 || (p.bits != 8 && p.bits != 4) || (p.bits == 4 && (p.r & 1))) return cudaErrorInvalidValue;
  if (p.vectorized && p.r % kChunk != 0) return cudaErrorInvalidValue;
  if (p.T == 0) return cudaSuccess;
  const bool warp_per_row = p.r <= kWarpRowMaxRank;
  if (p.bits == 8)
    return warp_per_row ? launch_cache_append_config<T, 8, 1>(p, stream)
                        : launch_cache_append_config<T, 8, kWarps>(p, stream);
  return warp_per_row ? launch_cache_append_config<T, 4, 1>(p, stream)
                      : launch_cache_append_config<T, 4, kWarps>(p, stream);
}

// ---------------------------------------------------------------------------
// latent_reconstruct_kv: gather
// ---------------------------------------------------------------------------

template <typename TC, int kBits>
__global__ void __launch_bounds__(kThreads) gather_codes_kernel(const GatherCodesParams p) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t local = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (local >= p.rows) return;
  const int64_t row = p.row_begin + local;
  // The row's sequence: the largest b with cu_seqlens[b] <= row. Invariant
  // cu_seqlens[lo] <= row < cu_seqlens[hi] (cu_seqlens[0] = 0, cu_seqlens[B]
  // = total > row), so the loop ends at a non-empty sequence with t < its length.
  int64_t lo = 0, hi = p.B;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (p.cu_seqlens[mid] <= row) lo = mid;
    else hi = mid;
  }
  const int64_t t = row - p.cu_seqlens[lo];
  // t < length <= max_blocks * block_size: the table read is in bounds.
  const int64_t block = p.block_table[lo * p.max_blocks + t / p.block_size];
  // A bad block id (host check off) reads nothing: zero codes, zero scale.
  const bool valid = block >= 0 && block < p.num_blocks;
  const int64_t slot = block * p.block_size + t % p.block_size;
  if (lane == 0) {
    p.token_scale[local] = valid ? *p.cache.scale_of(slot) : 0.f;
    p.position[local] = static_cast<int32_t>(t);
    if (p.slot != nullptr) p.slot[local] = valid ? slot : -1;
  }
  const int64_t r = p.r;
  TC* out = static_cast<TC*>(p.codes) + local * r;
  if (p.vectorized) {
    for (int64_t j = static_cast<int64_t>(lane) * kChunk; j < r; j += 32 * kChunk) {
      int codes[kChunk];
      if (!valid) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) codes[i] = 0;
      } else if constexpr (kBits == 8) {
        int8_t q[kChunk];
        const int8_t* src = reinterpret_cast<const int8_t*>(p.cache.codes_of(slot)) + j;
        if (p.codes_8byte) {
          load_vec<int8_t, kChunk>(src, q);
        } else {  // packed rows: 4-byte aligned only
          int8_t lo[kChunk / 2], hi[kChunk / 2];
          load_vec<int8_t, kChunk / 2>(src, lo);
          load_vec<int8_t, kChunk / 2>(src + kChunk / 2, hi);
#pragma unroll
          for (int i = 0; i < kChunk / 2; ++i) q[i] = lo[i], q[kChunk / 2 + i] = hi[i];
        }
#pragma unroll
        for (int i = 0; i < kChunk; ++i) codes[i] = q[i];
      } else {
        uint8_t q[kChunk / 2];
        load_vec<uint8_t, kChunk / 2>(p.cache.codes_of(slot) + j / 2, q);
#pragma unroll
        for (int i = 0; i < kChunk / 2; ++i) {
          codes[2 * i] = unpack_int4_lo(q[i]);
          codes[2 * i + 1] = unpack_int4_hi(q[i]);
        }
      }
      TC e[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) e[i] = from_float<TC>(static_cast<float>(codes[i]));
      store_vec<TC, kChunk>(out + j, e);
    }
  } else {
    for (int64_t j = lane; j < r; j += 32) {
      int code = 0;
      if (valid) {
        if constexpr (kBits == 8) {
          code = reinterpret_cast<const int8_t*>(p.cache.codes_of(slot))[j];
        } else {
          const uint8_t byte = p.cache.codes_of(slot)[j / 2];
          code = (j & 1) ? unpack_int4_hi(byte) : unpack_int4_lo(byte);
        }
      }
      out[j] = from_float<TC>(static_cast<float>(code));
    }
  }
}

template <typename TC>
cudaError_t launch_gather_codes_typed(const GatherCodesParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.rows + kWarps - 1) / kWarps;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  if (p.bits == 8)
    gather_codes_kernel<TC, 8><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  else
    gather_codes_kernel<TC, 4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

inline cudaError_t launch_gather_codes_impl(const GatherCodesParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows < 0 || p.B < 1 || p.block_size < 1 || (p.bits != 8 && p.bits != 4) || (p.bits == 4 && (p.r & 1)) ||
      (p.vectorized && p.r % kChunk != 0))
    return cudaErrorInvalidValue;
  switch (p.codes_type) {
    case DType::kF16: return launch_gather_codes_typed<__half>(p, stream);
    case DType::kBF16: return launch_gather_codes_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------
// latent_reconstruct_kv: epilogue
// ---------------------------------------------------------------------------

template <int kV>
__device__ __forceinline__ void load_floats(const float* src, float (&dst)[kV]) {
  if constexpr (kV == 1) dst[0] = *src;
  else load_vec<float, kV>(src, dst);
}

// k = (acc * token_scale) * w_scale, each product rounded (never fused).
template <int kV>
__device__ __forceinline__ void scale_channels(float (&k)[kV], float token_scale, const float* w_scale) {
#pragma unroll
  for (int i = 0; i < kV; ++i) k[i] = mul_rn(k[i], token_scale);
  if (w_scale != nullptr) {
    float ws[kV];
    load_floats<kV>(w_scale, ws);
#pragma unroll
    for (int i = 0; i < kV; ++i) k[i] = mul_rn(k[i], ws[i]);
  }
}

template <typename TO, int kV>
__device__ __forceinline__ void store_out(TO* dst, const float (&v)[kV]) {
  TO e[kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) e[i] = from_float<TO>(v[i]);
  if constexpr (kV == 1) *dst = e[0];
  else store_vec<TO, kV>(dst, e);
}

// Error bound (fp32, unit roundoff u = 2^-24), per output channel j of
// token t, with M_j = sum_i |c_i| |W_ij| (c = code * token scale, W the
// dequantized weight): the GEMM sums r exact products (int8/int4 codes
// times fp16/bf16/int8 weights fit fp32's 24-bit significand) in fp32,
// error <= (r - 1) u M_j in any summation order; the token-scale and
// weight-scale products add u M_j each: |dk_j| <= (r + 1) u M_j. RoPE's two
// products and one sum (|cos|, |sin| <= 1) add 2 u (M_j + M_j'), j' the
// rotate-half partner: |dk_j| <= (r + 3) u (M_j + M_j'). Both sit inside the
// (r + 4) u bound of qsvd_kernels/testing.py latent_reconstruct_error_bound,
// before the final rounding to the output dtype. (First order in u; the
// bound assumes round-to-nearest accumulation, see the launcher.)
template <typename TO, int kV, bool kRope>
__global__ void __launch_bounds__(kThreads) kv_epilogue_kernel(const KvEpilogueParams p) {
  const int64_t d = p.d;
  const int64_t n = kRope ? p.d_rope : 0;  // rotary channels [0, n), the rest unrotated
  const int64_t half = n / 2;
  const int64_t rot_units = half / kV;
  const int64_t units = rot_units + (d - n) / kV;
  const int64_t items = p.rows * p.H_kv * units;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t u = item % units;
    const int64_t row_head = item / units;
    const int64_t h = row_head % p.H_kv;
    const int64_t row = row_head / p.H_kv;
    const bool rotary = kRope && u < rot_units;
    const int64_t j0 = rotary ? u * kV : n + (u - rot_units) * kV;
    const float* acc = p.acc + row * p.acc_row_stride + h * d;
    const float* w_scale = p.w_scale != nullptr ? p.w_scale + h * d : nullptr;
    const float token_scale = p.token_scale[row];
    TO* out = static_cast<TO*>(p.out) + (row * p.H_kv + h) * d;

    float k_lo[kV];
    load_floats<kV>(acc + j0, k_lo);
    scale_channels<kV>(k_lo, token_scale, w_scale != nullptr ? w_scale + j0 : nullptr);
    if (!rotary) {
      store_out<TO, kV>(out + j0, k_lo);
    } else {
      // Channels j0.. (first half) and j0 + half.. (their rotate-half partners).
      float k_hi[kV];
      load_floats<kV>(acc + j0 + half, k_hi);
      scale_channels<kV>(k_hi, token_scale, w_scale != nullptr ? w_scale + j0 + half : nullptr);
      const int64_t pos = p.position[row];
      const float* cos_row = p.rope_cos + pos * n;
      const float* sin_row = p.rope_sin + pos * n;
      float cos_lo[kV], sin_lo[kV], cos_hi[kV], sin_hi[kV];
      load_floats<kV>(cos_row + j0, cos_lo);
      load_floats<kV>(sin_row + j0, sin_lo);
      load_floats<kV>(cos_row + j0 + half, cos_hi);
      load_floats<kV>(sin_row + j0 + half, sin_hi);
      float out_lo[kV], out_hi[kV];
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        // rotate_half(k) = [-k_hi, k_lo]
        out_lo[i] = __fsub_rn(mul_rn(k_lo[i], cos_lo[i]), mul_rn(k_hi[i], sin_lo[i]));
        out_hi[i] = __fadd_rn(mul_rn(k_hi[i], cos_hi[i]), mul_rn(k_lo[i], sin_hi[i]));
      }
      store_out<TO, kV>(out + j0, out_lo);
      store_out<TO, kV>(out + j0 + half, out_hi);
    }
  }
}

template <typename TO, int kV>
cudaError_t launch_kv_epilogue_config(const KvEpilogueParams& p, bool rope, cudaStream_t stream) {
  const int64_t units = rope ? p.d_rope / 2 / kV + (p.d - p.d_rope) / kV : p.d / kV;
  const int64_t items = p.rows * p.H_kv * units;
  if (items == 0) return cudaSuccess;
  int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > kMaxEpilogueBlocks) blocks = kMaxEpilogueBlocks;
  if (rope)
    kv_epilogue_kernel<TO, kV, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  else
    kv_epilogue_kernel<TO, kV, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TO>
cudaError_t launch_kv_epilogue_typed(const KvEpilogueParams& p, cudaStream_t stream) {
  const bool rope = p.rope_cos != nullptr;
  return p.vectorized ? launch_kv_epilogue_config<TO, 4>(p, rope, stream)
                      : launch_kv_epilogue_config<TO, 1>(p, rope, stream);
}

inline cudaError_t launch_kv_epilogue_impl(const KvEpilogueParams& p, cudaStream_t stream) {
  const bool rope = p.rope_cos != nullptr;
  if (p.rows < 0 || p.H_kv < 0 || p.d < 0 ||
      (rope && (p.rope_sin == nullptr || (p.d_rope & 1) || p.d_rope < 2 || p.d_rope > p.d)) ||
      (p.vectorized && (p.d % 8 != 0 || (rope && p.d_rope % 8 != 0))))
    return cudaErrorInvalidValue;
  switch (p.out_type) {
    case DType::kF32: return launch_kv_epilogue_typed<float>(p, stream);
    case DType::kF16: return launch_kv_epilogue_typed<__half>(p, stream);
    case DType::kBF16: return launch_kv_epilogue_typed<__nv_bfloat16>(p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------
// latent_reconstruct_kv with cached rotary keys: copy_rope_keys
// ---------------------------------------------------------------------------

template <typename TO>
__global__ void __launch_bounds__(kThreads) copy_rope_keys_kernel(const CopyRopeKeysParams p) {
  const int64_t n = p.d_rope, items = p.rows * p.H_kv * n;
  const __half* keys = static_cast<const __half*>(p.rope_keys);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t j = item % n, row_head = item / n;
    const int64_t h = row_head % p.H_kv, row = row_head / p.H_kv;
    const int64_t slot = p.slot[row];
    const float v = slot >= 0 ? __half2float(keys[(slot * p.H_kv + h) * n + j]) : 0.f;
    static_cast<TO*>(p.out)[(row * p.H_kv + h) * p.d + j] = from_float<TO>(v);
  }
}

inline cudaError_t launch_copy_rope_keys_impl(const CopyRopeKeysParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.H_kv < 0 || p.d_rope < 0 || p.d_rope > p.d) return cudaErrorInvalidValue;
  const int64_t items = p.rows * p.H_kv * p.d_rope;
  if (items == 0) return cudaSuccess;
  int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > kMaxEpilogueBlocks) blocks = kMaxEpilogueBlocks;
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (p.out_type) {
    case DType::kF32: copy_rope_keys_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kF16: copy_rope_keys_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBF16: copy_rope_keys_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// latent_rope_keys_append
// ---------------------------------------------------------------------------

// Sum of exact products code_i W[i, col] down one column: int32 for int8
// weights (|sum| <= 128 * 127 * r < 2^31: exact, rounded once), fp32 for
// fp16 / bf16 (each product exact in fp32).
template <typename W>
__device__ __forceinline__ float column_dot(const float* codes, const W* col, int64_t r, int64_t stride) {
  if constexpr (std::is_same_v<W, int8_t>) {
    int32_t acc = 0;
    for (int64_t i = 0; i < r; ++i) acc += static_cast<int32_t>(codes[i]) * static_cast<int32_t>(col[i * stride]);
    return static_cast<float>(acc);
  } else {
    float acc = 0.f;
    for (int64_t i = 0; i < r; ++i) acc = fmaf(codes[i], to_float<W>(col[i * stride]), acc);
    return acc;
  }
}

// Shared memory: codes [r] fp32. One thread per (kv head, rotary pair j <
// d_rope / 2) computes both partners j and j + d_rope / 2, in the CPU
// kernel's order: ((sum) * w_uk_scale) * token_scale, then rotate-half.
template <typename W>
__global__ void __launch_bounds__(kThreads) rope_keys_append_kernel(const RopeKeysAppendParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row = blockIdx.x;
  const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[row]
                                       : static_cast<const int32_t*>(p.slot_mapping)[row];
  const int64_t pos = p.pos_is_int64 ? static_cast<const int64_t*>(p.positions)[row]
                                     : static_cast<const int32_t*>(p.positions)[row];
  // Padding (slot < 0) and, with the host check off, bad slots or positions:
  // skipped (the whole block returns: no barrier is left waiting).
  if (slot < 0 || slot >= p.num_slots || pos < 0 || pos >= p.rope_len) return;
  const int64_t r = p.r, n = p.d_rope, half = n / 2, d = p.d;
  float* codes = reinterpret_cast<float*>(smem);
  const uint8_t* src = p.cache.codes_of(slot);
  for (int64_t i = threadIdx.x; i < r; i += kThreads) {
    int c;
    if (p.bits == 8) c = reinterpret_cast<const int8_t*>(src)[i];
    else c = (i & 1) ? unpack_int4_hi(src[i / 2]) : unpack_int4_lo(src[i / 2]);
    codes[i] = static_cast<float>(c);
  }
  const float token_scale = *p.cache.scale_of(slot);
  __syncthreads();
  const W* w = static_cast<const W*>(p.w_uk);
  const float* cos_row = p.rope_cos + pos * n;
  const float* sin_row = p.rope_sin + pos * n;
  __half* dst = static_cast<__half*>(p.rope_keys) + slot * p.H_kv * n;
  for (int64_t e = threadIdx.x; e < p.H_kv * half; e += kThreads) {
    const int64_t h = e / half, j = e - h * half;
    const W* head = w + h * r * d;
    float lo = column_dot<W>(codes, head + j, r, d), hi = column_dot<W>(codes, head + j + half, r, d);
    if (p.w_uk_scale != nullptr) {
      lo = mul_rn(lo, p.w_uk_scale[h * d + j]);
      hi = mul_rn(hi, p.w_uk_scale[h * d + j + half]);
    }
    lo = mul_rn(lo, token_scale);
    hi = mul_rn(hi, token_scale);
    // rotate_half(k) = [-k_hi, k_lo]
    const float out_lo = __fsub_rn(mul_rn(lo, cos_row[j]), mul_rn(hi, sin_row[j]));
    const float out_hi = __fadd_rn(mul_rn(hi, cos_row[j + half]), mul_rn(lo, sin_row[j + half]));
    const __half o_lo = __float2half_rn(out_lo), o_hi = __float2half_rn(out_hi);
    if ((__hisinf(o_lo) && isfinite(out_lo)) || (__hisinf(o_hi) && isfinite(out_hi)))
      atomicMin(p.overflow, static_cast<int>(row));
    dst[h * n + j] = o_lo;
    dst[h * n + j + half] = o_hi;
  }
}

inline size_t rope_keys_append_smem(const RopeKeysAppendParams& p) { return 4 * static_cast<size_t>(p.r); }

template <typename W>
cudaError_t launch_rope_keys_append_typed(const RopeKeysAppendParams& p, cudaStream_t stream) {
  const size_t smem = rope_keys_append_smem(p);
  const cudaError_t err = allow_dynamic_smem(rope_keys_append_kernel<W>, smem);  // launch_util.cuh
  if (err != cudaSuccess) return err;
  rope_keys_append_kernel<W><<<static_cast<unsigned>(p.N), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

inline cudaError_t launch_rope_keys_append_impl(const RopeKeysAppendParams& p, cudaStream_t stream) {
  if (p.N < 0 || p.N > INT_MAX || p.r < 1 || p.H_kv < 1 || p.d_rope < 2 || (p.d_rope & 1) || p.d_rope > p.d ||
      (p.bits != 8 && p.bits != 4) || (p.bits == 4 && (p.r & 1)) || p.overflow == nullptr)
    return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;
  switch (p.weight_type) {
    case DType::kF16: return launch_rope_keys_append_typed<__half>(p, stream);
    case DType::kBF16: return launch_rope_keys_append_typed<__nv_bfloat16>(p, stream);
    case DType::kI8: return launch_rope_keys_append_typed<int8_t>(p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace latent_cache
}  // namespace qsvd
