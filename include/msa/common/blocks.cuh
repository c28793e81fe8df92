// Block bookkeeping of the selection rule (MSA_SPEC s.4): which blocks a query must take (forced)
// and which compete on score (candidates). The reference's forced-set code mirrors this.
#pragma once

namespace msa::common {

// For a query whose local block is `local`, the selection is
//   [0, init_end)  ++  top (topk - num_forced) of the candidates [init_end, local_begin)  ++  [local_begin, local]
// in ascending order. The three ranges are disjoint and cover every visible block 0..local.
struct BlockRanges {
  int init_end;     // forced leading blocks are [0, init_end)
  int local_begin;  // forced recent blocks are [local_begin, local]; candidates end here
  int local;        // the query's own block

  // local_blocks is the effective count (>= 1: the local block is always forced).
  __host__ __device__ BlockRanges(int local_block, int init_blocks, int local_blocks) : local(local_block) {
    init_end = init_blocks < local_block + 1 ? init_blocks : local_block + 1;
    int recent = local_block - local_blocks + 1;
    local_begin = recent > init_end ? recent : init_end;
  }

  __host__ __device__ int num_forced() const { return init_end + (local - local_begin + 1); }
  __host__ __device__ int num_candidates() const { return local_begin - init_end; }
};

}  // namespace msa::common
