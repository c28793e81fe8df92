// Host side of the decoding kernels: TMA descriptors, grids, launches. Instantiated per (dtype,
// Di) for the indexer and per (dtype, D) for the attention in src/decode/*.cu.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "msa/common/launch.h"
#include "msa/decode/decode_attn_kernel.cuh"
#include "msa/decode/decode_select_kernel.cuh"
#include "msa/decode/decode_traits.cuh"
#include "msa/fwd/combine_kernel.cuh"
#include "msa/params.h"

namespace msa::decode {

constexpr int decode_topk_cap(int topk) { return topk <= 8 ? 8 : (topk <= 16 ? 16 : 32); }

template <class Element, int kHeadDimIdx, int kTopKCap>
cudaError_t launch_decode_select_cap(const DecodeParams& p, float* part_score, int32_t* part_id, int num_splits,
                                     cudaStream_t stream) {
  using Traits = DecodeSelectTraits<Element, kHeadDimIdx, kTopKCap>;
  const int rows = p.s_new * p.num_heads_kv;
  const int32_t total_q_rows = p.batch * rows;
  const int32_t cache_rows = static_cast<int32_t>(p.cache_rows);
  auto gQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q_idx)),
                        make_shape(total_q_rows, Int<kHeadDimIdx>{}), typename Traits::GmemStride{});
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_idx_cache)),
                        make_shape(cache_rows, Int<kHeadDimIdx>{}), typename Traits::GmemStride{});
  DecodeSelectParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gQ, typename Traits::SmemLayoutQ{}),
      make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutK{})),
      CacheGeometry::from(p),
      total_q_rows,
      cache_rows,
      part_score,
      part_id,
      p.s_new,
      p.num_heads_kv,
      num_splits,
      p.block_size,
      p.init_blocks,
      p.local_blocks,
  };
  auto kernel = decode_select_split_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(num_splits, (rows + Traits::kBlockQ - 1) / Traits::kBlockQ, p.batch);
  kernel<<<grid, Traits::kNumThreads, Traits::kSmemBytes, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  DecodeMergeParams mp{CacheGeometry::from(p), part_score, part_id, p.block_indices, p.s_new, p.num_heads_kv,
                       num_splits, p.block_size, p.topk, p.init_blocks, p.local_blocks};
  const int lists = 2 * num_splits;
  const int merge_smem = lists * kTopKCap * 8 + lists * 4;
  return common::launch_with_smem(decode_select_merge_kernel<kTopKCap>, static_cast<unsigned>(p.batch * rows), 128,
                                  merge_smem, stream, mp);
}

template <class Element, int kHeadDimIdx>
cudaError_t launch_decode_select(const DecodeParams& p, float* part_score, int32_t* part_id, int num_splits,
                                 cudaStream_t stream) {
  switch (decode_topk_cap(p.topk)) {
    case 8:
      return launch_decode_select_cap<Element, kHeadDimIdx, 8>(p, part_score, part_id, num_splits, stream);
    case 16:
      return launch_decode_select_cap<Element, kHeadDimIdx, 16>(p, part_score, part_id, num_splits, stream);
    default:
      return launch_decode_select_cap<Element, kHeadDimIdx, 32>(p, part_score, part_id, num_splits, stream);
  }
}

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_decode_attn_block(const DecodeParams& p, Element* part_o, float2* part_stats, cudaStream_t stream) {
  using Traits = DecodeAttnTraits<Element, kHeadDim, kBlockN>;
  const int32_t cache_rows = static_cast<int32_t>(p.cache_rows);
  const auto kv_stride = make_stride(static_cast<int64_t>(p.num_heads_kv) * kHeadDim, _1{}, Int<kHeadDim>{});
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_cache)),
                        make_shape(cache_rows, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto gV = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v_cache)),
                        make_shape(cache_rows, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto smem_tile = take<0, 2>(typename Traits::SmemLayoutKV{});
  DecodeAttnParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gK, smem_tile),
      make_tma_copy(SM90_TMA_LOAD{}, gV, smem_tile),
      CacheGeometry::from(p),
      cache_rows,
      static_cast<const Element*>(p.q),
      p.block_indices,
      part_o,
      part_stats,
      p.s_new,
      p.num_heads,
      p.num_heads_kv,
      p.num_heads / p.num_heads_kv,
      p.topk,
      (p.capacity + kBlockN - 1) / kBlockN,
      p.softmax_scale * 1.4426950408889634f,
  };
  auto kernel = decode_attn_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.topk, p.s_new * p.num_heads_kv, p.batch);
  kernel<<<grid, Traits::kNumThreads, Traits::kSmemBytes, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // Merge the slots: the prefill's combine, with the batch seen as padded (S_new queries per
  // request) and every id below the capacity's block count valid, as above.
  fwd::CombineParams<Element> cp{};
  cp.part_o = part_o;
  cp.part_stats = part_stats;
  cp.block_indices = p.block_indices;
  cp.out = static_cast<Element*>(p.out);
  cp.lse = p.lse;
  cp.cu_seqlens_q = nullptr;
  cp.cu_seqlens_k = nullptr;
  cp.batch = p.batch;
  cp.seqlen_q = p.s_new;
  cp.seqlen_k = p.capacity;
  cp.total_q = static_cast<int64_t>(p.batch) * p.s_new;
  cp.token_begin = 0;
  cp.token_end = cp.total_q;
  cp.num_heads = p.num_heads;
  cp.num_heads_kv = p.num_heads_kv;
  cp.topk = p.topk;
  cp.block_size = kBlockN;
  cp.num_blocks_max = (p.capacity + kBlockN - 1) / kBlockN;
  const int64_t pairs = cp.total_q * p.num_heads;
  fwd::combine_kernel<Element, kHeadDim><<<static_cast<unsigned>((pairs + 3) / 4), 128, 0, stream>>>(cp);
  return cudaGetLastError();
}

template <class Element, int kHeadDim>
cudaError_t launch_decode_attn(const DecodeParams& p, Element* part_o, float2* part_stats, cudaStream_t stream) {
  return p.block_size == 64 ? launch_decode_attn_block<Element, kHeadDim, 64>(p, part_o, part_stats, stream)
                            : launch_decode_attn_block<Element, kHeadDim, 128>(p, part_o, part_stats, stream);
}

}  // namespace msa::decode
