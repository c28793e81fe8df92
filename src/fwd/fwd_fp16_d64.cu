// Forward instantiations for fp16, D = 64 (block_size 64 and 128).
#include "msa/fwd/fwd_launch.cuh"

namespace msa::fwd {
template cudaError_t run_fwd_for<cutlass::half_t, 64>(const FwdParams&, void*, cudaStream_t);
}  // namespace msa::fwd
