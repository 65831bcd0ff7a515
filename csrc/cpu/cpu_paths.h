// One place for the CPU kernels' path choices: what the CPU has, the ISA
// level of the element-wise loops (qsvd/cpu/isa.h), what torch offers
// (oneDNN's int8 brgemm, MKL's bf16 GEMM), and the environment knobs that
// force a path (read by the plan module, csrc/plan.h). The kernels ask
// here; qsvd_kernels._C.cpu_paths() reports all of it (csrc/module.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "qsvd/cpu/isa.h"

namespace qsvd_torch {
namespace cpu {

// CPU features the paths depend on, by name (avx2, fma, f16c, avx512f,
// avx512bw, avx512vl, avx512dq, avx512_vnni, avx512_bf16, amx_tile,
// amx_int8, amx_bf16), as the CPU and OS report them.
std::vector<std::pair<std::string, bool>> cpu_features();

// Raises (naming QSVD_CPU_ISA) when its value could not be honoured: every
// CPU op calls this first, and the package's import does.
void check_isa_env(const char* op);

// Whether torch's int8 batch-reduce GEMM (at::native::cpublas::brgemm)
// serves with exact int32 sums now. Asked per call: torch answers no on
// CPUs without AMX and while oneDNN is switched off
// (torch.backends.mkldnn.flags(enabled=False)), which can change at any
// time; the arithmetic is probed once.
bool int8_brgemm_ready();

// Whether at::_int_mm (oneDNN's int8 GEMM) returns exact int32 sums for
// full-range codes, probed once: 127 * 127 pairs are where a saturating
// 16-bit pair sum (pmaddubsw after the s8 -> u8 shift, 255 * 127 * 2 >
// 32767) would clip, as on CPUs without VNNI/AMX. quant_gemm and
// latent_attention's RoPE rebuild take the exact int8 GEMM only then.
// While oneDNN is switched off, at::_int_mm runs exact reference loops
// (true; about 100x slower).
bool int_mm_exact();
// at::_int_mm on oneDNN, exact: enabled now and the probe passed.
bool int_mm_fast();

// How latent_attention's split path forms its int8 digit scores now (asked
// per call): torch's int8 brgemm where ready (AMX) and MKL's bf16 GEMM is
// found (its V step), else at::_int_mm where fast (oneDNN's int8 GEMM,
// exact: VNNI; V on int8 digits too), else none.
enum class DigitScores { kNone, kBrgemm, kIntMm };
DigitScores digit_scores();

// MKL's C = alpha A B + beta C with bf16 A, B and fp32 C (row-major, no
// transposes), looked up at run time in torch's MKL; null when absent.
// Integer arguments go as 64-bit registers, which reads right whether this
// MKL's MKL_INT is 32- or 64-bit.
using GemmBf16F32 = void (*)(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k, float alpha,
                             const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c,
                             int64_t ldc);
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111;
GemmBf16F32 gemm_bf16_f32();

// QSVD_CPU_QUANT_GEMM's values (plan::cpu_quant_gemm_knob reads it).
enum class QuantGemmKnob { kAuto, kOneDnn, kBrgemm };

// Whether quant_gemm's M <= 64 calls stream b through brgemm under `knob`:
// auto where brgemm is ready, onednn never, brgemm always (an error naming
// the knob where brgemm is not ready).
bool quant_gemm_small_m_brgemm(QuantGemmKnob knob, const char* op = "quant_gemm");

// QSVD_CPU_LATENT_GEMM's values (plan::cpu_latent_gemm_knob reads it).
enum class LatentGemmKnob { kAuto, kFp32, kSplit };

// Whether latent_attention's absorbed path (no RoPE, or K's rotary part
// cached) could take the split GEMMs here now (digit_scores() is not none),
// and whether
// it does under the knob: auto where it could, fp32 never, split always (an
// error naming the knob where it could not).
bool latent_split_available();
bool latent_absorbed_split(const char* op);

// Whether latent_attention's weight-streaming products run now (the avx512
// level).
bool weight_streaming();

}  // namespace cpu
}  // namespace qsvd_torch
