// Sparse decode attention (+ slot combine) instantiations for bf16, D = 128, block 64 and 128.
#include "msa/decode/decode_launch.cuh"

namespace msa::decode {
template cudaError_t launch_decode_attn<cutlass::bfloat16_t, 128>(const DecodeParams&, cutlass::bfloat16_t*, float2*, cudaStream_t);
}  // namespace msa::decode
