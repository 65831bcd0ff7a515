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

}  // namespace qsvd_torch
