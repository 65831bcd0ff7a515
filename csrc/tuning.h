// The installed tuning rules, per device (torch-free; built with and
// without CUDA, so the choice logic is testable on CPU). Python
// (qsvd_kernels/tuning) validates a table and installs its rules here; the
// CUDA launchers read them on every call, without locks held across the call
// and without reading the environment.
#pragma once

#include <string>
#include <vector>

#include "qsvd/kernels/latent_attention_plan.h"
#include "qsvd/kernels/quant_gemm_rules.h"
#include "qsvd/kernels/tuning_rules.h"

namespace qsvd_torch {

constexpr int kTuningAllDevices = -1;
constexpr int kTuningMaxDevices = 64;

// Replaces the rules of `device` (kTuningAllDevices: every device); `label`
// says where they came from (a table path, "forced"). An empty list removes
// them: the built-in choice again.
void set_gemm_rules(int device, std::vector<qsvd::gemm::GemmRule> rules, qsvd::gemm::ChoiceSource source,
                    std::string label);

// The decision for a call on `device` of compute capability cc, and the label
// of the rules it came from ("" for the built-in choice).
qsvd::gemm::GemmDecision decide_gemm(int device, int cc, int64_t M, int64_t N, int64_t K, int a_bits, int b_bits,
                                     std::string* label);

// latent_attention's forced plan knobs for `device` (kTuningAllDevices: every
// device), set by qsvd_kernels.tuning.force("latent_attention", ...); active =
// false removes them. They take precedence over QSVD_LATENT_KERNEL /
// QSVD_LATENT_SPLITS.
void set_latent_plan(int device, bool active, qsvd::latent::KernelChoice choice,
                     const qsvd::latent::LatentPlanKnobs& knobs);

// Whether forced plan knobs are set for `device`, and which.
bool forced_latent_plan(int device, qsvd::latent::KernelChoice* choice, qsvd::latent::LatentPlanKnobs* knobs);

// hadamard's forced variant knob (HadamardParams::min_elems_per_thread) for
// `device` (kTuningAllDevices: every device); 0 = the built-in choice.
void set_hadamard_variant(int device, int min_elems_per_thread);
int hadamard_variant(int device);

// latent_attention / hadamard rules of an installed table for `device`
// (kTuningAllDevices: every device); `label` is the table path. An empty
// list removes them.
void set_latent_rules(int device, std::vector<qsvd::tuning::LatentRule> rules, std::string label);
void set_hadamard_rules(int device, std::vector<qsvd::tuning::HadamardRule> rules, std::string label);

// The table's latent_attention plan for a call on `device` (no forced knobs:
// the launcher checks those first): plans p with the matching rule's knobs,
// else (no rule, or the plan checker refuses it) with the default knobs.
// Returns "" or why the default plan cannot be made. label: the table path
// when a rule chose the plan, else "".
const char* plan_latent_tuned(int device, qsvd::latent::LatentAttentionParams& p, int64_t token_capacity,
                              int sm_count, size_t smem_limit, qsvd::tuning::LatentDecision* d, std::string* label);

// hadamard's variant knob for a call on `device`: forced > table > built-in (0).
qsvd::tuning::HadamardDecision decide_hadamard_variant(int device, int64_t K, int x_type, std::string* label);

}  // namespace qsvd_torch
