// The plan module: how each op's kernel path is chosen, in one place.
//
// Precedence, wherever an op has a choice: forced
// (qsvd_kernels.tuning.force) > environment > the installed table's rule >
// built-in. The environment knobs of kernel choices are read here and
// nowhere else in csrc/ (the CPU ISA level, QSVD_CPU_ISA, is read once at
// load by the torch-free qsvd/cpu/isa.h, which ctest covers without torch):
//
//   QSVD_CPU_QUANT_GEMM=onednn|brgemm|auto   quant_gemm's CPU GEMM (cpu_paths.h)
//   QSVD_CPU_LATENT_GEMM=fp32|split|auto     latent_attention's absorbed CPU GEMMs
//   QSVD_LATENT_KERNEL=simt|tc|auto          latent_attention's CUDA split kernel
//   QSVD_LATENT_SPLITS=n                     its KV splits per sequence (0 = choose)
//   QSVD_SKIP_INDEX_CHECKS=1                 the CUDA launchers' host index checks off
//
// latent_attention takes an explicit plan (FlashInfer's plan/run): the op
// latent_attention_plan makes it once per batch shape (every knob and table
// read then), and every layer of that shape passes it to latent_attention,
// which runs it without reading a knob or a table. The plan is a small CPU
// int64 tensor (a LatentPlan, below), checked against each call it is given
// to. A call without a plan makes its plan at the call, so a knob set
// between calls is honoured (tests flip them). A bad value raises, naming
// the variable. explain() (qsvd_kernels.tuning) calls the same functions, so
// it and the launchers agree by construction.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/cpu_paths.h"
#include "qsvd/kernels/latent_attention_plan.h"
#include "qsvd/kernels/tuning_rules.h"

namespace qsvd_torch {
namespace plan {

// The raw value of an environment knob (nullopt when unset), for reports.
std::optional<std::string> knob_value(const char* name);

cpu::QuantGemmKnob cpu_quant_gemm_knob(const char* op);
cpu::LatentGemmKnob cpu_latent_gemm_knob(const char* op);

// Whether the CUDA launchers validate index *values* (slot_mapping,
// seq_lens, block_table) on the host before launching: a device-to-host copy
// and a stream sync per call, so that bad indices raise the same ValueError
// as on the CPU before anything is written. On by default;
// QSVD_SKIP_INDEX_CHECKS=1 (read once per process) turns the host check off,
// for CUDA graphs and latency-critical serving; the kernels then still guard
// every index on the device (a bad slot or block is skipped, a seq_len is
// clamped to what block_table can address), so a bad index never reads or
// writes out of bounds, but it is not reported. The CPU kernels always check
// (a host loop, no sync).
// A value other than 0 or 1 raises, naming it.
bool host_index_checks(const char* op);

// latent_attention's CUDA plan knobs from the environment: `set` when either
// variable asks for something other than the automatic choice.
struct LatentEnv {
  qsvd::latent::KernelChoice choice = qsvd::latent::KernelChoice::kAuto;
  int splits = 0;
  bool set = false;
};
LatentEnv latent_env(const char* op);

// latent_attention's plan for a call on `device` (-2: a device with nothing
// installed), with forced > env > table > default: plans p and fills d
// (its source, rule, knobs) and *label (the table's path when a rule chose,
// else ""). Returns "" or why the plan cannot be made.
const char* latent_attention(int device, qsvd::latent::LatentAttentionParams& p, int64_t token_capacity,
                             int sm_count, size_t smem_limit, const char* op, qsvd::tuning::LatentDecision* d,
                             std::string* label);

// ---------------------------------------------------------------------------
// latent_attention's plan object. The words of its tensor, in order (one
// list: the struct, the field names Python reads and the encoding come from
// it). The first group is the call signature the plan was made for; a call
// must match it (token_capacity: the call's may be smaller). Then the CPU
// plan, then the CUDA plan (0 where the other device's).
#define QSVD_LATENT_PLAN_FIELDS(X)                                                                        \
  X(device_type)    /* 0 CPU, 1 CUDA */                                                                    \
  X(device_index) X(B) X(H) X(H_kv) X(r) X(d) X(bits) X(d_rope) /* 0: no RoPE */                                          \
  X(rope_keys)      /* 1: K's rotary part read from rope_keys (cached), 0: rebuilt or none */             \
  X(weight_dtype)   /* qsvd::DType */                                                                      \
  X(token_capacity) /* max_blocks * block_size, capped by the RoPE table: the calls' upper bound */       \
  X(cpu_path)       /* CpuLatentPath */                                                                    \
  X(cpu_threads)    /* threads the CPU task split aims at */                                               \
  X(split_kernel)   /* qsvd::latent::SplitKernel */                                                        \
  X(heads_per_cta) X(tile_tokens) X(splits) X(split_tokens) X(r_slices) X(slice_cols) X(split_smem)         \
  X(combine_heads) X(combine_smem) X(source) /* qsvd::tuning::RuleSource of the CUDA choice */ X(rule)

struct LatentPlan {
#define QSVD_FIELD(name) int64_t name = 0;
  QSVD_LATENT_PLAN_FIELDS(QSVD_FIELD)
#undef QSVD_FIELD
};

// The CPU latent_attention paths: RoPE needs K rebuilt per token; without
// it, the split-precision GEMMs where torch has them (or the knob
// QSVD_CPU_LATENT_GEMM asks), else fp32 GEMMs. Partial RoPE with K's rotary
// part cached: the split path as without RoPE, else the RoPE path (fp32;
// it reads the keys).
enum class CpuLatentPath : int { kRope = 0, kAbsorbedSplit = 1, kAbsorbedFp32 = 2 };

// The signature part of a call's plan: device, sizes, rotary dims, whether
// K's rotary part is cached (rope_keys given), weight type, token capacity
// (max_blocks * block_size, capped by the RoPE table).
LatentPlan latent_plan_signature(const at::Tensor& q, const LatentShape& s, int64_t H, int64_t bits, const at::Tensor& w_uk,
                                 const std::optional<at::Tensor>& rope_cos, bool rope_keys);

// The field names, in word order (Python's describe_latent_attention_plan).
std::vector<std::string> latent_plan_field_names();

// The plan's tensor: int64 [1 + fields] on the CPU, word 0 a magic number
// that names the format and its version.
at::Tensor latent_plan_tensor(const LatentPlan& plan);

// Reads a plan tensor, checking its form (dtype, size, magic, device type).
LatentPlan decode_latent_plan(const char* op, const at::Tensor& tensor);

// Reads a plan tensor, checking its form (dtype, size, magic, field ranges),
// and that it was made for `expect`'s signature (device, sizes, RoPE, weight
// type; token_capacity at least expect's). Raises naming `plan` otherwise.
LatentPlan read_latent_plan(const char* op, const at::Tensor& tensor, const LatentPlan& expect);

// The CPU plan of a call: its path (reads QSVD_CPU_LATENT_GEMM) and thread
// count, into `plan` (signature already filled).
void plan_latent_attention_cpu(LatentPlan& plan, const char* op);

#ifdef QSVD_WITH_CUDA
// The CUDA plan of a call into `plan` (signature already filled;
// csrc/cuda/latent_attention.cpp, with the launcher).
void plan_latent_attention_cuda(LatentPlan& plan, const LatentShape& s, int64_t H, int64_t bits,
                                const at::Tensor& w_uk, const std::optional<at::Tensor>& rope_cos,
                                const std::optional<at::Tensor>& rope_keys, const char* op);
#endif

// The CUDA plan fields of `plan` from a planned p and its decision, and back.
void store_cuda_plan(LatentPlan& plan, const qsvd::latent::LatentAttentionParams& p,
                     const qsvd::tuning::LatentDecision& d);
// Re-derives the plan for p from the plan's own choices (kernel, splits,
// tile, heads per CTA; no knob or table read), so a plan that was edited, or
// made by another build, cannot reach a kernel: it raises naming `plan`
// unless every derived field equals the stored one.
void apply_cuda_plan(const char* op, const LatentPlan& plan, qsvd::latent::LatentAttentionParams& p,
                     size_t smem_limit);

}  // namespace plan
}  // namespace qsvd_torch
