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

// Launches kernel, when `programmatic`, as a programmatic dependent of the stream's previous
// kernel: it may start while that one drains, and must execute griddepcontrol.wait before reading
// anything it wrote (a no-op in a plain launch). Raises the dynamic shared memory limit first, as
// above. Kept as a dependency edge under graph capture.
template <class Kernel, class Params>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             Params const& params, bool programmatic = true) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params);
}

}  // namespace msa::common
