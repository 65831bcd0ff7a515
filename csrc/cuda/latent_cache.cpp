// CUDA launchers of latent_cache_append and latent_reconstruct_kv: validate
// (the checks the CPU kernels run), pick the device and stream, call the
// torch-free kernels of include/qsvd/kernels/latent_cache_kernel.cuh.
// Compiled by the host compiler: only the .cu instantiations need nvcc.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "../plan.h"
#include "launch.h"
#include "qsvd/kernels/latent_cache_params.h"

namespace qsvd_torch {
namespace {

namespace lc = qsvd::latent_cache;

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Device workspace of one reconstruct chunk (dense codes + the fp32 GEMM
// output of K and V): long prefills run in row chunks of this size instead
// of allocating O(total tokens) scratch on top of the outputs.
constexpr int64_t kReconstructWorkspaceBytes = int64_t{256} << 20;

}  // namespace

void latent_cache_append_cuda(const at::Tensor& c_in, const at::Tensor& slot_mapping, at::Tensor& cache,
                              const std::optional<at::Tensor>& cache_scale, int64_t bits, double clip_ratio,
                              bool check_indices) {
  const char* op = "latent_cache_append";
  const CacheAppendShape s = check_latent_cache_append(c_in, slot_mapping, cache, cache_scale, bits, clip_ratio);
  const c10::cuda::CUDAGuard guard(c_in.device());
  if (s.T == 0) return;
  // Same ValueError as the CPU kernel, before any write (a D2H copy and a
  // sync). Without it the kernel still skips slots past the end.
  if (check_indices && plan::host_index_checks(op))
    check_slot_mapping_host(slot_mapping.to(at::kCPU).to(at::kLong).contiguous(), s);

  const at::Tensor c = s.r > 1 && c_in.stride(1) != 1 ? c_in.contiguous() : c_in;
  const at::Tensor slots = slot_mapping.contiguous();
  lc::CacheAppendParams p;
  p.c = c.data_ptr();
  p.c_row_stride = c.stride(0);
  p.c_type = to_dtype(op, c.scalar_type());
  p.slot_mapping = slots.data_ptr();
  p.slot_is_int64 = slots.scalar_type() == at::kLong;
  p.cache = latent_cache_layout(cache, cache_scale, bits, s.r);  // either layout
  p.T = s.T;
  p.r = s.r;
  p.num_slots = s.num_blocks * s.block_size;
  p.bits = static_cast<int>(bits);
  p.clip_ratio = static_cast<float>(clip_ratio);
  // Row starts c + i * stride at 16 bytes, code rows (r or r/2 bytes, r % 8
  // == 0; base and row stride: r, r/2, or + 4 for packed rows) at 4 bytes,
  // and at 8 bytes for the 8-byte int8 stores: the vector widths the kernel uses.
  p.vectorized = s.r % 8 == 0 && aligned(p.c, 16) && (p.c_row_stride * c.element_size()) % 16 == 0 &&
                 aligned(p.cache.codes, 4) && p.cache.code_stride % 4 == 0;
  p.codes_8byte = p.vectorized && aligned(p.cache.codes, 8) && p.cache.code_stride % 8 == 0;
  check_launch(op, lc::launch_cache_append(p, at::cuda::getCurrentCUDAStream()));
}

// Prefill reconstruction in three steps (design: docs/ops.md numerics):
//   1. gather: the latent codes of every cached token, through block_table,
//      unpacked into a dense [rows, r] fp16/bf16 matrix (exact), plus token
//      scales and positions;
//   2. one cuBLAS GEMM codes x [W_uk | W_uv] ([r, 2 H_kv d], the weights
//      permuted once per call; int8 weights as fp16, exact) with fp32
//      output: tensor cores, exact products, fp32 sums;
//   3. epilogue: token scale, weight scale (int8), RoPE over the first
//      d_rope dims (the tables' width), one rounding; with rope_keys, K's
//      rotary dims are then copied from the cached rotary keys instead
//      (the epilogue leaves them unrotated, and the copy overwrites them).
// Error bound: see kv_epilogue_kernel. It is derived for round-to-nearest
// fp32 accumulation; tensor cores may align and truncate partial sums,
// which can at worst double the per-addition error of step 2. Random data
// stay far below either bound; the tests use the round-to-nearest one.
std::tuple<at::Tensor, at::Tensor> latent_reconstruct_kv_cuda(
    const at::Tensor& cache, const std::optional<at::Tensor>& cache_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& w_uk, const std::optional<at::Tensor>& w_uk_scale,
    const at::Tensor& w_uv, const std::optional<at::Tensor>& w_uv_scale, int64_t bits,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
    std::optional<at::ScalarType> out_dtype_opt, bool check_indices, const std::optional<at::Tensor>& rope_keys) {
  const char* op = "latent_reconstruct_kv";
  const LatentShape s = check_latent_cache_and_weights(op, cache, cache_scale, block_table, seq_lens, w_uk,
                                                       w_uk_scale, w_uv, w_uv_scale, bits, rope_cos, rope_sin);
  if (rope_keys.has_value()) check_rope_keys(op, *rope_keys, s, cache);
  const bool cached = rope_keys.has_value();
  const at::ScalarType out_dtype = reconstruct_out_dtype(op, w_uk, out_dtype_opt);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t rope_positions = s.rope ? rope_cos->size(0) : 0;

  // The output row count is sum(seq_lens), so the lengths come to the host
  // in any case; with the index checks on, the block table comes too.
  const at::Tensor lens_cpu = seq_lens.to(at::kCPU).contiguous();
  const int32_t* lens = lens_cpu.data_ptr<int32_t>();
  std::vector<int64_t> cu_seqlens(s.B + 1, 0);
  if (check_indices && plan::host_index_checks(op)) {
    check_paged_indices_host(op, lens_cpu, block_table.to(at::kCPU).contiguous(), s, rope_positions);
    for (int64_t b = 0; b < s.B; ++b) cu_seqlens[b + 1] = cu_seqlens[b] + lens[b];
  } else {
    // Unchecked lengths are clamped to what block_table (and the RoPE table)
    // can address, so the kernels never index past either; block ids are
    // guarded on the device.
    int64_t limit = s.max_blocks * s.block_size;
    if (s.rope) limit = std::min(limit, rope_positions);
    for (int64_t b = 0; b < s.B; ++b)
      cu_seqlens[b + 1] = cu_seqlens[b] + std::clamp<int64_t>(lens[b], 0, limit);
  }
  const int64_t total = cu_seqlens[s.B];
  at::Tensor k = at::empty({total, s.H_kv, s.d}, cache.options().dtype(out_dtype));
  at::Tensor v = at::empty({total, s.H_kv, s.d}, cache.options().dtype(out_dtype));
  if (total == 0) return {k, v};

  const int64_t N1 = s.H_kv * s.d;
  const at::ScalarType gemm_dtype = w_uk.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kHalf;
  auto gemm_operand = [&](const at::Tensor& w) {  // [H_kv, r, d] -> [r, H_kv * d]
    return w.to(gemm_dtype).permute({1, 0, 2}).reshape({s.r, N1});
  };
  const at::Tensor w_cat = at::cat({gemm_operand(w_uk), gemm_operand(w_uv)}, 1);  // [r, 2 N1]
  const at::Tensor cu_dev = at::tensor(cu_seqlens, at::TensorOptions().dtype(at::kLong)).to(cache.device());
  const at::Tensor cache_c = cache.contiguous();  // packed rows: contiguous already (checked)
  const std::optional<at::Tensor> cache_scale_c =
      cache_scale.has_value() ? std::optional<at::Tensor>(cache_scale->contiguous()) : std::nullopt;
  const at::Tensor table_c = block_table.contiguous();
  const at::Tensor cos_c = s.rope ? rope_cos->contiguous() : at::Tensor();
  const at::Tensor sin_c = s.rope ? rope_sin->contiguous() : at::Tensor();
  const at::Tensor wk_scale = s.int8_weights ? w_uk_scale->contiguous() : at::Tensor();
  const at::Tensor wv_scale = s.int8_weights ? w_uv_scale->contiguous() : at::Tensor();

  const int64_t row_bytes = 2 * N1 * 4 + s.r * 2 + 8 + (cached ? 8 : 0);  // acc, codes, scale + position, slot
  const int64_t chunk = std::min(total, std::max<int64_t>(1, kReconstructWorkspaceBytes / row_bytes));
  const auto dev = cache.options();
  at::Tensor codes = at::empty({chunk, s.r}, dev.dtype(gemm_dtype));
  at::Tensor token_scale = at::empty({chunk}, dev.dtype(at::kFloat));
  at::Tensor position = at::empty({chunk}, dev.dtype(at::kInt));
  at::Tensor acc = at::empty({chunk, 2 * N1}, dev.dtype(at::kFloat));
  at::Tensor row_slot = cached ? at::empty({chunk}, dev.dtype(at::kLong)) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  lc::GatherCodesParams g;
  g.cache = latent_cache_layout(cache_c, cache_scale_c, bits, s.r);  // either layout
  g.block_table = table_c.data_ptr<int32_t>();
  g.cu_seqlens = cu_dev.data_ptr<int64_t>();
  g.B = s.B;
  g.max_blocks = s.max_blocks;
  g.num_blocks = s.num_blocks;
  g.block_size = s.block_size;
  g.r = s.r;
  g.bits = static_cast<int>(bits);
  g.codes = codes.data_ptr();
  g.codes_type = to_dtype(op, gemm_dtype);
  g.token_scale = token_scale.data_ptr<float>();
  g.position = position.data_ptr<int32_t>();
  g.slot = cached ? row_slot.data_ptr<int64_t>() : nullptr;
  // Code rows (base and stride) at 4 bytes; 8 for the 8-byte int8 loads.
  g.vectorized = s.r % 8 == 0 && aligned(g.cache.codes, 4) && g.cache.code_stride % 4 == 0;
  g.codes_8byte = g.vectorized && aligned(g.cache.codes, 8) && g.cache.code_stride % 8 == 0;

  lc::KvEpilogueParams e;
  e.acc_row_stride = 2 * N1;
  e.token_scale = g.token_scale;
  e.position = g.position;
  e.out_type = to_dtype(op, out_dtype);
  e.H_kv = s.H_kv;
  e.d = s.d;
  e.d_rope = s.d_rope;
  float* acc_p = acc.data_ptr<float>();
  const float* wk_scale_p = s.int8_weights ? wk_scale.data_ptr<float>() : nullptr;
  const float* wv_scale_p = s.int8_weights ? wv_scale.data_ptr<float>() : nullptr;
  // The tables are read only where K's rotary dims are rebuilt (not cached).
  const bool rotate = s.rope && !cached;
  const float* cos_p = rotate ? cos_c.data_ptr<float>() : nullptr;
  const float* sin_p = rotate ? sin_c.data_ptr<float>() : nullptr;
  // 16-byte fp32 loads at channel offsets that are multiples of 4 (d % 8 ==
  // 0 also makes N1 and h * d multiples of 4; d_rope % 8 == 0 d_rope / 2 and
  // the tables' rows).
  e.vectorized = s.d % 8 == 0 && aligned(acc_p, 16) &&
                 (!rotate || (s.d_rope % 8 == 0 && aligned(cos_p, 16) && aligned(sin_p, 16))) &&
                 (!s.int8_weights || (aligned(wk_scale_p, 16) && aligned(wv_scale_p, 16)));
  qsvd::latent_cache::CopyRopeKeysParams ck;
  if (cached) {
    ck.rope_keys = rope_keys->data_ptr();  // contiguous (checked)
    ck.slot = row_slot.data_ptr<int64_t>();
    ck.out_type = e.out_type;
    ck.H_kv = s.H_kv;
    ck.d = s.d;
    ck.d_rope = s.d_rope;
  }
  char* k_p = static_cast<char*>(k.data_ptr());
  char* v_p = static_cast<char*>(v.data_ptr());
  const int64_t out_row_bytes = N1 * k.element_size();

  for (int64_t row0 = 0; row0 < total; row0 += chunk) {
    const int64_t rows = std::min(chunk, total - row0);
    g.row_begin = row0;
    g.rows = rows;
    check_launch(op, lc::launch_gather_codes(g, stream));
    at::Tensor acc_rows = acc.narrow(0, 0, rows);
    at::mm_out(acc_rows, codes.narrow(0, 0, rows), w_cat, at::kFloat);  // same stream as the kernels
    e.rows = rows;
    e.acc = acc_p;  // K: columns [0, N1)
    e.w_scale = wk_scale_p;
    e.rope_cos = cos_p;
    e.rope_sin = sin_p;
    e.out = k_p + row0 * out_row_bytes;
    check_launch(op, lc::launch_kv_epilogue(e, stream));
    if (cached) {
      ck.rows = rows;
      ck.out = e.out;
      check_launch(op, lc::launch_copy_rope_keys(ck, stream));
    }
    e.acc = acc_p + N1;  // V: columns [N1, 2 N1), no RoPE
    e.w_scale = wv_scale_p;
    e.rope_cos = nullptr;
    e.rope_sin = nullptr;
    e.out = v_p + row0 * out_row_bytes;
    check_launch(op, lc::launch_kv_epilogue(e, stream));
  }
  return {k, v};
}

}  // namespace qsvd_torch
