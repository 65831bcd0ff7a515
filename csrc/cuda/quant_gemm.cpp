// CUDA launcher of quant_gemm: validate (the same checks as the CPU kernel),
// pick the device, stream and kernel configuration, bring the operands to
// the layout the CUTLASS kernels need, and call the torch-free dispatch of
// include/qsvd/kernels/quant_gemm_params.h. Compiled by the host compiler.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "../ops.h"
#include "../tuning.h"
#include "launch.h"
#include "qsvd/kernels/quant_gemm_params.h"

namespace qsvd_torch {
namespace {

namespace qg = qsvd::gemm;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// t contiguous, at a 16-byte aligned address (a view at an odd offset is
// copied; fresh CUDA allocations are aligned).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % qg::kPointerAlignment != 0) c = c.clone();
  return c;
}

// Codes [rows, K] (INT8) or [rows, K/2] (packed INT4) as a contiguous,
// aligned [rows, Kp(/2)] with Kp >= K. K is zero-padded when the kernels'
// 16-byte row granularity needs it: a zero code adds nothing to an integer
// sum, so the result is exact. The copy costs one pass over the operand
// (both A and B, the weights included), only for such K.
at::Tensor padded_codes(const at::Tensor& codes, int64_t bits, int64_t K, int64_t Kp) {
  if (Kp == K) return aligned_contiguous(codes);
  const int64_t cols = qsvd::code_row_bytes(static_cast<int>(bits), Kp);
  at::Tensor padded = at::zeros({codes.size(0), cols}, codes.options());
  padded.narrow(1, 0, codes.size(1)).copy_(codes);
  return padded;
}

// A per-column vector [N] as an aligned [ldo] buffer; the padding columns
// only feed output columns that are discarded.
at::Tensor padded_columns(const at::Tensor& v, int64_t ldo) {
  if (v.size(0) == ldo) return aligned_contiguous(v);
  at::Tensor padded = at::zeros({ldo}, v.options());
  padded.narrow(0, 0, v.size(0)).copy_(v);
  return padded;
}

void check_cc(const char* op, int device, int cc) {
  QSVD_CHECK(qg::is_supported_cc(cc), op, "no CUDA kernel for compute capability ", cc / 10, ".", cc % 10,
             " (device ", device, "): quant_gemm runs on compute capability 8.x (CUTLASS 2.x, sm_80 code) and ",
             "9.0 (CUTLASS 3.x, sm_90a code)");
}

}  // namespace

at::Tensor quant_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, int64_t a_bits, int64_t b_bits, at::ScalarType out_dtype,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "quant_gemm";
  const GemmShape s = check_quant_gemm(a, a_scale, b, b_scale, a_bits, b_bits, out_dtype, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::TensorOptions out_options = a.options().dtype(out_dtype);
  if (s.M == 0 || s.N == 0) return at::empty({s.M, s.N}, out_options);
  if (s.K == 0) {
    // The empty sum is 0; the epilogue still runs, in the CPU kernel's order
    // (0 * a_scale * b_scale is NaN for an infinite scale, as there).
    at::Tensor v = at::zeros({s.M, 1}, a_scale.options()).mul(a_scale.unsqueeze(1)).mul(b_scale.unsqueeze(0));
    if (bias.has_value()) v = v.add(bias->to(at::kFloat).unsqueeze(0));
    return v.to(out_dtype).contiguous();
  }

  const int device = a.get_device();
  qg::DeviceInfo info;
  cudaError_t err = qg::get_device_info(device, &info);
  check_launch(op, err, "cannot query CUDA device ", device);
  check_cc(op, device, info.cc);

  const qsvd::DType ot = to_dtype(op, out_dtype);
  const int64_t Kp = round_up(s.K, qg::k_alignment(static_cast<int>(a_bits), static_cast<int>(b_bits)));
  const int64_t ldo = round_up(s.N, qg::out_alignment(ot));
  const at::Tensor A = padded_codes(a, a_bits, s.K, Kp);
  const at::Tensor B = padded_codes(b, b_bits, s.K, Kp);
  const at::Tensor sa = aligned_contiguous(a_scale);
  const at::Tensor sb = padded_columns(b_scale, ldo);
  const at::Tensor bias_c = bias.has_value() ? padded_columns(*bias, ldo) : at::Tensor();
  // N not a multiple of the 16-byte output granularity: the kernel writes
  // a [M, ldo] buffer and the first N columns are copied out (one extra
  // pass over the output, only for such N; cheaper than a second set of
  // kernels with 1-element epilogue accesses).
  at::Tensor out_buf = at::empty({s.M, ldo}, out_options);

  qg::QuantGemmParams p;
  p.a = A.data_ptr();
  p.b = B.data_ptr();
  p.a_scale = sa.data_ptr<float>();
  p.b_scale = sb.data_ptr<float>();
  p.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  p.out = out_buf.data_ptr();
  p.M = s.M;
  p.N = s.N;
  p.K = Kp;
  p.ldo = ldo;
  p.a_bits = static_cast<int>(a_bits);
  p.b_bits = static_cast<int>(b_bits);
  p.out_type = ot;
  p.device = device;
  p.sm_count = info.sm_count;
  // Config and knobs: the installed tuning table's rule for this shape, or
  // the built-in choice (csrc/tuning.h). A rule that cannot serve the call
  // (not compiled in, wrong bit pair or arch, or a kernel that refuses the
  // shape or knobs) falls back to the built-in choice: tuning never makes a
  // call fail.
  const qg::GemmDecision decision = decide_gemm(device, info.cc, s.M, s.N, s.K, p.a_bits, p.b_bits, nullptr);
  p.config = decision.choice.config;
  p.streamk_mode = decision.choice.mode;
  p.splits = decision.choice.splits;
  p.raster = decision.choice.raster;

  size_t workspace_bytes = 0;
  err = qg::quant_gemm_workspace_size(p, &workspace_bytes);
  const bool tuned = decision.source == qg::ChoiceSource::kTable || decision.source == qg::ChoiceSource::kForced;
  if (err != cudaSuccess && tuned) {
    (void)cudaGetLastError();
    p.config = qg::select_config(info.cc, s.M, p.a_bits, p.b_bits);
    p.streamk_mode = qg::StreamKMode::kHeuristic;
    p.splits = 1;
    p.raster = qg::Raster::kHeuristic;
    err = qg::quant_gemm_workspace_size(p, &workspace_bytes);
  }
  check_launch(op, err, "kernel ", qg::config_name(p.config), " cannot serve M=", s.M, ", N=", s.N, ", K=", s.K);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, a.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = workspace_bytes;
  }
  check_launch(op, qg::launch_quant_gemm(p, at::cuda::getCurrentCUDAStream()), "CUDA kernel ",
               qg::config_name(p.config), " failed to launch");
  return ldo == s.N ? out_buf : out_buf.narrow(1, 0, s.N).contiguous();
}

}  // namespace qsvd_torch
