// Per-device tuning rules (csrc/tuning.h). Writers are rare (a table is
// installed once); readers take a shared_ptr copy under a short lock, so a
// rule set being replaced stays alive for the calls still reading it.
#include "tuning.h"

#include <memory>
#include <mutex>
#include <utility>

namespace qsvd_torch {
namespace {

struct RuleSet {
  std::vector<qsvd::gemm::GemmRule> rules;
  qsvd::gemm::ChoiceSource source = qsvd::gemm::ChoiceSource::kTable;
  std::string label;
};

struct LatentPlan {
  bool active = false;
  qsvd::latent::KernelChoice choice = qsvd::latent::KernelChoice::kAuto;
  qsvd::latent::LatentPlanKnobs knobs;
};

struct Registry {
  std::mutex mu;
  std::shared_ptr<const RuleSet> per_device[kTuningMaxDevices];
  LatentPlan latent[kTuningMaxDevices];
  int hadamard_ept[kTuningMaxDevices] = {};
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void set_gemm_rules(int device, std::vector<qsvd::gemm::GemmRule> rules, qsvd::gemm::ChoiceSource source,
                    std::string label) {
  std::shared_ptr<const RuleSet> set;
  if (!rules.empty()) set = std::make_shared<const RuleSet>(RuleSet{std::move(rules), source, std::move(label)});
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  if (device == kTuningAllDevices) {
    for (auto& slot : r.per_device) slot = set;
  } else if (device >= 0 && device < kTuningMaxDevices) {
    r.per_device[device] = set;
  }
}

qsvd::gemm::GemmDecision decide_gemm(int device, int cc, int64_t M, int64_t N, int64_t K, int a_bits, int b_bits,
                                     std::string* label) {
  std::shared_ptr<const RuleSet> set;
  if (device >= 0 && device < kTuningMaxDevices) {
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mu);
    set = r.per_device[device];
  }
  if (!set) {
    if (label != nullptr) label->clear();
    return qsvd::gemm::decide(nullptr, 0, qsvd::gemm::ChoiceSource::kDefault, cc, M, N, K, a_bits, b_bits);
  }
  const qsvd::gemm::GemmDecision d = qsvd::gemm::decide(set->rules.data(), static_cast<int>(set->rules.size()),
                                                        set->source, cc, M, N, K, a_bits, b_bits);
  if (label != nullptr) *label = d.rule >= 0 ? set->label : std::string();
  return d;
}

void set_latent_plan(int device, bool active, qsvd::latent::KernelChoice choice,
                     const qsvd::latent::LatentPlanKnobs& knobs) {
  const LatentPlan plan{active, choice, knobs};
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  if (device == kTuningAllDevices) {
    for (auto& slot : r.latent) slot = plan;
  } else if (device >= 0 && device < kTuningMaxDevices) {
    r.latent[device] = plan;
  }
}

void set_hadamard_variant(int device, int min_elems_per_thread) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  if (device == kTuningAllDevices) {
    for (int& slot : r.hadamard_ept) slot = min_elems_per_thread;
  } else if (device >= 0 && device < kTuningMaxDevices) {
    r.hadamard_ept[device] = min_elems_per_thread;
  }
}

int hadamard_variant(int device) {
  if (device < 0 || device >= kTuningMaxDevices) return 0;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  return r.hadamard_ept[device];
}

bool forced_latent_plan(int device, qsvd::latent::KernelChoice* choice, qsvd::latent::LatentPlanKnobs* knobs) {
  if (device < 0 || device >= kTuningMaxDevices) return false;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  const LatentPlan& plan = r.latent[device];
  if (!plan.active) return false;
  *choice = plan.choice;
  *knobs = plan.knobs;
  return true;
}

}  // namespace qsvd_torch
