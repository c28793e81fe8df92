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

namespace detail {

// Raises the kernel's dynamic shared memory limit and, for clusters above 8 CTAs, allows the
// non-portable sizes (up to 16 on SM90).
template <class Kernel>
cudaError_t set_launch_limits(Kernel kernel, int smem_bytes, unsigned cluster_x) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess && cluster_x > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  return err;
}

inline cudaLaunchAttribute cluster_attribute(unsigned cluster_x) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster_x;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

}  // namespace detail

// Launches kernel, when `programmatic`, as a programmatic dependent of the stream's previous
// kernel: it may start while that one drains, and must execute griddepcontrol.wait before reading
// anything it wrote (a no-op in a plain launch). Raises the dynamic shared memory limit first, as
// above. Kept as a dependency edge under graph capture.
// With cluster_x > 1 the grid is launched as clusters of cluster_x CTAs along x (grid.x a
// multiple of it; above 8, the non-portable sizes up to 16 that SM90 allows).
template <class Kernel, class Params>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             Params const& params, bool programmatic = true, unsigned cluster_x = 1) {
  cudaError_t err = detail::set_launch_limits(kernel, smem_bytes, cluster_x);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr[2];
  int num_attrs = 0;
  if (programmatic) {
    attr[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[num_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 1) attr[num_attrs++] = detail::cluster_attribute(cluster_x);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = num_attrs;
  return cudaLaunchKernelEx(&config, kernel, params);
}

// How many clusters of cluster_x CTAs (threads, smem_bytes each) of `kernel` the device can hold
// at once; 0 when it cannot launch them (or the query fails).
template <class Kernel>
int max_active_clusters(Kernel kernel, int threads, int smem_bytes, unsigned cluster_x) {
  cudaLaunchAttribute attr = detail::cluster_attribute(cluster_x);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster_x, 1, 1);
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.attrs = &attr;
  config.numAttrs = 1;
  int clusters = 0;
  if (detail::set_launch_limits(kernel, smem_bytes, cluster_x) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    cudaGetLastError();  // clear the error: the caller falls back to a plain launch
    return 0;
  }
  return clusters;
}

}  // namespace msa::common
