// Host: launching a kernel that needs more than the default 48 KB of dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

namespace msa::common {

// Raises the kernel's dynamic shared memory limit to smem_bytes and launches it on stream.
template <class Kernel, class Params>
cudaError_t launch_with_smem(Kernel kernel, unsigned grid, int threads, int smem_bytes, cudaStream_t stream,
                             Params const& params) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace msa::common
