// Decode indexer instantiations for fp16 index queries over an e4m3 index-key cache, Di = 128.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_select<cutlass::half_t, 128, true>(const DecodeParams&, const DecodeWorkspace&, int,
                                                                 cudaStream_t);
}  // namespace msa::decode
