// Forward planning: invert block_indices into per-(sequence, group, key block) query lists (CSR)
// and cut every list into work tiles of at most tokens_per_tile tokens. Hot blocks (chosen by
// nearly every query) simply yield many tiles, so no CTA carries a long tail.
//
//   count:  counts[list] = number of (token, slot) pairs that chose the list's block
//   scan:   offsets = exclusive_scan(counts); tiles = ceil(counts / tokens_per_tile); work list
//   fill:   entries[offsets[list] + k] = pack_entry(token - token_begin, slot), k from an atomic cursor
// The order of entries within a list depends on atomics; each row's result does not.
// Included by src/fwd/fwd_plan.cu only (non-template kernels).
#pragma once

#include <cub/block/block_scan.cuh>

#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

__global__ void plan_count_kernel(const PlanParams p) {
  for_each_valid_slot(p, [&](int list, int32_t, int) { atomicAdd(p.counts + list, 1); });
}

__global__ void plan_fill_kernel(const PlanParams p) {
  for_each_valid_slot(p, [&](int list, int32_t token, int slot) {
    const int pos = p.offsets[list] + atomicAdd(p.cursor + list, 1);
    p.entries[pos] = pack_entry(token - p.token_begin, slot);
  });
}

// One CTA: exclusive scans of the entry counts and of the tile counts, then the work list.
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
      for (int t = 0; t < tiles; ++t) {
        const int first = t * p.tokens_per_tile;
        p.work[start.y + t] = make_int4(list, start.x + first, min(p.tokens_per_tile, count - first), 0);
      }
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
