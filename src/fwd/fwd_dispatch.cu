// Runtime dispatch of the forward over (dtype, D), and its workspace size.
#include <cutlass/numeric_types.h>

#include "msa/fwd/fwd_launch.cuh"
#include "msa/msa.h"

namespace msa {

size_t fwd_workspace_bytes(const FwdParams& p) { return fwd::WorkspaceLayout(p).total; }

cudaError_t run_fwd(const FwdParams& p, void* workspace, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.block_size != 64 && p.block_size != 128) return cudaErrorInvalidValue;
  const bool bf16 = p.dtype == DType::kBF16;
  if (p.head_dim == 128) {
    return bf16 ? fwd::run_fwd_for<cutlass::bfloat16_t, 128>(p, workspace, stream)
                : fwd::run_fwd_for<cutlass::half_t, 128>(p, workspace, stream);
  }
  return bf16 ? fwd::run_fwd_for<cutlass::bfloat16_t, 64>(p, workspace, stream)
              : fwd::run_fwd_for<cutlass::half_t, 64>(p, workspace, stream);
}

}  // namespace msa
