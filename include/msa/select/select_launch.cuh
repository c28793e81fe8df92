// Host side of the selector: TMA descriptors, grid, shared-memory attribute, launch.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "msa/common/launch.h"
#include "msa/common/topk.cuh"
#include "msa/params.h"
#include "msa/select/select_kernel.cuh"
#include "msa/select/select_traits.cuh"

namespace msa::select {

template <class Element, int kHeadDimIdx, int kTopKCap>
cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  using Traits = SelectTraits<Element, kHeadDimIdx, kTopKCap>;
  using namespace cute;

  const int32_t total_q_rows = static_cast<int32_t>(p.total_q_rows);
  const int32_t total_k = static_cast<int32_t>(p.total_k);
  auto gQ = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q_idx)),
                        make_shape(total_q_rows, Int<kHeadDimIdx>{}), typename Traits::GmemStride{});
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_idx)),
                        make_shape(total_k, Int<kHeadDimIdx>{}), typename Traits::GmemStride{});

  SelectKernelParams<Traits> kp{
      make_tma_copy(SM90_TMA_LOAD{}, gQ, typename Traits::SmemLayoutQ{}),
      make_tma_copy(SM90_TMA_LOAD{}, gK, take<0, 2>(typename Traits::SmemLayoutK{})),
      total_q_rows,
      total_k,
      p.block_indices,
      p.cu_seqlens_q,
      p.cu_seqlens_k,
      p.batch,
      p.seqlen_q,
      p.seqlen_k,
      /*num_m_tiles=*/0,
      p.num_idx_heads,
      p.block_size,
      p.topk,
      p.init_blocks,
      p.local_blocks,
  };
  const int64_t rows_longest = static_cast<int64_t>(p.max_seqlen_q) * p.num_idx_heads;
  kp.num_m_tiles = static_cast<int>((rows_longest + Traits::kBlockQ - 1) / Traits::kBlockQ);
  const int64_t num_ctas = static_cast<int64_t>(kp.num_m_tiles) * p.batch;
  if (num_ctas == 0) {
    return cudaSuccess;
  }
  if (num_ctas > 0x7fffffffLL) {
    return cudaErrorInvalidConfiguration;
  }

  return common::launch_with_smem(select_kernel<Traits>, static_cast<unsigned>(num_ctas), Traits::kNumThreads,
                                  Traits::kSmemBytes, stream, kp);
}

// Dispatch over the list length for one (dtype, Di); instantiated once per src/select/*.cu file.
template <class Element, int kHeadDimIdx>
cudaError_t run_select_for(const SelectParams& p, cudaStream_t stream) {
  switch (common::topk_list_cap(p.topk)) {
    case 8:
      return launch_select<Element, kHeadDimIdx, 8>(p, stream);
    case 16:
      return launch_select<Element, kHeadDimIdx, 16>(p, stream);
    default:
      return launch_select<Element, kHeadDimIdx, 32>(p, stream);
  }
}

}  // namespace msa::select
