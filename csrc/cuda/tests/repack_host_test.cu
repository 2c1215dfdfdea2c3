// Host-only test of the CUDA repack indexing (csrc/cuda/repack_copy.cuh), for machines without a
// GPU: builds the same metadata records as repack_binding.cpp for host buffers, runs every
// (work unit, lane) of the kernel's decomposition serially on the CPU, and compares each output
// byte with a naive gather. Covers element sizes 1..16, 1-D / 2-D / 3-D tensors, strided and
// transposed sources, unsorted and repeated indices, kept runs, odd widths and misaligned bases.
//
//   nvcc -std=c++17 -O1 -Icsrc/cuda csrc/cuda/tests/repack_host_test.cu -o /tmp/repack_host_test
//   /tmp/repack_host_test            (scripts/nvcc_check.sh does both)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../repack_copy.cuh"

using namespace tsprune_cuda;

namespace {

struct Case {
  std::vector<int64_t> sizes;    // source sizes (1..3 dims)
  std::vector<int64_t> strides;  // source strides in elements (dims 0, 1; inner dims contiguous)
  int64_t es;                    // element size
  int64_t src_offset;            // bytes added to the (16-aligned) source base: misalignment
  bool rows, cols;               // gather rows / columns
  int mode;                      // 0 random sorted subset, 1 runs of kept columns, 2 unsorted + repeats
};

std::vector<int64_t> pick(std::mt19937& g, int64_t n, int mode) {
  std::vector<int64_t> v;
  if (mode == 0) {
    for (int64_t i = 0; i < n; ++i)
      if (g() % 2) v.push_back(i);
    if (v.empty()) v.push_back(n - 1);
  } else if (mode == 1) {  // runs (pruned heads): keep blocks of 8 with probability 1/2
    for (int64_t i = 0; i < n; i += 8)
      if (g() % 2 || i == 0)
        for (int64_t j = i; j < i + 8 && j < n; ++j) v.push_back(j);
  } else {
    const int64_t k = 1 + g() % (2 * n);
    for (int64_t i = 0; i < k; ++i) v.push_back(static_cast<int64_t>(g() % n));
  }
  return v;
}

int run_case(std::mt19937& g, const Case& c, int id) {
  const int dim = static_cast<int>(c.sizes.size());
  const int64_t inner = dim > 2 ? c.sizes[2] : 1;
  const int64_t s0 = c.strides[0], s1 = dim > 1 ? c.strides[1] : 1;
  int64_t span = 0;  // elements spanned by the source
  span += (c.sizes[0] - 1) * s0 + (dim > 1 ? (c.sizes[1] - 1) * s1 : 0) + inner;
  std::vector<char> src_buf(static_cast<size_t>(span * c.es + c.src_offset + 64));
  for (auto& b : src_buf) b = static_cast<char>(g());
  char* base = src_buf.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) & 15)) & 15;
  const char* src = base + c.src_offset;
  std::vector<int64_t> rows, cols;
  if (c.rows) rows = pick(g, c.sizes[0], c.mode == 1 ? 0 : c.mode);
  if (c.cols && dim > 1) cols = pick(g, c.sizes[1], c.mode);
  const int64_t ro = c.rows ? static_cast<int64_t>(rows.size()) : c.sizes[0];
  const int64_t co = dim > 1 ? (c.cols ? static_cast<int64_t>(cols.size()) : c.sizes[1]) : 1;
  const int64_t out_bytes = ro * co * inner * c.es;
  std::vector<char> dst_buf(static_cast<size_t>(out_bytes + 64), 0);
  char* dst = dst_buf.data();
  dst += (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;

  std::vector<int64_t> rec(kMetaFields, 0);
  rec[kSrc] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(src));
  rec[kDst] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst));
  if (dim == 1) {
    rec[kCols] = c.rows ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(rows.data())) : 0;
    rec[kRowsOut] = 1;
    rec[kColsOut] = ro;
    rec[kColStride] = s0 * c.es;
    rec[kCellBytes] = c.es;
  } else {
    rec[kRows] = c.rows ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(rows.data())) : 0;
    rec[kCols] = c.cols ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(cols.data())) : 0;
    rec[kRowsOut] = ro;
    rec[kColsOut] = co;
    rec[kRowStride] = s0 * c.es;
    rec[kColStride] = s1 * c.es;
    rec[kCellBytes] = inner * c.es;
  }
  rec[kElemBytes] = c.es;
  rec[kRowBytes] = rec[kColsOut] * rec[kCellBytes];
  rec[kSegsPerRow] = (rec[kRowBytes] + kSegBytes - 1) / kSegBytes;
  const int64_t cb = rec[kCellBytes];
  int64_t shift = -1;
  if ((cb & (cb - 1)) == 0) {
    shift = 0;
    while ((int64_t{1} << shift) < cb) ++shift;
  }
  rec[kCellShift] = shift;
  // a dummy first tensor so that find_tensor has to search
  std::vector<int64_t> meta(kMetaFields, 0);
  meta[kUnitBegin] = 0;
  meta[kRowsOut] = 0;
  meta[kSegsPerRow] = 1;
  rec[kUnitBegin] = 0;
  meta.insert(meta.end(), rec.begin(), rec.end());
  const int64_t units = rec[kRowsOut] * rec[kSegsPerRow];
  for (int64_t u = 0; u < units; ++u)
    for (int lane = 0; lane < 32; ++lane) copy_unit_lane(meta.data(), 2, u, lane, 32);

  // naive gather
  int bad = 0;
  for (int64_t r = 0; r < ro; ++r) {
    for (int64_t cc = 0; cc < co; ++cc) {
      int64_t sr, sc;
      if (dim == 1) {
        sr = c.rows ? rows[r] : r;  // (co == 1)
        sc = 0;
      } else {
        sr = c.rows ? rows[r] : r;
        sc = c.cols ? cols[cc] : cc;
      }
      const char* s = src + (sr * s0 + (dim > 1 ? sc * s1 : 0)) * c.es;
      const char* d = dst + ((r * co + cc) * inner) * c.es;
      if (std::memcmp(s, d, static_cast<size_t>(inner * c.es)) != 0) ++bad;
    }
  }
  if (bad) {
    std::printf("case %d FAILED: dim %d sizes", id, dim);
    for (auto v : c.sizes) std::printf(" %lld", static_cast<long long>(v));
    std::printf(" es %lld offset %lld rows %d cols %d mode %d: %d bad cells\n",
                static_cast<long long>(c.es), static_cast<long long>(c.src_offset), c.rows, c.cols,
                c.mode, bad);
  }
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 g(12345);
  const int64_t ess[] = {1, 2, 4, 8, 16};
  int failed = 0, n = 0;
  for (int rep = 0; rep < 400; ++rep) {
    Case c;
    const int dim = 1 + static_cast<int>(g() % 3);
    c.es = ess[g() % 5];
    const int64_t big = (g() % 4 == 0) ? 3000 : 70;  // some rows longer than one segment
    for (int d = 0; d < dim; ++d) c.sizes.push_back(1 + static_cast<int64_t>(g() % (d == 1 ? big : 40)));
    if (dim > 2) c.sizes[2] = 1 + static_cast<int64_t>(g() % 5);
    const int64_t inner = dim > 2 ? c.sizes[2] : 1;
    const bool transposed = dim == 2 && g() % 4 == 0;
    if (dim == 1) {
      c.strides = {static_cast<int64_t>(1 + (g() % 3 == 0 ? g() % 3 : 0))};
    } else if (transposed) {
      c.strides = {1, c.sizes[0]};
    } else {
      const int64_t pad = g() % 3 == 0 ? static_cast<int64_t>(g() % 5) : 0;
      c.strides = {(c.sizes[1] + pad) * inner, inner};
    }
    c.src_offset = (g() % 3 == 0) ? static_cast<int64_t>(g() % 4) * c.es : 0;
    c.rows = g() % 3 != 0;
    c.cols = dim > 1 && g() % 3 != 0;
    c.mode = static_cast<int>(g() % 3);
    failed += run_case(g, c, rep);
    ++n;
  }
  std::printf("repack host test: %d / %d cases passed\n", n - failed, n);
  return failed ? 1 : 0;
}
