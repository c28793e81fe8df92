// Indexer distillation loss, pass 1 (student stats) instantiations for fp16: Di = 64 and 128,
// block_size 64 and 128.
#define MSA_KL_STATS_TU
#include "msa/kl/kl_launch.cuh"

namespace msa::kl {
template cudaError_t launch_kl_stats<cutlass::half_t, 64>(const KlParams&, const KlWorkspaceLayout&, char*, cudaStream_t);
template cudaError_t launch_kl_stats<cutlass::half_t, 128>(const KlParams&, const KlWorkspaceLayout&, char*, cudaStream_t);
}  // namespace msa::kl
