// The normalised Walsh-Hadamard transform of docs/ops.md, torch-free.
//
//   y = (x * signs) . H_K / sqrt(K),   H_K = H_m (x) H_N,   K = m * N,  N = 2^n
//
// with row vectors, element index i = a * N + b (a < m is the slow index).
// H_N is Sylvester's; H_m (m in {12, 20, 28, 36}) is built by Paley's
// constructions below, so no magic tables need trusting: ctest checks
// H_m H_m^T = m I.
//
// The order of the floating-point operations is part of the spec, so that
// the CPU kernel, the CUDA kernel and reference.py agree bit for bit:
//   1. v = x * signs (fp32, one rounding; skipped when there are no signs);
//   2. radix-2 butterflies over b, stage by stage from the lowest bit up:
//        v[j], v[j + h] <- v[j] + v[j + h], v[j] - v[j + h];
//   3. if m > 1, for each b: y[a] = sum over a' = 0, 1, ... of
//        +-v[a'] (sign H_m[a'][a]), accumulated left to right from 0;
//   4. y *= norm, norm = float(1 / sqrt(K)).
#pragma once

#include <cmath>
#include <cstdint>

#include "qsvd/config.h"
#include "qsvd/numerics.h"

namespace qsvd {
namespace hadamard {

// Largest K served (CPU and CUDA alike): 2^15, which covers the hidden sizes
// of every open model we know, and lets one thread block hold a whole row.
inline constexpr int kMaxDim = 32768;

// K = m * 2^log_n. m == 0 marks an unsupported K.
struct Factorization {
  int m;
  int log_n;
};

// The odd part o of K picks the base: o == 1 -> m = 1 (pure power of two);
// o in {3, 5, 7, 9} -> m = 4 o in {12, 20, 28, 36}. A K of 40 * 2^n is
// served as 20 * 2^(n+1): an equally good Hadamard matrix, one base fewer.
constexpr QSVD_HOST_DEVICE Factorization factorize(int64_t K) {
  if (K < 1 || K > kMaxDim) return {0, 0};
  int64_t odd = K;
  int twos = 0;
  while ((odd & 1) == 0) {
    odd >>= 1;
    ++twos;
  }
  if (odd == 1) return {1, twos};
  if ((odd == 3 || odd == 5 || odd == 7 || odd == 9) && twos >= 2)
    return {static_cast<int>(4 * odd), twos - 2};
  return {0, 0};
}

constexpr QSVD_HOST_DEVICE bool is_supported_dim(int64_t K) { return factorize(K).m != 0; }

// Legendre symbol (a / q) for an odd prime q, by search (q <= 19 here).
constexpr QSVD_HOST_DEVICE int legendre_symbol(int a, int q) {
  a %= q;
  if (a < 0) a += q;
  if (a == 0) return 0;
  for (int x = 1; x < q; ++x)
    if ((x * x) % q == a) return 1;
  return -1;
}

template <int M>
struct BaseMatrix {
  int8_t v[M][M];  // entries +1 / -1
};

// Paley I (q = M - 1 prime, q = 3 mod 4): H = I + S, S the skew conference
// matrix bordered by ones. Paley II (q = M/2 - 1 prime, q = 1 mod 4): the
// symmetric conference matrix C, each 0 replaced by [[1,-1],[-1,-1]] and
// each +-1 by +-[[1,1],[1,-1]].
template <int M>
constexpr QSVD_HOST_DEVICE BaseMatrix<M> make_base_matrix() {
  static_assert(M == 1 || M == 12 || M == 20 || M == 28 || M == 36, "unsupported Hadamard base");
  BaseMatrix<M> h{};
  if constexpr (M == 1) {
    h.v[0][0] = 1;
  } else if constexpr (M == 12 || M == 20) {
    constexpr int q = M - 1;
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < M; ++j) {
        int s = 0;
        if (i == 0 && j == 0) s = 0;
        else if (i == 0) s = 1;
        else if (j == 0) s = -1;
        else s = legendre_symbol(j - i, q);
        h.v[i][j] = static_cast<int8_t>(i == j ? 1 : s);
      }
  } else {
    constexpr int q = M / 2 - 1;
    for (int i = 0; i <= q; ++i)
      for (int j = 0; j <= q; ++j) {
        int c = 0;
        if (i == 0 && j == 0) c = 0;
        else if (i == 0 || j == 0) c = 1;
        else c = legendre_symbol(j - i, q);
        for (int di = 0; di < 2; ++di)
          for (int dj = 0; dj < 2; ++dj) {
            int e = 0;
            if (c == 0) e = (di == 0 && dj == 0) ? 1 : -1;
            else e = c * ((di == 1 && dj == 1) ? -1 : 1);
            h.v[2 * i + di][2 * j + dj] = static_cast<int8_t>(e);
          }
      }
  }
  return h;
}

// Host access to a base by runtime m (row-major m x m), or nullptr.
inline const int8_t* base_matrix_host(int m) {
  static constexpr BaseMatrix<1> b1 = make_base_matrix<1>();
  static constexpr BaseMatrix<12> b12 = make_base_matrix<12>();
  static constexpr BaseMatrix<20> b20 = make_base_matrix<20>();
  static constexpr BaseMatrix<28> b28 = make_base_matrix<28>();
  static constexpr BaseMatrix<36> b36 = make_base_matrix<36>();
  switch (m) {
    case 1: return &b1.v[0][0];
    case 12: return &b12.v[0][0];
    case 20: return &b20.v[0][0];
    case 28: return &b28.v[0][0];
    case 36: return &b36.v[0][0];
    default: return nullptr;
  }
}

// float(1 / sqrt(K)), computed once on the host and handed to every kernel.
inline float norm_factor(int64_t K) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(K)));
}

// Steps 2-4 of the spec on one row of K = m * 2^log_n fp32 values, in place
// (step 1, the signs, is the caller's, fused into its load).
// scratch: at least m floats.
inline void transform_row_host(float* v, Factorization f, float norm, float* scratch) {
  const int64_t n = int64_t{1} << f.log_n;
  for (int a = 0; a < f.m; ++a) {
    float* row = v + a * n;
    for (int64_t h = 1; h < n; h <<= 1)
      for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float x = row[j], y = row[j + h];
          row[j] = x + y;
          row[j + h] = x - y;
        }
  }
  if (f.m > 1) {
    const int8_t* H = base_matrix_host(f.m);
    for (int64_t b = 0; b < n; ++b) {
      for (int a = 0; a < f.m; ++a) scratch[a] = v[a * n + b];
      for (int a = 0; a < f.m; ++a) {
        float acc = 0.f;
        for (int ap = 0; ap < f.m; ++ap)
          acc = H[ap * f.m + a] > 0 ? acc + scratch[ap] : acc - scratch[ap];
        v[a * n + b] = acc;
      }
    }
  }
  const int64_t K = f.m * n;
  for (int64_t i = 0; i < K; ++i) v[i] = mul_rn(v[i], norm);
}

}  // namespace hadamard
}  // namespace qsvd
