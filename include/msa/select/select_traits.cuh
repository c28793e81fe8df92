// Compile-time configuration of the fused block selector: tiles, pipeline depth, register split,
// MMA and the shared-memory plan.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"

namespace msa::select {

using namespace cute;

// Element: cutlass::bfloat16_t or cutlass::half_t. kHeadDimIdx: Di in {64, 128}.
// kTopKCap: length of each running list (8, 16 or 32); topk <= kTopKCap.
template <class Element_, int kHeadDimIdx_, int kTopKCap_>
struct SelectTraits {
  using Element = Element_;
  static constexpr int kHeadDimIdx = kHeadDimIdx_;
  static constexpr int kTopKCap = kTopKCap_;
  static_assert(kHeadDimIdx == 64 || kHeadDimIdx == 128, "Di must be 64 or 128");
  static_assert(kTopKCap == 8 || kTopKCap == 16 || kTopKCap == 32, "list length must be 8, 16 or 32");

  // 128 packed (token, index head) rows per CTA, split over two consumer warpgroups of 64 rows.
  static constexpr int kBlockQ = 128;
  // 128 keys per pipeline stage: one 128-token block or two 64-token blocks. Each key tile costs
  // kBlockQ x kBlockKV x Di MACs for kBlockKV x Di x 2 bytes read (from L2 mostly), the same
  // intensity as a FlashAttention-3 tile.
  static constexpr int kBlockKV = 128;
  static constexpr int kNumMmaWarpGroups = 2;
  static constexpr int kNumMmaThreads = kNumMmaWarpGroups * common::kThreadsPerWarpGroup;
  static constexpr int kNumThreads = kNumMmaThreads + common::kThreadsPerWarpGroup;  // + producer
  static constexpr int kStages = kHeadDimIdx == 128 ? 5 : 8;

  // The producer only issues TMA; the consumers hold a 64-float accumulator, the running lists
  // (2 x kTopKCap) and addressing.
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  // setmaxnreg only moves registers inside the launch allocation (168 per thread at 384 threads).
  static_assert(kProducerRegs + kNumMmaWarpGroups * kConsumerRegs <= (kNumMmaWarpGroups + 1) * 168,
                "register split exceeds the launch allocation: consumers would wait forever in setmaxnreg");

  using TileShapeQK = Shape<Int<kBlockQ>, Int<kBlockKV>, Int<kHeadDimIdx>>;
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockKV>, Int<kHeadDimIdx>>>(),
      Layout<Shape<Int<kNumMmaWarpGroups>, _1, _1>>{}));

  // Both operands are K-major (rows of Di contiguous): 128-byte swizzle, Di a multiple of 64.
  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockQ>, Int<kHeadDimIdx>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockKV>, Int<kHeadDimIdx>, Int<kStages>>{}));

  using MainloopPipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename MainloopPipeline::PipelineState;
  static constexpr uint32_t kTmaBytesK = kBlockKV * kHeadDimIdx * sizeof(Element);
  static constexpr uint32_t kTmaBytesQ = kBlockQ * kHeadDimIdx * sizeof(Element);

  // Gmem views the TMA descriptors are built over: rows x Di, row-major, contiguous.
  using GmemShape = Shape<int32_t, Int<kHeadDimIdx>>;
  using GmemStride = Stride<Int<kHeadDimIdx>, _1>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShape{},
                                          GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutK{})));

  // After the main loop the operand buffers are dead; the per-row candidate lists and the output
  // rows reuse them. +1 pads rows so the two list owners of neighbouring rows hit different banks.
  static constexpr int kListStride = 2 * kTopKCap + 1;
  struct EpilogueStorage {
    float score[kBlockQ * kListStride];
    int id[kBlockQ * kListStride];
    int slots[kBlockQ * kTopKCap];
  };
  struct MainloopStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
  };
  struct SharedStorage {
    union {
      MainloopStorage mainloop;
      EpilogueStorage epilogue;
    } tensors;
    typename MainloopPipeline::SharedStorage pipeline_k;
    cutlass::arch::ClusterTransactionBarrier barrier_q;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(sizeof(EpilogueStorage) <= sizeof(MainloopStorage), "epilogue must fit in the operand buffers");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
};

}  // namespace msa::select
