// Small SM90 helpers: warp-group ids and register reconfiguration.
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

namespace msa::common {

constexpr int kThreadsPerWarpGroup = 128;

__device__ __forceinline__ int warp_group_idx() {
  return __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / kThreadsPerWarpGroup, 0);
}

__device__ __forceinline__ int warp_idx_in_warp_group() {
  return __shfl_sync(0xffffffff, (static_cast<int>(threadIdx.x) / 32) % 4, 0);
}

}  // namespace msa::common

// Compile the kernel bodies only for sm_90a (wgmma, setmaxnreg). Only sm_90a is built (see
// cmake/nvcc_flags.txt), and the bindings refuse other devices before launching (check_sm90).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MSA_SM90_ENABLED 1
#else
#define MSA_SM90_ENABLED 0
#endif
