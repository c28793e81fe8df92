// Decode indexer instantiations for bf16 index queries over an e4m3 index-key cache, Di = 64.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_select<cutlass::bfloat16_t, 64, true>(const DecodeParams&, const DecodeWorkspace&, int,
                                                                 cudaStream_t);
}  // namespace msa::decode
