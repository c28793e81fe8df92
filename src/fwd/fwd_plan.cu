// The forward's planning kernels (one TU: they do not depend on dtype or head dim).
#include "msa/fwd/fwd_launch.cuh"
#include "msa/fwd/fwd_plan_kernel.cuh"

namespace msa::fwd {

cudaError_t launch_fwd_plan(const PlanParams& plan, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(plan.counts, 0, sizeof(int32_t) * plan.num_lists, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(plan.cursor, 0, sizeof(int32_t) * plan.num_lists, stream);
  if (err != cudaSuccess) return err;
  const int64_t slots = (plan.token_end - plan.token_begin) * plan.num_heads_kv * plan.topk;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((slots + 255) / 256, 65536));
  constexpr int kScanThreads = 512;  // 1024 would cap registers at 64 and spill
  plan_count_kernel<<<grid, 256, 0, stream>>>(plan);
  plan_scan_kernel<kScanThreads><<<1, kScanThreads, 0, stream>>>(plan);
  plan_fill_kernel<<<grid, 256, 0, stream>>>(plan);
  return cudaGetLastError();
}

}  // namespace msa::fwd
