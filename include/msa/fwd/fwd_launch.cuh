// Host side of the forward: the path choice; for the KV-outer path the workspace layout, query
// chunking and plan -> main -> combine; the query-outer path is one launch without workspace.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <cute/tensor.hpp>
#include <cutlass/cuda_host_adapter.hpp>
#include <cutlass/fast_math.h>

#include "msa/fwd/combine_kernel.cuh"
#include "msa/fwd/fwd_kernel.cuh"
#include "msa/fwd/fwd_query_tile_kernel.cuh"
#include "msa/fwd/fwd_common.cuh"
#include "msa/fwd/fwd_traits.cuh"
#include "msa/fwd/plan_workspace.h"
#include "msa/common/launch.h"
#include "msa/params.h"

namespace msa::fwd {

// Partial outputs take Hq x topk x (D x 2 + 8) bytes per query; queries are processed in chunks
// so that they never exceed this budget (a 1M-token M3 prefill would otherwise need 256 GiB).
// MSA_FWD_PARTIAL_KIB overrides it (for measuring, and for tests that need many chunks).
constexpr int64_t kPartialBudgetBytes = int64_t{2} << 30;
inline int64_t partial_budget_bytes() {
  if (const char* env = std::getenv("MSA_FWD_PARTIAL_KIB")) {
    const long long kib = std::atoll(env);
    if (kib > 0) return int64_t{kib} << 10;
  }
  return kPartialBudgetBytes;
}

// The plan's pieces for one query chunk, then the chunk's partial outputs and their stats.
struct WorkspaceLayout : PlanWorkspace {
  int64_t chunk_tokens = 0;
  size_t part_o = 0, part_stats = 0;
  size_t total = 0;

  // Equal chunks that fit the budget (the last one no smaller than the others).
  static int64_t chunk_tokens_of(const FwdParams& p) {
    const int64_t per_token = static_cast<int64_t>(p.num_heads) * p.topk * (p.head_dim * 2 + 8);
    const int64_t cap = std::max<int64_t>(1, std::min(partial_budget_bytes() / per_token, kMaxChunkTokens));
    const int64_t chunks = std::max<int64_t>(1, (p.total_q + cap - 1) / cap);
    return std::max<int64_t>(1, (p.total_q + chunks - 1) / chunks);
  }
  // (The budget is read once: the plan's pieces and the partials are sized for the same chunk.)
  explicit WorkspaceLayout(const FwdParams& p) : WorkspaceLayout(p, chunk_tokens_of(p)) {}
  WorkspaceLayout(const FwdParams& p, int64_t chunk)
      : PlanWorkspace(chunk, p.batch, p.num_heads, p.num_heads_kv, p.topk, p.max_seqlen_k, p.block_size),
        chunk_tokens(chunk) {
    part_o = take(static_cast<size_t>(chunk_tokens) * p.num_heads * p.topk * p.head_dim * 2);
    part_stats = take(sizeof(float2) * chunk_tokens * p.num_heads * p.topk);
    total = end;
  }
};

// q viewed as [total_q * Hq, D] with 8-row x 64-column boxes in the 128-byte swizzle of the
// query tile: one box is 8 heads of one token in one half of D (fwd_kernel's G >= 8 path).
template <class Element, int kHeadDim>
cudaError_t make_query_box_descriptor(const FwdParams& p, cute::TmaDescriptor* desc) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(p.total_q * p.num_heads)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kHeadDim * sizeof(Element))};
  const cuuint32_t box[2] = {64, 8};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      cute::is_same_v<Element, cutlass::half_t> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult result = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      desc, type, 2, const_cast<void*>(p.q), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Merge parameters of the chunk [token_begin, token_end).
template <class Element>
CombineParams<Element> combine_params(const FwdParams& p, const WorkspaceLayout& ws, char* workspace,
                                      int64_t token_begin, int64_t token_end) {
  return CombineParams<Element>{
      reinterpret_cast<const Element*>(workspace + ws.part_o),
      reinterpret_cast<const float2*>(workspace + ws.part_stats),
      p.block_indices,
      static_cast<Element*>(p.out),
      p.lse,
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.batch,
      p.seqlen_q,
      p.seqlen_k,
      p.total_q,
      token_begin,
      token_end,
      p.num_heads,
      p.num_heads_kv,
      p.topk,
      p.block_size,
      ws.num_blocks_max,
  };
}

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_fwd_main(const FwdParams& p, const WorkspaceLayout& ws, char* workspace, int64_t token_begin,
                            cudaStream_t stream) {
  using Traits = FwdTraits<Element, kHeadDim, kBlockN>;
  const auto [tma_k, tma_v] = make_kv_tmas<Traits>(p);
  cute::TmaDescriptor tma_q{};
  if (p.num_heads / p.num_heads_kv >= 8) {
    cudaError_t err = make_query_box_descriptor<Element, kHeadDim>(p, &tma_q);
    if (err != cudaSuccess) return err;
  }
  FwdKernelParams<Traits> kp{
      tma_k,
      tma_v,
      tma_q,
      static_cast<int32_t>(p.total_k),
      static_cast<Element const*>(p.q),
      reinterpret_cast<const int32_t*>(workspace + ws.entries),
      reinterpret_cast<const int4*>(workspace + ws.work),
      reinterpret_cast<const int32_t*>(workspace + ws.num_work),
      reinterpret_cast<int32_t*>(workspace + ws.work_counter),
      reinterpret_cast<Element*>(workspace + ws.part_o),
      reinterpret_cast<float2*>(workspace + ws.part_stats),
      token_begin,
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.batch,
      p.seqlen_q,
      p.seqlen_k,
      p.num_heads,
      p.num_heads_kv,
      p.num_heads / p.num_heads_kv,
      p.topk,
      cutlass::FastDivmod(ws.num_blocks_max),
      cutlass::FastDivmod(p.num_heads_kv),
      p.softmax_scale * 1.4426950408889634f,
      __builtin_ctz(static_cast<unsigned>(p.num_heads / p.num_heads_kv)),
  };
  // Persistent: one CTA per SM walks the work list (its length is only known on the device).
  const cudaError_t err =
      common::launch_with_smem(fwd_kernel<Traits>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes, stream, kp);
  if (err == cudaSuccess) print_phase_cycles(stream);  // measurement builds only
  return err;
}

// Whether the query-outer kernel runs: it needs at most 32 key blocks per sequence. By default it
// is chosen when a query selects at least half of the blocks there are: it then computes at most
// about twice the attended keys (the union of a tile's selections) at about twice the KV-outer
// kernel's rate, with no partials to write and merge (M3 shape on an H200: 440 vs 188 TFLOPS at
// full coverage, bench/RESULTS.md).
inline bool use_query_outer(const FwdParams& p) {
  const int64_t num_blocks = (int64_t{p.max_seqlen_k} + p.block_size - 1) / p.block_size;
  if (num_blocks > kQueryOuterMaxBlocks || p.path == FwdPath::kKVOuter) return false;
  return p.path == FwdPath::kQueryOuter || num_blocks <= 2 * int64_t{p.topk};
}

template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_fwd_query_tile(const FwdParams& p, cudaStream_t stream) {
  using Traits = QueryTileTraits<Element, kHeadDim, kBlockN>;
  const auto [tma_k, tma_v] = make_kv_tmas<Traits>(p);
  const int group_size = p.num_heads / p.num_heads_kv;
  cute::TmaDescriptor tma_q{};
  if (group_size >= 8) {
    cudaError_t err = make_query_box_descriptor<Element, kHeadDim>(p, &tma_q);
    if (err != cudaSuccess) return err;
  }
  // Query sequences are no longer than key sequences (Sq <= Sk), so max_seqlen_k bounds them.
  const int tokens_per_tile = Traits::kBlockM / group_size;
  const int longest_q = p.seqlen_q > 0 ? p.seqlen_q : p.max_seqlen_k;
  const int tiles_per_seq = (longest_q + tokens_per_tile - 1) / tokens_per_tile;
  const int64_t num_tiles = int64_t{tiles_per_seq} * p.batch * p.num_heads_kv;
  if (num_tiles >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  if (num_tiles == 0) return cudaSuccess;
  QueryTileParams<Traits> kp{
      tma_k,
      tma_v,
      tma_q,
      static_cast<int32_t>(p.total_k),
      static_cast<Element const*>(p.q),
      p.block_indices,
      static_cast<Element*>(p.out),
      p.lse,
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.batch,
      p.seqlen_q,
      p.seqlen_k,
      p.total_q,
      p.num_heads,
      p.num_heads_kv,
      group_size,
      p.topk,
      __builtin_ctz(static_cast<unsigned>(group_size)),
      tiles_per_seq,
      static_cast<int>(num_tiles),
      cutlass::FastDivmod(p.batch * p.num_heads_kv),
      cutlass::FastDivmod(p.num_heads_kv),
      p.softmax_scale * 1.4426950408889634f,
  };
  const int grid = static_cast<int>(std::min<int64_t>(num_tiles, p.num_sms));
  return common::launch_with_smem(fwd_query_tile_kernel<Traits>, grid, Traits::kNumThreads, Traits::kSmemBytes, stream, kp);
}

// The combine of one query chunk as its own kernel: merges each (token, head)'s slot partials.
template <class Element, int kHeadDim>
cudaError_t launch_combine(const CombineParams<Element>& cp, cudaStream_t stream) {
  const int64_t pairs = (cp.token_end - cp.token_begin) * cp.num_heads;
  const unsigned grid = static_cast<unsigned>((pairs + 3) / 4);
  if (cp.topk <= 16) {
    combine_kernel<Element, kHeadDim, 16><<<grid, 128, 0, stream>>>(cp);
  } else {
    combine_kernel<Element, kHeadDim, 32><<<grid, 128, 0, stream>>>(cp);
  }
  return cudaGetLastError();
}

template <class Element, int kHeadDim>
cudaError_t run_fwd_for(const FwdParams& p, void* workspace_ptr, cudaStream_t stream) {
  if (use_query_outer(p)) {
    return p.block_size == 128 ? launch_fwd_query_tile<Element, kHeadDim, 128>(p, stream)
                               : launch_fwd_query_tile<Element, kHeadDim, 64>(p, stream);
  }
  const WorkspaceLayout ws(p);
  char* workspace = static_cast<char*>(workspace_ptr);
  return for_each_planned_chunk(p, ws, ws.chunk_tokens, workspace, stream,
                                [&](const PlanParams&, int64_t token_begin, int64_t token_end) {
                                  cudaError_t err =
                                      p.block_size == 128
                                          ? launch_fwd_main<Element, kHeadDim, 128>(p, ws, workspace, token_begin, stream)
                                          : launch_fwd_main<Element, kHeadDim, 64>(p, ws, workspace, token_begin, stream);
                                  if (err != cudaSuccess) return err;
                                  return launch_combine<Element, kHeadDim>(
                                      combine_params<Element>(p, ws, workspace, token_begin, token_end), stream);
                                });
}

}  // namespace msa::fwd
