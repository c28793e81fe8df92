// Backward instantiations for fp16, D = 64 (block_size 64 and 128).
#include "msa/bwd/bwd_launch.cuh"

namespace msa::bwd {
template cudaError_t run_bwd_for<cutlass::half_t, 64>(const BwdParams&, void*, cudaStream_t);
}  // namespace msa::bwd
