// Decode indexer (MSA_SPEC s.4, s.8): the selection of a decoding step's new tokens, split over
// the sequence so one long request fills the GPU.
//
// Pass 1 (decode_select_split_kernel). Grid (split, m-tile, request); a CTA owns up to 64 packed
// rows r = (new token, index head) of a request and the split-th slice of the candidate blocks of
// its latest token (blocks before the forced recent ones; earlier tokens ignore blocks they may
// not take). Warpgroup 0 = producer (one thread issues TMA: the rows once, then the slice of the
// index-key cache, 64 keys per stage, each 64-key run at its cache row, so paged caches cost
// nothing extra); warpgroup 1 = consumer: S = q_idx k_idx^T per stage (WGMMA m64n64, fp32), per
// row the max over each block (a 128-key block spans two stages), offered to a running top-k in
// registers: the two list owners of a row keep even and odd blocks apart, as in the prefill
// selector. Each CTA writes its lists ([row, split, parity, cap], -1 padded) whatever its slice.
// Candidate blocks are fully visible to every row that may take them, so no key is masked, and no
// index-scale is applied (it does not change the order).
//
// Pass 2 (merge_selection, the prologue of every attention CTA of the row): the 2 x splits sorted
// lists go to shared memory, one warp merges them k-way (lane l owns lists l, l + 32, ...; each
// step a warp argmax of the lane heads, ties to the lower block id), and the row's selection is
// the forced leading blocks, the winners in ascending order and the forced recent blocks, -1
// padded. Running it in the attention kernel saves a launch and its drain: the CTAs of a row
// repeat it (a few KB from L2 each) instead of waiting for a merge kernel.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/blocks.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/topk.cuh"
#include "msa/decode/decode_cache.cuh"
#include "msa/decode/decode_traits.cuh"
#include "msa/fwd/fwd_collective.cuh"

namespace msa::decode {

using namespace cute;

template <class Traits>
struct DecodeSelectParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  CacheGeometry cache;
  int32_t total_q_rows;  // B * S_new * Hkv
  int32_t cache_rows;
  float* part_score;     // [B * rows, num_splits, 2, kTopKCap]
  int32_t* part_id;
  int32_t* row_arrivals; // [B * rows]: zeroed here for the attention's last-CTA count
  int s_new, num_idx_heads, num_splits;
  int block_size, init_blocks, local_blocks;
};

// The candidate blocks a CTA scans: [blk_begin, blk_end) of request b for rows of m-tile t.
struct SplitRange {
  int blk_begin, blk_end;
  __device__ SplitRange(int length, int s_new, int rows, int num_heads, int m_tile, int block_q, int block_size,
                        int init_blocks, int local_blocks, int split, int num_splits) {
    blk_begin = 0;
    blk_end = 0;
    const int last_row = min(rows, (m_tile + 1) * block_q) - 1;
    const int pos = length - s_new + last_row / num_heads;  // latest token of the tile
    if (pos < 0) return;
    const common::BlockRanges last(pos / block_size, init_blocks, local_blocks);
    const int lo = init_blocks;
    const int n = last.local_begin - lo;
    if (n <= 0) return;
    blk_begin = lo + static_cast<int>(static_cast<int64_t>(split) * n / num_splits);
    blk_end = lo + static_cast<int>(static_cast<int64_t>(split + 1) * n / num_splits);
  }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kCtasPerSm)
    decode_select_split_kernel(CUTE_GRID_CONSTANT DecodeSelectParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using MainloopPipeline = typename Traits::MainloopPipeline;
  using PipelineState = typename Traits::PipelineState;
  constexpr int kBlockQ = Traits::kBlockQ;
  constexpr int kBlockKV = Traits::kBlockKV;
  constexpr int kHeadDimIdx = Traits::kHeadDimIdx;
  constexpr int kTopKCap = Traits::kTopKCap;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);

  const int split = blockIdx.x;
  const int m_tile = blockIdx.y;
  const int b = blockIdx.z;
  const int rows = params.s_new * params.num_idx_heads;  // packed rows of one request
  const int length = params.cache.length(b);
  const SplitRange range(length, params.s_new, rows, params.num_idx_heads, m_tile, kBlockQ, params.block_size,
                         params.init_blocks, params.local_blocks, split, params.num_splits);
  const int tiles_per_block = params.block_size / kBlockKV;
  const int tile_begin = range.blk_begin * tiles_per_block;
  const int tile_end = range.blk_end * tiles_per_block;

  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;
  if (split == 0 && threadIdx.x < kBlockQ && m_tile * kBlockQ + static_cast<int>(threadIdx.x) < rows) {
    // The previous step's attention has finished (stream order); this step's starts after us.
    params.row_arrivals[static_cast<int64_t>(b) * rows + m_tile * kBlockQ + threadIdx.x] = 0;
  }

  typename MainloopPipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kTmaBytesK;
  pipeline_params.role = warp_group == 0 ? MainloopPipeline::ThreadCategory::Producer
                                         : MainloopPipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = common::kThreadsPerWarpGroup;
  if (threadIdx.x == 0) {
    smem.barrier_q.init(1);
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
  }
  MainloopPipeline pipeline_k(smem.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});

  if (warp_group == 0) {
    // ---------------- producer ----------------
    if (threadIdx.x != 0 || tile_end <= tile_begin) return;
    Tensor mQ = params.tma_q.get_tma_tensor(make_shape(params.total_q_rows, Int<kHeadDimIdx>{}));
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDimIdx>{}));
    const int q_row0 = b * rows + m_tile * kBlockQ;
    Tensor gQ = local_tile(domain_offset(make_coord(q_row0, _0{}), mQ), Shape<Int<kBlockQ>, Int<kHeadDimIdx>>{},
                           make_coord(_0{}, _0{}));
    auto [tQgQ, tQsQ] = tma_partition(params.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
    smem.barrier_q.arrive_and_expect_tx(Traits::kTmaBytesQ);
    copy(params.tma_q.with(reinterpret_cast<uint64_t&>(smem.barrier_q), 0), tQgQ, tQsQ);

    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    for (int n = tile_begin; n < tile_end; ++n) {
      const int key_row = static_cast<int>(params.cache.row(b, n * kBlockKV));
      Tensor gK = local_tile(domain_offset(make_coord(key_row, _0{}), mK), Shape<Int<kBlockKV>, Int<kHeadDimIdx>>{},
                             make_coord(_0{}, _0{}));
      auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(gK));
      pipeline_k.producer_acquire(write_state);
      copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0), tKgK, tKsK(_, write_state.index()));
      ++write_state;
    }
    pipeline_k.producer_tail(write_state);
    return;
  }

  // ---------------- consumer ----------------
  const int mma_thread = threadIdx.x - common::kThreadsPerWarpGroup;  // 0..127
  // Accumulator rows of this thread: 16 warp + lane / 4 (+ 8); the quad's lanes 0-1 keep lists for
  // the first row (even / odd blocks), lanes 2-3 for the second.
  const int quad = lane % 4;
  const int my_half = quad >> 1;
  const int my_parity = quad & 1;
  const int my_row = (mma_thread / 32) * 16 + lane / 4 + 8 * my_half;
  const int row_in_req = m_tile * kBlockQ + my_row;
  const bool row_valid = row_in_req < rows;

  int cand_begin = 0, cand_end = 0;
  if (row_valid) {
    const int pos = length - params.s_new + row_in_req / params.num_idx_heads;
    if (pos >= 0) {
      const common::BlockRanges ranges(pos / params.block_size, params.init_blocks, params.local_blocks);
      cand_begin = ranges.init_end;
      cand_end = ranges.local_begin;
    }
  }

  common::RunningTopK<kTopKCap> top;
  top.clear();

  if (tile_end > tile_begin) {
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(mma_thread);
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
    Tensor tSrK = thr_mma.partition_fragment_B(sK);
    Tensor tSrS = partition_fragment_C(tiled_mma, Shape<Int<kBlockQ>, Int<kBlockKV>>{});

    smem.barrier_q.wait(0);
    PipelineState read_state;
    float pending = -CUDART_INF_F;  // max so far over the current block's earlier stages
    for (int n = tile_begin; n < tile_end; ++n) {
      pipeline_k.consumer_wait(read_state);
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrQ, tSrK(_, _, _, read_state.index()), tSrS);
      pipeline_k.consumer_release(read_state);
      ++read_state;

      const float m0 = fwd::block_row_max<kBlockKV>(tSrS, 0);
      const float m1 = fwd::block_row_max<kBlockKV>(tSrS, 1);
      const float tile_max = my_half ? m1 : m0;
      pending = (n % tiles_per_block == 0) ? tile_max : fmaxf(pending, tile_max);
      if ((n + 1) % tiles_per_block == 0) {
        const int block = n / tiles_per_block;
        if ((block & 1) == my_parity && block >= cand_begin && block < cand_end && pending > top.threshold()) {
          top.insert(pending, block);
        }
      }
    }
  }

  if (row_valid) {
    const int64_t list = ((static_cast<int64_t>(b) * rows + row_in_req) * params.num_splits + split) * 2 + my_parity;
    float* scores = params.part_score + list * kTopKCap;
    int32_t* ids = params.part_id + list * kTopKCap;
#pragma unroll
    for (int p = 0; p < kTopKCap; ++p) {
      scores[p] = top.score[p];
      ids[p] = top.id[p];
    }
  }
#endif
}

// Where a row's lists live and the selection rule's options; filled by the launcher.
struct SelectionLists {
  const float* part_score;  // [B * rows, num_splits, 2, cap]
  const int32_t* part_id;
  int num_splits;
  int block_size, topk, init_blocks, local_blocks;
};

// Shared-memory bytes merge_selection needs for the lists.
template <int kTopKCap>
constexpr int merge_smem_bytes(int num_splits) {
  return 2 * num_splits * (kTopKCap * 8 + 4);
}

// a ranks before b: a real entry with a higher score, or the same score and a lower block id.
__device__ __forceinline__ bool ranks_before(float sa, int ia, float sb, int ib) {
  return ia >= 0 && (ib < 0 || sa > sb || (sa == sb && ia < ib));
}

// The selection of packed row `row` (query position `pos`) into selection[0, topk). Every thread
// of the CTA calls it (they load the lists); warp 0 merges. `lists_smem` holds
// merge_smem_bytes(num_splits) bytes. Ends with a CTA barrier.
template <int kTopKCap>
__device__ void merge_selection(const SelectionLists& p, int64_t row, int pos, char* lists_smem,
                                int32_t* selection) {
  const int num_lists = 2 * p.num_splits;
  const int entries = num_lists * kTopKCap;
  float* s_score = reinterpret_cast<float*>(lists_smem);
  int32_t* s_id = reinterpret_cast<int32_t*>(s_score + entries);
  int32_t* s_head = s_id + entries;

  int num_selected = 0;
  common::BlockRanges ranges(0, 0, 1);
  if (pos >= 0) {
    ranges = common::BlockRanges(pos / p.block_size, p.init_blocks, p.local_blocks);
    num_selected = max(0, min(p.topk - ranges.num_forced(), ranges.num_candidates()));
  }
  if (num_selected > 0) {
    // 16-byte loads, four in flight per thread before any store (the lists are in L2).
    const float4* src_score = reinterpret_cast<const float4*>(p.part_score + row * entries);
    const int4* src_id = reinterpret_cast<const int4*>(p.part_id + row * entries);
    const int n4 = entries / 4;
    for (int base = threadIdx.x; base < n4; base += 4 * blockDim.x) {
      float4 sc[4];
      int4 id[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * blockDim.x;
        if (e < n4) {
          sc[u] = __ldcg(src_score + e);
          id[u] = __ldcg(src_id + e);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * blockDim.x;
        if (e < n4) {
          reinterpret_cast<float4*>(s_score)[e] = sc[u];
          reinterpret_cast<int4*>(s_id)[e] = id[u];
        }
      }
    }
    for (int l = threadIdx.x; l < num_lists; l += blockDim.x) s_head[l] = 0;
  }
  __syncthreads();

  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    auto lane_best = [&](float& best_s, int& best_id, int& best_list) {
      best_s = -CUDART_INF_F;
      best_id = -1;
      best_list = -1;
      for (int l = lane; l < num_lists; l += 32) {
        const int h = s_head[l];
        if (h >= kTopKCap) continue;
        const float sc = s_score[l * kTopKCap + h];
        const int id = s_id[l * kTopKCap + h];
        if (ranks_before(sc, id, best_s, best_id)) {
          best_s = sc;
          best_id = id;
          best_list = l;
        }
      }
    };
    int chosen = -1;  // lane k holds the k-th winner
    int taken = 0;
    if (num_selected > 0) {
      float my_s;
      int my_id, my_list;
      lane_best(my_s, my_id, my_list);
      for (; taken < num_selected; ++taken) {
        float sc = my_s;
        int id = my_id;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float so = __shfl_xor_sync(0xffffffff, sc, o);
          const int io = __shfl_xor_sync(0xffffffff, id, o);
          if (ranks_before(so, io, sc, id)) {
            sc = so;
            id = io;
          }
        }
        if (id < 0) break;  // every list ran out
        if (lane == taken) chosen = id;
        if (my_id == id) {  // ids are unique across lists: exactly one lane owns the winner
          ++s_head[my_list];
          lane_best(my_s, my_id, my_list);
        }
        __syncwarp();
      }
    }
    // Winners in ascending order: lane k's rank among them is its slot after the leading blocks.
    int rank = 0;
    for (int k = 0; k < taken; ++k) rank += __shfl_sync(0xffffffff, chosen, k) < chosen;
    if (lane < taken) selection[ranges.init_end + rank] = chosen;
    const int recent_begin = ranges.init_end + taken;
    const int num_recent = pos >= 0 ? ranges.local - ranges.local_begin + 1 : 0;
    for (int slot = lane; slot < p.topk; slot += 32) {
      if (pos < 0) {
        selection[slot] = -1;  // a request shorter than its new tokens: this token sees nothing
      } else if (slot < ranges.init_end) {
        selection[slot] = slot;
      } else if (slot >= recent_begin && slot < recent_begin + num_recent) {
        selection[slot] = ranges.local_begin + (slot - recent_begin);
      } else if (slot >= recent_begin + num_recent) {
        selection[slot] = -1;
      }
    }
  }
  __syncthreads();
}

}  // namespace msa::decode
