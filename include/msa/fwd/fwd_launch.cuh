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

// CTAs of each main kernel (after the first chunk's) that merge the previous chunk's partials
// while the others compute (streamed_combine); 0 runs the combine as its own kernel after each
// main kernel. MSA_FWD_COMBINE_CTAS overrides the default (for measuring).
constexpr int kCombineCtas = 16;
inline int combine_ctas(const FwdParams& p) {
  int ctas = kCombineCtas;
  if (const char* env = std::getenv("MSA_FWD_COMBINE_CTAS")) ctas = std::atoi(env);
  return std::max(0, std::min(ctas, p.num_sms / 2));
}

// The plan's pieces for one query chunk, then the chunk's partial outputs and their stats: one
// buffer, or two when the combine of a chunk overlaps the next chunk's main kernel.
struct WorkspaceLayout : PlanWorkspace {
  int64_t chunk_tokens = 0;
  int num_buffers = 1;
  size_t part_o[2] = {0, 0}, part_stats[2] = {0, 0};
  size_t total = 0;

  // Equal chunks that fit the budget (a small last chunk would leave its combine without work
  // to hide behind).
  static int64_t chunk_tokens_of(const FwdParams& p, int buffers) {
    const int64_t per_token = static_cast<int64_t>(p.num_heads) * p.topk * (p.head_dim * 2 + 8);
    const int64_t cap =
        std::max<int64_t>(1, std::min(partial_budget_bytes() / buffers / per_token, kMaxChunkTokens));
    const int64_t chunks = std::max<int64_t>(1, (p.total_q + cap - 1) / cap);
    return std::max<int64_t>(1, (p.total_q + chunks - 1) / chunks);
  }
  static int buffers_of(const FwdParams& p) {
    return combine_ctas(p) > 0 && chunk_tokens_of(p, 2) < p.total_q ? 2 : 1;
  }
  explicit WorkspaceLayout(const FwdParams& p) : WorkspaceLayout(p, buffers_of(p)) {}
  WorkspaceLayout(const FwdParams& p, int buffers)
      : PlanWorkspace(chunk_tokens_of(p, buffers), p.batch, p.num_heads, p.num_heads_kv, p.topk, p.max_seqlen_k,
                      p.block_size),
        chunk_tokens(chunk_tokens_of(p, buffers)),
        num_buffers(buffers) {
    for (int b = 0; b < num_buffers; ++b) {
      part_o[b] = take(static_cast<size_t>(chunk_tokens) * p.num_heads * p.topk * p.head_dim * 2);
      part_stats[b] = take(sizeof(float2) * chunk_tokens * p.num_heads * p.topk);
    }
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

// Merge parameters of the chunk [token_begin, token_end) whose partials are in buffer `buffer`.
template <class Element>
CombineParams<Element> combine_params(const FwdParams& p, const WorkspaceLayout& ws, char* workspace, int buffer,
                                      int64_t token_begin, int64_t token_end) {
  return CombineParams<Element>{
      reinterpret_cast<const Element*>(workspace + ws.part_o[buffer]),
      reinterpret_cast<const float2*>(workspace + ws.part_stats[buffer]),
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

// The main kernel of the chunk starting at token_begin, partials into buffer `buffer`; with
// `previous` (and combine_ctas > 0), its last combine_ctas CTAs merge that chunk meanwhile.
template <class Element, int kHeadDim, int kBlockN>
cudaError_t launch_fwd_main(const FwdParams& p, const WorkspaceLayout& ws, char* workspace, int buffer,
                            int64_t token_begin, const CombineParams<Element>* previous, int combine_ctas,
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
      reinterpret_cast<Element*>(workspace + ws.part_o[buffer]),
      reinterpret_cast<float2*>(workspace + ws.part_stats[buffer]),
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
      p.num_sms,
      {},
  };
  if (previous != nullptr && combine_ctas > 0) {
    kp.num_main_ctas = p.num_sms - combine_ctas;
    kp.previous_chunk = *previous;
  }
  // Persistent: one CTA per SM walks the work list (its length is only known on the device).
  return common::launch_with_smem(fwd_kernel<Traits>, p.num_sms, Traits::kNumThreads, Traits::kSmemBytes, stream, kp);
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
  combine_kernel<Element, kHeadDim><<<static_cast<unsigned>((pairs + 3) / 4), 128, 0, stream>>>(cp);
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
  // With two buffers, chunk c's partials go to buffer c % 2 and its merge runs inside chunk c + 1's
  // main kernel (the last chunk's on its own); with one, each chunk's merge follows its main kernel.
  const bool overlap = ws.num_buffers == 2;
  const int ctas = overlap ? combine_ctas(p) : 0;
  CombineParams<Element> previous{};
  bool have_previous = false;
  int buffer = 0;
  cudaError_t err = for_each_planned_chunk(
      p, ws, ws.chunk_tokens, workspace, stream,
      [&](const PlanParams&, int64_t token_begin, int64_t token_end) {
        cudaError_t e = p.block_size == 128
                            ? launch_fwd_main<Element, kHeadDim, 128>(p, ws, workspace, buffer, token_begin,
                                                                      have_previous ? &previous : nullptr, ctas, stream)
                            : launch_fwd_main<Element, kHeadDim, 64>(p, ws, workspace, buffer, token_begin,
                                                                     have_previous ? &previous : nullptr, ctas, stream);
        if (e != cudaSuccess) return e;
        previous = combine_params<Element>(p, ws, workspace, buffer, token_begin, token_end);
        have_previous = overlap;
        buffer = overlap ? buffer ^ 1 : 0;
        return overlap ? cudaSuccess : launch_combine<Element, kHeadDim>(previous, stream);
      },
      [&](PlanParams& plan, int64_t chunk) {
        // Invalid slots are marked in the stats only for the streamed merge (it reads no block_indices).
        if (overlap) {
          plan.invalid_slot_stats = reinterpret_cast<float2*>(workspace + ws.part_stats[chunk % 2]);
          plan.group_size = p.num_heads / p.num_heads_kv;
        }
      });
  if (err == cudaSuccess && have_previous) err = launch_combine<Element, kHeadDim>(previous, stream);
  return err;
}

}  // namespace msa::fwd
