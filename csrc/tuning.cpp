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

struct LatentRuleSet {
  std::vector<qsvd::tuning::LatentRule> rules;
  std::string label;
};

struct HadamardRuleSet {
  std::vector<qsvd::tuning::HadamardRule> rules;
  std::string label;
};

struct Registry {
  std::mutex mu;
  std::shared_ptr<const RuleSet> per_device[kTuningMaxDevices];
  LatentPlan latent[kTuningMaxDevices];
  int hadamard_ept[kTuningMaxDevices] = {};
  std::shared_ptr<const LatentRuleSet> latent_rules[kTuningMaxDevices];
  std::shared_ptr<const HadamardRuleSet> hadamard_rules[kTuningMaxDevices];
};


Registry& registry() {
  static Registry r;
  return r;
}

template <typename Set>
void store(std::shared_ptr<const Set> (&slots)[kTuningMaxDevices], int device, std::shared_ptr<const Set> set) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  if (device == kTuningAllDevices) {
    for (auto& slot : slots) slot = set;
  } else if (device >= 0 && device < kTuningMaxDevices) {
    slots[device] = set;
  }
}

template <typename Set>
std::shared_ptr<const Set> load(std::shared_ptr<const Set> (&slots)[kTuningMaxDevices], int device) {
  if (device < 0 || device >= kTuningMaxDevices) return nullptr;
  Registry& r = registry();
  const std::lock_guard<std::mutex> lock(r.mu);
  return slots[device];
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

void set_latent_rules(int device, std::vector<qsvd::tuning::LatentRule> rules, std::string label) {
  std::shared_ptr<const LatentRuleSet> set;
  if (!rules.empty()) set = std::make_shared<const LatentRuleSet>(LatentRuleSet{std::move(rules), std::move(label)});
  store(registry().latent_rules, device, set);
}

void set_hadamard_rules(int device, std::vector<qsvd::tuning::HadamardRule> rules, std::string label) {
  std::shared_ptr<const HadamardRuleSet> set;
  if (!rules.empty())
    set = std::make_shared<const HadamardRuleSet>(HadamardRuleSet{std::move(rules), std::move(label)});
  store(registry().hadamard_rules, device, set);
}

const char* plan_latent_tuned(int device, qsvd::latent::LatentAttentionParams& p, int64_t token_capacity,
                              int sm_count, size_t smem_limit, qsvd::tuning::LatentDecision* d, std::string* label) {
  namespace qt = qsvd::tuning;
  const std::shared_ptr<const LatentRuleSet> set = load(registry().latent_rules, device);
  const char* why = set ? qt::decide_latent_plan(p, token_capacity, sm_count, smem_limit, set->rules.data(),
                                                 static_cast<int>(set->rules.size()), qt::RuleSource::kTable, d)
                        : qt::decide_latent_plan(p, token_capacity, sm_count, smem_limit, nullptr, 0,
                                                 qt::RuleSource::kTable, d);
  if (label != nullptr) *label = (set && d->source == qt::RuleSource::kTable) ? set->label : std::string();
  return why;
}

qsvd::tuning::HadamardDecision decide_hadamard_variant(int device, int64_t K, int x_type, std::string* label) {
  namespace qt = qsvd::tuning;
  qt::HadamardDecision d;
  if (label != nullptr) label->clear();
  const int forced = hadamard_variant(device);
  if (forced != 0) {
    d.min_elems_per_thread = forced;
    d.source = qt::RuleSource::kForced;
    return d;
  }
  const std::shared_ptr<const HadamardRuleSet> set = load(registry().hadamard_rules, device);
  if (!set) return d;
  d = qt::decide_hadamard(set->rules.data(), static_cast<int>(set->rules.size()), qt::RuleSource::kTable, K, x_type);
  if (label != nullptr && d.source == qt::RuleSource::kTable) *label = set->label;
  return d;
}

}  // namespace qsvd_torch
