// CPU hadamard_transform / hadamard_quant: the arithmetic of qsvd/hadamard.h
// row by row, threaded over rows, with the butterflies vectorised
// (qsvd/cpu/simd.h: 16, 8 or 4 lanes at a time by the ISA level, the low
// stages inside registers, the others two stages per pass). Bit-exact with
// reference.py: the same fp32 additions in the same order, only several at
// a time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include <ATen/Parallel.h>
#include "store.h"
#include "cpu_paths.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/formats.h"
#include "qsvd/hadamard.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {
namespace {

// Rows per task: at least 32K elements (about 10 us of work), so that a
// small batch is not swamped by the thread pool's start-up.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / K); }

// Rotates row x (times signs) into dst (K floats), using buf (K floats)
// as the work row and xin (K floats) for the fp32 copy of a 16-bit input.
template <typename scalar_t>
inline void rotate_row(const scalar_t* x, const float* signs, const HadamardShape& s, float norm, float* buf,
                       float* xin, float* scratch, float* dst) {
  const float* in = nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    in = x;
  } else {
    for (int64_t i = 0; i < s.K; ++i) xin[i] = static_cast<float>(x[i]);
    in = xin;
  }
  qsvd::cpu::hadamard_row(in, signs, buf, dst, s.f, norm, scratch);
}

}  // namespace

at::Tensor hadamard_transform_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& signs_in) {
  cpu::check_isa_env("hadamard_transform");
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
      std::vector<float> buf(s.K), xin(s.K), scratch(s.f.m);
      for (int64_t r = begin; r < end; ++r) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          // (a discarded branch is still compiled here: the cast keeps it well-formed)
          rotate_row(xp + r * s.K, sp, s, norm, buf.data(), xin.data(), scratch.data(),
                     reinterpret_cast<float*>(op + r * s.K));
        } else {
          rotate_row(xp + r * s.K, sp, s, norm, buf.data(), xin.data(), scratch.data(), buf.data());
          cpu::store_row(buf.data(), s.K, op + r * s.K);  // one rounding to nearest even
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hadamard_quant_cpu(const at::Tensor& x_in, int64_t bits, double clip_ratio,
                                                      const std::optional<at::Tensor>& signs_in) {
  cpu::check_isa_env("hadamard_quant");
  const HadamardShape s = check_hadamard_quant(x_in, bits, clip_ratio, signs_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor signs = signs_in.has_value() ? signs_in->contiguous() : at::Tensor();
  auto code_sizes = x.sizes().vec();
  const int64_t code_row = qsvd::code_row_bytes(static_cast<int>(bits), s.K);
  code_sizes.back() = code_row;
  at::Tensor codes = at::empty(code_sizes, x.options().dtype(code_dtype(bits)));
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
      std::vector<float> buf(s.K), xin(s.K), scratch(s.f.m);
      for (int64_t r = begin; r < end; ++r) {
        rotate_row(xp + r * s.K, sp, s, norm, buf.data(), xin.data(), scratch.data(), buf.data());
        scp[r] = qsvd::cpu::quantize_row(buf.data(), s.K, static_cast<int>(bits), clip, cp + r * code_row);
      }
    });
  });
  return {codes, scale};
}

}  // namespace qsvd_torch
