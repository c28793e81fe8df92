// Decode indexer instantiations for fp16 index queries and keys, Di = 128 (all list lengths).
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_select<cutlass::half_t, 128, false>(const DecodeParams&, const DecodeWorkspace&, int,
                                                                  cudaStream_t);
}  // namespace msa::decode
