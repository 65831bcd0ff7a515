// CUDA decode attention over the quantized latent cache (split-KV flash
// decoding on CUDA cores, fp32 arithmetic). Torch-free; the interface and the
// kernel sequence are in latent_attention_params.h.
//
// Split kernel: one CTA per (split, kv head x head tile, sequence) streams the
// latent rows of its token range in tiles of T <= 32 tokens:
//   1. token metadata (slot, scale; a token past L or in a block outside
//      [0, num_blocks) is invalid: zero codes, score -inf, weight 0);
//   2. codes of the tile -> shared memory as int8 (INT4 unpacked), each row
//      read once, coalesced and vectorised, for all heads of the tile;
//   3. scores x_t (log2 units: score_scale = sm_scale log2 e is folded into
//      the query): no RoPE, x = s_t (code_t . q_lat); cached rotary keys
//      (partial RoPE, rope_keys), x = s_t (code_t . q_lat) + q'[:d_rope] .
//      rope_keys[slot] (q_lat absorbs dims [d_rope, d) only); RoPE, the tile's
//      K~ = codes W_uk (times w_uk_scale) is rebuilt through shared memory
//      (W_uk staged in chunks of 32 rows, each element serving the whole
//      tile), rotated, and x = s_t (q' . RoPE(K~));
//   4. online softmax per head with an INTEGER running max M = ceil(max x):
//      p_t = exp2(x_t - M) <= 1, and every rescale of the running sum and
//      accumulator is an exact power of two 2^(M_old - M_new);
//   5. acc_h += sum_t (p_t s_t) code_t in latent space, in registers
//      (thread j owns latent columns j + 256 a for each head of the tile).
// The partial (acc [r], M, l) of each head goes to the workspace; the combine
// kernel merges the splits (again exact powers of two), up-projects once with
// W_uv, divides by the sum and writes out and lse = (M + log2 l) ln 2.
//
// Heads per CTA: as many of the kv group as fit kMaxAccSlots accumulators per
// thread (heads * ceil(r / 256) <= 32); a larger group is tiled across CTAs
// (the latent rows are then re-read from L2 by each head tile).
//
// Numerics: the evaluation order counted in qsvd_kernels/testing.py
// (latent_attention_error_bound, kernel="cuda").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qsvd/kernels/element.cuh"
#include "qsvd/kernels/latent_attention_params.h"
#include "qsvd/kernels/launch_util.cuh"
#include "qsvd/numerics.h"

namespace qsvd {
namespace latent {
namespace detail {

constexpr int kMaxTokensPerThread = kMaxTileTokens * kMaxHeadDim / 4 / kThreads;  // RoPE rebuild micro-tile: 8
constexpr float kLn2 = 0.693147180559945309f;


// 2^e for an integer-valued e <= 0, exactly; 0 below the normal range, for
// -inf and for NaN (a factor that small leaves no trace in an fp32 sum).
__device__ __forceinline__ float pow2_nonpositive(float e) {
  if (!(e >= -126.f)) return 0.f;
  return __int_as_float((127 + static_cast<int>(e)) << 23);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Eight INT4 codes (one 32-bit word, element 2k in the low nibble of byte k)
// to eight int8 codes in element order: sign-extend each nibble with a
// bytewise (n ^ 8) - 8, then interleave the low and high nibbles.
__device__ __forceinline__ uint2 unpack_int4_word(uint32_t w) {
  const uint32_t lo = __vsub4((w & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
  const uint32_t hi = __vsub4(((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
  return make_uint2(__byte_perm(lo, hi, 0x5140), __byte_perm(lo, hi, 0x7362));
}

// Codes of the tile's rows -> codes_s [T, rp] int8, kVec bytes per load
// (row_bytes and the row stride code_stride multiples of kVec, the cache
// base aligned to kVec: checked by the caller). Invalid rows become zeros.
// Columns [r, rp) are zeroed once.
template <int kBits, int kVec>
__device__ __forceinline__ void load_code_rows(const uint8_t* __restrict__ cache, int64_t code_stride,
                                               int64_t row_bytes, const int64_t* tok_slot, int T, int8_t* codes_s,
                                               int rp) {
  const int chunks = static_cast<int>(row_bytes / kVec);
  const int total = T * chunks;
  constexpr int kCodesPerChunk = kVec * code_format(kBits).codes_per_byte;  // codes in kVec stored bytes
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int t = idx / chunks;
    const int c = idx - t * chunks;
    const int64_t slot = tok_slot[t];
    int8_t* dst = codes_s + t * rp + c * kCodesPerChunk;
    const uint8_t* src = slot >= 0 ? cache + slot * code_stride + static_cast<int64_t>(c) * kVec : cache;
    if constexpr (kVec == 16) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (slot >= 0) v = __ldg(reinterpret_cast<const uint4*>(src));
      if constexpr (kBits == 8) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {
        const uint2 a = unpack_int4_word(v.x), b = unpack_int4_word(v.y);
        const uint2 e = unpack_int4_word(v.z), f = unpack_int4_word(v.w);
        reinterpret_cast<uint4*>(dst)[0] = make_uint4(a.x, a.y, b.x, b.y);
        reinterpret_cast<uint4*>(dst)[1] = make_uint4(e.x, e.y, f.x, f.y);
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
__device__ __forceinline__ void load_codes(const LatentAttentionParams& p, int vec, const int64_t* tok_slot, int T,
                                           int8_t* codes_s, int rp) {
  const uint8_t* cache = p.cache.codes;
  const int64_t stride = p.cache.code_stride;
  const int64_t row_bytes = code_row_bytes(kBits, p.r);
  if (vec == 16)
    load_code_rows<kBits, 16>(cache, stride, row_bytes, tok_slot, T, codes_s, rp);
  else if (vec == 4)
    load_code_rows<kBits, 4>(cache, stride, row_bytes, tok_slot, T, codes_s, rp);
  else
    load_code_rows<kBits, 1>(cache, stride, row_bytes, tok_slot, T, codes_s, rp);
}

// Widest load (16, 4 or 1 bytes) that divides a row's code bytes, the row
// stride (row_bytes, or row_bytes + 4 for packed rows) and the base address.
inline int code_vector_bytes(const LatentAttentionParams& p) {
  const int64_t row_bytes = code_row_bytes(p.bits, p.r);
  const int64_t stride = p.cache.code_stride;
  const uintptr_t base = reinterpret_cast<uintptr_t>(p.cache.codes);
  if (row_bytes % 16 == 0 && stride % 16 == 0 && base % 16 == 0) return 16;
  if (row_bytes % 4 == 0 && stride % 4 == 0 && base % 4 == 0) return 4;
  return 1;
}

// ---------------------------------------------------------------------------
// Split kernel.
// Shared memory (split_smem_bytes): codes [T, rp] int8 | (RoPE: w_s [32, dp],
// k_s [T, dp], q_s [HT, dp]; no RoPE: q_lat_s [HT, rp], then with rope_keys
// qr_s [HT, round_up(d_rope, 4)]) | xs [16, 32] |
// tok_scale [32] | tok_slot [32] int64 | m, l, rescale [16] each.
template <int kBits, bool kRope, typename W>
__global__ void __launch_bounds__(kThreads, 1) latent_split_kernel(const LatentAttentionParams p, int vec) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, b = blockIdx.z;
  const int tiles = head_tiles(p);
  const int kv = blockIdx.y / tiles, tile = blockIdx.y - kv * tiles;
  const int G = p.H / p.H_kv, HT = p.heads_per_cta, T = p.tile_tokens;
  const int g0 = tile * HT;
  const int hc = min(HT, G - g0);  // heads of this CTA
  const int h0 = kv * G + g0;
  const int r = p.r, d = p.d;
  const int rp = static_cast<int>(padded_rank(r)), dp = static_cast<int>(padded_head_dim(d));

  // L clamped to what block_table (and the RoPE table) can address.
  int64_t L = p.seq_lens[b];
  const int64_t capacity = p.max_blocks * p.block_size;
  L = L < 0 ? 0 : (L > capacity ? capacity : L);
  // The RoPE table bounds L with K rebuilt and with K's rotary part cached
  // (the launcher's plan capacity is capped by it in both).
  if ((kRope || cached_rope_dims(p) > 0) && L > p.rope_len) L = p.rope_len;
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

  unsigned char* ptr = smem;
  int8_t* codes_s = reinterpret_cast<int8_t*>(ptr);
  ptr += round_up(static_cast<int64_t>(T) * rp, 16);
  float* w_s = nullptr;
  float* k_s = nullptr;
  float* q_s = nullptr;  // RoPE: q * score_scale [HT, dp]; no RoPE: q_lat [HT, rp]
  if constexpr (kRope) {
    w_s = reinterpret_cast<float*>(ptr);
    ptr += 4 * kWeightChunkRows * dp;
    k_s = reinterpret_cast<float*>(ptr);
    ptr += 4 * T * dp;
    q_s = reinterpret_cast<float*>(ptr);
    ptr += 4 * HT * dp;
  } else {
    q_s = reinterpret_cast<float*>(ptr);
    ptr += 4 * static_cast<int64_t>(HT) * rp;
  }
  // Cached rotary keys (absorbed kernel only): q[:d_rope] * score_scale [HT, nrp].
  const int nr = kRope ? 0 : cached_rope_dims(p);
  const int nrp = static_cast<int>(padded_head_dim(nr));
  float* qr_s = reinterpret_cast<float*>(ptr);
  ptr += 4 * static_cast<int64_t>(HT) * (nr > 0 ? nrp : 0);
  const __half* rope_keys = static_cast<const __half*>(p.rope_keys);
  float* xs = reinterpret_cast<float*>(ptr);  // [16][32]: scores, then weights p_t s_t
  ptr += 4 * kMaxHeadsPerCta * kMaxTileTokens;
  float* tok_scale = reinterpret_cast<float*>(ptr);
  ptr += 4 * kMaxTileTokens;
  int64_t* tok_slot = reinterpret_cast<int64_t*>(ptr);
  ptr += 8 * kMaxTileTokens;
  float* m_s = reinterpret_cast<float*>(ptr);
  float* l_s = m_s + kMaxHeadsPerCta;
  float* f_s = l_s + kMaxHeadsPerCta;

  // Query side, and the zero padding of the code rows.
  if constexpr (kRope) {
    for (int idx = tid; idx < HT * dp; idx += kThreads) {
      const int g = idx / dp, j = idx - g * dp;
      float v = 0.f;
      if (g < hc && j < d) v = __fmul_rn(p.q[(static_cast<int64_t>(b) * p.H + h0 + g) * d + j], p.score_scale);
      q_s[idx] = v;
    }
  } else {
    for (int idx = tid; idx < HT * rp; idx += kThreads) {
      const int g = idx / rp, i = idx - g * rp;
      q_s[idx] = (g < hc && i < r) ? p.q_lat[(static_cast<int64_t>(b) * p.H + h0 + g) * r + i] : 0.f;
    }
    // q is rotated by the caller; the cached keys are rotated, token scale included.
    for (int idx = tid; idx < HT * nrp; idx += kThreads) {
      const int g = idx / nrp, j = idx - g * nrp;
      float v = 0.f;
      if (g < hc && j < nr) v = __fmul_rn(p.q[(static_cast<int64_t>(b) * p.H + h0 + g) * d + j], p.score_scale);
      qr_s[idx] = v;
    }
  }
  for (int idx = tid; idx < T * (rp - r); idx += kThreads) {
    const int t = idx / (rp - r);
    codes_s[t * rp + r + (idx - t * (rp - r))] = 0;
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
  const W* w_uk = nullptr;
  const float* w_uk_scale = nullptr;
  if constexpr (kRope) {
    w_uk = static_cast<const W*>(p.w_uk) + static_cast<int64_t>(kv) * r * d;
    if (p.w_uk_scale != nullptr) w_uk_scale = p.w_uk_scale + static_cast<int64_t>(kv) * d;
  }

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
    // 2. Codes.
    load_codes<kBits>(p, vec, tok_slot, T, codes_s, rp);
    __syncthreads();

    // 3. Scores (log2 units), one warp per token.
    if constexpr (kRope) {
      // K~[t, j] = sum_i code[t, i] W[i, j]: thread (tg, dg) owns dims 4dg..4dg+3 of tokens tg + n_tg k.
      const int n_dg = dp / 4, n_tg = kThreads / n_dg;
      const int dg = tid % n_dg, tg = tid / n_dg;
      float kacc[kMaxTokensPerThread][4];
#pragma unroll
      for (int k = 0; k < kMaxTokensPerThread; ++k)
#pragma unroll
        for (int c = 0; c < 4; ++c) kacc[k][c] = 0.f;
      for (int i0 = 0; i0 < r; i0 += kWeightChunkRows) {
        __syncthreads();  // readers of the previous chunk are done
        for (int idx = tid; idx < kWeightChunkRows * dp; idx += kThreads) {
          const int row = idx / dp, col = idx - row * dp;
          float v = 0.f;
          if (i0 + row < r && col < d) v = to_float<W>(w_uk[static_cast<int64_t>(i0 + row) * d + col]);
          w_s[idx] = v;
        }
        __syncthreads();
        if (tg < n_tg) {
#pragma unroll 2
          for (int ii = 0; ii < kWeightChunkRows; ii += 4) {
            const float4 w0 = reinterpret_cast<const float4*>(w_s + (ii + 0) * dp)[dg];
            const float4 w1 = reinterpret_cast<const float4*>(w_s + (ii + 1) * dp)[dg];
            const float4 w2 = reinterpret_cast<const float4*>(w_s + (ii + 2) * dp)[dg];
            const float4 w3 = reinterpret_cast<const float4*>(w_s + (ii + 3) * dp)[dg];
#pragma unroll
            for (int k = 0; k < kMaxTokensPerThread; ++k) {
              const int t = tg + n_tg * k;
              if (t < T) {
                const char4 c = *reinterpret_cast<const char4*>(codes_s + t * rp + i0 + ii);
                const float c0 = c.x, c1 = c.y, c2 = c.z, c3 = c.w;
                kacc[k][0] = fmaf(c0, w0.x, kacc[k][0]);
                kacc[k][1] = fmaf(c0, w0.y, kacc[k][1]);
                kacc[k][2] = fmaf(c0, w0.z, kacc[k][2]);
                kacc[k][3] = fmaf(c0, w0.w, kacc[k][3]);
                kacc[k][0] = fmaf(c1, w1.x, kacc[k][0]);
                kacc[k][1] = fmaf(c1, w1.y, kacc[k][1]);
                kacc[k][2] = fmaf(c1, w1.z, kacc[k][2]);
                kacc[k][3] = fmaf(c1, w1.w, kacc[k][3]);
                kacc[k][0] = fmaf(c2, w2.x, kacc[k][0]);
                kacc[k][1] = fmaf(c2, w2.y, kacc[k][1]);
                kacc[k][2] = fmaf(c2, w2.z, kacc[k][2]);
                kacc[k][3] = fmaf(c2, w2.w, kacc[k][3]);
                kacc[k][0] = fmaf(c3, w3.x, kacc[k][0]);
                kacc[k][1] = fmaf(c3, w3.y, kacc[k][1]);
                kacc[k][2] = fmaf(c3, w3.z, kacc[k][2]);
                kacc[k][3] = fmaf(c3, w3.w, kacc[k][3]);
              }
            }
          }
        }
      }
      if (tg < n_tg) {
        float ws[4] = {1.f, 1.f, 1.f, 1.f};
        if (w_uk_scale != nullptr) {
#pragma unroll
          for (int c = 0; c < 4; ++c) ws[c] = 4 * dg + c < d ? w_uk_scale[4 * dg + c] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kMaxTokensPerThread; ++k) {
          const int t = tg + n_tg * k;
          if (t < T) {
            float4 o;
            o.x = w_uk_scale != nullptr ? __fmul_rn(kacc[k][0], ws[0]) : kacc[k][0];
            o.y = w_uk_scale != nullptr ? __fmul_rn(kacc[k][1], ws[1]) : kacc[k][1];
            o.z = w_uk_scale != nullptr ? __fmul_rn(kacc[k][2], ws[2]) : kacc[k][2];
            o.w = w_uk_scale != nullptr ? __fmul_rn(kacc[k][3], ws[3]) : kacc[k][3];
            reinterpret_cast<float4*>(k_s + t * dp)[dg] = o;
          }
        }
      }
      __syncthreads();
      const int half = d / 2;
      for (int t = warp; t < T; t += kWarps) {
        if (tok_slot[t] >= 0) {
          float part[kMaxHeadsPerCta];
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g) part[g] = 0.f;
          const float* cos_row = p.rope_cos + (t0 + t) * d;
          const float* sin_row = p.rope_sin + (t0 + t) * d;
          const float* k_row = k_s + t * dp;
          for (int j = lane; j < d; j += 32) {
            const float rot = j < half ? -k_row[j + half] : k_row[j - half];
            const float kr = __fadd_rn(__fmul_rn(k_row[j], __ldg(cos_row + j)), __fmul_rn(rot, __ldg(sin_row + j)));
#pragma unroll
            for (int g = 0; g < kMaxHeadsPerCta; ++g)
              if (g < hc) part[g] = fmaf(q_s[g * dp + j], kr, part[g]);
          }
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g)
            if (g < hc) part[g] = warp_sum(part[g]);
          if (lane == 0) {
#pragma unroll
            for (int g = 0; g < kMaxHeadsPerCta; ++g)
              if (g < hc) xs[g * kMaxTileTokens + t] = __fmul_rn(tok_scale[t], part[g]);
          }
        } else if (lane == 0) {
          for (int g = 0; g < hc; ++g) xs[g * kMaxTileTokens + t] = -INFINITY;
        }
      }
    } else {
      for (int t = warp; t < T; t += kWarps) {
        if (tok_slot[t] >= 0) {
          float part[kMaxHeadsPerCta];
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g) part[g] = 0.f;
          const int8_t* row = codes_s + t * rp;
          for (int i = lane * 4; i < rp; i += 128) {
            const char4 c = *reinterpret_cast<const char4*>(row + i);
            const float c0 = c.x, c1 = c.y, c2 = c.z, c3 = c.w;
#pragma unroll
            for (int g = 0; g < kMaxHeadsPerCta; ++g) {
              if (g < hc) {
                const float4 ql = *reinterpret_cast<const float4*>(q_s + g * rp + i);
                part[g] = fmaf(c0, ql.x, part[g]);
                part[g] = fmaf(c1, ql.y, part[g]);
                part[g] = fmaf(c2, ql.z, part[g]);
                part[g] = fmaf(c3, ql.w, part[g]);
              }
            }
          }
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g)
            if (g < hc) part[g] = warp_sum(part[g]);
          // The rotary part from the cached keys: x = s_t (c . q_lat) + q'[:d_rope] . k_rope.
          float rot[kMaxHeadsPerCta];
#pragma unroll
          for (int g = 0; g < kMaxHeadsPerCta; ++g) rot[g] = 0.f;
          if (nr > 0) {  // uniform across the CTA: warp_sum below is safe
            const __half* key = rope_keys + (tok_slot[t] * p.H_kv + kv) * nr;
            for (int j = lane; j < nr; j += 32) {
              const float kf = __half2float(key[j]);
#pragma unroll
              for (int g = 0; g < kMaxHeadsPerCta; ++g)
                if (g < hc) rot[g] = fmaf(qr_s[g * nrp + j], kf, rot[g]);
            }
#pragma unroll
            for (int g = 0; g < kMaxHeadsPerCta; ++g)
              if (g < hc) rot[g] = warp_sum(rot[g]);
          }
          if (lane == 0) {
#pragma unroll
            for (int g = 0; g < kMaxHeadsPerCta; ++g) {
              if (g < hc) {
                const float x = __fmul_rn(tok_scale[t], part[g]);
                xs[g * kMaxTileTokens + t] = nr > 0 ? __fadd_rn(x, rot[g]) : x;
              }
            }
          }
        } else if (lane == 0) {
          for (int g = 0; g < hc; ++g) xs[g * kMaxTileTokens + t] = -INFINITY;
        }
      }
    }
    __syncthreads();

    // 4. Online softmax, one warp per head, one lane per token.
    for (int g = warp; g < hc; g += kWarps) {
      const float x = lane < T ? xs[g * kMaxTileTokens + lane] : -INFINITY;
      const float m_old = m_s[g];
      float m_new = fmaxf(m_old, ceilf(warp_max(x)));
      // fmaxf drops NaN scores from the max. A NaN with no finite max so far
      // (every other score -inf) must still reach the output: a finite max
      // (0) keeps this partial visible to the combine (which skips partials
      // whose max is -inf), and its l and acc turn NaN through exp2f below.
      if (m_new == -INFINITY && __any_sync(0xffffffffu, x != x)) m_new = 0.f;
      float prob = 0.f, factor = 1.f;
      if (m_new != -INFINITY) {
        prob = exp2f(x - m_new);
        factor = pow2_nonpositive(m_old - m_new);
      }
      const float tile_sum = warp_sum(prob);
      if (lane < T) xs[g * kMaxTileTokens + lane] = __fmul_rn(prob, tok_scale[lane]);
      if (lane == 0) {
        l_s[g] = __fadd_rn(__fmul_rn(l_s[g], factor), tile_sum);
        m_s[g] = m_new;
        f_s[g] = factor;
      }
    }
    __syncthreads();

    // 5. acc[g, i] = acc[g, i] 2^(M_old - M_new) + sum_t (p_t s_t) code[t, i].
#pragma unroll
    for (int e = 0; e < kMaxAccSlots; ++e) {
      const int a = e / HT, g = e - a * HT;
      const int i = tid + a * kThreads;
      if (a < slots_per_head && g < hc && i < r) {
        const float* w = xs + g * kMaxTileTokens;
        const int8_t* col = codes_s + i;
        float v = __fmul_rn(acc[e], f_s[g]);
        for (int t = 0; t < T; ++t) v = fmaf(w[t], static_cast<float>(col[t * rp]), v);
        acc[e] = v;
      }
    }
    // The next tile's first barrier orders these reads before any overwrite.
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

template <int kBits, bool kRope, typename W>
cudaError_t launch_split(const LatentAttentionParams& p, cudaStream_t stream) {
  auto kernel = latent_split_kernel<kBits, kRope, W>;
  const cudaError_t err = allow_dynamic_smem(kernel, p.split_smem);  // launch_util.cuh
  if (err != cudaSuccess) return err;
  const dim3 grid(p.splits, p.H_kv * head_tiles(p), p.B);
  kernel<<<grid, kThreads, p.split_smem, stream>>>(p, code_vector_bytes(p));
  return cudaGetLastError();
}

template <bool kRope, typename W>
cudaError_t launch_split_bits(const LatentAttentionParams& p, cudaStream_t stream) {
  return p.bits == 4 ? launch_split<4, kRope, W>(p, stream) : launch_split<8, kRope, W>(p, stream);
}

// ---------------------------------------------------------------------------
// Prologue (no RoPE): q_lat[b, h, i] = sum_j W_uk[kv, i, j] q'[j],
// q'[j] = (q[j] * w_uk_scale[kv, j]) * score_scale. Grid (B, H_kv); the
// group's queries in shared memory (16 heads at a time), one warp per row i.
// With rope_keys the sum runs over j >= d_rope (the rotary dims are scored
// against the cached keys instead): q'[j] = 0 below d_rope.
template <typename W>
__global__ void __launch_bounds__(kThreads) latent_prologue_kernel(const LatentAttentionParams p) {
  __shared__ float qs[kMaxHeadsPerCta * kMaxHeadDim];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x, kv = blockIdx.y;
  const int G = p.H / p.H_kv, r = p.r, d = p.d;
  const W* w = static_cast<const W*>(p.w_uk) + static_cast<int64_t>(kv) * r * d;
  const float* ws = p.w_uk_scale != nullptr ? p.w_uk_scale + static_cast<int64_t>(kv) * d : nullptr;
  const int j0 = cached_rope_dims(p);
  for (int c0 = 0; c0 < G; c0 += kMaxHeadsPerCta) {
    const int nh = min(kMaxHeadsPerCta, G - c0);
    const int64_t h0 = static_cast<int64_t>(b) * p.H + kv * G + c0;
    __syncthreads();  // the previous chunk's readers are done
    for (int idx = tid; idx < nh * d; idx += kThreads) {
      const int g = idx / d, j = idx - g * d;
      float v = p.q[(h0 + g) * d + j];
      if (ws != nullptr) v = __fmul_rn(v, ws[j]);
      qs[idx] = j < j0 ? 0.f : __fmul_rn(v, p.score_scale);
    }
    __syncthreads();
    for (int i = warp; i < r; i += kWarps) {
      float part[kMaxHeadsPerCta];
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerCta; ++g) part[g] = 0.f;
      const W* row = w + static_cast<int64_t>(i) * d;
      for (int j = lane; j < d; j += 32) {
        const float wf = to_float<W>(row[j]);
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerCta; ++g)
          if (g < nh) part[g] = fmaf(wf, qs[g * d + j], part[g]);
      }
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerCta; ++g)
        if (g < nh) part[g] = warp_sum(part[g]);
      if (lane == 0) {
#pragma unroll
        for (int g = 0; g < kMaxHeadsPerCta; ++g)
          if (g < nh) p.q_lat[(h0 + g) * r + i] = part[g];
      }
    }
  }
}

template <typename W>
cudaError_t launch_prologue(const LatentAttentionParams& p, cudaStream_t stream) {
  latent_prologue_kernel<W><<<dim3(p.B, p.H_kv), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Combine: grid (B, H_kv x combine tiles). Per head: M = max_s M_s,
// l = sum_s 2^(M_s - M) l_s, acc = sum_s 2^(M_s - M) acc_s (splits with
// M_s = -inf hold nothing and are skipped, their acc never read); then
// out[j] = ((sum_i acc_i W_uv[i, j]) w_uv_scale[j]) / l, the i-sum cut into
// kThreads / round_up(d, 32) contiguous ranges added in order, and
// lse = (M + log2 l) ln 2. M = -inf (no valid token) gives 0 and -inf.
// Shared memory: acc_s [CH, r] | red [CH, kThreads] | M, l [kMaxCombineHeads].
template <typename W, typename Out>
__global__ void __launch_bounds__(kThreads) latent_combine_kernel(const LatentAttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int b = blockIdx.x;
  const int tiles = combine_tiles(p);
  const int kv = blockIdx.y / tiles, tile = blockIdx.y - kv * tiles;
  const int G = p.H / p.H_kv, CH = p.combine_heads, r = p.r, d = p.d, S = p.splits;
  const int hc = min(CH, G - tile * CH);
  const int64_t h0 = static_cast<int64_t>(b) * p.H + kv * G + tile * CH;  // flat (b, h) of head 0
  float* acc_s = reinterpret_cast<float*>(smem);
  float* red = acc_s + static_cast<int64_t>(CH) * r;
  float* M_s = red + CH * kThreads;
  float* l_s = M_s + kMaxCombineHeads;

  if (tid < hc) {
    const float* ml = p.part_ml + (h0 + tid) * S * 2;
    float M = -INFINITY;
    for (int s = 0; s < S; ++s) M = fmaxf(M, ml[2 * s]);
    float l = 0.f;
    if (M != -INFINITY)
      for (int s = 0; s < S; ++s)
        if (ml[2 * s] != -INFINITY) l = __fadd_rn(l, __fmul_rn(ml[2 * s + 1], pow2_nonpositive(ml[2 * s] - M)));
    M_s[tid] = M;
    l_s[tid] = l;
  }
  __syncthreads();
  for (int idx = tid; idx < hc * r; idx += kThreads) {
    const int g = idx / r, i = idx - g * r;
    const float M = M_s[g];
    const float* ml = p.part_ml + (h0 + g) * S * 2;
    const float* part = p.part_acc + (h0 + g) * S * r + i;
    float a = 0.f;
    if (M != -INFINITY)
      for (int s = 0; s < S; ++s)
        if (ml[2 * s] != -INFINITY)
          a = __fadd_rn(a, __fmul_rn(part[static_cast<int64_t>(s) * r], pow2_nonpositive(ml[2 * s] - M)));
    acc_s[idx] = a;
  }
  __syncthreads();

  const int jw = (d + 31) / 32 * 32;  // d <= kMaxHeadDim = kThreads
  const int KG = kThreads / jw;
  const int kg = tid / jw, j = tid - kg * jw;
  const int per = (r + KG - 1) / KG;
  float o[kMaxCombineHeads];
#pragma unroll
  for (int g = 0; g < kMaxCombineHeads; ++g) o[g] = 0.f;
  if (kg < KG && j < d) {
    const W* w = static_cast<const W*>(p.w_uv) + static_cast<int64_t>(kv) * r * d + j;
    const int ie = min(r, (kg + 1) * per);
    for (int i = kg * per; i < ie; ++i) {
      const float wf = to_float<W>(w[static_cast<int64_t>(i) * d]);
#pragma unroll
      for (int g = 0; g < kMaxCombineHeads; ++g)
        if (g < hc) o[g] = fmaf(acc_s[g * r + i], wf, o[g]);
    }
  }
#pragma unroll
  for (int g = 0; g < kMaxCombineHeads; ++g)
    if (g < hc) red[g * kThreads + tid] = o[g];
  __syncthreads();
  for (int idx = tid; idx < hc * d; idx += kThreads) {
    const int g = idx / d, jj = idx - g * d;
    float v = 0.f;
    for (int k = 0; k < KG; ++k) v = __fadd_rn(v, red[g * kThreads + k * jw + jj]);
    const float M = M_s[g];
    if (M == -INFINITY) {
      v = 0.f;
    } else {
      if (p.w_uv_scale != nullptr) v = __fmul_rn(v, p.w_uv_scale[static_cast<int64_t>(kv) * d + jj]);
      v = __fdiv_rn(v, l_s[g]);
    }
    static_cast<Out*>(p.out)[(h0 + g) * d + jj] = from_float<Out>(v);
    if (jj == 0)
      p.lse[h0 + g] = M == -INFINITY ? -INFINITY : __fmul_rn(__fadd_rn(M, log2f(l_s[g])), kLn2);
  }
}

template <typename W>
cudaError_t launch_combine(const LatentAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(p.B, p.H_kv * combine_tiles(p));
  const size_t smem = p.combine_smem;
  switch (p.out_type) {
    case DType::kF32: latent_combine_kernel<W, float><<<grid, kThreads, smem, stream>>>(p); break;
    case DType::kF16: latent_combine_kernel<W, __half><<<grid, kThreads, smem, stream>>>(p); break;
    case DType::kBF16: latent_combine_kernel<W, __nv_bfloat16><<<grid, kThreads, smem, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace latent
}  // namespace qsvd
