// Sparse decode attention instantiations (selection merge and slot combine included) for
// bf16, D = 64, block 64 and 128, every list length.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_attn<cutlass::bfloat16_t, 64>(const DecodeParams&, const DecodeWorkspace&, int, cudaStream_t);
}  // namespace msa::decode
