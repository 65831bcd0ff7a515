// Fused Hadamard rotation (+ per-row quantization): one read of x, one write
// of the result. Torch-free; see hadamard_params.h for the interface and
// qsvd/hadamard.h for the arithmetic, which this reproduces bit for bit.
//
// Work split. K = m * N, N = 2^log_n. A row is handled by tpr = N / kEPT
// threads; thread t holds, for each of the m chunks a, the kEPT contiguous
// elements a * N + t * kEPT + [0, kEPT). The butterfly bits of b then fall
// into three groups, processed in ascending order as the spec requires:
//   - bits [0, log2 kEPT): inside the thread;
//   - the next log2(min(tpr, 32)) bits: warp shuffles;
//   - the rest (tpr > 32): through shared memory, in rounds of G register
//     slots, each column of `warps` values butterflied by one thread.
// The m-point base transform then runs inside each thread (its m chunks),
// with the signs of H_m folded in at compile time. Rows of one warp or less
// (tpr <= 32) share a 128-thread block (128 / tpr rows); a larger row gets a
// block of its own (tpr threads).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "qsvd/hadamard.h"
#include "qsvd/kernels/element.cuh"
#include "qsvd/kernels/hadamard_params.h"
#include "qsvd/numerics.h"

namespace qsvd {
namespace hadamard {
namespace detail {

// Shared-memory budget of one exchange round (floats): 32 KiB, under the
// 48 KiB that needs no opt-in on any architecture.
constexpr int kExchangeFloats = 8192;


// Widest access (16, 8, 4, 2 or 1 bytes) that divides a run of kBytes.
template <int kBytes>
constexpr int vector_bytes() {
  return kBytes % 16 == 0 ? 16 : kBytes % 8 == 0 ? 8 : kBytes % 4 == 0 ? 4 : kBytes % 2 == 0 ? 2 : 1;
}

// Move kN elements between global memory and registers: as kW-byte words
// when the caller proved the alignment (`vectorized`), else one element at
// a time (torch guarantees element alignment). memcpy between register
// arrays compiles to register moves.
template <typename T, int kN>
__device__ __forceinline__ void load_elements(const T* src, T (&dst)[kN], bool vectorized) {
  constexpr int kBytes = kN * static_cast<int>(sizeof(T));
  constexpr int kW = vector_bytes<kBytes>();
  using V = typename VectorOf<kW>::type;
  if (vectorized && kW > static_cast<int>(sizeof(T))) {
    V words[kBytes / kW];
#pragma unroll
    for (int i = 0; i < kBytes / kW; ++i) words[i] = reinterpret_cast<const V*>(src)[i];
    memcpy(dst, words, kBytes);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = src[i];
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_elements(T* dst, const T (&src)[kN], bool vectorized) {
  constexpr int kBytes = kN * static_cast<int>(sizeof(T));
  constexpr int kW = vector_bytes<kBytes>();
  using V = typename VectorOf<kW>::type;
  if (vectorized && kW > static_cast<int>(sizeof(T))) {
    V words[kBytes / kW];
    memcpy(words, src, kBytes);
#pragma unroll
    for (int i = 0; i < kBytes / kW; ++i) reinterpret_cast<V*>(dst)[i] = words[i];
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = src[i];
  }
}

template <typename T, int kN>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[kN], bool vectorized) {
  T e[kN];
  load_elements<T, kN>(src, e, vectorized);
#pragma unroll
  for (int i = 0; i < kN; ++i) dst[i] = to_float<T>(e[i]);
}

// The (kM, kEPT) configurations and the largest N each serves. The
// dispatch below picks, for a given m, the first one whose max_n >= N:
// enough elements per thread that a row fits one block (<= 1024 threads),
// few enough that m * kEPT values stay in registers.
template <int kM, int kEPT>
constexpr int config_max_n() {
  if constexpr (kM == 1) return kEPT <= 4 ? kEPT : (kEPT == 8 ? 8192 : 32768);
  if constexpr (kM == 12) return kEPT <= 2 ? kEPT : 2048;
  if constexpr (kM == 20 || kM == 28) return kEPT == 1 ? 1 : 1024;
  return 512;  // kM == 36, kEPT == 1
}

// Register slots per round of the shared-memory exchange: a compile-time
// constant (v stays in registers) sized so kG * (largest tpr) floats fit the
// exchange budget. The launcher sizes the dynamic shared memory from it.
template <int kM, int kEPT>
constexpr int exchange_slots();

// Block size bound for __launch_bounds__, so ptxas budgets registers for
// the block sizes this configuration really launches.
template <int kM, int kEPT>
constexpr int block_threads_bound() {
  constexpr int t = config_max_n<kM, kEPT>() / kEPT;
  return t > 128 ? t : 128;
}

template <int kM, int kEPT>
constexpr int exchange_slots() {
  constexpr int kV = kM * kEPT;
  constexpr int kFit = kExchangeFloats / block_threads_bound<kM, kEPT>();
  return kV < kFit ? kV : kFit;
}

struct KernelArgs {
  HadamardParams p;
  int log_n;
  bool vec_x, vec_signs, vec_out;
};

template <typename T, int kM, int kEPT>
__global__ void __launch_bounds__(block_threads_bound<kM, kEPT>(), 1)
    hadamard_kernel(const KernelArgs args) {
  constexpr int kV = kM * kEPT;
  constexpr unsigned kFull = 0xffffffffu;
  const HadamardParams& p = args.p;
  const int n = 1 << args.log_n;
  const int tpr = n / kEPT;  // threads per row, a power of two
  const int t = threadIdx.x & (tpr - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  // Threads past the last row still run (on zeros): every lane of a warp
  // must take part in the shuffles. They store nothing.
  const bool active = row < p.rows;

  // 1. Load, with the signs multiplied in.
  float v[kV];
  const T* x = static_cast<const T*>(p.x) + (active ? row : 0) * p.x_row_stride;
#pragma unroll
  for (int a = 0; a < kM; ++a) {
    const int64_t col = static_cast<int64_t>(a) * n + static_cast<int64_t>(t) * kEPT;
    float chunk[kEPT];
    if (active) {
      load_floats<T, kEPT>(x + col, chunk, args.vec_x);
    } else {
#pragma unroll
      for (int e = 0; e < kEPT; ++e) chunk[e] = 0.f;
    }
    if (p.signs != nullptr) {
      // Up to four signs at a time: a whole kEPT-wide copy would double the
      // live registers of the widest configuration.
      constexpr int kS = kEPT < 4 ? kEPT : 4;
#pragma unroll
      for (int e0 = 0; e0 < kEPT; e0 += kS) {
        float s[kS];
        load_floats<float, kS>(p.signs + col + e0, s, args.vec_signs);
#pragma unroll
        for (int e = 0; e < kS; ++e) chunk[e0 + e] = mul_rn(chunk[e0 + e], s[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < kEPT; ++e) v[a * kEPT + e] = chunk[e];
  }

  // 2a. Butterflies on the bits inside the thread.
#pragma unroll
  for (int h = 1; h < kEPT; h <<= 1)
#pragma unroll
    for (int a = 0; a < kM; ++a)
#pragma unroll
      for (int e = 0; e < kEPT; ++e)
        if (!(e & h)) {
          const float x0 = v[a * kEPT + e], x1 = v[a * kEPT + e + h];
          v[a * kEPT + e] = x0 + x1;
          v[a * kEPT + e + h] = x0 - x1;
        }

  // 2b. Bits across the lanes of a row group (row groups are aligned, so
  // lane ^ h stays in the row).
  const int lane_span = tpr < 32 ? tpr : 32;
  for (int h = 1; h < lane_span; h <<= 1) {
    const bool upper = (threadIdx.x & h) != 0;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const float other = __shfl_xor_sync(kFull, v[i], h);
      v[i] = upper ? other - v[i] : v[i] + other;
    }
  }

  // 2c. Bits across warps (then the block is exactly one row). Rounds of
  // kG register slots; kG is a compile-time constant so v stays in registers.
  extern __shared__ float exchange[];
  constexpr int kG = exchange_slots<kM, kEPT>();
  if (tpr > 32) {
    const int warps = tpr >> 5;
#pragma unroll
    for (int s0 = 0; s0 < kV; s0 += kG) {
      constexpr int kLast = kV;
#pragma unroll
      for (int s = s0; s < (s0 + kG < kLast ? s0 + kG : kLast); ++s) exchange[(s - s0) * tpr + threadIdx.x] = v[s];
      __syncthreads();
      const int columns = (kV - s0 < kG ? kV - s0 : kG) * 32;
      for (int u = threadIdx.x; u < columns; u += tpr) {
        float* column = exchange + (u >> 5) * tpr + (u & 31);
        for (int h = 1; h < warps; h <<= 1)
          for (int w = 0; w < warps; ++w)
            if (!(w & h)) {
              const float x0 = column[w * 32], x1 = column[(w + h) * 32];
              column[w * 32] = x0 + x1;
              column[(w + h) * 32] = x0 - x1;
            }
      }
      __syncthreads();
#pragma unroll
      for (int s = s0; s < (s0 + kG < kLast ? s0 + kG : kLast); ++s) v[s] = exchange[(s - s0) * tpr + threadIdx.x];
      if (s0 + kG < kV) __syncthreads();  // the next round overwrites the exchange
    }
  }

  // 3. The m-point base transform, signs known at compile time.
  if constexpr (kM > 1) {
    constexpr BaseMatrix<kM> H = make_base_matrix<kM>();
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      float column[kM];
#pragma unroll
      for (int a = 0; a < kM; ++a) column[a] = v[a * kEPT + e];
#pragma unroll
      for (int a = 0; a < kM; ++a) {
        float acc = 0.f;
#pragma unroll
        for (int ap = 0; ap < kM; ++ap) acc = H.v[ap][a] > 0 ? acc + column[ap] : acc - column[ap];
        v[a * kEPT + e] = acc;
      }
    }
  }

  // 4. Normalise.
#pragma unroll
  for (int i = 0; i < kV; ++i) v[i] = mul_rn(v[i], p.norm);

  const int64_t K = static_cast<int64_t>(kM) * n;
  if (p.kind == OutputKind::kRotated) {
    if (!active) return;
    T* out = static_cast<T*>(p.out) + row * K;
#pragma unroll
    for (int a = 0; a < kM; ++a) {
      T e[kEPT];
#pragma unroll
      for (int i = 0; i < kEPT; ++i) e[i] = from_float<T>(v[a * kEPT + i]);
      store_elements<T, kEPT>(out + static_cast<int64_t>(a) * n + static_cast<int64_t>(t) * kEPT, e, args.vec_out);
    }
    return;
  }

  // Quantize: row amax -> scale -> codes (qsvd/numerics.h rules).
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < kV; ++i) amax = nan_propagating_max(fabsf(v[i]), amax);
  for (int h = 1; h < lane_span; h <<= 1)
    amax = nan_propagating_max(__shfl_xor_sync(kFull, amax, h), amax);
  if (tpr > 32) {
    __shared__ float warp_amax[32];
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < (tpr >> 5); ++w) amax = nan_propagating_max(warp_amax[w], amax);
  }
  const bool int4 = p.kind == OutputKind::kInt4;
  const int qmax = int4 ? qmax_for_bits(4) : qmax_for_bits(8);
  const float scale = quant_scale(amax, p.clip_ratio, qmax);
  if (active && t == 0) p.scale[row] = scale;

  // Codes are computed chunk by chunk, right before their store, so no
  // second kV-sized array competes with v for registers.
  if (!int4) {
    if (!active) return;
    int8_t* out = static_cast<int8_t*>(p.out) + row * K;
#pragma unroll
    for (int a = 0; a < kM; ++a) {
      int8_t c[kEPT];
#pragma unroll
      for (int i = 0; i < kEPT; ++i) c[i] = static_cast<int8_t>(quantize_value(v[a * kEPT + i], scale, qmax));
      store_elements<int8_t, kEPT>(out + static_cast<int64_t>(a) * n + static_cast<int64_t>(t) * kEPT, c, args.vec_out);
    }
    return;
  }

  uint8_t* out = static_cast<uint8_t*>(p.out) + row * (K / 2);
  if constexpr (kEPT >= 2) {
    if (!active) return;
#pragma unroll
    for (int a = 0; a < kM; ++a) {
      uint8_t c[kEPT / 2];
#pragma unroll
      for (int i = 0; i < kEPT / 2; ++i)
        c[i] = pack_int4(quantize_value(v[a * kEPT + 2 * i], scale, qmax),
                         quantize_value(v[a * kEPT + 2 * i + 1], scale, qmax));
      store_elements<uint8_t, kEPT / 2>(out + (static_cast<int64_t>(a) * n + static_cast<int64_t>(t) * kEPT) / 2, c,
                                        args.vec_out);
    }
  } else {
    if (n >= 2) {
      // Element pairs (2i, 2i+1) sit in neighbouring threads.
#pragma unroll
      for (int a = 0; a < kM; ++a) {
        const int mine = quantize_value(v[a], scale, qmax);
        const int odd = __shfl_xor_sync(kFull, mine, 1);
        if (active && !(t & 1)) out[(static_cast<int64_t>(a) * n + t) / 2] = pack_int4(mine, odd);
      }
    } else {
      // N == 1: one thread holds the whole row, pairs are chunks (2i, 2i+1).
      if (!active) return;
#pragma unroll
      for (int a = 0; a + 1 < kM; a += 2)
        out[a / 2] = pack_int4(quantize_value(v[a], scale, qmax), quantize_value(v[a + 1], scale, qmax));
    }
  }
}

inline bool aligned_to(const void* ptr, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes)) == 0;
}

template <typename T, int kM, int kEPT>
cudaError_t launch_config(const HadamardParams& p, int log_n, cudaStream_t stream) {
  const int n = 1 << log_n;
  const int tpr = n / kEPT;
  // A row of more than one warp gets a block of its own (the shared-memory
  // exchange assumes it); smaller rows are packed 128 / tpr to a block.
  const int threads = tpr > 32 ? tpr : 128;
  const int rows_per_block = threads / tpr;
  const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  if (blocks > INT_MAX || threads > block_threads_bound<kM, kEPT>()) return cudaErrorInvalidConfiguration;

  KernelArgs args;
  args.p = p;
  args.log_n = log_n;
  const size_t smem = tpr > 32 ? static_cast<size_t>(exchange_slots<kM, kEPT>()) * tpr * sizeof(float) : 0;
  constexpr int kInBytes = vector_bytes<kEPT * static_cast<int>(sizeof(T))>();
  constexpr int kSignBytes = vector_bytes<(kEPT < 4 ? kEPT : 4) * 4>();
  args.vec_x = aligned_to(p.x, kInBytes) && (p.x_row_stride * static_cast<int64_t>(sizeof(T))) % kInBytes == 0;
  args.vec_signs = p.signs == nullptr || aligned_to(p.signs, kSignBytes);
  int out_bytes = 0;
  switch (p.kind) {
    case OutputKind::kRotated: out_bytes = vector_bytes<kEPT * static_cast<int>(sizeof(T))>(); break;
    case OutputKind::kInt8: out_bytes = vector_bytes<kEPT>(); break;
    case OutputKind::kInt4: out_bytes = kEPT >= 2 ? vector_bytes<(kEPT >= 2 ? kEPT / 2 : 1)>() : 1; break;
  }
  args.vec_out = aligned_to(p.out, out_bytes);
  hadamard_kernel<T, kM, kEPT><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_hadamard_impl(const HadamardParams& p, cudaStream_t stream) {
  const Factorization f = factorize(p.K);
  if (f.m == 0 || p.rows < 0) return cudaErrorInvalidValue;
  if (p.kind != OutputKind::kRotated && p.scale == nullptr) return cudaErrorInvalidValue;
  if (p.kind == OutputKind::kInt4 && (p.K & 1)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const int n = 1 << f.log_n;
  // Compiled variants (M, elements per thread): the first that serves n with
  // at least p.min_elems_per_thread elements per thread (a run-time knob; 0 =
  // the smallest, the built-in choice); if none does, the built-in choice.
  for (int min_ept = p.min_elems_per_thread > 0 ? p.min_elems_per_thread : 0;; min_ept = 0) {
#define QSVD_HADAMARD_TRY(M, EPT) \
  if ((EPT) >= min_ept && n >= (EPT) && n <= config_max_n<M, EPT>()) \
  return launch_config<T, M, EPT>(p, f.log_n, stream)
    switch (f.m) {
      case 1:
        QSVD_HADAMARD_TRY(1, 1);
        QSVD_HADAMARD_TRY(1, 2);
        QSVD_HADAMARD_TRY(1, 4);
        QSVD_HADAMARD_TRY(1, 8);
        QSVD_HADAMARD_TRY(1, 32);
        break;
      case 12:
        QSVD_HADAMARD_TRY(12, 1);
        QSVD_HADAMARD_TRY(12, 2);
        QSVD_HADAMARD_TRY(12, 4);
        break;
      case 20:
        QSVD_HADAMARD_TRY(20, 1);
        QSVD_HADAMARD_TRY(20, 2);
        break;
      case 28:
        QSVD_HADAMARD_TRY(28, 1);
        QSVD_HADAMARD_TRY(28, 2);
        break;
      case 36:
        QSVD_HADAMARD_TRY(36, 1);
        break;
      default:
        break;
    }
#undef QSVD_HADAMARD_TRY
    if (min_ept == 0) break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace hadamard
}  // namespace qsvd
