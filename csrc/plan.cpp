// The plan module (plan.h): the environment knobs, parsed once each here,
// and latent_attention's precedence.
#include "plan.h"

#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "tuning.h"

namespace qsvd_torch {
namespace plan {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || v[0] == '\0' ? nullptr : v;
}

bool is_auto(const char* v) { return v == nullptr || std::strcmp(v, "auto") == 0; }

}  // namespace

std::optional<std::string> knob_value(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::nullopt : std::optional<std::string>(v);
}

cpu::QuantGemmKnob cpu_quant_gemm_knob(const char* op) {
  const char* v = env("QSVD_CPU_QUANT_GEMM");
  if (is_auto(v)) return cpu::QuantGemmKnob::kAuto;
  if (std::strcmp(v, "onednn") == 0) return cpu::QuantGemmKnob::kOneDnn;
  QSVD_CHECK(std::strcmp(v, "brgemm") == 0, op, "QSVD_CPU_QUANT_GEMM must be onednn, brgemm or auto, got '", v, "'");
  return cpu::QuantGemmKnob::kBrgemm;
}

cpu::LatentGemmKnob cpu_latent_gemm_knob(const char* op) {
  const char* v = env("QSVD_CPU_LATENT_GEMM");
  if (is_auto(v)) return cpu::LatentGemmKnob::kAuto;
  if (std::strcmp(v, "fp32") == 0) return cpu::LatentGemmKnob::kFp32;
  QSVD_CHECK(std::strcmp(v, "split") == 0, op, "QSVD_CPU_LATENT_GEMM must be fp32, split or auto, got '", v, "'");
  return cpu::LatentGemmKnob::kSplit;
}

bool host_index_checks(const char* op) {
  static const char* const value = env("QSVD_SKIP_INDEX_CHECKS");  // read once
  if (value == nullptr || std::strcmp(value, "0") == 0) return true;
  QSVD_CHECK(std::strcmp(value, "1") == 0, op, "QSVD_SKIP_INDEX_CHECKS must be 0 or 1, got '", value, "'");
  return false;
}

LatentEnv latent_env(const char* op) {
  namespace lat = qsvd::latent;
  LatentEnv e;
  const char* k = env("QSVD_LATENT_KERNEL");
  if (!is_auto(k)) {
    if (std::strcmp(k, "simt") == 0) {
      e.choice = lat::KernelChoice::kSimt;
    } else {
      QSVD_CHECK(std::strcmp(k, "tc") == 0, op, "QSVD_LATENT_KERNEL must be simt, tc or auto, got '", k, "'");
      e.choice = lat::KernelChoice::kTensorCore;
    }
  }
  if (const char* s = env("QSVD_LATENT_SPLITS")) {
    char* end = nullptr;
    const long n = std::strtol(s, &end, 10);
    QSVD_CHECK(*end == '\0' && n >= 0 && n <= lat::kMaxSplits, op,
               "QSVD_LATENT_SPLITS must be an integer in [0, ", lat::kMaxSplits, "] (0 = choose), got '", s, "'");
    e.splits = static_cast<int>(n);
  }
  e.set = e.choice != lat::KernelChoice::kAuto || e.splits != 0;
  return e;
}

const char* latent_attention(int device, qsvd::latent::LatentAttentionParams& p, int64_t token_capacity,
                             int sm_count, size_t smem_limit, const char* op, qsvd::tuning::LatentDecision* d,
                             std::string* label) {
  namespace qt = qsvd::tuning;
  *d = qt::LatentDecision{};
  if (label != nullptr) label->clear();
  if (forced_latent_plan(device, &d->choice, &d->knobs)) {
    d->source = qt::RuleSource::kForced;
  } else {
    const LatentEnv e = latent_env(op);
    if (!e.set) return plan_latent_tuned(device, p, token_capacity, sm_count, smem_limit, d, label);
    d->choice = e.choice;
    d->knobs.splits = e.splits;
    d->source = qt::RuleSource::kEnv;
  }
  return qsvd::latent::plan_latent_attention_auto(p, token_capacity, sm_count, smem_limit, d->knobs, d->choice);
}

}  // namespace plan
}  // namespace qsvd_torch
