// Layout of the per-tensor metadata of the CUDA repack (tsprune_kernels._C_cuda.repack).
//
// Stage: physical repack (plan -> smaller model). The host binding (repack_binding.cpp) writes one
// record of kMetaFields int64 values per tensor into a device array; the single kernel launch in
// repack.cu reads it. Plain C++ (no CUDA, no torch) so both sides and the host test share it.
#pragma once

#include <cstdint>

namespace tsprune_cuda {

// Every tensor is copied as a 2-D gather of "cells": out[r, c] = src[rows[r], cols[c]], a cell
// being the contiguous run of elements of the dims past the second (one element for 2-D tensors).
// 1-D tensors are described as a single row whose columns are the kept elements.
enum MetaField : int {
  kSrc = 0,        // const char*: source data pointer (storage offset included)
  kDst,            // char*: output data pointer (a new contiguous tensor)
  kRows,           // const int64_t*: kept rows, 0 = all rows (r -> r)
  kCols,           // const int64_t*: kept columns, 0 = all columns (c -> c)
  kRowsOut,        // number of output rows
  kColsOut,        // number of output columns (cells per row)
  kRowStride,      // source bytes between rows
  kColStride,      // source bytes between columns (cells)
  kCellBytes,      // bytes of one cell (element_size * prod(sizes[2:]))
  kElemBytes,      // element size in bytes (1, 2, 4, 8, 16)
  kRowBytes,       // output bytes per row = kColsOut * kCellBytes
  kSegsPerRow,     // work units per row: ceil(kRowBytes / kSegBytes)
  kUnitBegin,      // first global work unit of this tensor (prefix sum of kRowsOut * kSegsPerRow)
  kCellShift,      // log2(kCellBytes) when it is a power of two (2-D tensors always), else -1
  kMetaFields
};

// One work unit = one segment of kSegBytes output bytes of one row, copied by one warp.
constexpr int64_t kSegBytes = 4096;

}  // namespace tsprune_cuda

// The launcher defined in repack.cu. meta: device array of n_tensors * kMetaFields int64 values.
// Returns nullptr on success, else the CUDA error string.
extern "C" const char* tsprune_repack_launch(const int64_t* meta, int n_tensors, int64_t total_units,
                                             void* stream);
