// Runtime dispatch of the forward over (dtype, D), and its workspace size.
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "msa/fwd/fwd_launch.cuh"
#include "msa/msa.h"

// Instantiated in this directory's per-(dtype, D) files; declared here so that the dispatch does
// not compile every kernel a second time (it took as long as all of them together).
namespace msa::fwd {
extern template cudaError_t run_fwd_for<cutlass::bfloat16_t, 64>(const FwdParams&, void*, cudaStream_t);
extern template cudaError_t run_fwd_for<cutlass::bfloat16_t, 128>(const FwdParams&, void*, cudaStream_t);
extern template cudaError_t run_fwd_for<cutlass::half_t, 64>(const FwdParams&, void*, cudaStream_t);
extern template cudaError_t run_fwd_for<cutlass::half_t, 128>(const FwdParams&, void*, cudaStream_t);
}  // namespace msa::fwd

namespace msa {

size_t fwd_workspace_bytes(const FwdParams& p) { return fwd::use_query_outer(p) ? 0 : fwd::WorkspaceLayout(p).total; }

cudaError_t run_fwd(const FwdParams& p, void* workspace, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.block_size != 64 && p.block_size != 128) return cudaErrorInvalidValue;
  // The kernels assume G = Hq / Hkv is a power of two up to 16, 16-byte aligned rows, and list ids
  // (batch x Hkv x key blocks) that fit in 32 bits.
  const int g = p.num_heads_kv > 0 ? p.num_heads / p.num_heads_kv : 0;
  if (g < 1 || g > 16 || (g & (g - 1)) != 0 || p.num_heads != g * p.num_heads_kv) return cudaErrorInvalidValue;
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.out)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorMisalignedAddress;
  }
  if (p.total_q * p.num_heads >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // 32-bit q row index
  const int64_t num_blocks_max = (int64_t{p.max_seqlen_k} + p.block_size - 1) / p.block_size;
  if (int64_t{p.batch} * p.num_heads_kv * num_blocks_max >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const bool bf16 = p.dtype == DType::kBF16;
  if (p.head_dim == 128) {
    return bf16 ? fwd::run_fwd_for<cutlass::bfloat16_t, 128>(p, workspace, stream)
                : fwd::run_fwd_for<cutlass::half_t, 128>(p, workspace, stream);
  }
  return bf16 ? fwd::run_fwd_for<cutlass::bfloat16_t, 64>(p, workspace, stream)
              : fwd::run_fwd_for<cutlass::half_t, 64>(p, workspace, stream);
}

}  // namespace msa
