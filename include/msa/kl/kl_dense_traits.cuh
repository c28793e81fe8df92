// Compile-time configuration of the dense warm-up indexer distillation loss (MSA_SPEC s.7, support =
// the whole causal history). Query-outer: a work item is 128 consecutive query tokens of one
// group and a chunk of the key blocks they see, so every operand is a plain TMA box (no gather,
// no plan) and dQ_idx stays in registers over the chunk. The accumulator layouts, the dS staging
// and the gradient GEMMs are the selected-support kernel's (KlTraits).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <type_traits>

#include "msa/kl/kl_traits.cuh"

namespace msa::kl {

using namespace cute;

//   kStatsPass: pass 1, per (token, group, key chunk) the max and exp-sum of the student's scores.
//   otherwise:  pass 2, teacher, loss and both gradients.
template <class Element_, int kHeadDim_, int kIdxDim_, int kBlockN_, bool kStatsPass_>
struct KlDenseTraits : KlTraits<Element_, kHeadDim_, kIdxDim_, kBlockN_, kStatsPass_> {
  using Base = KlTraits<Element_, kHeadDim_, kIdxDim_, kBlockN_, kStatsPass_>;
  using Element = Element_;
  using Base::kBlockM;
  using Base::kBlockN;
  using Base::kHeadDim;
  using Base::kIdxDim;
  using Base::kStatsPass;
  using typename Base::SmemLayoutAtom;

  // The producer is one thread issuing TMA; the consumers need every register they can get (the
  // teacher's S and P, and dQ_idx live across the chunk: 3 x 64 fp32 per thread).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kProducerRegs + Base::kNumMmaWarpGroups * kConsumerRegs <= (Base::kNumMmaWarpGroups + 1) * 168);

  // Stages. Pass 2: one q_idx tile per item, three teacher head stages (Base::kQStages), one K
  // stage (released after the last head's S, so the next block's K loads during the student
  // phase) and two k_idx stages (the student of block j reads one while the next is loaded).
  // Pass 1 has no teacher: two q_idx tiles and four k_idx stages keep its short blocks fed.
  static constexpr int kQiStages = kStatsPass ? 2 : 1;
  static constexpr int kKiStages = kStatsPass ? 4 : 2;
  static constexpr int kItemSlots = kQiStages + 1;  // see the producer: written before the acquire

  using SmemLayoutQStage = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // The single K stage as a (key, d, 1) tensor for the producer's staged TMA helper.
  using SmemLayoutKStage1 = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, _1>{}));
  using SmemLayoutQiStage = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kIdxDim>>{}));
  using SmemLayoutQi =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kIdxDim>, Int<kQiStages>>{}));
  using SmemLayoutQit = decltype(composition(
      SmemLayoutQi{}, make_ordered_layout(Shape<Int<kIdxDim>, Int<kBlockM>, Int<kQiStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKi =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kIdxDim>, Int<kKiStages>>{}));
  using SmemLayoutKit = decltype(composition(
      SmemLayoutKi{}, make_ordered_layout(Shape<Int<kIdxDim>, Int<kBlockN>, Int<kKiStages>>{}, Step<_2, _1, _3>{})));

  // Gmem views for TMA: q (token, d, head), q_idx (token, di, group), k (token, d, kv head),
  // k_idx (token, di).
  using GmemTensorRows3 = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)),
                                               Shape<int32_t, int32_t, int32_t>{}, Stride<int64_t, _1, int64_t>{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorRows3{}, SmemLayoutQStage{}));
  using TmaQi = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorRows3{}, SmemLayoutQiStage{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorRows3{}, typename Base::SmemLayoutK{}));
  using TmaKi = typename Base::TmaKi;  // one stage of SmemLayoutKi

  using QPipeline = cutlass::PipelineTmaAsync<Base::kQStages>;
  using QiPipeline = cutlass::PipelineTmaAsync<kQiStages>;
  using KPipeline = cutlass::PipelineTmaAsync<1>;
  using KiPipeline = cutlass::PipelineTmaAsync<kKiStages>;
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQiBytes = kBlockM * kIdxDim * sizeof(Element);
  static constexpr uint32_t kKBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKiBytes = kBlockN * kIdxDim * sizeof(Element);

  // (row tile, batch, group, key chunk) of a work item; m < 0: no more work.
  struct Item {
    int m, batch, group, chunk;
  };

  // Pass 2, D = Di = block = 128: 32 (q_idx) + 96 (Q, dS) + 32 (K) + 64 (k_idx) KB.
  struct SharedStorageMain {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQi>, 1024> qi;
    cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKi>, 1024> ki;
    cute::array_aligned<Element, Base::kStageInQ ? 8 : cute::cosize_v<typename Base::SmemLayoutP>, 1024> staging;
    Item item[kItemSlots];
    typename QiPipeline::SharedStorage qi_pipeline;
    typename QPipeline::SharedStorage q_pipeline;
    typename KPipeline::SharedStorage k_pipeline;
    typename KiPipeline::SharedStorage ki_pipeline;
  };
  struct SharedStorageStats {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQi>, 1024> qi;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKi>, 1024> ki;
    Item item[kItemSlots];
    typename QiPipeline::SharedStorage qi_pipeline;
    typename KiPipeline::SharedStorage ki_pipeline;
  };
  using SharedStorage = std::conditional_t<kStatsPass, SharedStorageStats, SharedStorageMain>;
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::kl
