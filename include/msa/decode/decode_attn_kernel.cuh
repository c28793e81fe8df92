// Sparse decode attention (MSA_SPEC s.5, s.8), split over the selected blocks.
//
// Grid (slot, new token x group, request). A CTA takes the block named by its slot of its
// (token, group) row of the selection and the token's G query heads (rows 0..G-1 of a 64-row tile). One thread issues the TMA of
// the block's K and V on two barriers (the block sits at one cache row: contiguous, or inside one
// page) while the warpgroup copies the G query rows into the SW128 tile; then S = Q K^T (WGMMA,
// fp32) as soon as K lands, the causal mask at the token's position, P = exp2(S - max), O = P V
// (RS WGMMA), and the normalized O (q's dtype) with its lse (log2 units) goes to the slot's
// partial. Every CTA of the row (empty slots too) then counts itself in; the last one merges the
// row's slots (combine_slots, reading the partials through L2) into out and lse, so no combine
// kernel runs. Rows of the block past the request's length are stale cache memory: their V rows
// are zeroed in shared memory before P V (a masked score gives P = 0, but 0 x NaN would still
// poison O).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/decode/decode_cache.cuh"
#include "msa/decode/decode_traits.cuh"
#include "msa/fwd/combine_kernel.cuh"
#include "msa/fwd/fwd_collective.cuh"

namespace msa::decode {

using namespace cute;

template <class Traits>
struct DecodeAttnParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  CacheGeometry cache;
  int32_t cache_rows;
  const Element* q;               // [B, S_new, Hq, D]
  const int32_t* block_indices;   // [B, S_new, Hkv, topk]: the selection
  Element* part_o;                // [B * S_new, Hq, topk, D], normalized
  float2* part_stats;             // [B * S_new, Hq, topk]: (lse, lse), log2 units
  int32_t* row_arrivals;          // [B * S_new * Hkv], zeroed by the indexer
  Element* out;                   // [B, S_new, Hq, D]
  float* lse;                     // [B, Hq, S_new], natural log
  int s_new, num_heads, num_heads_kv, group_size, topk, num_blocks_max;
  float scale_log2;
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 2)
    decode_attn_kernel(CUTE_GRID_CONSTANT DecodeAttnParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte pieces of a row

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);

  const int slot = blockIdx.x;
  const int token_in_req = blockIdx.y / params.num_heads_kv;
  const int group = blockIdx.y % params.num_heads_kv;
  const int b = blockIdx.z;
  const int64_t token = static_cast<int64_t>(b) * params.s_new + token_in_req;
  const int64_t row = token * params.num_heads_kv + group;  // the indexer's packed row
  const int length = params.cache.length(b);
  const int query_pos = length - params.s_new + token_in_req;

  // Launched early (programmatic dependent launch): the selection is complete past this point.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x < params.topk) smem.selection[threadIdx.x] = params.block_indices[row * params.topk + threadIdx.x];
  __syncthreads();
  const int blk = smem.selection[slot];
  // The merge below reads exactly the slots with 0 <= id < num_blocks_max.
  const bool attend = blk >= 0 && blk < params.num_blocks_max;
  const int G = params.group_size;
  const int lane = threadIdx.x % 32;

  if (attend) {
    const int block_start = blk * kBlockN;
    const int last_col = query_pos - block_start;               // keys [0, last_col] are visible
    const int valid_rows = min(kBlockN, length - block_start);  // rows holding written tokens

    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

    if (threadIdx.x == 0) {
      smem.barrier_k.init(1);
      smem.barrier_v.init(1);
      cutlass::arch::fence_barrier_init();
      Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDim>{}, params.num_heads_kv));
      Tensor mV = params.tma_v.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDim>{}, params.num_heads_kv));
      const int key_row = static_cast<int>(params.cache.row(b, block_start));
      smem.barrier_k.arrive_and_expect_tx(Traits::kTmaBytesBlock);
      fwd::load_block<Traits>(params.tma_k, mK, sK, reinterpret_cast<uint64_t*>(&smem.barrier_k), 0, key_row, group);
      smem.barrier_v.arrive_and_expect_tx(Traits::kTmaBytesBlock);
      fwd::load_block<Traits>(params.tma_v, mV, sV, reinterpret_cast<uint64_t*>(&smem.barrier_v), 0, key_row, group);
    }

    // The token's G query rows (contiguous in q) into rows 0..G-1 of the tile, zeros below.
    const Element* q_rows = params.q + (token * params.num_heads + group * G) * kHeadDim;
    for (int idx = threadIdx.x; idx < kBlockM * kChunksPerRow; idx += Traits::kNumThreads) {
      const int r = idx / kChunksPerRow;
      const int c = idx % kChunksPerRow;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < G) v = *reinterpret_cast<const uint4*>(q_rows + r * kHeadDim + c * 8);
      *reinterpret_cast<uint4*>(&sQ(r, c * 8)) = v;
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> WGMMA reads
    __syncthreads();  // also publishes the barriers' initialization

    typename Traits::TiledMmaQK tiled_mma_qk;
    typename Traits::TiledMmaPV tiled_mma_pv;
    auto thr_mma_qk = tiled_mma_qk.get_thread_slice(threadIdx.x);
    auto thr_mma_pv = tiled_mma_pv.get_thread_slice(threadIdx.x);
    Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);
    Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);
    Tensor tOrVt = thr_mma_pv.partition_fragment_B(sVt);
    Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    // P as the A operand of O = P V: value 8s + v of S is value v of k-slice s.
    Tensor tOrP = make_tensor<Element>(
        Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>{});

    smem.barrier_k.wait(0);
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
    const int quad = lane % 4;
    const int cols[2] = {last_col, last_col};
    fwd::mask_block_columns<kBlockN>(tSrS, cols, quad);
    float row_max[2], row_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m = fwd::block_row_max<kBlockN>(tSrS, i);
      row_max[i] = m == -CUDART_INF_F ? 0.f : m * params.scale_log2;  // no visible key: P = 0
      row_sum[i] = fwd::exp2_row_sum<kBlockN>(tSrS, i, params.scale_log2, row_max[i]);
    }
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) tOrP(v) = static_cast<Element>(tSrS(v));
    warpgroup_fence_operand(tOrP);

    smem.barrier_v.wait(0);
    if (valid_rows < kBlockN) {
      // Zero the V rows past the request's end: row r is the 128-byte line r of each 64-column
      // half (the 128-byte swizzle permutes chunks within a line only).
      constexpr int kHalves = kHeadDim / 64;
      char* v_bytes = reinterpret_cast<char*>(smem.v.data());
      for (int idx = threadIdx.x; idx < kBlockN * kHalves * 8; idx += Traits::kNumThreads) {
        const int r = idx / (kHalves * 8);
        const int rest = idx % (kHalves * 8);
        if (r >= valid_rows) {
          *reinterpret_cast<uint4*>(v_bytes + (rest / 8) * (kBlockN * 128) + r * 128 + (rest % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
      }
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
    }
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_pv, tOrP, tOrVt(_, _, _, 0), tOrO);

    // Rows 16 warp + lane / 4 (+ 8); columns 8 j + 2 quad + {0, 1}.
    const int row_base = (threadIdx.x / 32) * 16 + lane / 4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row_base + 8 * i;
      if (r >= G) continue;
      const int64_t pair = token * params.num_heads + group * G + r;
      const float scale = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
      uint32_t* dst = reinterpret_cast<uint32_t*>(params.part_o + (pair * params.topk + slot) * kHeadDim);
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        dst[4 * j + quad] = fwd::pack_pair<Element>(tOrO(4 * j + 2 * i) * scale, tOrO(4 * j + 2 * i + 1) * scale);
      }
      if (quad == 0) {
        const float lse2 = row_sum[i] > 0.f ? row_max[i] + __log2f(row_sum[i]) : -CUDART_INF_F;
        params.part_stats[pair * params.topk + slot] = make_float2(lse2, lse2);
      }
    }
    __threadfence();  // the partial is visible device-wide before this CTA counts itself in
  }

  // Every CTA of the row counts itself in; the last merges the row's slots, one warp per head.
  __syncthreads();
  if (threadIdx.x == 0) {
    smem.is_last = atomicAdd(params.row_arrivals + row, 1) == params.topk - 1;
  }
  __syncthreads();
  if (!smem.is_last) return;
  __threadfence();
  const int sel = lane < params.topk ? smem.selection[lane] : -1;
  const bool valid = sel >= 0 && sel < params.num_blocks_max;
  for (int r = threadIdx.x / 32; r < G; r += Traits::kNumThreads / 32) {
    const int head = group * G + r;
    const int64_t pair = token * params.num_heads + head;
    const float lse = fwd::combine_slots<Element, kHeadDim, /*kCoherent=*/true>(
        valid, params.part_o + pair * params.topk * kHeadDim, params.part_stats + pair * params.topk,
        params.out + pair * kHeadDim, lane);
    if (lane == 0) {
      params.lse[(static_cast<int64_t>(b) * params.num_heads + head) * params.s_new + token_in_req] = lse;
    }
  }
#endif
}

}  // namespace msa::decode
