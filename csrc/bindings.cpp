// Python bindings of the tsprune CPU kernels: module tsprune_kernels._C.
// The op contract is in docs/KERNELS.md; declarations in csrc/cpu/ops.h.

#include <torch/extension.h>

#include "cpu/ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsprune CPU kernels (C++/OpenMP)";
  using GilFree = py::call_guard<py::gil_scoped_release>;

  // The op kernels (op_kernels.cpp: the same functions the dispatcher calls for CPU tensors);
  // TSPRUNE_KERNELS_BACKEND=cpp calls them through here, and tests / benchmarks call them directly.
  m.def("masked_linear_fwd",
        [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& mask_out,
           int64_t block_in, int64_t block_out) {
          return std::get<0>(tsprune::masked_linear_fwd_op(x, weight, bias, mask_in, mask_out,
                                                           block_in, block_out, false));
        },
        GilFree(),
        "y = x @ Wf.T + bf with the masks folded into the weight and bias",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mask_in"),
        py::arg("mask_out"), py::arg("block_in"), py::arg("block_out"));

  m.def("masked_linear_fwd_keep",
        [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& mask_in, const std::optional<at::Tensor>& mask_out,
           int64_t block_in, int64_t block_out) {
          return tsprune::masked_linear_fwd_op(x, weight, bias, mask_in, mask_out, block_in,
                                               block_out, true);
        },
        GilFree(),
        "[y, y_pre_zero]: masked_linear_fwd that also keeps y_pre of the zero units of mask_out "
        "([T, |Z| * block_out]; [T, 0] when there are none) for masked_linear_bwd",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mask_in"),
        py::arg("mask_out"), py::arg("block_in"), py::arg("block_out"));

  m.def("masked_linear_bwd", &tsprune::masked_linear_bwd_op, GilFree(),
        "backward of masked_linear_fwd: [dx, dweight, dbias, dmask_in, dmask_out] (None where "
        "output_mask, five bools in that order, is false); adds into acc_* / sq_* in place",
        py::arg("gy"), py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("mask_in"), py::arg("mask_out"), py::arg("block_in"), py::arg("block_out"),
        py::arg("tokens_per_sample"), py::arg("output_mask"),
        py::arg("acc_in") = py::none(), py::arg("acc_out") = py::none(),
        py::arg("sq_in") = py::none(), py::arg("sq_out") = py::none(),
        py::arg("y_pre_zero") = py::none());

  m.def("kth_smallest_abs", &tsprune::kth_smallest_abs, GilFree(),
        "k-th (1-based) smallest |v| over all elements of all tensors (radix select)",
        py::arg("tensors"), py::arg("k"), py::arg("ignore_zeros"));

  m.def("prune_lowest_", &tsprune::prune_lowest_op, GilFree(),
        "prune the k live units with the smallest nonzero |imp| plus every live unit with imp "
        "== 0 (mask = imp = 0); returns the number pruned",
        py::arg("mask"), py::arg("imp"), py::arg("k"));

  m.def("repack", &tsprune::repack, GilFree(),
        "tensors[i].index_select(0, keep_rows[i]).index_select(1, keep_cols[i]) for all i, "
        "as new contiguous tensors, in one parallel pass",
        py::arg("tensors"), py::arg("keep_rows"), py::arg("keep_cols"));

  m.def("act_sq_accumulate_", &tsprune::act_sq_accumulate_op, GilFree(),
        "acc[j] += sum over rows of x[..., j]^2", py::arg("x"), py::arg("acc"));
}
