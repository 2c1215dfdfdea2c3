// C++ tests of the tsprune CPU kernels against straightforward ATen reference computations in
// float64, on random inputs with odd shapes. Plain main: prints "N passed, N failed" and returns
// nonzero on failure. Built and run by CMake / ctest (scripts/build_check.sh).

#include "cpu/ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace {

int g_passed = 0;
int g_failed = 0;

void report(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// max |a - b| / max(max |b|, floor) (b is the float64 reference).
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  if (ad.sizes() != bd.sizes()) return std::numeric_limits<double>::infinity();
  if (bd.numel() == 0) return 0.0;
  const double scale = std::max(bd.abs().max().item<double>(), 1e-12);
  return (ad - bd).abs().max().item<double>() / scale;
}

void expect_close(const at::Tensor& got, const at::Tensor& ref, double tol, const std::string& what) {
  if (!got.defined()) {
    report(false, what + ": result undefined");
    return;
  }
  const double e = rel_err(got, ref);
  std::ostringstream os;
  os << what << ": rel err " << e << " > tol " << tol;
  report(e <= tol, os.str());
}

// Runs f and reports whether it threw a c10::Error whose message contains `needle`.
void expect_error(const std::function<void()>& f, const std::string& needle, const std::string& what) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    report(msg.find(needle) != std::string::npos,
           what + ": error message lacks '" + needle + "': " + msg.substr(0, 200));
    return;
  }
  report(false, what + ": no error raised");
}

const char* dtype_name(at::ScalarType dt) { return c10::toString(dt); }

double tol_for(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 2e-4;
    case at::kHalf: return 6e-3;
    default: return 4e-2;  // bfloat16
  }
}

at::Tensor expand(const at::Tensor& m, int64_t block) {
  return m.to(at::kDouble).repeat_interleave(block);
}

// ------------------------------------------------------------------------------------------------
// masked_linear
// ------------------------------------------------------------------------------------------------
struct LinCase {
  int64_t ns, tps, K, N, bi, bo;
};

void test_masked_linear_case(at::ScalarType dt, const LinCase& c, bool with_bias, bool with_in,
                             bool with_out, bool with_sq, int ones = 0) {
  const int64_t T = c.ns * c.tps, K = c.K, N = c.N, Ui = K / c.bi, Uo = N / c.bo;
  std::ostringstream tag;
  tag << "masked_linear " << dtype_name(dt) << " T=" << T << " (" << c.ns << "x" << c.tps
      << ") K=" << K << " N=" << N << " bi=" << c.bi << " bo=" << c.bo << " bias=" << with_bias
      << " in=" << with_in << " out=" << with_out << " sq=" << with_sq << " ones=" << ones;
  const std::string name = tag.str();

  const at::Tensor x = at::randn({T, K}, at::kDouble).to(dt);
  const at::Tensor w = (at::randn({N, K}, at::kDouble) / std::sqrt(double(K))).to(dt);
  const at::Tensor b = at::randn({N}, at::kDouble).to(dt);
  const at::Tensor gy = at::randn({T, N}, at::kDouble).to(dt);
  std::optional<at::Tensor> bias, mi, mo;
  if (with_bias) bias = b;
  if (with_in) {
    at::Tensor m = at::rand({Ui}, at::kFloat) * 2 - 0.5;  // non-binary, some negative
    m.index_put_({0}, 0.0);                              // exact zero
    if (Ui > 2) m.index_put_({Ui - 1}, 1e-30);           // "near zero"
    if (Ui > 3) m.index_put_({1}, 1.0);
    mi = (ones & 1) ? at::ones({Ui}, at::kDouble) : m;
  }
  if (with_out) {
    at::Tensor m = (at::rand({Uo}, at::kDouble) * 1.5).to(at::kFloat);
    m.index_put_({Uo - 1}, 0.0);
    if (Uo > 2) m.index_put_({0}, -0.0);
    if (Uo > 4) m.index_put_({2}, 1.0);
    mo = (ones & 2) ? at::ones({Uo}, at::kFloat) : m;
  }

  // float64 reference
  const at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble), gyd = gy.to(at::kDouble);
  const at::Tensor ein = with_in ? expand(*mi, c.bi) : at::ones({K}, at::kDouble);
  const at::Tensor eout = with_out ? expand(*mo, c.bo) : at::ones({N}, at::kDouble);
  const at::Tensor xm = xd * ein;
  at::Tensor ypre = xm.mm(wd.t());
  if (with_bias) ypre = ypre + b.to(at::kDouble);
  const at::Tensor yref = ypre * eout;
  const at::Tensor go = gyd * eout;
  const at::Tensor dxm = go.mm(wd);
  const at::Tensor dx_ref = dxm * ein;
  const at::Tensor dw_ref = go.t().mm(xm);
  const at::Tensor db_ref = go.sum(0);
  const at::Tensor gmo = (gyd * ypre).view({c.ns, c.tps, Uo, c.bo}).sum({1, 3});  // [ns, Uo]
  const at::Tensor gmi = (dxm * xd).view({c.ns, c.tps, Ui, c.bi}).sum({1, 3});
  const at::Tensor dmo_ref = gmo.sum(0), dmi_ref = gmi.sum(0);
  const at::Tensor sqo_ref = gmo.pow(2).sum(0), sqi_ref = gmi.pow(2).sum(0);

  const double tol = tol_for(dt);
  const at::Tensor y = tsprune::masked_linear_fwd(x, w, bias, mi, mo, c.bi, c.bo);
  report(y.scalar_type() == dt, name + ": y dtype");
  expect_close(y, yref, tol, name + ": y");

  // Full set of gradients; accumulators are strided views into bigger buffers (stride 1,
  // nonzero offset), with nonzero initial contents.
  const at::ScalarType mdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor buf_in = at::full({Ui + 5}, 0.5, at::kFloat), buf_out = at::full({Uo + 3}, 0.25, at::kDouble);
  at::Tensor sqbuf_in = at::full({Ui + 2}, 1.0, at::kDouble), sqbuf_out = at::full({Uo + 1}, 2.0, at::kFloat);
  std::optional<at::Tensor> acc_in, acc_out, sq_in, sq_out;
  if (with_in) acc_in = buf_in.narrow(0, 3, Ui);
  if (with_out) acc_out = buf_out.narrow(0, 1, Uo);
  if (with_in && with_sq) sq_in = sqbuf_in.narrow(0, 2, Ui);
  if (with_out && with_sq) sq_out = sqbuf_out.narrow(0, 1, Uo);
  const std::vector<at::Tensor> g = tsprune::masked_linear_bwd(
      gy, x, y, w, bias, mi, mo, c.bi, c.bo, c.tps, {true, true, true, true, true}, acc_in,
      acc_out, sq_in, sq_out);
  report(g.size() == 5, name + ": 5 outputs");
  expect_close(g[0], dx_ref, tol, name + ": dx");
  expect_close(g[1], dw_ref, tol, name + ": dweight");
  if (with_bias) {
    expect_close(g[2], db_ref, tol, name + ": dbias");
  } else {
    report(!g[2].defined(), name + ": dbias undefined without bias");
  }
  const double mtol = dt == at::kFloat ? 5e-4 : tol;
  if (with_in) {
    report(g[3].scalar_type() == mdt, name + ": dmask_in dtype");
    expect_close(g[3], dmi_ref, mtol, name + ": dmask_in");
    expect_close(acc_in->to(at::kDouble) - 0.5, dmi_ref, std::max(mtol, 1e-6), name + ": acc_in");
    report(buf_in.narrow(0, 0, 3).eq(0.5).all().item<bool>() &&
               buf_in.narrow(0, 3 + Ui, 2).eq(0.5).all().item<bool>(),
           name + ": acc_in neighbours untouched");
    if (with_sq) expect_close(*sq_in - 1.0, sqi_ref, mtol, name + ": sq_in");
  } else {
    report(!g[3].defined(), name + ": dmask_in undefined without mask_in");
  }
  if (with_out) {
    report(g[4].scalar_type() == mdt, name + ": dmask_out dtype");
    expect_close(g[4], dmo_ref, mtol, name + ": dmask_out");
    expect_close(*acc_out - 0.25, dmo_ref, mtol, name + ": acc_out");
    if (with_sq) expect_close(sq_out->to(at::kDouble) - 2.0, sqo_ref, std::max(mtol, 1e-6), name + ": sq_out");
  } else {
    report(!g[4].defined(), name + ": dmask_out undefined without mask_out");
  }

  // v2b: the training forward keeps y_pre of the zero output units; the backward given it must
  // produce the same gradients (no restricted recompute), zero units included.
  if (with_out) {
    const std::vector<at::Tensor> fk = tsprune::masked_linear_fwd_keep(x, w, bias, mi, mo, c.bi, c.bo);
    report(fk.size() == 2, name + ": fwd_keep returns 2 tensors");
    expect_close(fk[0], yref, tol, name + ": y (fwd_keep)");
    const double th = dt == at::kHalf ? 1e-4 : 1e-20;
    const at::Tensor mod = mo->to(at::kDouble);
    const int64_t zu = (~(mod.abs() >= th)).sum().item<int64_t>();
    report(fk[1].dim() == 2 && fk[1].size(0) == T && fk[1].size(1) == zu * c.bo &&
               fk[1].scalar_type() == dt,
           name + ": y_pre_zero shape / dtype");
    const at::Tensor acc2 = at::zeros({Uo}, at::kDouble), sq2 = at::zeros({Uo}, at::kDouble);
    const std::vector<at::Tensor> k = tsprune::masked_linear_bwd(
        gy, x, fk[0], w, bias, mi, mo, c.bi, c.bo, c.tps, {true, false, false, with_in, false},
        std::nullopt, acc2, std::nullopt, with_sq ? std::optional<at::Tensor>(sq2) : std::nullopt,
        fk[1]);
    expect_close(k[0], dx_ref, tol, name + ": dx (kept y_pre)");
    if (with_in) expect_close(k[3], dmi_ref, mtol, name + ": dmask_in (kept y_pre)");
    expect_close(acc2, dmo_ref, mtol, name + ": acc_out (kept y_pre)");
    if (with_sq) expect_close(sq2, sqo_ref, std::max(mtol, 1e-6), name + ": sq_out (kept y_pre)");
    if (zu > 0) {  // the zero units themselves
      const at::Tensor z = (~(mod.abs() >= th)).nonzero().flatten();
      expect_close(acc2.index_select(0, z), dmo_ref.index_select(0, z),
                   std::max(mtol, 1e-6) * std::max(1.0, dmo_ref.abs().max().item<double>() /
                                                          std::max(dmo_ref.index_select(0, z).abs().max().item<double>(), 1e-12)),
                   name + ": acc_out at zero units (kept y_pre)");
    }
  }

  // Only the mask gradients: everything else undefined, mask gradients unchanged.
  if (with_in || with_out) {
    const std::vector<at::Tensor> h = tsprune::masked_linear_bwd(
        gy, x, y, w, bias, mi, mo, c.bi, c.bo, c.tps, {false, false, false, with_in, with_out},
        std::nullopt, std::nullopt, std::nullopt, std::nullopt);
    report(!h[0].defined() && !h[1].defined() && !h[2].defined(), name + ": unneeded grads undefined");
    if (with_in) expect_close(h[3], dmi_ref, mtol, name + ": dmask_in (mask grads only)");
    if (with_out) expect_close(h[4], dmo_ref, mtol, name + ": dmask_out (mask grads only)");
  }
}

void test_masked_linear() {
  const std::vector<LinCase> cases = {
      {3, 7, 10, 12, 2, 3},    // tiny, blocks
      {1, 37, 33, 20, 1, 4},   // one sample
      {40, 3, 64, 96, 8, 8},   // many samples
      {2, 1, 5, 3, 5, 1},      // one input unit
      {1, 2001, 66, 48, 2, 3}, // one long sample: parallel row segments
      {3, 701, 40, 64, 4, 1},  // few samples
      {517, 4, 32, 96, 8, 8},  // many samples: per-thread samples
  };
  for (at::ScalarType dt : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    for (size_t i = 0; i < cases.size(); ++i) {
      for (int cfg = 0; cfg < 4; ++cfg) {
        const bool with_in = cfg & 1, with_out = cfg & 2;
        test_masked_linear_case(dt, cases[i], /*bias=*/i % 2 == 0 || cfg == 3, with_in, with_out,
                                /*sq=*/i != 1);
      }
    }
  }

  // All-ones masks (nothing folded) next to non-binary ones.
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    for (int ones = 1; ones < 4; ++ones) {
      test_masked_linear_case(dt, cases[2], true, true, true, true, ones);
      test_masked_linear_case(dt, cases[4], false, true, true, true, ones);
    }
  }

  // No masks at all: plain addmm, and the bwd pieces.
  {
    const at::Tensor x = at::randn({17, 9}), w = at::randn({5, 9}), b = at::randn({5});
    const at::Tensor y = tsprune::masked_linear_fwd(x, w, b, std::nullopt, std::nullopt, 1, 1);
    expect_close(y, at::addmm(b.to(at::kDouble), x.to(at::kDouble), w.to(at::kDouble).t()), 1e-5,
                 "masked_linear no masks: y");
  }

  // Errors.
  const at::Tensor x = at::randn({6, 4}), w = at::randn({3, 4});
  expect_error([&] { tsprune::masked_linear_fwd(x, w.to(at::kDouble), std::nullopt, std::nullopt, std::nullopt, 1, 1); },
               "dtype", "masked_linear_fwd dtype mismatch");
  expect_error([&] { tsprune::masked_linear_fwd(x, w, std::nullopt, at::ones({3}), std::nullopt, 1, 1); },
               "mask_in", "masked_linear_fwd bad mask_in length");
  expect_error(
      [&] {
        tsprune::masked_linear_bwd(at::randn({6, 3}), x, at::randn({6, 3}), w, std::nullopt,
                                   std::nullopt, at::ones({3}), 1, 1, 4,
                                   {true, false, false, false, false}, std::nullopt, std::nullopt, std::nullopt,
                                   at::zeros({3}));
      },
      "tokens_per_sample", "masked_linear_bwd tokens_per_sample must divide T");
  expect_error(
      [&] {
        tsprune::masked_linear_bwd(at::randn({6, 3}), x, at::randn({6, 3}), w, std::nullopt,
                                   std::nullopt, std::nullopt, 1, 1, 1,
                                   {true, false, false, false, false}, at::zeros({4}), std::nullopt, std::nullopt, std::nullopt);
      },
      "no mask_in", "masked_linear_bwd acc_in without mask_in");
  expect_error(  // (no random draws here: the later thread-count rounds keep their inputs)
      [&] {
        const at::Tensor m = at::tensor({1.0, 0.0, 0.0}, at::kFloat);
        const std::vector<at::Tensor> f = tsprune::masked_linear_fwd_keep(x, w, std::nullopt, std::nullopt, m, 1, 1);
        tsprune::masked_linear_bwd(at::ones({6, 3}), x, f[0], w, std::nullopt, std::nullopt, m, 1,
                                   1, 1, {false, false, false, false, true}, std::nullopt,
                                   std::nullopt, std::nullopt, std::nullopt, f[1].narrow(1, 0, 1));
      },
      "y_pre_zero must be", "masked_linear_bwd y_pre_zero of the wrong width");
}

void test_act_sq() {
  for (at::ScalarType dt : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto shape : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {37, 19}, {3001, 45}}) {
      const at::Tensor x = at::randn({shape.first, shape.second}, at::kDouble).to(dt);
      const at::Tensor ref = x.to(at::kDouble).pow(2).sum(0);
      at::Tensor acc32 = at::full({shape.second}, 1.5, at::kFloat);
      at::Tensor acc64 = at::full({shape.second}, -2.0, at::kDouble);
      tsprune::act_sq_accumulate_(x, acc32);
      tsprune::act_sq_accumulate_(x, acc64);
      std::ostringstream os;
      os << "act_sq_accumulate_ " << dtype_name(dt) << " [" << shape.first << "," << shape.second << "]";
      // fp32 / bf16 / fp16 inputs accumulate in fp32, fp64 inputs in fp64.
      const double tol = dt == at::kDouble ? 1e-12 : 2e-5;
      expect_close(acc32, ref + 1.5, std::max(tol, 1e-6), os.str() + " acc fp32");
      expect_close(acc64, ref - 2.0, tol, os.str() + " acc fp64");
    }
  }
}

// ------------------------------------------------------------------------------------------------
// selection
// ------------------------------------------------------------------------------------------------
void test_kth() {
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    std::vector<at::Tensor> ts = {
        at::randn({101, 37}, at::kDouble).to(dt),
        (at::randn({5}, at::kDouble) * 1e-30).to(dt),  // tiny (subnormal / zero in half types)
        at::zeros({3}, dt),
        at::randn({70001}, at::kDouble).to(dt).slice(0, 0, 70001, 2),  // non-contiguous
        at::randint(-3, 4, {3, 5, 7}, at::kDouble).to(dt),           // many ties, zeros
        at::empty({0}, dt),
    };
    std::vector<at::Tensor> flat;
    for (const auto& t : ts) flat.push_back(t.reshape(-1).to(at::kDouble).abs());
    const at::Tensor all = at::cat(flat);
    const at::ScalarType out_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
    for (bool iz : {false, true}) {
      const at::Tensor v = std::get<0>((iz ? all.index({all.ne(0)}) : all).sort());
      const int64_t n = v.numel();
      for (int64_t k : {int64_t(1), int64_t(2), int64_t(7), n / 3, n / 2 + 1, n - 1, n}) {
        const at::Tensor got = tsprune::kth_smallest_abs(ts, k, iz);
        const double exp = v[k - 1].item<double>();
        std::ostringstream os;
        os << "kth_smallest_abs " << dtype_name(dt) << " ignore_zeros=" << iz << " k=" << k
           << ": got " << got.item<double>() << " expected " << exp;
        report(got.dim() == 0 && got.scalar_type() == out_dt && got.item<double>() == exp, os.str());
      }
      expect_error([&] { tsprune::kth_smallest_abs(ts, n + 1, iz); },
                   "k=" + std::to_string(n + 1) + " out of range [1, " + std::to_string(n) + "]",
                   "kth k > count");
      expect_error([&] { tsprune::kth_smallest_abs(ts, 0, iz); }, "k=0 out of range", "kth k = 0");
    }
    at::Tensor bad = at::randn({10}).to(dt);
    bad.index_put_({4}, std::numeric_limits<double>::quiet_NaN());
    expect_error([&] { tsprune::kth_smallest_abs({ts[0], bad}, 1, false); }, "non-finite",
                 std::string("kth NaN ") + dtype_name(dt));
  }
  // Mixed float32 / float64: float64 keys.
  const at::Tensor a = at::randn({1000}), b = at::randn({333}, at::kDouble);
  const at::Tensor v = std::get<0>(at::cat({a.to(at::kDouble), b}).abs().sort());
  const at::Tensor got = tsprune::kth_smallest_abs({a, b}, 500, false);
  report(got.scalar_type() == at::kDouble && got.item<double>() == v[499].item<double>(),
         "kth mixed float32/float64");
  expect_error([&] { tsprune::kth_smallest_abs({}, 1, false); }, "[1, 0]", "kth empty list");
}

// Reference prune: sort candidates by (|imp|, index).
int64_t prune_ref(at::Tensor& mask, at::Tensor& imp, int64_t k) {
  float* m = mask.data_ptr<float>();
  float* v = imp.data_ptr<float>();
  const int64_t n = mask.numel();
  std::vector<int64_t> cand;
  std::vector<char> kill(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (m[i] == 0.0f) continue;
    if (v[i] == 0.0f) {
      kill[i] = 1;
    } else {
      cand.push_back(i);
    }
  }
  std::stable_sort(cand.begin(), cand.end(),
                   [&](int64_t a, int64_t b) { return std::fabs(v[a]) < std::fabs(v[b]); });
  for (int64_t j = 0; j < std::min<int64_t>(k, cand.size()); ++j) kill[cand[j]] = 1;
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (kill[i]) {
      m[i] = 0.0f;
      v[i] = 0.0f;
      ++cnt;
    }
  }
  return cnt;
}

void test_prune() {
  for (int64_t n : {1, 2, 17, 1000, 300001}) {
    for (int variant = 0; variant < 3; ++variant) {
      at::Tensor mask = at::rand({n}).gt(0.3).to(at::kFloat) * (variant == 2 ? 0.5 : 1.0);
      at::Tensor imp;
      if (variant == 0) imp = at::randint(-4, 5, {n}, at::kFloat) * 0.25;  // many ties and zeros
      if (variant == 1) imp = at::randn({n});
      if (variant == 2) imp = at::randn({n}).round() * 1e-3;
      if (n > 3) {
        mask.index_put_({1}, -0.0);  // dead (negative zero)
        imp.index_put_({2}, -0.0);   // zero score (negative zero)
        mask.index_put_({2}, 1.0);
      }
      const int64_t live_nz = mask.ne(0).logical_and(imp.ne(0)).sum().item<int64_t>();
      for (int64_t k : {int64_t(0), int64_t(1), int64_t(3), n / 2, live_nz - 1, live_nz, n + 5}) {
        if (k < 0) continue;
        at::Tensor m1 = mask.clone(), i1 = imp.clone(), m2 = mask.clone(), i2 = imp.clone();
        const int64_t c1 = tsprune::prune_lowest_(m1, i1, k);
        const int64_t c2 = prune_ref(m2, i2, k);
        std::ostringstream os;
        os << "prune_lowest_ n=" << n << " variant=" << variant << " k=" << k << ": count " << c1
           << " vs " << c2;
        report(c1 == c2 && m1.equal(m2) && i1.equal(i2), os.str());
      }
    }
  }
  at::Tensor m = at::ones({5}), v = at::randn({5});
  v.index_put_({2}, std::numeric_limits<float>::quiet_NaN());
  expect_error([&] { tsprune::prune_lowest_(m, v, 1); }, "non-finite", "prune NaN");
  at::Tensor m3 = at::ones({5}), v3 = at::randn({6});
  expect_error([&] { tsprune::prune_lowest_(m3, v3, 1); }, "same length", "prune length mismatch");
}

// ------------------------------------------------------------------------------------------------
// repack
// ------------------------------------------------------------------------------------------------
void test_repack() {
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kBool,
                            at::kLong, at::kInt, at::kByte}) {
    auto mk = [&](at::IntArrayRef s) {
      at::Tensor r = at::randn(s, at::kDouble).mul(3);
      return (dt == at::kByte ? r.abs() : r).to(dt);
    };
    std::vector<at::Tensor> ts = {
        mk({7, 9}),
        mk({9, 5, 3}).transpose(0, 1),  // non-contiguous
        mk({11}),
        mk({4, 6, 2, 3}),
        mk({}),
        mk({301, 403}),
        mk({64, 130}),
        mk({5, 0}),
    };
    std::vector<std::optional<at::Tensor>> rows = {
        at::tensor({0, 3, 6, 1}, at::kLong), at::tensor({4, 0}, at::kLong),
        at::tensor({10, 2, 2}, at::kLong), std::nullopt, std::nullopt,
        std::get<0>(std::get<1>(at::rand({301}).sort()).slice(0, 0, 150).sort()), at::arange(64, at::kLong),
        at::tensor({4, 1}, at::kLong)};
    std::vector<std::optional<at::Tensor>> cols = {
        at::tensor({8, 0, 1, 2}, at::kLong), std::nullopt, std::nullopt,
        at::tensor({5, 1, 2}, at::kLong), std::nullopt,
        std::get<0>(std::get<1>(at::rand({403}).sort()).slice(0, 0, 200).sort()),  // sorted random
        at::cat({at::arange(3, 70, at::kLong), at::arange(100, 129, at::kLong)}),  // long runs
        at::empty({0}, at::kLong)};
    const std::vector<at::Tensor> out = tsprune::repack(ts, rows, cols);
    report(out.size() == ts.size(), std::string("repack count ") + dtype_name(dt));
    for (size_t i = 0; i < ts.size() && i < out.size(); ++i) {
      at::Tensor e = ts[i];
      if (rows[i]) e = e.index_select(0, *rows[i]);
      if (cols[i]) e = e.index_select(1, *cols[i]);
      std::ostringstream os;
      os << "repack " << dtype_name(dt) << " tensor " << i << " " << ts[i].sizes();
      report(out[i].is_contiguous() && out[i].sizes() == e.sizes() &&
                 out[i].scalar_type() == dt && out[i].equal(e) &&
                 (out[i].numel() == 0 || out[i].data_ptr() != ts[i].data_ptr()),
             os.str());
    }
  }
  const at::Tensor t = at::randn({3, 4});
  expect_error([&] { tsprune::repack({t}, {at::tensor({0, 3}, at::kLong)}, {std::nullopt}); },
               "index 3 out of range for size 3", "repack bad row index");
  expect_error([&] { tsprune::repack({t, t}, {std::nullopt, std::nullopt}, {std::nullopt, at::tensor({-1}, at::kLong)}); },
               "tensor 1", "repack bad col index names the tensor");
  expect_error([&] { tsprune::repack({at::randn({5})}, {std::nullopt}, {at::tensor({0}, at::kLong)}); },
               "keep_cols", "repack cols on a 1-D tensor");
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const int default_threads = at::get_num_threads();
  for (int nt : {std::max(default_threads, 2), 1, 3}) {
    at::set_num_threads(nt);
    std::printf("-- %d thread(s)\n", nt);
    test_masked_linear();
    test_act_sq();
    test_kth();
    test_prune();
    test_repack();
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
