// Pieces shared by the forward's plan, main and combine kernels and the backward: the plan's
// parameters, list ids, which sequence a query token is in, and which slots take part.
#pragma once

#include <cstdint>

#include <cutlass/fast_math.h>

#include "msa/common/seqlen.cuh"

namespace msa::fwd {

struct PlanParams {
  const int32_t* block_indices;  // [total_q, Hkv, topk]
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int64_t token_begin, token_end;  // the query chunk being planned: flat tokens [begin, end)
  int num_heads_kv, topk, block_size, num_blocks_max;
  int tokens_per_tile;
  int num_lists;     // batch * Hkv * num_blocks_max
  int32_t* counts;   // [num_lists], zeroed before count
  int32_t* offsets;  // [num_lists + 1]; the last is the number of entries
  int32_t* cursor;   // [num_lists], zeroed before fill
  int32_t* tile_starts;  // [num_lists]: each list's first work item (scan), for the fill's work list
  int32_t* entries;  // [(token_end - token_begin) * Hkv * topk]: pack_entry(token - token_begin, slot)
  int4* work;        // [max_work]: (list, first entry, number of entries, 0), then a sentinel
  int32_t* num_work; // [1]
  int32_t* work_counter;  // [1]: the main kernel's dynamic scheduler, zeroed by the scan
};

// A list entry in 32 bits: the query token relative to the chunk (< 2^26, see kMaxChunkTokens)
// and the slot (< 32). Halves the entry traffic and the per-stage metadata in shared memory.
constexpr int64_t kMaxChunkTokens = int64_t{1} << 26;
__host__ __device__ __forceinline__ int32_t pack_entry(int64_t local_token, int slot) {
  return static_cast<int32_t>((local_token << 5) | slot);
}
__host__ __device__ __forceinline__ int entry_token(int32_t entry) { return entry >> 5; }
__host__ __device__ __forceinline__ int entry_slot(int32_t entry) { return entry & 31; }

// list id -> (sequence, group, key block); the divisors are kernel constants (FastDivmod:
// multiply-shift instead of a runtime division in every tile of every warp).
struct TileCoord {
  int batch_idx, group, block;
  __device__ TileCoord(int list, const cutlass::FastDivmod& blocks_div, const cutlass::FastDivmod& heads_kv_div) {
    int bg;
    blocks_div(bg, block, list);
    heads_kv_div(batch_idx, group, bg);
  }
};

// The largest i in [0, n) with sorted[i] <= value (0 when there is none), by binary search over
// an ascending array: the sequence of a token in cu_seqlens, the list of a work item in its starts.
template <class T>
__device__ __forceinline__ int last_index_at_most(const int32_t* sorted, int n, T value) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = lo + ((hi - lo + 1) >> 1);  // (lo + hi + 1) would overflow past 2^30 entries
    if (sorted[mid] <= value) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Sequence holding flat query token `token` (binary search over cu_seqlens_q for varlen).
__device__ __forceinline__ int sequence_of_query(int64_t token, const int32_t* cu_seqlens_q, int batch,
                                                 int seqlen_q) {
  if (cu_seqlens_q == nullptr) {
    return static_cast<int>(token / seqlen_q);
  }
  return last_index_at_most(cu_seqlens_q, batch, token);
}

// Key blocks of a sequence (the last may be partial).
__device__ __forceinline__ int num_key_blocks(const common::SeqInfo& seq, int block_size) {
  return (seq.seqlen_k + block_size - 1) / block_size;
}

// A slot takes part in attention when it names a block of its sequence; -1 and (with validation
// off) out-of-range ids are skipped by every stage alike, so nothing reads an unwritten partial.
__device__ __forceinline__ bool slot_is_valid(int block, int num_blocks) { return block >= 0 && block < num_blocks; }

// Calls fn(list, token, slot, valid) for every (token, group, slot) of the chunk. The walk is
// warp-collective: all 32 lanes of a warp call fn together (with valid false for the slots that
// take no part), and the lanes of a warp hold 32 consecutive tokens at the same (group, slot).
// Selections are sorted by block id, so the sink and local blocks sit at the same slot of
// neighbouring tokens and the plan's atomics on their hot lists can be merged per warp.
template <class Fn>
__device__ __forceinline__ void for_each_slot_warp(const PlanParams& p, Fn&& fn) {
  const int per_token = p.num_heads_kv * p.topk;
  const int64_t tokens = p.token_end - p.token_begin;
  const int64_t total = (tokens + 31) / 32 * per_token * 32;  // a multiple of 32: loops stay warp-uniform
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t warp_item = idx >> 5;
    const int rem = static_cast<int>(warp_item % per_token);  // (group, slot)
    const int64_t local = (warp_item / per_token) * 32 + (idx & 31);
    const int64_t token = p.token_begin + local;
    const int group = rem / p.topk;
    const int slot = rem - group * p.topk;
    int list = 0;
    bool valid = false;
    if (local < tokens) {
      const int block = p.block_indices[token * per_token + rem];
      const int b = sequence_of_query(token, p.cu_seqlens_q, p.batch, p.seqlen_q);
      const common::SeqInfo seq(b, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
      // Clamped to the list numbering: a max_seqlen_k below a sequence's true length (possible only
      // through a direct op call that skipped the host checks) must not index past the lists.
      const int num_blocks = min(num_key_blocks(seq, p.block_size), p.num_blocks_max);
      valid = slot_is_valid(block, num_blocks);
      // Only for valid slots: an out-of-range id (validation off) would overflow the product.
      if (valid) list = (b * p.num_heads_kv + group) * p.num_blocks_max + block;
    }
    fn(list, static_cast<int32_t>(token), slot, valid);
  }
}

// counters[list] += 1 for every lane with valid set, with one atomic per distinct list in the warp;
// returns, to each such lane, the counter's old value plus the lane's rank among its list's lanes.
// Called by all 32 lanes.
__device__ __forceinline__ int warp_aggregated_increment(int32_t* counters, int list, bool valid) {
  const unsigned lanes = __ballot_sync(0xffffffffu, valid);
  if (!valid) return 0;
  const int lane = threadIdx.x & 31;
  const unsigned peers = __match_any_sync(lanes, list);
  const int leader = __ffs(peers) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(counters + list, __popc(peers));
  base = __shfl_sync(lanes, base, leader);
  return base + __popc(peers & ((1u << lane) - 1));
}

}  // namespace msa::fwd
