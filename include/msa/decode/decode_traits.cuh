// Compile-time configuration of the decoding kernels: the split decode indexer (scores + block max
// + running top-k over a slice of the index-key cache) and the split sparse decode attention (one
// selected block per CTA).
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"
#include "msa/decode/decode_merge.cuh"

// Measurement switches (bench/RESULTS.md, scripts/decode_fp8_diag.sh): -DMSA_DECODE_PROFILE_NO_SCALES
// skips the fp8 scale loads (wrong scores, timing only); -DMSA_DECODE_RING_KB=N sizes the indexer's
// key ring (default 80 KB per CTA).
#ifndef MSA_DECODE_RING_KB
#define MSA_DECODE_RING_KB 80
#endif

namespace msa::decode {

using namespace cute;

#ifdef MSA_DECODE_PROFILE_NO_SCALES
constexpr bool kDecodeProfileNoScales = true;
#else
constexpr bool kDecodeProfileNoScales = false;
#endif

// Decode indexer. A CTA owns up to kBlockQ packed (new token, index head) rows of one request
// (M3: 1 to 16 tokens x 4 heads) and a contiguous slice of the request's candidate blocks. It
// streams that slice of the index-key cache through a deep TMA ring, 64 keys per stage (a 64-key
// run never crosses a page: pages hold whole blocks of 64 or 128 keys), and keeps per row a
// running top-k.
//
// The WGMMA computes S^T = K q^T: the 64 keys of a stage are its M side and the query rows its N
// side (kBlockQ = 16 or 64, chosen by the row count). With the rows on M (the first version) a
// decoding step's 4 rows padded a 64-row tile, and the WGMMA re-read that padded query tile from
// shared memory at every stage: shared-memory traffic, not HBM, bounded the fp8 path. Swapped,
// a stage reads the keys once plus a 16-row query tile.
//
// fp8 index-key cache (kFp8Keys): the cache holds e4m3 keys and a float scale per token. Stages
// carry the raw e4m3 rows (half the bytes) and the 64 scales. Each consumer thread loads its
// keys' bytes straight into registers, widens them to fp16 there (exact: every e4m3 value is an
// fp16 value) and feeds them to a register-sourced WGMMA; the query tile is fp16 (bf16 queries
// are converted once: exact for values of normal fp16 range). Score rows are multiplied by their
// key's scale in fp32, so a score is q_idx . (k_e4m3 x scale) as the reference defines it.
template <class Element_, int kHeadDimIdx_, int kTopKCap_, bool kFp8Keys_ = false, int kBlockQ_ = 64>
struct DecodeSelectTraits {
  using Element = Element_;
  static constexpr int kHeadDimIdx = kHeadDimIdx_;
  static constexpr int kTopKCap = kTopKCap_;
  static constexpr bool kFp8Keys = kFp8Keys_;
  using KeyElement = std::conditional_t<kFp8Keys, cutlass::float_e4m3_t, Element>;
  static_assert(kHeadDimIdx == 64 || kHeadDimIdx == 128, "Di must be 64 or 128");
  static_assert(kTopKCap == 8 || kTopKCap == 16 || kTopKCap == 32, "list length must be 8, 16 or 32");

  static constexpr int kBlockQ = kBlockQ_;  // packed rows per CTA: the WGMMA's N
  static_assert(kBlockQ == 16 || kBlockQ == 64, "16 or 64 rows per CTA");
  static constexpr int kBlockKV = 64;       // keys per stage: the WGMMA's M
  static constexpr int kNumThreads = 2 * common::kThreadsPerWarpGroup;  // producer + consumer warpgroups
  static constexpr int kCtasPerSm = 2;
  static constexpr bool kProfileNoScales = kDecodeProfileNoScales;
  // Stages: 80 KB of keys in flight per CTA (MSA_DECODE_RING_KB).
  static constexpr int kStages =
      MSA_DECODE_RING_KB * 1024 / (kBlockKV * kHeadDimIdx * static_cast<int>(sizeof(KeyElement)));
  // The producer warpgroup gives registers to the consumer (fp8: the widened keys live in
  // registers); 40 + 216 = 2 x the 128 per thread of a 2-CTA launch.
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 216;
  using MmaElement = std::conditional_t<kFp8Keys, cutlass::half_t, Element>;

  using TiledMma = std::conditional_t<
      kFp8Keys,
      decltype(make_tiled_mma(GMMA::rs_op_selector<MmaElement, MmaElement, float,
                                                   Shape<Int<kBlockKV>, Int<kBlockQ>, Int<kHeadDimIdx>>,
                                                   GMMA::Major::K, GMMA::Major::K>())),
      decltype(make_tiled_mma(GMMA::ss_op_selector<MmaElement, MmaElement, float,
                                                   Shape<Int<kBlockKV>, Int<kBlockQ>, Int<kHeadDimIdx>>>()))>;

  // Key stages, swizzled as the key rows' byte width allows (the WGMMA operand for 16-bit keys;
  // for e4m3 keys the swizzle makes the consumer's 16-byte loads bank-conflict free).
  static constexpr int kKeyRowBytes = kHeadDimIdx * static_cast<int>(sizeof(KeyElement));
  using SmemLayoutAtomK = std::conditional_t<kKeyRowBytes % 128 == 0, GMMA::Layout_K_SW128_Atom<KeyElement>,
                                             GMMA::Layout_K_SW64_Atom<KeyElement>>;
  using SmemLayoutK =
      decltype(tile_to_shape(SmemLayoutAtomK{}, Shape<Int<kBlockKV>, Int<kHeadDimIdx>, Int<kStages>>{}));
  // The query rows as the WGMMA reads them (written by the consumer; fp8 keys: fp16, columns in
  // the order the widened key registers hold them).
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<MmaElement>{}, Shape<Int<kBlockQ>, Int<kHeadDimIdx>>{}));

  using MainloopPipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename MainloopPipeline::PipelineState;
  static constexpr uint32_t kTmaBytesK =
      kBlockKV * kHeadDimIdx * sizeof(KeyElement) + (kFp8Keys && !kProfileNoScales ? kBlockKV * sizeof(float) : 0);

  // Gmem views of the index-key cache [cache rows, Di] and (fp8) its scales [cache rows].
  using GmemShape = Shape<int32_t, Int<kHeadDimIdx>>;
  using GmemStride = Stride<Int<kHeadDimIdx>, _1>;
  using GmemTensorK = decltype(make_tensor(make_gmem_ptr(static_cast<KeyElement const*>(nullptr)), GmemShape{},
                                           GmemStride{}));
  using GmemTensorScale =
      decltype(make_tensor(make_gmem_ptr(static_cast<float const*>(nullptr)), Shape<int32_t>{}, Stride<_1>{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorK{}, take<0, 2>(SmemLayoutK{})));
  using SmemLayoutScale = Layout<Shape<Int<kBlockKV>, Int<kStages>>>;
  using TmaScale = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorScale{}, take<0, 1>(SmemLayoutScale{})));

  struct ScaleStorage {
    cute::array_aligned<float, cute::cosize_v<SmemLayoutScale>, 128> scale;
  };
  struct NoStorage {};
  struct SharedStorage {
    cute::array_aligned<KeyElement, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<MmaElement, cute::cosize_v<SmemLayoutQ>, 1024> q;
    std::conditional_t<kFp8Keys, ScaleStorage, NoStorage> fp8;
    float block_max[2][4][kBlockQ];  // per block: each warp's max over its keys, double-buffered
    typename MainloopPipeline::SharedStorage pipeline_k;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes * kCtasPerSm <= 226 * 1024, "shared memory budget exceeded");
  // The epilogue's list buffer ([kBlockQ][2][kTopKCap] scores and ids) reuses the key stages.
  static_assert(cute::cosize_v<SmemLayoutK> * sizeof(KeyElement) >= kBlockQ * 2 * kTopKCap * 8,
                "the epilogue's lists must fit in the key stages");
};

// Sparse decode attention. A CTA owns one (request, new token, group) row and a chunk of its
// selection's slots. Its two warpgroups first merge the indexer's lists into the row's selection
// (decode_merge.cuh, scratch in the K/V stages); then the first attends the G query heads of the
// token (rows 0..G-1 of a 64-row WGMMA tile) over the chunk's blocks with an online softmax, K/V
// streaming through a two-stage TMA ring; the row's chunks merge in a thread-block cluster (both
// warpgroups) or, where the clusters do not fit at once, in the last CTA of the row to finish.
// Decode attention is bandwidth-bound
// (each block is read once per token and group), so the padding rows cost only tensor-core time,
// which is idle anyway.
template <class Element_, int kHeadDim_, int kBlockN_>
struct DecodeAttnTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "D must be 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "block_size must be 64 or 128");

  static constexpr int kBlockM = 64;
  static constexpr int kNumThreads = common::kThreadsPerWarpGroup;  // the attention's warpgroup
  static constexpr int kCtaThreads = 2 * kNumThreads;  // both merge the lists, then one leaves
  static constexpr int kStages = 2;

  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>>()));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>()));

  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // K and V caches in gmem: (cache row, d, kv head), row stride Hkv * D.
  using GmemShapeKV = Shape<int32_t, Int<kHeadDim>, int32_t>;
  using GmemStrideKV = Stride<int64_t, _1, Int<kHeadDim>>;
  using GmemTensorKV = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShapeKV{},
                                            GmemStrideKV{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensorKV{}, take<0, 2>(SmemLayoutKV{})));

  static constexpr int kMaxSlots = 32;
  static constexpr int kMaxGroup = 16;  // query heads per KV group (the cluster merge's partial rows)
  static constexpr int kKVBytes = 2 * cute::cosize_v<SmemLayoutKV> * int(sizeof(Element));
  static constexpr int kMergeExtraBytes = kKVBytes >= kMergeScratchBytes ? 16 : kMergeScratchBytes - kKVBytes;
  static_assert(cute::cosize_v<SmemLayoutKV> * sizeof(Element) % 1024 == 0, "k, v and merge_extra are contiguous");
  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    // The merge's scratch is k, v and this (contiguous) before any block is loaded.
    char merge_extra[kMergeExtraBytes];
    MergeSmallStorage merge;
    cutlass::arch::ClusterTransactionBarrier barrier_k[kStages];
    cutlass::arch::ClusterTransactionBarrier barrier_v[kStages];
    int32_t selection[kMaxSlots];  // the row's selection
    int32_t blocks[kMaxSlots];     // the chunk's blocks to attend, in slot order
    int num_blocks;
    int is_last;                   // this CTA is the row's last to finish: it merges the chunks
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget exceeded");
  static constexpr uint32_t kTmaBytesBlock = kBlockN * kHeadDim * sizeof(Element);
};

}  // namespace msa::decode
