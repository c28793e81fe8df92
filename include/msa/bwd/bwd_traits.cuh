// Compile-time configuration of the KV-outer block-sparse attention backward.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"
#include "msa/fwd/fwd_traits.cuh"

namespace msa::bwd {

using namespace cute;

// Named barriers of the backward (cutlass::arch::NamedBarrier adds CUTLASS's reserved count).
enum class BwdBarrier : int {
  ProducerRows = 0,    // the producer warpgroup has written the tile's row tokens
  StagingWritten = 1,  // both consumer warpgroups have written P (or dS) to the staging tile
  StagingRead = 2,     // both consumer warpgroups' GEMMs reading the staging tile are done
  ProducerGrab = 3,    // the producer warpgroup has published the scheduler's next run
};

// A work tile is the forward's: one selected key block and up to 128/G tokens that chose it
// (128 rows: tokens x the G heads of the group; consumer warpgroup w owns rows [64w, 64w + 64)).
// Per tile: S = Q K^T and dP = dO V^T (rows x keys), P and dS in registers, then
// dV_tile = P^T dO and dK_tile = scale dS^T Q (keys x D, through a shared-memory staging tile of
// P^T / dS^T; the warpgroups split the keys, or D when the block has 64 keys) and
// dQ_rows = scale dS K (rows x D); all three are added to fp32 accumulators with atomics.
template <class Element_, int kHeadDim_, int kBlockN_>
struct BwdTraits : fwd::AttnTileTypes<Element_, kHeadDim_, kBlockN_, (kHeadDim_ == 128 && kBlockN_ == 128) ? 1 : 2,
                                      /*kKVStages=*/1> {
  using Base =
      fwd::AttnTileTypes<Element_, kHeadDim_, kBlockN_, (kHeadDim_ == 128 && kBlockN_ == 128) ? 1 : 2, 1>;
  using typename Base::Element;
  using Base::kBlockM;
  using Base::kBlockN;
  using Base::kHeadDim;
  using Base::kKVStages;
  using Base::kQStages;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;

  // (d, row, stage) views of the Q and dO tiles: the B operands of dK = dS^T Q and dV = P^T dO.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kQStages>>{}, Step<_2, _1, _3>{})));
  // P / dS staging: (row, key) in the query tile's SW128 K-major layout, written by stmatrix from
  // the S accumulators (fwd::stage_rows_stmatrix); its (key, row) view is an MN-major SW128 tile,
  // the A operand P^T / dS^T of the dK/dV GEMMs.
  using SmemLayoutP =
      decltype(tile_to_shape(typename Base::SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(get_nonswizzle_portion(SmemLayoutP{})(8, 0) == 8 * 64 &&
                    (kBlockN == 64 || get_nonswizzle_portion(SmemLayoutP{})(0, 64) == kBlockM * 64),
                "unexpected staging tile layout");
  using SmemLayoutPt = decltype(composition(SmemLayoutP{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>>{},
                                                                                 Step<_2, _1>{})));
  // dK / dV tile (keys x D): a 128-key block is split by keys between the two warpgroups, a
  // 64-key block by D.
  static constexpr bool kSplitKeys = kBlockN == 128;
  using TiledMmaDKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<_64, Int<kSplitKeys ? kHeadDim : kHeadDim / 2>, Int<kBlockM>>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kSplitKeys ? 2 : 1>, Int<kSplitKeys ? 1 : 2>, _1>>{}));

  using QPipeline = cutlass::PipelineAsync<kQStages>;
  using KVPipeline = cutlass::PipelineTmaAsync<kKVStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutP>, 1024> pt;
    int4 tile[kQStages];                 // (list, first entry, entries, 0) of each stage's tile
    int32_t row_token[kQStages][kBlockM];  // flat query token of each row, -1 = padding row
    float row_lse[kQStages][kBlockM];      // lse (log2 units) of each row
    float row_delta[kQStages][kBlockM];    // rowsum(dO * O) - grad_lse of each row
    int grab_slot;                         // DynamicTileScheduler's hand-over
    typename QPipeline::SharedStorage q_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::bwd
