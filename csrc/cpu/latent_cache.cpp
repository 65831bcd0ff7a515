// CPU latent_cache_append: per-token quantization of new latent rows into
// the paged cache, in either layout (separate codes + scales, or packed
// rows: qsvd/latent_cache_layout.h says where a slot's codes and scale are).
// Every slot is validated before the first write. The
// quantization is qsvd::cpu::quantize_row (vectorised, bit-exact with
// qsvd/numerics.h and reference.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include <ATen/Parallel.h>
#include "cpu_paths.h"
#include "qsvd/cpu/simd.h"
#include "qsvd/formats.h"
#include "qsvd/latent_cache_layout.h"
#include "qsvd/numerics.h"

namespace qsvd_torch {

void latent_cache_append_cpu(const at::Tensor& c_in, const at::Tensor& slot_mapping_in, at::Tensor& cache,
                             const std::optional<at::Tensor>& cache_scale, int64_t bits, double clip_ratio,
                             bool /*check_indices: the CPU always checks (a host loop, no sync)*/) {
  cpu::check_isa_env("latent_cache_append");
  const CacheAppendShape s = check_latent_cache_append(c_in, slot_mapping_in, cache, cache_scale, bits, clip_ratio);
  if (s.T == 0) return;
  const at::Tensor slots = slot_mapping_in.to(at::kLong).contiguous();
  check_slot_mapping_host(slots, s);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const at::Tensor c = c_in.contiguous();
  const qsvd::LatentCacheLayout layout = latent_cache_layout(cache, cache_scale, bits, s.r);
  const float clip = static_cast<float>(clip_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "latent_cache_append_cpu", [&] {
    const scalar_t* cp = c.data_ptr<scalar_t>();
    at::parallel_for(0, s.T, std::max<int64_t>(1, 16384 / std::max<int64_t>(s.r, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(s.r);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = sp[i];
        if (slot < 0) continue;  // padding
        for (int64_t j = 0; j < s.r; ++j) buf[j] = static_cast<float>(cp[i * s.r + j]);
        const float scale =
            qsvd::cpu::quantize_row(buf.data(), s.r, static_cast<int>(bits), clip, layout.codes_of(slot));
        std::memcpy(layout.scale_of(slot), &scale, sizeof(float));
      }
    });
  });
}

}  // namespace qsvd_torch
