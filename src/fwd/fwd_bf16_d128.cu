// Forward instantiations for bf16, D = 128 (block_size 64 and 128).
#include "msa/fwd/fwd_launch.cuh"

namespace msa::fwd {
template cudaError_t run_fwd_for<cutlass::bfloat16_t, 128>(const FwdParams&, void*, cudaStream_t);
}  // namespace msa::fwd
