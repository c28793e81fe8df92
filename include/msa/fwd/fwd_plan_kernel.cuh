// Forward planning: invert block_indices into per-(sequence, group, key block) query lists (CSR)
// and cut every list into work tiles of at most tokens_per_tile tokens. Hot blocks (chosen by
// nearly every query) simply yield many tiles, so no CTA carries a long tail.
//
//   count:  counts[list] = number of (token, slot) pairs that chose the list's block
//   scan:   offsets = exclusive_scan(counts); tile_starts = exclusive_scan(ceil(counts / tokens_per_tile))
//   fill:   the work list, one item per tile; entries[offsets[list] + k] = pack_entry(token - token_begin,
//           slot), k from an atomic cursor
// count and fill merge the atomics of a warp's lanes on the same list (for_each_slot_warp): the
// sink block's list takes one atomic per token otherwise, and those serialize at one L2 address.
// The order of entries within a list depends on atomics; each row's result does not.
// Included by src/fwd/fwd_plan.cu only (non-template kernels).
#pragma once

#include <cub/block/block_scan.cuh>

#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

__global__ void plan_count_kernel(const PlanParams p) {
  for_each_slot_warp(p, [&](int list, int32_t, int, bool valid) { warp_aggregated_increment(p.counts, list, valid); });
}

// Work item i belongs to the last list whose first item is <= i (lists without tiles share their
// successor's start and are passed over).
__device__ __forceinline__ int list_of_work_item(const PlanParams& p, int item) {
  return last_index_at_most(p.tile_starts, p.num_lists, item);
}

__global__ void plan_fill_kernel(const PlanParams p) {
  const int num_work = *p.num_work;
  for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < num_work; item += gridDim.x * blockDim.x) {
    const int list = list_of_work_item(p, item);
    const int first = (item - p.tile_starts[list]) * p.tokens_per_tile;
    const int count = p.offsets[list + 1] - p.offsets[list];
    p.work[item] = make_int4(list, p.offsets[list] + first, min(p.tokens_per_tile, count - first), 0);
  }
  for_each_slot_warp(p, [&](int list, int32_t token, int slot, bool valid) {
    const int k = warp_aggregated_increment(p.cursor, list, valid);
    if (valid) p.entries[p.offsets[list] + k] = pack_entry(token - p.token_begin, slot);
  });
}

// One CTA: exclusive scans of the entry counts and of the tile counts. The tiles themselves are
// written by the fill's whole grid: one thread here would write all of a hot list's tiles.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) plan_scan_kernel(const PlanParams p) {
  using BlockScan = cub::BlockScan<int2, kThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int2 carry;
  if (threadIdx.x == 0) carry = make_int2(0, 0);
  __syncthreads();
  const auto add = [](int2 a, int2 b) { return make_int2(a.x + b.x, a.y + b.y); };
  for (int base = 0; base < p.num_lists; base += kThreads) {
    const int list = base + threadIdx.x;
    const int count = list < p.num_lists ? p.counts[list] : 0;
    const int tiles = (count + p.tokens_per_tile - 1) / p.tokens_per_tile;
    int2 prefix, total;
    BlockScan(temp).ExclusiveScan(make_int2(count, tiles), prefix, make_int2(0, 0), add, total);
    const int2 start = add(carry, prefix);
    if (list < p.num_lists) {
      p.offsets[list] = start.x;
      p.tile_starts[list] = start.y;
    }
    __syncthreads();  // every thread has read carry
    if (threadIdx.x == 0) carry = add(carry, total);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *p.num_work = carry.y;
    p.offsets[p.num_lists] = carry.x;
    p.work[carry.y] = make_int4(-1, 0, 0, 0);  // sentinel: the main kernel's consumers stop here
    *p.work_counter = 0;
  }
}

}  // namespace msa::fwd
