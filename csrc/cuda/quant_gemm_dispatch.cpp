// Torch-free dispatch of quant_gemm (include/qsvd/kernels/quant_gemm_params.h):
// device properties, configuration choice, and the table from (config, bit
// pair, output type) to the kernel instantiations of quant_gemm_sm80_*.cu /
// quant_gemm_sm90_*.cu. Plain C++: compiled by the host compiler.
#include <array>
#include <atomic>

#include "qsvd/kernels/quant_gemm_params.h"

namespace qsvd {
namespace gemm {
namespace {

using KernelFn = cudaError_t (*)(const QuantGemmParams&, cudaStream_t, size_t*);

template <GemmConfig kConfig, int kABits, int kBBits>
KernelFn sm80_for(OutType out) {
  switch (out) {
    case OutType::kF16: return &run_sm80<kConfig, kABits, kBBits, OutType::kF16>;
    case OutType::kBF16: return &run_sm80<kConfig, kABits, kBBits, OutType::kBF16>;
    case OutType::kF32: return &run_sm80<kConfig, kABits, kBBits, OutType::kF32>;
  }
  return nullptr;
}

template <GemmConfig kConfig>
KernelFn sm80_for(int a_bits, int b_bits, OutType out) {
  if (a_bits == 8 && b_bits == 8) return sm80_for<kConfig, 8, 8>(out);
  if (a_bits == 4 && b_bits == 4) return sm80_for<kConfig, 4, 4>(out);
  if (a_bits == 8 && b_bits == 4) return sm80_for<kConfig, 8, 4>(out);
  if (a_bits == 4 && b_bits == 8) return sm80_for<kConfig, 4, 8>(out);
  return nullptr;
}

template <GemmConfig kConfig>
KernelFn sm90_for(OutType out) {
  switch (out) {
    case OutType::kF16: return &run_sm90<kConfig, OutType::kF16>;
    case OutType::kBF16: return &run_sm90<kConfig, OutType::kBF16>;
    case OutType::kF32: return &run_sm90<kConfig, OutType::kF32>;
  }
  return nullptr;
}

KernelFn kernel_for(const QuantGemmParams& p) {
  switch (p.config) {
    case GemmConfig::kSm80Decode: return sm80_for<GemmConfig::kSm80Decode>(p.a_bits, p.b_bits, p.out_type);
    case GemmConfig::kSm80Prefill: return sm80_for<GemmConfig::kSm80Prefill>(p.a_bits, p.b_bits, p.out_type);
    case GemmConfig::kSm90Decode:
      return p.a_bits == 8 && p.b_bits == 8 ? sm90_for<GemmConfig::kSm90Decode>(p.out_type) : nullptr;
    case GemmConfig::kSm90Prefill:
      return p.a_bits == 8 && p.b_bits == 8 ? sm90_for<GemmConfig::kSm90Prefill>(p.out_type) : nullptr;
  }
  return nullptr;
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
         aligned(p.b_scale) && aligned(p.bias) && aligned(p.out) && aligned(p.workspace) && p.sm_count > 0;
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
  if (err != cudaSuccess) return err;
  info->cc = 10 * major + minor;
  info->sm_count = sms;
  if (cacheable) cache[device].store((static_cast<int64_t>(info->cc) << 32) | sms, std::memory_order_relaxed);
  return cudaSuccess;
}

GemmConfig select_config(int cc, int64_t M, int a_bits, int b_bits) {
  // Hopper: W8A8 on the CUTLASS 3.x wgmma kernels. INT4 operands have no
  // wgmma, so they run the CUTLASS 2.x kernels (compiled into the sm_90a
  // cubin too) on mma.sync: the mixed pairs upcast INT4 -> INT8 in registers
  // and use int8 mma; for int4 x int4, ptxas lowers the s4 mma.sync on
  // sm_90a to INT4 -> INT8 register unpacking + IMMA.16832.S8 (about 170 ALU
  // ops and 2 IMMA per m16n8k64), still exact.
  if (cc == 90 && a_bits == 8 && b_bits == 8)
    return M <= kSm90DecodeMaxM ? GemmConfig::kSm90Decode : GemmConfig::kSm90Prefill;
  return M <= kSm80DecodeMaxM ? GemmConfig::kSm80Decode : GemmConfig::kSm80Prefill;
}

const char* config_name(GemmConfig config) {
  switch (config) {
    case GemmConfig::kSm80Decode: return "sm80_decode_32x64_streamk";
    case GemmConfig::kSm80Prefill: return "sm80_prefill_128x128_streamk";
    case GemmConfig::kSm90Decode: return "sm90_decode_128x64_cluster1x1_streamk";
    case GemmConfig::kSm90Prefill: return "sm90_prefill_128x128_cluster2x1_streamk";
  }
  return "unknown";
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
