// latent_attention's absorbed path on split-precision GEMMs (CPU; no RoPE,
// or K's rotary part cached: CachedKeysSplitWorker adds the rotary scores):
// the default where torch has them; QSVD_CPU_LATENT_GEMM=fp32|split|auto
// forces one (cpu_paths.h), so tests cover both on one host. Error bounds:
// docs/ops.md and qsvd_kernels/testing.py (kernel="cpu"), which hold
// either path.
#pragma once

#include "int8_brgemm.h"
#include "latent_common.h"

namespace qsvd_torch {
namespace latent_cpu {

// Scores: x_t = (c_t . q_lat) s_t with int8 codes c_t, already the left
// operand of an int8 GEMM. q_lat (fp32) is written per query head as two
// int8 digits, q_lat ~ sigma (a + b / 254), sigma = max|q_lat| / 127, so
// |q_lat - sigma (a + b / 254)| <= sigma / 508 (+ one rounding of
// q_lat / sigma): 2^-16 of the head's largest entry. Both digit GEMMs sum
// exactly in int32 (|sum| <= 127^2 r) through torch's oneDNN batch-reduce
// GEMM (at::native::cpublas::brgemm, which torch offers on AMX CPUs), or
// elsewhere through at::_int_mm (oneDNN's int8 GEMM, where it is exact:
// VNNI), both digits of every head in one [T, r] x [r, 2H] call. Exact
// sums either way: the two give the same bits.
//
// V absorbed: acc += w[H, T] x codes[T, r], w = p s. With the brgemm
// digit scores (AMX), w split into bf16 hi + lo (|w - hi - lo| <= 2^-18
// |w|) and the codes exact in bf16: one bf16 x bf16 -> fp32 GEMM of
// [2H, T] x [T, r] (MKL's cblas_gemm_bf16bf16f32, which torch's MKL build
// carries; looked up at run time, so a torch without it takes the fp32
// path); the hi and lo rows accumulate separately and are added once per
// task. With at::_int_mm's digit scores (VNNI, no AMX), each head's row of
// w as three int8 digits (qsvd::digit_row: |w - sigma (a + b/254 +
// c/254^2)| <= 1.03 u max_tile w + u |w|) against the int8 codes: one
// exact int32 GEMM [3H, T4] x [T4, r] (T4: T rounded up to 4, the digits
// zero past T), then acc = acc f + sigma ((A + B/254) + C/254^2) in fp32
// (A, B, C < 2^24 in magnitude: exact in fp32).
//
// Measured on this project's AMX host, one thread, r = 1536, a 256-token
// tile, 32 heads: the digit scores (both digits in one call) take 1/4 to
// 1/6 of the fp32 score GEMM's time, the bf16 V GEMM (hi and lo rows)
// about 0.6 of the fp32 one's. On an AMD EPYC without AMX (AVX-512 VNNI
// and BF16), one thread, r = 960, a 256-token tile, 32 heads: at::_int_mm's
// digit scores 81 us against the fp32 score GEMM's 177 us (plus 17 us to
// convert the codes); the V step, see AbsorbedSplitWorker.

// brgemm takes K a multiple of 4 (the codes are padded with zero columns
// when r is not) and N up to 64 (cpu/int8_brgemm.h). So a packed operand
// holds one group of up to 32 query heads: a digits in columns [0, Hg),
// b digits in [Hg, 2 Hg), zeros up to N.
constexpr int64_t kScoreHeadsPerGroup = cpu::kInt8BrgemmMaxN / 2;
inline int64_t group_columns(int64_t Hg) { return cpu::int8_brgemm_n(2 * Hg); }

// q_lat [B, H, r] as int8 digits: for brgemm packed per (sequence, head
// group), packed [B, groups, Kp, 64]; for at::_int_mm plain [B, 2H, r4] (the
// a digit rows of every head, then the b digit rows; its transpose is the
// GEMM's right operand); and sigma [B, H].
struct QueryDigits {
  at::Tensor packed, plain, sigma;
  bool brgemm = true;
  int64_t groups = 0, Kp = 0;
  int8_t* group_ptr(int64_t b, int64_t g) const {
    return packed.data_ptr<int8_t>() + ((b * groups + g) * Kp) * 2 * kScoreHeadsPerGroup;
  }
};

inline QueryDigits split_query(const at::Tensor& q_lat /* fp32 [B, H, r] */, bool brgemm) {
  const int64_t B = q_lat.size(0), H = q_lat.size(1), r = q_lat.size(2);
  // K a multiple of 4 for both int8 GEMMs: brgemm takes no other, and
  // torch's at::_int_mm gets K = 1 wrong (docs/ops.md, quant_gemm).
  const int64_t r4 = cpu::int8_brgemm_k(r);
  QueryDigits qd;
  qd.brgemm = brgemm;
  qd.groups = brgemm ? (H + kScoreHeadsPerGroup - 1) / kScoreHeadsPerGroup : 1;
  if (brgemm) {
    qd.Kp = cpu::int8_brgemm_packed_k(r4);
    qd.packed = at::zeros({B, qd.groups, qd.Kp, 2 * kScoreHeadsPerGroup}, q_lat.options().dtype(at::kChar));
  } else {
    qd.plain = at::zeros({B, 2 * H, r4}, q_lat.options().dtype(at::kChar));  // zero columns past r
  }
  qd.sigma = at::empty({B, H}, q_lat.options());
  const float* qp = q_lat.data_ptr<float>();
  float* sg = qd.sigma.data_ptr<float>();
  if (!brgemm) {
    int8_t* base = qd.plain.data_ptr<int8_t>();
    parallel_tasks(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        sg[i] = qsvd::cpu::digit_row(qp + i * r, r, base + (b * 2 * H + h) * r4, base + (b * 2 * H + H + h) * r4,
                                     nullptr);
      }
    });
    return qd;
  }
  parallel_tasks(0, B * qd.groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int8_t> da(r), db(r);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / qd.groups, g = i % qd.groups, h0 = g * kScoreHeadsPerGroup;
      const int64_t Hg = std::min(kScoreHeadsPerGroup, H - h0), N = group_columns(Hg);
      std::vector<int8_t> plain(r4 * N, 0);  // [r4, N]: a digits, b digits, zero padding
      for (int64_t h = 0; h < Hg; ++h) {
        sg[b * H + h0 + h] = qsvd::cpu::digit_row(qp + (b * H + h0 + h) * r, r, da.data(), db.data(), nullptr);
        for (int64_t k = 0; k < r; ++k) {
          plain[k * N + h] = da[k];
          plain[k * N + Hg + h] = db[k];
        }
      }
#if defined(CPUBLAS_BRGEMM_I8I8I32)
      at::native::cpublas::pack(r4, N, N, N, at::kChar, at::kChar, plain.data(), qd.group_ptr(b, g));
#endif
    }
  });
  return qd;
}

// x[h T + i] = (A_hi + A_lo / 254) sigma_h s_i from the int32 digit sums
// acc [T, N] (a digits in columns [0, Hg), b digits in [Hg, 2 Hg)) of the
// heads [h0, h0 + Hg).
inline void digit_scores_to_x(const int32_t* acc, int64_t N, int64_t h0, int64_t Hg, const float* sg, int64_t T,
                              const float* scales, float* x) {
  const float inv254 = 1.f / 254.f;
  for (int64_t h = 0; h < Hg; ++h) {
    const float sigma = sg[h0 + h];
    float* xh = x + (h0 + h) * T;
    for (int64_t i = 0; i < T; ++i) {
      const float digits = static_cast<float>(acc[i * N + h]) + static_cast<float>(acc[i * N + Hg + h]) * inv254;
      xh[i] = digits * sigma * scales[i];
    }
  }
}

// The scores of the tile's codes [T, r4] (zero columns past r) against one
// sequence's digits (every head group):
// x [H, T]. acc: int32 [T, 64] (brgemm) or [T, 2H] (_int_mm).
inline void int8_scores(const QueryDigits& qd, int64_t b, int64_t H, int64_t r4, const int8_t* codes, int64_t T,
                 const float* scales, int32_t* acc, float* x /* [H, T] */) {
  const float* sg = qd.sigma.data_ptr<float>() + b * H;
  if (!qd.brgemm) {
    const at::Tensor a = at::from_blob(const_cast<int8_t*>(codes), {T, r4}, qd.plain.options());
    at::Tensor out = at::from_blob(acc, {T, 2 * H}, qd.plain.options().dtype(at::kInt));
    at::_int_mm_out(out, a, qd.plain.select(0, b).t());  // [r, 2H], transposed rows
    digit_scores_to_x(acc, 2 * H, 0, H, sg, T, scales, x);
    return;
  }
#if defined(CPUBLAS_BRGEMM_I8I8I32)
  for (int64_t g = 0; g < qd.groups; ++g) {
    const int64_t h0 = g * kScoreHeadsPerGroup, Hg = std::min(kScoreHeadsPerGroup, H - h0), N = group_columns(Hg);
    at::native::cpublas::brgemm(T, N, r4, r4, N, N, false, reinterpret_cast<const signed char*>(codes),
                                reinterpret_cast<const signed char*>(qd.group_ptr(b, g)), acc);
    digit_scores_to_x(acc, N, h0, Hg, sg, T, scales, x);
  }
  // MKL's bf16 GEMM (the V step) configures the AMX tiles its own way:
  // give them back, so the next brgemm call configures them again (a stale
  // configuration is a SIGILL).
  at::native::cpublas::brgemm_release();
#else
  (void)codes, (void)T, (void)scales, (void)acc, (void)x, (void)r4, (void)sg;
#endif
}

// V: bf16 hi/lo on MKL's bf16 GEMM with the brgemm digit scores (AMX hosts,
// where it measured faster than fp32); with _int_mm's digit scores, int8
// digits of w on at::_int_mm. On the AMD EPYC above (one thread, r = 960,
// 8 heads, 130-token tiles, 32 of them) the int8 V GEMMs took 0.40 ms
// against the fp32 GEMMs' 1.15 ms plus 0.26 ms converting the codes to
// fp32; MKL's bf16 GEMM there measured 338 us against fp32's 178 us at the
// 256-token, 32-head shape (it does not take AMD's AVX-512 BF16 path).
struct AbsorbedSplitWorker {
  const Call& c;
  const QueryDigits& digits;
  const bool bf16_values;
  int64_t r4, b = 0;
  std::vector<int32_t> digit_acc;
  // Codes with r padded to a multiple of 4 (zero columns), for brgemm.
  std::vector<int8_t> codes_padded;
  at::Tensor x_buf;
  // V on bf16: codes in bf16 [T, r], w = p s as bf16 hi rows then lo rows
  // [2H, tile], and the two accumulators [2H, r].
  std::vector<uint16_t> codes_bf16, w_split;
  at::Tensor acc2;
  // V on int8 digits: the tile's codes (the caller's buffer), w's digits
  // [3H, T4] (a rows, b rows, c rows), their int32 sums [3H, r], sigma [H].
  const int8_t* tile_codes = nullptr;
  at::Tensor w_digits, v_sums;
  std::vector<float> w_sigma;

  AbsorbedSplitWorker(const Call& call, const QueryDigits& qd)
      : c(call), digits(qd), bf16_values(qd.brgemm), r4(cpu::int8_brgemm_k(call.s.r)),
        digit_acc(call.tile * std::max<int64_t>(2 * kScoreHeadsPerGroup, 2 * call.H)),
        codes_padded(r4 != call.s.r ? call.tile * r4 : 0, 0),
        x_buf(at::empty({call.H, call.tile}, call.q.options())), codes_bf16(bf16_values ? call.tile * call.s.r : 0),
        w_split(bf16_values ? 2 * call.H * call.tile : 0),
        acc2(bf16_values ? at::empty({2 * call.H, call.s.r}, call.q.options()) : at::Tensor()),
        w_digits(bf16_values ? at::Tensor() : at::empty({3 * call.H * call.tile}, call.q.options().dtype(at::kChar))),
        v_sums(bf16_values ? at::Tensor() : at::empty({3 * call.H, call.s.r}, call.q.options().dtype(at::kInt))),
        w_sigma(call.H) {
    TORCH_CHECK(call.tile % 4 == 0, "latent_attention: the CPU tile must hold a multiple of 4 tokens");
  }

  void begin_task(int64_t seq) {
    b = seq;
    if (bf16_values) acc2.zero_();
  }

  // codes: the first T rows of the caller's int8 [tile, r] buffer, whose
  // other rows hold finite codes (zeros, or an earlier tile's): the int8 V
  // GEMM reads up to T4 rows, against zero digits past T.
  at::Tensor scores(const at::Tensor& codes, const float* scales, int64_t, int64_t T) {
    const int64_t r = c.s.r;
    if (bf16_values)
      qsvd::cpu::int8_to_bf16(codes.data_ptr<int8_t>(), T * r, codes_bf16.data());
    else
      tile_codes = codes.data_ptr<int8_t>();
    at::Tensor x = T == c.tile ? x_buf : at::empty({c.H, T}, c.q.options());  // [H, T]
    const int8_t* a = codes.data_ptr<int8_t>();
    if (r4 != r) {
      for (int64_t i = 0; i < T; ++i) std::memcpy(codes_padded.data() + i * r4, a + i * r, r);
      a = codes_padded.data();
    }
    int8_scores(digits, b, c.H, r4, a, T, scales, digit_acc.data(), x.data_ptr<float>());
    return x;
  }

  // pw: [H, tile] (the first T columns hold this tile's p_t s_t).
  void accumulate(at::Tensor& acc, const float* factor, bool rescale, const at::Tensor& pw, int64_t T) {
    const int64_t H = c.H, r = c.s.r, tile = c.tile;
    if (!bf16_values) {
      int8_values(acc, factor, pw, T);
      return;
    }
    if (rescale) {
      const at::Tensor f = at::from_blob(const_cast<float*>(factor), {1, H, 1}, acc2.options());
      acc2.view({2, H, r}).mul_(f);
    }
    const float* pp = pw.data_ptr<float>();
    for (int64_t h = 0; h < H; ++h)
      qsvd::cpu::split_bf16_row(pp + h * tile, T, w_split.data() + h * tile, w_split.data() + (H + h) * tile);
    cpu::gemm_bf16_f32()(cpu::kCblasRowMajor, cpu::kCblasNoTrans, cpu::kCblasNoTrans, 2 * H, r, T, 1.f,
                         w_split.data(), tile, codes_bf16.data(), r, 1.f, acc2.data_ptr<float>(), r);
  }

  void end_task(at::Tensor& acc) {
    if (bf16_values) at::add_out(acc, acc2.narrow(0, 0, c.H), acc2.narrow(0, c.H, c.H));  // hi + lo
  }

  // acc = acc * factor + sigma ((A + B/254) + C/254^2), [A; B; C] = digits
  // [3H, T4] x codes [T4, r], exact in int32 (|sum| <= 127^2 T4 < 2^24).
  void int8_values(at::Tensor& acc, const float* factor, const at::Tensor& pw, int64_t T) {
    const int64_t H = c.H, r = c.s.r, tile = c.tile, T4 = cpu::int8_brgemm_k(T);
    int8_t* dg = w_digits.data_ptr<int8_t>();
    const float* pp = pw.data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      int8_t* da = dg + h * T4;
      int8_t* db = dg + (H + h) * T4;
      int8_t* dc = dg + (2 * H + h) * T4;
      w_sigma[h] = qsvd::cpu::digit_row(pp + h * tile, T, da, db, dc);
      for (int64_t i = T; i < T4; ++i) da[i] = db[i] = dc[i] = 0;
    }
    const auto i8 = w_digits.options();
    at::_int_mm_out(v_sums, at::from_blob(dg, {3 * H, T4}, i8),
                    at::from_blob(const_cast<int8_t*>(tile_codes), {T4, r}, i8));
    const int32_t* sums = v_sums.data_ptr<int32_t>();
    const float inv254 = 1.f / 254.f, inv64516 = 1.f / 64516.f;
    float* ap = acc.data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      const int32_t *sa = sums + h * r, *sb = sums + (H + h) * r, *sc = sums + (2 * H + h) * r;
      const float sigma = w_sigma[h], f = factor[h];
      float* a = ap + h * r;
      for (int64_t j = 0; j < r; ++j) {
        const float digits_sum = (static_cast<float>(sa[j]) + static_cast<float>(sb[j]) * inv254) +
                                 static_cast<float>(sc[j]) * inv64516;
        a[j] = a[j] * f + sigma * digits_sum;
      }
    }
  }
};

// Partial RoPE with K's rotary part cached (rope_keys): the position-free
// dims on the split path, plus x += q'[:d_rope] . k_rope per token (fp32,
// at::bmm over kv heads, as the RoPE path reads the keys).
struct CachedKeysSplitWorker : AbsorbedSplitWorker {
  at::Tensor k_buf;  // fp32 [tile, H_kv d_rope]
  at::Tensor q_b;

  CachedKeysSplitWorker(const Call& call, const QueryDigits& qd)
      : AbsorbedSplitWorker(call, qd), k_buf(at::empty({call.tile, call.s.H_kv * call.s.d_rope}, call.q.options())) {}

  void begin_task(int64_t seq) {
    AbsorbedSplitWorker::begin_task(seq);
    q_b = c.q.narrow(0, seq, 1).view({c.s.H_kv, c.G, c.s.d_rope});
  }

  at::Tensor scores(const at::Tensor& codes, const float* scales, int64_t t0, int64_t T) {
    at::Tensor x = AbsorbedSplitWorker::scores(codes, scales, t0, T);  // [H, T]: the position-free part
    const int64_t H_kv = c.s.H_kv, n = c.s.d_rope, E = H_kv * n;
    at::Tensor kt = k_buf.narrow(0, 0, T);
    gather_rope_keys(c.rope_keys, rows_of(c.p, c.s, b, c.bits), t0, T, E, kt.data_ptr<float>());
    const at::Tensor xr = at::bmm(q_b, kt.view({T, H_kv, n}).permute({1, 2, 0})).view({c.H, T}).contiguous();
    const float* rp = xr.data_ptr<float>();
    float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < c.H * T; ++i) xp[i] = xp[i] + rp[i];
    return x;
  }
};

}  // namespace latent_cpu
}  // namespace qsvd_torch
