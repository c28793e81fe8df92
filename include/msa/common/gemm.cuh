// One warpgroup-wide WGMMA issue over the whole K extent of a tile (B in shared memory; A in
// shared memory or, for O = P V, in registers).
#pragma once

#include <cute/tensor.hpp>

namespace msa::common {

// Register layout of the A operand of a register-sourced WGMMA with K = kCols that reuses the
// register order of an m64 x kCols fp32 accumulator: value 8 s + v of the accumulator is value v
// of k-slice s, so P or dS becomes the next GEMM's A operand by a type conversion alone.
template <int kCols>
using AccumulatorAsOperandA =
    cute::Layout<cute::Shape<cute::Shape<cute::_2, cute::_2, cute::_2>, cute::_1, cute::Int<kCols / 16>>,
                 cute::Stride<cute::Stride<cute::_1, cute::_2, cute::_4>, cute::_0, cute::_8>>;

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
