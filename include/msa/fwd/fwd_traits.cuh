// Compile-time configuration of the block-sparse attention forward kernels (KV-outer and
// query-outer).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"

namespace msa::fwd {

using namespace cute;

// Named barriers of the forward (cutlass::arch::NamedBarrier adds CUTLASS's reserved count).
enum class FwdBarrier : int {
  Epilogue0 = 0,     // query-outer: consumer warpgroup 0's output tile is complete in shared memory
  Epilogue1 = 1,
  ProducerGrab = 2,  // the producer warpgroup has published the scheduler's next run
  ProducerUnion = 3, // query-outer: every producer warp has written its part of the tile's block union
};

// The tile types both forward kernels share (KV-outer fwd_kernel and query-outer
// fwd_query_tile_kernel): 128 query rows per tile (tokens x the G heads of one group), split
// between two consumer warpgroups of 64 rows; one key block of kBlockN keys per K/V stage.
// Element: cutlass::bfloat16_t or cutlass::half_t; kHeadDim = D in {64, 128};
// kBlockN = block_size in {64, 128}.
template <class Element_, int kHeadDim_, int kBlockN_, int kQStages_, int kKVStages_>
struct AttnTileTypes {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kQStages = kQStages_;
  static constexpr int kKVStages = kKVStages_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "D must be 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "block_size must be 64 or 128");

  static constexpr int kBlockM = 128;
  static constexpr int kRowsPerWarpGroup = 64;
  static constexpr int kNumMmaWarpGroups = 2;
  static constexpr int kNumMmaThreads = kNumMmaWarpGroups * common::kThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + common::kThreadsPerWarpGroup;
  // The producer warpgroup issues the TMA loads and the cp.async query gather. setmaxnreg only
  // moves registers inside the CTA's launch allocation (168 per thread at 384 threads), so
  // producer + 2 x consumer must not exceed 3 x 168.
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
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kQStages>>{}));
  // The producer's gather and the epilogue's staging address the query tile directly: a row is
  // 128 bytes inside its 64-column half, halves are kBlockM rows apart, stages follow each other.
  // (The 128-byte swizzle acts on the byte address: chunk bits 4-6 ^= row bits 7-9.)
  static_assert(get_nonswizzle_portion(SmemLayoutQ{})(8, 0, 0) == 8 * 64 &&
                    (kQStages == 1 || get_nonswizzle_portion(SmemLayoutQ{})(0, 0, 1) == kBlockM * kHeadDim) &&
                    (kHeadDim == 64 || get_nonswizzle_portion(SmemLayoutQ{})(0, 64, 0) == kBlockM * 64),
                "unexpected query tile layout");
  static constexpr uint32_t kQStageBytes = kBlockM * kHeadDim * sizeof(Element);
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kKVStages>>{}));
  // (d, key, stage) view of the V tiles.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kKVStages>>{}, Step<_2, _1, _3>{})));
  static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);

  // K and V in gmem: (token, d, kv head), token stride Hkv * D; the head is a coordinate.
  using GmemShapeKV = Shape<int32_t, Int<kHeadDim>, int32_t>;
  using GmemStrideKV = Stride<int64_t, _1, Int<kHeadDim>>;
  using GmemTensorKV = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShapeKV{},
                                            GmemStrideKV{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorKV{}, take<0, 2>(SmemLayoutKV{})));
};

// KV-outer forward: one work tile is exactly one selected key block and up to 128/G tokens that
// chose it. Two rings: gathered queries (one stage per tile) and K/V (one stage per key block). A
// CTA takes runs of consecutive tiles of the block-sorted work list, so consecutive tiles mostly
// share their block and K/V is loaded once per run of tiles, not once per tile. A query stage is
// freed as soon as S = Q K^T has read it (the epilogue stores from registers).
template <class Element_, int kHeadDim_, int kBlockN_>
struct FwdTraits
    : AttnTileTypes<Element_, kHeadDim_, kBlockN_, (kHeadDim_ == 128 && kBlockN_ == 128) ? 3 : 4, /*kKVStages=*/2> {
  using Base = AttnTileTypes<Element_, kHeadDim_, kBlockN_, (kHeadDim_ == 128 && kBlockN_ == 128) ? 3 : 4, 2>;
  using typename Base::Element;
  using Base::kBlockM;
  using Base::kKVStages;
  using Base::kNumMmaWarpGroups;
  using Base::kQStages;
  using Base::kRowsPerWarpGroup;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;

  using QPipeline = cutlass::PipelineAsync<kQStages>;
  using KVPipeline = cutlass::PipelineTmaAsync<kKVStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    int4 tile[kQStages];                          // (list, first entry, entries, 0) of each stage's tile
    int32_t rows[kQStages][kBlockM];              // pack_entry(local token, slot) of each gathered row
    int grab_slot;                                // DynamicTileScheduler's hand-over
    typename QPipeline::SharedStorage q_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

// The query-outer forward serves sequences of at most this many key blocks: a token's selection is
// a 32-bit mask.
constexpr int kQueryOuterMaxBlocks = 32;

// Query-outer forward (short contexts, at most 32 key blocks): one tile is 128/G tokens x G heads
// of one group and walks the union of the blocks its tokens selected with an online softmax, so
// the output is final (no partials, no combine). Two query stages (the next tile's queries load
// during this one; a stage also holds the tile's output on its way out), and as many K/V stages
// as fit next to them.
template <class Element_, int kHeadDim_, int kBlockN_>
struct QueryTileTraits
    : AttnTileTypes<Element_, kHeadDim_, kBlockN_, 2, (kHeadDim_ == 128 && kBlockN_ == 128) ? 2 : 4> {
  using Base = AttnTileTypes<Element_, kHeadDim_, kBlockN_, 2, (kHeadDim_ == 128 && kBlockN_ == 128) ? 2 : 4>;
  using typename Base::Element;
  using Base::kBlockM;
  using Base::kKVStages;
  using Base::kQStages;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;
  static constexpr int kMaxBlocks = kQueryOuterMaxBlocks;

  using QPipeline = cutlass::PipelineAsync<kQStages>;
  using KVPipeline = cutlass::PipelineTmaAsync<kKVStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    uint32_t token_blocks[kQStages][kBlockM];  // visible selected blocks of each token of the tile, a bit each
    uint32_t union_part[kQStages][4];          // OR of token_blocks over each producer warp's tokens
    typename QPipeline::SharedStorage q_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::fwd
