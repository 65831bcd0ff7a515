// CPU latent_attention (decode) and latent_reconstruct_kv (prefill), built on
// torch's GEMMs: oneDNN int8 (at::_int_mm, exact int32 sums) and MKL /
// oneDNN fp32 (at::mm, at::bmm, at::addmm). The element-wise parts (scales,
// RoPE, online softmax) are plain fp32 loops.
//
// latent_attention, one task per (sequence, token split), each a sequence of
// token tiles (flash-decoding on the CPU):
//   1. gather the tile's codes through block_table into int8 [T, r] (INT4
//      unpacked) and its token scales s_t;
//   2. scores, in log2 units (score_scale = fl(sm_scale log2 e) is folded
//      into the query):
//      RoPE: K~ = codes x W_uk for every kv head at once, one GEMM
//        [T, r] x [r, H_kv d]: int8 x int8 -> exact int32 (at::_int_mm) for
//        int8 weights, fp32 (at::mm; codes and weights are exact in fp32)
//        otherwise; k = RoPE((K~ * w_uk_scale) * s_t); x = q' . k (at::bmm
//        over kv heads);
//      no RoPE: x = (c_t . q_lat) * s_t with q_lat = W_uk q' computed once
//        per call, all heads sharing the latent: by default int8 digits of
//        q_lat against the int8 codes on torch's int8 brgemm (exact int32
//        sums; see "split-precision GEMMs" below), else at::mm in fp32;
//   3. online softmax in base 2 with an integer running max M, so every
//      rescale is an exact power of two (as the CUDA kernels);
//   4. V absorbed in latent space: acc[H, r] += (p_t s_t)[H, T] x codes[T, r]
//      (at::addmm; without RoPE by default bf16 hi/lo on MKL's bf16 GEMM).
// The splits of a sequence are merged (powers of two again), then
// out = ((acc x W_uv) * w_uv_scale) / l per kv head and
// lse = (M + log2 l) ln 2. q_lat = W_uk q' and acc x W_uv read the weights
// in their stored dtype for a few query rows (qsvd/cpu/simd.h), at::mm
// on an fp32 copy otherwise.
//
// Threads: tasks run on at::parallel_for (torch's OpenMP team);
// the GEMMs inside a task run on its thread. A sequence is split into
// about 2 x threads / B parts, so one long sequence uses every core.
//
// Numerics: fp32 arithmetic with round-to-nearest; the error bound of every
// output, derived from this evaluation order, is in docs/ops.md and
// qsvd_kernels/testing.py (latent_attention_error_bound, kernel="cpu").
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include "cpu_paths.h"
#include "int8_brgemm.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/formats.h"
#include "qsvd/latent_cache_layout.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// at::parallel_for's OpenMP threads start without the caller's thread-local
// dispatch state: a tensor op inside a task on a tensor made under
// torch.inference_mode (vLLM runs its models so) would raise "Inplace update
// to inference tensor outside InferenceMode". Each task re-enters the
// caller's mode.
template <class F>
void parallel_tasks(int64_t begin, int64_t end, int64_t grain, const F& f) {
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

// Whether at::_int_mm sums full-range int8 products exactly (quant_gemm.cpp).
bool int_mm_exact() {
  static const bool exact = [] {
    const int64_t K = 256;
    at::Tensor a = at::full({4, K}, 127, at::kChar), b = at::full({8, K}, 127, at::kChar);
    a.select(0, 1).fill_(-127);
    b.select(0, 2).fill_(-127);
    return at::equal(at::_int_mm(a, b.t()).to(at::kLong), at::mm(a.to(at::kLong), b.to(at::kLong).t()));
  }();
  return exact;
}

// Read access to one sequence's latent rows in the paged cache (either
// layout: qsvd/latent_cache_layout.h).
struct LatentRows {
  qsvd::LatentCacheLayout layout;
  const int32_t* block_row;  // block_table[b]
  int64_t block_size, r;
  int bits;

  // Tokens [t0, t0 + T) -> int8 codes [T, r] and scales [T].
  void gather(int64_t t0, int64_t T, int8_t* codes, float* scales) const {
    for (int64_t i = 0; i < T; ++i) {
      const int64_t t = t0 + i;
      const int64_t slot = static_cast<int64_t>(block_row[t / block_size]) * block_size + t % block_size;
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

Prepared prepare(const char* op, const LatentShape& s, int64_t bits, const at::Tensor& cache,
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

LatentRows rows_of(const Prepared& p, const LatentShape& s, int64_t b, int64_t bits) {
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

Rebuild rebuild_operand(const at::Tensor& w_in, const std::optional<at::Tensor>& scale) {
  const int64_t H_kv = w_in.size(0), r = w_in.size(1), d = w_in.size(2);
  Rebuild rb;
  rb.int8_gemm = w_in.scalar_type() == at::kChar && int_mm_exact();
  rb.w = at::empty({r, H_kv, d}, w_in.options().dtype(rb.int8_gemm ? at::kChar : at::kFloat));
  rb.w.copy_(w_in.permute({1, 0, 2}));
  rb.w = rb.w.view({r, H_kv * d});
  if (scale.has_value()) rb.scale = scale->to(at::kFloat).contiguous().view({H_kv * d});
  return rb;
}

// out[T, E] (fp32, row stride E) = (codes x W) (* scale per column): the
// exact int32 sum rounded once, then the weight scale; or an fp32 GEMM.
void rebuild_tile(const Rebuild& rb, const at::Tensor& codes /* int8 [T, r] */, const at::Tensor& codes_f,
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
// per head: k_j cos_j - k_{j+d/2} sin_j (j < d/2), k_j cos_j + k_{j-d/2} sin_j.
inline void scale_and_rope(float* k, int64_t H_kv, int64_t d, float s_t, const float* cos, const float* sin,
                           float* tmp) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < H_kv; ++h) {
    float* kh = k + h * d;
    for (int64_t j = 0; j < d; ++j) tmp[j] = kh[j] * s_t;
    if (cos == nullptr) {
      for (int64_t j = 0; j < d; ++j) kh[j] = tmp[j];
      continue;
    }
    for (int64_t j = 0; j < half; ++j) kh[j] = tmp[j] * cos[j] - tmp[j + half] * sin[j];
    for (int64_t j = half; j < d; ++j) kh[j] = tmp[j] * cos[j] + tmp[j - half] * sin[j];
  }
}

// fp32 copy of one kv head's weights [r, d] (exact for fp16/bf16/int8).
void head_weights_f32(const at::Tensor& w, int64_t hk, at::Tensor& buf) { buf.copy_(w.select(0, hk)); }

// Up to this many query rows per kv head (at the avx512 ISA level), q_lat =
// W_uk q and o = acc W_uv read the weights in their stored type
// (qsvd/cpu/simd.h, one pass over them); above it, one fp32 conversion
// per head and a torch GEMM, which then costs less than re-reading the
// weights per query row.
constexpr int64_t kWeightStreamRows = 8;

// The weight dtypes check_latent_cache_and_weights admits.
qsvd::cpu::WeightType weight_type(const at::Tensor& w) {
  switch (w.scalar_type()) {
    case at::kHalf: return qsvd::cpu::WeightType::kF16;
    case at::kBFloat16: return qsvd::cpu::WeightType::kBF16;
    default: TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kChar); return qsvd::cpu::WeightType::kI8;
  }
}

// One kv head's [r, d] weights in their stored type.
const void* head_ptr(const at::Tensor& w /* contiguous [H_kv, r, d] */, int64_t hk) {
  return static_cast<const char*>(w.const_data_ptr()) + hk * w.stride(0) * w.element_size();
}

// ---------------------------------------------------------------------------
// The absorbed path's split-precision GEMMs (the default where torch has
// them; QSVD_CPU_LATENT_GEMM=fp32|split|auto, read per call, forces one,
// so tests cover both on one host). Error bounds: docs/ops.md and
// qsvd_kernels/testing.py (kernel="cpu"), which hold either path.
//
// Scores: x_t = (c_t . q_lat) s_t with int8 codes c_t, already the left
// operand of an int8 GEMM. q_lat (fp32) is written per query head as two
// int8 digits, q_lat ~ sigma (a + b / 254), sigma = max|q_lat| / 127, so
// |q_lat - sigma (a + b / 254)| <= sigma / 508 (+ one rounding of
// q_lat / sigma): 2^-16 of the head's largest entry. Both digit GEMMs sum
// exactly in int32 (|sum| <= 127^2 r) through torch's oneDNN batch-reduce
// GEMM (at::native::cpublas::brgemm, which torch offers on AMX CPUs).
//
// V absorbed: acc += w[H, T] x codes[T, r] with w = p s split into bf16
// hi + lo (|w - hi - lo| <= 2^-18 |w|) and the codes exact in bf16: one
// bf16 x bf16 -> fp32 GEMM of [2H, T] x [T, r] (MKL's
// cblas_gemm_bf16bf16f32, which torch's MKL build carries; looked up at
// run time, so a torch without it takes the fp32 path). The hi and lo rows
// accumulate separately and are added once per task.
//
// Measured on this project's AMX host, one thread, r = 1536, a 256-token
// tile, 32 heads: the digit scores (both digits in one call) take 1/4 to
// 1/6 of the fp32 score GEMM's time, the bf16 V GEMM (hi and lo rows)
// about 0.6 of the fp32 one's.

// brgemm takes K a multiple of 4 (the codes are padded with zero columns
// when r is not) and N up to 64 (cpu/int8_brgemm.h). So a packed operand
// holds one group of up to 32 query heads: a digits in columns [0, Hg),
// b digits in [Hg, 2 Hg), zeros up to N.
constexpr int64_t kScoreHeadsPerGroup = cpu::kInt8BrgemmMaxN / 2;
inline int64_t group_columns(int64_t Hg) { return cpu::int8_brgemm_n(2 * Hg); }

// q_lat [B, H, r] as int8 digits, packed for brgemm per (sequence, head
// group): packed [B, groups, Kp, 64] and sigma [B, H].
struct QueryDigits {
  at::Tensor packed, sigma;
  int64_t groups = 0, Kp = 0;
  int8_t* group_ptr(int64_t b, int64_t g) const {
    return packed.data_ptr<int8_t>() + ((b * groups + g) * Kp) * 2 * kScoreHeadsPerGroup;
  }
};

QueryDigits split_query(const at::Tensor& q_lat /* fp32 [B, H, r] */) {
  const int64_t B = q_lat.size(0), H = q_lat.size(1), r = q_lat.size(2), r4 = cpu::int8_brgemm_k(r);
  QueryDigits qd;
  qd.groups = (H + kScoreHeadsPerGroup - 1) / kScoreHeadsPerGroup;
  qd.Kp = cpu::int8_brgemm_packed_k(r4);
  qd.packed = at::zeros({B, qd.groups, qd.Kp, 2 * kScoreHeadsPerGroup}, q_lat.options().dtype(at::kChar));
  qd.sigma = at::empty({B, H}, q_lat.options());
  const float* qp = q_lat.data_ptr<float>();
  float* sg = qd.sigma.data_ptr<float>();
  parallel_tasks(0, B * qd.groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / qd.groups, g = i % qd.groups, h0 = g * kScoreHeadsPerGroup;
      const int64_t Hg = std::min(kScoreHeadsPerGroup, H - h0), N = group_columns(Hg);
      std::vector<int8_t> plain(r4 * N, 0);  // [r4, N]: a digits, b digits, zero padding
      for (int64_t h = 0; h < Hg; ++h) {
        const float* row = qp + (b * H + h0 + h) * r;
        float amax = 0.f;
        bool nan = false;
        for (int64_t k = 0; k < r; ++k) {
          const float a = std::fabs(row[k]);
          nan |= a != a;
          amax = a > amax ? a : amax;
        }
        // A non-finite q_lat makes the head's scores NaN (digits 0, sigma NaN).
        const bool finite = !nan && amax != std::numeric_limits<float>::infinity();
        const float sigma = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
        sg[b * H + h0 + h] = sigma;
        for (int64_t k = 0; k < r; ++k) {
          int8_t da = 0, db = 0;
          if (finite && amax > 0.f) {
            const float t = row[k] / sigma;
            const float a = std::min(127.f, std::max(-127.f, std::nearbyint(t)));
            const float bq = std::min(127.f, std::max(-127.f, std::nearbyint((t - a) * 254.f)));
            da = static_cast<int8_t>(a);
            db = static_cast<int8_t>(bq);
          }
          plain[k * N + h] = da;
          plain[k * N + Hg + h] = db;
        }
      }
#if defined(CPUBLAS_BRGEMM_I8I8I32)
      at::native::cpublas::pack(r4, N, N, N, at::kChar, at::kChar, plain.data(), qd.group_ptr(b, g));
#endif
    }
  });
  return qd;
}

// x[h T + i] = (A_hi + A_lo / 254) sigma_h s_i for the tile's codes
// [T, r4] (zero columns past r) against one sequence's digits (every head
// group).
void int8_scores(const QueryDigits& qd, int64_t b, int64_t H, int64_t r4, const int8_t* codes, int64_t T,
                 const float* scales, int32_t* acc /* [T, 64] */, float* x /* [H, T] */) {
#if defined(CPUBLAS_BRGEMM_I8I8I32)
  const float* sg = qd.sigma.data_ptr<float>() + b * H;
  const float inv254 = 1.f / 254.f;
  for (int64_t g = 0; g < qd.groups; ++g) {
    const int64_t h0 = g * kScoreHeadsPerGroup, Hg = std::min(kScoreHeadsPerGroup, H - h0), N = group_columns(Hg);
    at::native::cpublas::brgemm(T, N, r4, r4, N, N, false, reinterpret_cast<const signed char*>(codes),
                                reinterpret_cast<const signed char*>(qd.group_ptr(b, g)), acc);
    for (int64_t h = 0; h < Hg; ++h) {
      const float sigma = sg[h0 + h];
      float* xh = x + (h0 + h) * T;
      for (int64_t i = 0; i < T; ++i) {
        const float digits = static_cast<float>(acc[i * N + h]) + static_cast<float>(acc[i * N + Hg + h]) * inv254;
        xh[i] = digits * sigma * scales[i];
      }
    }
  }
  // MKL's bf16 GEMM (the V step) configures the AMX tiles its own way:
  // give them back, so the next brgemm call configures them again (a stale
  // configuration is a SIGILL).
  at::native::cpublas::brgemm_release();
#else
  (void)qd, (void)b, (void)H, (void)r4, (void)codes, (void)T, (void)scales, (void)acc, (void)x;
#endif
}

// A task: tokens [t0, t1) of sequence b.
struct Task {
  int64_t b, t0, t1;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> latent_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
    const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits, double sm_scale_d,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin) {
  const char* op = "latent_attention";
  cpu::check_isa_env(op);
  int64_t H = 0;
  const LatentShape s = check_latent_attention(q_in, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale,
                                               w_uv, w_uv_scale, bits, sm_scale_d, rope_cos, rope_sin, &H);
  const Prepared p = prepare(op, s, bits, cache, cache_scale, block_table, seq_lens, rope_cos, rope_sin);
  const int64_t B = s.B, H_kv = s.H_kv, G = H / H_kv, r = s.r, d = s.d, E = H_kv * d;
  const auto f32 = q_in.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({B, H, d}, f32);
  at::Tensor lse = at::full({B, H}, -std::numeric_limits<float>::infinity(), f32);
  if (B == 0) return {out.to(q_in.scalar_type()), lse};
  const int32_t* lens = p.seq_lens.data_ptr<int32_t>();

  // q' = q * score_scale (then * w_uk_scale per channel without RoPE and
  // int8 weights): fp32, each product rounded once.
  const float score_scale = static_cast<float>(sm_scale_d * 1.4426950408889634073599);
  const at::Tensor q = q_in.to(at::kFloat).mul(at::scalar_tensor(score_scale, f32)).contiguous();  // [B, H, d]

  // The plan: tasks of whole tiles, about 2 x threads per batch.
  const int64_t tile = s.rope ? kTileRope : kTileAbsorbed;
  const int64_t threads = at::get_num_threads();
  int64_t nonempty = 0;
  for (int64_t b = 0; b < B; ++b) nonempty += lens[b] > 0;
  const int64_t splits_target = std::max<int64_t>(1, (2 * threads + std::max<int64_t>(nonempty, 1) - 1) /
                                                         std::max<int64_t>(nonempty, 1));
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    first_task[b] = static_cast<int64_t>(tasks.size());
    const int64_t L = lens[b];
    if (L == 0) continue;
    const int64_t tiles = (L + tile - 1) / tile;
    const int64_t S = std::min(tiles, splits_target);
    for (int64_t k = 0; k < S; ++k) {
      const int64_t t0 = (tiles * k / S) * tile, t1 = std::min(L, (tiles * (k + 1) / S) * tile);
      tasks.push_back({b, t0, t1});
    }
  }
  first_task[B] = static_cast<int64_t>(tasks.size());
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());

  // Without RoPE: q_lat[b, h] = W_uk[kv] q'[b, h] ([B, H, r]), per kv head.
  at::Tensor q_lat;
  const at::Tensor w_uk_c = w_uk.contiguous(), w_uv_c = w_uv.contiguous();
  const bool stream_weights = B * G <= kWeightStreamRows && qsvd::cpu::weight_streaming_available();
  if (!s.rope) {
    q_lat = at::empty({B, H_kv, G, r}, f32);
    at::Tensor qk = q.view({B, H_kv, G, d});
    if (w_uk_scale.has_value()) qk = qk.mul(w_uk_scale->to(at::kFloat).view({1, H_kv, 1, d}));
    qk = qk.contiguous();
    parallel_tasks(0, H_kv, 1, [&](int64_t h0, int64_t h1) {
      if (stream_weights) {
        const float* qp = qk.data_ptr<float>();
        float* lp = q_lat.data_ptr<float>();
        for (int64_t hk = h0; hk < h1; ++hk)
          for (int64_t b = 0; b < B; ++b) {
            const int64_t i = (b * H_kv + hk) * G;
            qsvd::cpu::weight_dot_rows(weight_type(w_uk_c), head_ptr(w_uk_c, hk), r, d, qp + i * d, G, lp + i * r,
                                       r);
          }
        return;
      }
      at::Tensor wf = at::empty({r, d}, f32);
      for (int64_t hk = h0; hk < h1; ++hk) {
        head_weights_f32(w_uk, hk, wf);
        const at::Tensor qh = qk.select(1, hk).reshape({B * G, d});
        q_lat.select(1, hk).copy_(at::mm(qh, wf.t()).view({B, G, r}));
      }
    });
    q_lat = q_lat.view({B, H, r});
  }
  const Rebuild rb = s.rope ? rebuild_operand(w_uk, w_uk_scale) : Rebuild{};
  const bool split = !s.rope && cpu::latent_absorbed_split(op);  // QSVD_CPU_LATENT_GEMM (cpu_paths.h)
  const QueryDigits digits = split ? split_query(q_lat) : QueryDigits{};

  // Per-task partial state: M (integer running max, log2 units), l, acc.
  at::Tensor m_all = at::empty({std::max<int64_t>(n_tasks, 1), H}, f32);
  at::Tensor l_all = at::empty({std::max<int64_t>(n_tasks, 1), H}, f32);
  at::Tensor acc_all = at::empty({std::max<int64_t>(n_tasks, 1), H, r}, f32);

  parallel_tasks(0, n_tasks, 1, [&](int64_t task0, int64_t task1) {
    at::Tensor codes = at::empty({tile, r}, f32.dtype(at::kChar));
    at::Tensor codes_f = split ? at::Tensor() : at::empty({tile, r}, f32);  // fp32 V (and fp32 scores)
    at::Tensor k_buf = s.rope ? at::empty({tile, E}, f32) : at::Tensor();
    std::vector<float> scales(tile), tmp(d), factor(H);
    std::vector<int32_t> digit_acc(split ? tile * 2 * kScoreHeadsPerGroup : 0);
    // Codes with r padded to a multiple of 4 (zero columns), for brgemm.
    const int64_t r4 = cpu::int8_brgemm_k(r);
    std::vector<int8_t> codes_padded(split && r4 != r ? tile * r4 : 0, 0);
    at::Tensor x_buf = split ? at::empty({H, tile}, f32) : at::Tensor();
    // Split V: codes in bf16 [T, r], w = p s as bf16 hi rows then lo rows
    // [2H, tile], and the two accumulators [2H, r].
    std::vector<uint16_t> codes_bf16(split ? tile * r : 0), w_split(split ? 2 * H * tile : 0);
    at::Tensor acc2 = split ? at::empty({2 * H, r}, f32) : at::Tensor();
    at::Tensor pw = at::empty({H, tile}, f32);  // p_t s_t
    for (int64_t ti = task0; ti < task1; ++ti) {
      const Task task = tasks[ti];
      const LatentRows rows = rows_of(p, s, task.b, bits);
      float* m = m_all.data_ptr<float>() + ti * H;
      float* l = l_all.data_ptr<float>() + ti * H;
      at::Tensor acc = acc_all.narrow(0, ti, 1).view({H, r});
      acc.zero_();
      if (split) acc2.zero_();
      const at::Tensor q_b = s.rope ? q.narrow(0, task.b, 1).view({H_kv, G, d}) : q_lat.narrow(0, task.b, 1).view({H, r});
      for (int64_t h = 0; h < H; ++h) m[h] = -std::numeric_limits<float>::infinity(), l[h] = 0.f;
      for (int64_t t0 = task.t0; t0 < task.t1; t0 += tile) {
        const int64_t T = std::min(tile, task.t1 - t0);
        at::Tensor c = codes.narrow(0, 0, T), cf = split ? at::Tensor() : codes_f.narrow(0, 0, T);
        rows.gather(t0, T, c.data_ptr<int8_t>(), scales.data());
        if (split)
          qsvd::cpu::int8_to_bf16(c.data_ptr<int8_t>(), T * r, codes_bf16.data());
        else
          qsvd::cpu::int8_to_float(c.data_ptr<int8_t>(), T * r, cf.data_ptr<float>());

        // Scores x [H, T] in log2 units.
        at::Tensor x;
        if (s.rope) {
          at::Tensor kt = k_buf.narrow(0, 0, T);
          rebuild_tile(rb, c, cf, kt);
          float* kp = kt.data_ptr<float>();
          const float* cosp = p.cos.data_ptr<float>();
          const float* sinp = p.sin.data_ptr<float>();
          for (int64_t i = 0; i < T; ++i)
            scale_and_rope(kp + i * E, H_kv, d, scales[i], cosp + (t0 + i) * d, sinp + (t0 + i) * d, tmp.data());
          // [H_kv, G, d] x [H_kv, d, T]
          x = at::bmm(q_b, kt.view({T, H_kv, d}).permute({1, 2, 0})).view({H, T});
          x = x.contiguous();
        } else if (split) {
          x = T == tile ? x_buf : at::empty({H, T}, f32);  // [H, T]
          const int8_t* a = c.data_ptr<int8_t>();
          if (r4 != r) {
            for (int64_t i = 0; i < T; ++i) std::memcpy(codes_padded.data() + i * r4, a + i * r, r);
            a = codes_padded.data();
          }
          int8_scores(digits, task.b, H, r4, a, T, scales.data(), digit_acc.data(), x.data_ptr<float>());
        } else {
          x = at::mm(q_b, cf.t()).contiguous();  // [H, T]
          float* xp = x.data_ptr<float>();
          for (int64_t h = 0; h < H; ++h)
            for (int64_t i = 0; i < T; ++i) xp[h * T + i] = xp[h * T + i] * scales[i];
        }

        // Online softmax, base 2, integer running max (exact rescales).
        const float* xp = x.data_ptr<float>();
        at::Tensor pwt = pw.narrow(1, 0, T);
        float* pp = pw.data_ptr<float>();
        for (int64_t h = 0; h < H; ++h) {
          const float* xh = xp + h * T;
          float mx = -std::numeric_limits<float>::infinity();
          bool nan = false;
          for (int64_t i = 0; i < T; ++i) {
            mx = xh[i] > mx ? xh[i] : mx;
            nan |= xh[i] != xh[i];
          }
          float m_new = std::max(m[h], std::ceil(mx));
          // A NaN score with no finite max so far must still reach the
          // output: a finite max keeps this partial in the merge, and its
          // l and acc turn NaN below.
          if (m_new == -std::numeric_limits<float>::infinity() && nan) m_new = 0.f;
          float sum = 0.f, f = 1.f;
          float* ph = pp + h * tile;
          if (m_new != -std::numeric_limits<float>::infinity()) {
            f = m[h] == m_new ? 1.f : std::exp2(m[h] - m_new);
            for (int64_t i = 0; i < T; ++i) {
              const float prob = std::exp2(xh[i] - m_new);
              sum = sum + prob;
              ph[i] = prob * scales[i];
            }
          } else {
            for (int64_t i = 0; i < T; ++i) ph[i] = 0.f;
          }
          l[h] = l[h] * f + sum;
          m[h] = m_new;
          factor[h] = f;
        }
        // acc = acc * factor + (p s)[H, T] x codes[T, r]
        bool rescale = false;
        for (int64_t h = 0; h < H; ++h) rescale |= factor[h] != 1.f;
        if (split) {
          if (rescale) {
            const at::Tensor f = at::from_blob(factor.data(), {1, H, 1}, f32);
            acc2.view({2, H, r}).mul_(f);
          }
          for (int64_t h = 0; h < H; ++h)
            qsvd::cpu::split_bf16_row(pp + h * tile, T, w_split.data() + h * tile, w_split.data() + (H + h) * tile);
          cpu::gemm_bf16_f32()(cpu::kCblasRowMajor, cpu::kCblasNoTrans, cpu::kCblasNoTrans, 2 * H, r, T, 1.f,
                               w_split.data(), tile, codes_bf16.data(), r, 1.f, acc2.data_ptr<float>(), r);
          continue;
        }
        if (rescale) acc.mul_(at::from_blob(factor.data(), {H, 1}, f32));
        acc.addmm_(pwt, cf);
      }
      if (split) at::add_out(acc, acc2.narrow(0, 0, H), acc2.narrow(0, H, H));  // hi + lo, one rounding
    }
  });

  // Per kv head (one parallel region): merge the splits of each sequence
  // for the head's query heads, then o = (acc W_uv) * ws for all sequences
  // at once; the division by l and lse follow.
  at::Tensor acc_b = at::zeros({B, H, r}, f32);
  at::Tensor l_b = at::zeros({B, H}, f32);
  at::Tensor m_b = at::full({B, H}, -std::numeric_limits<float>::infinity(), f32);
  at::Tensor o = at::empty({B, H_kv, G, d}, f32);
  {
    float* accb = acc_b.data_ptr<float>();
    float* lbw = l_b.data_ptr<float>();
    float* mbw = m_b.data_ptr<float>();
    const float* acca = acc_all.data_ptr<float>();
    const float* ma = m_all.data_ptr<float>();
    const float* la = l_all.data_ptr<float>();
    const at::Tensor acc_kv = acc_b.view({B, H_kv, G, r});
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    parallel_tasks(0, H_kv, 1, [&](int64_t h0, int64_t h1) {
      at::Tensor wf = stream_weights ? at::Tensor() : at::empty({r, d}, f32);
      for (int64_t hk = h0; hk < h1; ++hk) {
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
            const int64_t i = b * H + h;
            const int64_t k0 = first_task[b], k1 = first_task[b + 1];
            float mx = kNegInf;
            for (int64_t k = k0; k < k1; ++k) mx = std::max(mx, ma[k * H + h]);
            if (mx == kNegInf) continue;  // no tokens, or every score -inf
            float* dst = accb + i * r;
            float lsum = 0.f;
            for (int64_t k = k0; k < k1; ++k) {
              const float mk = ma[k * H + h];
              if (mk == kNegInf) continue;
              const float f = mk == mx ? 1.f : std::exp2(mk - mx);  // a power of two
              const float* src = acca + (k * H + h) * r;
              for (int64_t j = 0; j < r; ++j) dst[j] = dst[j] + src[j] * f;
              lsum = lsum + la[k * H + h] * f;
            }
            lbw[i] = lsum;
            mbw[i] = mx;
          }
        if (stream_weights) {
          float* op = o.data_ptr<float>();
          for (int64_t b = 0; b < B; ++b)
            qsvd::cpu::weight_axpy_rows(weight_type(w_uv_c), head_ptr(w_uv_c, hk), r, d, accb + (b * H + hk * G) * r,
                                        r, G, op + (b * H_kv + hk) * G * d);
          if (w_uv_scale.has_value()) o.select(1, hk).mul_(w_uv_scale->select(0, hk).to(at::kFloat).view({1, 1, d}));
          continue;
        }
        head_weights_f32(w_uv, hk, wf);
        at::Tensor oh = at::mm(acc_kv.select(1, hk).reshape({B * G, r}), wf);  // [B G, d]
        if (w_uv_scale.has_value()) oh.mul_(w_uv_scale->select(0, hk).to(at::kFloat).view({1, d}));
        o.select(1, hk).copy_(oh.view({B, G, d}));
      }
    });
  }
  {
    const float* lb = l_b.data_ptr<float>();
    const float* mb = m_b.data_ptr<float>();
    float* op = o.data_ptr<float>();
    float* outp = out.data_ptr<float>();
    float* lsep = lse.data_ptr<float>();
    const float ln2 = static_cast<float>(0.6931471805599453094);
    for (int64_t b = 0; b < B; ++b) {
      if (lens[b] == 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float lh = lb[b * H + h];
        for (int64_t j = 0; j < d; ++j) outp[(b * H + h) * d + j] = op[(b * H + h) * d + j] / lh;
        lsep[b * H + h] = (mb[b * H + h] + std::log2(lh)) * ln2;
      }
    }
  }
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cpu(
    const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    std::optional<at::ScalarType> out_dtype_opt) {
  const char* op = "latent_reconstruct_kv";
  cpu::check_isa_env(op);
  const LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, block_table, seq_lens, w_uk,
                                                       w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin);
  const at::ScalarType out_dtype = reconstruct_out_dtype(op, w_uk, out_dtype_opt);
  const Prepared p = prepare(op, s, bits, cache, cache_scale, block_table, seq_lens, rope_cos, rope_sin);
  const int64_t r = s.r, d = s.d, H_kv = s.H_kv, E = H_kv * d;
  const auto f32 = cache.options().dtype(at::kFloat);
  at::Tensor k = at::empty({p.total_tokens, H_kv, d}, f32.dtype(out_dtype));
  at::Tensor v = at::empty({p.total_tokens, H_kv, d}, f32.dtype(out_dtype));
  if (p.total_tokens == 0) return {k, v};
  const int32_t* lens = p.seq_lens.data_ptr<int32_t>();
  std::vector<int64_t> offset(s.B + 1, 0);
  for (int64_t b = 0; b < s.B; ++b) offset[b + 1] = offset[b] + lens[b];
  const Rebuild rk = rebuild_operand(w_uk, w_uk_scale), rv = rebuild_operand(w_uv, w_uv_scale);
  constexpr int64_t tile = kTileRope;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t0 = 0; t0 < lens[b]; t0 += tile) tasks.push_back({b, t0, std::min<int64_t>(lens[b], t0 + tile)});

  parallel_tasks(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t task0, int64_t task1) {
    at::Tensor codes = at::empty({tile, r}, f32.dtype(at::kChar));
    at::Tensor codes_f = at::empty({tile, r}, f32);
    at::Tensor kb = at::empty({tile, E}, f32), vb = at::empty({tile, E}, f32);
    std::vector<float> scales(tile), tmp(d);
    for (int64_t ti = task0; ti < task1; ++ti) {
      const Task task = tasks[ti];
      const int64_t T = task.t1 - task.t0;
      const LatentRows rows = rows_of(p, s, task.b, bits);
      at::Tensor c = codes.narrow(0, 0, T), cf = codes_f.narrow(0, 0, T);
      at::Tensor kt = kb.narrow(0, 0, T), vt = vb.narrow(0, 0, T);
      rows.gather(task.t0, T, c.data_ptr<int8_t>(), scales.data());
      qsvd::cpu::int8_to_float(c.data_ptr<int8_t>(), T * r, cf.data_ptr<float>());
      rebuild_tile(rk, c, cf, kt);
      rebuild_tile(rv, c, cf, vt);
      float* kp = kt.data_ptr<float>();
      float* vp = vt.data_ptr<float>();
      for (int64_t i = 0; i < T; ++i) {
        const int64_t t = task.t0 + i;
        scale_and_rope(kp + i * E, H_kv, d, scales[i], s.rope ? p.cos.data_ptr<float>() + t * d : nullptr,
                       s.rope ? p.sin.data_ptr<float>() + t * d : nullptr, tmp.data());
        for (int64_t e = 0; e < E; ++e) vp[i * E + e] = vp[i * E + e] * scales[i];
      }
      const int64_t row0 = offset[task.b] + task.t0;
      k.view({-1, E}).narrow(0, row0, T).copy_(kt);
      v.view({-1, E}).narrow(0, row0, T).copy_(vt);
    }
  });
  return {k, v};
}

}  // namespace qsvd_torch
