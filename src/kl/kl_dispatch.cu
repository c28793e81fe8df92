// Runtime dispatch of the indexer distillation loss over (dtype, D, Di), and its workspace size.
#include <cutlass/numeric_types.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "msa/kl/kl_dense_launch.cuh"
#include "msa/kl/kl_launch.cuh"
#include "msa/msa.h"

// Instantiated in this directory's per-(dtype, D) files; declared here so that the dispatch does
// not compile every kernel a second time (it took as long as all of them together).
namespace msa::kl {
#define MSA_KL_EXTERN(E, D, DI)                                                                      \
  extern template cudaError_t run_kl_for<E, D, DI>(const KlParams&, void*, cudaStream_t); \
  extern template cudaError_t run_kl_dense_for<E, D, DI>(const KlParams&, void*, cudaStream_t);
MSA_KL_EXTERN(cutlass::bfloat16_t, 64, 64)
MSA_KL_EXTERN(cutlass::bfloat16_t, 64, 128)
MSA_KL_EXTERN(cutlass::bfloat16_t, 128, 64)
MSA_KL_EXTERN(cutlass::bfloat16_t, 128, 128)
MSA_KL_EXTERN(cutlass::half_t, 64, 64)
MSA_KL_EXTERN(cutlass::half_t, 64, 128)
MSA_KL_EXTERN(cutlass::half_t, 128, 64)
MSA_KL_EXTERN(cutlass::half_t, 128, 128)
#undef MSA_KL_EXTERN
}  // namespace msa::kl

namespace msa {

namespace {

// Over (D, Di): the selected support's kernels, or (kDense) the dense warm-up's.
template <class Element, bool kDense>
cudaError_t run_kl_typed(const KlParams& p, void* workspace, cudaStream_t stream) {
  auto run = [&](auto head_dim, auto head_dim_idx) {
    constexpr int kD = decltype(head_dim)::value, kDi = decltype(head_dim_idx)::value;
    if constexpr (kDense) {
      return kl::run_kl_dense_for<Element, kD, kDi>(p, workspace, stream);
    } else {
      return kl::run_kl_for<Element, kD, kDi>(p, workspace, stream);
    }
  };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  if (p.head_dim == 128) return p.head_dim_idx == 128 ? run(I128{}, I128{}) : run(I128{}, I64{});
  return p.head_dim_idx == 128 ? run(I64{}, I128{}) : run(I64{}, I64{});
}

// The shape checks both variants share.
cudaError_t check_kl_params(const KlParams& p) {
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.head_dim_idx != 64 && p.head_dim_idx != 128) return cudaErrorInvalidValue;
  if (p.block_size != 64 && p.block_size != 128) return cudaErrorInvalidValue;
  const int g = p.num_heads_kv > 0 ? p.num_heads / p.num_heads_kv : 0;
  if (g < 1 || g > 16 || (g & (g - 1)) != 0 || p.num_heads != g * p.num_heads_kv) return cudaErrorInvalidValue;
  for (const void* ptr : {p.q, p.k, p.q_idx, p.k_idx}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorMisalignedAddress;
  }
  return cudaSuccess;
}

}  // namespace

namespace kl {

// Between the passes: each (token, group)'s per-slot stats merged into the student's
// log2-normaliser (0 when no slot saw a key). A separate pass, not the pass-2 producer's job: there
// the topk dependent loads per row (one row per thread) stalled every tile's hand-over.
__global__ void kl_logz_kernel(const float2* __restrict__ stats, float* __restrict__ logz, int64_t pairs, int topk) {
  for (int64_t pair = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; pair < pairs;
       pair += int64_t{gridDim.x} * blockDim.x) {
    const float2* st = stats + pair * topk;
    float m = -CUDART_INF_F, l = 0.f;
    for (int s = 0; s < topk; ++s) {  // online merge: one pass over the slots
      const float2 v = st[s];
      if (v.y > 0.f) {
        const float m_new = fmaxf(m, v.x);
        l = l * exp2f(m - m_new) + v.y * exp2f(v.x - m_new);
        m = m_new;
      }
    }
    logz[pair] = l > 0.f ? m + __log2f(l) : 0.f;
  }
}

cudaError_t launch_kl_logz(const float2* stats, float* logz, int64_t pairs, int topk, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((pairs + 255) / 256, 4096));
  kl_logz_kernel<<<grid, 256, 0, stream>>>(stats, logz, pairs, topk);
  return cudaGetLastError();
}

}  // namespace kl

size_t kl_workspace_bytes(const KlParams& p) {
  if (p.num_heads_kv <= 0 || p.block_size <= 0) return 0;
  return kl::KlWorkspaceLayout(p).total();
}

cudaError_t run_kl(const KlParams& p, void* workspace, cudaStream_t stream) {
  if (const cudaError_t err = check_kl_params(p); err != cudaSuccess) return err;
  if (p.topk < 1 || p.topk > 32) return cudaErrorInvalidValue;
  // The plan packs query tokens in 26 bits (one chunk holds every token here).
  if (p.total_q >= fwd::kMaxChunkTokens) return cudaErrorInvalidValue;
  const int64_t num_blocks_max = (int64_t{p.max_seqlen_k} + p.block_size - 1) / p.block_size;
  if (int64_t{p.batch} * p.num_heads_kv * num_blocks_max >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  if (p.total_q * p.num_heads_kv * p.topk >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  return p.dtype == DType::kBF16 ? run_kl_typed<cutlass::bfloat16_t, false>(p, workspace, stream)
                                 : run_kl_typed<cutlass::half_t, false>(p, workspace, stream);
}

size_t kl_dense_workspace_bytes(const KlParams& p) {
  if (p.num_heads_kv <= 0 || p.block_size <= 0) return 0;
  return kl::KlDenseWorkspaceLayout(p).end;
}

cudaError_t run_kl_dense(const KlParams& p, void* workspace, cudaStream_t stream) {
  if (const cudaError_t err = check_kl_params(p); err != cudaSuccess) return err;
  // 32-bit TMA row coordinates and work item ids.
  if (p.total_q * p.num_heads >= (int64_t{1} << 31) || p.total_k * p.num_heads_kv >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  const kl::DenseChunking c(p);
  if (int64_t{c.num_row_tiles} * p.batch * p.num_heads_kv * c.num_chunks >= (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  return p.dtype == DType::kBF16 ? run_kl_typed<cutlass::bfloat16_t, true>(p, workspace, stream)
                                 : run_kl_typed<cutlass::half_t, true>(p, workspace, stream);
}

}  // namespace msa
