// Tuning rules of latent_attention and hadamard as plain C++ (no CUDA, no
// torch): ordered lists of (shape keys) -> (plan knobs), first match wins,
// like quant_gemm's (quant_gemm_rules.h). Python (qsvd_kernels/tuning)
// validates a table and installs its rules per device (csrc/tuning.cpp); the
// launchers ask decide_latent_plan / decide_hadamard on every call, on the
// host, from the shapes only (no device sync).
//
// A tuning problem never makes a call fail: a latent_attention rule whose
// plan the plan checker refuses for a call (shared memory, multiples, a
// kernel that does not serve the shape) gives the default plan for that call
// (source kFallback); a hadamard rule asking for a variant that does not
// serve K gives the built-in variant (the launcher's own fallback).
#pragma once

#include <cstdint>
#include <limits>

#include "qsvd/formats.h"
#include "qsvd/kernels/latent_attention_plan.h"

namespace qsvd {
namespace tuning {

enum class RuleSource : int {
  kDefault = 0,   // no rules installed (or none matched): the built-in choice
  kTable = 1,     // a rule of an installed table
  kForced = 2,    // qsvd_kernels.tuning.force(...)
  kFallback = 3,  // a rule matched but cannot serve the call: the built-in choice
  kEnv = 4,       // QSVD_LATENT_KERNEL / QSVD_LATENT_SPLITS
};

constexpr const char* rule_source_name(RuleSource s) {
  return s == RuleSource::kTable      ? "table"
         : s == RuleSource::kForced   ? "forced"
         : s == RuleSource::kFallback ? "fallback"
         : s == RuleSource::kEnv      ? "env"
                                      : "default";
}

constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max();

// ---------------------------------------------------------------------------
// latent_attention. Keys (every one optional; ranges inclusive):
//   rope (-1 any, 0 no, 1 yes), weight_type (-1 any, else a qsvd::DType value:
//   kF16, kBF16, kI8), bits (0 any, 4, 8), r, d, group = H / H_kv, and the
//   buckets B (batch) and ctx (token capacity = max_blocks * block_size,
//   capped by the RoPE table).
struct LatentRule {
  int rope = -1;
  int weight_type = -1;
  int bits = 0;
  int64_t r_min = 1, r_max = kUnbounded;
  int64_t d_min = 1, d_max = kUnbounded;
  int64_t g_min = 1, g_max = kUnbounded;
  int64_t b_min = 1, b_max = kUnbounded;
  int64_t ctx_min = 1, ctx_max = kUnbounded;
  latent::KernelChoice choice = latent::KernelChoice::kAuto;
  latent::LatentPlanKnobs knobs;
};

struct LatentKey {
  bool rope = false;
  int weight_type = 0;
  int bits = 8;
  int64_t r = 0, d = 0, group = 0, B = 0, ctx = 0;
};

// Calls with K's rotary part cached (rope_keys) match rules as rope 0: they
// run the no-RoPE CUDA-core kernel plus one d_rope dot product per token (a
// no-RoPE tensor-core rule is refused for them, giving the default plan).
inline LatentKey latent_key(const latent::LatentAttentionParams& p, int64_t token_capacity) {
  LatentKey k;
  k.rope = p.rope_cos != nullptr;
  k.weight_type = static_cast<int>(p.weight_type);
  k.bits = p.bits;
  k.r = p.r;
  k.d = p.d;
  k.group = p.H_kv > 0 ? p.H / p.H_kv : 0;
  k.B = p.B;
  k.ctx = token_capacity;
  return k;
}

constexpr bool in_range(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi; }

constexpr bool latent_rule_matches(const LatentRule& r, const LatentKey& k) {
  return (r.rope < 0 || r.rope == (k.rope ? 1 : 0)) && (r.weight_type < 0 || r.weight_type == k.weight_type) &&
         (r.bits == 0 || r.bits == k.bits) && in_range(k.r, r.r_min, r.r_max) && in_range(k.d, r.d_min, r.d_max) &&
         in_range(k.group, r.g_min, r.g_max) && in_range(k.B, r.b_min, r.b_max) &&
         in_range(k.ctx, r.ctx_min, r.ctx_max);
}

struct LatentDecision {
  latent::KernelChoice choice = latent::KernelChoice::kAuto;
  latent::LatentPlanKnobs knobs;  // what the plan was made with
  RuleSource source = RuleSource::kDefault;
  int rule = -1;                  // index of the matching rule, or -1
  const char* rule_refused = "";  // kFallback: why the rule's plan could not be made
};

// Plans p (its sizes, weight type, rope tables and w_uk set) with the first
// matching rule's knobs; if the plan checker refuses them for this call, or
// no rule matches, with the default knobs (rules_source is kTable or
// kForced). Returns "" or why even the default plan cannot be made (then the
// call cannot run on the CUDA kernels, as without tables).
inline const char* decide_latent_plan(latent::LatentAttentionParams& p, int64_t token_capacity, int sm_count,
                                      size_t smem_limit, const LatentRule* rules, int n_rules,
                                      RuleSource rules_source, LatentDecision* d) {
  *d = LatentDecision{};
  const LatentKey key = latent_key(p, token_capacity);
  for (int i = 0; i < n_rules; ++i) {
    const LatentRule& r = rules[i];
    if (!latent_rule_matches(r, key)) continue;
    d->rule = i;
    latent::LatentAttentionParams q = p;
    const char* why = latent::plan_latent_attention_auto(q, token_capacity, sm_count, smem_limit, r.knobs, r.choice);
    if (why[0] == '\0') {
      p = q;
      d->choice = r.choice;
      d->knobs = r.knobs;
      d->source = rules_source;
      return "";
    }
    d->rule_refused = why;
    d->source = RuleSource::kFallback;
    break;
  }
  return latent::plan_latent_attention_auto(p, token_capacity, sm_count, smem_limit, d->knobs, d->choice);
}

// ---------------------------------------------------------------------------
// hadamard. Keys: K (the transformed dimension; a range) and the input dtype
// (-1 any, else a qsvd::DType value: kF16, kBF16, kF32). Knob:
// min_elems_per_thread (HadamardParams; 0 = the built-in variant).
struct HadamardRule {
  int64_t k_min = 1, k_max = kUnbounded;
  int x_type = -1;
  int min_elems_per_thread = 0;
};

constexpr bool valid_elems_per_thread(int ept) {
  return ept == 0 || ept == 1 || ept == 2 || ept == 4 || ept == 8 || ept == 32;
}

struct HadamardDecision {
  int min_elems_per_thread = 0;
  RuleSource source = RuleSource::kDefault;
  int rule = -1;
};

constexpr bool hadamard_rule_matches(const HadamardRule& r, int64_t K, int x_type) {
  return in_range(K, r.k_min, r.k_max) && (r.x_type < 0 || r.x_type == x_type);
}

inline HadamardDecision decide_hadamard(const HadamardRule* rules, int n_rules, RuleSource rules_source, int64_t K,
                                        int x_type) {
  HadamardDecision d;
  for (int i = 0; i < n_rules; ++i) {
    const HadamardRule& r = rules[i];
    if (!hadamard_rule_matches(r, K, x_type)) continue;
    d.rule = i;
    if (valid_elems_per_thread(r.min_elems_per_thread)) {
      d.min_elems_per_thread = r.min_elems_per_thread;
      d.source = rules_source;
    } else {
      d.source = RuleSource::kFallback;
    }
    return d;
  }
  return d;
}

}  // namespace tuning
}  // namespace qsvd
