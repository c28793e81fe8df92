// Selector instantiations for bf16, Di = 128 (all list lengths).
#include "msa/select/select_launch.cuh"

namespace msa::select {
template cudaError_t run_select_for<cutlass::bfloat16_t, 128>(const SelectParams&, cudaStream_t);
}  // namespace msa::select
