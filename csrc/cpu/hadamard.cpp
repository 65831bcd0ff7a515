// CPU hadamard_transform / hadamard_quant: the arithmetic of qsvd/hadamard.h
// row by row, threaded over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "qsvd/hadamard.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// Rows per task: about 16K elements, so small rows are batched.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / K); }

// Loads row `r` of x (with signs) into buf and rotates it in place.
template <typename scalar_t>
inline void rotate_row(const scalar_t* x, const float* signs, const HadamardShape& s, float norm, float* buf,
                       float* scratch) {
  if (signs != nullptr) {
    for (int64_t i = 0; i < s.K; ++i) buf[i] = qsvd::mul_rn(static_cast<float>(x[i]), signs[i]);
  } else {
    for (int64_t i = 0; i < s.K; ++i) buf[i] = static_cast<float>(x[i]);
  }
  qsvd::hadamard::transform_row_host(buf, s.f, norm, scratch);
}

}  // namespace

at::Tensor hadamard_transform_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& signs_in) {
  const HadamardShape s = check_hadamard("hadamard_transform", x_in, signs_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor signs = signs_in.has_value() ? signs_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (s.rows == 0) return out;
  const float norm = qsvd::hadamard::norm_factor(s.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_transform_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* sp = signs.defined() ? signs.data_ptr<float>() : nullptr;
    at::parallel_for(0, s.rows, row_grain(s.K), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(s.K), scratch(s.f.m);
      for (int64_t r = begin; r < end; ++r) {
        rotate_row(xp + r * s.K, sp, s, norm, buf.data(), scratch.data());
        scalar_t* o = op + r * s.K;
        for (int64_t i = 0; i < s.K; ++i) o[i] = static_cast<scalar_t>(buf[i]);  // round to nearest even
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hadamard_quant_cpu(const at::Tensor& x_in, int64_t bits, double clip_ratio,
                                                      const std::optional<at::Tensor>& signs_in) {
  const HadamardShape s = check_hadamard_quant(x_in, bits, clip_ratio, signs_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor signs = signs_in.has_value() ? signs_in->contiguous() : at::Tensor();
  auto code_sizes = x.sizes().vec();
  const int64_t code_row = bits == 4 ? s.K / 2 : s.K;
  code_sizes.back() = code_row;
  at::Tensor codes = at::empty(code_sizes, x.options().dtype(bits == 4 ? at::kByte : at::kChar));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.pop_back();
  at::Tensor scale = at::empty(scale_sizes, x.options().dtype(at::kFloat));
  if (s.rows == 0) return {codes, scale};
  const float norm = qsvd::hadamard::norm_factor(s.K);
  const float clip = static_cast<float>(clip_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hadamard_quant_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
    float* scp = scale.data_ptr<float>();
    const float* sp = signs.defined() ? signs.data_ptr<float>() : nullptr;
    at::parallel_for(0, s.rows, row_grain(s.K), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(s.K), scratch(s.f.m);
      for (int64_t r = begin; r < end; ++r) {
        rotate_row(xp + r * s.K, sp, s, norm, buf.data(), scratch.data());
        scp[r] = qsvd::quantize_row_host(buf.data(), s.K, static_cast<int>(bits), clip, cp + r * code_row);
      }
    });
  });
  return {codes, scale};
}

}  // namespace qsvd_torch
