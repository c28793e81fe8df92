// Host side of the backward: workspace (the forward plan's lists for all query tokens at once),
// plan -> bwd_kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>

#include "msa/bwd/bwd_kernel.cuh"
#include "msa/bwd/bwd_traits.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/fwd/plan_workspace.h"
#include "msa/common/launch.h"
#include "msa/params.h"

namespace msa::bwd {

// The plan's pieces for all query tokens at once (the backward has no partials to bound).
// Deterministic mode adds the sorted copy of the entries and the sort's scratch.
struct BwdWorkspaceLayout : fwd::PlanWorkspace {
  size_t sorted_entries = 0, sort_temp = 0, sort_temp_bytes = 0;
  explicit BwdWorkspaceLayout(const BwdParams& p)
      : PlanWorkspace(p.total_q, p.batch, p.num_heads, p.num_heads_kv, p.topk, p.max_seqlen_k, p.block_size) {
    if (p.deterministic) {
      sorted_entries = take(sizeof(int32_t) * max_entries);
      sort_temp_bytes = fwd::plan_sort_temp_bytes(max_entries, num_lists);
      sort_temp = take(sort_temp_bytes);
    }
  }
  size_t total() const { return end; }
};

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_bwd_main(const BwdParams& p, const BwdWorkspaceLayout& ws, char* workspace, cudaStream_t stream) {
  using Traits = BwdTraits<Element, kHeadDim, kBlockN>;
  const auto [tma_k, tma_v] = fwd::make_kv_tmas<Traits>(p);
  const int group_size = p.num_heads / p.num_heads_kv;
  BwdKernelParams<Traits> kp{
      tma_k,
      tma_v,
      static_cast<int32_t>(p.total_k),
      static_cast<Element const*>(p.q),
      static_cast<Element const*>(p.dout),
      p.lse_log2,
      p.delta,
      GradAccum{p.dq_accum, p.dq_fixed, p.fixed_scale_q},
      GradAccum{p.dk_accum, p.dk_fixed, p.fixed_scale_k},
      GradAccum{p.dv_accum, p.dv_fixed, p.fixed_scale_v},
      reinterpret_cast<const int32_t*>(workspace + (p.deterministic ? ws.sorted_entries : ws.entries)),
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
  return p.deterministic
             ? common::launch_with_smem(bwd_kernel<Traits, true>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes,
                                        stream, kp)
             : common::launch_with_smem(bwd_kernel<Traits, false>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes,
                                        stream, kp);
}

template <class Element, int kHeadDim>
cudaError_t run_bwd_for(const BwdParams& p, void* workspace_ptr, cudaStream_t stream) {
  const BwdWorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  const fwd::PlanParams plan = ws.plan_params(p, workspace, 0, p.total_q);
  cudaError_t err = fwd::launch_fwd_plan(plan, stream);
  if (err == cudaSuccess && p.deterministic) {
    err = fwd::sort_plan_entries(plan, reinterpret_cast<int32_t*>(workspace + ws.sorted_entries), ws.max_entries,
                                 workspace + ws.sort_temp, ws.sort_temp_bytes, stream);
  }
  if (err != cudaSuccess) return err;
  return p.block_size == 128 ? launch_bwd_main<Element, kHeadDim, 128>(p, ws, workspace, stream)
                             : launch_bwd_main<Element, kHeadDim, 64>(p, ws, workspace, stream);
}

}  // namespace msa::bwd
