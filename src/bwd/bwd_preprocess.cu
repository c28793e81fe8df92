// The backward's per-row preprocessing (delta), every (dtype, D).
#include <cutlass/numeric_types.h>

#include "msa/bwd/bwd_preprocess.cuh"
#include "msa/msa.h"

namespace msa {

cudaError_t run_bwd_delta(DType dtype, int head_dim, const void* dout, const void* out, const float* dlse,
                          float* delta, int64_t rows, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBF16;
  if (head_dim == 128) {
    return bf16 ? bwd::launch_delta<cutlass::bfloat16_t, 128>(dout, out, dlse, delta, rows, stream)
                : bwd::launch_delta<cutlass::half_t, 128>(dout, out, dlse, delta, rows, stream);
  }
  if (head_dim == 64) {
    return bf16 ? bwd::launch_delta<cutlass::bfloat16_t, 64>(dout, out, dlse, delta, rows, stream)
                : bwd::launch_delta<cutlass::half_t, 64>(dout, out, dlse, delta, rows, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msa
