// The copy routines of the CUDA repack, written as __host__ __device__ functions so that the same
// code runs in the kernel (repack.cu) and in the host-only test (tests/repack_host_test.cu), which
// checks the indexing on machines without a GPU.
//
// Work decomposition: one warp copies one segment (kSegBytes output bytes) of one output row.
// Inside it, lane l copies the 16-byte chunks l, l + 32, ... of the destination, aligned to 16
// bytes of the destination address (the few bytes before the first aligned address, the "head",
// are copied element by element by lane 0 of segment 0). A chunk is copied with one 16-byte load
// and store when its source bytes are contiguous (inside one cell, or consecutive kept columns of
// a row whose cells are adjacent) and 16-byte aligned; otherwise element by element (element-size
// typed copies), which handles gathered columns, strided / transposed sources and odd alignments.
#pragma once

#include <cstdint>

#include "repack_meta.h"

#if defined(__CUDACC__)
#define TSP_HD __host__ __device__ __forceinline__
#else
#define TSP_HD inline
#endif

namespace tsprune_cuda {

struct alignas(16) V16 {
  unsigned long long a, b;
};

struct Meta {
  const char* src;
  char* dst;
  const int64_t* rows;
  const int64_t* cols;
  int64_t rows_out, cols_out, rs, cs, cell, elem, row_bytes, segs, unit_begin, shift;
};

TSP_HD Meta load_meta(const int64_t* p) {
  Meta m;
  m.src = reinterpret_cast<const char*>(static_cast<uintptr_t>(p[kSrc]));
  m.dst = reinterpret_cast<char*>(static_cast<uintptr_t>(p[kDst]));
  m.rows = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(p[kRows]));
  m.cols = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(p[kCols]));
  m.rows_out = p[kRowsOut];
  m.cols_out = p[kColsOut];
  m.rs = p[kRowStride];
  m.cs = p[kColStride];
  m.cell = p[kCellBytes];
  m.elem = p[kElemBytes];
  m.row_bytes = p[kRowBytes];
  m.segs = p[kSegsPerRow];
  m.unit_begin = p[kUnitBegin];
  m.shift = p[kCellShift];
  return m;
}

TSP_HD int64_t cell_of(const Meta& m, int64_t byte) {
  return m.shift >= 0 ? (byte >> m.shift) : byte / m.cell;
}

TSP_HD int64_t col_of(const Meta& m, int64_t c) { return m.cols ? m.cols[c] : c; }

TSP_HD void copy_elem(char* d, const char* s, int64_t es) {
  switch (es) {
    case 1: *d = *s; break;
    case 2: *reinterpret_cast<uint16_t*>(d) = *reinterpret_cast<const uint16_t*>(s); break;
    case 4: *reinterpret_cast<uint32_t*>(d) = *reinterpret_cast<const uint32_t*>(s); break;
    case 8: *reinterpret_cast<uint64_t*>(d) = *reinterpret_cast<const uint64_t*>(s); break;
    case 16: *reinterpret_cast<V16*>(d) = *reinterpret_cast<const V16*>(s); break;
    default:
      for (int64_t i = 0; i < es; ++i) d[i] = s[i];
  }
}

// Output bytes [b0, b1) of a row, element by element (b0, b1 multiples of the element size).
TSP_HD void copy_gather(const Meta& m, const char* src_row, char* dst_row, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; b += m.elem) {
    const int64_t c = cell_of(m, b);
    copy_elem(dst_row + b, src_row + col_of(m, c) * m.cs + (b - c * m.cell), m.elem);
  }
}

// The chunk of up to 16 output bytes starting at row byte ob.
TSP_HD void copy_chunk(const Meta& m, const char* src_row, char* dst_row, int64_t ob) {
  const int64_t end = ob + 16 < m.row_bytes ? ob + 16 : m.row_bytes;
  if (end - ob == 16) {
    const bool dense_row = m.cols == nullptr && m.cs == m.cell;  // the whole row is one run
    const int64_t c0 = dense_row ? 0 : cell_of(m, ob);
    const char* s0 = dense_row ? src_row + ob : src_row + col_of(m, c0) * m.cs + (ob - c0 * m.cell);
    if (((reinterpret_cast<uintptr_t>(s0) | reinterpret_cast<uintptr_t>(dst_row + ob)) & 15) == 0) {
      bool contiguous = dense_row;
      if (!contiguous) {
        const int64_t c1 = cell_of(m, ob + 15);
        contiguous = c1 == c0 || m.cs == m.cell;
        if (contiguous && m.cols != nullptr) {
          for (int64_t c = c0; c < c1; ++c) {
            if (m.cols[c + 1] != m.cols[c] + 1) {
              contiguous = false;
              break;
            }
          }
        }
      }
      if (contiguous) {
        *reinterpret_cast<V16*>(dst_row + ob) = *reinterpret_cast<const V16*>(s0);
        return;
      }
    }
  }
  copy_gather(m, src_row, dst_row, ob, end);
}

// Lane `lane` of `nlanes` copies its chunks of segment `seg` of output row `row`.
TSP_HD void copy_segment_lane(const Meta& m, int64_t row, int64_t seg, int lane, int nlanes) {
  const int64_t sr = m.rows ? m.rows[row] : row;
  const char* src_row = m.src + sr * m.rs;
  char* dst_row = m.dst + row * m.row_bytes;
  int64_t head = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(dst_row) & 15)) & 15);
  if (head > m.row_bytes) head = m.row_bytes;
  if (seg == 0 && lane == 0 && head > 0) copy_gather(m, src_row, dst_row, 0, head);
  const int64_t begin = head + seg * kSegBytes;
  int64_t stop = begin + kSegBytes;
  if (stop > m.row_bytes) stop = m.row_bytes;
  for (int64_t ob = begin + 16 * static_cast<int64_t>(lane); ob < stop; ob += 16 * static_cast<int64_t>(nlanes)) {
    copy_chunk(m, src_row, dst_row, ob);
  }
}

// Index of the tensor owning global work unit u: the last t with unit_begin[t] <= u.
TSP_HD int find_tensor(const int64_t* meta, int n, int64_t u) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta[static_cast<int64_t>(mid) * kMetaFields + kUnitBegin] <= u) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Everything one lane does for global work unit u.
TSP_HD void copy_unit_lane(const int64_t* meta, int n, int64_t u, int lane, int nlanes) {
  const Meta m = load_meta(meta + static_cast<int64_t>(find_tensor(meta, n, u)) * kMetaFields);
  const int64_t local = u - m.unit_begin;
  const int64_t row = local / m.segs;
  copy_segment_lane(m, row, local - row * m.segs, lane, nlanes);
}

}  // namespace tsprune_cuda
