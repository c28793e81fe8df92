// One warpgroup-wide WGMMA issue over the whole K extent of a tile (B in shared memory; A in
// shared memory or, for O = P V, in registers).
#pragma once

#include <cute/tensor.hpp>

namespace msa::common {

// acc = A * B^T (kZeroInit) or acc += A * B^T. Issues every k-slice back to back and commits one
// batch. kWait: also wait for it, so the accumulator is ready when this returns; without it the
// caller waits (warpgroup_wait<N>) and fences the accumulator itself, to overlap other work.
template <bool kZeroInit, bool kWait = true, class TiledMma, class TensorA, class TensorB, class TensorC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& tiled_mma, TensorA const& tCrA, TensorB const& tCrB,
                                               TensorC& tCrC) {
  using namespace cute;
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  if constexpr (kZeroInit) {
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  }
  CUTLASS_PRAGMA_UNROLL
  for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
    cute::gemm(tiled_mma, tCrA(_, _, k_block), tCrB(_, _, k_block), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait) {
    warpgroup_wait<0>();
  }
  // Keeps the compiler from moving other definitions of the accumulator into the WGMMA's
  // pipeline stage (ptxas would then serialize every WGMMA of the kernel).
  warpgroup_fence_operand(tCrC);
}

}  // namespace msa::common
