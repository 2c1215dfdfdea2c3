// Small helpers shared by the tsprune CPU kernels (header-only, internal).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tsprune {
namespace detail {

// Accumulation type: float for fp32 / bf16 / fp16, double for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

// Number of OpenMP threads for a pass touching `work` elements: torch's intra-op thread count,
// or 1 for small inputs (a parallel region costs a few microseconds).
inline int threads_for(int64_t work) {
  if (work < (int64_t{1} << 15)) return 1;
  const int nt = at::get_num_threads();
  return nt < 1 ? 1 : nt;
}

// A row of T as a row of acc_type_t<T>: the row itself for float / double, else converted into
// the scratch buffer `buf` (length >= n).
inline const float* load_row(const float* src, int64_t, float*) { return src; }
inline const double* load_row(const double* src, int64_t, double*) { return src; }

inline const float* load_row(const c10::BFloat16* src, int64_t n, float* buf) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    buf[i] = f;
  }
  return buf;
}

inline const float* load_row(const c10::Half* src, int64_t n, float* buf) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Two rows of conversion scratch (empty for float / double, whose rows are read in place).
template <typename T>
struct ScratchRow {
  using A = acc_type_t<T>;
  static constexpr bool kNeeded = !std::is_same_v<T, A>;
  std::vector<A> buf;
  int64_t n;
  explicit ScratchRow(int64_t n_) : buf(kNeeded ? 2 * n_ : 0), n(n_) {}
  A* p0() { return kNeeded ? buf.data() : nullptr; }
  A* p1() { return kNeeded ? buf.data() + n : nullptr; }
};

}  // namespace detail
}  // namespace tsprune
