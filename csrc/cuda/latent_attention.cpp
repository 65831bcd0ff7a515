// CUDA launcher of latent_attention (decode): the CPU kernel's checks, the
// optional host check of the index values, the split-KV plan (chosen from
// the shapes and the SM count, never from seq_lens: no device sync), the
// fp32 workspace, then the torch-free kernels of
// include/qsvd/kernels/latent_attention_kernel.cuh.
// Compiled by the host compiler: only the .cu instantiations need nvcc.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "../plan.h"
#include "launch.h"
#include "qsvd/kernels/latent_attention_params.h"
#include "qsvd/kernels/latent_cache_params.h"

namespace qsvd_torch {
namespace {

namespace lat = qsvd::latent;

using KernelChoice = lat::KernelChoice;

// The launch parameters of a call: sizes, pointers of the contiguous
// inputs (kept alive by `keep`), no plan yet.
struct Launch {
  lat::LatentAttentionParams p;
  std::vector<at::Tensor> keep;
};

// What the plan reads of a call: the sizes, the weight type, w_uk (its
// alignment), the RoPE tables (whether given) and the cached rotary keys
// (whether given: then the absorbed kernels run, and the tables are not read).
void set_sizes(lat::LatentAttentionParams& p, const LatentShape& s, int64_t H, int64_t bits, const at::Tensor& w_uk,
               const float* rope_cos, const void* rope_keys, const char* op) {
  p.B = static_cast<int>(s.B);
  p.H = static_cast<int>(H);
  p.H_kv = static_cast<int>(s.H_kv);
  p.r = static_cast<int>(std::min<int64_t>(s.r, lat::kMaxRank + 1));
  p.d = static_cast<int>(std::min<int64_t>(s.d, lat::kMaxHeadDim + 1));
  p.bits = static_cast<int>(bits);
  p.w_uk = w_uk.data_ptr();
  p.weight_type = to_dtype(op, w_uk.scalar_type());
  p.rope_cos = rope_keys != nullptr ? nullptr : rope_cos;
  p.rope_keys = rope_keys;
  p.d_rope = rope_keys != nullptr ? static_cast<int>(s.d_rope) : 0;
}


Launch launch_params(const at::Tensor& q_in, const at::Tensor& cache_in, const std::optional<at::Tensor>& cache_scale_in,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& w_uk_in,
                     const std::optional<at::Tensor>& w_uk_scale, const at::Tensor& w_uv_in,
                     const std::optional<at::Tensor>& w_uv_scale, int64_t bits, double sm_scale,
                     const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
                     const std::optional<at::Tensor>& rope_keys, const LatentShape& s, int64_t H, const char* op) {
  Launch l;
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor cache = cache_in.contiguous();  // packed rows: contiguous already (checked)
  const std::optional<at::Tensor> cache_scale =
      cache_scale_in.has_value() ? std::optional<at::Tensor>(cache_scale_in->contiguous()) : std::nullopt;
  const at::Tensor w_uk = w_uk_in.contiguous();
  const at::Tensor w_uv = w_uv_in.contiguous();
  const at::Tensor wk_scale = w_uk_scale.has_value() ? w_uk_scale->contiguous() : at::Tensor();
  const at::Tensor wv_scale = w_uv_scale.has_value() ? w_uv_scale->contiguous() : at::Tensor();
  // The tables are read only where K is rebuilt (not with cached keys).
  const bool rebuild = s.rope && !rope_keys.has_value();
  const at::Tensor cos = rebuild ? rope_cos->contiguous() : at::Tensor();
  const at::Tensor sin = rebuild ? rope_sin->contiguous() : at::Tensor();
  const at::Tensor keys = rope_keys.has_value() ? *rope_keys : at::Tensor();  // contiguous (checked)
  l.keep = {q, cache, w_uk, w_uv, wk_scale, wv_scale, cos, sin, keys};
  if (cache_scale.has_value()) l.keep.push_back(*cache_scale);

  lat::LatentAttentionParams& p = l.p;
  set_sizes(p, s, H, bits, w_uk, rebuild ? cos.data_ptr<float>() : nullptr,
            keys.defined() ? keys.data_ptr() : nullptr, op);
  p.q = q.data_ptr<float>();
  p.cache = latent_cache_layout(cache, cache_scale, bits, s.r);  // either layout
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.w_uk_scale = wk_scale.defined() ? wk_scale.data_ptr<float>() : nullptr;
  p.w_uv = w_uv.data_ptr();
  p.w_uv_scale = wv_scale.defined() ? wv_scale.data_ptr<float>() : nullptr;
  p.rope_sin = rebuild ? sin.data_ptr<float>() : nullptr;
  p.rope_len = s.rope ? rope_cos->size(0) : 0;  // bounds L with K rebuilt or cached, as the plan's capacity
  p.num_blocks = s.num_blocks;
  p.block_size = s.block_size;
  p.max_blocks = s.max_blocks;
  // One rounding of the exact sm_scale * log2(e): softmax runs in base 2.
  p.score_scale = static_cast<float>(sm_scale * 1.4426950408889634073599);
  p.out_type = to_dtype(op, q_in.scalar_type());
  return l;
}

// The plan of a call (plan::latent_attention; the precedence is there).
// Split kernel: the tensor-core one wherever it serves the shape, else the
// CUDA-core one (plan_latent_attention_tc). It serves d <= 256, r <= 8192
// and, with RoPE, d % 16 == 0 and a 16-byte aligned w_uk; in both paths a
// token tile of >= 16 must fit shared memory (without RoPE that holds up to
// r ~ 1950 on an H100, ~ 1300 on an A100; with RoPE, at d = 128, up to
// r ~ 6300 and ~ 4300; with int8 weights, whose operands take half the
// bytes, every r <= 8192 on an H100 and r ~ 8100 on an A100).
// The plan: forced knobs (qsvd_kernels.tuning.force("latent_attention",
// ...)), else QSVD_LATENT_KERNEL / QSVD_LATENT_SPLITS, else the installed
// table's rule (a rule whose plan the checker refuses for this call gives
// the default plan: never an error), else automatic. All from the shapes
// and the device properties: no device sync.
qsvd::tuning::LatentDecision plan_call(lat::LatentAttentionParams& p, const plan::LatentPlan& sig,
                                       const LatentShape& s, int device, const char* op) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  qsvd::tuning::LatentDecision decision;
  const char* why = plan::latent_attention(device, p, sig.token_capacity, prop->multiProcessorCount,
                                           prop->sharedMemPerBlockOptin, op, &decision, nullptr);
  const bool forced = decision.source == qsvd::tuning::RuleSource::kForced;
  const char* prefix = decision.choice != KernelChoice::kTensorCore ? (forced ? "forced plan: " : "")
                       : forced ? "forced plan with the tensor-core kernel, but "
                       : decision.source == qsvd::tuning::RuleSource::kEnv ? "QSVD_LATENT_KERNEL=tc, but "
                                                                            : "";
  QSVD_CHECK(why[0] == '\0', op, prefix, why, " (got r = ", s.r, ", d = ", s.d, ", H / H_kv = ", p.H / p.H_kv,
             ", rope = ", s.rope, ")");
  return decision;
}

}  // namespace

void plan::plan_latent_attention_cuda(plan::LatentPlan& plan, const LatentShape& s, int64_t H, int64_t bits,
                                      const at::Tensor& w_uk, const std::optional<at::Tensor>& rope_cos,
                                      const std::optional<at::Tensor>& rope_keys, const char* op) {
  check_cuda_rope_form(op, s, rope_keys.has_value());
  if (s.B == 0) return;
  const c10::cuda::CUDAGuard guard(w_uk.device());
  const at::Tensor w = w_uk.contiguous();  // the launcher's copy has the same alignment (a fresh allocation)
  lat::LatentAttentionParams p;
  set_sizes(p, s, H, bits, w, s.rope ? rope_cos->data_ptr<float>() : nullptr,
            rope_keys.has_value() ? rope_keys->data_ptr() : nullptr, op);
  plan::store_cuda_plan(plan, p, plan_call(p, plan, s, w_uk.get_device(), op));
}

std::tuple<at::Tensor, at::Tensor> latent_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& cache_in, const std::optional<at::Tensor>& cache_scale_in,
    const at::Tensor& block_table_in, const at::Tensor& seq_lens_in, const at::Tensor& w_uk_in,
    const std::optional<at::Tensor>& w_uk_scale, const at::Tensor& w_uv_in,
    const std::optional<at::Tensor>& w_uv_scale, int64_t bits, double sm_scale,
    const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin, bool check_indices,
    const std::optional<at::Tensor>& plan_in, const std::optional<at::Tensor>& rope_keys) {
  const char* op = "latent_attention";
  int64_t H = 0;
  const LatentShape s = check_latent_attention(q_in, cache_in, cache_scale_in, block_table_in, seq_lens_in, w_uk_in,
                                               w_uk_scale, w_uv_in, w_uv_scale, bits, sm_scale, rope_cos, rope_sin,
                                               &H);
  if (rope_keys.has_value()) check_rope_keys(op, *rope_keys, s, cache_in);
  check_cuda_rope_form(op, s, rope_keys.has_value());
  const c10::cuda::CUDAGuard guard(q_in.device());
  // The plan given is checked against the call before anything else reads it.
  const plan::LatentPlan sig = plan::latent_plan_signature(q_in, s, H, bits, w_uk_in, rope_cos, rope_keys.has_value());
  const std::optional<plan::LatentPlan> given =
      plan_in.has_value() ? std::optional<plan::LatentPlan>(plan::read_latent_plan(op, *plan_in, sig)) : std::nullopt;
  const at::Tensor block_table = block_table_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  const int64_t rope_len = s.rope ? rope_cos->size(0) : 0;
  if (check_indices && plan::host_index_checks(op))
    check_paged_indices_host(op, seq_lens.cpu(), block_table.cpu(), s, rope_len);

  at::Tensor out = at::empty({s.B, H, s.d}, q_in.options());
  at::Tensor lse = at::empty({s.B, H}, q_in.options().dtype(at::kFloat));
  if (s.B == 0) return {out, lse};
  QSVD_CHECK(s.B <= 65535 && H <= 65535, op, "the CUDA kernel serves at most 65535 sequences and 65535 heads, got B = ",
             s.B, ", H = ", H);

  Launch l = launch_params(q_in, cache_in, cache_scale_in, block_table, seq_lens, w_uk_in, w_uk_scale, w_uv_in,
                           w_uv_scale, bits, sm_scale, rope_cos, rope_sin, rope_keys, s, H, op);
  lat::LatentAttentionParams& p = l.p;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (given.has_value())
    plan::apply_cuda_plan(op, *given, p, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  else
    plan_call(p, sig, s, q_in.get_device(), op);

  const auto f32 = q_in.options().dtype(at::kFloat);
  const bool absorbed = p.rope_cos == nullptr;  // no RoPE, or K's rotary part cached
  at::Tensor q_lat = absorbed ? at::empty({s.B, H, s.r}, f32) : at::Tensor();
  at::Tensor part_acc = at::empty({s.B, H, p.splits, s.r}, f32);
  at::Tensor part_ml = at::empty({s.B, H, p.splits, 2}, f32);
  p.q_lat = absorbed ? q_lat.data_ptr<float>() : nullptr;
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();

  check_launch(op, lat::launch_latent_attention(p, at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

// K's rotary part of the rows at slot_mapping, in fp16 (latent_cache_kernel.cuh).
// With the host checks on (check_indices, QSVD_SKIP_INDEX_CHECKS unset) the
// index values are checked before the launch and the fp16 range after it (a
// sync, as the other host checks): the CPU kernel's ValueErrors. With them
// off, bad rows are skipped on the device and a key past fp16's range is
// stored as inf (its scores then turn the attention output NaN, not silently
// wrong).
void latent_rope_keys_append_cuda(QSVD_ROPE_KEYS_APPEND_PARAMS) {
  const char* op = "latent_rope_keys_append";
  const LatentShape s = check_latent_rope_keys_append(cache, cache_scale, slot_mapping, positions, w_uk, w_uk_scale,
                                                      bits, rope_cos, rope_sin, rope_keys);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t N = slot_mapping.size(0), num_slots = s.num_blocks * s.block_size, rope_len = rope_cos.size(0);
  if (N == 0) return;
  const bool host_checks = check_indices && plan::host_index_checks(op);
  if (host_checks)
    check_rope_keys_rows_host(op, slot_mapping.to(at::kCPU).to(at::kLong).contiguous(),
                              positions.to(at::kCPU).to(at::kLong).contiguous(), num_slots, rope_len);
  const at::Tensor cache_c = cache.contiguous();  // packed rows: contiguous already (checked)
  const std::optional<at::Tensor> scale_c =
      cache_scale.has_value() ? std::optional<at::Tensor>(cache_scale->contiguous()) : std::nullopt;
  const at::Tensor slots = slot_mapping.contiguous(), pos = positions.contiguous();
  const at::Tensor w = w_uk.contiguous();
  const at::Tensor ws = w_uk_scale.has_value() ? w_uk_scale->contiguous() : at::Tensor();
  const at::Tensor cos = rope_cos.contiguous(), sin = rope_sin.contiguous();
  at::Tensor overflow = at::full({1}, std::numeric_limits<int>::max(), cache.options().dtype(at::kInt));
  qsvd::latent_cache::RopeKeysAppendParams p;
  p.cache = latent_cache_layout(cache_c, scale_c, bits, s.r);  // either layout
  p.slot_mapping = slots.data_ptr();
  p.slot_is_int64 = slots.scalar_type() == at::kLong;
  p.positions = pos.data_ptr();
  p.pos_is_int64 = pos.scalar_type() == at::kLong;
  p.w_uk = w.data_ptr();
  p.weight_type = to_dtype(op, w.scalar_type());
  p.w_uk_scale = ws.defined() ? ws.data_ptr<float>() : nullptr;
  p.rope_cos = cos.data_ptr<float>();
  p.rope_sin = sin.data_ptr<float>();
  p.rope_keys = rope_keys.data_ptr();  // contiguous (checked)
  p.overflow = overflow.data_ptr<int>();
  p.N = N;
  p.r = s.r;
  p.H_kv = s.H_kv;
  p.d = s.d;
  p.d_rope = s.d_rope;
  p.num_slots = num_slots;
  p.rope_len = rope_len;
  p.bits = static_cast<int>(bits);
  check_launch(op, qsvd::latent_cache::launch_rope_keys_append(p, at::cuda::getCurrentCUDAStream()));
  if (host_checks) {
    const int row = overflow.item<int>();
    check_rope_keys_in_range(op, row == std::numeric_limits<int>::max() ? -1 : row);
  }
}

}  // namespace qsvd_torch
