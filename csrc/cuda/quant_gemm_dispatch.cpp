// Torch-free dispatch of quant_gemm (include/qsvd/kernels/quant_gemm_params.h):
// device properties and the table from (config, bit pair, output type) to the
// kernel instantiations generated from the menu (the choice of a config is in
// quant_gemm_menu.h). Plain C++: compiled by the host compiler.
#include <array>
#include <atomic>

#include "qsvd/kernels/quant_gemm_params.h"

namespace qsvd {
namespace gemm {
namespace {

using KernelFn = cudaError_t (*)(const QuantGemmParams&, cudaStream_t, size_t*);

struct KernelEntry {
  GemmConfig config;
  int a_bits, b_bits;
  DType out;
  KernelFn fn;
};

// Every compiled (config, bit pair, output type), generated from the menu
// (qsvd_kernels/tuning/gemm_menu.py, QSVD_GEMM_MENU).
constexpr KernelEntry kKernels[] = {
#include "qsvd_gemm_dispatch.inc"
    {GemmConfig::kSm80Prefill, 0, 0, DType::kF32, nullptr},  // sentinel: a CPU-only header has no rows
};

int out_index(DType out) {
  switch (out) {
    case DType::kF16: return 0;
    case DType::kBF16: return 1;
    case DType::kF32: return 2;
    default: return -1;
  }
}

// [config][pair_bit][out_index] -> kernel, built once from kKernels.
struct KernelTable {
  KernelFn fn[kNumGemmConfigs][4][3] = {};
  KernelTable() {
    for (const KernelEntry& e : kKernels) {
      const int bit = pair_bit(e.a_bits, e.b_bits), o = out_index(e.out);
      if (e.fn != nullptr && bit >= 0 && o >= 0) fn[static_cast<int>(e.config)][bit][o] = e.fn;
    }
  }
};

KernelFn kernel_for(const QuantGemmParams& p) {
  static const KernelTable table;
  const int c = static_cast<int>(p.config), bit = pair_bit(p.a_bits, p.b_bits), o = out_index(p.out_type);
  if (c < 0 || c >= kNumGemmConfigs || bit < 0 || o < 0) return nullptr;
  return table.fn[c][bit][o];
}

// The rules of QuantGemmParams that the kernels rely on for in-bounds,
// aligned accesses.
bool valid(const QuantGemmParams& p) {
  const auto aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % kPointerAlignment == 0;
  };
  return p.M > 0 && p.N > 0 && p.K > 0 && p.ldo >= p.N && p.K % k_alignment(p.a_bits, p.b_bits) == 0 &&
         p.ldo % out_alignment(p.out_type) == 0 && p.a != nullptr && p.b != nullptr && p.a_scale != nullptr &&
         p.b_scale != nullptr && p.out != nullptr && aligned(p.a) && aligned(p.b) && aligned(p.a_scale) &&
         aligned(p.b_scale) && aligned(p.bias) && aligned(p.out) && aligned(p.workspace) && p.sm_count > 0 &&
         valid_knobs(p.streamk_mode, p.splits, p.raster);
}

}  // namespace

cudaError_t get_device_info(int device, DeviceInfo* info) {
  constexpr int kMaxCachedDevices = 64;
  // cc and SM count packed in one word so that readers never see half an entry.
  static std::array<std::atomic<int64_t>, kMaxCachedDevices> cache{};
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int64_t packed = cache[device].load(std::memory_order_relaxed);
    if (packed != 0) {
      info->cc = static_cast<int>(packed >> 32);
      info->sm_count = static_cast<int>(packed & 0xffffffff);
      return cudaSuccess;
    }
  }
  int major = 0, minor = 0, sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the error for the next, unrelated call
    return err;
  }
  info->cc = 10 * major + minor;
  info->sm_count = sms;
  if (cacheable) cache[device].store((static_cast<int64_t>(info->cc) << 32) | sms, std::memory_order_relaxed);
  return cudaSuccess;
}

cudaError_t quant_gemm_workspace_size(const QuantGemmParams& p, size_t* bytes) {
  const KernelFn fn = kernel_for(p);
  if (fn == nullptr || !valid(p)) return cudaErrorInvalidValue;
  return fn(p, nullptr, bytes);
}

cudaError_t launch_quant_gemm(const QuantGemmParams& p, cudaStream_t stream) {
  const KernelFn fn = kernel_for(p);
  if (fn == nullptr || !valid(p)) return cudaErrorInvalidValue;
  return fn(p, stream, nullptr);
}

}  // namespace gemm
}  // namespace qsvd
