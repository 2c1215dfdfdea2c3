// CUDA repack: gather kept rows and columns of many tensors into new contiguous tensors with ONE
// kernel launch per call (docs/KERNELS.md, "Repack (CUDA)").
//
// Stage: physical repack (plan -> smaller model). Receives a device array of per-tensor records
// (repack_meta.h: pointers, sizes, strides, index pointers) written by repack_binding.cpp; writes
// only the output tensors. Any dtype (byte copies of the element size); 16-byte vector copies for
// contiguous, aligned runs. Pure CUDA runtime: no torch headers, so `nvcc -c` works anywhere.
#include <cuda_runtime.h>

#include "repack_copy.cuh"

namespace tsprune_cuda {

constexpr int kThreads = 256;  // 8 warps per block, one work unit per warp at a time

__global__ void __launch_bounds__(kThreads)
repack_kernel(const int64_t* __restrict__ meta, int n_tensors, int64_t total_units) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t u = warp; u < total_units; u += n_warps) {
    copy_unit_lane(meta, n_tensors, u, lane, 32);
  }
}

}  // namespace tsprune_cuda

extern "C" const char* tsprune_repack_launch(const int64_t* meta, int n_tensors, int64_t total_units,
                                             void* stream) {
  if (n_tensors <= 0 || total_units <= 0) return nullptr;
  const int64_t warps_per_block = tsprune_cuda::kThreads / 32;
  int64_t blocks = (total_units + warps_per_block - 1) / warps_per_block;
  if (blocks > 16384) blocks = 16384;  // grid-stride beyond that
  tsprune_cuda::repack_kernel<<<static_cast<unsigned>(blocks), tsprune_cuda::kThreads, 0,
                                static_cast<cudaStream_t>(stream)>>>(meta, n_tensors, total_units);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
