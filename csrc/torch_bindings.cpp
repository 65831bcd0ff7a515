// Every schema of the `qsvd` op library, and every kernel registration.
//
// One file, so nobody has to search for where an op is defined (vLLM's
// torch_bindings.cpp). The schemas are the contract other frameworks call as
// torch.ops.qsvd.*; docs/ops.md explains each argument and the numerics, and
// qsvd_kernels/reference.py is the executable spec. Fake (meta) kernels for
// torch.compile are registered in Python, in qsvd_kernels/_fake.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(qsvd, m) {
  // Tells torch where the fake kernels live, so tracing without having
  // imported qsvd_kernels fails with a message that says what to import.
  m.set_python_module("qsvd_kernels._fake");

  // y = (x * signs) H_K / sqrt(K) over the last dim K (a randomised Hadamard
  // when signs are +-1). Same dtype and shape as x.
  m.def("hadamard_transform(Tensor x, Tensor? signs=None) -> Tensor");

  // The rotation fused with per-row symmetric quantization: codes are int8
  // [..., K] (bits=8) or packed uint8 [..., K/2] (bits=4); scale is fp32
  // [...]. clip_ratio scales the per-row max before it sets the scale.
  m.def("hadamard_quant(Tensor x, int bits, float clip_ratio=1.0, Tensor? signs=None) -> (Tensor codes, Tensor scale)");

  // out[m, n] = (sum_k a[m, k] b[n, k]) a_scale[m] b_scale[n] (+ bias[n]):
  // exact int32 sums, dequantized in fp32. a and b are int8 codes or packed
  // INT4 (uint8, K/2 bytes per row) as a_bits / b_bits say; both are
  // "K-major" (row-major [M, K] and [N, K]) like torch's F.linear weights.
  m.def(
      "quant_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, int a_bits, int b_bits, "
      "ScalarType out_dtype, Tensor? bias=None) -> Tensor");

  // Quantizes each latent row c[i] per token and writes it (codes + scale)
  // to flat slot slot_mapping[i] of the paged cache; negative slots are
  // padding. Mutates cache and cache_scale only, so the schema marks them.
  // cache_scale None: `cache` holds packed rows (uint8 [num_blocks,
  // block_size, row_bytes + 4]: each token's codes, then its fp32 scale), so
  // one tensor is written (two aliasing mutable arguments could not be
  // annotated); docs/ops.md, "The latent cache layouts".
  // check_indices (latent_cache_append, latent_attention,
  // latent_reconstruct_kv): False says the caller guarantees the index
  // values (a serving engine's slot mappings and block tables), so the CUDA
  // launchers skip their host check (a device-to-host copy and a sync per
  // call, which CUDA graphs cannot capture); the kernels still guard every
  // index on the device. The CPU kernels always check (a host loop, no sync).
  m.def(
      "latent_cache_append(Tensor c, Tensor slot_mapping, Tensor(a!) cache, Tensor(b!)? cache_scale, int bits, "
      "float clip_ratio=1.0, bool check_indices=True) -> ()");

  // Decode attention over the quantized latent cache with the per-head
  // up-projections w_uk / w_uv [H_kv, r, d] inside (int8 weights carry a
  // [H_kv, d] scale). RoPE tables given: K is rebuilt and rotated per token;
  // absent: K is absorbed into the query. V is always absorbed.
  // Returns out [B, H, d] (q's dtype) and the natural-log lse [B, H] fp32.
  // cache_scale None: packed rows, as in latent_cache_append.
  // plan (not in the first design): latent_attention_plan's tensor for this
  // batch shape; the call then runs it, reading no knob or table (csrc/plan.h).
  m.def(
      "latent_attention(Tensor q, Tensor cache, Tensor? cache_scale, Tensor block_table, Tensor seq_lens, "
      "Tensor w_uk, Tensor? w_uk_scale, Tensor w_uv, Tensor? w_uv_scale, int bits, float sm_scale, "
      "Tensor? rope_cos=None, Tensor? rope_sin=None, bool check_indices=True, Tensor? plan=None, "
      "Tensor? rope_keys=None) -> (Tensor out, Tensor lse)");

  // Partial RoPE with cached rotary keys (issue 22, not in the first design):
  // writes RoPE_pos(c W_uk[:, :, :d_rope]) of the cached latent rows at
  // slot_mapping (negative: skipped), at their positions, in fp16 to
  // rope_keys [num_blocks, block_size, H_kv, d_rope] (d_rope: the tables'
  // width). latent_attention and latent_reconstruct_kv given rope_keys read
  // K's rotary part there instead of rebuilding it (CPU and CUDA; the CUDA
  // kernels serve partial RoPE in this cached form only).
  m.def(
      "latent_rope_keys_append(Tensor cache, Tensor? cache_scale, Tensor slot_mapping, Tensor positions, "
      "Tensor w_uk, Tensor? w_uk_scale, int bits, Tensor rope_cos, Tensor rope_sin, Tensor(a!) rope_keys, "
      "bool check_indices=True) -> ()");

  // latent_attention's plan for calls with these arguments' sizes, dtypes,
  // device and token capacity (max_blocks * block_size, capped by the RoPE
  // table; a call's may be smaller): made once per batch shape (FlashInfer's
  // plan/run), with forced > environment > table > built-in applied here.
  // An int64 CPU tensor whatever the device; seq_lens' values are not read.
  // rope_keys: the calls read K's rotary part from that cache (a different
  // CUDA kernel; part of the plan's signature).
  m.def(
      "latent_attention_plan(Tensor q, Tensor cache, Tensor? cache_scale, Tensor block_table, Tensor seq_lens, "
      "Tensor w_uk, Tensor? w_uk_scale, Tensor w_uv, Tensor? w_uv_scale, int bits, Tensor? rope_cos=None, "
      "Tensor? rope_sin=None, Tensor? rope_keys=None) -> Tensor");

  // Materialises K (RoPE-rotated when tables are given) and V, varlen-packed
  // [sum(seq_lens), H_kv, d], for prefill with any dense attention kernel.
  // out_dtype (not in the first design): int8 weights have no natural
  // output dtype, so the caller may name one; default fp16 for int8 weights,
  // the weights' dtype otherwise. The row count depends on seq_lens' values.
  // cache_scale None: packed rows, as in latent_cache_append.
  m.def(
      "latent_reconstruct_kv(Tensor cache, Tensor? cache_scale, Tensor block_table, Tensor seq_lens, "
      "Tensor w_uk, Tensor? w_uk_scale, Tensor w_uv, Tensor? w_uv_scale, int bits, Tensor? rope_cos=None, "
      "Tensor? rope_sin=None, ScalarType? out_dtype=None, bool check_indices=True, Tensor? rope_keys=None) "
      "-> (Tensor k, Tensor v)");
}

TORCH_LIBRARY_IMPL(qsvd, CPU, m) {
  m.impl("hadamard_transform", &qsvd_torch::hadamard_transform_cpu);
  m.impl("hadamard_quant", &qsvd_torch::hadamard_quant_cpu);
  m.impl("quant_gemm", &qsvd_torch::quant_gemm_cpu);
  m.impl("latent_cache_append", &qsvd_torch::latent_cache_append_cpu);
  m.impl("latent_attention", &qsvd_torch::latent_attention_cpu);
  m.impl("latent_attention_plan", &qsvd_torch::latent_attention_plan);
  m.impl("latent_rope_keys_append", &qsvd_torch::latent_rope_keys_append_cpu);
  m.impl("latent_reconstruct_kv", &qsvd_torch::latent_reconstruct_kv_cpu);
}

#ifdef QSVD_WITH_CUDA
// Every op has a CUDA kernel. A shape or GPU a kernel cannot serve raises a
// clear error from its launcher; nothing falls back to the CPU silently.
TORCH_LIBRARY_IMPL(qsvd, CUDA, m) {
  m.impl("hadamard_transform", &qsvd_torch::hadamard_transform_cuda);
  m.impl("hadamard_quant", &qsvd_torch::hadamard_quant_cuda);
  m.impl("quant_gemm", &qsvd_torch::quant_gemm_cuda);
  m.impl("latent_cache_append", &qsvd_torch::latent_cache_append_cuda);
  m.impl("latent_attention", &qsvd_torch::latent_attention_cuda);
  m.impl("latent_attention_plan", &qsvd_torch::latent_attention_plan);
  m.impl("latent_rope_keys_append", &qsvd_torch::latent_rope_keys_append_cuda);
  m.impl("latent_reconstruct_kv", &qsvd_torch::latent_reconstruct_kv_cuda);
}
#endif
