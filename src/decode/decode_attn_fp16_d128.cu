// Sparse decode attention instantiations (slot combine included) for
// fp16, D = 128, block 64 and 128.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_attn<cutlass::half_t, 128>(const DecodeParams&, const DecodeWorkspace&, cudaStream_t);
}  // namespace msa::decode
