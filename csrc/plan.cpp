// The plan module (plan.h): the environment knobs, parsed once each here,
// and latent_attention's precedence.
#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "ops.h"
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

// ---------------------------------------------------------------------------
// The plan object.
namespace {

constexpr int64_t kPlanMagic = 0x51535644504C4E32;  // "QSVDPLN2": the format and its version (2: rope_keys)
constexpr int64_t kPlanWords = 1
#define QSVD_COUNT(name) +1
    QSVD_LATENT_PLAN_FIELDS(QSVD_COUNT)
#undef QSVD_COUNT
    ;

namespace lat = qsvd::latent;

void copy_cuda_fields(const LatentPlan& plan, lat::LatentAttentionParams& p) {
  p.split_kernel = static_cast<lat::SplitKernel>(plan.split_kernel);
  p.heads_per_cta = static_cast<int>(plan.heads_per_cta);
  p.tile_tokens = static_cast<int>(plan.tile_tokens);
  p.splits = static_cast<int>(plan.splits);
  p.split_tokens = plan.split_tokens;
  p.r_slices = static_cast<int>(plan.r_slices);
  p.slice_cols = static_cast<int>(plan.slice_cols);
  p.split_smem = static_cast<size_t>(plan.split_smem);
  p.combine_heads = static_cast<int>(plan.combine_heads);
  p.combine_smem = static_cast<size_t>(plan.combine_smem);
}

}  // namespace

std::vector<std::string> latent_plan_field_names() {
  return {
#define QSVD_NAME(name) #name,
      QSVD_LATENT_PLAN_FIELDS(QSVD_NAME)
#undef QSVD_NAME
  };
}

LatentPlan latent_plan_signature(const at::Tensor& q, const LatentShape& s, int64_t H, int64_t bits, const at::Tensor& w_uk,
                                 const std::optional<at::Tensor>& rope_cos, bool rope_keys) {
  LatentPlan plan;
  plan.device_type = q.device().is_cuda() ? 1 : 0;
  plan.device_index = q.device().is_cuda() ? q.get_device() : 0;
  plan.B = s.B;
  plan.H = H;
  plan.H_kv = s.H_kv;
  plan.r = s.r;
  plan.d = s.d;
  plan.bits = bits;
  plan.d_rope = s.d_rope;
  plan.rope_keys = rope_keys ? 1 : 0;
  plan.weight_dtype = static_cast<int64_t>(to_dtype("latent_attention", w_uk.scalar_type()));
  plan.token_capacity = s.max_blocks * s.block_size;
  if (s.rope) plan.token_capacity = std::min(plan.token_capacity, rope_cos->size(0));
  return plan;
}

at::Tensor latent_plan_tensor(const LatentPlan& plan) {
  at::Tensor t = at::empty({kPlanWords}, at::TensorOptions().dtype(at::kLong));
  int64_t* w = t.data_ptr<int64_t>();
  int64_t i = 0;
  w[i++] = kPlanMagic;
#define QSVD_PUT(name) w[i++] = plan.name;
  QSVD_LATENT_PLAN_FIELDS(QSVD_PUT)
#undef QSVD_PUT
  return t;
}

LatentPlan decode_latent_plan(const char* op, const at::Tensor& t) {
  QSVD_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == kPlanWords, op,
             "plan must be the int64 CPU tensor of latent_attention_plan (", kPlanWords, " words), got ",
             t.scalar_type(), " ", t.sizes(), " on ", t.device());
  const at::Tensor c = t.contiguous();
  const int64_t* w = c.data_ptr<int64_t>();
  QSVD_CHECK_VALUE(w[0] == kPlanMagic, op,
             "plan is not a latent_attention_plan of this version (its first word is not the format's magic)");
  LatentPlan plan;
  int64_t i = 1;
#define QSVD_GET(name) plan.name = w[i++];
  QSVD_LATENT_PLAN_FIELDS(QSVD_GET)
#undef QSVD_GET
  QSVD_CHECK_VALUE(plan.device_type == 0 || plan.device_type == 1, op, "plan's device type (", plan.device_type,
             ") is not valid");
  return plan;
}

LatentPlan read_latent_plan(const char* op, const at::Tensor& t, const LatentPlan& expect) {
  const LatentPlan plan = decode_latent_plan(op, t);
  const char* const where[] = {"CPU", "CUDA"};
  QSVD_CHECK_VALUE(plan.device_type == expect.device_type && plan.device_index == expect.device_index, op,
             "plan was made for ", plan.device_type == 0 || plan.device_type == 1 ? where[plan.device_type] : "?",
             " device ", plan.device_index, ", but the call runs on ", where[expect.device_type], " device ",
             expect.device_index);
#define QSVD_SAME(name)                                                                                        \
  QSVD_CHECK_VALUE(plan.name == expect.name, op, "plan was made for " #name " = ", plan.name, ", but the call has " #name \
             " = ", expect.name, ": make a plan for this batch shape (latent_attention_plan)");
  QSVD_SAME(B)
  QSVD_SAME(H)
  QSVD_SAME(H_kv)
  QSVD_SAME(r)
  QSVD_SAME(d)
  QSVD_SAME(bits)
  QSVD_SAME(d_rope)
  QSVD_SAME(rope_keys)
  QSVD_SAME(weight_dtype)
#undef QSVD_SAME
  QSVD_CHECK_VALUE(expect.token_capacity <= plan.token_capacity, op, "plan was made for a token capacity of ",
             plan.token_capacity, " (max_blocks * block_size, capped by the RoPE table), but the call's is ",
             expect.token_capacity, ": make a plan for the largest block table of the step");
  if (plan.device_type == 0) {
    // No RoPE: an absorbed path; K rebuilt: the RoPE path; K's rotary part
    // cached (partial RoPE): the RoPE path (fp32) or the split one.
    const bool path_ok = plan.d_rope == 0 ? plan.cpu_path == 1 || plan.cpu_path == 2
                         : plan.rope_keys != 0 && plan.d_rope < plan.d ? plan.cpu_path == 0 || plan.cpu_path == 1
                                                                        : plan.cpu_path == 0;
    QSVD_CHECK_VALUE(path_ok && plan.cpu_threads >= 1,
               op, "plan's CPU path (", plan.cpu_path, ") or thread count (", plan.cpu_threads, ") is not valid");
    QSVD_CHECK_VALUE(plan.cpu_path != static_cast<int64_t>(CpuLatentPath::kAbsorbedSplit) || cpu::latent_split_available(),
               op, "plan asks for the split-precision GEMMs, which this CPU or torch build lacks");
  }
  return plan;
}

void plan_latent_attention_cpu(LatentPlan& plan, const char* op) {
  // The position-free dims are absorbed without RoPE and with K's rotary part
  // cached; there the split GEMMs serve where available.
  const bool absorbed = plan.d_rope == 0 || (plan.rope_keys != 0 && plan.d_rope < plan.d);
  plan.cpu_path = static_cast<int64_t>(!absorbed                        ? CpuLatentPath::kRope
                                       : cpu::latent_absorbed_split(op) ? CpuLatentPath::kAbsorbedSplit
                                       : plan.d_rope == 0               ? CpuLatentPath::kAbsorbedFp32
                                                                        : CpuLatentPath::kRope);
  plan.cpu_threads = at::get_num_threads();
}

void store_cuda_plan(LatentPlan& plan, const lat::LatentAttentionParams& p, const qsvd::tuning::LatentDecision& d) {
  plan.split_kernel = static_cast<int64_t>(p.split_kernel);
  plan.heads_per_cta = p.heads_per_cta;
  plan.tile_tokens = p.tile_tokens;
  plan.splits = p.splits;
  plan.split_tokens = p.split_tokens;
  plan.r_slices = p.r_slices;
  plan.slice_cols = p.slice_cols;
  plan.split_smem = static_cast<int64_t>(p.split_smem);
  plan.combine_heads = p.combine_heads;
  plan.combine_smem = static_cast<int64_t>(p.combine_smem);
  plan.source = static_cast<int64_t>(d.source);
  plan.rule = d.rule;
}

void apply_cuda_plan(const char* op, const LatentPlan& plan, lat::LatentAttentionParams& p, size_t smem_limit) {
  QSVD_CHECK_VALUE(plan.split_kernel == 0 || plan.split_kernel == 1, op, "plan's split kernel (", plan.split_kernel,
             ") is not valid");
  lat::LatentAttentionParams planned = p;
  copy_cuda_fields(plan, planned);
  const char* why = lat::replay_latent_plan(p, planned, plan.token_capacity, smem_limit);
  QSVD_CHECK_VALUE(why[0] == '\0', op, "plan cannot run: ", why);
}

}  // namespace plan

// The op latent_attention_plan, one definition for every device (the
// dispatcher registers it for CPU and CUDA).
at::Tensor latent_attention_plan(const at::Tensor& q, QSVD_LATENT_CACHE_PARAMS, QSVD_ROPE_PARAMS,
                                 const std::optional<at::Tensor>& rope_keys) {
  const char* op = "latent_attention_plan";
  int64_t H = 0;
  const LatentShape s = check_latent_attention(q, cache, cache_scale, block_table, seq_lens, w_uk, w_uk_scale, w_uv,
                                               w_uv_scale, bits, 1.0, rope_cos, rope_sin, &H);
  if (rope_keys.has_value()) check_rope_keys(op, *rope_keys, s, cache);
  plan::LatentPlan plan = plan::latent_plan_signature(q, s, H, bits, w_uk, rope_cos, rope_keys.has_value());
#ifdef QSVD_WITH_CUDA
  if (q.is_cuda()) {
    plan::plan_latent_attention_cuda(plan, s, H, bits, w_uk, rope_cos, rope_keys, op);
    return plan::latent_plan_tensor(plan);
  }
#endif
  cpu::check_isa_env(op);
  plan::plan_latent_attention_cpu(plan, op);
  return plan::latent_plan_tensor(plan);
}

}  // namespace qsvd_torch
