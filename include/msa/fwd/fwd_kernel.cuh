// KV-outer block-sparse attention forward (MSA_SPEC s.5, s.10).
//
// Math: a work tile is (sequence b, group g, key block kb, up to 128/G query tokens that selected
// kb for g). Its 128 rows are those tokens x the G query heads of g (the heads of a token are
// contiguous in q, so a row gather is 16-byte vector copies). For each row:
//   S = scale * q K_kb^T (keys j > p(i) masked), P = exp(S - max), O_part = P V_kb / sum(P),
//   lse_part = max + log(sum(P)),
// written per (query, head, slot); combine_kernel merges the slots of a query by lse.
//
// Grid: persistent, one CTA per SM, walking the work list produced by fwd_plan_kernel.cuh.
// Warp roles: warpgroup 0 = producer. For each tile it fills one stage of a 2-stage ring: thread 0
// TMA-loads K and V of the tile's block (the block id is the TMA coordinate), and all 128 threads
// gather the tile's query rows and row metadata with cp.async, each signalling the stage's full
// barrier when its copies land (cp.async.mbarrier.arrive.noinc). Warpgroups 1-2 = consumers, 64
// rows each: WGMMA S = Q K^T (SS), the softmax in registers, WGMMA O = P V (P from registers, V^T
// read MN-major from the TMA tile), then the partial output and lse of each row.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_common.cuh"
#include "msa/fwd/fwd_traits.cuh"

namespace msa::fwd {

using namespace cute;

template <class Traits>
struct FwdKernelParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  int32_t total_k;
  const Element* q;          // [total_q, Hq, D]
  const int2* entries;       // (flat token, slot) per list entry
  const int4* work;          // (list, first entry, entries, 0) per tile
  const int32_t* num_work;   // [1]
  Element* part_o;           // [chunk tokens, Hq, topk, D], normalized partial outputs
  float* part_lse;           // [chunk tokens, Hq, topk]
  int64_t token_begin;       // first flat query token of the chunk
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int num_heads, num_heads_kv, group_size, num_blocks_max, topk;
  float scale_log2;  // softmax_scale * log2(e)
};

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem_src));
}

// list id -> (sequence, group, key block)
struct TileCoord {
  int batch_idx, group, block;
  __device__ TileCoord(int list, int num_heads_kv, int num_blocks_max) {
    block = list % num_blocks_max;
    const int bg = list / num_blocks_max;
    group = bg % num_heads_kv;
    batch_idx = bg / num_heads_kv;
  }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT FwdKernelParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using MainloopPipeline = typename Traits::MainloopPipeline;
  using PipelineState = typename Traits::PipelineState;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreadsPerWG = common::kThreadsPerWarpGroup;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;
  const int G = params.group_size;

  // Full barrier: the TMA leader's expect-tx arrival plus one cp.async arrival per producer thread.
  typename MainloopPipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kTmaBytesKV;
  pipeline_params.role = warp_group == 0 ? MainloopPipeline::ThreadCategory::Producer
                                         : MainloopPipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kNumMmaThreads;
  pipeline_params.num_producers = kThreadsPerWG + 1;
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
  MainloopPipeline pipeline(smem.pipeline, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();
  const int num_work = *params.num_work;

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});

  if (warp_group == 0) {
    // ---------------- producer warpgroup ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int tid = threadIdx.x;
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    Tensor mV = params.tma_v.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    constexpr int kChunksPerRow = kHeadDim / 8;                 // 16-byte chunks of a query row
    constexpr int kRowStep = kThreadsPerWG / kChunksPerRow;      // rows between a thread's chunks
    const int chunk_col = (tid % kChunksPerRow) * 8;
    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    int4 item = blockIdx.x < num_work ? params.work[blockIdx.x] : make_int4(0, 0, 0, 0);
    for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
      const int w_next = w + gridDim.x;
      const int4 next_item = w_next < num_work ? params.work[w_next] : item;  // in flight during this tile
      const TileCoord tc(item.x, params.num_heads_kv, params.num_blocks_max);
      pipeline.producer_acquire(write_state);
      const int stage = write_state.index();
      if (tid == 0) {
        const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                  params.seqlen_k);
        const int key_row = static_cast<int>(seq.k_token_start) + tc.block * kBlockN;
        Tensor gK = local_tile(domain_offset(make_coord(key_row, _0{}), mK(_, _, tc.group)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_0{}, _0{}));
        Tensor gV = local_tile(domain_offset(make_coord(key_row, _0{}), mV(_, _, tc.group)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_0{}, _0{}));
        auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                          group_modes<0, 2>(gK));
        auto [tVgV, tVsV] = tma_partition(params.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                          group_modes<0, 2>(gV));
        auto* barrier = pipeline.producer_get_barrier(write_state);
        copy(params.tma_k.with(*barrier, 0), tKgK, tKsK(_, stage));
        copy(params.tma_v.with(*barrier, 0), tVgV, tVsV(_, stage));
        cp_async_16(&smem.tile[stage], params.work + w);
      }
      // Row metadata: thread tid owns row tid.
      if (tid / G < item.z) {
        cp_async_8(&smem.rows[stage][tid], params.entries + item.y + tid / G);
      }
      // Query rows: the G heads of a token are contiguous in q.
#pragma unroll
      for (int k = 0; k < kBlockM / kRowStep; ++k) {
        const int row = tid / kChunksPerRow + k * kRowStep;
        const int e = row / G;
        if (e < item.z) {
          const int64_t token = params.entries[item.y + e].x;
          const Element* src = params.q + (token * params.num_heads + tc.group * G + row % G) * int64_t{kHeadDim} +
                               chunk_col;
          cp_async_16(&sQ(row, chunk_col, stage), src);
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(pipeline.producer_get_barrier(write_state));
      ++write_state;
      item = next_item;
    }
    pipeline.producer_tail(write_state);
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});
  typename Traits::TiledMmaQK tiled_mma_qk;
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(mma_thread);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(mma_thread);
  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K, stages)
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, stages)
  Tensor tOrVt = thr_mma_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stages)
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // P as the A operand of O = P V: the fp32 accumulator of S, in its own register order, is the
  // A fragment of the k-slices (value 8s + v of S is value v of k-slice s), so only the type
  // changes.
  Tensor tOrP = make_tensor<Element>(
      Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>{});
  static_assert(decltype(size(tSrS))::value == kBlockN / 2 && decltype(size(tOrP))::value == kBlockN / 2);

  PipelineState read_state;
  const int quad = lane % 4;
  // This thread's accumulator rows are row_base and row_base + 8 of the tile.
  const int row_base = (mma_thread / kThreadsPerWG) * 64 + ((mma_thread % kThreadsPerWG) / 32) * 16 + lane / 4;
  for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
    pipeline.consumer_wait(read_state);
    const int stage = read_state.index();
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
    const int4 item = smem.tile[stage];
    const TileCoord tc(item.x, params.num_heads_kv, params.num_blocks_max);
    const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                              params.seqlen_k);
    // Per accumulator row: its (token, slot) and the last visible key column of the block.
    int token[2], slot[2], last_col[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row_base + 8 * i;
      if (row / G < item.z) {
        const int2 entry = smem.rows[stage][row];
        token[i] = entry.x;
        slot[i] = entry.y;
        last_col[i] = seq.query_position(static_cast<int>(entry.x - seq.q_token_start)) - tc.block * kBlockN;
      } else {
        token[i] = -1;
        slot[i] = 0;
        last_col[i] = -1;
      }
    }

    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_qk, tSrQ(_, _, _, stage), tSrK(_, _, _, stage), tSrS);

    // Softmax of each row within the block (masked keys -> -inf, fully masked rows -> P = 0).
    float row_max[2], row_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = -CUDART_INF_F;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * j + 2 * quad + c;
          float& s = tSrS(4 * j + 2 * i + c);
          s = col <= last_col[i] ? s : -CUDART_INF_F;
          m = fmaxf(m, s);
        }
      }
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
      row_max[i] = m == -CUDART_INF_F ? 0.f : m * params.scale_log2;
      float l = 0.f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& s = tSrS(4 * j + 2 * i + c);
          s = exp2f(s * params.scale_log2 - row_max[i]);
          l += s;
        }
      }
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      row_sum[i] = l;
    }
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) {
      tOrP(v) = static_cast<Element>(tSrS(v));
    }
    warpgroup_fence_operand(tOrP);
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_pv, tOrP, tOrVt(_, _, _, stage), tOrO);
    pipeline.consumer_release(read_state);
    ++read_state;

    // Partial output (normalized) and lse of each valid row, per (query, head, slot).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (token[i] < 0) continue;
      const int row = row_base + 8 * i;
      const int head = tc.group * G + row % G;
      const int64_t part = ((token[i] - params.token_begin) * params.num_heads + head) * params.topk + slot[i];
      const float inv_sum = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
      Element* dst = params.part_o + part * kHeadDim + 2 * quad;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        cutlass::AlignedArray<Element, 2> pair;
        pair[0] = static_cast<Element>(tOrO(4 * j + 2 * i) * inv_sum);
        pair[1] = static_cast<Element>(tOrO(4 * j + 2 * i + 1) * inv_sum);
        *reinterpret_cast<cutlass::AlignedArray<Element, 2>*>(dst + 8 * j) = pair;
      }
      if (quad == 0) {
        params.part_lse[part] =
            row_sum[i] > 0.f ? (row_max[i] + __log2f(row_sum[i])) * 0.69314718055994531f : -CUDART_INF_F;
      }
    }
  }
#endif
}

}  // namespace msa::fwd
