// Compiler portability for the torch-free layer: the same helpers compile
// as plain C++ (CPU kernels, ctest) and as CUDA (device kernels).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QSVD_HOST_DEVICE __host__ __device__
#define QSVD_DEVICE __device__
#else
#define QSVD_HOST_DEVICE
#define QSVD_DEVICE
#endif

#if defined(__CUDA_ARCH__)
#define QSVD_ON_DEVICE 1
#else
#define QSVD_ON_DEVICE 0
#endif

#define QSVD_INLINE inline QSVD_HOST_DEVICE
