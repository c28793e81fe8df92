// The natural-log logsumexp that the kernels write as lse (MSA_SPEC s.2, s.5).
#pragma once

#include <math_constants.h>

namespace msa::common {

// From a softmax kept in log2 units (max_log2 of the scaled scores, sum of exp2(s - max_log2)):
// ln(sum of exp(s)). A row with no visible key (sum 0) gives -inf, never NaN.
__device__ __forceinline__ float natural_lse(float max_log2, float sum) {
  return sum > 0.f ? (max_log2 + __log2f(sum)) * 0.69314718055994531f : -CUDART_INF_F;
}

}  // namespace msa::common
