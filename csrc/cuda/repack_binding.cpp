// Python binding of the CUDA repack: module tsprune_kernels._C_cuda (built by setup.py from
// csrc/cuda/*.cpp + *.cu as a CUDAExtension). Host side only: validates the tensors, allocates the
// outputs, writes one metadata record per tensor (repack_meta.h), copies the table to the device
// and makes the single launch (repack.cu) on the CUDA stream handed in by Python
// (torch.cuda.current_stream().cuda_stream, under torch.cuda.device(d)). No CUDA headers are needed
// here, so this file also compiles against a CPU-only torch.
//
// Index values are trusted: tsprune_kernels.ops.repack checks their range before calling.
#include <torch/extension.h>

#include <vector>

#include "cuda/repack_meta.h"

namespace {

using namespace tsprune_cuda;

int64_t as_int(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

at::Tensor index_tensor(const c10::optional<at::Tensor>& idx, const at::Tensor& t, size_t i,
                        const char* what) {
  if (!idx.has_value() || !idx->defined()) return at::Tensor();
  const at::Tensor& x = *idx;
  TORCH_CHECK(x.scalar_type() == at::kLong && x.dim() == 1, "repack: keep_", what, "[", i,
              "] must be a 1-D LongTensor or None");
  TORCH_CHECK(x.device() == t.device(), "repack: keep_", what, "[", i, "] is on ", x.device(),
              " but tensor ", i, " is on ", t.device());
  return x.contiguous();
}

std::vector<at::Tensor> repack(const std::vector<at::Tensor>& tensors,
                               const std::vector<c10::optional<at::Tensor>>& keep_rows,
                               const std::vector<c10::optional<at::Tensor>>& keep_cols,
                               int64_t stream) {
  TORCH_CHECK(tensors.size() == keep_rows.size() && tensors.size() == keep_cols.size(), "repack: ",
              tensors.size(), " tensors but ", keep_rows.size(), " keep_rows and ", keep_cols.size(),
              " keep_cols");
  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  std::vector<at::Tensor> alive;  // contiguous copies of indices / sources used by the launch
  std::vector<int64_t> meta;
  int64_t units = 0;
  int count = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    TORCH_CHECK(t.defined() && t.is_cuda(), "repack: tensor ", i, " is not a CUDA tensor");
    TORCH_CHECK(t.device() == tensors[0].device(), "repack: tensor ", i, " is on ", t.device(),
                " but tensor 0 is on ", tensors[0].device());
    TORCH_CHECK(t.dim() >= 1, "repack: tensor ", i, " is 0-d");
    at::Tensor rows = index_tensor(keep_rows[i], t, i, "rows");
    at::Tensor cols = index_tensor(keep_cols[i], t, i, "cols");
    TORCH_CHECK(!(t.dim() == 1 && cols.defined()), "repack: tensor ", i,
                " is 1-D but keep_cols[", i, "] is given");
    std::vector<int64_t> sizes = t.sizes().vec();
    if (rows.defined()) sizes[0] = rows.numel();
    if (cols.defined()) sizes[1] = cols.numel();
    at::Tensor out = at::empty(sizes, t.options().memory_format(at::MemoryFormat::Contiguous));
    outs.push_back(out);
    if (out.numel() == 0) continue;
    if (t.dim() > 2) {  // the dims past the second must form one contiguous run (a cell)
      int64_t expect = 1;
      bool ok = true;
      for (int64_t d = t.dim() - 1; d >= 2; --d) {
        if (t.size(d) != 1 && t.stride(d) != expect) ok = false;
        expect *= t.size(d);
      }
      if (!ok) {
        t = t.contiguous();
        alive.push_back(t);
      }
    }
    if (rows.defined()) alive.push_back(rows);
    if (cols.defined()) alive.push_back(cols);
    const int64_t es = t.element_size();
    int64_t inner = 1;
    for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
    std::vector<int64_t> rec(kMetaFields, 0);
    rec[kSrc] = as_int(t.data_ptr());
    rec[kDst] = as_int(out.data_ptr());
    if (t.dim() == 1) {  // one row whose cells are the kept elements
      rec[kRows] = 0;
      rec[kCols] = rows.defined() ? as_int(rows.data_ptr()) : 0;
      rec[kRowsOut] = 1;
      rec[kColsOut] = out.numel();
      rec[kRowStride] = 0;
      rec[kColStride] = t.stride(0) * es;
      rec[kCellBytes] = es;
    } else {
      rec[kRows] = rows.defined() ? as_int(rows.data_ptr()) : 0;
      rec[kCols] = cols.defined() ? as_int(cols.data_ptr()) : 0;
      rec[kRowsOut] = out.size(0);
      rec[kColsOut] = out.size(1);
      rec[kRowStride] = t.stride(0) * es;
      rec[kColStride] = t.stride(1) * es;
      rec[kCellBytes] = inner * es;
    }
    rec[kElemBytes] = es;
    rec[kRowBytes] = rec[kColsOut] * rec[kCellBytes];
    rec[kSegsPerRow] = (rec[kRowBytes] + kSegBytes - 1) / kSegBytes;
    rec[kUnitBegin] = units;
    const int64_t cb = rec[kCellBytes];
    int64_t shift = -1;
    if ((cb & (cb - 1)) == 0) {
      shift = 0;
      while ((int64_t{1} << shift) < cb) ++shift;
    }
    rec[kCellShift] = shift;
    units += rec[kRowsOut] * rec[kSegsPerRow];
    meta.insert(meta.end(), rec.begin(), rec.end());
    ++count;
  }
  if (count == 0) return outs;
  at::Tensor table = torch::from_blob(meta.data(), {static_cast<int64_t>(meta.size())},
                                      at::TensorOptions().dtype(at::kLong))
                         .to(tensors[0].device());  // pageable copy: complete when .to() returns
  const char* err = tsprune_repack_launch(table.data_ptr<int64_t>(), count, units,
                                          reinterpret_cast<void*>(static_cast<uintptr_t>(stream)));
  TORCH_CHECK(err == nullptr, "repack: CUDA kernel launch failed: ", err);
  return outs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsprune CUDA kernels (repack)";
  m.def("repack", &repack,
        "tensors[i].index_select(0, keep_rows[i]).index_select(1, keep_cols[i]) for all i, as new "
        "contiguous tensors, in one kernel launch on the given CUDA stream",
        py::arg("tensors"), py::arg("keep_rows"), py::arg("keep_cols"), py::arg("stream"));
}
