// Physical repack (see docs/KERNELS.md, "Repack"): gather kept rows (dim 0) and kept columns
// (dim 1) of many tensors into new contiguous tensors in one parallel pass. Trailing dims are
// copied whole; elements are moved as bytes, so every dtype works.

#include "ops.h"
#include "kernel_utils.h"

#include <immintrin.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tsprune {
namespace {

// Contiguous runs of a sorted-or-not column index list: (first source column, length).
struct Run {
  int64_t src;
  int64_t len;
};

struct Job {
  const char* src = nullptr;
  char* dst = nullptr;
  int64_t src_row_bytes = 0;  // bytes of one source row (dim 0 slice)
  int64_t dst_row_bytes = 0;  // bytes of one output row
  int64_t unit = 0;           // bytes of one column (element size * trailing numel)
  const int64_t* rows = nullptr;  // kept rows (nullptr: all)
  const int64_t* cols = nullptr;  // kept columns (nullptr: all)
  int64_t ncols = 0;              // kept columns
  std::vector<Run> runs;          // cols as runs (used when they are long enough)
  bool use_runs = false;
  // Strictly increasing cols of 1/2/4/8-byte units with AVX-512: per 64-byte block of the source
  // row, the lanes to keep; rows are then gathered with masked loads + compress.
  std::vector<uint64_t> lane_masks;
  bool use_compress = false;
};

template <typename W>
inline void gather_units(char* dst, const char* src, const int64_t* cols, int64_t n) {
  W* d = reinterpret_cast<W*>(dst);
  const W* s = reinterpret_cast<const W*>(src);
  for (int64_t j = 0; j < n; ++j) d[j] = s[cols[j]];
}

#if defined(__AVX512F__)
#define TSPRUNE_HAVE_COMPRESS 1
#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#define TSPRUNE_HAVE_COMPRESS_SMALL 1
#endif

inline bool compress_supported(int64_t unit) {
#if defined(TSPRUNE_HAVE_COMPRESS_SMALL)
  return unit == 1 || unit == 2 || unit == 4 || unit == 8;
#else
  return unit == 4 || unit == 8;
#endif
}

// Gathers the kept lanes of each 64-byte block of the source row: only kept lanes are loaded
// (masked loads never touch masked-off memory) and each block's kept lanes are compressed in a
// register and written with a masked store (no write past the end of the output row).
inline void compress_row(char* d, const char* s, const std::vector<uint64_t>& masks,
                         int64_t unit) {
  const int64_t nb = static_cast<int64_t>(masks.size());
  switch (unit) {
    case 4:
      for (int64_t b = 0; b < nb; ++b) {
        const __mmask16 m = static_cast<__mmask16>(masks[b]);
        if (!m) continue;
        const __m512i v = _mm512_maskz_loadu_epi32(m, s + b * 64);
        const int cnt = __builtin_popcount(m);
        _mm512_mask_storeu_epi32(d, static_cast<__mmask16>((1u << cnt) - 1u),
                                 _mm512_maskz_compress_epi32(m, v));
        d += cnt * 4;
      }
      break;
    case 8:
      for (int64_t b = 0; b < nb; ++b) {
        const __mmask8 m = static_cast<__mmask8>(masks[b]);
        if (!m) continue;
        const __m512i v = _mm512_maskz_loadu_epi64(m, s + b * 64);
        const int cnt = __builtin_popcount(m);
        _mm512_mask_storeu_epi64(d, static_cast<__mmask8>((1u << cnt) - 1u),
                                 _mm512_maskz_compress_epi64(m, v));
        d += cnt * 8;
      }
      break;
#if defined(TSPRUNE_HAVE_COMPRESS_SMALL)
    case 2:
      for (int64_t b = 0; b < nb; ++b) {
        const __mmask32 m = static_cast<__mmask32>(masks[b]);
        if (!m) continue;
        const __m512i v = _mm512_maskz_loadu_epi16(m, s + b * 64);
        const int cnt = __builtin_popcount(m);
        const __mmask32 om = cnt == 32 ? ~__mmask32{0} : ((__mmask32{1} << cnt) - 1u);
        _mm512_mask_storeu_epi16(d, om, _mm512_maskz_compress_epi16(m, v));
        d += cnt * 2;
      }
      break;
    case 1:
      for (int64_t b = 0; b < nb; ++b) {
        const __mmask64 m = static_cast<__mmask64>(masks[b]);
        if (!m) continue;
        const __m512i v = _mm512_maskz_loadu_epi8(m, s + b * 64);
        const int cnt = __builtin_popcountll(m);
        const __mmask64 om = cnt == 64 ? ~__mmask64{0} : ((__mmask64{1} << cnt) - 1u);
        _mm512_mask_storeu_epi8(d, om, _mm512_maskz_compress_epi8(m, v));
        d += cnt;
      }
      break;
#endif
    default:
      break;
  }
}
#else
inline bool compress_supported(int64_t) { return false; }
inline void compress_row(char*, const char*, const std::vector<uint64_t>&, int64_t) {}
#endif

struct alignas(1) Bytes16 {
  unsigned char b[16];
};

inline void copy_row(const Job& job, int64_t r) {
  const int64_t sr = job.rows ? job.rows[r] : r;
  const char* s = job.src + sr * job.src_row_bytes;
  char* d = job.dst + r * job.dst_row_bytes;
  if (!job.cols) {
    std::memcpy(d, s, static_cast<size_t>(job.dst_row_bytes));
    return;
  }
  if (job.use_compress) {
    compress_row(d, s, job.lane_masks, job.unit);
    return;
  }
  if (job.use_runs) {
    for (const Run& run : job.runs) {
      const size_t nb = static_cast<size_t>(run.len * job.unit);
      std::memcpy(d, s + run.src * job.unit, nb);
      d += nb;
    }
    return;
  }
  switch (job.unit) {
    case 1: gather_units<uint8_t>(d, s, job.cols, job.ncols); break;
    case 2: gather_units<uint16_t>(d, s, job.cols, job.ncols); break;
    case 4: gather_units<uint32_t>(d, s, job.cols, job.ncols); break;
    case 8: gather_units<uint64_t>(d, s, job.cols, job.ncols); break;
    case 16: gather_units<Bytes16>(d, s, job.cols, job.ncols); break;
    default:
      for (int64_t j = 0; j < job.ncols; ++j)
        std::memcpy(d + j * job.unit, s + job.cols[j] * job.unit, static_cast<size_t>(job.unit));
  }
}

// Validated contiguous int64 copy of an index tensor.
at::Tensor check_index(const at::Tensor& idx, size_t which, const char* what, int64_t size) {
  TORCH_CHECK(idx.device().is_cpu(), "tsprune: repack: ", what, " for tensor ", which,
              " must be a CPU tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "tsprune: repack: ", what, " for tensor ", which,
              " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, "tsprune: repack: ", what, " for tensor ", which,
              " must be 1-D, got shape ", idx.sizes());
  at::Tensor c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < size, "tsprune: repack: tensor ", which, ": ", what,
                " index ", p[i], " out of range for size ", size);
  }
  return c;
}

}  // namespace

std::vector<at::Tensor> repack(const std::vector<at::Tensor>& tensors,
                               const std::vector<std::optional<at::Tensor>>& keep_rows,
                               const std::vector<std::optional<at::Tensor>>& keep_cols) {
  const size_t n = tensors.size();
  TORCH_CHECK(keep_rows.empty() || keep_rows.size() == n, "tsprune: repack: got ", n,
              " tensors but ", keep_rows.size(), " keep_rows entries");
  TORCH_CHECK(keep_cols.empty() || keep_cols.size() == n, "tsprune: repack: got ", n,
              " tensors but ", keep_cols.size(), " keep_cols entries");

  std::vector<at::Tensor> srcs(n), outs(n), row_idx(n), col_idx(n);
  std::vector<Job> jobs(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].defined(), "tsprune: repack: tensor ", i, " is undefined");
    TORCH_CHECK(tensors[i].device().is_cpu(), "tsprune: repack: tensor ", i,
                " must be a CPU tensor");
    const at::Tensor t = tensors[i].contiguous();
    srcs[i] = t;
    const bool has_r = !keep_rows.empty() && keep_rows[i].has_value() && keep_rows[i]->defined();
    const bool has_c = !keep_cols.empty() && keep_cols[i].has_value() && keep_cols[i]->defined();
    TORCH_CHECK(!has_r || t.dim() >= 1, "tsprune: repack: tensor ", i,
                " is 0-d and cannot take keep_rows");
    TORCH_CHECK(!has_c || t.dim() >= 2, "tsprune: repack: tensor ", i, " has ", t.dim(),
                " dim(s) and cannot take keep_cols");
    std::vector<int64_t> out_sizes(t.sizes().begin(), t.sizes().end());
    Job& job = jobs[i];
    const int64_t es = static_cast<int64_t>(t.element_size());
    int64_t inner = 1;
    for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
    job.unit = t.dim() >= 2 ? inner * es : es;
    job.src_row_bytes = t.dim() >= 2 ? t.size(1) * job.unit : es;
    if (has_r) {
      row_idx[i] = check_index(*keep_rows[i], i, "keep_rows", t.size(0));
      out_sizes[0] = row_idx[i].numel();
      job.rows = row_idx[i].data_ptr<int64_t>();
    }
    job.ncols = t.dim() >= 2 ? t.size(1) : 1;
    if (has_c) {
      col_idx[i] = check_index(*keep_cols[i], i, "keep_cols", t.size(1));
      out_sizes[1] = col_idx[i].numel();
      job.cols = col_idx[i].data_ptr<int64_t>();
      job.ncols = col_idx[i].numel();
      for (int64_t j = 0; j < job.ncols; ++j) {
        if (!job.runs.empty() && job.runs.back().src + job.runs.back().len == job.cols[j]) {
          ++job.runs.back().len;
        } else {
          job.runs.push_back({job.cols[j], 1});
        }
      }
      bool increasing = true;
      for (int64_t j = 1; j < job.ncols && increasing; ++j)
        increasing = job.cols[j] > job.cols[j - 1];
      const bool compress = increasing && compress_supported(job.unit);
      // memcpy of runs pays off once the average run is long enough; below that the compress
      // path (or an element gather) is faster.
      const int64_t min_run_bytes = compress ? 512 : 32;
      job.use_runs = !job.runs.empty() && job.ncols * job.unit >=
                                              min_run_bytes * static_cast<int64_t>(job.runs.size());
      if (compress && !job.use_runs) {
        const int64_t lanes = 64 / job.unit;
        job.lane_masks.assign((t.size(1) + lanes - 1) / lanes, 0);
        for (int64_t j = 0; j < job.ncols; ++j)
          job.lane_masks[job.cols[j] / lanes] |= uint64_t{1} << (job.cols[j] % lanes);
        job.use_compress = true;
      }
    }
    job.dst_row_bytes = job.ncols * job.unit;
    outs[i] = at::empty(out_sizes, t.options());
    job.src = static_cast<const char*>(t.data_ptr());
    job.dst = static_cast<char*>(outs[i].data_ptr());
  }

  // Work items: blocks of kept rows of about 64 KiB of output, over all tensors.
  constexpr int64_t kItemBytes = int64_t{1} << 16;
  std::vector<int> item_job;
  std::vector<int64_t> item_begin, item_end;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t nrows = srcs[i].dim() == 0 ? 1 : outs[i].size(0);
    const int64_t rb = std::max<int64_t>(1, jobs[i].dst_row_bytes);
    if (jobs[i].dst_row_bytes == 0 || nrows == 0) continue;
    total_bytes += nrows * rb;
    const int64_t per = std::max<int64_t>(1, kItemBytes / rb);
    for (int64_t r = 0; r < nrows; r += per) {
      item_job.push_back(static_cast<int>(i));
      item_begin.push_back(r);
      item_end.push_back(std::min(nrows, r + per));
    }
  }
  const int64_t n_items = static_cast<int64_t>(item_job.size());
  const int nt = detail::threads_for(total_bytes / 4);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t it = 0; it < n_items; ++it) {
    const Job& job = jobs[item_job[it]];
    for (int64_t r = item_begin[it]; r < item_end[it]; ++r) copy_row(job, r);
  }
  return outs;
}

}  // namespace tsprune
