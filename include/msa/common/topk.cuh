// A running top-k kept in registers: a descending list of (score, block id) of compile-time length.
// Blocks arrive in ascending id order, so the strict '>' keeps the lower id ahead on a tie, as the
// spec asks. Indices into the arrays are compile-time constants after unrolling (no local memory).
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

namespace msa::common {

// Length of the running lists for a topk: the smallest compiled cap (8, 16 or 32) that holds it.
constexpr int topk_list_cap(int topk) { return topk <= 8 ? 8 : (topk <= 16 ? 16 : 32); }

template <int kCap>
struct RunningTopK {
  static_assert(kCap >= 1 && kCap <= 32, "the running list holds at most 32 entries");
  float score[kCap];
  int id[kCap];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int p = 0; p < kCap; ++p) {
      score[p] = -CUDART_INF_F;
      id[p] = -1;
    }
  }

  // Smallest score still kept: a candidate must beat it to enter.
  __device__ __forceinline__ float threshold() const { return score[kCap - 1]; }

  // Insert (s, b) keeping the list sorted; callers test s > threshold() first so the common case
  // (rejection) costs one compare.
  __device__ __forceinline__ void insert(float s, int b) {
#pragma unroll
    for (int p = kCap - 1; p >= 0; --p) {
      const bool shift = p > 0 && s > score[p > 0 ? p - 1 : 0];
      const bool place = !shift && s > score[p];
      const float prev_score = score[p > 0 ? p - 1 : 0];
      const int prev_id = id[p > 0 ? p - 1 : 0];
      score[p] = shift ? prev_score : (place ? s : score[p]);
      id[p] = shift ? prev_id : (place ? b : id[p]);
    }
  }
};

}  // namespace msa::common
