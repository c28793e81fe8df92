// Sparse decode attention instantiations (slot combine included) for
// bf16, D = 64, block 64 and 128.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_attn<cutlass::bfloat16_t, 64>(const DecodeParams&, const DecodeWorkspace&, cudaStream_t);
}  // namespace msa::decode
