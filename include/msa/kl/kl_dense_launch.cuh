// Host side of the dense warm-up distillation loss: workspace (per-chunk student stats, the
// student's normaliser, two work counters), pass 1 (stats) -> merge -> pass 2 (teacher, loss,
// gradients). No host synchronization; the chunking depends on the maximum lengths only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "msa/common/launch.h"
#include "msa/kl/kl_dense_kernel.cuh"
#include "msa/kl/kl_dense_traits.cuh"
#include "msa/params.h"

namespace msa::kl {

// kl_logz_kernel over every (token, group); defined in src/kl/kl_dispatch.cu.
cudaError_t launch_kl_logz(const float2* stats, float* logz, int64_t pairs, int topk, cudaStream_t stream);

// How a row tile's key blocks are cut into work items: chunks of at least 8 blocks (a chunk's
// dQ_idx and its stats entry are paid once per chunk), at most 16 chunks per tile (bounds the
// stats: 8 B per (token, group, chunk)).
struct DenseChunking {
  int num_row_tiles = 0, num_chunks = 0, chunk_blocks = 0;
  explicit DenseChunking(const KlParams& p) {
    const int max_seqlen_q = p.cu_seqlens_q != nullptr ? p.max_seqlen_q : p.seqlen_q;
    num_row_tiles = (max_seqlen_q + 127) / 128;
    const int num_blocks = (p.max_seqlen_k + p.block_size - 1) / p.block_size;
    chunk_blocks = std::max(8, (num_blocks + 15) / 16);
    num_chunks = (num_blocks + chunk_blocks - 1) / chunk_blocks;
  }
};

struct KlDenseWorkspaceLayout {
  DenseChunking chunking;
  size_t stats = 0, logz = 0, counters = 0, end = 0;
  explicit KlDenseWorkspaceLayout(const KlParams& p) : chunking(p) {
    auto take = [&](size_t bytes) {
      const size_t at = end;
      end += (bytes + 255) / 256 * 256;
      return at;
    };
    logz = take(sizeof(float) * p.total_q * p.num_heads_kv);
    counters = take(2 * sizeof(int32_t));  // zeroed together with the stats
    stats = take(sizeof(float2) * p.total_q * p.num_heads_kv * chunking.num_chunks);
  }
};

template <class Element, int kHeadDim, int kIdxDim, int kBlockN, bool kStatsPass>
cudaError_t launch_kl_dense_pass(const KlParams& p, const KlDenseWorkspaceLayout& ws, char* workspace,
                                 cudaStream_t stream) {
  using Traits = KlDenseTraits<Element, kHeadDim, kIdxDim, kBlockN, kStatsPass>;
  const DenseChunking& chunking = ws.chunking;
  const int32_t total_q = static_cast<int32_t>(p.total_q), total_k = static_cast<int32_t>(p.total_k);
  const int hq = p.num_heads, hkv = p.num_heads_kv;
  auto rows3 = [](const void* ptr, int32_t rows, int cols, int heads) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), make_shape(rows, cols, heads),
                       make_stride(static_cast<int64_t>(heads) * cols, _1{}, static_cast<int64_t>(cols)));
  };
  auto gKi = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_idx)), make_shape(total_k, Int<kIdxDim>{}),
                         make_stride(Int<kIdxDim>{}, _1{}));
  const float pairs = static_cast<float>(p.total_q * p.num_heads_kv);
  int32_t* counters = reinterpret_cast<int32_t*>(workspace + ws.counters);
  KlDenseKernelParams<Traits> kp{
      // Pass 1 reads no teacher operands: its unused q / k descriptors describe q_idx / k_idx (D = Di there).
      make_tma_copy(SM90_TMA_LOAD{},
                    kStatsPass ? rows3(p.q_idx, total_q, kHeadDim, hkv) : rows3(p.q, total_q, kHeadDim, hq),
                    typename Traits::SmemLayoutQStage{}),
      make_tma_copy(SM90_TMA_LOAD{}, rows3(p.q_idx, total_q, kIdxDim, hkv), typename Traits::SmemLayoutQiStage{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    kStatsPass ? rows3(p.k_idx, total_k, kHeadDim, 1) : rows3(p.k, total_k, kHeadDim, hkv),
                    typename Traits::SmemLayoutK{}),
      make_tma_copy(SM90_TMA_LOAD{}, gKi, typename Traits::Base::SmemLayoutKi{}),
      total_q,
      total_k,
      p.lse_log2,
      reinterpret_cast<float2*>(workspace + ws.stats),
      reinterpret_cast<const float*>(workspace + ws.logz),
      p.dq_idx_accum,
      p.dk_idx_accum,
      p.loss_sum,
      counters + (kStatsPass ? 0 : 1),
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.seqlen_q,
      p.seqlen_k,
      p.batch,
      hq,
      hkv,
      hq / hkv,
      chunking.num_row_tiles,
      chunking.num_chunks,
      chunking.chunk_blocks,
      p.softmax_scale * 1.4426950408889634f,
      p.index_scale * 1.4426950408889634f,
      p.index_scale / pairs,
  };
  return common::launch_with_smem(kl_dense_kernel<Traits>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes, stream,
                                  kp);
}

// Pass 1 depends on (dtype, Di, block) only: instantiated once, in src/kl/kl_dense_stats_*.cu.
template <class Element, int kIdxDim>
cudaError_t launch_kl_dense_stats(const KlParams& p, const KlDenseWorkspaceLayout& ws, char* workspace,
                                  cudaStream_t stream) {
  return p.block_size == 128
             ? launch_kl_dense_pass<Element, kIdxDim, kIdxDim, 128, true>(p, ws, workspace, stream)
             : launch_kl_dense_pass<Element, kIdxDim, kIdxDim, 64, true>(p, ws, workspace, stream);
}
#ifndef MSA_KL_DENSE_STATS_TU
extern template cudaError_t launch_kl_dense_stats<cutlass::bfloat16_t, 64>(const KlParams&,
                                                                           const KlDenseWorkspaceLayout&, char*,
                                                                           cudaStream_t);
extern template cudaError_t launch_kl_dense_stats<cutlass::bfloat16_t, 128>(const KlParams&,
                                                                            const KlDenseWorkspaceLayout&, char*,
                                                                            cudaStream_t);
extern template cudaError_t launch_kl_dense_stats<cutlass::half_t, 64>(const KlParams&, const KlDenseWorkspaceLayout&,
                                                                       char*, cudaStream_t);
extern template cudaError_t launch_kl_dense_stats<cutlass::half_t, 128>(const KlParams&, const KlDenseWorkspaceLayout&,
                                                                        char*, cudaStream_t);
#endif

template <class Element, int kHeadDim, int kIdxDim>
cudaError_t run_kl_dense_for(const KlParams& p, void* workspace_ptr, cudaStream_t stream) {
  const KlDenseWorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  cudaError_t err = cudaMemsetAsync(workspace + ws.counters, 0, ws.end - ws.counters, stream);
  if (err == cudaSuccess) err = launch_kl_dense_stats<Element, kIdxDim>(p, ws, workspace, stream);
  if (err == cudaSuccess) {
    err = launch_kl_logz(reinterpret_cast<const float2*>(workspace + ws.stats),
                         reinterpret_cast<float*>(workspace + ws.logz), p.total_q * p.num_heads_kv,
                         ws.chunking.num_chunks, stream);
  }
  if (err != cudaSuccess) return err;
  return p.block_size == 128 ? launch_kl_dense_pass<Element, kHeadDim, kIdxDim, 128, false>(p, ws, workspace, stream)
                             : launch_kl_dense_pass<Element, kHeadDim, kIdxDim, 64, false>(p, ws, workspace, stream);
}

}  // namespace msa::kl
