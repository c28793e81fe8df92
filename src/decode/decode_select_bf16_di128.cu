// Decode indexer instantiations for bf16 index queries and keys, Di = 128 (all list lengths).
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_select<cutlass::bfloat16_t, 128, false>(const DecodeParams&, const DecodeWorkspace&, int,
                                                                  cudaStream_t);
}  // namespace msa::decode
