// Compile-time configuration of the KV-outer block-sparse attention forward.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"

namespace msa::fwd {

using namespace cute;

// Element: cutlass::bfloat16_t or cutlass::half_t; kHeadDim = D in {64, 128};
// kBlockN = block_size in {64, 128}: one work tile is exactly one selected key block.
template <class Element_, int kHeadDim_, int kBlockN_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "D must be 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "block_size must be 64 or 128");

  // 128 gathered query rows per tile: ceil(128 / G) tokens x G heads of one group.
  static constexpr int kBlockM = 128;
  static constexpr int kNumMmaWarpGroups = 2;
  static constexpr int kNumMmaThreads = kNumMmaWarpGroups * common::kThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + common::kThreadsPerWarpGroup;
  // Ring depth: a stage holds one tile's gathered queries, K and V of its block, and its metadata.
  static constexpr int kStages = 2;
  // The producer warpgroup issues the TMA loads and the cp.async query gather (kBlockM x D / 8
  // 16-byte chunks over 128 threads: 16 per thread at D = 128, 8 at D = 64). setmaxnreg only moves registers inside the CTA's launch allocation (168 per
  // thread at 384 threads), so producer + 2 x consumer must not exceed 3 x 168.
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = 224;
  static_assert(kProducerRegs + kNumMmaWarpGroups * kConsumerRegs <= (kNumMmaWarpGroups + 1) * 168,
                "register split exceeds the launch allocation: consumers would wait forever in setmaxnreg");

  // S = Q K^T: both operands K-major. O = P V: P from registers, V^T read MN-major from the same
  // shared-memory tile the TMA wrote for V (a K-major SW128 tile transposed is an MN-major one).
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));

  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // (d, key, stage) view of the V tiles.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  using MainloopPipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename MainloopPipeline::PipelineState;
  static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);

  // K and V in gmem: (token, d, kv head), token stride Hkv * D; the head is a coordinate.
  using GmemShapeKV = Shape<int32_t, Int<kHeadDim>, int32_t>;
  using GmemStrideKV = Stride<int64_t, _1, Int<kHeadDim>>;
  using GmemTensorKV = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShapeKV{},
                                            GmemStrideKV{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorKV{}, take<0, 2>(SmemLayoutKV{})));

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    int4 tile[kStages];             // (list, first entry, entries, 0) of the tile in each stage
    int2 rows[kStages][kBlockM];    // (flat token, slot) of each gathered row
    typename MainloopPipeline::SharedStorage pipeline;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::fwd
