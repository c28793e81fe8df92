// Decode selection, second half (MSA_SPEC s.4, s.8): a row's split lists -> its topk blocks.
// Run by the attention CTAs of the row themselves, right after the indexer grid completes. Each
// CTA of a row repeats it (the lists are ~17 KB in L2 at M3); a separate merge kernel cost a grid
// hand-off plus writing and re-reading the selection, about 0.5 us more per step (H200).
//
// The lists (one per indexer split, at most 256, each at most 32 entries, best first) become
// 64-bit keys: (order-preserving bits of the score) << 32 | ~id, so that "ranks before" (a higher
// score, or the same score and a lower block id) is one unsigned compare; an empty entry is 0.
// The winners are found by counting. The bar is the N-th best list head (N winners to find): N
// heads rank at or above it, so an entry below it cannot win. Every entry at or above it survives
// (about N..2N in practice); each counts the survivors above it, and the first N win. The result
// needs no list order; the bound on the survivors does: with sorted lists they come from the at
// most N lists whose heads are at or above the bar, so N x 32 entries hold them. The selection is the forced leading blocks, the
// winners in ascending order and the forced recent blocks, -1 padded.
// (The two-level tournament this replaces, 2 x N serial warp-reduction rounds, took 5 us and
// missed top blocks at M3 sizes, 31 of 32 rows at 128K x 8; its root cause was not isolated.)
#pragma once

#include <cstdint>

#include <cutlass/arch/barrier.h>

#include "msa/common/blocks.cuh"

namespace msa::decode {

constexpr int kMaxSplits = 256;   // lists per row (one head per thread when ranking them)
constexpr int kMaxWinners = 32;   // topk <= 32
constexpr int kMaxListCap = 32;
constexpr int kMaxSurvivors = kMaxWinners * kMaxListCap;

// Shared scratch of merge_row_selection: the keys, then the survivors.
constexpr int kMergeScratchBytes = (kMaxSplits + kMaxWinners) * kMaxListCap * 8;

struct MergeSmallStorage {
  alignas(16) uint64_t head[kMaxSplits];  // the lists' first entries, padded to 4
  uint64_t bar;
  int num_survivors;
  int num_lists_kept;           // lists whose head is at or above the bar
  int list_kept[kMaxWinners];
  int winner[kMaxWinners];
};

__device__ __forceinline__ uint64_t entry_key(float score, int id) {
  const uint32_t bits = __float_as_uint(score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return id < 0 ? 0ull : (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~id);
}

// Called by all 32 lanes of a warp: the lanes with keep set get consecutive slots from *counter
// (one atomic per warp, none when no lane keeps). The one-counter case of
// fwd::warp_aggregated_increment, without its per-list match.
__device__ __forceinline__ int warp_compact_slot(int* counter, bool keep, int lane) {
  const unsigned ballot = __ballot_sync(0xffffffff, keep);
  if (ballot == 0u) return 0;  // warp-uniform; most pieces hold no survivor
  int slot0 = 0;
  if (lane == 0) slot0 = atomicAdd(counter, __popc(ballot));
  slot0 = __shfl_sync(0xffffffff, slot0, 0);
  return slot0 + __popc(ballot & ((1u << lane) - 1u));
}

// All kThreads threads of the CTA (it synchronizes them): the row's lists (num_lists x cap
// entries at part_score / part_id, cap a power of two) -> selection[0, topk) in shared memory.
// pos is the query's position (< 0: nothing visible, all -1). `scratch` holds
// kMergeScratchBytes, 16-byte aligned.
template <int kThreads>
__device__ __forceinline__ void merge_row_selection(const float* part_score, const int32_t* part_id, int num_lists,
                                                    int cap, int pos, int block_size, int topk, int init_blocks,
                                                    int local_blocks, char* scratch, MergeSmallStorage& small,
                                                    int32_t* selection) {
  static_assert(kThreads >= kMaxSplits, "one list head per thread");
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (pos < 0) {  // a request shorter than its new tokens: this token sees nothing
    for (int s = threadIdx.x; s < topk; s += kThreads) selection[s] = -1;
    __syncthreads();
    return;
  }
  const common::BlockRanges ranges(pos / block_size, init_blocks, local_blocks);
  const int num_selected = max(0, min(min(topk, kMaxWinners) - ranges.num_forced(), ranges.num_candidates()));
  const int entries = num_lists * cap;
  uint64_t* s_key = reinterpret_cast<uint64_t*>(scratch);  // [entries]
  uint64_t* v_key = s_key + entries;                        // the survivors
  int taken = 0;
  if (num_selected > 0) {
    // 1. The lists -> keys in shared memory (16-byte loads, all in flight); the heads apart.
    const float4* src_score = reinterpret_cast<const float4*>(part_score);
    const int4* src_id = reinterpret_cast<const int4*>(part_id);
    const int n4 = entries / 4;
    for (int base = threadIdx.x; base < n4; base += 4 * kThreads) {
      float4 sc[4];
      int4 id[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * kThreads;
        if (e < n4) {
          sc[u] = __ldcg(src_score + e);
          id[u] = __ldcg(src_id + e);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * kThreads;
        if (e < n4) {
          const uint64_t k0 = entry_key(sc[u].x, id[u].x);
          reinterpret_cast<ulonglong2*>(s_key)[2 * e] = make_ulonglong2(k0, entry_key(sc[u].y, id[u].y));
          reinterpret_cast<ulonglong2*>(s_key)[2 * e + 1] =
              make_ulonglong2(entry_key(sc[u].z, id[u].z), entry_key(sc[u].w, id[u].w));
          if (((4 * e) & (cap - 1)) == 0) small.head[4 * e / cap] = k0;
        }
      }
    }
    const int padded = (num_lists + 3) / 4 * 4;
    if (static_cast<int>(threadIdx.x) >= num_lists && static_cast<int>(threadIdx.x) < padded) {
      small.head[threadIdx.x] = 0ull;
    }
    if (threadIdx.x == 0) {
      small.bar = 0ull;
      small.num_survivors = 0;
      small.num_lists_kept = 0;
    }
    if (threadIdx.x < kMaxWinners) small.winner[threadIdx.x] = -1;
    __syncthreads();
    // 2. The bar: the head with exactly num_selected - 1 heads above it (none when fewer lists
    // are non-empty; then every entry survives).
    if (static_cast<int>(threadIdx.x) < num_lists) {
      const uint64_t mine = small.head[threadIdx.x];
      int above = 0;
#pragma unroll 4
      for (int l = 0; l < padded; l += 4) {
        const ulonglong2 h01 = *reinterpret_cast<const ulonglong2*>(small.head + l);
        const ulonglong2 h23 = *reinterpret_cast<const ulonglong2*>(small.head + l + 2);
        above += (h01.x > mine) + (h01.y > mine) + (h23.x > mine) + (h23.y > mine);
      }
      if (mine != 0ull && above == num_selected - 1) small.bar = mine;
    }
    __syncthreads();
    // 3. The survivors (at or above the bar), compacted by warp-aggregated counts. Lists are
    // sorted, so only the lists whose head is at or above the bar hold any: num_selected of them
    // (keys are unique), or every non-empty list when fewer than num_selected are (bar 0); at most
    // kMaxWinners. Scanning those alone is 15 x 16 entries at M3 sizes instead of all (132 x 16 at
    // 1M x 2).
    const uint64_t bar = small.bar;
    if (warp * 32 < padded) {
      const bool is_list = static_cast<int>(threadIdx.x) < num_lists;
      const uint64_t head = is_list ? small.head[threadIdx.x] : 0ull;
      const bool holds = is_list && head != 0ull && head >= bar;
      const int slot = warp_compact_slot(&small.num_lists_kept, holds, lane);
      if (holds && slot < kMaxWinners) small.list_kept[slot] = static_cast<int>(threadIdx.x);
    }
    __syncthreads();
    const int kept_entries = min(small.num_lists_kept, kMaxWinners) * cap;
#pragma unroll 4
    for (int e0 = warp * 32; e0 < kept_entries; e0 += kThreads) {
      const int e = e0 + lane;
      const uint64_t k = e < kept_entries ? s_key[small.list_kept[e / cap] * cap + e % cap] : 0ull;
      const bool keep = k != 0ull && k >= bar;
      const int slot = warp_compact_slot(&small.num_survivors, keep, lane);
      if (keep && slot < kMaxSurvivors) v_key[slot] = k;  // below the bound for sorted lists
    }
    __syncthreads();
    // 4. Each survivor's rank among the survivors; the first num_selected win.
    const int n = min(small.num_survivors, kMaxSurvivors);
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const uint64_t mine = v_key[i];
      int above = 0;
#pragma unroll 4
      for (int j = 0; j < n; ++j) above += v_key[j] > mine;
      if (above < num_selected) small.winner[above] = static_cast<int>(~static_cast<uint32_t>(mine));
    }
    __syncthreads();
    taken = min(num_selected, n);
  }
  // The selection, by warp 0: winners in ascending order (lane k's rank among them is its slot
  // after the leading blocks), the forced blocks around them, -1 padded.
  if (warp == 0) {
    const int won_id = lane < taken ? small.winner[lane] : -1;
    int rank = 0;
    for (int k = 0; k < taken; ++k) rank += __shfl_sync(0xffffffff, won_id, k) < won_id;
    if (lane < taken) selection[ranges.init_end + rank] = won_id;
    const int recent_begin = ranges.init_end + taken;
    const int num_recent = ranges.local - ranges.local_begin + 1;
    for (int slot = lane; slot < topk; slot += 32) {
      if (slot < ranges.init_end) {
        selection[slot] = slot;
      } else if (slot >= recent_begin && slot < recent_begin + num_recent) {
        selection[slot] = ranges.local_begin + (slot - recent_begin);
      } else if (slot >= recent_begin + num_recent) {
        selection[slot] = -1;
      }
    }
  }
  // The scratch (generic-proxy writes) is refilled by TMA (the async proxy) next.
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}

}  // namespace msa::decode
