// What the CPU latent-attention paths share (one translation unit,
// latent_attention.cpp, includes this and the three path headers):
// parallel tasks, reading a sequence's latent rows, the up-projection
// GEMM operand with its RoPE epilogue, the weights in their stored type,
// and the outer loop's interface to a path (`TileWorker`, below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "../checks.h"
#include "cpu_paths.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/latent_cache_layout.h"

namespace qsvd_torch {
namespace latent_cpu {

// at::parallel_for's OpenMP threads start without the caller's thread-local
// dispatch state: a tensor op inside a task on a tensor made under
// torch.inference_mode (vLLM runs its models so) would raise "Inplace update
// to inference tensor outside InferenceMode". Each task re-enters the
// caller's mode.
template <class F>
inline void parallel_tasks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    c10::InferenceMode guard(inference);
    f(b, e);
  });
}

// Token tiles: the RoPE path rebuilds [T, H_kv d] per tile (1 MiB at
// H_kv d = 4096), the absorbed path keeps [T, r] fp32 codes in cache.
// qsvd_kernels/testing.py (CPU_TILE_TOKENS) uses these in the error bound.
constexpr int64_t kTileRope = 64;
constexpr int64_t kTileAbsorbed = 256;

// Read access to one sequence's latent rows in the paged cache (either
// layout: qsvd/latent_cache_layout.h).
struct LatentRows {
  qsvd::LatentCacheLayout layout;
  const int32_t* block_row;  // block_table[b]
  int64_t block_size, r;
  int bits;

  // The flat cache slot of token t.
  int64_t slot(int64_t t) const { return static_cast<int64_t>(block_row[t / block_size]) * block_size + t % block_size; }

  // Tokens [t0, t0 + T) -> int8 codes [T, r] and scales [T].
  void gather(int64_t t0, int64_t T, int8_t* codes, float* scales) const {
    for (int64_t i = 0; i < T; ++i) {
      const int64_t slot = this->slot(t0 + i);
      qsvd::cpu::unpack_codes_row(layout.codes_of(slot), r, bits, codes + i * r);
      std::memcpy(scales + i, layout.scale_of(slot), sizeof(float));
    }
  }
};

struct Prepared {
  at::Tensor cache, block_table, seq_lens, cos, sin;
  std::optional<at::Tensor> cache_scale;
  qsvd::LatentCacheLayout layout;
  int64_t total_tokens;
};

inline Prepared prepare(const char* op, const LatentShape& s, int64_t bits, const at::Tensor& cache,
                 const std::optional<at::Tensor>& cache_scale,
                 const at::Tensor& block_table, const at::Tensor& seq_lens, const std::optional<at::Tensor>& rope_cos,
                 const std::optional<at::Tensor>& rope_sin) {
  Prepared p;
  p.block_table = block_table.contiguous();
  p.seq_lens = seq_lens.contiguous();
  p.total_tokens = check_paged_indices_host(op, p.seq_lens, p.block_table, s, s.rope ? rope_cos->size(0) : 0);
  p.cache = cache.contiguous();  // packed rows are contiguous already (checked)
  if (cache_scale.has_value()) p.cache_scale = cache_scale->contiguous();
  p.layout = latent_cache_layout(p.cache, p.cache_scale, bits, s.r);
  if (s.rope) {
    p.cos = rope_cos->contiguous();
    p.sin = rope_sin->contiguous();
  }
  return p;
}

inline LatentRows rows_of(const Prepared& p, const LatentShape& s, int64_t b, int64_t bits) {
  return {p.layout, p.block_table.data_ptr<int32_t>() + b * s.max_blocks, s.block_size, s.r,
          static_cast<int>(bits)};
}

// The up-projection of every kv head as one GEMM operand [r, H_kv d]:
// int8 (exact int32 GEMM) when the weights are int8 and at::_int_mm is
// exact, fp32 (exact copies of fp16/bf16/int8 values) otherwise.
struct Rebuild {
  at::Tensor w;      // [r, H_kv d]
  at::Tensor scale;  // fp32 [H_kv d] (int8 weights) or undefined
  bool int8_gemm;
};

inline Rebuild rebuild_operand(const at::Tensor& w_in, const std::optional<at::Tensor>& scale) {
  const int64_t H_kv = w_in.size(0), r = w_in.size(1), d = w_in.size(2);
  Rebuild rb;
  rb.int8_gemm = w_in.scalar_type() == at::kChar && cpu::int_mm_fast();  // oneDNN off: the fp32 GEMM
  rb.w = at::empty({r, H_kv, d}, w_in.options().dtype(rb.int8_gemm ? at::kChar : at::kFloat));
  rb.w.copy_(w_in.permute({1, 0, 2}));
  rb.w = rb.w.view({r, H_kv * d});
  if (scale.has_value()) rb.scale = scale->to(at::kFloat).contiguous().view({H_kv * d});
  return rb;
}

// out[T, E] (fp32, row stride E) = (codes x W) (* scale per column): the
// exact int32 sum rounded once, then the weight scale; or an fp32 GEMM.
inline void rebuild_tile(const Rebuild& rb, const at::Tensor& codes /* int8 [T, r] */, const at::Tensor& codes_f,
                  at::Tensor& out /* fp32 [T, E] */) {
  const int64_t T = codes.size(0), E = rb.w.size(1);
  if (rb.int8_gemm) {
    const at::Tensor acc = at::_int_mm(codes, rb.w);
    const int32_t* a = acc.data_ptr<int32_t>();
    const float* ws = rb.scale.data_ptr<float>();
    float* o = out.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) o[t * E + e] = static_cast<float>(a[t * E + e]) * ws[e];
    return;
  }
  at::mm_out(out, codes_f, rb.w);
  if (rb.scale.defined()) {  // int8 weights on the fp32 GEMM (no exact int8 GEMM on this CPU)
    const float* ws = rb.scale.data_ptr<float>();
    float* o = out.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) o[t * E + e] = o[t * E + e] * ws[e];
  }
}

// In place on k [E = H_kv d] of one token: k * s_t, then rotate-half RoPE
// over the first d_rope dims of each head (cos, sin: that row of the
// [max_position, d_rope] tables, or nullptr for none): k_j cos_j -
// k_{j+h} sin_j (j < h = d_rope / 2), k_j cos_j + k_{j-h} sin_j (h <= j <
// d_rope); dims from d_rope on are only scaled (position-free).
inline void scale_and_rope(float* k, int64_t H_kv, int64_t d, int64_t d_rope, float s_t, const float* cos,
                           const float* sin, float* tmp) {
  const int64_t half = d_rope / 2;
  for (int64_t h = 0; h < H_kv; ++h) {
    float* kh = k + h * d;
    for (int64_t j = 0; j < d; ++j) tmp[j] = kh[j] * s_t;
    if (cos == nullptr) {
      for (int64_t j = 0; j < d; ++j) kh[j] = tmp[j];
      continue;
    }
    for (int64_t j = 0; j < half; ++j) kh[j] = tmp[j] * cos[j] - tmp[j + half] * sin[j];
    for (int64_t j = half; j < d_rope; ++j) kh[j] = tmp[j] * cos[j] + tmp[j - half] * sin[j];
    for (int64_t j = d_rope; j < d; ++j) kh[j] = tmp[j];
  }
}

// fp32 copy of one kv head's weights [r, d] (exact for fp16/bf16/int8).
inline void head_weights_f32(const at::Tensor& w, int64_t hk, at::Tensor& buf) { buf.copy_(w.select(0, hk)); }

// The weights' element type (fp16, bf16 or int8: what
// check_latent_cache_and_weights admits).
inline qsvd::DType weight_type(const at::Tensor& w) { return to_dtype("latent_attention", w.scalar_type()); }

// One kv head's [r, d] weights in their stored type.
inline const void* head_ptr(const at::Tensor& w /* contiguous [H_kv, r, d] */, int64_t hk) {
  return static_cast<const char*>(w.const_data_ptr()) + hk * w.stride(0) * w.element_size();
}

// A task: tokens [t0, t1) of sequence b.
struct Task {
  int64_t b, t0, t1;
};

// The per-call state every path reads (made once per call by
// latent_attention_cpu's plan).
struct Call {
  const Prepared& p;
  const LatentShape& s;
  int64_t bits, H, G, E, tile;
  at::Tensor q;      // fp32 [B, H, d_rope], q * score_scale, its rotary dims (RoPE path)
  at::Tensor q_lat;  // fp32 [B, H, r], W_uk q' over the position-free dims (absorbed paths, partial RoPE)
  at::Tensor rope_keys = {};  // fp16 [num_blocks, block_size, H_kv, d_rope]: K's rotary part cached, or undefined
};

// Cached rotary keys of tokens [t0, t0 + T) -> fp32 [T, H_kv d_rope] (row stride E).
inline void gather_rope_keys(const at::Tensor& rope_keys, const LatentRows& rows, int64_t t0, int64_t T, int64_t E,
                             float* out) {
  const at::Half* base = rope_keys.const_data_ptr<at::Half>();
  for (int64_t i = 0; i < T; ++i) {
    const at::Half* src = base + rows.slot(t0 + i) * E;
    if (qsvd::cpu::half_to_float_row(reinterpret_cast<const uint16_t*>(src), E, out + i * E)) continue;
    for (int64_t e = 0; e < E; ++e) out[i * E + e] = static_cast<float>(src[e]);  // the baseline ISA level
  }
}

// A path, as the one outer loop (latent_attention.cpp, run_tasks) drives
// it: one worker per task thread, buffers sized for one tile.
//   begin_task(b)                      a task of sequence b starts (acc zeroed)
//   scores(codes, scales, t0, T) -> x  the gathered tile (int8 [T, r], s_t) ->
//                                      scores fp32 [H, T] in log2 units
//   accumulate(acc, factor, rescale, pw, T)
//                                      acc = acc * factor + pw[H, T] x codes
//   end_task(acc)                      the task's accumulator is final
// The V accumulation on fp32 GEMMs is shared by the RoPE and absorbed fp32
// paths (Fp32Values).
struct Fp32Values {
  at::Tensor codes_f;  // fp32 [tile, r]: the tile's codes (exact)

  Fp32Values(const Call& c) : codes_f(at::empty({c.tile, c.s.r}, c.q.options().dtype(at::kFloat))) {}
  at::Tensor tile_codes(const at::Tensor& codes, int64_t T) {
    at::Tensor cf = codes_f.narrow(0, 0, T);
    qsvd::cpu::int8_to_float(codes.data_ptr<int8_t>(), T * codes.size(1), cf.data_ptr<float>());
    return cf;
  }
  // pw: [H, tile] (the first T columns hold this tile's p_t s_t).
  void accumulate(at::Tensor& acc, const float* factor, bool rescale, const at::Tensor& pw, int64_t T) {
    const int64_t H = acc.size(0);
    if (rescale)
      acc.mul_(at::from_blob(const_cast<float*>(factor), {H, 1}, acc.options()));
    acc.addmm_(pw.narrow(1, 0, T), codes_f.narrow(0, 0, T));
  }
  void begin_task(int64_t) {}
  void end_task(at::Tensor&) {}
};

}  // namespace latent_cpu
}  // namespace qsvd_torch
