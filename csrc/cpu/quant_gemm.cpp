// CPU quant_gemm: exact int32 sums of INT8/INT4 products from torch's int8
// GEMM (at::_int_mm: oneDNN, VNNI / AMX where the CPU has them), then the
// fp32 epilogue out = ((float(acc) * a_scale[m]) * b_scale[n]) (+ bias[n]),
// each step rounded, none fused: the CUDA kernels are tested bit for bit
// against this order.
//
// M <= 64: b streams through torch's int8 brgemm (below) where it serves.
// Otherwise W8A8 is one at::_int_mm over the whole problem; an INT4 operand
// is unpacked to int8 one tile at a time (never the whole matrix): tasks of
// (M tile, N tile) unpack what they need into thread-local buffers and run
// a single-threaded at::_int_mm on the tile.
//
// Exactness: oneDNN sums int8 products in int32 with wrap-around
// arithmetic on CPUs with VNNI or AMX, which is exact whenever the true sum
// fits int32 (K <= 131072 guarantees it for codes in [-127, 127]). Older
// CPUs without VNNI multiply through saturating 16-bit pairs, which is not
// exact for full-range codes; a probe at the first call detects that and
// the kernel then uses the exact scalar int32 loop instead, with a warning
// (never wrong numbers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "../plan.h"
#include "cpu_paths.h"
#include "int8_brgemm.h"
#include "store.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/formats.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// cpu_paths.h's probe, with a warning (once) where it fails.
// Whether at::_int_mm runs oneDNN here now and sums exactly (with oneDNN
// off it runs reference loops ~100x slower than the scalar path below).
bool int_mm_is_exact() {
  const bool ok = cpu::int_mm_fast();
  static std::once_flag warned;
  if (!ok && at::globalContext().userEnabledMkldnn())
    std::call_once(warned, [] {
      TORCH_WARN("qsvd.quant_gemm: torch's int8 GEMM (oneDNN) does not return exact int32 sums on this CPU ",
                 "(no VNNI/AMX); using the exact scalar loop, which is much slower");
    });
  return ok;
}

// Exact fallback: int32 dot products (GCC vectorizes the widening loop).
inline int32_t dot_int8(const int8_t* __restrict a, const int8_t* __restrict b, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(a[k]) * static_cast<int32_t>(b[k]);
  return acc;
}

// acc [m1 - m0, N-tile] int32 (row stride ld) -> out rows m0..m1, columns
// n0..n1: fp32 row in `row` (at least n1 - n0 floats), then one rounding to
// the output dtype.
template <typename scalar_t>
void epilogue(const int32_t* acc, int64_t ld, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* sa,
              const float* sb, const scalar_t* bias, scalar_t* out, int64_t N, float* row) {
  const int64_t w = n1 - n0;
  const float* sbn = sb + n0;
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* a = acc + (m - m0) * ld;
    const float s = sa[m];
    qsvd::cpu::dequant_row(a, w, s, sbn, row);  // (float(acc) * s) * sb, each product rounded
    if (bias != nullptr)
      for (int64_t n = 0; n < w; ++n) row[n] = row[n] + static_cast<float>(bias[n0 + n]);
    cpu::store_row(row, w, out + m * N + n0);
  }
}

// Rows [r0, r1) of stored codes as an int8 [r1 - r0, K] tensor: a view for
// INT8, an unpacked copy for INT4. `deinterleaved`: K in the
// chunk-deinterleaved order of qsvd::cpu::unpack_int4_deinterleaved (INT8
// rows are then copied into that order).
at::Tensor int8_rows(const at::Tensor& codes, int64_t bits, int64_t r0, int64_t r1, int64_t K,
                     bool deinterleaved = false) {
  if (bits == 8 && !deinterleaved) return codes.narrow(0, r0, r1 - r0);
  at::Tensor out = at::empty({r1 - r0, K}, codes.options().dtype(at::kChar));
  int8_t* op = out.data_ptr<int8_t>();
  if (bits == 8) {
    const int8_t* in = codes.data_ptr<int8_t>();
    for (int64_t r = r0; r < r1; ++r) qsvd::cpu::deinterleave_int8_row(in + r * K, K, op + (r - r0) * K);
    return out;
  }
  const uint8_t* in = codes.data_ptr<uint8_t>();
  const int64_t row = qsvd::code_row_bytes(4, K);
  for (int64_t r = r0; r < r1; ++r) {
    if (deinterleaved)
      qsvd::cpu::unpack_int4_deinterleaved(in + r * row, K, op + (r - r0) * K);
    else
      qsvd::cpu::unpack_int4_row(in + r * row, K, op + (r - r0) * K);
  }
  return out;
}

// ---- Small M: b streams once, as the row operand of torch's brgemm ----
//
// For M <= 64 the GEMM is a stream over b (N K codes against a few rows of
// a). It runs transposed, acc^T [N, M] = b [N, K] x a^T [K, M], on torch's
// int8 batch-reduce GEMM (at::native::cpublas::brgemm): a^T is packed once
// (M padded to a multiple of 16: brgemm's N must be one, up to 64), and
// every call takes rows of b as they are stored. INT8 rows go straight from
// memory, all of K in one call (when K % 4 == 0; else they are copied per
// K slice, zero padded, like INT4). INT4 rows are unpacked one K slice at a
// time into a buffer that stays in L1 (kBrgemmRows x kBrgemmSlice = 32 KiB):
// on this project's host brgemm ran about 2.5x faster on an L1 buffer than
// on 128 KiB ones (L2), and smaller slices mean more calls (about 0.13 us
// of overhead each).
//
// The INT4 unpack writes each 128-code chunk of a slice as its 64 even and
// then its 64 odd codes (one table lookup per 64 or 32 codes,
// qsvd::cpu::unpack_int4_deinterleaved); a^T is packed in the same order of
// K. The int32 sums are exact in any order, so nothing changes but speed.
//
// docs/ops.md has the measurements: INT8 rows straight into brgemm beat
// at::_int_mm, which reorders b on every call; INT4 costs its unpack plus
// brgemm on the L1 buffer, one after the other.
constexpr int64_t kBrgemmRows = 64;
constexpr int64_t kBrgemmSlice = 512;  // codes; a multiple of the unpack's 128-code chunks

}  // namespace

// The path a CPU call takes (qsvd_kernels._C.quant_gemm_cpu_path names it).
// QSVD_CPU_QUANT_GEMM, read per call (cpu_paths.h): auto (the default)
// takes brgemm for M <= 64 where it is ready; onednn keeps every M on
// at::_int_mm; brgemm insists for M <= 64 (an error where brgemm is not
// ready). The knob is parsed, and a forced brgemm checked, before any path.
// K < 4 always takes the exact scalar loop: at most 3 products per output,
// and torch 2.14's at::_int_mm returns wrong (and unrepeatable) sums at
// K = 1.
CpuGemmPath quant_gemm_cpu_path(int64_t M, int64_t K) {
  const cpu::QuantGemmKnob knob = plan::cpu_quant_gemm_knob("quant_gemm");
  const bool brgemm = M <= cpu::kInt8BrgemmMaxN && cpu::quant_gemm_small_m_brgemm(knob, "quant_gemm");
  if (K == 0) return CpuGemmPath::kEmpty;
  if (K < 4) return CpuGemmPath::kScalar;
  if (brgemm) return CpuGemmPath::kBrgemm;
  return int_mm_is_exact() ? CpuGemmPath::kOneDnn : CpuGemmPath::kScalar;
}

namespace {

template <typename scalar_t>
void quant_gemm_brgemm(const at::Tensor& a, const at::Tensor& b, int64_t a_bits, int64_t b_bits, int64_t M,
                       int64_t N, int64_t K, const float* sap, const float* sbp, const scalar_t* biasp,
                       scalar_t* op) {
#if defined(CPUBLAS_BRGEMM_I8I8I32)
  const int64_t K4 = cpu::int8_brgemm_k(K);
  const bool b_int4 = b_bits == 4, b_direct = !b_int4 && K4 == K;
  const int64_t Kc = b_direct ? K4 : std::min(kBrgemmSlice, K4);
  const int64_t slices = (K4 + Kc - 1) / Kc;
  const int64_t Mp = cpu::int8_brgemm_n(M), Kp = cpu::int8_brgemm_packed_k(Kc);

  // a^T per K slice, in the order of K that b's rows will have, zero padded.
  std::vector<int8_t> a_rows(M * K), plain(K4 * Mp, 0), packed(slices * Kp * Mp, 0);
  const int64_t a_row_bytes = qsvd::code_row_bytes(static_cast<int>(a_bits), K);
  for (int64_t m = 0; m < M; ++m)
    qsvd::cpu::unpack_codes_row(static_cast<const uint8_t*>(a.data_ptr()) + m * a_row_bytes, K,
                                static_cast<int>(a_bits), a_rows.data() + m * K);
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t k0 = s * Kc, kw = std::min(Kc, K4 - k0), kv = std::min(Kc, K - k0);
    for (int64_t j = 0; j < kv; ++j) {
      const int64_t k = k0 + (b_int4 ? qsvd::cpu::int4_deinterleaved_source(j, kv) : j);
      for (int64_t m = 0; m < M; ++m) plain[(k0 + j) * Mp + m] = a_rows[m * K + k];
    }
    at::native::cpublas::pack(kw, Mp, Mp, Mp, at::kChar, at::kChar, plain.data() + k0 * Mp,
                              packed.data() + s * Kp * Mp);
  }

  const uint8_t* bp = static_cast<const uint8_t*>(b.data_ptr());
  const int64_t b_row_bytes = qsvd::code_row_bytes(static_cast<int>(b_bits), K);
  const int64_t chunks = (N + kBrgemmRows - 1) / kBrgemmRows;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int8_t> rows(b_direct ? 0 : kBrgemmRows * Kc);  // one K slice of a chunk's rows, [R, kw]
    std::vector<int32_t> acc(kBrgemmRows * Mp), column(kBrgemmRows);
    std::vector<float> row(kBrgemmRows);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kBrgemmRows, R = std::min(kBrgemmRows, N - n0);
      const uint8_t* b_chunk = bp + n0 * b_row_bytes;
      if (b_direct) {
        at::native::cpublas::brgemm(R, Mp, K, K, Mp, Mp, false, reinterpret_cast<const signed char*>(b_chunk),
                                    reinterpret_cast<const signed char*>(packed.data()), acc.data());
      } else {
        for (int64_t s = 0; s < slices; ++s) {
          const int64_t k0 = s * Kc, kw = std::min(Kc, K4 - k0), kv = std::min(Kc, K - k0);
          for (int64_t i = 0; i < R; ++i) {
            int8_t* dst = rows.data() + i * kw;
            if (b_int4)
              qsvd::cpu::unpack_int4_deinterleaved(b_chunk + i * b_row_bytes + k0 / 2, kv, dst);
            else
              std::memcpy(dst, b_chunk + i * b_row_bytes + k0, kv);
            if (kv < kw) std::memset(dst + kv, 0, kw - kv);
          }
          at::native::cpublas::brgemm(R, Mp, kw, kw, Mp, Mp, s > 0, reinterpret_cast<const signed char*>(rows.data()),
                                      reinterpret_cast<const signed char*>(packed.data() + s * Kp * Mp), acc.data());
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t i = 0; i < R; ++i) column[i] = acc[i * Mp + m];
        epilogue(column.data(), 0, m, m + 1, n0, n0 + R, sap, sbp, biasp, op, N, row.data());
      }
    }
    at::native::cpublas::brgemm_release();
  });
#else
  (void)a, (void)b, (void)a_bits, (void)b_bits, (void)M, (void)N, (void)K, (void)sap, (void)sbp, (void)biasp,
      (void)op;
  TORCH_CHECK(false, "qsvd.quant_gemm: the brgemm path was chosen without brgemm");
#endif
}

}  // namespace

at::Tensor quant_gemm_cpu(const at::Tensor& a_in, const at::Tensor& a_scale, const at::Tensor& b_in,
                          const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits, at::ScalarType out_dtype,
                          const std::optional<at::Tensor>& bias_in) {
  cpu::check_isa_env("quant_gemm");
  const GemmShape s = check_quant_gemm(a_in, a_scale, b_in, b_scale, a_bits, b_bits, out_dtype, bias_in);
  at::Tensor out = at::empty({s.M, s.N}, a_in.options().dtype(out_dtype));
  if (s.M == 0 || s.N == 0) return out;
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sa = a_scale.contiguous(), sb = b_scale.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t M = s.M, N = s.N, K = s.K;
  const CpuGemmPath path = quant_gemm_cpu_path(M, K);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "quant_gemm_cpu", [&] {
    const float* sap = sa.data_ptr<float>();
    const float* sbp = sb.data_ptr<float>();
    const scalar_t* biasp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();

    if (path == CpuGemmPath::kEmpty) {  // an empty sum is 0; the bias still lands
      const std::vector<int32_t> zeros(N, 0);
      std::vector<float> row(N);
      for (int64_t m = 0; m < M; ++m) epilogue(zeros.data(), 0, m, m + 1, 0, N, sap, sbp, biasp, op, N, row.data());
      return;
    }

    if (path == CpuGemmPath::kScalar) {
      const at::Tensor A = int8_rows(a, a_bits, 0, M, K), B = int8_rows(b, b_bits, 0, N, K);
      const int8_t* ap = A.data_ptr<int8_t>();
      const int8_t* bp = B.data_ptr<int8_t>();
      at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
        std::vector<int32_t> acc(N);
        std::vector<float> row(N);
        for (int64_t m = m0; m < m1; ++m) {
          for (int64_t n = 0; n < N; ++n) acc[n] = dot_int8(ap + m * K, bp + n * K, K);
          epilogue(acc.data(), 0, m, m + 1, 0, N, sap, sbp, biasp, op, N, row.data());
        }
      });
      return;
    }

    if (path == CpuGemmPath::kBrgemm) {
      quant_gemm_brgemm(a, b, a_bits, b_bits, M, N, K, sap, sbp, biasp, op);
      return;
    }

    if (a_bits == 8 && b_bits == 8) {
      // One oneDNN GEMM (threaded inside), then the epilogue over rows.
      const at::Tensor acc = at::_int_mm(a, b.t());
      const int32_t* accp = acc.data_ptr<int32_t>();
      // Tasks of at least 256 K outputs (about 0.2 ms): a decode step's
      // epilogue (M = 16, N = 4096: 60 us) runs on the calling thread, not
      // in a second parallel region after oneDNN's, whose start can cost
      // more than the work (a scheduler tick on a busy machine).
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / N);
      at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
        std::vector<float> row(N);
        epilogue(accp + m0 * N, N, m0, m1, 0, N, sap, sbp, biasp, op, N, row.data());
      });
      return;
    }

    // An INT4 operand: tiles of about 1 MiB of unpacked int8 of b (4 MiB of a).
    // An INT4 b is unpacked in the chunk-deinterleaved order of K (one table
    // lookup per 32 or 64 codes, about 1.5 times faster than the natural
    // order's unpack and interleave), and a is brought into the same order
    // (INT4: unpacked so; INT8: copied so, once); int32 sums are exact in
    // any order of K. At small M the unpack is most of what this path adds
    // to the GEMM (M = 1, N = K = 4096 on a Zen 4 CPU: about half).
    const bool deint = b_bits == 4;
    const at::Tensor a8 = a_bits == 8 && deint ? int8_rows(a, 8, 0, M, K, true) : at::Tensor();
    const int64_t tile_n = std::clamp<int64_t>(((int64_t{1} << 20) / K) / 16 * 16, 16, 1024);
    const int64_t tile_m = a_bits == 4 ? std::clamp<int64_t>(((int64_t{1} << 22) / K) / 16 * 16, 16, 1024)
                                       : std::max<int64_t>(M, 1);
    const int64_t tiles_m = (M + tile_m - 1) / tile_m, tiles_n = (N + tile_n - 1) / tile_n;
    at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / tiles_n) * tile_m, n0 = (t % tiles_n) * tile_n;
        const int64_t m1 = std::min(m0 + tile_m, M), n1 = std::min(n0 + tile_n, N);
        const at::Tensor At = a8.defined() ? a8.narrow(0, m0, m1 - m0) : int8_rows(a, a_bits, m0, m1, K, deint);
        const at::Tensor Bt = int8_rows(b, b_bits, n0, n1, K, deint);
        const at::Tensor acc = at::_int_mm(At, Bt.t());  // single-threaded inside the parallel region
        std::vector<float> row(n1 - n0);
        epilogue(acc.data_ptr<int32_t>(), n1 - n0, m0, m1, n0, n1, sap, sbp, biasp, op, N, row.data());
      }
    });
  });
  return out;
}

}  // namespace qsvd_torch
