// Masked Linear forward / backward on CPU (see docs/KERNELS.md, "CPU fast path"), and the
// activation statistic act_sq_accumulate_.
//
// GEMMs go through ATen (MKL). The mask-gradient reductions are our own OpenMP passes over rows
// with per-thread partial accumulators; no activation-sized temporary is created except the
// restricted recompute for OUTPUT units whose mask is (near) zero (|Z| / width of one GEMM);
// input units with zero masks get exact gradients from dxm = gy @ (W * m_out) instead.

#include "ops.h"
#include "kernel_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace tsprune {
namespace {

using detail::acc_type_t;
using detail::load_row;
using detail::ScratchRow;

// --------------------------------------------------------------------------------------------
// Pair reduction: for rows t and channels c of A [rows, C] and B [rows, C] (row strides lda/ldb),
//   per sample i (tps consecutive rows), per unit u (block consecutive channels):
//     g_i[u] = inv[u] * sum_{t in i} sum_{c in u} A[t, c] * B[t, c]
//   sum[u] = sum_i g_i[u],  sq[u] = sum_i g_i[u]^2,  colsum[c] = sum_t A[t, c].
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

  // Accumulate rows [r0, r1) into chan (A*B) and csum (A).
  void rows_into(int64_t r0, int64_t r1, A* chan, A* csum, ScratchRow<T>& sa,
                 ScratchRow<T>& sb) const {
    const bool prod = chan != nullptr;
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
    }
    for (; r < r1; ++r) {
      const A* a0 = load_row(a + r * lda, C, sa.p0());
      if (prod) {
        const A* b0 = load_row(b + r * ldb, C, sb.p0());
        A* __restrict ch = chan;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ch[c] += a0[c] * b0[c];
      }
      if (csum) {
        A* __restrict cs = csum;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) cs[c] += a0[c];
      }
    }
  }

  // Per-sample finalisation: channel sums (double) -> unit values -> sum / sq.
  template <typename S>
  void finish_sample(const S* chan, double* usum, double* usq) const {
    const int64_t U = C / block;
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
    const int64_t ns = per_sample ? rows / tps : 1;
    const int64_t srows = per_sample ? tps : rows;
    const int nt = detail::threads_for(rows * C);

    if (per_sample && ns >= nt) {
      // Many samples: each thread owns whole samples; unit-level partials per thread.
      std::vector<A> chan(static_cast<size_t>(nt) * C);
      std::vector<A> csum(colsum ? static_cast<size_t>(nt) * C : 0, A(0));
      std::vector<double> usum(static_cast<size_t>(nt) * U, 0.0), usq(usum.size(), 0.0);
      std::vector<int> used(nt, 0);
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        used[tid] = 1;
        ScratchRow<T> sa(C), sb(C);
        A* ch = chan.data() + static_cast<size_t>(tid) * C;
        A* cs = colsum ? csum.data() + static_cast<size_t>(tid) * C : nullptr;
        double* us = usum.data() + static_cast<size_t>(tid) * U;
        double* uq = usq.data() + static_cast<size_t>(tid) * U;
        const int64_t s0 = ns * tid / team, s1 = ns * (tid + 1) / team;
        for (int64_t s = s0; s < s1; ++s) {
          std::fill(ch, ch + C, A(0));
          rows_into(s * tps, (s + 1) * tps, ch, cs, sa, sb);
          finish_sample(ch, sum ? us : nullptr, uq);
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
    std::vector<A> part(prod ? static_cast<size_t>(tasks) * C : 0);
    std::vector<A> cpart(colsum ? static_cast<size_t>(tasks) * C : 0);
#pragma omp parallel num_threads(nt)
    {
      ScratchRow<T> sa(C), sb(C);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t s = task / S, j = task % S;
        const int64_t r0 = s * srows + srows * j / S, r1 = s * srows + srows * (j + 1) / S;
        A* ch = prod ? part.data() + static_cast<size_t>(task) * C : nullptr;
        A* cs = colsum ? cpart.data() + static_cast<size_t>(task) * C : nullptr;
        if (ch) std::fill(ch, ch + C, A(0));
        if (cs) std::fill(cs, cs + C, A(0));
        rows_into(r0, r1, ch, cs, sa, sb);
      }
    }
    if (prod) {
      std::vector<double> tot(C);
      for (int64_t s = 0; s < ns; ++s) {
        std::fill(tot.begin(), tot.end(), 0.0);
        for (int64_t j = 0; j < S; ++j) {
          const A* p = part.data() + static_cast<size_t>(s * S + j) * C;
          for (int64_t c = 0; c < C; ++c) tot[c] += static_cast<double>(p[c]);
        }
        finish_sample(tot.data(), sum, sq);
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

// Runs a PairReduce on 2-D contiguous tensors a, b (b may be undefined).
void pair_reduce(const at::Tensor& a, const at::Tensor& b, int64_t tps, int64_t block,
                 const double* inv, double* sum, double* sq, double* colsum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "tsprune_reduce", [&] {
    PairReduce<scalar_t> pr;
    pr.a = a.data_ptr<scalar_t>();
    pr.lda = a.stride(0);
    if (b.defined()) {
      pr.b = b.data_ptr<scalar_t>();
      pr.ldb = b.stride(0);
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
at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mask_in,
                             const std::optional<at::Tensor>& mask_out, int64_t block_in,
                             int64_t block_out) {
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
  const at::Tensor wf = folded_weight(weight.contiguous(), mi, mo);
  if (!has(bias)) return at::mm(xc, wf.t());
  at::Tensor bf = bias->contiguous();
  if (mo.folds()) {
    std::vector<double> eo = expand_channels(mo, N);
    bf = scaled_copy(bf.view({1, N}), nullptr, eo.data()).view({N});
  }
  return at::addmm(bf, xc, wf.t());
}

// ============================================================================================
std::vector<at::Tensor> masked_linear_bwd(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, bool need_x, bool need_weight, bool need_bias, bool need_mask_in,
    bool need_mask_out, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out) {
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
  std::vector<double> so, qo, cso;
  if (want_mout || bias_grad) {
    if (want_mout) so.assign(Uo, 0.0);
    if (want_sq_out) qo.assign(Uo, 0.0);
    if (bias_grad) cso.assign(N, 0.0);
    pair_reduce(gyc, want_mout ? yc : at::Tensor(), tokens_per_sample, mo.present ? block_out : 1,
                mo.present ? mo.inv.data() : nullptr, want_mout ? so.data() : nullptr,
                want_sq_out ? qo.data() : nullptr, bias_grad ? cso.data() : nullptr);
  }
  if (want_mout && !mo.zero.empty()) {
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
