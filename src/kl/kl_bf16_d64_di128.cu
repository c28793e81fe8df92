// Indexer distillation loss, pass 2 instantiations for bf16, D = 64, Di = 128 (block_size 64 and 128).
#include "msa/kl/kl_launch.cuh"

namespace msa::kl {
template cudaError_t run_kl_for<cutlass::bfloat16_t, 64, 128>(const KlParams&, void*, cudaStream_t);
}  // namespace msa::kl
