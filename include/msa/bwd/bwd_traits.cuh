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
  // dS^T of the tile's row half h is staged (block 128: by both consumer warpgroups, the one that
  // computes dQ of half h waits, the other only arrives; block 64: warpgroup h alone, 128 threads).
  StagedHalf0 = 1,
  StagedHalf1 = 2,
  ProducerGrab = 3,    // the producer warpgroup has published the scheduler's next run
};

// A work tile is the forward's: one selected key block and up to 128/G tokens that chose it
// (128 rows: tokens x the G heads of the group). The consumers use the keys-as-M layout
// (FlashAttention-3's backward): a consumer warpgroup owns 64 keys of the block and walks 64-row
// halves of the tile:
//   S^T = K Q^T and dP^T = V dO^T (64 keys x 64 rows, both operands K-major in shared memory),
//   P^T and dS^T in registers, dV += P^T dO and dK += dS^T Q (A from registers, B MN-major),
// so dK and dV stay in registers across a run of tiles of the same block and are flushed with
// atomics once per run instead of once per tile. dS^T is staged in shared memory for
// dQ = dS K (64 rows x D per warpgroup, A read MN-major from the staging tile). Q and dO arrive
// in 64-row half tiles (see kQHalfStages).
// Block 128: warpgroup w owns keys [64w, 64w + 64) and walks both row halves; block 64: both own
// the block's 64 keys and warpgroup w walks row half w (each flushes its own dK/dV partial).
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
  using typename Base::SmemLayoutAtom;
  using typename Base::SmemLayoutKV;

  static constexpr int kKeysPerWarpGroup = 64;
  static constexpr int kStepsPerTile = kBlockN / kKeysPerWarpGroup;  // row halves one warpgroup walks per tile
  // The consumers hold dK and dV (2 x 64 keys x D / 128 threads) next to S^T, dP^T or dQ. (64 / 216
  // spilled 1 KB in the consumers; 40 / 232 more in the producer than 56 / 224.)
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = 224;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register split exceeds the launch allocation");

  using TiledMmaSdPt = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, _64, Int<kHeadDim>>>(), Layout<Shape<_1, _1, _1>>{}));
  using TiledMmaDKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, _64>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));
  using TiledMmaDQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));

  // The Q/dO ring holds 64-row half tiles: a tile is two consecutive half stages, so the next
  // tile's first half loads while the consumers work on this tile's second (with one stage of
  // whole tiles the gather's latency stood between every two tiles: ncu, D 128 / block 128).
  // Block 128: both consumer warpgroups walk both halves; block 64: warpgroup w only half w.
  static constexpr int kQHalfStages = 2 * kQStages;
  static constexpr int kQConsumers = kStepsPerTile == 2 ? 2 * common::kThreadsPerWarpGroup : common::kThreadsPerWarpGroup;
  using SmemLayoutQHalf =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<_64, Int<kHeadDim>, Int<kQHalfStages>>{}));
  // The producer's gather addresses the half tile directly: a row is 128 bytes inside its
  // 64-column half, column halves are 64 rows apart, stages follow each other.
  static_assert(get_nonswizzle_portion(SmemLayoutQHalf{})(8, 0, 0) == 8 * 64 &&
                    get_nonswizzle_portion(SmemLayoutQHalf{})(0, 0, 1) == 64 * kHeadDim &&
                    (kHeadDim == 64 || get_nonswizzle_portion(SmemLayoutQHalf{})(0, 64, 0) == 64 * 64),
                "unexpected half-tile layout");
  static constexpr uint32_t kQHalfStageBytes = 64 * kHeadDim * sizeof(Element);
  // (d, row, stage) view: the B operands of dK += dS^T Q and dV += P^T dO.
  using SmemLayoutQHalfT = decltype(composition(
      SmemLayoutQHalf{}, make_ordered_layout(Shape<Int<kHeadDim>, _64, Int<kQHalfStages>>{}, Step<_2, _1, _3>{})));
  // dS^T staging: (key, row), 128 x 128 in the query tile's SW128 layout (rows contiguous), written
  // by stmatrix from the S^T accumulators (fwd::stage_fragment_rows: keys are its rows, tile rows
  // its columns); its (row, key) view is the MN-major A operand of dQ = dS K.
  using SmemLayoutdSt = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<_128, Int<kBlockM>>{}));
  static_assert(get_nonswizzle_portion(SmemLayoutdSt{})(8, 0) == 8 * 64 &&
                    get_nonswizzle_portion(SmemLayoutdSt{})(0, 64) == 128 * 64,
                "unexpected staging tile layout");
  using SmemLayoutdS =
      decltype(composition(SmemLayoutdSt{}, make_ordered_layout(Shape<Int<kBlockM>, _128>{}, Step<_2, _1>{})));
  // Two staging buffers, alternating by tile, so a warpgroup may stage the next tile's dS^T while
  // the other still reads this one's. A 64-key block uses key rows [0, 64) of the tile only, so
  // its second buffer is the unused key rows [64, 128) of the first.
  static constexpr int kStagingBufferElems = kBlockN == 128 ? cosize_v<SmemLayoutdSt> : 64 * 64;
  static constexpr int kStagingElems = cosize_v<SmemLayoutdSt> * (kBlockN == 128 ? 2 : 1);

  using QPipeline = cutlass::PipelineAsync<kQHalfStages>;
  using KVPipeline = cutlass::PipelineTmaAsync<kKVStages>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQHalf>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQHalf>, 1024> dout;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    cute::array_aligned<Element, kStagingElems, 1024> ds;
    int4 tile[kQHalfStages];  // (list, first entry, entries, first tile of a run) of each stage's tile
    int32_t row_token[kQHalfStages][64];     // flat query token of each row, -1 = padding row
    int32_t row_last_key[kQHalfStages][64];  // last key of the block the row sees (-1: none, padding)
    float row_lse[kQHalfStages][64];         // lse (log2 units) of each row
    float row_delta[kQHalfStages][64];       // rowsum(dO * O) - grad_lse of each row
    int grab_slot;                         // DynamicTileScheduler's hand-over
    typename QPipeline::SharedStorage q_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::bwd
