// Tensor-core split kernel of the CUDA latent_attention (decode), RoPE path.
// Torch-free. It replaces only the split kernel of latent_attention_kernel.cuh:
// same grid, same workspace (acc [r], M, l per (b, h, split)), same combine.
//
// Per CTA (split, kv head x head tile, sequence), per tile of T tokens
// (T in {16, 32, 48, 64}, a multiple of the wmma tile):
//   1. token metadata (slot, scale; invalid tokens: zero codes, score -inf);
//   2. codes of the tile -> shared memory as fp16 (bf16 for bf16 weights,
//      int8 for int8 weights; INT4 unpacked): exact, |code| <= 127. Columns
//      [r, round_up(r, 16)) are zero;
//   3. K~ [T, d] = codes [T, r16] x W_uk[kv] [r16, d] on tensor cores
//      (nvcuda::wmma m16n16k16), W_uk staged through shared memory 64 rows
//      at a time, rows >= r zero. fp16/bf16 weights: fp16/bf16 operands,
//      fp32 accumulators. int8 weights: int8 operands (codes row-major,
//      W_uk transposed to column-major while staged, both in blocks of 16 K
//      values: tc_i8_code_block_bytes), int32 accumulators, exact
//      (|sum| <= 128 * 128 * 8192 = 2^27), converted to fp32 once; their
//      per-channel scale multiplies the fp32 result in step 4. Each warp
//      owns up to 2 x 4 accumulator tiles of the [T, d] output; the result
//      is stored to shared memory as fp32;
//   4. on CUDA cores, fp32, as in the CUDA-core kernel: k = K~ w_uk_scale,
//      RoPE (rotate-half, position = absolute token index), x_t = s_t (q' . k)
//      for each query head of the tile, one warp per token;
//   5. online softmax with an integer running max (exact power-of-two
//      rescales), two tokens per lane;
//   6. acc_h += sum_t (p_t s_t) code_t in latent space, on CUDA cores (G r
//      MACs per token against the r d of the rebuild), thread j owning latent
//      columns j + 256 a.
//
// Numerics: both MMA operands are exact, so the rebuild differs from the
// CUDA-core kernel's only in how the r products are summed. fp16/bf16
// weights: tensor cores accumulate in fp32 with truncation rather than
// round-to-nearest, which the bound latent_attention_error_bound(kernel=
// "cuda_tc") in qsvd_kernels/testing.py accounts for (3 r16 u instead of
// r u on the score). int8 weights: the int32 sum is exact and rounds once
// to fp32 (1 u instead of r u). Every later step is the CUDA-core kernel's,
// operation for operation.
#pragma once

#include <mma.h>

#include <type_traits>

#include "qsvd/kernels/launch_util.cuh"
#include "qsvd/kernels/latent_attention_kernel.cuh"

namespace qsvd {
namespace latent {
namespace detail {

namespace wmma = nvcuda::wmma;

template <typename E>
__device__ __forceinline__ uint32_t int_to_elem_bits(int v);
template <>
__device__ __forceinline__ uint32_t int_to_elem_bits<__half>(int v) { return __half_as_ushort(__int2half_rn(v)); }
template <>
__device__ __forceinline__ uint32_t int_to_elem_bits<__nv_bfloat16>(int v) {
  return __bfloat16_as_ushort(__int2bfloat16_rn(v));
}


__device__ __forceinline__ int code_byte(uint32_t w, int k) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(w >> (8 * k))));
}

// Four int8 codes (byte k = element k) -> four elements of type E, packed
// in element order (8 bytes).
template <typename E>
__device__ __forceinline__ uint2 codes4_to_elems(uint32_t w) {
  return make_uint2(int_to_elem_bits<E>(code_byte(w, 0)) | (int_to_elem_bits<E>(code_byte(w, 1)) << 16),
                    int_to_elem_bits<E>(code_byte(w, 2)) | (int_to_elem_bits<E>(code_byte(w, 3)) << 16));
}

// Codes of the tile's rows -> codes_s [T, ldc] of type E, kVec bytes per
// global load (row_bytes and the row stride code_stride multiples of kVec,
// the cache base aligned to kVec: code_vector_bytes). Invalid rows (slot < 0) become zeros; columns >= r are
// not written (zeroed once by the caller). Stores are 8-byte aligned: ldc is
// a multiple of 8 elements and each chunk starts at a multiple of 4 codes.
template <int kBits, int kVec, typename E>
__device__ __forceinline__ void load_code_rows_elems(const uint8_t* __restrict__ cache, int64_t code_stride,
                                                     int64_t row_bytes, const int64_t* tok_slot, int T, E* codes_s,
                                                     int ldc) {
  const int chunks = static_cast<int>(row_bytes / kVec);
  const int total = T * chunks;
  constexpr int kCodesPerChunk = kVec * code_format(kBits).codes_per_byte;  // codes in kVec stored bytes
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int t = idx / chunks;
    const int c = idx - t * chunks;
    const int64_t slot = tok_slot[t];
    E* dst = codes_s + t * ldc + c * kCodesPerChunk;
    const uint8_t* src = slot >= 0 ? cache + slot * code_stride + static_cast<int64_t>(c) * kVec : cache;
    if constexpr (kVec == 16) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (slot >= 0) v = __ldg(reinterpret_cast<const uint4*>(src));
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (kBits == 8) {
          reinterpret_cast<uint2*>(dst)[k] = codes4_to_elems<E>(words[k]);
        } else {
          const uint2 u = unpack_int4_word(words[k]);
          reinterpret_cast<uint2*>(dst)[2 * k] = codes4_to_elems<E>(u.x);
          reinterpret_cast<uint2*>(dst)[2 * k + 1] = codes4_to_elems<E>(u.y);
        }
      }
    } else if constexpr (kVec == 4) {
      uint32_t v = 0u;
      if (slot >= 0) v = __ldg(reinterpret_cast<const uint32_t*>(src));
      if constexpr (kBits == 8) {
        *reinterpret_cast<uint2*>(dst) = codes4_to_elems<E>(v);
      } else {
        const uint2 u = unpack_int4_word(v);
        reinterpret_cast<uint2*>(dst)[0] = codes4_to_elems<E>(u.x);
        reinterpret_cast<uint2*>(dst)[1] = codes4_to_elems<E>(u.y);
      }
    } else {
      const uint8_t v = slot >= 0 ? __ldg(src) : static_cast<uint8_t>(0);
      uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
      if constexpr (kBits == 8) {
        d16[0] = static_cast<uint16_t>(int_to_elem_bits<E>(static_cast<int8_t>(v)));
      } else {
        d16[0] = static_cast<uint16_t>(int_to_elem_bits<E>(unpack_int4_lo(v)));
        d16[1] = static_cast<uint16_t>(int_to_elem_bits<E>(unpack_int4_hi(v)));
      }
    }
  }
}

template <int kBits, typename E>
__device__ __forceinline__ void load_codes_elems(const LatentAttentionParams& p, int vec, const int64_t* tok_slot,
                                                 int T, E* codes_s, int ldc) {
  const uint8_t* cache = p.cache.codes;
  const int64_t stride = p.cache.code_stride;
  const int64_t row_bytes = code_row_bytes(kBits, p.r);
  if (vec == 16)
    load_code_rows_elems<kBits, 16, E>(cache, stride, row_bytes, tok_slot, T, codes_s, ldc);
  else if (vec == 4)
    load_code_rows_elems<kBits, 4, E>(cache, stride, row_bytes, tok_slot, T, codes_s, ldc);
  else
    load_code_rows_elems<kBits, 1, E>(cache, stride, row_bytes, tok_slot, T, codes_s, ldc);
}

// Eight consecutive fp16/bf16 weights (16-byte aligned) -> eight MMA
// operands of the same type (16 bytes).
template <typename W, typename E>
__device__ __forceinline__ uint4 weights8_to_elems(const W* src);
template <>
__device__ __forceinline__ uint4 weights8_to_elems<__half, __half>(const __half* src) {
  return __ldg(reinterpret_cast<const uint4*>(src));
}
template <>
__device__ __forceinline__ uint4 weights8_to_elems<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16* src) {
  return __ldg(reinterpret_cast<const uint4*>(src));
}

// Codes of the tile's rows -> codes_s as int8 in column blocks of 16
// (tc_i8_code_index; INT4 unpacked), kVec bytes per global load as in
// load_code_rows_elems. Invalid rows (slot < 0) become zeros; columns >= r
// are not written (zeroed once by the caller). A chunk never straddles a
// block: 16 int8 codes at a multiple of 16 (kVec 16), or 32 INT4 codes, two
// whole blocks; 4 or 8 codes at a multiple of 4 or 8 (kVec 4, stores 4- and
// 8-byte aligned); 1 or 2 codes (kVec 1).
template <int kBits, int kVec>
__device__ __forceinline__ void load_code_rows_i8_blocks(const uint8_t* __restrict__ cache, int64_t code_stride,
                                                         int64_t row_bytes, const int64_t* tok_slot, int T,
                                                         int8_t* codes_s, int code_block) {
  const int chunks = static_cast<int>(row_bytes / kVec);
  const int total = T * chunks;
  constexpr int kCodesPerChunk = kVec * code_format(kBits).codes_per_byte;  // codes in kVec stored bytes
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int t = idx / chunks;
    const int c = idx - t * chunks;
    const int64_t slot = tok_slot[t];
    int8_t* dst = codes_s + tc_i8_code_index(t, c * kCodesPerChunk, code_block);
    const uint8_t* src = slot >= 0 ? cache + slot * code_stride + static_cast<int64_t>(c) * kVec : cache;
    if constexpr (kVec == 16) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (slot >= 0) v = __ldg(reinterpret_cast<const uint4*>(src));
      if constexpr (kBits == 8) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        const uint2 a = unpack_int4_word(v.x), b = unpack_int4_word(v.y);
        const uint2 e = unpack_int4_word(v.z), f = unpack_int4_word(v.w);
        *reinterpret_cast<uint4*>(dst) = make_uint4(a.x, a.y, b.x, b.y);               // codes 32c .. 32c + 15
        *reinterpret_cast<uint4*>(dst + code_block) = make_uint4(e.x, e.y, f.x, f.y);  // the next block
      }
    } else if constexpr (kVec == 4) {
      uint32_t v = 0u;
      if (slot >= 0) v = __ldg(reinterpret_cast<const uint32_t*>(src));
      if constexpr (kBits == 8) {
        *reinterpret_cast<uint32_t*>(dst) = v;
      } else {
        *reinterpret_cast<uint2*>(dst) = unpack_int4_word(v);
      }
    } else {
      const uint8_t v = slot >= 0 ? __ldg(src) : static_cast<uint8_t>(0);
      if constexpr (kBits == 8) {
        dst[0] = static_cast<int8_t>(v);
      } else {
        dst[0] = static_cast<int8_t>(unpack_int4_lo(v));
        dst[1] = static_cast<int8_t>(unpack_int4_hi(v));
      }
    }
  }
}

template <int kBits>
__device__ __forceinline__ void load_codes_i8_blocks(const LatentAttentionParams& p, int vec, const int64_t* tok_slot,
                                                     int T, int8_t* codes_s, int code_block) {
  const uint8_t* cache = p.cache.codes;
  const int64_t stride = p.cache.code_stride;
  const int64_t row_bytes = code_row_bytes(kBits, p.r);
  if (vec == 16)
    load_code_rows_i8_blocks<kBits, 16>(cache, stride, row_bytes, tok_slot, T, codes_s, code_block);
  else if (vec == 4)
    load_code_rows_i8_blocks<kBits, 4>(cache, stride, row_bytes, tok_slot, T, codes_s, code_block);
  else
    load_code_rows_i8_blocks<kBits, 1>(cache, stride, row_bytes, tok_slot, T, codes_s, code_block);
}

// ---------------------------------------------------------------------------
// RoPE split kernel on tensor cores. Shared memory: rope_tc_layout
// (latent_attention_params.h).
template <int kBits, typename W>
__global__ void __launch_bounds__(kThreads, 1) latent_split_rope_tc_kernel(const LatentAttentionParams p, int vec) {
  // MMA operands of the weights' own type (codes are exact in fp16, bf16
  // and int8); int8 weights run INT8 MMA with exact int32 accumulators.
  using E = W;
  constexpr bool kI8Mma = std::is_same_v<W, int8_t>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, E,
                                std::conditional_t<kI8Mma, wmma::col_major, wmma::row_major>>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, std::conditional_t<kI8Mma, int, float>>;
  extern __shared__ __align__(128) unsigned char smem_tc[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, b = blockIdx.z;
  const int tiles = head_tiles(p);
  const int kv = blockIdx.y / tiles, tile = blockIdx.y - kv * tiles;
  const int G = p.H / p.H_kv, HT = p.heads_per_cta, T = p.tile_tokens;
  const int g0 = tile * HT;
  const int hc = min(HT, G - g0);  // heads of this CTA
  const int h0 = kv * G + g0;
  const int r = p.r, d = p.d;
  const int rk = static_cast<int>(round_up(r, 16));   // MMA depth: r padded with zero codes / zero weight rows
  const int ldc = static_cast<int>(tc_code_stride(r)), ldw = d + 8, ldk = d + 4;
  const int code_block = static_cast<int>(tc_i8_code_block_bytes(T));  // int8: bytes per 16-column block of codes_s
  const int w_block = static_cast<int>(tc_i8_weight_block_bytes(d));   // int8: bytes per 16-row block of w_s

  // L clamped to what block_table and the RoPE table can address.
  int64_t L = p.seq_lens[b];
  const int64_t capacity = p.max_blocks * p.block_size;
  L = L < 0 ? 0 : (L > capacity ? capacity : L);
  if (L > p.rope_len) L = p.rope_len;
  const int64_t start = static_cast<int64_t>(split) * p.split_tokens;
  const int64_t end = min(start + p.split_tokens, L);
  const int64_t ml_base = (static_cast<int64_t>(b) * p.H + h0) * p.splits + split;  // + g * splits

  if (start >= L) {  // empty split: max -inf (the combine skips it)
    if (tid < hc) {
      p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2] = -INFINITY;
      p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2 + 1] = 0.f;
    }
    return;
  }

  const RopeTcLayout lay = rope_tc_layout(r, d, HT, T, kI8Mma);
  E* codes_s = reinterpret_cast<E*>(smem_tc + lay.codes);      // [T, ldc]; int8: column blocks of code_block bytes
  E* w_s = reinterpret_cast<E*>(smem_tc + lay.w);              // [64, ldw]; int8: column-major B tiles (w_block)
  float* k_s = reinterpret_cast<float*>(smem_tc + lay.k);      // [T, ldk]; int8: int32 until converted in place
  float* q_s = reinterpret_cast<float*>(smem_tc + lay.q);      // [HT, d]: q * score_scale
  float* xs = reinterpret_cast<float*>(smem_tc + lay.xs);      // [16, T]: scores, then weights p_t s_t
  float* ws_s = reinterpret_cast<float*>(smem_tc + lay.ws);    // [d]: w_uk_scale[kv], or 1
  float* tok_scale = reinterpret_cast<float*>(smem_tc + lay.tok_scale);
  int64_t* tok_slot = reinterpret_cast<int64_t*>(smem_tc + lay.tok_slot);
  float* m_s = reinterpret_cast<float*>(smem_tc + lay.mlf);
  float* l_s = m_s + kMaxHeadsPerCta;
  float* f_s = l_s + kMaxHeadsPerCta;

  // Query side, weight scales, zero code padding, softmax state.
  for (int idx = tid; idx < HT * d; idx += kThreads) {
    const int g = idx / d, j = idx - g * d;
    float v = 0.f;
    if (g < hc) v = __fmul_rn(p.q[(static_cast<int64_t>(b) * p.H + h0 + g) * d + j], p.score_scale);
    q_s[idx] = v;
  }
  for (int j = tid; j < d; j += kThreads)
    ws_s[j] = p.w_uk_scale != nullptr ? p.w_uk_scale[static_cast<int64_t>(kv) * d + j] : 1.f;
  if constexpr (kI8Mma) {
    for (int idx = tid; idx < T * (rk - r); idx += kThreads) {
      const int t = idx / (rk - r);
      codes_s[tc_i8_code_index(t, r + (idx - t * (rk - r)), code_block)] = 0;
    }
  } else {
    uint16_t* code_bits = reinterpret_cast<uint16_t*>(codes_s);  // +0 is all-zero bits in fp16 and bf16
    for (int idx = tid; idx < T * (ldc - r); idx += kThreads) {
      const int t = idx / (ldc - r);
      code_bits[t * ldc + r + (idx - t * (ldc - r))] = 0;
    }
  }
  if (tid < kMaxHeadsPerCta) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    f_s[tid] = 1.f;
  }

  const int slots_per_head = (r + kThreads - 1) / kThreads;
  float acc[kMaxAccSlots];
#pragma unroll
  for (int e = 0; e < kMaxAccSlots; ++e) acc[e] = 0.f;

  const int32_t* block_row = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
  const W* w_uk = static_cast<const W*>(p.w_uk) + static_cast<int64_t>(kv) * r * d;

  // Warp grid over the [T, d] output of the rebuild, in 16 x 16 tiles: MT x NT
  // tiles, warps arranged WGM x WGN; warp (wm, wn) owns tile rows wm + WGM a
  // (a < 2) and columns wn + WGN c (c < 4). MT <= 4 and NT <= 16 are covered.
  const int MT = T / 16, NT = d / 16;
  const int WGM = MT >= 2 ? 2 : 1, WGN = kWarps / WGM;
  const int wm = warp % WGM, wn = warp / WGM;
  const int d8 = d / 8;    // 8-element vectors per weight row (fp16/bf16)
  const int d4 = d / 4;    // 4-column groups per weight row (int8)

  for (int64_t t0 = start; t0 < end; t0 += T) {
    // 1. Token metadata. Every index is guarded: t < L <= max_blocks * block_size.
    if (tid < T) {
      const int64_t t = t0 + tid;
      int64_t slot = -1;
      float scale = 0.f;
      if (t < end) {
        const int64_t blk = block_row[t / p.block_size];
        if (blk >= 0 && blk < p.num_blocks) {
          slot = blk * p.block_size + t % p.block_size;
          scale = *p.cache.scale_of(slot);
        }
      }
      tok_slot[tid] = slot;
      tok_scale[tid] = scale;
    }
    __syncthreads();
    // 2. Codes (the first barrier of step 3 orders them before the MMAs).
    if constexpr (kI8Mma)
      load_codes_i8_blocks<kBits>(p, vec, tok_slot, T, codes_s, code_block);
    else
      load_codes_elems<kBits, E>(p, vec, tok_slot, T, codes_s, ldc);

    // 3. K~ = codes W_uk on tensor cores, in chunks of kTcWeightChunkRows rows.
    FragC kf[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) wmma::fill_fragment(kf[a][c], 0);
    for (int k0 = 0; k0 < rk; k0 += kTcWeightChunkRows) {
      __syncthreads();  // codes are written; the previous chunk's readers are done
      if constexpr (kI8Mma) {
        // Transposed to column-major B tiles: thread (ks, nq) reads chunk rows
        // 16 ks .. 16 ks + 15 of columns 4 nq .. 4 nq + 3 (4-byte loads,
        // coalesced across nq; d % 16 == 0 and w_uk 16-byte aligned), turns
        // each 4 x 4 byte block around with byte permutes and writes each
        // column's 16 weights as one 16-byte store.
        for (int idx = tid; idx < (kTcWeightChunkRows / 16) * d4; idx += kThreads) {
          const int ks = idx / d4, nq = idx - ks * d4;
          uint32_t rows[16];  // rows[kk] byte m: W[k0 + 16 ks + kk, 4 nq + m]; 0 past r
#pragma unroll
          for (int kk = 0; kk < 16; ++kk) {
            const int k = k0 + 16 * ks + kk;
            rows[kk] = 0u;
            if (k < r) rows[kk] = __ldg(reinterpret_cast<const uint32_t*>(w_uk + static_cast<int64_t>(k) * d + 4 * nq));
          }
          uint32_t cols[4][4];  // cols[m][q] byte j: W[k0 + 16 ks + 4 q + j, 4 nq + m]
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint32_t ab_lo = __byte_perm(rows[4 * q], rows[4 * q + 1], 0x5140);      // a0 b0 a1 b1
            const uint32_t ab_hi = __byte_perm(rows[4 * q], rows[4 * q + 1], 0x7362);      // a2 b2 a3 b3
            const uint32_t cd_lo = __byte_perm(rows[4 * q + 2], rows[4 * q + 3], 0x5140);  // c0 d0 c1 d1
            const uint32_t cd_hi = __byte_perm(rows[4 * q + 2], rows[4 * q + 3], 0x7362);  // c2 d2 c3 d3
            cols[0][q] = __byte_perm(ab_lo, cd_lo, 0x5410);  // a0 b0 c0 d0
            cols[1][q] = __byte_perm(ab_lo, cd_lo, 0x7632);  // a1 b1 c1 d1
            cols[2][q] = __byte_perm(ab_hi, cd_hi, 0x5410);  // a2 b2 c2 d2
            cols[3][q] = __byte_perm(ab_hi, cd_hi, 0x7632);  // a3 b3 c3 d3
          }
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int n = 4 * nq + m;
            *reinterpret_cast<uint4*>(w_s + ks * w_block + (n >> 4) * kTcI8WeightTileBytes + 16 * (n & 15)) =
                make_uint4(cols[m][0], cols[m][1], cols[m][2], cols[m][3]);
          }
        }
      } else {
        for (int idx = tid; idx < kTcWeightChunkRows * d8; idx += kThreads) {
          const int row = idx / d8, c8 = idx - row * d8;
          uint4 v = make_uint4(0u, 0u, 0u, 0u);
          if (k0 + row < r) v = weights8_to_elems<W, E>(w_uk + static_cast<int64_t>(k0 + row) * d + 8 * c8);
          *reinterpret_cast<uint4*>(w_s + row * ldw + 8 * c8) = v;
        }
      }
      __syncthreads();
      const int ksteps = min(kTcWeightChunkRows, rk - k0) / 16;
      for (int ks = 0; ks < ksteps; ++ks) {
        FragA fa[2];
        FragB fb[4];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const int mt = wm + WGM * a;
          if constexpr (kI8Mma) {  // block k0 / 16 + ks, rows 16 mt ..: 16 bytes a row
            if (mt < MT) wmma::load_matrix_sync(fa[a], codes_s + (k0 / 16 + ks) * code_block + 256 * mt, 16);
          } else {
            if (mt < MT) wmma::load_matrix_sync(fa[a], codes_s + 16 * mt * ldc + k0 + 16 * ks, ldc);
          }
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int nt = wn + WGN * c;
          if constexpr (kI8Mma) {  // k-block ks, column tile nt: 16 bytes a column
            if (nt < NT) wmma::load_matrix_sync(fb[c], w_s + ks * w_block + nt * kTcI8WeightTileBytes, 16);
          } else {
            if (nt < NT) wmma::load_matrix_sync(fb[c], w_s + 16 * ks * ldw + 16 * nt, ldw);
          }
        }
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (wm + WGM * a < MT && wn + WGN * c < NT) wmma::mma_sync(kf[a][c], fa[a], fb[c], kf[a][c]);
      }
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int mt = wm + WGM * a, nt = wn + WGN * c;
        if (mt < MT && nt < NT) {
          if constexpr (kI8Mma) {
            // Exact int32 sums, rounded once to fp32 in place by the warp that stored them.
            int* k_tile = reinterpret_cast<int*>(k_s + 16 * mt * ldk + 16 * nt);
            wmma::store_matrix_sync(k_tile, kf[a][c], ldk, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
              const int at = (e >> 4) * ldk + (e & 15);
              reinterpret_cast<float*>(k_tile)[at] = __int2float_rn(k_tile[at]);
            }
          } else {
            wmma::store_matrix_sync(k_s + 16 * mt * ldk + 16 * nt, kf[a][c], ldk, wmma::mem_row_major);
          }
        }
      }
    __syncthreads();

    // 4. Scores (log2 units), one warp per token: k = K~ ws, RoPE, q' . k, times s_t.
    const int half = d / 2;
    for (int t = warp; t < T; t += kWarps) {
      if (tok_slot[t] >= 0) {
        float part[kMaxHeadsPerCta];
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerCta; ++g) part[g] = 0.f;
        const float* cos_row = p.rope_cos + (t0 + t) * d;
        const float* sin_row = p.rope_sin + (t0 + t) * d;
        const float* k_row = k_s + t * ldk;
        for (int j = lane; j < d; j += 32) {
          const int jo = j < half ? j + half : j - half;
          const float kj = __fmul_rn(k_row[j], ws_s[j]);
          const float ko = __fmul_rn(k_row[jo], ws_s[jo]);
          const float rot = j < half ? -ko : ko;
          const float kr = __fadd_rn(__fmul_rn(kj, __ldg(cos_row + j)), __fmul_rn(rot, __ldg(sin_row + j)));
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g)
            if (g < hc) part[g] = fmaf(q_s[g * d + j], kr, part[g]);
        }
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerCta; ++g)
          if (g < hc) part[g] = warp_sum(part[g]);
        if (lane == 0) {
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g)
            if (g < hc) xs[g * T + t] = __fmul_rn(tok_scale[t], part[g]);
        }
      } else if (lane == 0) {
        for (int g = 0; g < hc; ++g) xs[g * T + t] = -INFINITY;
      }
    }
    __syncthreads();

    // 5. Online softmax, one warp per head, tokens lane and lane + 32.
    for (int g = warp; g < hc; g += kWarps) {
      const float x0 = lane < T ? xs[g * T + lane] : -INFINITY;
      const float x1 = lane + 32 < T ? xs[g * T + lane + 32] : -INFINITY;
      const float m_old = m_s[g];
      float m_new = fmaxf(m_old, ceilf(warp_max(fmaxf(x0, x1))));
      // NaN scores with no finite max so far: a finite max keeps the partial
      // visible to the combine, and exp2f turns l and acc NaN (as in the
      // CUDA-core kernel).
      if (m_new == -INFINITY && __any_sync(0xffffffffu, x0 != x0 || x1 != x1)) m_new = 0.f;
      float p0 = 0.f, p1 = 0.f, factor = 1.f;
      if (m_new != -INFINITY) {
        p0 = exp2f(x0 - m_new);
        p1 = exp2f(x1 - m_new);
        factor = pow2_nonpositive(m_old - m_new);
      }
      const float tile_sum = warp_sum(__fadd_rn(p0, p1));
      if (lane < T) xs[g * T + lane] = __fmul_rn(p0, tok_scale[lane]);
      if (lane + 32 < T) xs[g * T + lane + 32] = __fmul_rn(p1, tok_scale[lane + 32]);
      if (lane == 0) {
        l_s[g] = __fadd_rn(__fmul_rn(l_s[g], factor), tile_sum);
        m_s[g] = m_new;
        f_s[g] = factor;
      }
    }
    __syncthreads();

    // 6. acc[g, i] = acc[g, i] 2^(M_old - M_new) + sum_t (p_t s_t) code[t, i].
#pragma unroll
    for (int e = 0; e < kMaxAccSlots; ++e) {
      const int a = e / HT, g = e - a * HT;
      const int i = tid + a * kThreads;
      if (a < slots_per_head && g < hc && i < r) {
        const float* w = xs + g * T;
        const E* col = codes_s + (kI8Mma ? tc_i8_code_index(0, i, code_block) : i);
        const int code_step = kI8Mma ? 16 : ldc;  // elements from token t to t + 1 in column i
        float v = __fmul_rn(acc[e], f_s[g]);
        for (int t = 0; t < T; ++t) v = fmaf(w[t], to_float<E>(col[t * code_step]), v);
        acc[e] = v;
      }
    }
    // The next tile writes codes_s, xs and f_s only after its first barrier.
  }

  // Partial of each head: acc [r], M, l.
#pragma unroll
  for (int e = 0; e < kMaxAccSlots; ++e) {
    const int a = e / HT, g = e - a * HT;
    const int i = tid + a * kThreads;
    if (a < slots_per_head && g < hc && i < r)
      p.part_acc[(ml_base + static_cast<int64_t>(g) * p.splits) * r + i] = acc[e];
  }
  if (tid < hc) {
    p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2] = m_s[tid];
    p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2 + 1] = l_s[tid];
  }
}

template <int kBits, typename W>
cudaError_t launch_split_rope_tc(const LatentAttentionParams& p, cudaStream_t stream) {
  auto kernel = latent_split_rope_tc_kernel<kBits, W>;
  const cudaError_t err = allow_dynamic_smem(kernel, p.split_smem);  // launch_util.cuh
  if (err != cudaSuccess) return err;
  const dim3 grid(p.splits, p.H_kv * head_tiles(p), p.B);
  kernel<<<grid, kThreads, p.split_smem, stream>>>(p, code_vector_bytes(p));
  return cudaGetLastError();
}

template <typename W>
cudaError_t launch_split_rope_tc_bits(const LatentAttentionParams& p, cudaStream_t stream) {
  return p.bits == 4 ? launch_split_rope_tc<4, W>(p, stream) : launch_split_rope_tc<8, W>(p, stream);
}

// ---------------------------------------------------------------------------
// No-RoPE split kernel on tensor cores (plan and limits: plan_latent_attention_tc).
//
// CTA (split, head tile of 16 heads x latent slice, sequence); per tile of T
// tokens:
//   1-2. token metadata and fp16 codes [T, ldc] as in the RoPE kernel;
//   3. S [16, T] = (Q_hi + Q_lo) codes^T: Q_hi + Q_lo is q_lat 2^e_h split
//      into two fp16 matrices (made once per CTA), e_h a per-head power of
//      two that puts max |q_lat_h| in [2^14, 2^15) (no fp16 overflow). The
//      r16 / 16 k-steps are cut among the warps sharing a 16-token column
//      tile; their fp32 partials are added in a fixed order (step 4);
//   4. x_t = s_t (S 2^-e_h) (the power of two is exact), -inf for invalid tokens;
//   5. online softmax as in the CUDA-core kernel; the weights w_t = p_t s_t of
//      the tile, times 2^f_h (max |w| in [2^14, 2^15)), split into fp16
//      P_hi + P_lo;
//   6. V [16, slice] = (P_hi + P_lo) codes [T, slice] on tensor cores, stored
//      to shared memory as fp32;
//   7. acc = acc 2^(M_old - M_new) + V 2^-f_h in fp32 on CUDA cores (both
//      factors exact powers of two), so tensor-core accumulation spans one
//      tile only.
// A split x = hi + lo of an fp32 x with |x| < 2^15 is within 2^-22 |x| + 2^-25
// of x (fp16 keeps 11 bits of x, then 11 of the remainder; 2^-25 is half the
// fp16 subnormal spacing). The bound that counts all of it:
// latent_attention_error_bound(kernel="cuda_tc") in qsvd_kernels/testing.py.

// fp16 hi + lo of v; a non-finite hi gets lo = 0 (so inf stays inf).
__device__ __forceinline__ void split_hi_lo(float v, __half* hi, __half* lo) {
  const __half h = __float2half_rn(v);
  const float hf = __half2float(h);
  *hi = h;
  *lo = isfinite(hf) ? __float2half_rn(__fsub_rn(v, hf)) : __ushort_as_half(0);
}

// e with max_abs 2^e in [2^14, 2^15) for a finite max_abs > 0; 0 otherwise.
__device__ __forceinline__ int fp16_prescale_exponent(float max_abs) {
  if (!(max_abs > 0.f) || !isfinite(max_abs)) return 0;
  int E = 0;
  frexpf(max_abs, &E);  // max_abs in [2^(E-1), 2^E)
  return 15 - E;
}

__device__ __forceinline__ float finite_abs_or_zero(float v) { return isfinite(v) ? fabsf(v) : 0.f; }

template <int kBits>
__global__ void __launch_bounds__(kThreads, 1) latent_split_norope_tc_kernel(const LatentAttentionParams p, int vec) {
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
  using FragCodesT = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major>;  // codes^T [r, T]
  using FragCodes = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major>;   // codes [T, r]
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  extern __shared__ __align__(128) unsigned char smem_tc_norope[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, b = blockIdx.z;
  const int head_tile = blockIdx.y / p.r_slices, slice = blockIdx.y - head_tile * p.r_slices;
  const int h0 = head_tile * kTcHeadTile;
  const int hc = min(kTcHeadTile, p.H - h0);  // heads of this CTA; rows hc..15 of Q and P are zero
  const int r = p.r, T = p.tile_tokens, RS = p.slice_cols;
  const int rk = static_cast<int>(round_up(r, 16));
  const int ldc = static_cast<int>(tc_code_stride(r)), ldp = T + 8, ldv = RS + 4;
  const int i0 = slice * RS;                      // first latent column of this CTA (< rk: see the plan)
  const int col_tiles = min(RS, rk - i0) / 16;    // 16-column tiles of the slice inside r16

  int64_t L = p.seq_lens[b];
  const int64_t capacity = p.max_blocks * p.block_size;
  L = L < 0 ? 0 : (L > capacity ? capacity : L);
  const int64_t start = static_cast<int64_t>(split) * p.split_tokens;
  const int64_t end = min(start + p.split_tokens, L);
  const int64_t ml_base = (static_cast<int64_t>(b) * p.H + h0) * p.splits + split;  // + g * splits

  if (start >= L) {  // empty split: max -inf (the combine skips it and never reads its acc)
    if (slice == 0 && tid < hc) {
      p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2] = -INFINITY;
      p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2 + 1] = 0.f;
    }
    return;
  }

  const NoropeTcLayout lay = norope_tc_layout(r, RS, T);
  __half* codes_s = reinterpret_cast<__half*>(smem_tc_norope + lay.codes);  // [T, ldc]
  __half* q_hi = reinterpret_cast<__half*>(smem_tc_norope + lay.q_hi);      // [16, ldc]
  __half* q_lo = reinterpret_cast<__half*>(smem_tc_norope + lay.q_lo);
  __half* p_hi = reinterpret_cast<__half*>(smem_tc_norope + lay.p_hi);      // [16, ldp]
  __half* p_lo = reinterpret_cast<__half*>(smem_tc_norope + lay.p_lo);
  float* s_part = reinterpret_cast<float*>(smem_tc_norope + lay.s_part);    // [warp][16, 16]
  float* xs = reinterpret_cast<float*>(smem_tc_norope + lay.xs);            // [16, T]
  float* pv_s = reinterpret_cast<float*>(smem_tc_norope + lay.pv);          // [16, ldv]
  int* q_exp = reinterpret_cast<int*>(smem_tc_norope + lay.q_exp);
  int* p_exp = reinterpret_cast<int*>(smem_tc_norope + lay.p_exp);
  float* tok_scale = reinterpret_cast<float*>(smem_tc_norope + lay.tok_scale);
  int64_t* tok_slot = reinterpret_cast<int64_t*>(smem_tc_norope + lay.tok_slot);
  float* m_s = reinterpret_cast<float*>(smem_tc_norope + lay.mlf);
  float* l_s = m_s + kTcHeadTile;
  float* f_s = l_s + kTcHeadTile;

  // Q_hi + Q_lo = q_lat 2^e_h, one warp per head; zero code padding; zero P
  // (rows of absent heads stay zero); softmax state.
  for (int g = warp; g < kTcHeadTile; g += kWarps) {
    const float* q_row = p.q_lat + (static_cast<int64_t>(b) * p.H + h0 + (g < hc ? g : 0)) * r;
    float q_max = 0.f;
    if (g < hc)
      for (int i = lane; i < r; i += 32) q_max = fmaxf(q_max, finite_abs_or_zero(q_row[i]));
    const int e = fp16_prescale_exponent(warp_max(q_max));
    if (lane == 0) q_exp[g] = e;
    for (int i = lane; i < ldc; i += 32) {
      const float v = g < hc && i < r ? ldexpf(q_row[i], e) : 0.f;
      split_hi_lo(v, q_hi + g * ldc + i, q_lo + g * ldc + i);
    }
  }
  uint16_t* code_bits = reinterpret_cast<uint16_t*>(codes_s);
  for (int idx = tid; idx < T * (ldc - r); idx += kThreads) {
    const int t = idx / (ldc - r);
    code_bits[t * ldc + r + (idx - t * (ldc - r))] = 0;
  }
  for (int idx = tid; idx < kTcHeadTile * ldp; idx += kThreads) {
    p_hi[idx] = __ushort_as_half(0);
    p_lo[idx] = __ushort_as_half(0);
  }
  if (tid < kTcHeadTile) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    f_s[tid] = 1.f;
  }

  // Latent accumulator: thread tid owns element tid + 256 e of the [16, RS]
  // tile, i.e. head (tid + 256 e) / RS, column (tid + 256 e) % RS.
  float acc[kMaxAccSlots];
#pragma unroll
  for (int e = 0; e < kMaxAccSlots; ++e) acc[e] = 0.f;

  const int32_t* block_row = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
  // Scores: NT column tiles of 16 tokens, each shared by KP warps that split the k-steps.
  const int NT = T / 16, KP = kWarps / NT, KS = rk / 16, KT = T / 16;

  for (int64_t t0 = start; t0 < end; t0 += T) {
    // 1. Token metadata (as in the CUDA-core kernel).
    if (tid < T) {
      const int64_t t = t0 + tid;
      int64_t slot = -1;
      float scale = 0.f;
      if (t < end) {
        const int64_t blk = block_row[t / p.block_size];
        if (blk >= 0 && blk < p.num_blocks) {
          slot = blk * p.block_size + t % p.block_size;
          scale = *p.cache.scale_of(slot);
        }
      }
      tok_slot[tid] = slot;
      tok_scale[tid] = scale;
    }
    __syncthreads();
    // 2. Codes as fp16.
    load_codes_elems<kBits, __half>(p, vec, tok_slot, T, codes_s, ldc);
    __syncthreads();

    // 3. Partial scores of warp (nt, kp): k-steps [kp KS / KP, (kp + 1) KS / KP).
    if (warp < NT * KP) {
      const int nt = warp % NT, kp = warp / NT;
      FragC sf;
      wmma::fill_fragment(sf, 0.f);
      for (int ks = kp * KS / KP; ks < (kp + 1) * KS / KP; ++ks) {
        FragCodesT fb;
        FragA fa;
        wmma::load_matrix_sync(fb, codes_s + 16 * nt * ldc + 16 * ks, ldc);
        wmma::load_matrix_sync(fa, q_hi + 16 * ks, ldc);
        wmma::mma_sync(sf, fa, fb, sf);
        wmma::load_matrix_sync(fa, q_lo + 16 * ks, ldc);
        wmma::mma_sync(sf, fa, fb, sf);
      }
      wmma::store_matrix_sync(s_part + warp * 256, sf, 16, wmma::mem_row_major);
    }
    __syncthreads();

    // 4. x_t = s_t (sum_kp S_kp) 2^-e_h (log2 units; the prologue folded score_scale into q_lat).
    for (int idx = tid; idx < hc * T; idx += kThreads) {
      const int g = idx / T, t = idx - g * T;
      const int nt = t / 16, col = t - 16 * nt;
      float x = -INFINITY;
      if (tok_slot[t] >= 0) {
        float v = 0.f;
        for (int kp = 0; kp < KP; ++kp) v = __fadd_rn(v, s_part[(kp * NT + nt) * 256 + g * 16 + col]);
        x = __fmul_rn(tok_scale[t], ldexpf(v, -q_exp[g]));
      }
      xs[g * T + t] = x;
    }
    __syncthreads();

    // 5. Online softmax, one warp per head, tokens lane and lane + 32; then
    //    P_hi + P_lo = (p_t s_t) 2^f_h.
    for (int g = warp; g < hc; g += kWarps) {
      const float x0 = lane < T ? xs[g * T + lane] : -INFINITY;
      const float x1 = lane + 32 < T ? xs[g * T + lane + 32] : -INFINITY;
      const float m_old = m_s[g];
      float m_new = fmaxf(m_old, ceilf(warp_max(fmaxf(x0, x1))));
      if (m_new == -INFINITY && __any_sync(0xffffffffu, x0 != x0 || x1 != x1)) m_new = 0.f;  // NaN: as above
      float p0 = 0.f, p1 = 0.f, factor = 1.f;
      if (m_new != -INFINITY) {
        p0 = exp2f(x0 - m_new);
        p1 = exp2f(x1 - m_new);
        factor = pow2_nonpositive(m_old - m_new);
      }
      const float tile_sum = warp_sum(__fadd_rn(p0, p1));
      const float w0 = lane < T ? __fmul_rn(p0, tok_scale[lane]) : 0.f;
      const float w1 = lane + 32 < T ? __fmul_rn(p1, tok_scale[lane + 32]) : 0.f;
      const int f = fp16_prescale_exponent(warp_max(fmaxf(finite_abs_or_zero(w0), finite_abs_or_zero(w1))));
      if (lane < T) split_hi_lo(ldexpf(w0, f), p_hi + g * ldp + lane, p_lo + g * ldp + lane);
      if (lane + 32 < T) split_hi_lo(ldexpf(w1, f), p_hi + g * ldp + lane + 32, p_lo + g * ldp + lane + 32);
      if (lane == 0) {
        l_s[g] = __fadd_rn(__fmul_rn(l_s[g], factor), tile_sum);
        m_s[g] = m_new;
        f_s[g] = factor;
        p_exp[g] = f;
      }
    }
    __syncthreads();

    // 6. V [16, slice] = (P_hi + P_lo) codes[:, slice]; warp w owns column tiles w + 8 c.
    {
      FragC vf[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) wmma::fill_fragment(vf[c], 0.f);
      for (int kt = 0; kt < KT; ++kt) {
        FragA a_hi, a_lo;
        wmma::load_matrix_sync(a_hi, p_hi + 16 * kt, ldp);
        wmma::load_matrix_sync(a_lo, p_lo + 16 * kt, ldp);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int ct = warp + kWarps * c;
          if (ct < col_tiles) {
            FragCodes fb;
            wmma::load_matrix_sync(fb, codes_s + 16 * kt * ldc + i0 + 16 * ct, ldc);
            wmma::mma_sync(vf[c], a_hi, fb, vf[c]);
            wmma::mma_sync(vf[c], a_lo, fb, vf[c]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int ct = warp + kWarps * c;
        if (ct < col_tiles) wmma::store_matrix_sync(pv_s + 16 * ct, vf[c], ldv, wmma::mem_row_major);
      }
    }
    __syncthreads();

    // 7. acc = acc 2^(M_old - M_new) + V 2^-f_h.
#pragma unroll
    for (int e = 0; e < kMaxAccSlots; ++e) {
      const int idx = tid + e * kThreads;
      const int g = idx / RS, c = idx - g * RS;
      if (g < hc && i0 + c < r)
        acc[e] = __fadd_rn(__fmul_rn(acc[e], f_s[g]), ldexpf(pv_s[g * ldv + c], -p_exp[g]));
    }
    // The next tile writes pv_s, f_s and p_exp only after two barriers.
  }

  // Partial of each head: acc [slice], and M, l from slice 0 (every slice computes the same).
#pragma unroll
  for (int e = 0; e < kMaxAccSlots; ++e) {
    const int idx = tid + e * kThreads;
    const int g = idx / RS, c = idx - g * RS;
    if (g < hc && i0 + c < r) p.part_acc[(ml_base + static_cast<int64_t>(g) * p.splits) * r + i0 + c] = acc[e];
  }
  if (slice == 0 && tid < hc) {
    p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2] = m_s[tid];
    p.part_ml[(ml_base + static_cast<int64_t>(tid) * p.splits) * 2 + 1] = l_s[tid];
  }
}

template <int kBits>
cudaError_t launch_split_norope_tc(const LatentAttentionParams& p, cudaStream_t stream) {
  auto kernel = latent_split_norope_tc_kernel<kBits>;
  const cudaError_t err = allow_dynamic_smem(kernel, p.split_smem);  // launch_util.cuh
  if (err != cudaSuccess) return err;
  const dim3 grid(p.splits, norope_tc_head_tiles(p) * p.r_slices, p.B);
  kernel<<<grid, kThreads, p.split_smem, stream>>>(p, code_vector_bytes(p));
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace latent
}  // namespace qsvd
