// Host side of the decoding kernels: TMA descriptors, grids, launches. Instantiated per (dtype,
// Di) for the indexer and per (dtype, D) for the attention in src/decode/*.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include <cute/tensor.hpp>

#include "msa/common/launch.h"
#include "msa/common/topk.cuh"
#include "msa/decode/decode_attn_kernel.cuh"
#include "msa/decode/decode_select_kernel.cuh"
#include "msa/decode/decode_traits.cuh"
#include "msa/params.h"

namespace msa::decode {

template <class Element, int kHeadDimIdx, int kTopKCap, bool kFp8Keys, int kBlockQ>
cudaError_t launch_decode_select_tile(const DecodeParams& p, const DecodeWorkspace& ws, int num_splits,
                                      cudaStream_t stream) {
  using Traits = DecodeSelectTraits<Element, kHeadDimIdx, kTopKCap, kFp8Keys, kBlockQ>;
  using KeyElement = typename Traits::KeyElement;
  if (num_splits > kMaxSplits) return cudaErrorInvalidValue;
  const int rows = p.s_new * p.num_heads_kv;
  const int32_t cache_rows = static_cast<int32_t>(p.cache_rows);
  auto gK = make_tensor(make_gmem_ptr(static_cast<KeyElement const*>(p.k_idx_cache)),
                        make_shape(cache_rows, Int<kHeadDimIdx>{}), typename Traits::GmemStride{});
  auto tma_scale = [&] {
    if constexpr (kFp8Keys) {
      auto gS = make_tensor(make_gmem_ptr(static_cast<float const*>(p.k_idx_scale)), make_shape(cache_rows),
                            Stride<_1>{});
      return make_tma_copy(SM90_TMA_LOAD{}, gS, take<0, 1>(typename Traits::SmemLayoutScale{}));
    } else {
      return 0;
    }
  }();
  DecodeSelectParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutK{})),
      tma_scale,
      static_cast<const Element*>(p.q_idx),
      CacheGeometry::from(p),
      cache_rows,
      ws.part_score,
      ws.part_id,
      ws.row_arrivals,
      p.select_trace,
      p.s_new,
      p.num_heads_kv,
      num_splits,
      p.block_size,
      p.init_blocks,
      p.local_blocks,
  };
  // A programmatic dependent launch: the CTAs become resident while the append kernel (or the
  // caller's last kernel) runs. After an append they load what it cannot write (the query rows,
  // key rows below the old length) before waiting for it; after any other kernel they wait first.
  const dim3 grid(num_splits, (rows + kBlockQ - 1) / kBlockQ, p.batch);
  return common::launch_dependent(decode_select_split_kernel<Traits>, grid, Traits::kNumThreads, Traits::kSmemBytes,
                                  stream, kp, p.programmatic_launch);
}

template <class Element, int kHeadDimIdx, int kTopKCap, bool kFp8Keys>
cudaError_t launch_decode_select_cap(const DecodeParams& p, const DecodeWorkspace& ws, int num_splits,
                                     cudaStream_t stream) {
  return decode_select_block_q(p.s_new * p.num_heads_kv) == 16
             ? launch_decode_select_tile<Element, kHeadDimIdx, kTopKCap, kFp8Keys, 16>(p, ws, num_splits, stream)
             : launch_decode_select_tile<Element, kHeadDimIdx, kTopKCap, kFp8Keys, 64>(p, ws, num_splits, stream);
}

template <class Element, int kHeadDimIdx, bool kFp8Keys>
cudaError_t launch_decode_select(const DecodeParams& p, const DecodeWorkspace& ws, int num_splits,
                                 cudaStream_t stream) {
  switch (common::topk_list_cap(p.topk)) {
    case 8:
      return launch_decode_select_cap<Element, kHeadDimIdx, 8, kFp8Keys>(p, ws, num_splits, stream);
    case 16:
      return launch_decode_select_cap<Element, kHeadDimIdx, 16, kFp8Keys>(p, ws, num_splits, stream);
    default:
      return launch_decode_select_cap<Element, kHeadDimIdx, 32, kFp8Keys>(p, ws, num_splits, stream);
  }
}

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_decode_attn_block(const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  using Traits = DecodeAttnTraits<Element, kHeadDim, kBlockN>;
  // The caches are K/V tensors of cache_rows tokens: the prefill's TMA construction applies.
  struct {
    const void* k;
    const void* v;
    int64_t total_k;
    int num_heads_kv;
  } const caches{p.k_cache, p.v_cache, p.cache_rows, p.num_heads_kv};
  auto [tma_k, tma_v] = fwd::make_kv_tmas<Traits>(caches);
  DecodeAttnParams<Traits> kp{
      tma_k,
      tma_v,
      CacheGeometry::from(p),
      static_cast<int32_t>(p.cache_rows),
      static_cast<const Element*>(p.q),
      p.block_indices,
      ws.part_score,
      ws.part_id,
      static_cast<Element*>(ws.part_o),
      ws.part_stats,
      ws.row_arrivals,
      p.select_trace == nullptr ? nullptr : p.select_trace + kTraceMaxCtas * kDecodeTraceSlots,
      static_cast<Element*>(p.out),
      p.lse,
      p.s_new,
      p.num_heads,
      p.num_heads_kv,
      p.num_heads / p.num_heads_kv,
      p.topk,
      (p.capacity + kBlockN - 1) / kBlockN,
      0,
      0,
      0,
      decode_select_splits(p),
      common::topk_list_cap(p.topk),  // the indexer's list length
      p.block_size,
      p.init_blocks,
      p.local_blocks,
      p.softmax_scale * 1.4426950408889634f,
  };
  // Chunks per row: about one CTA per SM in all (one CTA per SM: two K/V stages of up to 64 KB).
  const int rows = p.batch * p.s_new * p.num_heads_kv;
  const int want_chunks = (p.num_sms + rows - 1) / rows;
  kp.slots_per_cta = (p.topk + want_chunks - 1) / want_chunks;
  kp.num_chunks = (p.topk + kp.slots_per_cta - 1) / kp.slots_per_cta;
  // The row's chunks as one cluster (merged through distributed shared memory) when the device
  // holds every row's cluster at once; if the chunks of that grid do not fit (an H200 holds 7
  // clusters of 16 CTAs at one CTA per SM, and 30 of 4), larger chunks (fewer, bigger clusters'
  // CTAs) up to twice the slots per CTA; else the global partials and the last CTA's merge.
  if (decode_cluster_merge_enabled()) {
    // Per cluster size: 0 unknown, else clusters + 1. Asked once per process: the answer depends
    // on the kernel and the GPU model, taken to be the same on every device.
    static int fits[kMaxClusterChunks + 1] = {};
    for (int slots = kp.slots_per_cta; slots <= 2 * kp.slots_per_cta && slots <= p.topk; ++slots) {
      const int chunks = (p.topk + slots - 1) / slots;
      if (chunks < 2) break;
      if (chunks > kMaxClusterChunks) continue;
      int& known = fits[chunks];
      if (known == 0) {
        known = 1 + common::max_active_clusters(decode_attn_kernel<Traits>, Traits::kCtaThreads, Traits::kSmemBytes,
                                                chunks);
        if (std::getenv("MSA_DECODE_LOG_CLUSTERS") != nullptr) {  // measurement aid
          std::fprintf(stderr, "msa decode attention: clusters of %d CTAs, %d fit at once\n", chunks, known - 1);
        }
      }
      if (known - 1 >= rows) {
        kp.slots_per_cta = slots;
        kp.num_chunks = chunks;
        kp.cluster_combine = 1;
        break;
      }
    }
  }
  const dim3 grid(kp.num_chunks, p.s_new * p.num_heads_kv, p.batch);
  if (static_cast<int64_t>(grid.x) * grid.y * grid.z > kTraceMaxCtas) kp.trace = nullptr;
  return common::launch_dependent(decode_attn_kernel<Traits>, grid, Traits::kCtaThreads, Traits::kSmemBytes, stream,
                                  kp, p.programmatic_launch, kp.cluster_combine ? kp.num_chunks : 1);
}

template <class Element, int kHeadDim>
cudaError_t launch_decode_attn(const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  return p.block_size == 64 ? launch_decode_attn_block<Element, kHeadDim, 64>(p, ws, stream)
                            : launch_decode_attn_block<Element, kHeadDim, 128>(p, ws, stream);
}

}  // namespace msa::decode
