// Compile-time configuration of the indexer distillation loss kernels (MSA_SPEC s.7).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <type_traits>

#include "msa/common/arch.cuh"

namespace msa::kl {

using namespace cute;

// Named barriers of the KL kernels (cutlass::arch::NamedBarrier adds CUTLASS's reserved count).
enum class KlBarrier : int {
  ProducerRows = 0,    // the producer warpgroup has written a stage's row data
  StagingWritten = 1,  // both consumer warpgroups have written dS to the staging tile
  StagingRead = 2,     // both consumer warpgroups' dK GEMMs have read the staging tile
  ProducerGrab = 3,    // the producer warpgroup has published the scheduler's next run
};

// A work tile is one selected key block and up to 128 query tokens of one group that chose it
// (the forward plan built with one row per token). The student (index scores s = q_idx k_idx^T)
// has one row per token; the teacher's G heads are walked one head per query stage, so the
// teacher and the student meet element for element in the same accumulator layout.
//   kStatsPass: pass 1, the student's per-(token, group, slot) max and exp-sum only.
//   otherwise:  pass 2, teacher, loss and both gradients.
// Element: bfloat16_t or half_t; kHeadDim = D, kIdxDim = Di in {64, 128}; kBlockN = block_size.
template <class Element_, int kHeadDim_, int kIdxDim_, int kBlockN_, bool kStatsPass_>
struct KlTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kIdxDim = kIdxDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kStatsPass = kStatsPass_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "D must be 64 or 128");
  static_assert(kIdxDim == 64 || kIdxDim == 128, "Di must be 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "block_size must be 64 or 128");

  static constexpr int kBlockM = 128;  // tokens per tile
  static constexpr int kRowsPerWarpGroup = 64;
  static constexpr int kNumMmaWarpGroups = 2;
  static constexpr int kNumMmaThreads = kNumMmaWarpGroups * common::kThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + common::kThreadsPerWarpGroup;
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = 224;
  static_assert(kProducerRegs + kNumMmaWarpGroups * kConsumerRegs <= (kNumMmaWarpGroups + 1) * 168);

  // Pass 2 holds one tile stage (index queries + row data) and two teacher head stages; pass 1
  // has no teacher, so it double-buffers the tile stage instead.
  static constexpr int kTileStages = kStatsPass ? 2 : 1;
  // Three head stages: the teacher loop waits on gathered query rows (each stage is a 128-row
  // gather from HBM), and with two the gathers could not stay ahead of the GEMM + exp of a head.
  static constexpr int kQStages = 3;
  // dS (tokens x keys) is staged in the tile's last query stage when it fits (block <= D), which
  // the consumers hold until the dK GEMM has read it; else in a buffer of its own.
  static constexpr bool kStageInQ = kBlockN <= kHeadDim;

  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;
  // Teacher queries of one head (token, d, stage); index queries (token, di, stage).
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kQStages>>{}));
  using SmemLayoutQi =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kIdxDim>, Int<kTileStages>>{}));
  // The producer's row gather addresses both tiles directly (see fwd::AttnTileTypes).
  static_assert(get_nonswizzle_portion(SmemLayoutQi{})(8, 0, 0) == 8 * 64 &&
                    (kTileStages == 1 || get_nonswizzle_portion(SmemLayoutQi{})(0, 0, 1) == kBlockM * kIdxDim) &&
                    (kIdxDim == 64 || get_nonswizzle_portion(SmemLayoutQi{})(0, 64, 0) == kBlockM * 64),
                "unexpected index query tile layout");
  static_assert(get_nonswizzle_portion(SmemLayoutQ{})(8, 0, 0) == 8 * 64 &&
                    get_nonswizzle_portion(SmemLayoutQ{})(0, 0, 1) == kBlockM * kHeadDim &&
                    (kHeadDim == 64 || get_nonswizzle_portion(SmemLayoutQ{})(0, 64, 0) == kBlockM * 64),
                "unexpected query tile layout");
  static constexpr uint32_t kQStageBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQiStageBytes = kBlockM * kIdxDim * sizeof(Element);
  // (token, di) -> (di, token): the B operand of dK_idx = dS^T q_idx.
  using SmemLayoutQit = decltype(composition(
      SmemLayoutQi{}, make_ordered_layout(Shape<Int<kIdxDim>, Int<kBlockM>, Int<kTileStages>>{}, Step<_2, _1, _3>{})));

  // The key block: main keys (pass 2 only) and index keys, one stage.
  using SmemLayoutK = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutKi = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kIdxDim>>{}));
  // (key, di) -> (di, key): the B operand of dQ_idx = dS k_idx.
  using SmemLayoutKit =
      decltype(composition(SmemLayoutKi{}, make_ordered_layout(Shape<Int<kIdxDim>, Int<kBlockN>>{}, Step<_2, _1>{})));
  static constexpr uint32_t kTmaBytesKV = kBlockN * (kStatsPass ? kIdxDim : kHeadDim + kIdxDim) * sizeof(Element);

  // dS staging: (token, key) in the K-major SW128 layout written by fwd::stage_rows_stmatrix; its
  // (key, token) view is the MN-major A operand dS^T of dK_idx.
  using SmemLayoutP = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  static_assert(get_nonswizzle_portion(SmemLayoutP{})(8, 0) == 8 * 64 &&
                    (kBlockN == 64 || get_nonswizzle_portion(SmemLayoutP{})(0, 64) == kBlockM * 64),
                "unexpected staging tile layout");
  // (key, token, stage) view of the staging tile: the MN-major A operand dS^T of dK_idx. In a
  // query stage, the staging tile is the stage's first kBlockN columns (same atom and row pitch).
  // (The strides are in SmemLayoutQ's (row, column, stage) domain: a compact ordered layout would
  // step stages by kBlockN columns, not by whole stages, when kBlockN < D.)
  using SmemLayoutPt = std::conditional_t<
      kStageInQ,
      decltype(composition(SmemLayoutQ{}, Layout<Shape<Int<kBlockN>, Int<kBlockM>, Int<kQStages>>,
                                                 Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>>{})),
      decltype(composition(SmemLayoutP{},
                           make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, _1>{}, Step<_2, _1, _3>{})))>;

  // Teacher S = Q_h K^T and student s = q_idx k_idx^T (tokens x keys, 64 tokens per warpgroup).
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));
  using TiledMmaIdx = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kIdxDim>>>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));
  // dQ_idx = dS k_idx (tokens x Di; dS from registers).
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kIdxDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));
  // dK_idx = dS^T q_idx (keys x Di): a 128-key block is split by keys between the warpgroups, a
  // 64-key block by Di.
  static constexpr bool kSplitKeys = kBlockN == 128;
  using TiledMmaDk = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float,
                           Shape<_64, Int<kSplitKeys ? kIdxDim : kIdxDim / 2>, Int<kBlockM>>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<Int<kSplitKeys ? 2 : 1>, Int<kSplitKeys ? 1 : 2>, _1>>{}));

  // Index keys in gmem: (token, di); K as in the forward: (token, d, kv head).
  using GmemTensorKi = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                            Shape<int32_t, Int<kIdxDim>>{}, Stride<Int<kIdxDim>, _1>{}));
  using TmaKi = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorKi{}, SmemLayoutKi{}));
  using GmemTensorK = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                           Shape<int32_t, Int<kHeadDim>, int32_t>{},
                                           Stride<int64_t, _1, Int<kHeadDim>>{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorK{}, SmemLayoutK{}));

  using TilePipeline = cutlass::PipelineAsync<kTileStages>;
  using QPipeline = cutlass::PipelineAsync<kQStages>;
  using KVPipeline = cutlass::PipelineTmaAsync<1>;

  // Pass 2 storage: D = Di = block = 128 takes 32 (q_idx) + 96 (Q, dS) + 64 (K, k_idx) KB.
  struct SharedStorageMain {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQi>, 1024> qi;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKi>, 1024> ki;
    cute::array_aligned<Element, kStageInQ ? 8 : cute::cosize_v<SmemLayoutP>, 1024> staging;  // unless kStageInQ
    int4 q_item[kQStages];                 // (list, first entry, entries, 0) of each head stage's tile
    int32_t q_row_token[kQStages][kBlockM];  // flat query token of each row, -1 = padding row
    float q_row_lse[kQStages][kBlockM];      // lse of the stage's head (log2 units, +inf: no key)
    int32_t t_row_token[kTileStages][kBlockM];
    float t_row_logz[kTileStages][kBlockM];  // the student's log-normaliser (log2 units)
    int grab_slot;
    typename TilePipeline::SharedStorage tile_pipeline;
    typename QPipeline::SharedStorage q_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  struct SharedStorageStats {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQi>, 1024> qi;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKi>, 1024> ki;
    int4 t_item[kTileStages];
    int32_t t_row_token[kTileStages][kBlockM];
    int32_t t_row_slot[kTileStages][kBlockM];
    int grab_slot;
    typename TilePipeline::SharedStorage tile_pipeline;
    typename KVPipeline::SharedStorage kv_pipeline;
  };
  using SharedStorage = std::conditional_t<kStatsPass, SharedStorageStats, SharedStorageMain>;
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::kl
