// Dynamic tile scheduler of the forward's main kernel.
//
// Tiles differ in cost (a tile that starts a new key block waits for its K/V, a short list
// switches blocks every tile), so equal static shares left most SMs idle for half the kernel
// (ncu at 32K: 2.38M active of 5.46M elapsed cycles). Instead the producer warpgroup of each CTA
// grabs runs of `grab` consecutive tiles from a global counter: consecutive tiles mostly share
// their key block, so K/V is still loaded once per run, and the last runs balance the SMs.
// Thread 0 issues each atomic one run ahead and publishes it at the next run boundary, so its
// latency is hidden; a producer-only named barrier hands the value to the other 127 threads.
#pragma once

#include <cutlass/arch/barrier.h>

#include "msa/common/arch.cuh"

namespace msa::fwd {

class DynamicTileScheduler {
 public:
  // `slot`: one int of shared memory; `barrier_id`: a named barrier of the producer warpgroup.
  __device__ DynamicTileScheduler(int* counter, int num_work, int* slot, int barrier_id)
      : counter_(counter), num_work_(num_work), slot_(slot), barrier_id_(barrier_id) {
    // At least 8 runs per CTA, at most 16 tiles per run.
    grab_ = max(1, min(16, num_work / (static_cast<int>(gridDim.x) * 8)));
    const bool leader = threadIdx.x == 0;
    if (leader) pending_ = atomicAdd(counter_, grab_);
    tile_ = publish(leader);
    end_ = min(tile_ + grab_, num_work_);
    if (leader) pending_ = atomicAdd(counter_, grab_);
    next_ = publish(leader);
    if (leader && tile_ < num_work_) pending_ = atomicAdd(counter_, grab_);
  }

  // The current tile; num_work once the list is exhausted (the plan puts a sentinel there).
  __device__ int tile() const { return min(tile_, num_work_); }
  // The tile after the current one (for prefetching), or num_work.
  __device__ int peek_next() const { return tile_ + 1 < end_ ? tile_ + 1 : min(next_, num_work_); }
  // The tile after that, or -1 when it is not known yet (only when runs are one tile long).
  __device__ int peek_after_next() const {
    if (tile_ + 2 < end_) return tile_ + 2;
    if (tile_ + 1 < end_) return min(next_, num_work_);
    if (next_ + 1 >= num_work_) return num_work_;
    return next_ + 1 < next_ + grab_ ? next_ + 1 : -1;
  }
  __device__ bool done() const { return tile_ >= num_work_; }
  // Whether the current tile is the first of a grabbed run. Runs are fixed ranges of the work list
  // (multiples of the grab size), whichever CTA takes them.
  __device__ bool run_start() const { return run_start_; }

  // Every producer thread calls this once per tile.
  __device__ void advance() {
    if (tile_ + 1 < end_) {
      ++tile_;
      run_start_ = false;
      return;
    }
    run_start_ = true;
    const bool leader = threadIdx.x == 0;
    const int after_next = publish(leader);
    tile_ = next_;
    end_ = min(tile_ + grab_, num_work_);
    next_ = after_next;
    if (leader && tile_ < num_work_) pending_ = atomicAdd(counter_, grab_);
  }

 private:
  // Thread 0's pending grab -> every producer thread. Two barriers: the slot is read before it is
  // rewritten at the next boundary.
  __device__ int publish(bool leader) {
    if (leader) *slot_ = pending_;
    cutlass::arch::NamedBarrier::sync(common::kThreadsPerWarpGroup, barrier_id_);
    asm volatile("" ::: "memory");  // bar.sync's asm has no memory clobber: keep the read after it
    const int value = *slot_;
    asm volatile("" ::: "memory");
    cutlass::arch::NamedBarrier::sync(common::kThreadsPerWarpGroup, barrier_id_);
    return value;
  }

  int* counter_;
  int num_work_;
  int* slot_;
  int barrier_id_;
  int grab_ = 1;
  int tile_ = 0, end_ = 0, next_ = 0;
  int pending_ = 0;
  bool run_start_ = true;
};

}  // namespace msa::fwd
