// The forward's planning kernels (one TU: they do not depend on dtype or head dim).
#include <cub/device/device_segmented_sort.cuh>

#include "msa/fwd/fwd_launch.cuh"
#include "msa/fwd/fwd_plan_kernel.cuh"

namespace msa::fwd {

cudaError_t launch_fwd_plan(const PlanParams& plan, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(plan.counts, 0, sizeof(int32_t) * plan.num_lists, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(plan.cursor, 0, sizeof(int32_t) * plan.num_lists, stream);
  if (err != cudaSuccess) return err;
  // for_each_slot_warp's walk: whole warps of 32 tokens per (group, slot).
  const int64_t slots = (plan.token_end - plan.token_begin + 31) / 32 * 32 * plan.num_heads_kv * plan.topk;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((slots + 255) / 256, 65536));
  constexpr int kScanThreads = 512;  // 1024 would cap registers at 64 and spill
  plan_count_kernel<<<grid, 256, 0, stream>>>(plan);
  plan_scan_kernel<kScanThreads><<<1, kScanThreads, 0, stream>>>(plan);
  plan_fill_kernel<<<grid, 256, 0, stream>>>(plan);
  return cudaGetLastError();
}

size_t plan_sort_temp_bytes(int64_t max_entries, int num_lists) {
  size_t bytes = 0;
  const int32_t* none = nullptr;
  cub::DeviceSegmentedSort::SortKeys(nullptr, bytes, none, static_cast<int32_t*>(nullptr), max_entries, num_lists,
                                     none, none);
  return bytes;
}

cudaError_t sort_plan_entries(const PlanParams& plan, int32_t* sorted, int64_t max_entries, void* temp,
                              size_t temp_bytes, cudaStream_t stream) {
  // Segment i is [offsets[i], offsets[i + 1]); entries past the last list are never read.
  return cub::DeviceSegmentedSort::SortKeys(temp, temp_bytes, static_cast<const int32_t*>(plan.entries), sorted,
                                            max_entries, plan.num_lists, plan.offsets, plan.offsets + 1, stream);
}

}  // namespace msa::fwd
