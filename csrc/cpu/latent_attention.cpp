// CPU latent_attention (decode) and latent_reconstruct_kv (prefill).
//
// Per (sequence, kv head) task: the latent rows of the sequence are read
// through block_table, dequantized as code * token_scale, and up-projected
// with the kv head's W_uk / W_uv. The query heads of a GQA group share the
// task, so each latent row is unpacked once per group.
//
// All arithmetic after the integer codes is float64, rounded once to the
// output dtype: the CPU kernels are the accurate implementation that the
// tests hold to one output ulp of the exact result, and the yardstick the
// CUDA kernels (fp32 / tensor-core accumulation) are compared with.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// float64 [H_kv, r, d]: w, times its per-(kv head, channel) scale for int8
// (exact: an int8 times an fp32 fits a double).
at::Tensor dequantize_weight(const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  at::Tensor wf = w.to(at::kDouble);
  if (scale.has_value()) wf = wf * scale->to(at::kDouble).unsqueeze(1);
  return wf.contiguous();
}

// Read access to one sequence's latent rows in the paged cache.
struct LatentRows {
  const uint8_t* cache;
  const float* cache_scale;
  const int32_t* block_row;  // block_table[b]
  int64_t block_size, code_row, r;
  int bits;

  // Unpacks token t's codes into `codes` and returns its scale.
  double load(int64_t t, int8_t* codes) const {
    const int64_t slot = static_cast<int64_t>(block_row[t / block_size]) * block_size + t % block_size;
    qsvd::unpack_codes_host(cache + slot * code_row, r, bits, codes);
    return cache_scale[slot];
  }
};

// k[j] = scale * sum_i codes[i] * W[i, j] for W [r, d] row-major.
inline void up_project(const int8_t* codes, double scale, const double* W, int64_t r, int64_t d, double* k) {
  for (int64_t j = 0; j < d; ++j) k[j] = 0.0;
  for (int64_t i = 0; i < r; ++i) {
    const double ci = codes[i];
    if (ci == 0.0) continue;
    const double* w = W + i * d;
    for (int64_t j = 0; j < d; ++j) k[j] += ci * w[j];
  }
  for (int64_t j = 0; j < d; ++j) k[j] *= scale;
}

// Hugging Face LLaMA rotate-half RoPE at one position, in place.
inline void apply_rope(double* k, const float* cos, const float* sin, int64_t d, double* tmp) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; ++j) tmp[j] = k[j];
  for (int64_t j = 0; j < half; ++j) k[j] = tmp[j] * cos[j] - tmp[j + half] * sin[j];
  for (int64_t j = half; j < d; ++j) k[j] = tmp[j] * cos[j] + tmp[j - half] * sin[j];
}

struct PreparedLatent {
  at::Tensor cache, cache_scale, block_table, seq_lens, wk, wv, cos, sin;
  int64_t total_tokens;
};

PreparedLatent prepare(const char* op, const LatentShape& s, const at::Tensor& cache, const at::Tensor& cache_scale,
                       const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& w_uk,
                       const std::optional<at::Tensor>& w_uk_scale, const at::Tensor& w_uv,
                       const std::optional<at::Tensor>& w_uv_scale, const std::optional<at::Tensor>& rope_cos,
                       const std::optional<at::Tensor>& rope_sin) {
  PreparedLatent p;
  p.block_table = block_table.contiguous();
  p.seq_lens = seq_lens.contiguous();
  p.total_tokens =
      check_paged_indices_host(op, p.seq_lens, p.block_table, s, s.rope ? rope_cos->size(0) : 0);
  p.cache = cache.contiguous();
  p.cache_scale = cache_scale.contiguous();
  p.wk = dequantize_weight(w_uk, w_uk_scale);
  p.wv = dequantize_weight(w_uv, w_uv_scale);
  if (s.rope) {
    p.cos = rope_cos->contiguous();
    p.sin = rope_sin->contiguous();
  }
  return p;
}

LatentRows rows_of(const PreparedLatent& p, const LatentShape& s, int64_t b, int64_t bits) {
  return {static_cast<const uint8_t*>(p.cache.data_ptr()),
          p.cache_scale.data_ptr<float>(),
          p.block_table.data_ptr<int32_t>() + b * s.max_blocks,
          s.block_size,
          bits == 4 ? s.r / 2 : s.r,
          s.r,
          static_cast<int>(bits)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> latent_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& cache_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits, double sm_scale_d,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin) {
  const char* op = "latent_attention";
  int64_t H = 0;
  const LatentShape s = check_latent_attention(q_in, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale,
                                               w_uv, w_uv_scale, bits, sm_scale_d, rope_cos, rope_sin, &H);
  const PreparedLatent p = prepare(op, s, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv,
                                   w_uv_scale, rope_cos, rope_sin);
  const at::Tensor q = q_in.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({s.B, H, s.d}, q.options());
  at::Tensor lse = at::empty({s.B, H}, q.options());
  const int64_t group = H / s.H_kv, r = s.r, d = s.d;
  const double sm_scale = sm_scale_d;
  const double* qp = q.data_ptr<double>();
  const double* wk = p.wk.data_ptr<double>();
  const double* wv = p.wv.data_ptr<double>();
  const float* cosp = s.rope ? p.cos.data_ptr<float>() : nullptr;
  const float* sinp = s.rope ? p.sin.data_ptr<float>() : nullptr;
  const int32_t* lens = p.seq_lens.data_ptr<int32_t>();
  double* outp = out.data_ptr<double>();
  double* lsep = lse.data_ptr<double>();

  at::parallel_for(0, s.B * s.H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> codes(r);
    std::vector<double> q_lat(s.rope ? 0 : group * r), k(d), tmp(d), acc(group * r), o(d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.H_kv, hk = task % s.H_kv, h0 = hk * group;
      const int64_t L = lens[b];
      if (L == 0) {
        for (int64_t g = 0; g < group; ++g) {
          for (int64_t j = 0; j < d; ++j) outp[(b * H + h0 + g) * d + j] = 0.0;
          lsep[b * H + h0 + g] = -std::numeric_limits<double>::infinity();
        }
        continue;
      }
      const double* Wk = wk + hk * r * d;
      const double* Wv = wv + hk * r * d;
      const LatentRows rows = rows_of(p, s, b, bits);
      scores.assign(group * L, 0.0);
      if (!s.rope) {
        // K absorbed: q_lat = W_uk q, then scores are dot products with the latent.
        for (int64_t g = 0; g < group; ++g) {
          const double* qh = qp + (b * H + h0 + g) * d;
          for (int64_t i = 0; i < r; ++i) {
            double a = 0.0;
            for (int64_t j = 0; j < d; ++j) a += Wk[i * d + j] * qh[j];
            q_lat[g * r + i] = a;
          }
        }
      }
      // Pass 1: scores.
      for (int64_t t = 0; t < L; ++t) {
        const double cs = rows.load(t, codes.data());
        if (!s.rope) {
          for (int64_t g = 0; g < group; ++g) {
            const double* ql = q_lat.data() + g * r;
            double a = 0.0;
            for (int64_t i = 0; i < r; ++i) a += static_cast<double>(codes[i]) * ql[i];
            scores[g * L + t] = sm_scale * (cs * a);
          }
        } else {
          up_project(codes.data(), cs, Wk, r, d, k.data());
          apply_rope(k.data(), cosp + t * d, sinp + t * d, d, tmp.data());
          for (int64_t g = 0; g < group; ++g) {
            const double* qh = qp + (b * H + h0 + g) * d;
            double a = 0.0;
            for (int64_t j = 0; j < d; ++j) a += qh[j] * k[j];
            scores[g * L + t] = sm_scale * a;
          }
        }
      }
      // Softmax per head; scores become probabilities (unnormalised).
      std::vector<double> row_max(group), row_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        double* sc = scores.data() + g * L;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sc[t]);
        double sum = 0.0;
        for (int64_t t = 0; t < L; ++t) {
          sc[t] = std::exp(sc[t] - mx);
          sum += sc[t];
        }
        row_max[g] = mx;
        row_sum[g] = sum;
      }
      // Pass 2: V absorbed. acc = sum_t p_t c_t in latent space, then W_uv once.
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < L; ++t) {
        const double cs = rows.load(t, codes.data());
        for (int64_t g = 0; g < group; ++g) {
          const double w = scores[g * L + t] * cs;
          double* a = acc.data() + g * r;
          for (int64_t i = 0; i < r; ++i) a[i] += w * static_cast<double>(codes[i]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        std::fill(o.begin(), o.end(), 0.0);
        const double* a = acc.data() + g * r;
        for (int64_t i = 0; i < r; ++i) {
          const double ai = a[i];
          const double* w = Wv + i * d;
          for (int64_t j = 0; j < d; ++j) o[j] += ai * w[j];
        }
        double* dst = outp + (b * H + h0 + g) * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = o[j] / row_sum[g];
        lsep[b * H + h0 + g] = row_max[g] + std::log(row_sum[g]);
      }
    }
  });
  return {out.to(q_in.scalar_type()), lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cpu(
    const at::Tensor& cache, const at::Tensor& cache_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    std::optional<at::ScalarType> out_dtype_opt) {
  const char* op = "latent_reconstruct_kv";
  const LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, block_table, seq_lens, w_uk,
                                                       w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin);
  const at::ScalarType out_dtype = reconstruct_out_dtype(op, w_uk, out_dtype_opt);
  const PreparedLatent p = prepare(op, s, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv,
                                   w_uv_scale, rope_cos, rope_sin);
  const int64_t r = s.r, d = s.d, H_kv = s.H_kv;
  at::Tensor k = at::empty({p.total_tokens, H_kv, d}, cache_scale.options().dtype(at::kDouble));
  at::Tensor v = at::empty({p.total_tokens, H_kv, d}, cache_scale.options().dtype(at::kDouble));
  const int32_t* lens = p.seq_lens.data_ptr<int32_t>();
  std::vector<int64_t> offset(s.B + 1, 0);
  for (int64_t b = 0; b < s.B; ++b) offset[b + 1] = offset[b] + lens[b];
  const double* wk = p.wk.data_ptr<double>();
  const double* wv = p.wv.data_ptr<double>();
  const float* cosp = s.rope ? p.cos.data_ptr<float>() : nullptr;
  const float* sinp = s.rope ? p.sin.data_ptr<float>() : nullptr;
  double* kp = k.data_ptr<double>();
  double* vp = v.data_ptr<double>();

  at::parallel_for(0, s.B * H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> codes(r);
    std::vector<double> tmp(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H_kv, hk = task % H_kv;
      const LatentRows rows = rows_of(p, s, b, bits);
      for (int64_t t = 0; t < lens[b]; ++t) {
        const double cs = rows.load(t, codes.data());
        double* kr = kp + ((offset[b] + t) * H_kv + hk) * d;
        double* vr = vp + ((offset[b] + t) * H_kv + hk) * d;
        up_project(codes.data(), cs, wk + hk * r * d, r, d, kr);
        if (s.rope) apply_rope(kr, cosp + t * d, sinp + t * d, d, tmp.data());
        up_project(codes.data(), cs, wv + hk * r * d, r, d, vr);
      }
    }
  });
  return {k.to(out_dtype), v.to(out_dtype)};
}

}  // namespace qsvd_torch
