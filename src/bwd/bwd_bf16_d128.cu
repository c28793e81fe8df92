// Backward instantiations for bf16, D = 128 (block_size 64 and 128).
#include "msa/bwd/bwd_launch.cuh"

namespace msa::bwd {
template cudaError_t run_bwd_for<cutlass::bfloat16_t, 128>(const BwdParams&, void*, cudaStream_t);
}  // namespace msa::bwd
