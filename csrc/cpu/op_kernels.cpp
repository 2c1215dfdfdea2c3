// The CPU kernels of the tsprune:: torch ops (schemas: tsprune_kernels/_library.py), registered
// with the dispatcher here (TORCH_LIBRARY_IMPL(tsprune, CPU)) and bound to Python by bindings.cpp.
//
// The fast kernels (masked_linear.cpp, select.cpp, repack.cpp) have narrow preconditions (non-empty
// dimensions, contiguous fp32 prune buffers, a stride-1 accumulator). An op kernel must accept
// every input the op's schema admits, so these entry points route the rest to ATen code that runs
// exactly the operations of the torch backend (tsprune_kernels/torch_impl.py), giving the same
// numbers: empty dimensions of masked_linear (formulas, no division by mask values), prune_lowest_
// on other dtypes or layouts, act_sq_accumulate_ into a strided accumulator.

#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace tsprune {
namespace {

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// t * expand(mask) along the last dim (expand repeats each entry over `block` channels), as the
// torch backend's apply_block_mask: [..., units, block] * m[:, None] in t's dtype.
at::Tensor apply_block_mask(const at::Tensor& t, const std::optional<at::Tensor>& mask,
                            int64_t block) {
  if (!has(mask)) return t;
  const auto shape = t.sizes().vec();
  return (t.unflatten(-1, {mask->numel(), block}) * mask->to(t.scalar_type()).unsqueeze(-1))
      .reshape(shape);
}

bool empty_dims(const at::Tensor& x, const at::Tensor& weight) {
  return x.size(0) == 0 || x.size(1) == 0 || weight.size(0) == 0;
}

// [T, C] (acc dtype) -> [samples, C / block]; no tokens: nothing to add.
at::Tensor per_sample_sums(const at::Tensor& prod, int64_t T, int64_t tps, int64_t block,
                           at::ScalarType acc_t) {
  const int64_t units = prod.size(1) / block;
  if (T == 0 || tps <= 0) return at::zeros({0, units}, prod.options().dtype(acc_t));
  return prod.to(acc_t).view({T / tps, tps, units, block}).sum({1, 3});
}

void accumulate(const std::optional<at::Tensor>& acc, const std::optional<at::Tensor>& sq,
                const at::Tensor& total, const at::Tensor& per) {
  if (has(acc)) acc->add_(total.to(acc->scalar_type()));
  if (has(sq)) sq->add_(per.square().sum(0).to(sq->scalar_type()));
}

// Backward by the formula (the torch backend's masked_linear_bwd_direct): the path for empty
// dimensions, where it matches F.linear's gradients and leaves accumulators unchanged.
std::vector<at::Tensor> masked_linear_bwd_direct(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out) {
  const bool need_x = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2],
             need_mask_in = output_mask[3], need_mask_out = output_mask[4];
  const auto acc_t = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t T = x.size(0);
  const at::Tensor xm = apply_block_mask(x, mask_in, block_in);
  const at::Tensor gym = apply_block_mask(gy, mask_out, block_out);
  std::vector<at::Tensor> out(5);
  if (has(mask_in) && (need_mask_in || has(acc_in) || has(sq_in))) {
    const at::Tensor per = per_sample_sums(gym.matmul(weight).to(acc_t) * x.to(acc_t), T,
                                           tokens_per_sample, block_in, acc_t);
    const at::Tensor total = per.sum(0);
    accumulate(acc_in, sq_in, total, per);
    if (need_mask_in) out[3] = total;
  }
  if (has(mask_out) && (need_mask_out || has(acc_out) || has(sq_out))) {
    const at::Tensor per = per_sample_sums(gy.to(acc_t) * at::linear(xm, weight, bias).to(acc_t),
                                           T, tokens_per_sample, block_out, acc_t);
    const at::Tensor total = per.sum(0);
    accumulate(acc_out, sq_out, total, per);
    if (need_mask_out) out[4] = total;
  }
  if (need_x) out[0] = apply_block_mask(gym.matmul(weight), mask_in, block_in);
  if (need_weight) out[1] = gym.t().matmul(xm);
  if (need_bias) out[2] = gym.sum(0);
  return out;
}

// Undefined (not asked for) -> an empty tensor: the op returns Tensors, never None.
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_linear_fwd_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& mask_out,
    int64_t block_in, int64_t block_out, bool keep_zero_pre) {
  at::Tensor none = at::empty({x.size(0), 0}, x.options());
  if (empty_dims(x, weight)) {  // F.linear semantics with the masks folded in
    at::Tensor w = apply_block_mask(weight, mask_in, block_in);
    std::optional<at::Tensor> b = bias;
    if (has(mask_out)) {
      w = apply_block_mask(w.t(), mask_out, block_out).t();
      if (has(bias)) b = apply_block_mask(*bias, mask_out, block_out);
    }
    return {at::linear(x, w, b), none};
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  if (keep_zero_pre && has(mask_out)) {
    auto r = masked_linear_fwd_keep(xc, wc, bias, mask_in, mask_out, block_in, block_out);
    return {r[0], r[1]};
  }
  return {masked_linear_fwd(xc, wc, bias, mask_in, mask_out, block_in, block_out), none};
}

std::vector<at::Tensor> masked_linear_bwd_op(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out, const std::optional<at::Tensor>& y_pre_zero) {
  if (empty_dims(x, weight)) {
    return masked_linear_bwd_direct(gy, x, weight, bias, mask_in, mask_out, block_in, block_out,
                                    tokens_per_sample, output_mask, acc_in, acc_out, sq_in, sq_out);
  }
  return masked_linear_bwd(gy.contiguous(), x, y, weight, bias, mask_in, mask_out, block_in,
                           block_out, tokens_per_sample, output_mask, acc_in, acc_out, sq_in,
                           sq_out, y_pre_zero);
}

int64_t prune_lowest_op(const at::Tensor& mask, const at::Tensor& imp, int64_t k) {
  if (mask.scalar_type() == at::kFloat && imp.scalar_type() == at::kFloat &&
      mask.is_contiguous() && imp.is_contiguous()) {
    return prune_lowest_(mask, imp, k);
  }
  // Other dtypes / layouts: the torch backend's algorithm (exact selection, same result).
  const at::Tensor live = mask.ne(0);
  const at::Tensor a = imp.abs();
  const at::Tensor cand = live.logical_and(a.ne(0));
  at::Tensor sel = live.logical_and(a.eq(0));
  k = std::min(k, cand.sum().item<int64_t>());
  if (k > 0) {
    const at::Tensor t = kth_smallest_abs({a.masked_select(cand)}, k, false);
    const at::Tensor less = cand.logical_and(a.lt(t));
    const at::Tensor tie = cand.logical_and(a.eq(t));
    const int64_t need = k - less.sum().item<int64_t>();
    sel = sel.logical_or(less).logical_or(tie.logical_and(tie.cumsum(0).le(need)));
  }
  mask.masked_fill_(sel, 0);
  imp.masked_fill_(sel, 0);
  return sel.sum().item<int64_t>();
}

void act_sq_accumulate_op(const at::Tensor& x, const at::Tensor& acc) {
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (acc.is_contiguous()) {
    act_sq_accumulate_(x2.contiguous(), acc);
  } else {  // a strided accumulator: the torch backend's one-liner
    acc.add_(x2.to(acc.scalar_type()).square().sum(0));
  }
}

namespace {

std::vector<at::Tensor> repack_op(at::TensorList tensors,
                                  const c10::List<std::optional<at::Tensor>>& keep_rows,
                                  const c10::List<std::optional<at::Tensor>>& keep_cols) {
  std::vector<std::optional<at::Tensor>> rows(keep_rows.begin(), keep_rows.end());
  std::vector<std::optional<at::Tensor>> cols(keep_cols.begin(), keep_cols.end());
  return repack(tensors.vec(), rows, cols);
}

at::Tensor kth_op(at::TensorList tensors, int64_t k, bool ignore_zeros) {
  return kth_smallest_abs(tensors.vec(), k, ignore_zeros);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_registered(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out, const std::optional<at::Tensor>& y_pre_zero) {
  auto r = masked_linear_bwd_op(gy, x, y, weight, bias, mask_in, mask_out, block_in, block_out,
                                tokens_per_sample, output_mask, acc_in, acc_out, sq_in, sq_out,
                                y_pre_zero);
  return {or_empty(r[0], x), or_empty(r[1], x), or_empty(r[2], x), or_empty(r[3], x),
          or_empty(r[4], x)};
}

at::Tensor prune_registered(const at::Tensor& mask, const at::Tensor& imp, int64_t k) {
  return at::scalar_tensor(prune_lowest_op(mask, imp, k), mask.options().dtype(at::kLong));
}

}  // namespace
}  // namespace tsprune

// The schemas are defined once, in Python (tsprune_kernels/_library.py), after this library is
// loaded; the dispatcher accepts kernels registered before their op's definition and checks each
// kernel's signature against the schema when the definition arrives.
TORCH_LIBRARY_IMPL(tsprune, CPU, m) {
  m.impl("masked_linear_fwd", &tsprune::masked_linear_fwd_op);
  m.impl("masked_linear_bwd", &tsprune::bwd_registered);
  m.impl("global_kth_smallest", &tsprune::kth_op);
  m.impl("prune_lowest_", &tsprune::prune_registered);
  m.impl("repack", &tsprune::repack_op);
  m.impl("act_sq_accumulate_", &tsprune::act_sq_accumulate_op);
}
