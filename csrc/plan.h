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
// An op without an explicit plan object makes its plan at each call, so a
// knob set between calls is honoured (tests flip them). A bad value raises,
// naming the variable. explain() (qsvd_kernels.tuning) calls the same
// functions, so it and the launchers agree by construction.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

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

}  // namespace plan
}  // namespace qsvd_torch
