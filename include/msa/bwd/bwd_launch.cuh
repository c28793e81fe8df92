// Host side of the backward: workspace (the forward plan's lists for all query tokens at once),
// plan -> bwd_kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>

#include "msa/bwd/bwd_kernel.cuh"
#include "msa/bwd/bwd_traits.cuh"
#include "msa/fwd/fwd_common.cuh"
#include "msa/params.h"

namespace msa::fwd {
cudaError_t launch_fwd_plan(const PlanParams& plan, cudaStream_t stream);
}  // namespace msa::fwd

namespace msa::bwd {

constexpr int kRowsPerTile = 128;

// Byte offsets of the plan's pieces in the workspace, 256-byte aligned.
struct BwdWorkspaceLayout {
  int tokens_per_tile = 0;
  int num_blocks_max = 0;
  int num_lists = 0;
  int64_t max_entries = 0, max_work = 0;
  size_t counts = 0, offsets = 0, cursor = 0, entries = 0, work = 0, num_work = 0, work_counter = 0, total = 0;

  explicit BwdWorkspaceLayout(const BwdParams& p) {
    num_blocks_max = (p.max_seqlen_k + p.block_size - 1) / p.block_size;
    num_lists = p.batch * p.num_heads_kv * num_blocks_max;
    max_entries = p.total_q * p.num_heads_kv * p.topk;
    tokens_per_tile = kRowsPerTile / (p.num_heads / p.num_heads_kv);
    max_work = max_entries / tokens_per_tile + num_lists + 1;
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t start = at;
      at = (at + bytes + 255) / 256 * 256;
      return start;
    };
    counts = take(sizeof(int32_t) * num_lists);
    cursor = take(sizeof(int32_t) * num_lists);
    offsets = take(sizeof(int32_t) * num_lists);
    entries = take(sizeof(int32_t) * max_entries);
    work = take(sizeof(int4) * max_work);
    num_work = take(sizeof(int32_t));
    work_counter = take(sizeof(int32_t));
    total = at;
  }
};

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_bwd_main(const BwdParams& p, const BwdWorkspaceLayout& ws, char* workspace, cudaStream_t stream) {
  using Traits = BwdTraits<Element, kHeadDim, kBlockN>;
  const int32_t total_k = static_cast<int32_t>(p.total_k);
  const auto kv_stride = make_stride(static_cast<int64_t>(p.num_heads_kv) * kHeadDim, _1{}, Int<kHeadDim>{});
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)),
                        make_shape(total_k, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto gV = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v)),
                        make_shape(total_k, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto smem_tile = take<0, 2>(typename Traits::SmemLayoutKV{});
  const int group_size = p.num_heads / p.num_heads_kv;
  BwdKernelParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gK, smem_tile),
      make_tma_copy(SM90_TMA_LOAD{}, gV, smem_tile),
      total_k,
      static_cast<Element const*>(p.q),
      static_cast<Element const*>(p.dout),
      p.lse_log2,
      p.delta,
      p.dq_accum,
      p.dk_accum,
      p.dv_accum,
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
      __builtin_ctz(static_cast<unsigned>(group_size)),
      cutlass::FastDivmod(ws.num_blocks_max),
      cutlass::FastDivmod(p.num_heads_kv),
      p.softmax_scale,
      p.softmax_scale * 1.4426950408889634f,
  };
  auto kernel = bwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<p.num_sms, Traits::kNumThreads, Traits::kSmemBytes, stream>>>(kp);
  return cudaGetLastError();
}

template <class Element, int kHeadDim>
cudaError_t run_bwd_for(const BwdParams& p, void* workspace_ptr, cudaStream_t stream) {
  const BwdWorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  fwd::PlanParams plan{
      p.block_indices,
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.batch,
      p.seqlen_q,
      p.seqlen_k,
      0,
      p.total_q,
      p.num_heads_kv,
      p.topk,
      p.block_size,
      ws.num_blocks_max,
      ws.tokens_per_tile,
      ws.num_lists,
      reinterpret_cast<int32_t*>(workspace + ws.counts),
      reinterpret_cast<int32_t*>(workspace + ws.offsets),
      reinterpret_cast<int32_t*>(workspace + ws.cursor),
      reinterpret_cast<int32_t*>(workspace + ws.entries),
      reinterpret_cast<int4*>(workspace + ws.work),
      reinterpret_cast<int32_t*>(workspace + ws.num_work),
      reinterpret_cast<int32_t*>(workspace + ws.work_counter),
  };
  cudaError_t err = fwd::launch_fwd_plan(plan, stream);
  if (err != cudaSuccess) return err;
  return p.block_size == 128 ? launch_bwd_main<Element, kHeadDim, 128>(p, ws, workspace, stream)
                             : launch_bwd_main<Element, kHeadDim, 64>(p, ws, workspace, stream);
}

}  // namespace msa::bwd
