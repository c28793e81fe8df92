// Selector instantiations for fp16, Di = 64 (all list lengths).
#include "msa/select/select_launch.cuh"

namespace msa::select {
template cudaError_t run_select_for<cutlass::half_t, 64>(const SelectParams&, cudaStream_t);
}  // namespace msa::select
