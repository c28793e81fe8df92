// Runtime dispatch of the backward over (dtype, D), and its workspace size.
#include <cutlass/numeric_types.h>

#include <cstdint>

#include "msa/bwd/bwd_launch.cuh"
#include "msa/msa.h"

// Instantiated in this directory's per-(dtype, D) files; declared here so that the dispatch does
// not compile every kernel a second time (it took as long as all of them together).
namespace msa::bwd {
extern template cudaError_t run_bwd_for<cutlass::bfloat16_t, 64>(const BwdParams&, void*, cudaStream_t);
extern template cudaError_t run_bwd_for<cutlass::bfloat16_t, 128>(const BwdParams&, void*, cudaStream_t);
extern template cudaError_t run_bwd_for<cutlass::half_t, 64>(const BwdParams&, void*, cudaStream_t);
extern template cudaError_t run_bwd_for<cutlass::half_t, 128>(const BwdParams&, void*, cudaStream_t);
}  // namespace msa::bwd

namespace msa {

size_t bwd_workspace_bytes(const BwdParams& p) {
  // The layout divides by G: nothing to size for parameters run_bwd would reject.
  if (p.num_heads_kv <= 0 || p.num_heads < p.num_heads_kv || p.block_size <= 0) return 0;
  return bwd::BwdWorkspaceLayout(p).total();
}

cudaError_t run_bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.block_size != 64 && p.block_size != 128) return cudaErrorInvalidValue;
  const int g = p.num_heads_kv > 0 ? p.num_heads / p.num_heads_kv : 0;
  if (g < 1 || g > 16 || (g & (g - 1)) != 0 || p.num_heads != g * p.num_heads_kv) return cudaErrorInvalidValue;
  for (const void* ptr : {p.q, p.k, p.v, p.dout, static_cast<const void*>(p.dq)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorMisalignedAddress;
  }
  // The workspace's pieces are 256-byte aligned offsets (the int64 dq accumulator is read 64 bytes
  // at a time).
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) return cudaErrorMisalignedAddress;
  // Query tokens are int32 in the kernel; the plan packs them in 26 bits per chunk (bwd_chunk_tokens).
  if (p.total_q >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const int64_t num_blocks_max = (int64_t{p.max_seqlen_k} + p.block_size - 1) / p.block_size;
  if (int64_t{p.batch} * p.num_heads_kv * num_blocks_max >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  if (bwd::bwd_chunk_tokens(p) * p.num_heads_kv * p.topk >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const bool bf16 = p.dtype == DType::kBF16;
  if (p.head_dim == 128) {
    return bf16 ? bwd::run_bwd_for<cutlass::bfloat16_t, 128>(p, workspace, stream)
                : bwd::run_bwd_for<cutlass::half_t, 128>(p, workspace, stream);
  }
  return bf16 ? bwd::run_bwd_for<cutlass::bfloat16_t, 64>(p, workspace, stream)
              : bwd::run_bwd_for<cutlass::half_t, 64>(p, workspace, stream);
}

}  // namespace msa
