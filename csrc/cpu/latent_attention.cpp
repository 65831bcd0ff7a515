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
//        q_lat against the int8 codes on torch's int8 brgemm (AMX) or
//        at::_int_mm (oneDNN, VNNI) (exact int32 sums; see
//        latent_absorbed_split_path.h), else at::mm in fp32; partial RoPE
//        with K's rotary part cached: the same, plus q'[:d_rope] . k_rope;
//   3. online softmax in base 2 with an integer running max M, so every
//      rescale is an exact power of two (as the CUDA kernels);
//   4. V absorbed in latent space: acc[H, r] += (p_t s_t)[H, T] x codes[T, r]
//      (at::addmm; on the split path bf16 hi/lo on MKL's bf16 GEMM with
//      brgemm's digit scores, three int8 digits of p s on at::_int_mm with
//      _int_mm's).
// The splits of a sequence are merged (powers of two again), then
// out = ((acc x W_uv) * w_uv_scale) / l per kv head and
// lse = (M + log2 l) ln 2. q_lat = W_uk q' and acc x W_uv read the weights
// in their stored dtype for a few query rows (qsvd/cpu/simd.h); for more
// rows, int8 digits of the rows on at::_int_mm against int8 weights on the
// split path with _int_mm's digit scores (int8_digits_times_weights), else
// at::mm on an fp32 copy.
//
// The paths: RoPE (latent_rope_path.h), absorbed on split-precision GEMMs
// (latent_absorbed_split_path.h) and absorbed on fp32 GEMMs
// (latent_absorbed_fp32_path.h), chosen once per call (plan_path below);
// one outer loop (run_tasks) drives whichever was chosen, tile by tile:
// gather, the path's scores, the online softmax, the path's V step.
//
// Threads: tasks run on at::parallel_for (torch's OpenMP team);
// the GEMMs inside a task run on its thread. A sequence is split into
// about 2 x threads / B parts, so one long sequence uses every core.
//
// Numerics: fp32 arithmetic with round-to-nearest; the error bound of every
// output, derived from this evaluation order, is in docs/ops.md and
// qsvd_kernels/testing.py (latent_attention_error_bound, kernel="cpu").
#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "../plan.h"
#include "latent_absorbed_fp32_path.h"
#include "latent_absorbed_split_path.h"
#include "latent_common.h"
#include "latent_rope_path.h"
#include "qsvd/formats.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

using namespace latent_cpu;

// The path of a call (plan::CpuLatentPath), chosen once by its plan.
using Path = plan::CpuLatentPath;

// Up to this many query rows per kv head (at the avx512 ISA level), q_lat =
// W_uk q and o = acc W_uv read the weights in their stored type
// (qsvd/cpu/simd.h, one pass over them); above it, one fp32 conversion
// per head and a torch GEMM, which then costs less than re-reading the
// weights per query row.
constexpr int64_t kWeightStreamRows = 8;

// x [M, K] (fp32) times w [K, N] (int8, any strides) -> fp32 [M, N], x's
// rows as int8 digits (qsvd::digit_row; two: |x - sigma (a + b/254)| <=
// max|x_row| (1 + u) / 64516 + u |x|; three: <= 1.03 u max|x_row| + u |x|)
// and one exact int32 GEMM on at::_int_mm ([n M, K] x [K, N], K a
// multiple of 4), then sigma ((A + B/254) + C/254^2) in fp32 (|A|, |B|,
// |C| <= 127^2 K < 2^24 for K < 1040: exact; beyond, one more rounding
// each, inside the bound's count). The split path's up-projections with
// int8 weights: q_lat = W_uk q'' on two digits (its scores read q_lat as
// two digits anyway), acc W_uv on three (fp32-class: the output).
at::Tensor int8_digits_times_weights(const at::Tensor& x, const at::Tensor& w, int n_digits) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  const at::Tensor xc = x.contiguous();
  at::Tensor digits = at::empty({n_digits * M, K}, x.options().dtype(at::kChar));
  std::vector<float> sigma(M);
  const float* xp = xc.data_ptr<float>();
  int8_t* dp = digits.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; ++m)
    sigma[m] = qsvd::cpu::digit_row(xp + m * K, K, dp + m * K, dp + (M + m) * K,
                                    n_digits == 3 ? dp + (2 * M + m) * K : nullptr);
  const at::Tensor sums = at::_int_mm(digits, w);  // [n M, N]
  const int32_t* sp = sums.data_ptr<int32_t>();
  const float inv254 = 1.f / 254.f, inv64516 = 1.f / 64516.f;
  at::Tensor o = at::empty({M, N}, x.options());
  float* op = o.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const int32_t *sa = sp + m * N, *sb = sp + (M + m) * N;
    for (int64_t j = 0; j < N; ++j) {
      float v = static_cast<float>(sa[j]) + static_cast<float>(sb[j]) * inv254;
      if (n_digits == 3) v = v + static_cast<float>(sp[(2 * M + m) * N + j]) * inv64516;
      op[m * N + j] = sigma[m] * v;
    }
  }
  return o;
}

struct Partials {
  at::Tensor m, l, acc;  // per task: [tasks, H], [tasks, H], [tasks, H, r]
};

// The one outer loop: each task's tiles, through the path's worker (one
// per task thread, made by make_worker).
template <class MakeWorker>
void run_tasks(const Call& c, const std::vector<Task>& tasks, const Partials& parts, const MakeWorker& make_worker) {
  const int64_t H = c.H, r = c.s.r, tile = c.tile, bits = c.bits;
  const auto f32 = c.q.options().dtype(at::kFloat);
  parallel_tasks(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t task0, int64_t task1) {
    auto worker = make_worker();
    // Zeroed once: rows past a short tile's T stay finite codes (zeros or
    // an earlier tile's), which a worker may read against zero weights.
    at::Tensor codes = at::zeros({tile, r}, f32.dtype(at::kChar));
    std::vector<float> scales(tile), factor(H);
    at::Tensor pw = at::empty({H, tile}, f32);  // p_t s_t
    for (int64_t ti = task0; ti < task1; ++ti) {
      const Task task = tasks[ti];
      const LatentRows rows = rows_of(c.p, c.s, task.b, bits);
      float* m = parts.m.data_ptr<float>() + ti * H;
      float* l = parts.l.data_ptr<float>() + ti * H;
      at::Tensor acc = parts.acc.narrow(0, ti, 1).view({H, r});
      acc.zero_();
      worker.begin_task(task.b);
      for (int64_t h = 0; h < H; ++h) m[h] = -std::numeric_limits<float>::infinity(), l[h] = 0.f;
      for (int64_t t0 = task.t0; t0 < task.t1; t0 += tile) {
        const int64_t T = std::min(tile, task.t1 - t0);
        at::Tensor cb = codes.narrow(0, 0, T);
        rows.gather(t0, T, cb.data_ptr<int8_t>(), scales.data());
        const at::Tensor x = worker.scores(cb, scales.data(), t0, T);  // [H, T], log2 units

        // Online softmax, base 2, integer running max (exact rescales).
        const float* xp = x.data_ptr<float>();
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
        worker.accumulate(acc, factor.data(), rescale, pw, T);
      }
      worker.end_task(acc);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> latent_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale,
    const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits, double sm_scale_d,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    bool /*check_indices: the CPU always checks (a host loop, no sync)*/, const std::optional<at::Tensor>& plan_in,
    const std::optional<at::Tensor>& rope_keys) {
  const char* op = "latent_attention";
  cpu::check_isa_env(op);
  int64_t H = 0;
  const LatentShape s = check_latent_attention(q_in, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale,
                                               w_uv, w_uv_scale, bits, sm_scale_d, rope_cos, rope_sin, &H);
  if (rope_keys.has_value()) check_rope_keys(op, *rope_keys, s, cache);
  // The plan: the one given (made by latent_attention_plan, checked against
  // this call), else made now (reads QSVD_CPU_LATENT_GEMM).
  plan::LatentPlan call_plan = plan::latent_plan_signature(q_in, s, H, bits, w_uk, rope_cos, rope_keys.has_value());
  if (plan_in.has_value())
    call_plan = plan::read_latent_plan(op, *plan_in, call_plan);
  else
    plan::plan_latent_attention_cpu(call_plan, op);
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

  // The plan's path, and tasks of whole tiles, about 2 x the plan's threads
  // per batch.
  const Path path = static_cast<Path>(call_plan.cpu_path);
  // Tiles of kTileRope tokens where K's rotary part is rebuilt (its buffer);
  // read from rope_keys, the absorbed tiles (fewer GEMM calls per token).
  const int64_t tile = path == Path::kRope && !rope_keys.has_value() ? kTileRope : kTileAbsorbed;
  const int64_t threads = call_plan.cpu_threads;
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

  // The position-free dims [d0, d) are absorbed: q_lat[b, h] = W_uk[kv][:,
  // d0:] q'[b, h, d0:] ([B, H, r]), per kv head. No RoPE: d0 = 0; partial
  // RoPE: d0 = d_rope; full RoPE: none.
  at::Tensor q_lat;
  const at::Tensor w_uk_c = w_uk.contiguous(), w_uv_c = w_uv.contiguous();
  const bool stream_weights = B * G <= kWeightStreamRows && qsvd::cpu::weight_streaming_available();
  const int64_t d0 = s.rope ? s.d_rope : 0, dn = d - d0;
  // How the split path's int8 GEMMs run, asked once per call (oneDNN may be
  // switched between calls): brgemm (AMX) or at::_int_mm (VNNI).
  const cpu::DigitScores digit_gemm = path == Path::kAbsorbedSplit ? cpu::digit_scores() : cpu::DigitScores::kNone;
  // With _int_mm's digit scores and int8 weights, the up-projections of
  // more rows than weight streaming serves run on int8 digits too (K a
  // multiple of 4: torch's _int_mm gets K = 1 wrong; others stay fp32).
  const bool int8_up = digit_gemm == cpu::DigitScores::kIntMm && !stream_weights;
  if (dn > 0) {
    const bool int8_q_lat = int8_up && w_uk.scalar_type() == at::kChar && dn % 4 == 0;
    q_lat = at::empty({B, H_kv, G, r}, f32);
    at::Tensor qk = q.view({B, H_kv, G, d}).narrow(3, d0, dn);
    if (w_uk_scale.has_value())
      qk = qk.mul(w_uk_scale->to(at::kFloat).narrow(1, d0, dn).view({1, H_kv, 1, dn}));
    qk = qk.contiguous();
    parallel_tasks(0, H_kv, 1, [&](int64_t h0, int64_t h1) {
      if (stream_weights && d0 == 0) {  // streaming reads whole [r, d] heads
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
      at::Tensor wf = int8_q_lat ? at::Tensor() : at::empty({r, dn}, f32);
      for (int64_t hk = h0; hk < h1; ++hk) {
        const at::Tensor qh = qk.select(1, hk).reshape({B * G, dn});
        at::Tensor lat;  // [B G, r]
        if (int8_q_lat) {
          lat = int8_digits_times_weights(qh, w_uk_c.select(0, hk).narrow(1, d0, dn).t(), 2);
        } else {
          wf.copy_(w_uk.select(0, hk).narrow(1, d0, dn));  // exact fp32 copy
          lat = at::mm(qh, wf.t());
        }
        q_lat.select(1, hk).copy_(lat.view({B, G, r}));
      }
    });
    q_lat = q_lat.view({B, H, r});
  }
  // The queries' rotary dims (the RoPE path; the split path with cached keys).
  const at::Tensor q_rope = s.rope ? q.narrow(2, 0, s.d_rope).contiguous() : q;
  // Per-task partial state: M (integer running max, log2 units), l, acc.
  at::Tensor m_all = at::empty({std::max<int64_t>(n_tasks, 1), H}, f32);
  at::Tensor l_all = at::empty({std::max<int64_t>(n_tasks, 1), H}, f32);
  at::Tensor acc_all = at::empty({std::max<int64_t>(n_tasks, 1), H, r}, f32);
  const Call call{p, s, bits, H, G, E, tile, q_rope, q_lat, rope_keys.has_value() ? *rope_keys : at::Tensor()};
  const Partials parts{m_all, l_all, acc_all};
  switch (path) {
    case Path::kRope: {
      const std::optional<at::Tensor> ws =
          w_uk_scale.has_value() ? std::optional<at::Tensor>(w_uk_scale->narrow(1, 0, s.d_rope)) : std::nullopt;
      // The rotary columns (not needed when they are cached: rope_keys).
      const Rebuild rb = rope_keys.has_value() ? Rebuild{} : rebuild_operand(w_uk.narrow(2, 0, s.d_rope), ws);
      run_tasks(call, tasks, parts, [&] { return RopeWorker(call, rb); });
      break;
    }
    case Path::kAbsorbedSplit: {
      const QueryDigits digits = split_query(q_lat, digit_gemm == cpu::DigitScores::kBrgemm);
      if (rope_keys.has_value())
        run_tasks(call, tasks, parts, [&] { return CachedKeysSplitWorker(call, digits); });
      else
        run_tasks(call, tasks, parts, [&] { return AbsorbedSplitWorker(call, digits); });
      break;
    }
    case Path::kAbsorbedFp32:
      run_tasks(call, tasks, parts, [&] { return AbsorbedFp32Worker(call); });
      break;
  }

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
    const bool int8_v_up = int8_up && w_uv.scalar_type() == at::kChar && r % 4 == 0;
    parallel_tasks(0, H_kv, 1, [&](int64_t h0, int64_t h1) {
      at::Tensor wf = stream_weights || int8_v_up ? at::Tensor() : at::empty({r, d}, f32);
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
        at::Tensor oh;  // [B G, d]
        if (int8_v_up) {
          oh = int8_digits_times_weights(acc_kv.select(1, hk).reshape({B * G, r}), w_uv_c.select(0, hk), 3);
        } else {
          head_weights_f32(w_uv, hk, wf);
          oh = at::mm(acc_kv.select(1, hk).reshape({B * G, r}), wf);
        }
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

// check_indices: the CPU always checks.
void latent_rope_keys_append_cpu(QSVD_ROPE_KEYS_APPEND_PARAMS) {
  (void)check_indices;
  const char* op = "latent_rope_keys_append";
  cpu::check_isa_env(op);
  const LatentShape s = check_latent_rope_keys_append(cache, cache_scale, slot_mapping, positions, w_uk, w_uk_scale,
                                                      bits, rope_cos, rope_sin, rope_keys);
  const int64_t N = slot_mapping.size(0), r = s.r, H_kv = s.H_kv, n = s.d_rope, E = H_kv * n;
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  check_rope_keys_rows_host(op, slots, pos, s.num_blocks * s.block_size, rope_cos.size(0));
  std::vector<int64_t> rows;  // the real rows (slot >= 0)
  for (int64_t i = 0; i < N; ++i)
    if (sp[i] >= 0) rows.push_back(i);
  if (rows.empty()) return;
  const at::Tensor cache_c = cache.contiguous();
  const std::optional<at::Tensor> scale_c =
      cache_scale.has_value() ? std::optional<at::Tensor>(cache_scale->contiguous()) : std::nullopt;
  const qsvd::LatentCacheLayout layout = latent_cache_layout(cache_c, scale_c, bits, r);
  const std::optional<at::Tensor> ws =
      w_uk_scale.has_value() ? std::optional<at::Tensor>(w_uk_scale->narrow(1, 0, n)) : std::nullopt;
  const Rebuild rb = rebuild_operand(w_uk.narrow(2, 0, n), ws);  // the rotary columns
  const at::Tensor cos = rope_cos.contiguous(), sin = rope_sin.contiguous();
  const int64_t R = static_cast<int64_t>(rows.size());
  const auto f32 = cache.options().dtype(at::kFloat);
  // The first row whose finite key rounds to an infinite fp16 (INT64_MAX: none).
  std::atomic<int64_t> overflow{std::numeric_limits<int64_t>::max()};
  parallel_tasks(0, (R + kTileRope - 1) / kTileRope, 1, [&](int64_t k0, int64_t k1) {
    at::Tensor codes = at::empty({kTileRope, r}, f32.dtype(at::kChar));
    at::Tensor codes_f = at::empty({kTileRope, r}, f32);
    at::Tensor kb = at::empty({kTileRope, E}, f32);
    std::vector<float> scales(kTileRope), tmp(n);
    at::Half* out = rope_keys.data_ptr<at::Half>();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i0 = k * kTileRope, T = std::min(kTileRope, R - i0);
      for (int64_t j = 0; j < T; ++j) {
        const int64_t slot = sp[rows[i0 + j]];
        qsvd::cpu::unpack_codes_row(layout.codes_of(slot), r, static_cast<int>(bits),
                                    codes.data_ptr<int8_t>() + j * r);
        std::memcpy(scales.data() + j, layout.scale_of(slot), sizeof(float));
      }
      at::Tensor c = codes.narrow(0, 0, T), cf = codes_f.narrow(0, 0, T), kt = kb.narrow(0, 0, T);
      qsvd::cpu::int8_to_float(c.data_ptr<int8_t>(), T * r, cf.data_ptr<float>());
      rebuild_tile(rb, c, cf, kt);
      float* kp = kt.data_ptr<float>();
      for (int64_t j = 0; j < T; ++j) {
        const int64_t i = rows[i0 + j];
        scale_and_rope(kp + j * E, H_kv, n, n, scales[j], cos.data_ptr<float>() + pp[i] * n,
                       sin.data_ptr<float>() + pp[i] * n, tmp.data());
        at::Half* dst = out + sp[i] * E;
        for (int64_t e = 0; e < E; ++e) {
          const float v = kp[j * E + e];
          dst[e] = static_cast<at::Half>(v);
          if (std::isinf(static_cast<float>(dst[e])) && std::isfinite(v)) {
            int64_t cur = overflow.load();
            while (i < cur && !overflow.compare_exchange_weak(cur, i)) {
            }
          }
        }
      }
    }
  });
  const int64_t first = overflow.load();
  check_rope_keys_in_range(op, first == std::numeric_limits<int64_t>::max() ? -1 : first);
}

std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cpu(
    const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    std::optional<at::ScalarType> out_dtype_opt, bool /*check_indices: the CPU always checks*/,
    const std::optional<at::Tensor>& rope_keys) {
  const char* op = "latent_reconstruct_kv";
  cpu::check_isa_env(op);
  const LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, block_table, seq_lens, w_uk,
                                                       w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin);
  if (rope_keys.has_value()) check_rope_keys(op, *rope_keys, s, cache);
  const bool cached = rope_keys.has_value();
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
    std::vector<float> scales(tile), tmp(d), rk_buf(cached ? tile * H_kv * s.d_rope : 0);
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
      const bool rotate = s.rope && !cached;  // cached: the rotary dims are read below, already rotated
      for (int64_t i = 0; i < T; ++i) {
        const int64_t t = task.t0 + i;
        scale_and_rope(kp + i * E, H_kv, d, s.d_rope, scales[i],
                       rotate ? p.cos.data_ptr<float>() + t * s.d_rope : nullptr,
                       rotate ? p.sin.data_ptr<float>() + t * s.d_rope : nullptr, tmp.data());
        for (int64_t e = 0; e < E; ++e) vp[i * E + e] = vp[i * E + e] * scales[i];
      }
      if (cached) {
        const int64_t Er = H_kv * s.d_rope;
        gather_rope_keys(*rope_keys, rows, task.t0, T, Er, rk_buf.data());
        for (int64_t i = 0; i < T; ++i)
          for (int64_t h = 0; h < H_kv; ++h)
            std::memcpy(kp + i * E + h * d, rk_buf.data() + i * Er + h * s.d_rope, s.d_rope * sizeof(float));
      }
      const int64_t row0 = offset[task.b] + task.t0;
      k.view({-1, E}).narrow(0, row0, T).copy_(kt);
      v.view({-1, E}).narrow(0, row0, T).copy_(vt);
    }
  });
  return {k, v};
}

}  // namespace qsvd_torch
