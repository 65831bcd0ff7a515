#include "checks.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace qsvd_torch {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_dtype_in(const char* op, const char* name, const at::Tensor& t,
                    std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed)
    if (t.scalar_type() == d) return;
  std::ostringstream os;
  bool first = true;
  for (auto d : allowed) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  QSVD_CHECK(false, op, "`", name, "` must have dtype in {", os.str(), "}, got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  QSVD_CHECK(t.dim() == dim, op, "`", name, "` must be ", dim, "-D, got shape ", shape_str(t));
}

void check_same_device(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                       const at::Tensor& t) {
  QSVD_CHECK(t.device() == ref.device(), op, "`", name, "` is on ", t.device(), " but `", ref_name,
             "` is on ", ref.device(), "; all tensors must be on the same device");
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  QSVD_CHECK(t.is_contiguous(), op, "`", name, "` is written in place and must be contiguous");
}

void check_bits(const char* op, const char* name, int64_t bits) {
  QSVD_CHECK_VALUE(qsvd::is_code_bits(bits), op, "`", name, "` must be 4 or 8, got ", bits);
}

void check_clip_ratio(const char* op, double clip_ratio) {
  QSVD_CHECK_VALUE(clip_ratio > 0.0 && clip_ratio <= 1.0, op, "`clip_ratio` must be in (0, 1], got ",
                   clip_ratio);
}

at::ScalarType code_dtype(int64_t bits) {
  return qsvd::code_format(static_cast<int>(bits)).storage == qsvd::DType::kU8 ? at::kByte : at::kChar;
}

namespace {

void check_codes(const char* op, const char* name, const at::Tensor& t, int64_t bits, const char* bits_name) {
  QSVD_CHECK(t.scalar_type() == code_dtype(bits), op, "`", name, "` must be ",
             bits == 4 ? "uint8 (packed INT4)" : "int8", " for ", bits_name, "=", bits, ", got ",
             t.scalar_type());
}

// The paged latent cache. Separate layout (`cache_scale` given): codes
// [num_blocks, block_size, r or r/2] in the dtype of `bits`, scales
// [num_blocks, block_size] fp32. Packed rows (`cache_scale` None): one uint8
// tensor [num_blocks, block_size, row_bytes + 4], each row its codes then its
// fp32 scale; row_bytes % 4 == 0 (aligned scales), contiguous, 4-byte aligned
// start. `r_from` names where r came from, for the messages.
void check_paged_cache(const char* op, const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                       int64_t bits, int64_t r, const char* r_from) {
  check_dim(op, "cache", cache, 3);
  if (!cache_scale.has_value()) {
    QSVD_CHECK(cache.scalar_type() == at::kByte, op,
               "`cache` must be uint8 (packed rows: each token's codes, then its fp32 scale) when `cache_scale` "
               "is None, got ",
               cache.scalar_type());
  } else {
    check_codes(op, "cache", cache, bits, "bits");
  }
  if (bits == 4)
    QSVD_CHECK_VALUE(r % 2 == 0, op, "r = ", r_from, " = ", r, " must be even for bits=4 (two codes per byte)");
  const int64_t row_bytes = qsvd::code_row_bytes(static_cast<int>(bits), r);
  if (!cache_scale.has_value()) {
    QSVD_CHECK(row_bytes % qsvd::kLatentScaleBytes == 0, op, "`cache` with packed rows (`cache_scale` None) needs ",
               bits == 4 ? "r / 2 = " : "r = ", row_bytes, " code bytes per row to be a multiple of 4, so that ",
               "each row's fp32 scale is 4-byte aligned; r = ", r_from, " = ", r, " at bits=", bits,
               " (use the separate layout with a `cache_scale` tensor)");
    const int64_t want = qsvd::packed_row_bytes(static_cast<int>(bits), r);
    QSVD_CHECK(cache.size(2) == want, op, "`cache`.size(2) = ", cache.size(2), " must be ",
               bits == 4 ? "r / 2 + 4 = " : "r + 4 = ", want, " (packed rows: ", row_bytes,
               " code bytes, then the fp32 scale) for r = ", r_from, " = ", r, " at bits=", bits);
    QSVD_CHECK(cache.is_contiguous(), op, "`cache` with packed rows (`cache_scale` None) must be contiguous, got ",
               "strides ", cache.strides());
    QSVD_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % qsvd::kLatentScaleBytes == 0, op,
               "`cache` with packed rows (`cache_scale` None) must start at a 4-byte aligned address (its fp32 "
               "scales are read in place)");
    return;
  }
  QSVD_CHECK(cache.size(2) == row_bytes, op, "`cache`.size(2) = ", cache.size(2), " must be ",
             bits == 4 ? "r / 2 = " : "r = ", row_bytes, " for r = ", r_from, " = ", r, " at bits=", bits);
  const at::Tensor& scale = *cache_scale;
  check_dim(op, "cache_scale", scale, 2);
  check_dtype_in(op, "cache_scale", scale, {at::kFloat});
  QSVD_CHECK(scale.size(0) == cache.size(0) && scale.size(1) == cache.size(1), op,
             "`cache_scale` must have shape [num_blocks, block_size] = [", cache.size(0), ", ", cache.size(1),
             "], got ", shape_str(scale));
}

void check_optional_same_device(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                                const std::optional<at::Tensor>& t) {
  if (t.has_value()) check_same_device(op, ref_name, ref, name, *t);
}

}  // namespace

qsvd::LatentCacheLayout latent_cache_layout(const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                            int64_t bits, int64_t r) {
  if (cache_scale.has_value())
    return qsvd::separate_latent_layout(cache.data_ptr(), cache_scale->data_ptr(), static_cast<int>(bits), r);
  return qsvd::packed_latent_layout(cache.data_ptr(), static_cast<int>(bits), r);
}

HadamardShape check_hadamard(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  check_dtype_in(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  QSVD_CHECK(x.dim() >= 1, op, "`x` must have at least one dimension, got a scalar");
  const int64_t K = x.size(-1);
  const auto f = qsvd::hadamard::factorize(K);
  QSVD_CHECK_VALUE(f.m != 0, op, "`x`.size(-1) = ", K,
                   " is not a supported Hadamard size: it must be 2^n, or 12, 20, 28 or 36 times 2^n "
                   "(40 * 2^n is 20 * 2^(n+1)), and at most ",
                   qsvd::hadamard::kMaxDim);
  if (signs.has_value()) {
    const at::Tensor& s = *signs;
    check_same_device(op, "x", x, "signs", s);
    check_dtype_in(op, "signs", s, {at::kFloat});
    QSVD_CHECK(s.dim() == 1 && s.size(0) == K, op, "`signs` must have shape [", K, "] (the size of `x`'s last ",
               "dimension), got ", shape_str(s));
  }
  return {K, x.numel() / K, f};
}

HadamardShape check_hadamard_quant(const at::Tensor& x, int64_t bits, double clip_ratio,
                                   const std::optional<at::Tensor>& signs) {
  const char* op = "hadamard_quant";
  check_bits(op, "bits", bits);
  check_clip_ratio(op, clip_ratio);
  const HadamardShape s = check_hadamard(op, x, signs);
  QSVD_CHECK_VALUE(bits == 8 || s.K % 2 == 0, op, "`x`.size(-1) = ", s.K,
                   " must be even for bits=4 (two codes per byte)");
  return s;
}

GemmShape check_quant_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits,
                           at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  const char* op = "quant_gemm";
  check_bits(op, "a_bits", a_bits);
  check_bits(op, "b_bits", b_bits);
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_codes(op, "a", a, a_bits, "a_bits");
  check_codes(op, "b", b, b_bits, "b_bits");
  check_same_device(op, "a", a, "b", b);
  check_same_device(op, "a", a, "a_scale", a_scale);
  check_same_device(op, "a", a, "b_scale", b_scale);
  check_optional_same_device(op, "a", a, "bias", bias);
  const int64_t M = a.size(0), N = b.size(0);
  const int64_t K = a.size(1) * qsvd::code_format(static_cast<int>(a_bits)).codes_per_byte;
  const int64_t Kb = b.size(1) * qsvd::code_format(static_cast<int>(b_bits)).codes_per_byte;
  QSVD_CHECK(K == Kb, op, "`a` and `b` disagree on K: `a` ", shape_str(a), " at a_bits=", a_bits, " has K = ", K,
             ", `b` ", shape_str(b), " at b_bits=", b_bits, " has K = ", Kb);
  QSVD_CHECK_VALUE(K <= kMaxGemmK, op, "K = ", K, " (from `a`) exceeds ", kMaxGemmK,
                   ", beyond which int32 sums of INT8 products could overflow");
  check_dtype_in(op, "a_scale", a_scale, {at::kFloat});
  check_dtype_in(op, "b_scale", b_scale, {at::kFloat});
  QSVD_CHECK(a_scale.dim() == 1 && a_scale.size(0) == M, op, "`a_scale` must have shape [M] = [", M,
             "] (one scale per row of `a`), got ", shape_str(a_scale));
  QSVD_CHECK(b_scale.dim() == 1 && b_scale.size(0) == N, op, "`b_scale` must have shape [N] = [", N,
             "] (one scale per row of `b`), got ", shape_str(b_scale));
  QSVD_CHECK_VALUE(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat, op,
                   "`out_dtype` must be float16, bfloat16 or float32, got ", out_dtype);
  if (bias.has_value()) {
    QSVD_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "`bias` must have shape [N] = [", N, "], got ",
               shape_str(*bias));
    QSVD_CHECK(bias->scalar_type() == out_dtype, op, "`bias` must have dtype `out_dtype` = ", out_dtype, ", got ",
               bias->scalar_type());
  }
  return {M, N, K};
}

CacheAppendShape check_latent_cache_append(const at::Tensor& c, const at::Tensor& slot_mapping,
                                           const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                           int64_t bits, double clip_ratio) {
  const char* op = "latent_cache_append";
  check_bits(op, "bits", bits);
  check_clip_ratio(op, clip_ratio);
  check_dim(op, "c", c, 2);
  check_dtype_in(op, "c", c, {at::kFloat, at::kHalf, at::kBFloat16});
  check_same_device(op, "c", c, "slot_mapping", slot_mapping);
  check_same_device(op, "c", c, "cache", cache);
  check_optional_same_device(op, "c", c, "cache_scale", cache_scale);
  const int64_t T = c.size(0), r = c.size(1);
  check_dim(op, "slot_mapping", slot_mapping, 1);
  check_dtype_in(op, "slot_mapping", slot_mapping, {at::kLong, at::kInt});
  QSVD_CHECK(slot_mapping.size(0) == T, op, "`slot_mapping` must have one slot per row of `c` (", T, "), got ",
             shape_str(slot_mapping));
  check_paged_cache(op, cache, cache_scale, bits, r, "`c`.size(1)");
  check_contiguous(op, "cache", cache);
  if (cache_scale.has_value()) check_contiguous(op, "cache_scale", *cache_scale);
  return {T, r, cache.size(0), cache.size(1), !cache_scale.has_value()};
}

void check_slot_mapping_host(const at::Tensor& slots_cpu, const CacheAppendShape& s) {
  const char* op = "latent_cache_append";
  const int64_t* sp = slots_cpu.data_ptr<int64_t>();
  const int64_t num_slots = s.num_blocks * s.block_size;
  for (int64_t i = 0; i < s.T; ++i)
    QSVD_CHECK_VALUE(sp[i] < num_slots, op, "`slot_mapping`[", i, "] = ", sp[i], " is past the end of the cache (",
                     s.num_blocks, " blocks of ", s.block_size, " = ", num_slots, " slots)");
}

LatentShape check_latent_cache_and_weights(const char* op, QSVD_LATENT_CACHE_PARAMS, QSVD_ROPE_PARAMS) {
  check_bits(op, "bits", bits);
  check_optional_same_device(op, "cache", cache, "cache_scale", cache_scale);
  check_same_device(op, "cache", cache, "block_table", block_table);
  check_same_device(op, "cache", cache, "seq_lens", seq_lens);
  check_same_device(op, "cache", cache, "w_uk", w_uk);
  check_same_device(op, "cache", cache, "w_uv", w_uv);
  check_optional_same_device(op, "cache", cache, "w_uk_scale", w_uk_scale);
  check_optional_same_device(op, "cache", cache, "w_uv_scale", w_uv_scale);
  check_optional_same_device(op, "cache", cache, "rope_cos", rope_cos);
  check_optional_same_device(op, "cache", cache, "rope_sin", rope_sin);

  check_dim(op, "w_uk", w_uk, 3);
  check_dtype_in(op, "w_uk", w_uk, {at::kHalf, at::kBFloat16, at::kChar});
  const int64_t H_kv = w_uk.size(0), r = w_uk.size(1), d = w_uk.size(2);
  QSVD_CHECK(H_kv >= 1 && r >= 1 && d >= 1, op, "`w_uk` must be [H_kv, r, d] with every size >= 1, got ",
             shape_str(w_uk));
  QSVD_CHECK(w_uv.sizes() == w_uk.sizes(), op, "`w_uv` must have the shape of `w_uk` [H_kv, r, d] = ",
             shape_str(w_uk), ", got ", shape_str(w_uv));
  QSVD_CHECK(w_uv.scalar_type() == w_uk.scalar_type(), op, "`w_uv` must have the dtype of `w_uk` (",
             w_uk.scalar_type(), "), got ", w_uv.scalar_type());
  const bool int8_weights = w_uk.scalar_type() == at::kChar;
  const std::pair<const char*, const std::optional<at::Tensor>*> scales[] = {{"w_uk_scale", &w_uk_scale},
                                                                            {"w_uv_scale", &w_uv_scale}};
  for (const auto& [name, scale] : scales) {
    if (int8_weights) {
      QSVD_CHECK(scale->has_value(), op, "`", name, "` is required with int8 weights (one scale per [kv head, ",
                 "output channel])");
      check_dtype_in(op, name, **scale, {at::kFloat});
      QSVD_CHECK((*scale)->dim() == 2 && (*scale)->size(0) == H_kv && (*scale)->size(1) == d, op, "`", name,
                 "` must have shape [H_kv, d] = [", H_kv, ", ", d, "], got ", shape_str(**scale));
    } else {
      QSVD_CHECK(!scale->has_value(), op, "`", name, "` must be None for ", w_uk.scalar_type(),
                 " weights (scales belong to int8 weights)");
    }
  }

  check_paged_cache(op, cache, cache_scale, bits, r, "`w_uk`.size(1)");

  check_dim(op, "block_table", block_table, 2);
  check_dtype_in(op, "block_table", block_table, {at::kInt});
  check_dim(op, "seq_lens", seq_lens, 1);
  check_dtype_in(op, "seq_lens", seq_lens, {at::kInt});
  QSVD_CHECK(seq_lens.size(0) == block_table.size(0), op, "`seq_lens` must have one length per row of ",
             "`block_table` (", block_table.size(0), "), got ", shape_str(seq_lens));

  QSVD_CHECK(rope_cos.has_value() == rope_sin.has_value(), op,
             "`rope_cos` and `rope_sin` must be given together (RoPE) or both be None (no RoPE)");
  // RoPE tables [max_position, d_rope]: the first d_rope dims of each head
  // are rotary (rotate-half over those d_rope dims), the rest position-free
  // (partial RoPE; d_rope = d is full RoPE).
  int64_t d_rope = 0;
  if (rope_cos.has_value()) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"rope_cos", &*rope_cos},
                                  std::pair<const char*, const at::Tensor*>{"rope_sin", &*rope_sin}}) {
      check_dtype_in(op, name, *t, {at::kFloat});
      QSVD_CHECK(t->dim() == 2 && t->size(1) >= 2 && t->size(1) <= d && t->size(1) % 2 == 0, op, "`", name,
                 "` must have shape [max_position, d_rope] with d_rope even, 2 <= d_rope <= d = ", d,
                 " (the first d_rope dims of each head are rotary), got ", shape_str(*t));
    }
    QSVD_CHECK(rope_cos->sizes() == rope_sin->sizes(), op, "`rope_cos` ", shape_str(*rope_cos),
               " and `rope_sin` ", shape_str(*rope_sin), " must have the same shape");
    d_rope = rope_cos->size(1);
  }
  return {block_table.size(0), H_kv,          r, d, cache.size(0), cache.size(1), block_table.size(1),
          rope_cos.has_value(), int8_weights, !cache_scale.has_value(), d_rope};
}

void check_rope_keys(const char* op, const at::Tensor& rope_keys, const LatentShape& s, const at::Tensor& cache) {
  QSVD_CHECK_VALUE(s.rope, op, "`rope_keys` needs the RoPE tables `rope_cos`, `rope_sin` (their width is d_rope)");
  check_same_device(op, "cache", cache, "rope_keys", rope_keys);
  check_dtype_in(op, "rope_keys", rope_keys, {at::kHalf});
  QSVD_CHECK(rope_keys.dim() == 4 && rope_keys.size(0) == s.num_blocks && rope_keys.size(1) == s.block_size &&
                 rope_keys.size(2) == s.H_kv && rope_keys.size(3) == s.d_rope,
             op, "`rope_keys` must have shape [num_blocks, block_size, H_kv, d_rope] = [", s.num_blocks, ", ",
             s.block_size, ", ", s.H_kv, ", ", s.d_rope, "], got ", shape_str(rope_keys));
  QSVD_CHECK(rope_keys.is_contiguous(), op, "`rope_keys` must be contiguous");
}

LatentShape check_latent_rope_keys_append(const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
                                          const at::Tensor& slot_mapping, const at::Tensor& positions,
                                          const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
                                          int64_t bits, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                          const at::Tensor& rope_keys) {
  const char* op = "latent_rope_keys_append";
  // The cache, weight and table checks of the attention ops, with an empty
  // batch (no block_table or seq_lens here) and w_uk standing for w_uv.
  const auto i32 = cache.options().dtype(at::kInt);
  LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, at::zeros({0, 1}, i32), at::zeros({0}, i32),
                                                 w_uk, w_uk_scale, w_uk, w_uk_scale, bits, rope_cos, rope_sin);
  check_rope_keys(op, rope_keys, s, cache);
  check_same_device(op, "cache", cache, "slot_mapping", slot_mapping);
  check_same_device(op, "cache", cache, "positions", positions);
  check_dim(op, "slot_mapping", slot_mapping, 1);
  check_dtype_in(op, "slot_mapping", slot_mapping, {at::kLong, at::kInt});
  check_dim(op, "positions", positions, 1);
  check_dtype_in(op, "positions", positions, {at::kLong, at::kInt});
  QSVD_CHECK(positions.size(0) == slot_mapping.size(0), op, "`positions` must have one position per slot (",
             slot_mapping.size(0), "), got ", shape_str(positions));
  return s;
}

void check_rope_keys_rows_host(const char* op, const at::Tensor& slots, const at::Tensor& positions, int64_t num_slots,
                               int64_t rope_len) {
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    if (sp[i] < 0) continue;  // padding
    QSVD_CHECK_VALUE(sp[i] < num_slots, op, "`slot_mapping`[", i, "] = ", sp[i], " is past the end of the cache (",
                     num_slots, " slots)");
    QSVD_CHECK_VALUE(pp[i] >= 0 && pp[i] < rope_len, op, "`positions`[", i, "] = ", pp[i],
                     " is outside the RoPE table [0, ", rope_len, ")");
  }
}

void check_rope_keys_in_range(const char* op, int64_t overflow_row) {
  // fp16 holds |k| < 65520: a key past it would turn the scores infinite.
  QSVD_CHECK_VALUE(overflow_row < 0, op, "the rotary key of row ", overflow_row,
                   " exceeds fp16's range (|k| >= 65520), so `rope_keys` cannot hold it; serve this layer with its "
                   "rotary keys rebuilt from the latent (rope_key_cache='rebuilt')");
}

void check_cuda_rope_form(const char* op, const LatentShape& s, bool rope_keys) {
  QSVD_CHECK_VALUE(!s.rope || s.d_rope == s.d || rope_keys, op, "partial RoPE (`rope_cos` of width d_rope = ",
                   s.d_rope, " < d = ", s.d, ") with K's rotary part rebuilt is not implemented in the CUDA "
                   "kernels; pass the cached rotary keys `rope_keys` (latent_rope_keys_append; "
                   "rope_key_cache='cached' in the integrations), or run on the CPU");
}

LatentShape check_latent_attention(const at::Tensor& q, QSVD_LATENT_CACHE_PARAMS, double sm_scale, QSVD_ROPE_PARAMS,
                                   int64_t* num_heads) {
  const char* op = "latent_attention";
  check_same_device(op, "cache", cache, "q", q);
  const LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, block_table, seq_lens, w_uk,
                                                       w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin);
  check_dim(op, "q", q, 3);
  check_dtype_in(op, "q", q, {at::kHalf, at::kBFloat16, at::kFloat});
  QSVD_CHECK(q.size(0) == s.B, op, "`q`.size(0) = ", q.size(0), " must equal the batch size `block_table`.size(0) = ",
             s.B);
  QSVD_CHECK(q.size(2) == s.d, op, "`q`.size(2) = ", q.size(2), " must equal the head dim `w_uk`.size(2) = ", s.d);
  const int64_t H = q.size(1);
  QSVD_CHECK(H >= 1 && H % s.H_kv == 0, op, "`q`.size(1) = H = ", H,
             " must be a positive multiple of H_kv = `w_uk`.size(0) = ", s.H_kv, " (grouped-query attention)");
  QSVD_CHECK_VALUE(std::isfinite(sm_scale), op, "`sm_scale` must be finite, got ", sm_scale);
  *num_heads = H;
  return s;
}

int64_t check_paged_indices_host(const char* op, const at::Tensor& seq_lens_cpu, const at::Tensor& block_table_cpu,
                                 const LatentShape& s, int64_t rope_positions) {
  const int32_t* lens = seq_lens_cpu.data_ptr<int32_t>();
  const int32_t* table = block_table_cpu.data_ptr<int32_t>();
  const int64_t capacity = s.max_blocks * s.block_size;
  int64_t total = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t L = lens[b];
    QSVD_CHECK_VALUE(L >= 0, op, "`seq_lens`[", b, "] = ", L, " is negative");
    QSVD_CHECK_VALUE(L <= capacity, op, "`seq_lens`[", b, "] = ", L, " exceeds what `block_table` can address (",
                     s.max_blocks, " blocks of ", s.block_size, " = ", capacity, " tokens)");
    if (s.rope)
      QSVD_CHECK_VALUE(L <= rope_positions, op, "`seq_lens`[", b, "] = ", L,
                       " exceeds the RoPE table length `rope_cos`.size(0) = ", rope_positions);
    const int64_t used = L == 0 ? 0 : (L + s.block_size - 1) / s.block_size;  // block_size 0 allows only L = 0
    for (int64_t j = 0; j < used; ++j) {
      const int64_t blk = table[b * s.max_blocks + j];
      QSVD_CHECK_VALUE(blk >= 0 && blk < s.num_blocks, op, "`block_table`[", b, ", ", j, "] = ", blk,
                       " is outside the cache's [0, ", s.num_blocks, ") blocks");
    }
    total += L;
  }
  return total;
}

at::ScalarType reconstruct_out_dtype(const char* op, const at::Tensor& w_uk, std::optional<at::ScalarType> out_dtype) {
  if (out_dtype.has_value()) {
    QSVD_CHECK_VALUE(*out_dtype == at::kHalf || *out_dtype == at::kBFloat16 || *out_dtype == at::kFloat, op,
                     "`out_dtype` must be float16, bfloat16 or float32, got ", *out_dtype);
    return *out_dtype;
  }
  return w_uk.scalar_type() == at::kChar ? at::kHalf : w_uk.scalar_type();
}

}  // namespace qsvd_torch
