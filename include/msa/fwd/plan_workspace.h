// Host side of the plan (fwd_plan_kernel.cuh) shared by the KV-outer forward and the backward:
// where its pieces sit in the caller's workspace, and its launch parameters.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

constexpr int kRowsPerTile = 128;  // query rows of a work tile (tokens x G heads)

// Defined in src/fwd/fwd_plan.cu: zero the counters, count, scan, fill.
cudaError_t launch_fwd_plan(const PlanParams& plan, cudaStream_t stream);

// The fill leaves each list's entries in atomic order. For bitwise-reproducible tiles (the
// deterministic backward), sort_plan_entries writes every list's entries in ascending (token,
// slot) order to `sorted` ([max_entries]), using `temp` of plan_sort_temp_bytes(...) bytes.
size_t plan_sort_temp_bytes(int64_t max_entries, int num_lists);
cudaError_t sort_plan_entries(const PlanParams& plan, int32_t* sorted, int64_t max_entries, void* temp,
                              size_t temp_bytes, cudaStream_t stream);

// Byte offsets of the plan's pieces for a chunk of `chunk_tokens` query tokens, 256-byte aligned,
// starting at offset 0; `end` is where the caller's own pieces may follow (take()).
struct PlanWorkspace {
  int tokens_per_tile = 0;  // 128 rows = tokens_per_tile tokens x G heads
  int num_blocks_max = 0;
  int num_lists = 0;
  int64_t max_entries = 0;
  int64_t max_work = 0;
  size_t counts = 0, offsets = 0, cursor = 0, tile_starts = 0, entries = 0, work = 0, num_work = 0, work_counter = 0;
  size_t end = 0;

  PlanWorkspace(int64_t chunk_tokens, int batch, int num_heads, int num_heads_kv, int topk, int max_seqlen_k,
                int block_size) {
    num_blocks_max = static_cast<int>((int64_t{max_seqlen_k} + block_size - 1) / block_size);
    num_lists = batch * num_heads_kv * num_blocks_max;
    max_entries = chunk_tokens * num_heads_kv * topk;
    tokens_per_tile = kRowsPerTile / (num_heads / num_heads_kv);
    max_work = max_entries / tokens_per_tile + num_lists + 1;
    counts = take(sizeof(int32_t) * num_lists);
    cursor = take(sizeof(int32_t) * num_lists);
    tile_starts = take(sizeof(int32_t) * num_lists);
    offsets = take(sizeof(int32_t) * (num_lists + 1));
    entries = take(sizeof(int32_t) * max_entries);
    work = take(sizeof(int4) * max_work);
    num_work = take(sizeof(int32_t));
    work_counter = take(sizeof(int32_t));
  }

  // Reserves `bytes` after what is already taken; returns its offset.
  size_t take(size_t bytes) {
    const size_t start = end;
    end = (end + bytes + 255) / 256 * 256;
    return start;
  }

  // The plan of query tokens [token_begin, token_end) of a forward or backward parameter struct.
  template <class P>
  PlanParams plan_params(const P& p, char* workspace, int64_t token_begin, int64_t token_end) const {
    return PlanParams{
        p.block_indices,
        p.cu_seqlens_q,
        p.cu_seqlens_k,
        p.batch,
        p.seqlen_q,
        p.seqlen_k,
        token_begin,
        token_end,
        p.num_heads_kv,
        p.topk,
        p.block_size,
        num_blocks_max,
        tokens_per_tile,
        num_lists,
        reinterpret_cast<int32_t*>(workspace + counts),
        reinterpret_cast<int32_t*>(workspace + offsets),
        reinterpret_cast<int32_t*>(workspace + cursor),
        reinterpret_cast<int32_t*>(workspace + tile_starts),
        reinterpret_cast<int32_t*>(workspace + entries),
        reinterpret_cast<int4*>(workspace + work),
        reinterpret_cast<int32_t*>(workspace + num_work),
        reinterpret_cast<int32_t*>(workspace + work_counter),
    };
  }
};

// The forward's and the backward's loop over query chunks: for each chunk of at most
// `chunk_tokens` of the p.total_q query tokens, launches the chunk's plan, then calls
// launch_chunk(plan, token_begin, token_end) for what runs on it. Stops at the first error.
template <class P, class LaunchChunk>
cudaError_t for_each_planned_chunk(const P& p, const PlanWorkspace& ws, int64_t chunk_tokens, char* workspace,
                                   cudaStream_t stream, LaunchChunk&& launch_chunk) {
  for (int64_t token_begin = 0; token_begin < p.total_q; token_begin += chunk_tokens) {
    const int64_t token_end = std::min<int64_t>(p.total_q, token_begin + chunk_tokens);
    const PlanParams plan = ws.plan_params(p, workspace, token_begin, token_end);
    cudaError_t err = launch_fwd_plan(plan, stream);
    if (err == cudaSuccess) err = launch_chunk(plan, token_begin, token_end);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace msa::fwd
