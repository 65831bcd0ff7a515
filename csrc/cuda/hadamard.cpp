// CUDA launchers of hadamard_transform / hadamard_quant: validate (the same
// checks as the CPU kernels), pick the device and stream, call the
// torch-free kernels of include/qsvd/kernels/hadamard_kernel.cuh.
// Compiled by the host compiler: only the .cu instantiations need nvcc.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "../ops.h"
#include "../tuning.h"
#include "launch.h"
#include "qsvd/kernels/hadamard_params.h"

namespace qsvd_torch {
namespace {

// x as [rows, K] with unit column stride: a view when possible, else a copy.
at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && x2.stride(0) < K)) x2 = x2.contiguous();
  return x2;
}

void run(const char* op, const at::Tensor& x2, const std::optional<at::Tensor>& signs, const HadamardShape& s,
         void* out, float* scale, double clip_ratio, qsvd::hadamard::OutputKind kind) {
  qsvd::hadamard::HadamardParams p;
  p.x = x2.data_ptr();
  p.x_row_stride = x2.size(0) > 1 ? x2.stride(0) : s.K;
  p.x_type = to_dtype(op, x2.scalar_type());
  at::Tensor signs_c = signs.has_value() ? signs->contiguous() : at::Tensor();
  p.signs = signs_c.defined() ? signs_c.data_ptr<float>() : nullptr;
  p.out = out;
  p.scale = scale;
  p.rows = s.rows;
  p.K = s.K;
  p.norm = qsvd::hadamard::norm_factor(s.K);
  p.clip_ratio = static_cast<float>(clip_ratio);
  p.kind = kind;
  // The variant knob: tuning.force("hadamard", ...) > the installed table's rule > 0 (built-in). A variant that
  // does not serve K gives the built-in one (launch_hadamard's fallback).
  p.min_elems_per_thread =
      decide_hadamard_variant(x2.get_device(), s.K, static_cast<int>(p.x_type), nullptr).min_elems_per_thread;
  check_launch(op, qsvd::hadamard::launch_hadamard(p, at::cuda::getCurrentCUDAStream()));
}

}  // namespace

at::Tensor hadamard_transform_cuda(const at::Tensor& x, const std::optional<at::Tensor>& signs) {
  const char* op = "hadamard_transform";
  const HadamardShape s = check_hadamard(op, x, signs);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (s.rows == 0) return out;
  const at::Tensor x2 = as_rows(x, s.K);
  run(op, x2, signs, s, out.data_ptr(), nullptr, 1.0, qsvd::hadamard::OutputKind::kRotated);
  return out;
}

std::tuple<at::Tensor, at::Tensor> hadamard_quant_cuda(const at::Tensor& x, int64_t bits, double clip_ratio,
                                                       const std::optional<at::Tensor>& signs) {
  const HadamardShape s = check_hadamard_quant(x, bits, clip_ratio, signs);
  const c10::cuda::CUDAGuard guard(x.device());
  auto code_sizes = x.sizes().vec();
  code_sizes.back() = qsvd::code_row_bytes(static_cast<int>(bits), s.K);
  at::Tensor codes = at::empty(code_sizes, x.options().dtype(code_dtype(bits)));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.pop_back();
  at::Tensor scale = at::empty(scale_sizes, x.options().dtype(at::kFloat));
  if (s.rows == 0) return {codes, scale};
  const at::Tensor x2 = as_rows(x, s.K);
  run("hadamard_quant", x2, signs, s, codes.data_ptr(), scale.data_ptr<float>(), clip_ratio,
      bits == 4 ? qsvd::hadamard::OutputKind::kInt4 : qsvd::hadamard::OutputKind::kInt8);
  return {codes, scale};
}

}  // namespace qsvd_torch
