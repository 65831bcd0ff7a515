// The plan of the CUDA latent_attention (decode) kernels: the parameter
// struct, the shared-memory layouts and the choice of split kernel, splits,
// token tile, heads per CTA and combine tile. Plain C++ (no CUDA, no torch),
// so the plan checks run on any machine: qsvd_kernels._C.plan_latent_attention_shape
// takes fake SM counts and shared-memory limits. The launch interface is
// latent_attention_params.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qsvd/config.h"
#include "qsvd/formats.h"
#include "qsvd/latent_cache_layout.h"

namespace qsvd {
namespace latent {

enum class SplitKernel : int { kSimt = 0, kTensorCore = 1 };  // which split kernel the plan is for

constexpr int kThreads = 256;          // every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTileTokens = 32;     // tokens per tile of the split kernel (one per lane in the softmax step)
constexpr int kMaxHeadsPerCta = 16;    // query heads per split CTA (score partials per lane)
constexpr int kMaxAccSlots = 32;       // latent accumulators per thread: heads_per_cta * ceil(r / 256)
constexpr int kMaxCombineHeads = 8;    // heads merged per combine CTA
constexpr int kMaxHeadDim = 256;
constexpr int kMaxRank = kMaxAccSlots * kThreads;  // 8192: one head per CTA, 32 slots per thread
constexpr int kWeightChunkRows = 32;   // W_uk rows staged per step of the RoPE rebuild
constexpr int kMinSplitTokens = 256;   // a split streams at least this many tokens (its partial is G*r*4 bytes)
constexpr int kMaxSplits = 1024;

QSVD_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
QSVD_INLINE int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

struct LatentAttentionParams {
  // Inputs (contiguous).
  const float* q = nullptr;             // [B, H, d] fp32
  // The paged cache, either layout (qsvd/latent_cache_layout.h): slot s's
  // codes (r int8 or r/2 packed INT4 bytes) at cache.codes + s *
  // cache.code_stride, its fp32 scale at cache.scales + s * cache.scale_stride.
  LatentCacheLayout cache;
  const int32_t* block_table = nullptr; // [B, max_blocks]
  const int32_t* seq_lens = nullptr;    // [B]
  const void* w_uk = nullptr;           // [H_kv, r, d]
  const float* w_uk_scale = nullptr;    // [H_kv, d] (int8 weights) or nullptr
  const void* w_uv = nullptr;
  const float* w_uv_scale = nullptr;
  const float* rope_cos = nullptr;      // [rope_len, d] or nullptr (no RoPE)
  const float* rope_sin = nullptr;
  int64_t rope_len = 0;
  // Partial RoPE with K's rotary part cached (latent_rope_keys_append): fp16
  // [num_blocks * block_size, H_kv, d_rope], the first d_rope dims of each
  // head's K, rotated; nullptr: none. With them the absorbed kernels run
  // (rope_cos is nullptr): q_lat absorbs W_uk over dims [d_rope, d) only,
  // and each score adds q[:d_rope] . rope_keys[slot].
  const void* rope_keys = nullptr;
  int d_rope = 0;                       // rotary dims read from rope_keys (0 without them)
  // Workspace (fp32).
  float* q_lat = nullptr;               // [B, H, r] (no RoPE, or rope_keys)
  float* part_acc = nullptr;            // [B, H, splits, r]
  float* part_ml = nullptr;             // [B, H, splits, 2]: max (log2 units, integer-valued), sum
  // Outputs.
  void* out = nullptr;                  // [B, H, d] in out_type
  float* lse = nullptr;                 // [B, H]
  // Sizes.
  int B = 0, H = 0, H_kv = 0, r = 0, d = 0, bits = 8;
  int64_t num_blocks = 0, block_size = 0, max_blocks = 0;
  float score_scale = 0.f;              // float(sm_scale * log2(e)), folded into the query
  DType weight_type = DType::kF16;     // kF16, kBF16 or kI8 (w_uk, w_uv)
  DType out_type = DType::kF32;        // kF32, kF16 or kBF16
  // Plan (plan_latent_attention or plan_latent_attention_tc).
  SplitKernel split_kernel = SplitKernel::kSimt;
  int heads_per_cta = 1;                // query heads per split CTA (a tile of one kv group)
  int tile_tokens = kMaxTileTokens;     // kSimt: multiple of kWarps, <= kMaxTileTokens; kTensorCore: 16..64, multiple of 16
  int splits = 1;
  int64_t split_tokens = 0;             // tokens per split, a multiple of kMaxTileTokens (kTensorCore: of tile_tokens)
  int r_slices = 1;                     // kTensorCore without RoPE: latent column slices per head tile
  int slice_cols = 0;                   // columns per slice, a multiple of 16, <= kTcMaxSliceColumns
  size_t split_smem = 0;
  int combine_heads = 1;
  size_t combine_smem = 0;
};

QSVD_INLINE int group_size(const LatentAttentionParams& p) { return p.H / p.H_kv; }
QSVD_INLINE int head_tiles(const LatentAttentionParams& p) {
  return static_cast<int>(ceil_div(group_size(p), p.heads_per_cta));
}
QSVD_INLINE int combine_tiles(const LatentAttentionParams& p) {
  return static_cast<int>(ceil_div(group_size(p), p.combine_heads));
}
QSVD_INLINE int64_t padded_rank(int r) { return round_up(r, kWeightChunkRows); }
QSVD_INLINE int64_t padded_head_dim(int d) { return round_up(d, 4); }
// Rotary dims the absorbed split kernel reads from rope_keys (0: none).
QSVD_INLINE int cached_rope_dims(const LatentAttentionParams& p) { return p.rope_keys != nullptr ? p.d_rope : 0; }

// Dynamic shared memory of the split kernel (layout in latent_attention_kernel.cuh).
// cached_rope: rotary dims read from rope_keys (the absorbed kernel only).
inline size_t split_smem_bytes(int r, int d, bool rope, int heads_per_cta, int tile_tokens, int cached_rope = 0) {
  const int64_t rp = padded_rank(r), dp = padded_head_dim(d);
  int64_t bytes = round_up(static_cast<int64_t>(tile_tokens) * rp, 16);          // codes
  if (rope)
    bytes += 4 * (kWeightChunkRows * dp + static_cast<int64_t>(tile_tokens) * dp + heads_per_cta * dp);
  else
    bytes += 4 * static_cast<int64_t>(heads_per_cta) * (rp + padded_head_dim(cached_rope));  // q_lat, q[:d_rope]
  bytes += 4 * static_cast<int64_t>(kMaxHeadsPerCta) * kMaxTileTokens;           // scores / weights
  bytes += 4 * kMaxTileTokens + 8 * kMaxTileTokens;                               // token scales, slots
  bytes += 4 * 3 * kMaxHeadsPerCta;                                               // m, l, rescale
  return static_cast<size_t>(bytes);
}

inline size_t combine_smem_bytes(int r, int combine_heads) {
  return 4 * static_cast<size_t>(combine_heads) * (static_cast<size_t>(r) + kThreads) + 4 * 2 * kMaxCombineHeads;
}

// Query heads of one kv group per split CTA: as many as fit kMaxAccSlots
// latent accumulators per thread (heads * ceil(r / 256) <= 32), balanced
// across the tiles of the group.
inline int plan_heads_per_cta(const LatentAttentionParams& p) {
  const int G = group_size(p);
  const int slots_per_head = static_cast<int>(ceil_div(p.r, kThreads));
  int ht = kMaxAccSlots / slots_per_head;
  if (ht > kMaxHeadsPerCta) ht = kMaxHeadsPerCta;
  if (ht > G) ht = G;
  return static_cast<int>(ceil_div(G, ceil_div(G, ht)));
}

// Splits per sequence for `ctas` split CTAs per split index: about two CTAs
// per SM, at least kMinSplitTokens tokens per split (forced: at least `tile`
// tokens); split_tokens is a multiple of `tile`.
inline void plan_splits(LatentAttentionParams& p, int64_t ctas, int64_t token_capacity, int sm_count,
                        int forced_splits, int tile) {
  const int64_t cap = token_capacity > 0 ? token_capacity : 1;
  int64_t splits = forced_splits > 0 ? forced_splits : ceil_div(2LL * sm_count, ctas > 0 ? ctas : 1);
  const int64_t max_useful = forced_splits > 0 ? ceil_div(cap, tile) : ceil_div(cap, kMinSplitTokens);
  if (splits > max_useful) splits = max_useful;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  p.split_tokens = round_up(ceil_div(cap, splits), tile);
  p.splits = static_cast<int>(ceil_div(cap, p.split_tokens));
}

inline void plan_combine(LatentAttentionParams& p) {
  const int G = group_size(p);
  int ch = static_cast<int>((48 * 1024 - 4 * 2 * kMaxCombineHeads) / (4 * (static_cast<int64_t>(p.r) + kThreads)));
  if (ch > kMaxCombineHeads) ch = kMaxCombineHeads;
  if (ch > G) ch = G;
  if (ch < 1) ch = 1;
  p.combine_heads = static_cast<int>(ceil_div(G, ceil_div(G, ch)));
  p.combine_smem = combine_smem_bytes(p.r, p.combine_heads);
}

// Fills the plan fields of p from its sizes, for the CUDA-core split kernel
// (split_kernel = kSimt). Returns an empty string, or why the shape cannot
// be served (the caller raises it). token_capacity is an upper bound of
// every seq_len (max_blocks * block_size, capped by the RoPE table): splits
// are chosen without reading seq_lens (no device sync). forced_splits > 0
// overrides the choice (QSVD_LATENT_SPLITS).
inline const char* plan_latent_attention(LatentAttentionParams& p, int64_t token_capacity, int sm_count,
                                         size_t smem_limit, int forced_splits) {
  const bool rope = p.rope_cos != nullptr;
  const int cached = cached_rope_dims(p);
  if (p.d > kMaxHeadDim) return "the CUDA kernel serves head dims d <= 256";
  if (p.r > kMaxRank) return "the CUDA kernel serves latent ranks r <= 8192";
  if (p.rope_keys != nullptr && (rope || p.d_rope < 1 || p.d_rope > p.d))
    return "rope_keys needs the absorbed kernel (no RoPE tables in the parameters) and 1 <= d_rope <= d";
  p.split_kernel = SplitKernel::kSimt;
  p.heads_per_cta = plan_heads_per_cta(p);
  int tile = kMaxTileTokens;
  while (tile > kWarps && split_smem_bytes(p.r, p.d, rope, p.heads_per_cta, tile, cached) > smem_limit) tile -= kWarps;
  p.tile_tokens = tile;
  p.split_smem = split_smem_bytes(p.r, p.d, rope, p.heads_per_cta, tile, cached);
  if (p.split_smem > smem_limit) return "the shape needs more shared memory than the device offers per block";
  plan_splits(p, static_cast<int64_t>(p.B) * p.H_kv * head_tiles(p), token_capacity, sm_count, forced_splits,
              kMaxTileTokens);
  plan_combine(p);
  return "";
}

// ---------------------------------------------------------------------------
// Tensor-core split kernels (latent_attention_tc.cuh). They write the same
// workspace (acc [r], M, l per (b, h, split)) as the CUDA-core split kernel,
// so the prologue and the combine kernel are shared.
//
// RoPE (split_kernel = kTensorCore, rope tables given): CTAs as in the
// CUDA-core kernel (split, kv head x head tile, b); per tile of T in
// {64, 48, 32, 16} tokens, K~ [T, d] = codes [T, r] W_uk [r, d] runs on
// tensor cores (wmma m16n16k16): fp16 operands for fp16 weights, bf16 for
// bf16 weights, fp32 accumulation (codes are exact in fp16/bf16); int8
// operands for int8 weights, int32 accumulation (exact). Served when
// d % 16 == 0, W_uk is 16-byte aligned and the tile fits shared memory with
// T >= 16.
constexpr int kTcMaxTileTokens = 64;
constexpr int kTcWeightChunkRows = 64;  // W_uk rows staged per step of the K rebuild

QSVD_INLINE int64_t tc_code_stride(int r) { return round_up(r, 16) + 8; }  // elements per code row in smem

// INT8 MMA operands (int8 weights) in shared memory. wmma wants 32-byte
// aligned tile pointers and, for 8-bit elements, a row stride that is a
// multiple of 16 bytes; in a row-major int8 matrix every other 16-column
// tile starts 16 bytes past a 32-byte boundary. And IMMA takes both operands
// K-contiguous (A row-major, B column-major; other layouts cost byte loads).
// So, 16 bytes per row (the wmma ldm is 16) in blocks of 16 K values:
//   codes [T, r16] (A, row-major): block kb holds codes [t, 16 kb .. 16 kb
//     + 15] for t < T, blocks 16 T + 32 bytes apart;
//   W_uk chunk [64, d] (B, column-major): k-block ks holds, for each column
//     n, its 16 weights of chunk rows 16 ks .. 16 ks + 15; columns n in
//     tiles of 16, tiles 256 + 32 bytes apart, k-blocks d / 16 tiles apart.
// The 32-byte gaps keep every tile 32-byte aligned and the staging stores of
// neighbouring blocks at 2-way bank conflicts at most.
QSVD_INLINE int64_t tc_i8_code_block_bytes(int tile_tokens) { return 16 * static_cast<int64_t>(tile_tokens) + 32; }
constexpr int kTcI8WeightTileBytes = 16 * 16 + 32;
QSVD_INLINE int64_t tc_i8_weight_block_bytes(int d) { return static_cast<int64_t>(d) / 16 * kTcI8WeightTileBytes; }
// Byte offset of code (t, i) in the int8 code blocks.
QSVD_INLINE int tc_i8_code_index(int t, int i, int code_block_bytes) {
  return (i >> 4) * code_block_bytes + 16 * t + (i & 15);
}

// Shared-memory layout of the RoPE tensor-core split kernel: byte offsets,
// each region 128-byte aligned (wmma needs 32-byte aligned tile pointers).
// i8_mma: the layout for int8 weights (int8 codes and W_uk chunk in blocks
// of 16 K values, int32 K~ accumulators), else for fp16/bf16 weights.
struct RopeTcLayout {
  int64_t codes, w, k, q, xs, ws, tok_scale, tok_slot, mlf, total;
};

QSVD_INLINE RopeTcLayout rope_tc_layout(int r, int d, int heads_per_cta, int tile_tokens, bool i8_mma) {
  RopeTcLayout s;
  int64_t at = 0;
  const int64_t code_bytes = i8_mma ? round_up(r, 16) / 16 * tc_i8_code_block_bytes(tile_tokens)   // int8 blocks
                                    : 2 * tile_tokens * tc_code_stride(r);                           // [T, ldc]
  const int64_t w_bytes = i8_mma ? kTcWeightChunkRows / 16 * tc_i8_weight_block_bytes(d)             // int8 blocks
                                 : 2 * static_cast<int64_t>(kTcWeightChunkRows) * (d + 8);          // [64, d + 8]
  s.codes = at;      at += round_up(code_bytes, 128);
  s.w = at;          at += round_up(w_bytes, 128);
  s.k = at;          at += round_up(4 * static_cast<int64_t>(tile_tokens) * (d + 4), 128);  // fp32 or int32 [T, d + 4]
  s.q = at;          at += round_up(4 * static_cast<int64_t>(heads_per_cta) * d, 128);            // fp32 [HT, d]
  s.xs = at;         at += round_up(4 * static_cast<int64_t>(kMaxHeadsPerCta) * tile_tokens, 128); // [16, T]
  s.ws = at;         at += round_up(4 * static_cast<int64_t>(d), 128);                             // w_uk_scale or 1
  s.tok_scale = at;  at += round_up(4 * static_cast<int64_t>(tile_tokens), 128);
  s.tok_slot = at;   at += round_up(8 * static_cast<int64_t>(tile_tokens), 128);
  s.mlf = at;        at += 4 * 3 * kMaxHeadsPerCta;                                                 // m, l, rescale
  s.total = at;
  return s;
}

// No RoPE (split_kernel = kTensorCore, no rope tables): CTAs (split, head
// tile x r slice, b). q_lat already absorbed W_uk, so all query heads dot
// the same latent rows: a head tile is 16 consecutive heads of any kv
// groups (the wmma M dimension; rows past H are zero). Per tile of T tokens:
// scores S [16, T] = Q_lat [16, r16] codes^T and the tile's V sum
// [16, RS] = P' [16, T] codes [T, slice] run on tensor cores, each operand
// split into fp16 hi + lo (two MMAs) after a power-of-two pre-scale. The
// latent accumulator of a CTA is 16 heads x RS <= 512 columns in registers
// (32 per thread); a larger r is cut into r slices, each CTA recomputing
// the scores of its tile (the code rows are then read once per slice).
// Served when a tile of >= 16 tokens fits shared memory.
constexpr int kTcHeadTile = 16;
constexpr int kTcMaxSliceColumns = kMaxAccSlots * kThreads / kTcHeadTile;  // 512

struct NoropeTcLayout {
  int64_t codes, q_hi, q_lo, p_hi, p_lo, s_part, xs, pv, q_exp, p_exp, tok_scale, tok_slot, mlf, total;
};

QSVD_INLINE NoropeTcLayout norope_tc_layout(int r, int slice_cols, int tile_tokens) {
  NoropeTcLayout s;
  const int64_t ldc = tc_code_stride(r), ldp = tile_tokens + 8;
  int64_t at = 0;
  s.codes = at;      at += round_up(2 * tile_tokens * ldc, 128);                              // fp16 [T, ldc]
  s.q_hi = at;       at += round_up(2 * kTcHeadTile * ldc, 128);                              // fp16 [16, ldc]
  s.q_lo = at;       at += round_up(2 * kTcHeadTile * ldc, 128);
  s.p_hi = at;       at += round_up(2 * kTcHeadTile * ldp, 128);                              // fp16 [16, T + 8]
  s.p_lo = at;       at += round_up(2 * kTcHeadTile * ldp, 128);
  s.s_part = at;     at += round_up(4 * static_cast<int64_t>(kWarps) * 16 * 16, 128);         // fp32 [8][16, 16]
  s.xs = at;         at += round_up(4 * static_cast<int64_t>(kTcHeadTile) * tile_tokens, 128);  // fp32 [16, T]
  s.pv = at;         at += round_up(4 * static_cast<int64_t>(kTcHeadTile) * (slice_cols + 4), 128);  // [16, RS + 4]
  s.q_exp = at;      at += round_up(4 * kTcHeadTile, 128);                                     // int [16]
  s.p_exp = at;      at += round_up(4 * kTcHeadTile, 128);                                     // int [16]
  s.tok_scale = at;  at += round_up(4 * static_cast<int64_t>(tile_tokens), 128);
  s.tok_slot = at;   at += round_up(8 * static_cast<int64_t>(tile_tokens), 128);
  s.mlf = at;        at += 4 * 3 * kTcHeadTile;                                                // m, l, rescale
  s.total = at;
  return s;
}

QSVD_INLINE int norope_tc_head_tiles(const LatentAttentionParams& p) {
  return static_cast<int>(ceil_div(p.H, kTcHeadTile));
}

// Fills the plan fields for the tensor-core split kernel. Returns an empty
// string, or why that kernel cannot serve the shape (the launcher then
// runs the CUDA-core kernel, or raises when QSVD_LATENT_KERNEL=tc).
inline const char* plan_latent_attention_tc(LatentAttentionParams& p, int64_t token_capacity, int sm_count,
                                            size_t smem_limit, int forced_splits) {
  if (p.d > kMaxHeadDim) return "the CUDA kernel serves head dims d <= 256";
  if (p.r > kMaxRank) return "the CUDA kernel serves latent ranks r <= 8192";
  if (p.rope_keys != nullptr) return "the tensor-core kernels do not read cached rotary keys (rope_keys)";
  p.split_kernel = SplitKernel::kTensorCore;
  if (p.rope_cos == nullptr) {
    const int rk = static_cast<int>(round_up(p.r, 16));
    p.r_slices = static_cast<int>(ceil_div(rk, kTcMaxSliceColumns));
    p.slice_cols = static_cast<int>(round_up(ceil_div(rk, p.r_slices), 16));
    int tile = kTcMaxTileTokens;
    while (tile > 16 && static_cast<size_t>(norope_tc_layout(p.r, p.slice_cols, tile).total) > smem_limit) tile -= 16;
    p.tile_tokens = tile;
    p.split_smem = static_cast<size_t>(norope_tc_layout(p.r, p.slice_cols, tile).total);
    if (p.split_smem > smem_limit) return "the tensor-core kernel needs more shared memory than the device offers";
    if (static_cast<int64_t>(norope_tc_head_tiles(p)) * p.r_slices > 65535)
      return "the tensor-core kernel's grid.y (head tiles x latent slices) would exceed 65535";
    plan_splits(p, static_cast<int64_t>(p.B) * norope_tc_head_tiles(p) * p.r_slices, token_capacity, sm_count,
                forced_splits, tile);
    plan_combine(p);
    return "";
  }
  if (p.d % 16 != 0) return "the tensor-core kernel needs d % 16 == 0";
  if (reinterpret_cast<uintptr_t>(p.w_uk) % 16 != 0) return "the tensor-core kernel needs a 16-byte aligned w_uk";
  p.heads_per_cta = plan_heads_per_cta(p);
  const bool i8_mma = p.weight_type == DType::kI8;
  int tile = kTcMaxTileTokens;
  while (tile > 16 && static_cast<size_t>(rope_tc_layout(p.r, p.d, p.heads_per_cta, tile, i8_mma).total) > smem_limit)
    tile -= 16;
  p.tile_tokens = tile;
  p.split_smem = static_cast<size_t>(rope_tc_layout(p.r, p.d, p.heads_per_cta, tile, i8_mma).total);
  if (p.split_smem > smem_limit) return "the tensor-core kernel needs more shared memory than the device offers";
  plan_splits(p, static_cast<int64_t>(p.B) * p.H_kv * head_tiles(p), token_capacity, sm_count, forced_splits, tile);
  plan_combine(p);
  return "";
}

// Run-time knobs of the plan (no recompile); 0 lets the planner choose.
// Every knob is checked against the kernels' limits and the device's shared
// memory; a knob that cannot be honoured makes the plan report why.
struct LatentPlanKnobs {
  int splits = 0;         // KV splits per sequence (capped at one per token tile of capacity)
  int tile_tokens = 0;    // kSimt: multiple of kWarps, <= kMaxTileTokens; kTensorCore: 16..64, multiple of 16
  int heads_per_cta = 0;  // query heads per split CTA (not the no-RoPE tensor-core kernel: 16-head tiles)
  int ctas_per_sm = 2;    // split CTAs per SM the automatic split count aims at
};

enum class KernelChoice : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };

namespace detail {

inline const char* check_heads(const LatentAttentionParams& p, int heads) {
  const int slots_per_head = static_cast<int>(ceil_div(p.r, kThreads));
  if (heads < 1 || heads > kMaxHeadsPerCta || heads > group_size(p))
    return "heads_per_cta must be in [1, min(16, H / H_kv)]";
  if (heads * slots_per_head > kMaxAccSlots) return "heads_per_cta * ceil(r / 256) must be <= 32 (accumulators)";
  return "";
}

}  // namespace detail

// plan_latent_attention / plan_latent_attention_tc with knobs: the default
// knobs give exactly their plan. Returns "" or why the plan cannot be made.
inline const char* plan_latent_attention_knobs(LatentAttentionParams& p, int64_t token_capacity, int sm_count,
                                               size_t smem_limit, const LatentPlanKnobs& k, bool tensor_core) {
  if (k.splits < 0 || k.tile_tokens < 0 || k.heads_per_cta < 0 || k.ctas_per_sm < 1 || k.ctas_per_sm > 64)
    return "plan knobs must be >= 0 (ctas_per_sm in [1, 64])";
  if (sm_count < 1) return "sm_count must be >= 1";
  const char* why = tensor_core ? plan_latent_attention_tc(p, token_capacity, sm_count, smem_limit, k.splits)
                                : plan_latent_attention(p, token_capacity, sm_count, smem_limit, k.splits);
  if (why[0] != '\0') return why;
  const bool rope = p.rope_cos != nullptr;
  const bool norope_tc = tensor_core && !rope;
  if (k.heads_per_cta == 0 && k.tile_tokens == 0 && k.ctas_per_sm == 2) return "";
  // Re-plan with the knobs on top of the automatic plan.
  if (k.heads_per_cta > 0) {
    if (norope_tc) return "the no-RoPE tensor-core kernel has fixed 16-head tiles: heads_per_cta is not a knob there";
    why = detail::check_heads(p, k.heads_per_cta);
    if (why[0] != '\0') return why;
    p.heads_per_cta = k.heads_per_cta;
  }
  const bool i8_mma = p.weight_type == DType::kI8;
  const auto smem_of = [&](int tile) -> size_t {
    if (!tensor_core) return split_smem_bytes(p.r, p.d, rope, p.heads_per_cta, tile, cached_rope_dims(p));
    if (norope_tc) return static_cast<size_t>(norope_tc_layout(p.r, p.slice_cols, tile).total);
    return static_cast<size_t>(rope_tc_layout(p.r, p.d, p.heads_per_cta, tile, i8_mma).total);
  };
  int tile = p.tile_tokens;
  if (k.tile_tokens > 0) {
    tile = k.tile_tokens;
    if (!tensor_core && (tile % kWarps != 0 || tile > kMaxTileTokens))
      return "tile_tokens of the CUDA-core kernel must be a multiple of 8, <= 32";
    if (tensor_core && (tile % 16 != 0 || tile < 16 || tile > kTcMaxTileTokens))
      return "tile_tokens of the tensor-core kernels must be 16, 32, 48 or 64";
  } else if (k.heads_per_cta > 0) {  // the automatic tile for the new head count
    tile = tensor_core ? kTcMaxTileTokens : kMaxTileTokens;
    const int step = tensor_core ? 16 : kWarps;
    while (tile > step && smem_of(tile) > smem_limit) tile -= step;
  }
  if (smem_of(tile) > smem_limit) return "the plan knobs need more shared memory than the device offers per block";
  p.tile_tokens = tile;
  p.split_smem = smem_of(tile);
  const int64_t ctas = norope_tc ? static_cast<int64_t>(p.B) * norope_tc_head_tiles(p) * p.r_slices
                                 : static_cast<int64_t>(p.B) * p.H_kv * head_tiles(p);
  const int split_tile = tensor_core ? tile : kMaxTileTokens;
  // plan_splits aims at 2 CTAs per SM; ctas_per_sm scales the SM count it sees.
  const int64_t scaled_sms = static_cast<int64_t>(sm_count) * k.ctas_per_sm / 2;
  plan_splits(p, ctas, token_capacity, static_cast<int>(scaled_sms > 0 ? scaled_sms : 1), k.splits, split_tile);
  plan_combine(p);
  return "";
}

// The launcher's choice: kAuto takes the tensor-core kernel where it serves
// the shape, else the CUDA-core one. On failure, why (p is then unspecified).
inline const char* plan_latent_attention_auto(LatentAttentionParams& p, int64_t token_capacity, int sm_count,
                                              size_t smem_limit, const LatentPlanKnobs& k, KernelChoice choice) {
  if (choice != KernelChoice::kSimt) {
    LatentAttentionParams tc = p;
    const char* why_tc = plan_latent_attention_knobs(tc, token_capacity, sm_count, smem_limit, k, true);
    if (why_tc[0] == '\0') {
      p = tc;
      return "";
    }
    if (choice == KernelChoice::kTensorCore) return why_tc;
  }
  return plan_latent_attention_knobs(p, token_capacity, sm_count, smem_limit, k, false);
}

// Replays an earlier plan `planned` (made for the same sizes by any of the
// functions above) on p: re-plans with its choices as knobs (kernel, splits,
// tile, heads per CTA; the split count forced, so no SM count enters) and
// returns "" when every derived field equals planned's, else why. The plan
// object of latent_attention is checked this way, so an edited plan, or one
// from another build, cannot reach a kernel. Replaying a plan gives it back
// exactly (split_tokens = round_up(ceil(cap / splits), tile) is a fixed
// point; cpp_tests/test_latent_plan.cpp).
inline const char* replay_latent_plan(LatentAttentionParams& p, const LatentAttentionParams& planned,
                                      int64_t token_capacity, size_t smem_limit) {
  const bool tc = planned.split_kernel == SplitKernel::kTensorCore;
  if (planned.splits < 1 || planned.splits > kMaxSplits || planned.tile_tokens < 1 || planned.heads_per_cta < 1)
    return "the plan's splits, tile or heads per CTA are out of range";
  LatentPlanKnobs k;
  k.splits = planned.splits;
  k.tile_tokens = planned.tile_tokens;
  k.heads_per_cta = tc && p.rope_cos == nullptr ? 0 : planned.heads_per_cta;  // fixed 16-head tiles there
  const char* why = plan_latent_attention_knobs(p, token_capacity, 1, smem_limit, k, tc);
  if (why[0] != '\0') return why;
  if (p.split_kernel != planned.split_kernel || p.heads_per_cta != planned.heads_per_cta ||
      p.tile_tokens != planned.tile_tokens || p.splits != planned.splits || p.split_tokens != planned.split_tokens ||
      p.r_slices != planned.r_slices || p.slice_cols != planned.slice_cols || p.split_smem != planned.split_smem ||
      p.combine_heads != planned.combine_heads || p.combine_smem != planned.combine_smem)
    return "its fields are not the ones its own choices give (edited, or made by another build)";
  return "";
}

}  // namespace latent
}  // namespace qsvd
