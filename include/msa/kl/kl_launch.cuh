// Host side of the indexer distillation loss: workspace (the forward plan with one row per token,
// plus the per-slot student stats), plan -> pass 1 (stats) -> pass 2 (teacher, loss, gradients).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>
#include <cutlass/numeric_types.h>

#include "msa/common/launch.h"
#include "msa/fwd/plan_workspace.h"
#include "msa/kl/kl_kernel.cuh"
#include "msa/kl/kl_traits.cuh"
#include "msa/params.h"

namespace msa::kl {

// The plan for all query tokens at once, built with num_heads = Hkv so that a tile holds 128
// tokens (one student row each) instead of 128 / G; then the stats of pass 1.
struct KlWorkspaceLayout : fwd::PlanWorkspace {
  size_t logz = 0, stats = 0;
  explicit KlWorkspaceLayout(const KlParams& p)
      : PlanWorkspace(p.total_q, p.batch, /*num_heads=*/p.num_heads_kv, p.num_heads_kv, p.topk, p.max_seqlen_k,
                      p.block_size) {
    logz = take(sizeof(float) * p.total_q * p.num_heads_kv);
    stats = take(sizeof(float2) * p.total_q * p.num_heads_kv * p.topk);  // last: zeroed to the end
  }
  size_t total() const { return end; }
};

template <class Element, int kHeadDim, int kIdxDim, int kBlockN, bool kStatsPass>
cudaError_t launch_kl_pass(const KlParams& p, const KlWorkspaceLayout& ws, char* workspace, cudaStream_t stream) {
  using Traits = KlTraits<Element, kHeadDim, kIdxDim, kBlockN, kStatsPass>;
  const int32_t total_k = static_cast<int32_t>(p.total_k);
  auto gKi = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_idx)), make_shape(total_k, Int<kIdxDim>{}),
                         make_stride(Int<kIdxDim>{}, _1{}));
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)),
                        make_shape(total_k, Int<kHeadDim>{}, p.num_heads_kv),
                        make_stride(static_cast<int64_t>(p.num_heads_kv) * kHeadDim, _1{}, Int<kHeadDim>{}));
  const int group_size = p.num_heads / p.num_heads_kv;
  const float pairs = static_cast<float>(p.total_q * p.num_heads_kv);
  KlKernelParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gK, typename Traits::SmemLayoutK{}),
      make_tma_copy(SM90_TMA_LOAD{}, gKi, typename Traits::SmemLayoutKi{}),
      total_k,
      static_cast<Element const*>(p.q),
      static_cast<Element const*>(p.q_idx),
      p.lse_log2,
      reinterpret_cast<float2*>(workspace + ws.stats),
      reinterpret_cast<const float*>(workspace + ws.logz),
      p.dq_idx_accum,
      p.dk_idx_accum,
      p.loss_sum,
      reinterpret_cast<const int32_t*>(workspace + ws.entries),
      reinterpret_cast<const int4*>(workspace + ws.work),
      reinterpret_cast<const int32_t*>(workspace + ws.num_work),
      reinterpret_cast<int32_t*>(workspace + ws.work_counter),
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.seqlen_q,
      p.seqlen_k,
      p.num_heads,
      p.num_heads_kv,
      group_size,
      p.topk,
      cutlass::FastDivmod(ws.num_blocks_max),
      cutlass::FastDivmod(p.num_heads_kv),
      p.softmax_scale * 1.4426950408889634f,
      p.index_scale * 1.4426950408889634f,
      p.index_scale / pairs,
  };
  return common::launch_with_smem(kl_kernel<Traits>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes, stream, kp);
}

// kl_logz_kernel over every (token, group); defined in src/kl/kl_dispatch.cu.
cudaError_t launch_kl_logz(const float2* stats, float* logz, int64_t pairs, int topk, cudaStream_t stream);

// Pass 1 depends on (dtype, Di, block) only: instantiated once, in src/kl/kl_stats_*.cu.
template <class Element, int kIdxDim>
cudaError_t launch_kl_stats(const KlParams& p, const KlWorkspaceLayout& ws, char* workspace, cudaStream_t stream) {
  return p.block_size == 128 ? launch_kl_pass<Element, kIdxDim, kIdxDim, 128, true>(p, ws, workspace, stream)
                             : launch_kl_pass<Element, kIdxDim, kIdxDim, 64, true>(p, ws, workspace, stream);
}
#ifndef MSA_KL_STATS_TU
extern template cudaError_t launch_kl_stats<cutlass::bfloat16_t, 64>(const KlParams&, const KlWorkspaceLayout&, char*,
                                                                     cudaStream_t);
extern template cudaError_t launch_kl_stats<cutlass::bfloat16_t, 128>(const KlParams&, const KlWorkspaceLayout&, char*,
                                                                      cudaStream_t);
extern template cudaError_t launch_kl_stats<cutlass::half_t, 64>(const KlParams&, const KlWorkspaceLayout&, char*,
                                                                 cudaStream_t);
extern template cudaError_t launch_kl_stats<cutlass::half_t, 128>(const KlParams&, const KlWorkspaceLayout&, char*,
                                                                  cudaStream_t);
#endif

template <class Element, int kHeadDim, int kIdxDim>
cudaError_t run_kl_for(const KlParams& p, void* workspace_ptr, cudaStream_t stream) {
  const KlWorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  cudaError_t err = fwd::launch_fwd_plan(ws.plan_params(p, workspace, 0, p.total_q), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(workspace + ws.stats, 0, ws.end - ws.stats, stream);
  if (err != cudaSuccess) return err;
  err = launch_kl_stats<Element, kIdxDim>(p, ws, workspace, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(workspace + ws.work_counter, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  err = launch_kl_logz(reinterpret_cast<const float2*>(workspace + ws.stats),
                       reinterpret_cast<float*>(workspace + ws.logz), p.total_q * p.num_heads_kv, p.topk, stream);
  if (err != cudaSuccess) return err;
  return p.block_size == 128 ? launch_kl_pass<Element, kHeadDim, kIdxDim, 128, false>(p, ws, workspace, stream)
                             : launch_kl_pass<Element, kHeadDim, kIdxDim, 64, false>(p, ws, workspace, stream);
}

}  // namespace msa::kl
