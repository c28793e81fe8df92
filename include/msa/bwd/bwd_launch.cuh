// Host side of the backward: per query chunk, plan (the forward's lists for the chunk's tokens)
// -> bwd_kernel.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>

#include "msa/bwd/bwd_kernel.cuh"
#include "msa/bwd/bwd_preprocess.cuh"
#include "msa/bwd/bwd_traits.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/fwd/plan_workspace.h"
#include "msa/common/launch.h"
#include "msa/params.h"

namespace msa::bwd {

// Query tokens per backward launch. The dQ reductions of a chunk land in a region of
// chunk x Hq x D x 4 bytes (group by group: the lists are group-major), which stays in L2 when the
// chunk is small; with all tokens at once every token's dQ row was reduced into DRAM-resident
// memory (1 GB at 32K, M3 shape). Smaller chunks cost more K/V loads and dK/dV flushes (once per
// key block and chunk). MSA_BWD_CHUNK_TOKENS overrides the default (0: one chunk), for measuring.
constexpr int64_t kBwdChunkTokens = 4096;
inline int64_t bwd_chunk_tokens(const BwdParams& p) {
  int64_t chunk = kBwdChunkTokens;
  if (const char* env = std::getenv("MSA_BWD_CHUNK_TOKENS")) {
    const long long value = std::atoll(env);
    chunk = value > 0 ? value : p.total_q;
  }
  return std::max<int64_t>(1, std::min({p.total_q, chunk, fwd::kMaxChunkTokens - 1}));
}

// The plan's pieces for one query chunk and the chunk's dq accumulator (fp32, or int64 in
// deterministic mode). Deterministic mode adds the sorted copy of the entries and the sort's scratch.
struct BwdWorkspaceLayout : fwd::PlanWorkspace {
  int64_t chunk_tokens = 0;
  size_t dq_row_bytes = 0;  // one query token's Hq x D accumulator elements
  size_t dq_accum = 0, dq_accum_bytes = 0;
  size_t sorted_entries = 0, sort_temp = 0, sort_temp_bytes = 0;
  explicit BwdWorkspaceLayout(const BwdParams& p) : BwdWorkspaceLayout(p, bwd_chunk_tokens(p)) {}
  BwdWorkspaceLayout(const BwdParams& p, int64_t chunk)
      : PlanWorkspace(chunk, p.batch, p.num_heads, p.num_heads_kv, p.topk, p.max_seqlen_k, p.block_size),
        chunk_tokens(chunk) {
    dq_row_bytes = static_cast<size_t>(p.num_heads) * p.head_dim * (p.deterministic ? 8 : 4);
    dq_accum_bytes = static_cast<size_t>(chunk) * dq_row_bytes;
    dq_accum = take(dq_accum_bytes);
    if (p.deterministic) {
      sorted_entries = take(sizeof(int32_t) * max_entries);
      sort_temp_bytes = fwd::plan_sort_temp_bytes(max_entries, num_lists);
      sort_temp = take(sort_temp_bytes);
    }
  }
  size_t total() const { return end; }
};

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_bwd_main(const BwdParams& p, const BwdWorkspaceLayout& ws, char* workspace, int64_t token_begin,
                            cudaStream_t stream) {
  using Traits = BwdTraits<Element, kHeadDim, kBlockN>;
  const auto [tma_k, tma_v] = fwd::make_kv_tmas<Traits>(p);
  const int group_size = p.num_heads / p.num_heads_kv;
  // The kernel addresses dq by flat query token; the chunk's accumulator holds tokens from
  // token_begin on, so its base is moved back by token_begin rows (integer arithmetic: the address
  // itself is never dereferenced). This keeps the kernel's dQ epilogue, tight on registers, as it was.
  const uintptr_t dq_rows =
      reinterpret_cast<uintptr_t>(workspace + ws.dq_accum) - static_cast<uintptr_t>(token_begin) * ws.dq_row_bytes;
  BwdKernelParams<Traits> kp{
      tma_k,
      tma_v,
      static_cast<int32_t>(p.total_k),
      static_cast<Element const*>(p.q),
      static_cast<Element const*>(p.dout),
      p.lse_log2,
      p.delta,
      GradAccum{p.deterministic ? nullptr : reinterpret_cast<float*>(dq_rows),
                p.deterministic ? reinterpret_cast<unsigned long long*>(dq_rows) : nullptr, p.fixed_scale_q},
      GradAccum{p.dk_accum, p.dk_fixed, p.fixed_scale_k},
      GradAccum{p.dv_accum, p.dv_fixed, p.fixed_scale_v},
      reinterpret_cast<const int32_t*>(workspace + (p.deterministic ? ws.sorted_entries : ws.entries)),
      reinterpret_cast<const int4*>(workspace + ws.work),
      reinterpret_cast<const int32_t*>(workspace + ws.num_work),
      reinterpret_cast<int32_t*>(workspace + ws.work_counter),
      static_cast<int32_t>(token_begin),
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

// The chunk's dq rows from its accumulator, which is zeroed again for the next chunk.
template <class Element>
cudaError_t finish_dq_chunk(const BwdParams& p, const BwdWorkspaceLayout& ws, char* workspace, int64_t token_begin,
                            int64_t token_end, cudaStream_t stream) {
  const int64_t row = int64_t{p.num_heads} * p.head_dim;
  Element* dq = static_cast<Element*>(p.dq) + token_begin * row;
  const int64_t elements = (token_end - token_begin) * row;
  const int max_ctas = p.num_sms * 16;
  return p.deterministic
             ? launch_dq_finish<Element>(reinterpret_cast<long long*>(workspace + ws.dq_accum), dq, elements,
                                         1.0 / static_cast<double>(p.fixed_scale_q), max_ctas, stream)
             : launch_dq_finish<Element>(reinterpret_cast<float*>(workspace + ws.dq_accum), dq, elements, 1.0,
                                         max_ctas, stream);
}

template <class Element, int kHeadDim>
cudaError_t run_bwd_for(const BwdParams& p, void* workspace_ptr, cudaStream_t stream) {
  const BwdWorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  cudaError_t err = cudaMemsetAsync(workspace + ws.dq_accum, 0, ws.dq_accum_bytes, stream);
  if (err != cudaSuccess) return err;
  return fwd::for_each_planned_chunk(
      p, ws, ws.chunk_tokens, workspace, stream,
      [&](const fwd::PlanParams& plan, int64_t token_begin, int64_t token_end) {
        if (p.deterministic) {
          const cudaError_t sort_err =
              fwd::sort_plan_entries(plan, reinterpret_cast<int32_t*>(workspace + ws.sorted_entries), ws.max_entries,
                                     workspace + ws.sort_temp, ws.sort_temp_bytes, stream);
          if (sort_err != cudaSuccess) return sort_err;
        }
        const cudaError_t main_err =
            p.block_size == 128 ? launch_bwd_main<Element, kHeadDim, 128>(p, ws, workspace, token_begin, stream)
                                : launch_bwd_main<Element, kHeadDim, 64>(p, ws, workspace, token_begin, stream);
        if (main_err != cudaSuccess) return main_err;
        return finish_dq_chunk<Element>(p, ws, workspace, token_begin, token_end, stream);
      });
}

}  // namespace msa::bwd
