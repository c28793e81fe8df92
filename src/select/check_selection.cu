// The value check of a caller's selection (validate=True) as one pass over the ids: a warp per
// (token, group) row, lane s holding slot s. It replaces a sort of the whole selection in PyTorch
// (0.29-0.43 ms at 32K, M3 shape, H200; this pass with its flag read: 0.07-0.09 ms); the host
// reads the two flags and, only when one is set, finds the offending entry for the error message.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "msa/fwd/fwd_common.cuh"
#include "msa/msa.h"

namespace msa {

namespace {

__global__ void check_selection_kernel(const CheckSelectionParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.total_q * p.num_heads_kv;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  const unsigned slots = p.topk >= 32 ? 0xffffffffu : (1u << p.topk) - 1;
  bool out_of_range = false, repeated = false;
  for (int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
    const int64_t token = row / p.num_heads_kv;
    const int b = fwd::sequence_of_query(token, p.cu_seqlens_q, p.batch, p.seqlen_q);
    const common::SeqInfo seq(b, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    const int num_blocks = fwd::num_key_blocks(seq, p.block_size);
    const bool active = lane < p.topk;
    const int id = active ? p.block_indices[row * p.topk + lane] : -1;
    out_of_range |= active && (id < -1 || id >= num_blocks);
    // Lanes with the same id, among the row's slots; -1 may repeat.
    const unsigned peers = __match_any_sync(0xffffffffu, id) & slots;
    repeated |= active && id >= 0 && __popc(peers) > 1;
  }
  if (__any_sync(0xffffffffu, out_of_range) && lane == 0) atomicOr(p.flags, 1);
  if (__any_sync(0xffffffffu, repeated) && lane == 0) atomicOr(p.flags + 1, 1);
}

}  // namespace

cudaError_t run_check_selection(const CheckSelectionParams& p, cudaStream_t stream) {
  if (p.topk < 1 || p.topk > 32 || p.num_heads_kv < 1 || p.block_size < 1) return cudaErrorInvalidValue;
  const int64_t rows = p.total_q * p.num_heads_kv;
  if (rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;  // 8 rows at a time per CTA
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((rows + 7) / 8, 4096));
  check_selection_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace msa
