// Dense warm-up distillation loss, pass 1 (student stats per key chunk) instantiations for bf16:
// Di = 64 and 128, block_size 64 and 128.
#define MSA_KL_DENSE_STATS_TU
#include "msa/kl/kl_dense_launch.cuh"

namespace msa::kl {
template cudaError_t launch_kl_dense_stats<cutlass::bfloat16_t, 64>(const KlParams&, const KlDenseWorkspaceLayout&, char*,
                                                     cudaStream_t);
template cudaError_t launch_kl_dense_stats<cutlass::bfloat16_t, 128>(const KlParams&, const KlDenseWorkspaceLayout&, char*,
                                                      cudaStream_t);
}  // namespace msa::kl
