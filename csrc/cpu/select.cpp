// Global selection for the arena step (see docs/KERNELS.md, "Arena step and selection").
//
// kth_smallest_abs: radix select on the IEEE bit pattern of |v| (for non-negative floats the
// bit pattern read as an unsigned integer is monotonic in the value). Each pass histograms 16
// bits of the keys that match the prefix found so far: fp32 keys take two passes, fp64 keys
// four. No sort and no concatenation: the passes walk the input tensors in place, in parallel
// over fixed-size chunks of all tensors.

#include "ops.h"
#include "kernel_utils.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace tsprune {
namespace {

constexpr int kDigitBits = 16;
constexpr int64_t kBuckets = int64_t{1} << kDigitBits;
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename Key>
struct KeyTraits;
template <>
struct KeyTraits<uint32_t> {
  static constexpr int kBits = 32;
  static constexpr uint32_t kInf = 0x7f800000u;  // keys >= this are inf / nan
};
template <>
struct KeyTraits<uint64_t> {
  static constexpr int kBits = 64;
  static constexpr uint64_t kInf = 0x7ff0000000000000ull;
};

// Key of |v|: the bit pattern with the sign bit cleared.
inline uint32_t key32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}
inline uint64_t key64(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffffffffffull;
}
template <typename Key, typename T>
inline Key key_of(T v) {
  if constexpr (std::is_same_v<Key, uint32_t>) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return (static_cast<uint32_t>(v.x) << 16) & 0x7fffffffu;  // exact upcast
    } else {
      return key32(static_cast<float>(v));  // float, Half (exact)
    }
  } else {
    return key64(static_cast<double>(v));  // every supported type converts exactly
  }
}

// A histogram pass: counts digit (key >> shift) & 0xffff of the keys whose higher bits equal
// `prefix` (when has_prefix); zero keys are skipped if skip_zero. Flags non-finite keys when
// check_finite. `Visit(chunk, f)` calls f(key) for every element of a chunk.
template <typename Key, typename Visit>
void histogram_pass(int64_t n_chunks, int64_t work, const Visit& visit, int shift, bool has_prefix,
                    Key prefix, bool skip_zero, bool check_finite, std::vector<int64_t>& hist,
                    bool& non_finite) {
  const int nt = detail::threads_for(work);
  std::vector<int64_t> local(static_cast<size_t>(nt) * kBuckets, 0);
  std::vector<char> bad(nt, 0);
  std::vector<int64_t> zeros(nt, 0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    int64_t* h = local.data() + static_cast<size_t>(tid) * kBuckets;
    bool b = false;
    int64_t z = 0;
    const int high_shift = shift + kDigitBits;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      // Branch-free for the common keys: zero keys are counted (and land in bucket 0 when
      // they match the prefix, i.e. when the prefix is 0); they are taken out after the pass.
      visit(c, [&](Key k) {
        z += (k == 0);
        b |= check_finite & (k >= KeyTraits<Key>::kInf);
        if (has_prefix && (k >> high_shift) != prefix) return;
        ++h[(k >> shift) & (kBuckets - 1)];
      });
    }
    bad[tid] = b;
    zeros[tid] = z;
  }
  hist.assign(kBuckets, 0);
  int64_t n_zero = 0;
  for (int t = 0; t < nt; ++t) {
    const int64_t* h = local.data() + static_cast<size_t>(t) * kBuckets;
    for (int64_t d = 0; d < kBuckets; ++d) hist[d] += h[d];
    non_finite = non_finite || bad[t];
    n_zero += zeros[t];
  }
  if (skip_zero && (!has_prefix || prefix == 0)) hist[0] -= n_zero;
}

template <typename Key>
struct SelectResult {
  int64_t count = 0;        // number of keys considered (zeros excluded if skip_zero)
  bool non_finite = false;  // a non-finite value was seen (selection aborted)
  bool selected = false;    // key / rank are valid
  Key key = 0;              // the k-th smallest key
  int64_t rank_in_ties = 0; // k - #(keys < key): the k-th key is the rank_in_ties-th of its ties
};

// Radix select of the k-th (1-based) smallest key. Stops after the first pass when k is out of
// [1, count], or (stop_if_all) when k >= count.
template <typename Key, typename Visit>
SelectResult<Key> radix_select(int64_t n_chunks, int64_t work, const Visit& visit, int64_t k,
                               bool skip_zero, bool stop_if_all) {
  SelectResult<Key> r;
  std::vector<int64_t> hist;
  Key prefix = 0;
  int64_t rem = k;
  for (int shift = KeyTraits<Key>::kBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    const bool first = shift == KeyTraits<Key>::kBits - kDigitBits;
    histogram_pass<Key>(n_chunks, work, visit, shift, !first, prefix, skip_zero, first, hist,
                        r.non_finite);
    if (first) {
      for (int64_t d = 0; d < kBuckets; ++d) r.count += hist[d];
      if (r.non_finite || k < 1 || k > r.count || (stop_if_all && k >= r.count)) return r;
    }
    int64_t cum = 0, d = 0;
    for (; d < kBuckets; ++d) {
      if (cum + hist[d] >= rem) break;
      cum += hist[d];
    }
    rem -= cum;
    prefix = static_cast<Key>((prefix << kDigitBits) | static_cast<Key>(d));
  }
  r.selected = true;
  r.key = prefix;
  r.rank_in_ties = rem;
  return r;
}

// Chunks of a list of tensors.
struct TensorChunks {
  std::vector<at::Tensor> ts;  // contiguous
  std::vector<int> tensor;     // per chunk
  std::vector<int64_t> begin, end;
  int64_t total = 0;

  explicit TensorChunks(const std::vector<at::Tensor>& in) {
    ts.reserve(in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      ts.push_back(in[i].contiguous());
      const int64_t n = ts.back().numel();
      total += n;
      for (int64_t b = 0; b < n; b += kChunk) {
        tensor.push_back(static_cast<int>(i));
        begin.push_back(b);
        end.push_back(std::min(n, b + kChunk));
      }
    }
  }
  int64_t size() const { return static_cast<int64_t>(tensor.size()); }

  template <typename Key, typename F>
  void visit(int64_t c, F&& f) const {
    const at::Tensor& t = ts[tensor[c]];
    const int64_t b = begin[c], e = end[c];
    switch (t.scalar_type()) {
      case at::kFloat: {
        const float* p = t.data_ptr<float>();
        for (int64_t i = b; i < e; ++i) f(key_of<Key>(p[i]));
        break;
      }
      case at::kDouble: {
        const double* p = t.data_ptr<double>();
        for (int64_t i = b; i < e; ++i) f(key_of<Key>(p[i]));
        break;
      }
      case at::kBFloat16: {
        const c10::BFloat16* p = t.data_ptr<c10::BFloat16>();
        for (int64_t i = b; i < e; ++i) f(key_of<Key>(p[i]));
        break;
      }
      case at::kHalf: {
        const c10::Half* p = t.data_ptr<c10::Half>();
        for (int64_t i = b; i < e; ++i) f(key_of<Key>(p[i]));
        break;
      }
      default:
        break;  // rejected before
    }
  }
};

template <typename Key>
at::Tensor kth_impl(const TensorChunks& src, int64_t k, bool ignore_zeros) {
  auto visit = [&](int64_t c, auto&& f) { src.visit<Key>(c, f); };
  const SelectResult<Key> r =
      radix_select<Key>(src.size(), src.total, visit, k, ignore_zeros, /*stop_if_all=*/false);
  TORCH_CHECK(!r.non_finite, "tsprune: kth_smallest_abs: non-finite value (nan or inf) in input");
  TORCH_CHECK(k >= 1 && k <= r.count, "tsprune: kth_smallest_abs: k=", k, " out of range [1, ",
              r.count, "] (count of ", ignore_zeros ? "nonzero elements)" : "elements)");
  if constexpr (std::is_same_v<Key, uint32_t>) {
    float v;
    std::memcpy(&v, &r.key, sizeof(v));
    return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat));
  } else {
    double v;
    std::memcpy(&v, &r.key, sizeof(v));
    return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
  }
}

}  // namespace

at::Tensor kth_smallest_abs(const std::vector<at::Tensor>& tensors, int64_t k, bool ignore_zeros) {
  bool any_double = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "tsprune: kth_smallest_abs: tensor ", i, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), "tsprune: kth_smallest_abs: tensor ", i,
                " must be a CPU tensor");
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "tsprune: kth_smallest_abs: tensor ", i, " has unsupported dtype ", dt);
    any_double = any_double || dt == at::kDouble;
  }
  const TensorChunks src(tensors);
  return any_double ? kth_impl<uint64_t>(src, k, ignore_zeros)
                    : kth_impl<uint32_t>(src, k, ignore_zeros);
}

namespace {
// Integer (branch-free) liveness: mask != 0 (+-0 are dead; nan counts as live, like m != 0).
inline uint32_t live_bit(float m) { return key32(m) != 0u; }
// Key of |imp| for a live unit, 0 (skipped like a zero score) for a dead one.
inline uint32_t live_key(float m, float v) { return key32(v) & (0u - live_bit(m)); }
}  // namespace

int64_t prune_lowest_(const at::Tensor& mask, const at::Tensor& imp, int64_t k) {
  TORCH_CHECK(mask.device().is_cpu() && imp.device().is_cpu(),
              "tsprune: prune_lowest_: mask and imp must be CPU tensors");
  TORCH_CHECK(mask.scalar_type() == at::kFloat && imp.scalar_type() == at::kFloat,
              "tsprune: prune_lowest_: mask and imp must be float32, got ", mask.scalar_type(),
              " and ", imp.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && imp.dim() == 1 && mask.numel() == imp.numel(),
              "tsprune: prune_lowest_: mask and imp must be 1-D of the same length, got ",
              mask.sizes(), " and ", imp.sizes());
  TORCH_CHECK(mask.is_contiguous() && imp.is_contiguous(),
              "tsprune: prune_lowest_: mask and imp must be contiguous");
  TORCH_CHECK(k >= 0, "tsprune: prune_lowest_: k must be >= 0, got ", k);
  const int64_t n = mask.numel();
  float* m = mask.data_ptr<float>();
  float* v = imp.data_ptr<float>();
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;

  // Select the threshold among live units with nonzero imp.
  bool prune_all = false;
  uint32_t thr = 0;          // prune live keys < thr ...
  int64_t ties_to_take = 0;  // ... and the first ties_to_take live keys == thr
  {
    auto visit = [&](int64_t c, auto&& f) {
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      for (int64_t i = b; i < e; ++i) f(live_key(m[i], v[i]));
    };
    const SelectResult<uint32_t> r = radix_select<uint32_t>(
        n_chunks, n, visit, std::max<int64_t>(k, 1), /*skip_zero=*/true, /*stop_if_all=*/true);
    TORCH_CHECK(!r.non_finite, "tsprune: prune_lowest_: non-finite value (nan or inf) in imp");
    if (k > 0) {
      if (k >= r.count) {
        prune_all = true;
      } else {
        thr = r.key;
        ties_to_take = r.rank_in_ties;
      }
    }
  }

  // Apply: the same fixed partition into parts in both regions, so tie ranks follow index order.
  const int nt = detail::threads_for(n);
  const int64_t parts = nt;
  std::vector<int64_t> ties(parts, 0), pruned(parts, 0);
  if (!prune_all && ties_to_take > 0) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t b = n * p / parts, e = n * (p + 1) / parts;
      int64_t c = 0;
      for (int64_t i = b; i < e; ++i) c += live_bit(m[i]) & (key32(v[i]) == thr);
      ties[p] = c;
    }
    int64_t before = 0;  // exclusive prefix, then the ties each part may still take
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c = ties[p];
      ties[p] = std::max<int64_t>(0, std::min(c, ties_to_take - before));
      before += c;
    }
  } else {
    std::fill(ties.begin(), ties.end(), 0);
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t b = n * p / parts, e = n * (p + 1) / parts;
    int64_t take = ties[p], cnt = 0;
    for (int64_t i = b; i < e; ++i) {
      const bool live = live_bit(m[i]);
      const uint32_t key = key32(v[i]);
      bool kill = live & (prune_all | (key == 0) | (key < thr));
      if (take > 0 && live && !kill && key == thr) {
        kill = true;
        --take;
      }
      if (kill) {  // rare: a branch beats rewriting every element
        m[i] = 0.0f;
        v[i] = 0.0f;
        ++cnt;
      }
    }
    pruned[p] = cnt;
  }
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) total += pruned[p];
  return total;
}

}  // namespace tsprune
