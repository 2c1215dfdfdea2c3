// tsprune CPU kernels: declarations (ATen only, no pybind).
// The op contract and the algorithms are described in docs/KERNELS.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace tsprune {

// y[T,N] = x[T,K] @ Wf.T + bf, with the masks folded into the weight / bias:
//   Wf = expand(mask_out)[:, None] * W * expand(mask_in)[None, :],  bf = b * expand(mask_out).
at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& mask_in,
                             const std::optional<at::Tensor>& mask_out,
                             int64_t block_in, int64_t block_out);

// The forward for training: returns {y, y_pre_zero}. When mask_out has zero units Z (|m| below
// the dtype's threshold, or not finite), the GEMM runs with those units' mask entries replaced by 1
// and y_pre_zero = y_pre[:, channels of Z] ([T, |Z| * block_out], x's dtype) is copied out before
// y[:, Z] is scaled by its own mask values; masked_linear_bwd then needs no GEMM for them.
// Otherwise y_pre_zero is an empty [T, 0] tensor and y is exactly masked_linear_fwd's.
// y_pre_zero of 4 MiB or more is drawn from a process-wide cache of freed buffers (at most
// TSPRUNE_CPU_CACHE_MB, default 256, are kept; 0 disables it): no page faults in steady state.
std::vector<at::Tensor> masked_linear_fwd_keep(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& mask_in,
                                               const std::optional<at::Tensor>& mask_out,
                                               int64_t block_in, int64_t block_out);

// Which of masked_linear_bwd's five results to compute: {dx, dweight, dbias, dmask_in,
// dmask_out} (ATen's convention, e.g. convolution_backward's bool[3] output_mask). A mask with an
// accumulator gets its gradient added there even when its flag is false.
using OutputMask = std::array<bool, 5>;

// Backward of masked_linear_fwd. Returns {dx, dweight, dbias, dmask_in, dmask_out};
// entries that were not asked for are undefined tensors. acc_* / sq_* (float32 or float64,
// one entry per mask unit) are updated in place: acc += dmask, sq += sum_i dmask_i^2 over
// samples of tokens_per_sample consecutive rows. y_pre_zero: masked_linear_fwd_keep's second
// result (or nullopt / an empty tensor: the zero output units are then recomputed with a GEMM
// restricted to their channels).
std::vector<at::Tensor> masked_linear_bwd(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out,
    const std::optional<at::Tensor>& y_pre_zero = std::nullopt);

// k-th (1-based) smallest |v| over every element of every tensor (radix select on the bit
// pattern). Exact zeros are skipped when ignore_zeros. Returns a 0-d tensor (float64 when any
// input is float64, otherwise float32).
at::Tensor kth_smallest_abs(const std::vector<at::Tensor>& tensors, int64_t k, bool ignore_zeros);

// Among live units (mask != 0): prune the k with the smallest nonzero |imp| (ties: lower index
// first) plus every live unit whose imp is exactly 0. Pruned units get mask = 0 and imp = 0.
// Returns the number of units pruned.
int64_t prune_lowest_(const at::Tensor& mask, const at::Tensor& imp, int64_t k);

// out[i] = tensors[i].index_select(0, keep_rows[i]).index_select(1, keep_cols[i]) as a new
// contiguous tensor (nullopt = keep all), gathered in one parallel pass over all tensors.
std::vector<at::Tensor> repack(const std::vector<at::Tensor>& tensors,
                               const std::vector<std::optional<at::Tensor>>& keep_rows,
                               const std::vector<std::optional<at::Tensor>>& keep_cols);

// acc[j] += sum_t x[t, j]^2 (x: [T, K]; acc: float32 or float64 [K]).
void act_sq_accumulate_(const at::Tensor& x, const at::Tensor& acc);

// ---- op kernels (op_kernels.cpp) --------------------------------------------------------------
// The CPU kernels of the tsprune:: torch ops (registered with TORCH_LIBRARY_IMPL there; bound to
// Python by bindings.cpp). Unlike the fast kernels above they accept every input their op's schema
// admits: empty dimensions of masked_linear, any float dtype / layout for prune_lowest_, a strided
// accumulator for act_sq_accumulate_, routed to ATen code with the torch backend's numbers.

// {y, y_pre_zero}: masked_linear_fwd_keep when keep_zero_pre and mask_out is given, else
// {masked_linear_fwd, [T, 0]}.
std::tuple<at::Tensor, at::Tensor> masked_linear_fwd_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& mask_out,
    int64_t block_in, int64_t block_out, bool keep_zero_pre);

// masked_linear_bwd, or the formula (no division by mask values) when a dimension is empty.
std::vector<at::Tensor> masked_linear_bwd_op(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask_in,
    const std::optional<at::Tensor>& mask_out, int64_t block_in, int64_t block_out,
    int64_t tokens_per_sample, OutputMask output_mask, const std::optional<at::Tensor>& acc_in,
    const std::optional<at::Tensor>& acc_out, const std::optional<at::Tensor>& sq_in,
    const std::optional<at::Tensor>& sq_out, const std::optional<at::Tensor>& y_pre_zero);

// prune_lowest_ for any 1-D float mask / imp pair (the radix kernel for contiguous fp32).
int64_t prune_lowest_op(const at::Tensor& mask, const at::Tensor& imp, int64_t k);

// act_sq_accumulate_ for x of any shape [..., K] and a 1-D accumulator of any stride.
void act_sq_accumulate_op(const at::Tensor& x, const at::Tensor& acc);

}  // namespace tsprune
