// The ctest suites' one check macro (no framework): a failing CHECK prints
// where and why and counts; report() ends a suite (exit code 1 on failure).
#pragma once

#include <cstdio>

namespace qsvd_test {
inline int g_failures = 0;

// 0 when every check passed, else 1 (and how many failed, on stderr).
inline int report(const char* suite, const char* detail = "") {
  if (g_failures) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", suite, g_failures);
    return 1;
  }
  std::printf("%s: all checks passed%s\n", suite, detail);
  return 0;
}

inline void detail() {}
inline void detail(const char* text) { std::fputs(text, stderr); }
template <class... Args>
inline void detail(const char* format, Args... args) {
  std::fprintf(stderr, format, args...);
}
}  // namespace qsvd_test

// CHECK(cond) or CHECK(cond, "printf format", args...).
#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++qsvd_test::g_failures;                                                      \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      qsvd_test::detail(__VA_ARGS__);                                               \
      std::fprintf(stderr, "\n");                                                   \
    }                                                                               \
  } while (0)
