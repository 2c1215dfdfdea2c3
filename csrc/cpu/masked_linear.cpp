// Masked Linear forward / backward on CPU (see docs/KERNELS.md, "CPU fast path"), and the
// activation statistic act_sq_accumulate_.
//
// GEMMs go through ATen (MKL). The mask-gradient reductions are our own OpenMP passes over rows
// with per-thread partial accumulators; no activation-sized temporary is created. Units whose
// mask is (near) zero get exact gradients without extra GEMM: output units from y_pre[:, Z], which
// the forward keeps (masked_linear_fwd_keep: its GEMM computes those columns anyway), input units
// from dxm = gy @ (W * m_out). Without the kept columns (masked_linear_fwd), the output side falls
// back to recomputing them with a GEMM restricted to Z (|Z| / width of one GEMM).

#include "ops.h"
#include "kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tsprune {
namespace {

using detail::acc_type_t;
using detail::load_row;
using detail::ScratchRow;

// --------------------------------------------------------------------------------------------
// Zero channels: an ascending list of channel indices of a row of C channels, with per-16-channel
// bit masks so that AVX-512 builds gather them with vcompressps (a 16-lane compress per chunk,
// ~1 cycle per 16 channels) instead of per-element gathers or scalar loads.
// --------------------------------------------------------------------------------------------
struct ZeroCols {
  std::vector<int32_t> idx;     // ascending channel indices
  std::vector<uint16_t> chunk;  // chunk[i] bit l: channel 16 * i + l is in idx
  int64_t C = 0;
  int64_t size() const { return static_cast<int64_t>(idx.size()); }
};

ZeroCols make_zero_cols(const std::vector<int64_t>& channels, int64_t C) {
  TORCH_CHECK(C <= INT32_MAX, "tsprune: too many channels for the zero-channel path: ", C);
  ZeroCols z;
  z.C = C;
  z.idx.assign(channels.begin(), channels.end());
  z.chunk.assign(static_cast<size_t>((C + 15) / 16), 0);
  for (size_t j = 0; j < channels.size(); ++j) {
    TORCH_CHECK(channels[j] >= 0 && channels[j] < C && (j == 0 || channels[j] > channels[j - 1]),
                "tsprune: zero channels must be ascending and in range");
    z.chunk[static_cast<size_t>(channels[j] / 16)] |= static_cast<uint16_t>(1u << (channels[j] % 16));
  }
  return z;
}

// out[j] = row[z.idx[j]] for j < z.size(). out must have room for z.size() + 16 entries (the
// AVX-512 path stores whole 16-lane vectors).
inline void gather_cols(const float* row, const ZeroCols& z, float* __restrict out) {
#if defined(__AVX512F__)
  const int64_t C = z.C;
  int64_t pos = 0;
  for (int64_t i = 0; i * 16 < C; ++i) {
    const __mmask16 m = z.chunk[static_cast<size_t>(i)];
    if (!m) continue;
    const int64_t lanes = std::min<int64_t>(16, C - i * 16);
    const __mmask16 lm = lanes == 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lm, row + i * 16);
    _mm512_storeu_ps(out + pos, _mm512_maskz_compress_ps(m, v));
    pos += __builtin_popcount(static_cast<unsigned>(m));
  }
#else
  const int32_t* __restrict zi = z.idx.data();
  for (int64_t j = 0; j < z.size(); ++j) out[j] = row[zi[j]];
#endif
}

inline void gather_cols(const double* row, const ZeroCols& z, double* __restrict out) {
  const int32_t* __restrict zi = z.idx.data();
  for (int64_t j = 0; j < z.size(); ++j) out[j] = row[zi[j]];
}

// --------------------------------------------------------------------------------------------
// Pair reduction: for rows t and channels c of A [rows, C] and B [rows, C] (row strides lda/ldb),
//   per sample i (tps consecutive rows), per unit u (block consecutive channels):
//     g_i[u] = inv[u] * sum_{t in i} sum_{c in u} A[t, c] * B[t, c]
//   sum[u] = sum_i g_i[u],  sq[u] = sum_i g_i[u]^2,  colsum[c] = sum_t A[t, c].
// Zero channels (optional, Z = zc->size() > 0): channel zc->idx[j] of A is paired with column j
// of BZ [rows, Z] (row stride ldbz) instead of with B, and the units listed in zunit (block
// consecutive entries of zc each, in order) take g_i[u] = sum_{t in i} sum_j A[t, zc[j]] * BZ[t, j],
// not scaled by inv. (Output side: B = y, BZ = y_pre[:, Z]: zero units need no division by m.)
// Channel-level accumulation is in acc_type_t<T> (float, or double for fp64); unit-level
// accumulation (across samples and threads) in double. Deterministic for a given thread count.
// --------------------------------------------------------------------------------------------
template <typename T>
struct PairReduce {
  using A = acc_type_t<T>;
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;  // nullptr: only colsum of a is computed
  int64_t ldb = 0;
  int64_t rows = 0, C = 0, tps = 0, block = 1;
  const double* inv = nullptr;  // per unit scale (nullptr = 1)
  double* sum = nullptr;        // [C / block], written
  double* sq = nullptr;         // [C / block], written (needs tps)
  double* colsum = nullptr;     // [C], written
  const T* bz = nullptr;        // zero channels, see above (used only with b and sum / sq)
  int64_t ldbz = 0;
  const ZeroCols* zc = nullptr;    // the channels of A paired with the columns of BZ
  const int64_t* zunit = nullptr;  // [zc->size() / block] unit of each block of zc

  // Zero channels in use; the partial buffers hold C, then nz() channels.
  int64_t nz() const {
    return (zc != nullptr && b != nullptr && (sum != nullptr || sq != nullptr)) ? zc->size() : 0;
  }

  // Accumulate rows [r0, r1) into chan (A*B, then A*BZ in chan[C..C+nz)) and csum (A).
  // zg: scratch for two gathered rows, 2 * (nz() + 16) entries (nullptr when nz() == 0).
  void rows_into(int64_t r0, int64_t r1, A* chan, A* csum, ScratchRow<T>& sa, ScratchRow<T>& sb,
                 ScratchRow<T>& sz, A* zg) const {
    const bool prod = chan != nullptr;
    const int64_t Z = prod ? nz() : 0;
    A* __restrict g0 = zg;
    A* __restrict g1 = zg ? zg + Z + 16 : nullptr;
    int64_t r = r0;
    // Two rows per sweep halves the traffic on the (L1-resident) accumulators.
    for (; prod && r + 2 <= r1; r += 2) {
      const A* a0 = load_row(a + r * lda, C, sa.p0());
      const A* a1 = load_row(a + (r + 1) * lda, C, sa.p1());
      const A* b0 = load_row(b + r * ldb, C, sb.p0());
      const A* b1 = load_row(b + (r + 1) * ldb, C, sb.p1());
      A* __restrict ch = chan;
      if (csum) {
        A* __restrict cs = csum;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          ch[c] += a0[c] * b0[c] + a1[c] * b1[c];
          cs[c] += a0[c] + a1[c];
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ch[c] += a0[c] * b0[c] + a1[c] * b1[c];
      }
      if (Z) {  // the A rows are in L1 now: gather their zero channels
        const A* z0 = load_row(bz + r * ldbz, Z, sz.p0());
        const A* z1 = load_row(bz + (r + 1) * ldbz, Z, sz.p1());
        gather_cols(a0, *zc, g0);
        gather_cols(a1, *zc, g1);
        A* __restrict zch = chan + C;
#pragma omp simd
        for (int64_t j = 0; j < Z; ++j) zch[j] += g0[j] * z0[j] + g1[j] * z1[j];
      }
    }
    for (; r < r1; ++r) {
      const A* a0 = load_row(a + r * lda, C, sa.p0());
      if (prod) {
        const A* b0 = load_row(b + r * ldb, C, sb.p0());
        A* __restrict ch = chan;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ch[c] += a0[c] * b0[c];
        if (Z) {
          const A* z0 = load_row(bz + r * ldbz, Z, sz.p0());
          gather_cols(a0, *zc, g0);
          A* __restrict zch = chan + C;
#pragma omp simd
          for (int64_t j = 0; j < Z; ++j) zch[j] += g0[j] * z0[j];
        }
      }
      if (csum) {
        A* __restrict cs = csum;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) cs[c] += a0[c];
      }
    }
  }

  // Per-sample finalisation: channel sums (double) -> unit values -> sum / sq. chan has C + nz()
  // entries; g is scratch for U unit values (used only with zero channels).
  template <typename S>
  void finish_sample(const S* chan, double* usum, double* usq, double* g) const {
    const int64_t U = C / block;
    if (nz() > 0) {
      double* __restrict gg = g;
      if (block == 1) {
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) gg[u] = static_cast<double>(chan[u]) * (inv ? inv[u] : 1.0);
      } else {
        for (int64_t u = 0; u < U; ++u) {
          double s = 0.0;
          for (int64_t c = u * block; c < (u + 1) * block; ++c) s += static_cast<double>(chan[c]);
          gg[u] = inv ? s * inv[u] : s;
        }
      }
      const S* zch = chan + C;
      for (int64_t i = 0; i < nz() / block; ++i) {
        double s = 0.0;
        for (int64_t j = i * block; j < (i + 1) * block; ++j) s += static_cast<double>(zch[j]);
        gg[zunit[i]] = s;  // replaces (never adds to) the y / m value, which may be NaN here
      }
      double* __restrict us = usum;
      double* __restrict uq = usq;
      if (us) {
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) us[u] += gg[u];
      }
      if (uq) {
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) uq[u] += gg[u] * gg[u];
      }
      return;
    }
    if (block == 1) {  // the common case, kept vectorisable
      double* __restrict us = usum;
      double* __restrict uq = usq;
      if (us && uq) {
#pragma omp simd
        for (int64_t u = 0; u < U; ++u) {
          const double g = static_cast<double>(chan[u]) * (inv ? inv[u] : 1.0);
          us[u] += g;
          uq[u] += g * g;
        }
      } else {
        for (int64_t u = 0; u < U; ++u) {
          const double g = static_cast<double>(chan[u]) * (inv ? inv[u] : 1.0);
          if (us) us[u] += g;
          if (uq) uq[u] += g * g;
        }
      }
      return;
    }
    for (int64_t u = 0; u < U; ++u) {
      double s = 0.0;
      for (int64_t c = u * block; c < (u + 1) * block; ++c) s += static_cast<double>(chan[c]);
      const double g = inv ? s * inv[u] : s;
      if (usum) usum[u] += g;
      if (usq) usq[u] += g * g;
    }
  }

  void run() const {
    TORCH_CHECK(block >= 1 && C % block == 0, "tsprune: channel count ", C,
                " is not a multiple of the block size ", block);
    const int64_t U = C / block;
    const bool prod = b != nullptr && (sum != nullptr || sq != nullptr);
    const bool per_sample = sq != nullptr && prod;
    if (sum) std::fill(sum, sum + U, 0.0);
    if (sq) std::fill(sq, sq + U, 0.0);
    if (colsum) std::fill(colsum, colsum + C, 0.0);
    if (rows == 0 || C == 0 || (!prod && !colsum)) return;
    if (per_sample) {
      TORCH_CHECK(tps >= 1 && rows % tps == 0, "tsprune: tokens_per_sample (", tps,
                  ") must be >= 1 and divide the number of rows (", rows, ")");
    }
    const int64_t Z = nz();
    TORCH_CHECK(Z == 0 || (bz != nullptr && zunit != nullptr && zc->C == C && Z % block == 0),
                "tsprune: inconsistent zero-channel arguments of the pair reduction");
    const int64_t Cx = C + Z;  // channels of every partial buffer
    const int64_t ns = per_sample ? rows / tps : 1;
    const int64_t srows = per_sample ? tps : rows;
    const int nt = detail::threads_for(rows * C);

    if (per_sample && ns >= nt) {
      // Many samples: each thread owns whole samples; unit-level partials per thread.
      std::vector<A> chan(static_cast<size_t>(nt) * Cx);
      std::vector<A> csum(colsum ? static_cast<size_t>(nt) * C : 0, A(0));
      std::vector<double> usum(static_cast<size_t>(nt) * U, 0.0), usq(usum.size(), 0.0);
      std::vector<int> used(nt, 0);
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        used[tid] = 1;
        ScratchRow<T> sa(C), sb(C), sz(Z);
        std::vector<double> g(Z ? U : 0);
        std::vector<A> zg(Z ? 2 * (Z + 16) : 0);
        A* ch = chan.data() + static_cast<size_t>(tid) * Cx;
        A* cs = colsum ? csum.data() + static_cast<size_t>(tid) * C : nullptr;
        double* us = usum.data() + static_cast<size_t>(tid) * U;
        double* uq = usq.data() + static_cast<size_t>(tid) * U;
        const int64_t s0 = ns * tid / team, s1 = ns * (tid + 1) / team;
        for (int64_t s = s0; s < s1; ++s) {
          std::fill(ch, ch + Cx, A(0));
          rows_into(s * tps, (s + 1) * tps, ch, cs, sa, sb, sz, Z ? zg.data() : nullptr);
          finish_sample(ch, sum ? us : nullptr, uq, g.data());
        }
      }
      for (int t = 0; t < nt; ++t) {
        if (!used[t]) continue;
        for (int64_t u = 0; u < U; ++u) {
          if (sum) sum[u] += usum[static_cast<size_t>(t) * U + u];
          sq[u] += usq[static_cast<size_t>(t) * U + u];
        }
        if (colsum)
          for (int64_t c = 0; c < C; ++c) colsum[c] += csum[static_cast<size_t>(t) * C + c];
      }
      return;
    }

    // Few samples (or no per-sample statistic): split each sample into S row segments.
    int64_t S = per_sample ? (nt + ns - 1) / ns : nt;
    S = std::max<int64_t>(1, std::min<int64_t>(S, srows));
    const int64_t tasks = ns * S;
    std::vector<A> part(prod ? static_cast<size_t>(tasks) * Cx : 0);
    std::vector<A> cpart(colsum ? static_cast<size_t>(tasks) * C : 0);
#pragma omp parallel num_threads(nt)
    {
      ScratchRow<T> sa(C), sb(C), sz(Z);
      std::vector<A> zg(Z ? 2 * (Z + 16) : 0);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t s = task / S, j = task % S;
        const int64_t r0 = s * srows + srows * j / S, r1 = s * srows + srows * (j + 1) / S;
        A* ch = prod ? part.data() + static_cast<size_t>(task) * Cx : nullptr;
        A* cs = colsum ? cpart.data() + static_cast<size_t>(task) * C : nullptr;
        if (ch) std::fill(ch, ch + Cx, A(0));
        if (cs) std::fill(cs, cs + C, A(0));
        rows_into(r0, r1, ch, cs, sa, sb, sz, Z ? zg.data() : nullptr);
      }
    }
    if (prod) {
      std::vector<double> tot(Cx), g(Z ? U : 0);
      for (int64_t s = 0; s < ns; ++s) {
        std::fill(tot.begin(), tot.end(), 0.0);
        for (int64_t j = 0; j < S; ++j) {
          const A* p = part.data() + static_cast<size_t>(s * S + j) * Cx;
          for (int64_t c = 0; c < Cx; ++c) tot[c] += static_cast<double>(p[c]);
        }
        finish_sample(tot.data(), sum, sq, g.data());
      }
    }
    if (colsum) {
      for (int64_t task = 0; task < tasks; ++task) {
        const A* p = cpart.data() + static_cast<size_t>(task) * C;
        for (int64_t c = 0; c < C; ++c) colsum[c] += static_cast<double>(p[c]);
      }
    }
  }
};

// --------------------------------------------------------------------------------------------
// Mask helpers
// --------------------------------------------------------------------------------------------
struct UnitMask {
  bool present = false;
  int64_t block = 1;
  std::vector<double> m;     // per unit
  std::vector<double> inv;   // 1/m, 0 for zero units
  std::vector<int64_t> zero; // indices of zero units
  bool all_ones = false;     // every entry is exactly 1: nothing to fold

  bool folds() const { return present && !all_ones; }

  double channel(int64_t c) const { return m[static_cast<size_t>(c / block)]; }
};

// Below this |m| a unit's gradient is recomputed instead of recovered by dividing by m.
// fp16 activations lose their relative precision (subnormals) far earlier than fp32 ones.
double zero_threshold(at::ScalarType dt) {
  return dt == at::kHalf ? 1e-4 : 1e-20;
}

UnitMask read_mask(const std::optional<at::Tensor>& mask, int64_t width, int64_t block,
                   const char* name, double thresh) {
  UnitMask um;
  um.block = block;
  if (!mask.has_value() || !mask->defined()) return um;
  const at::Tensor& mt = *mask;
  TORCH_CHECK(mt.device().is_cpu(), "tsprune: ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(mt.scalar_type()), "tsprune: ", name,
              " must be a floating tensor, got ", mt.scalar_type());
  TORCH_CHECK(block >= 1, "tsprune: block size for ", name, " must be >= 1, got ", block);
  TORCH_CHECK(mt.dim() == 1 && mt.numel() * block == width, "tsprune: ", name,
              " must be 1-D with ", width, " / ", block, " entries, got shape ", mt.sizes());
  um.present = true;
  const at::Tensor md = mt.to(at::kDouble).contiguous();
  const double* p = md.data_ptr<double>();
  um.m.assign(p, p + md.numel());
  um.inv.resize(um.m.size());
  um.all_ones = std::all_of(um.m.begin(), um.m.end(), [](double v) { return v == 1.0; });
  for (size_t u = 0; u < um.m.size(); ++u) {
    const double v = um.m[u];
    const bool z = !std::isfinite(v) || std::fabs(v) < thresh;
    um.inv[u] = z ? 0.0 : 1.0 / v;
    if (z) um.zero.push_back(static_cast<int64_t>(u));
  }
  return um;
}

// Channel indices (int64 tensor) of the given units.
at::Tensor unit_channels(const std::vector<int64_t>& units, int64_t block) {
  at::Tensor idx = at::empty({static_cast<int64_t>(units.size()) * block}, at::kLong);
  int64_t* p = idx.data_ptr<int64_t>();
  for (size_t i = 0; i < units.size(); ++i)
    for (int64_t j = 0; j < block; ++j) *p++ = units[i] * block + j;
  return idx;
}

// dst[r, c] = src[r, c] * rs[r] * cs[c] (rs / cs per channel, nullptr = 1). dst may alias src.
template <typename T>
void scale_rows_cols(const T* src, T* dst, int64_t R, int64_t C, const double* rs,
                     const double* cs) {
  using A = acc_type_t<T>;
  std::vector<A> csa(cs ? C : 0);
  for (int64_t c = 0; cs && c < C; ++c) csa[c] = static_cast<A>(cs[c]);
  const int nt = detail::threads_for(R * C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const A f = rs ? static_cast<A>(rs[r]) : A(1);
    const T* s = src + r * C;
    T* d = dst + r * C;
    if (cs) {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<T>(static_cast<A>(s[c]) * f * csa[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<T>(static_cast<A>(s[c]) * f);
    }
  }
}

// Channel indices of the given units (block consecutive channels each), as a vector.
std::vector<int64_t> unit_channel_list(const std::vector<int64_t>& units, int64_t block) {
  std::vector<int64_t> c;
  c.reserve(units.size() * static_cast<size_t>(block));
  for (int64_t u : units)
    for (int64_t j = 0; j < block; ++j) c.push_back(u * block + j);
  return c;
}

// Buffers for y_pre_zero (saved from forward to backward, freed after the backward): a fresh
// activation-sized buffer costs a page fault per 4 KiB page on first write, or, with 2 MiB
// transparent huge pages, the kernel zeroing it (measured on the 2-core benchmark machine: ~0.4 ms
// per MB, ~0.12 ms per MB). Freed buffers are therefore kept in a small process-wide cache, bounded
// by TSPRUNE_CPU_CACHE_MB (default 256; 0 disables it), and handed out again to a request of at
// least half their size. New buffers are 2 MiB-aligned and advised MADV_HUGEPAGE (advisory only).
class BufferCache {
 public:
  static BufferCache& get() {
    static BufferCache* c = new BufferCache();  // never destroyed: tensors may outlive main()
    return *c;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    const size_t bytes = static_cast<size_t>(n) * opts.dtype().itemsize();
    if (bytes < kMinBytes || cap_ == 0) return at::empty(sizes, opts);
    auto [p, cap] = take(bytes);
    if (p == nullptr) {
      cap = (bytes + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, cap);
      if (p == nullptr) return at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      (void)madvise(p, cap, MADV_HUGEPAGE);
#endif
    }
    return at::from_blob(
        p, sizes, [this, cap](void* q) { give(q, cap); }, opts.device(at::kCPU));
  }

 private:
  static constexpr size_t kHuge = size_t{1} << 21;
  static constexpr size_t kMinBytes = size_t{1} << 22;  // smaller ones: plain at::empty

  BufferCache() {
    const char* e = std::getenv("TSPRUNE_CPU_CACHE_MB");
    long mb = 256;
    if (e != nullptr && *e != '\0') mb = std::max(0L, std::strtol(e, nullptr, 10));
    cap_ = static_cast<size_t>(mb) << 20;
  }

  // Smallest cached buffer with bytes <= capacity <= 2 * bytes, removed from the cache
  // ({nullptr, 0} if none).
  std::pair<void*, size_t> take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i) {
      const size_t c = free_[i].second;
      if (c >= bytes && c <= 2 * bytes && (best == free_.size() || c < free_[best].second)) best = i;
    }
    if (best == free_.size()) return {nullptr, 0};
    const std::pair<void*, size_t> b = free_[best];
    total_ -= b.second;
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    return b;
  }

  void give(void* p, size_t cap) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      free_.emplace_back(p, cap);
      total_ += cap;
      while (total_ > cap_ && !free_.empty()) {  // oldest first
        drop.push_back(free_.front().first);
        total_ -= free_.front().second;
        free_.erase(free_.begin());
      }
    }
    for (void* q : drop) std::free(q);
  }

  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t total_ = 0, cap_ = 0;
};

// For the channels zc of y [R, C] (a GEMM output holding y_pre there): ypz[r, j] = y[r, zc[j]],
// then y[r, zc[j]] = y_pre * mz[j]. One pass over the rows of y.
template <typename T>
void split_zero_cols(T* y, int64_t R, int64_t C, const ZeroCols& zc,
                     const std::vector<double>& mz, T* ypz) {
  using A = acc_type_t<T>;
  const int64_t Z = zc.size();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    // Per 16-channel chunk holding zero channels: compress them into ypz's row (masked store,
    // exactly Z values per row) and store y_pre * m on those lanes only.
    std::vector<float> mch(static_cast<size_t>(C), 1.0f);
    for (int64_t j = 0; j < Z; ++j) mch[zc.idx[j]] = static_cast<float>(mz[j]);
    const float* mp = mch.data();
    const int nt = detail::threads_for(R * Z);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      float* yr = y + r * C;
      float* zr = ypz + r * Z;
      int64_t pos = 0;
      for (int64_t i = 0; i * 16 < C; ++i) {
        const __mmask16 m = zc.chunk[static_cast<size_t>(i)];
        if (!m) continue;
        const __m512 v = _mm512_maskz_loadu_ps(m, yr + i * 16);
        const int n = __builtin_popcount(static_cast<unsigned>(m));
        _mm512_mask_storeu_ps(zr + pos, __mmask16((1u << n) - 1), _mm512_maskz_compress_ps(m, v));
        _mm512_mask_storeu_ps(yr + i * 16, m,
                              _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, mp + i * 16)));
        pos += n;
      }
    }
    return;
  }
#endif
  std::vector<A> m(mz.begin(), mz.end());
  const int32_t* __restrict zi = zc.idx.data();
  const A* __restrict mp = m.data();
  const int nt = detail::threads_for(R * Z);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    T* __restrict yr = y + r * C;
    T* __restrict zr = ypz + r * Z;
    for (int64_t j = 0; j < Z; ++j) {
      const T v = yr[zi[j]];
      zr[j] = v;
      yr[zi[j]] = static_cast<T>(static_cast<A>(v) * mp[j]);
    }
  }
}

std::vector<double> expand_channels(const UnitMask& um, int64_t width) {
  std::vector<double> e(width);
  for (int64_t c = 0; c < width; ++c) e[c] = um.channel(c);
  return e;
}

// New tensor W * rs[:, None] * cs[None, :] (W contiguous 2-D).
at::Tensor scaled_copy(const at::Tensor& w, const double* rs, const double* cs) {
  at::Tensor out = at::empty(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "tsprune_scale", [&] {
    scale_rows_cols<scalar_t>(w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), w.size(0),
                              w.size(1), rs, cs);
  });
  return out;
}

void scale_inplace(at::Tensor& w, const double* rs, const double* cs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "tsprune_scale", [&] {
    scale_rows_cols<scalar_t>(w.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), w.size(0),
                              w.size(1), rs, cs);
  });
}

// Runs a PairReduce on 2-D contiguous tensors a, b (b may be undefined). bz (optional, with zc
// and zunit): the zero channels, see PairReduce.
void pair_reduce(const at::Tensor& a, const at::Tensor& b, int64_t tps, int64_t block,
                 const double* inv, double* sum, double* sq, double* colsum,
                 const at::Tensor& bz = at::Tensor(), const ZeroCols* zc = nullptr,
                 const std::vector<int64_t>* zunit = nullptr) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "tsprune_reduce", [&] {
    PairReduce<scalar_t> pr;
    pr.a = a.data_ptr<scalar_t>();
    pr.lda = a.stride(0);
    if (b.defined()) {
      pr.b = b.data_ptr<scalar_t>();
      pr.ldb = b.stride(0);
    }
    if (bz.defined() && zc != nullptr && zc->size() > 0) {
      pr.bz = bz.data_ptr<scalar_t>();
      pr.ldbz = bz.stride(0);
      pr.zc = zc;
      pr.zunit = zunit->data();
    }
    pr.rows = a.size(0);
    pr.C = a.size(1);
    pr.tps = tps;
    pr.block = block;
    pr.inv = inv;
    pr.sum = sum;
    pr.sq = sq;
    pr.colsum = colsum;
    pr.run();
  });
}

void check_float_dtype(const at::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), "tsprune: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "tsprune: ", name, " has dtype ", t.scalar_type(),
              ", expected ", dt, " (x, weight, bias and grads must share one dtype)");
}

void check_supported(at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "tsprune: unsupported dtype ", dt, " (float32, float64, bfloat16, float16)");
}

// Validates an accumulator (acc_* / sq_*): float32/float64, 1-D, `units` entries.
void check_acc(const std::optional<at::Tensor>& t, int64_t units, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu(), "tsprune: ", name, " must be a CPU tensor");
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "tsprune: ",
              name, " must be float32 or float64, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->numel() == units, "tsprune: ", name, " must be 1-D with ",
              units, " entries, got shape ", t->sizes());
}

// acc[u] += v[u] for a 1-D float32/float64 tensor (any stride).
void add_into(const at::Tensor& acc, const std::vector<double>& v) {
  const int64_t n = acc.numel(), st = acc.stride(0);
  if (acc.scalar_type() == at::kFloat) {
    float* p = acc.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) p[i * st] = static_cast<float>(p[i * st] + v[i]);
  } else {
    double* p = acc.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) p[i * st] += v[i];
  }
}

at::Tensor to_tensor(const std::vector<double>& v, at::ScalarType dt) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, dt);
  if (dt == at::kDouble) {
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
  } else {
    float* p = t.data_ptr<float>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  }
  return t;
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Wf = expand(m_out)[:, None] * W * expand(m_in)[None, :]; W itself when both masks are absent
// or all ones.
at::Tensor folded_weight(const at::Tensor& w, const UnitMask& mi, const UnitMask& mo) {
  if (!mi.folds() && !mo.folds()) return w;
  std::vector<double> ei, eo;
  if (mi.folds()) ei = expand_channels(mi, w.size(1));
  if (mo.folds()) eo = expand_channels(mo, w.size(0));
  return scaled_copy(w, mo.folds() ? eo.data() : nullptr, mi.folds() ? ei.data() : nullptr);
}

}  // namespace

// ============================================================================================
namespace {

// keep: when mask_out has zero units Z, also return y_pre[:, Z] ([T, |Z| * block_out]); else an
// empty [T, 0] second result.
std::vector<at::Tensor> masked_linear_fwd_impl(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& mask_in,
                                               const std::optional<at::Tensor>& mask_out,
                                               int64_t block_in, int64_t block_out, bool keep) {
  const at::ScalarType dt = x.scalar_type();
  check_supported(dt);
  check_float_dtype(x, "x", dt);
  check_float_dtype(weight, "weight", dt);
  TORCH_CHECK(x.dim() == 2, "tsprune: masked_linear_fwd expects x of shape [T, K], got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "tsprune: weight must be [N, K] with K = ", x.size(1), ", got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  if (has(bias)) {
    check_float_dtype(*bias, "bias", dt);
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N, "tsprune: bias must be [", N,
                "], got ", bias->sizes());
  }
  const double th = zero_threshold(dt);
  const UnitMask mi = read_mask(mask_in, K, block_in, "mask_in", th);
  const UnitMask mo = read_mask(mask_out, N, block_out, "mask_out", th);
  const at::Tensor xc = x.contiguous();
  const int64_t T = x.size(0);
  if (!keep || mo.zero.empty() || T == 0) {
    const at::Tensor wf = folded_weight(weight.contiguous(), mi, mo);
    at::Tensor y;
    if (!has(bias)) {
      y = at::mm(xc, wf.t());
    } else {
      at::Tensor bf = bias->contiguous();
      if (mo.folds()) {
        std::vector<double> eo = expand_channels(mo, N);
        bf = scaled_copy(bf.view({1, N}), nullptr, eo.data()).view({N});
      }
      y = at::addmm(bf, xc, wf.t());
    }
    return {y, at::empty({T, 0}, x.options())};
  }
  // Fold m_out' = m_out with the zero units set to 1: the GEMM leaves y_pre in their columns,
  // which are copied out and then scaled by their own (zero, tiny or non-finite) mask values.
  UnitMask mo1 = mo;
  for (int64_t u : mo1.zero) mo1.m[static_cast<size_t>(u)] = 1.0;
  mo1.all_ones = std::all_of(mo1.m.begin(), mo1.m.end(), [](double v) { return v == 1.0; });
  const at::Tensor wf = folded_weight(weight.contiguous(), mi, mo1);
  at::Tensor y;
  if (!has(bias)) {
    y = at::mm(xc, wf.t());
  } else {
    at::Tensor bf = bias->contiguous();
    if (mo1.folds()) {
      std::vector<double> eo = expand_channels(mo1, N);
      bf = scaled_copy(bf.view({1, N}), nullptr, eo.data()).view({N});
    }
    y = at::addmm(bf, xc, wf.t());
  }
  const ZeroCols zc = make_zero_cols(unit_channel_list(mo.zero, block_out), N);
  std::vector<double> mz(static_cast<size_t>(zc.size()));
  for (int64_t j = 0; j < zc.size(); ++j) mz[j] = mo.channel(zc.idx[j]);
  at::Tensor ypz = BufferCache::get().empty({T, zc.size()}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "tsprune_split_zero", [&] {
    split_zero_cols<scalar_t>(y.data_ptr<scalar_t>(), T, N, zc, mz, ypz.data_ptr<scalar_t>());
  });
  return {y, ypz};
}

}  // namespace

at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mask_in,
                             const std::optional<at::Tensor>& mask_out, int64_t block_in,
                             int64_t block_out) {
  return masked_linear_fwd_impl(x, weight, bias, mask_in, mask_out, block_in, block_out, false)[0];
}

std::vector<at::Tensor> masked_linear_fwd_keep(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& mask_in,
                                               const std::optional<at::Tensor>& mask_out,
                                               int64_t block_in, int64_t block_out) {
  return masked_linear_fwd_impl(x, weight, bias, mask_in, mask_out, block_in, block_out, true);
}

// ============================================================================================
std::vector<at::Tensor> masked_linear_bwd(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out, const std::optional<at::Tensor>& y_pre_zero) {
  const bool need_x = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2],
             need_mask_in = output_mask[3], need_mask_out = output_mask[4];
  const at::ScalarType dt = x.scalar_type();
  check_supported(dt);
  check_float_dtype(x, "x", dt);
  check_float_dtype(gy, "grad_y", dt);
  check_float_dtype(weight, "weight", dt);
  TORCH_CHECK(x.dim() == 2, "tsprune: masked_linear_bwd expects x of shape [T, K], got ",
              x.sizes());
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "tsprune: weight must be [N, ", K,
              "], got ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == T && gy.size(1) == N,
              "tsprune: grad_y must be [", T, ", ", N, "], got ", gy.sizes());
  if (has(bias)) {
    check_float_dtype(*bias, "bias", dt);
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N, "tsprune: bias must be [", N,
                "], got ", bias->sizes());
  }
  const double th = zero_threshold(dt);
  const UnitMask mi = read_mask(mask_in, K, block_in, "mask_in", th);
  const UnitMask mo = read_mask(mask_out, N, block_out, "mask_out", th);
  TORCH_CHECK(mi.present || (!has(acc_in) && !has(sq_in)),
              "tsprune: acc_in / sq_in given but the layer has no mask_in");
  TORCH_CHECK(mo.present || (!has(acc_out) && !has(sq_out)),
              "tsprune: acc_out / sq_out given but the layer has no mask_out");
  const int64_t Ui = mi.present ? K / block_in : 0, Uo = mo.present ? N / block_out : 0;
  check_acc(acc_in, Ui, "acc_in");
  check_acc(sq_in, Ui, "sq_in");
  check_acc(acc_out, Uo, "acc_out");
  check_acc(sq_out, Uo, "sq_out");

  const bool want_min = mi.present && (need_mask_in || has(acc_in) || has(sq_in));
  const bool want_mout = mo.present && (need_mask_out || has(acc_out) || has(sq_out));
  const bool want_sq_in = want_min && has(sq_in), want_sq_out = want_mout && has(sq_out);
  if (want_sq_in || want_sq_out) {
    TORCH_CHECK(tokens_per_sample >= 1 && T % tokens_per_sample == 0,
                "tsprune: tokens_per_sample (", tokens_per_sample,
                ") must be >= 1 and divide the number of tokens (", T, ")");
  }
  const bool bias_grad = need_bias && has(bias);
  const at::ScalarType mdt = dt == at::kDouble ? at::kDouble : at::kFloat;

  const at::Tensor gyc = gy.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor yc;
  if (want_mout) {
    check_float_dtype(y, "y", dt);
    TORCH_CHECK(y.dim() == 2 && y.size(0) == T && y.size(1) == N, "tsprune: y must be [", T,
                ", ", N, "], got ", y.sizes());
    yc = y.contiguous();
  }

  std::vector<at::Tensor> out(5);

  // dx = gy @ Wf (also needed for dmask_in). When mask_in has zero units, dx holds no trace of
  // dxm there; then compute dxm = gy @ (W * m_out) instead (m_in NOT folded): the input-side
  // gradient is exact at every unit without a second GEMM, and dx = dxm * m_in is one column
  // scaling pass over [T, K] after the reduction.
  const bool dxm_path = want_min && !mi.zero.empty();
  at::Tensor dx;
  if (need_x || want_min) {
    static const UnitMask kNoMask;
    const at::Tensor wf = folded_weight(wc, dxm_path ? kNoMask : mi, mo);
    dx = at::mm(gyc, wf);
  }

  // ---- output side: sum_t gy * y (/ m_out) per unit, fused with colsum(gy) for dbias ----
  // Zero units with y_pre[:, Z] kept by the forward (masked_linear_fwd_keep): sum_t gy * y_pre in
  // the same pass (gy's zero channels gathered from the row already loaded), no division.
  at::Tensor ypz;
  if (want_mout && !mo.zero.empty() && has(y_pre_zero) && y_pre_zero->numel() > 0 &&
      N <= INT32_MAX) {  // (ZeroCols indices are int32)
    const int64_t nzc = static_cast<int64_t>(mo.zero.size()) * block_out;
    check_float_dtype(*y_pre_zero, "y_pre_zero", dt);
    TORCH_CHECK(y_pre_zero->dim() == 2 && y_pre_zero->size(0) == T && y_pre_zero->size(1) == nzc,
                "tsprune: y_pre_zero must be [", T, ", ", nzc, "] (the channels of the ",
                mo.zero.size(), " zero units of mask_out), got ", y_pre_zero->sizes(),
                "; was mask_out changed between forward and backward?");
    ypz = y_pre_zero->contiguous();
  }
  ZeroCols zc_out;
  if (ypz.defined()) zc_out = make_zero_cols(unit_channel_list(mo.zero, block_out), N);
  std::vector<double> so, qo, cso;
  if (want_mout || bias_grad) {
    if (want_mout) so.assign(Uo, 0.0);
    if (want_sq_out) qo.assign(Uo, 0.0);
    if (bias_grad) cso.assign(N, 0.0);
    pair_reduce(gyc, want_mout ? yc : at::Tensor(), tokens_per_sample, mo.present ? block_out : 1,
                mo.present ? mo.inv.data() : nullptr, want_mout ? so.data() : nullptr,
                want_sq_out ? qo.data() : nullptr, bias_grad ? cso.data() : nullptr, ypz,
                ypz.defined() ? &zc_out : nullptr, ypz.defined() ? &mo.zero : nullptr);
  }
  if (want_mout && !mo.zero.empty() && !ypz.defined()) {
    // Fallback (forward without kept columns): recompute them with a restricted GEMM.
    // y_pre[:, Z] = x @ (W[Z] * expand(m_in)).T + b[Z]
    const at::Tensor idx = unit_channels(mo.zero, block_out);
    at::Tensor wz = wc.index_select(0, idx);
    if (mi.folds()) {
      std::vector<double> ei = expand_channels(mi, K);
      scale_inplace(wz, nullptr, ei.data());
    }
    const at::Tensor ypz = has(bias) ? at::addmm(bias->index_select(0, idx), xc, wz.t())
                                     : at::mm(xc, wz.t());
    const at::Tensor gyz = gyc.index_select(1, idx);
    const size_t nz = mo.zero.size();
    std::vector<double> zs(nz), zq(want_sq_out ? nz : 0);
    pair_reduce(gyz, ypz, tokens_per_sample, block_out, nullptr, zs.data(),
                want_sq_out ? zq.data() : nullptr, nullptr);
    for (size_t i = 0; i < nz; ++i) {
      so[mo.zero[i]] = zs[i];
      if (want_sq_out) qo[mo.zero[i]] = zq[i];
    }
  }

  // ---- input side: sum_t dx * x (/ m_in) per unit ----
  std::vector<double> si, qi;
  if (want_min) {
    si.assign(Ui, 0.0);
    if (want_sq_in) qi.assign(Ui, 0.0);
    pair_reduce(dx, xc, tokens_per_sample, block_in, dxm_path ? nullptr : mi.inv.data(), si.data(),
                want_sq_in ? qi.data() : nullptr, nullptr);
    if (dxm_path && need_x) {
      std::vector<double> ei = expand_channels(mi, K);
      scale_inplace(dx, nullptr, ei.data());  // dxm -> dx
    }
  }

  // ---- parameter gradients ----
  if (need_weight) {
    at::Tensor dw = at::mm(gyc.t(), xc);  // [N, K], fresh and contiguous
    if (mi.folds() || mo.folds()) {
      std::vector<double> ei, eo;
      if (mi.folds()) ei = expand_channels(mi, K);
      if (mo.folds()) eo = expand_channels(mo, N);
      scale_inplace(dw, mo.folds() ? eo.data() : nullptr, mi.folds() ? ei.data() : nullptr);
    }
    out[1] = dw;
  }
  if (bias_grad) {
    at::Tensor db = at::empty({N}, bias->options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "tsprune_dbias", [&] {
      scalar_t* p = db.data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n)
        p[n] = static_cast<scalar_t>(mo.present ? cso[n] * mo.channel(n) : cso[n]);
    });
    out[2] = db;
  }

  // ---- mask gradients ----
  if (want_min) {
    if (need_mask_in) out[3] = to_tensor(si, mdt);
    if (has(acc_in)) add_into(*acc_in, si);
    if (want_sq_in) add_into(*sq_in, qi);
  }
  if (want_mout) {
    if (need_mask_out) out[4] = to_tensor(so, mdt);
    if (has(acc_out)) add_into(*acc_out, so);
    if (want_sq_out) add_into(*sq_out, qo);
  }
  if (need_x) out[0] = dx;
  return out;
}

// ============================================================================================
void act_sq_accumulate_(const at::Tensor& x, const at::Tensor& acc) {
  TORCH_CHECK(x.device().is_cpu(), "tsprune: act_sq_accumulate_: x must be a CPU tensor");
  check_supported(x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "tsprune: act_sq_accumulate_ expects x of shape [T, K], got ",
              x.sizes());
  check_acc(acc, x.size(1), "acc");
  const at::Tensor xc = x.contiguous();
  std::vector<double> s(x.size(1), 0.0);
  pair_reduce(xc, xc, 0, 1, nullptr, s.data(), nullptr, nullptr);
  add_into(acc, s);
}

}  // namespace tsprune
