// Fused SM90 block selector (MSA_SPEC s.4, s.9).
//
// Math: for every packed row r = (token i, index head g) of a query tile and every candidate key
// block b, S(r, b) = max_{j in b} q_idx[r] . k_idx[j]; keep the top (topk - forced) candidates per
// row; write the forced blocks plus those, ascending, -1 padded. index_scale > 0 does not change
// the order, so it is not applied.
//
// Grid: one CTA per (128-row query tile, sequence), heaviest (latest) tiles launched first.
// Warp roles: warpgroup 0 is the producer (one warp issues TMA: the Q tile once, then K tiles
// through a kStages-deep ring); warpgroups 1-2 are consumers, 64 rows each (WGMMA m64n128, fp32).
// Only blocks strictly before a row's forced recent blocks are ever scored, so no token-level
// mask is needed: those blocks are fully visible. Per key tile a consumer thread reduces its
// accumulator to per-row block maxima (4 lanes share a row: two shuffles), and the lane that owns
// (row, block parity) offers the score to its running top-k in registers. After the last tile
// the two parity lists of a row are merged through shared memory and written once; the
// [Sq, Sk/block] score matrix never exists.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "msa/common/arch.cuh"
#include "msa/common/barriers.cuh"
#include "msa/common/blocks.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/common/topk.cuh"
#include "msa/params.h"
#include "msa/select/select_traits.cuh"

namespace msa::select {

using namespace cute;

template <class Traits>
struct SelectKernelParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  int32_t total_q_rows;
  int32_t total_k;
  int32_t* block_indices;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch;
  int seqlen_q;
  int seqlen_k;
  int num_m_tiles;  // tiles of the longest query sequence
  int num_idx_heads;
  int block_size;
  int topk;
  int init_blocks;
  int local_blocks;
};

// Which rows of a query tile exist and what each may select; shared by producer and consumers so
// both walk exactly the same key tiles.
struct TileRows {
  int row_begin;  // first packed row of the tile within its sequence
  int num_rows;   // valid rows in the tile (0 when the tile lies past the sequence)
  int tile_first; // first key tile to score
  int tile_last;  // last key tile to score (inclusive); < tile_first when nothing is scored

  __device__ TileRows(const common::SeqInfo& seq, int m_tile, int block_q, int block_kv, int num_heads,
                      int block_size, int init_blocks, int local_blocks, int64_t total_q_rows) {
    const int total_rows = seq.seqlen_q * num_heads;
    row_begin = m_tile * block_q;
    // Also clamped to the rows of q_idx: cu_seqlens that overrun the tensor (possible only through
    // a direct op call that skipped the host checks) must not make the kernel write past the output.
    const int64_t rows_in_tensor = total_q_rows - seq.q_token_start * num_heads - row_begin;
    num_rows = static_cast<int>(max(int64_t{0}, min(int64_t{min(block_q, total_rows - row_begin)}, rows_in_tensor)));
    tile_first = 0;
    tile_last = -1;
    if (num_rows > 0) {
      // The last row has the latest local block, hence the widest candidate range; the first
      // candidate of any row is at least init_blocks.
      const int last_token = (row_begin + num_rows - 1) / num_heads;
      const common::BlockRanges last(seq.query_position(last_token) / block_size, init_blocks, local_blocks);
      if (last.local_begin > init_blocks) {
        tile_first = init_blocks * block_size / block_kv;
        tile_last = ((last.local_begin - 1) * block_size) / block_kv;
      }
    }
  }
  __device__ int num_tiles() const { return tile_last - tile_first + 1; }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    select_kernel(CUTE_GRID_CONSTANT SelectKernelParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using MainloopPipeline = typename Traits::MainloopPipeline;
  using PipelineState = typename Traits::PipelineState;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kBlockQ = Traits::kBlockQ;
  constexpr int kBlockKV = Traits::kBlockKV;
  constexpr int kHeadDimIdx = Traits::kHeadDimIdx;
  constexpr int kTopKCap = Traits::kTopKCap;
  constexpr int kListStride = Traits::kListStride;
  constexpr int kNumMmaThreads = Traits::kNumMmaThreads;

  extern __shared__ char smem_buf[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_buf);

  // Heaviest tiles first: the last query tile of a sequence scores the most key tiles.
  const int linear = blockIdx.x;
  const int batch_idx = linear % params.batch;
  const int m_tile = params.num_m_tiles - 1 - linear / params.batch;
  const common::SeqInfo seq(batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q, params.seqlen_k);
  const TileRows tile(seq, m_tile, kBlockQ, kBlockKV, params.num_idx_heads, params.block_size, params.init_blocks,
                      params.local_blocks, params.total_q_rows);
  if (tile.num_rows == 0) {
    return;  // uniform across the CTA, before any barrier is touched
  }
  const int num_tiles = tile.num_tiles();

  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;

  typename MainloopPipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kTmaBytesK;
  pipeline_params.role = warp_group == 0 ? MainloopPipeline::ThreadCategory::Producer
                                         : MainloopPipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = kNumMmaThreads;
  if (threadIdx.x == 0) {
    smem.barrier_q.init(1);
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
  }
  MainloopPipeline pipeline_k(smem.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  __syncthreads();

  if (warp_group == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (common::warp_idx_in_warp_group() != 0) {
      return;
    }
    Tensor mQ = params.tma_q.get_tma_tensor(make_shape(params.total_q_rows, Int<kHeadDimIdx>{}));
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.total_k, Int<kHeadDimIdx>{}));
    const int q_row0 = static_cast<int>(seq.q_token_start * params.num_idx_heads);
    const int k_row0 = static_cast<int>(seq.k_token_start);
    Tensor gQ = local_tile(domain_offset(make_coord(q_row0, _0{}), mQ), Shape<Int<kBlockQ>, Int<kHeadDimIdx>>{},
                           make_coord(m_tile, _0{}));  // (kBlockQ, Di)
    Tensor gK = local_tile(domain_offset(make_coord(k_row0, _0{}), mK), Shape<Int<kBlockKV>, Int<kHeadDimIdx>>{},
                           make_coord(_, _0{}));  // (kBlockKV, Di, n)
    Tensor sQ = make_tensor(make_smem_ptr(smem.tensors.mainloop.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.tensors.mainloop.k.data()), typename Traits::SmemLayoutK{});
    auto [tQgQ, tQsQ] = tma_partition(params.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
    auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                      group_modes<0, 2>(gK));
    if (num_tiles > 0) {
      if (lane == 0) {
        smem.barrier_q.arrive_and_expect_tx(Traits::kTmaBytesQ);
        copy(params.tma_q.with(reinterpret_cast<uint64_t&>(smem.barrier_q), 0), tQgQ, tQsQ);
      }
      PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
      for (int n = tile.tile_first; n <= tile.tile_last; ++n) {
        pipeline_k.producer_acquire(write_state);
        if (lane == 0) {
          copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0), tKgK(_, n),
               tKsK(_, write_state.index()));
        }
        ++write_state;
      }
      pipeline_k.producer_tail(write_state);
    }
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - common::kThreadsPerWarpGroup;  // 0..255
  // Accumulator ownership (SM90 64xN fp32 fragment): value 4*j + 2*i + c of this thread sits at
  // row 16*warp + lane/4 + 8*i of its warpgroup's 64 rows, column 8*j + 2*(lane%4) + c.
  const int quad = lane % 4;
  const int my_half = quad >> 1;   // which of the thread's two rows it keeps a list for
  const int my_parity = quad & 1;  // which key blocks (even / odd ids) it keeps a list for
  const int my_row = (mma_thread / 128) * 64 + ((mma_thread % 128) / 32) * 16 + lane / 4 + 8 * my_half;

  int cand_begin = 0, cand_end = 0;  // candidate block ids [cand_begin, cand_end) of my_row
  if (my_row < tile.num_rows) {
    const int token = (tile.row_begin + my_row) / params.num_idx_heads;
    const common::BlockRanges ranges(seq.query_position(token) / params.block_size, params.init_blocks,
                                     params.local_blocks);
    cand_begin = ranges.init_end;
    cand_end = ranges.local_begin;
  }

  common::RunningTopK<kTopKCap> top;
  top.clear();

  if (num_tiles > 0) {
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(mma_thread);
    Tensor sQ = make_tensor(make_smem_ptr(smem.tensors.mainloop.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.tensors.mainloop.k.data()), typename Traits::SmemLayoutK{});
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_mma.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_K, kStages)
    Tensor tSrS = partition_fragment_C(tiled_mma, Shape<Int<kBlockQ>, Int<kBlockKV>>{});
    static_assert(decltype(size(tSrS))::value == kBlockKV / 2, "one 64 x kBlockKV fragment per warpgroup");

    smem.barrier_q.wait(0);
    const bool two_blocks_per_tile = params.block_size * 2 == kBlockKV;
    PipelineState read_state;
    for (int n = tile.tile_first; n <= tile.tile_last; ++n) {
      pipeline_k.consumer_wait(read_state);
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrQ, tSrK(_, _, _, read_state.index()), tSrS);
      pipeline_k.consumer_release(read_state);
      ++read_state;

      // Block maxima: rowmax[i][h] over columns of half h (64 keys) of this thread's row i.
      float rowmax[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          constexpr int kColGroupsPerHalf = kBlockKV / 16;  // 8-column groups in 64 keys
          float m = tSrS(4 * (h * kColGroupsPerHalf) + 2 * i);
#pragma unroll
          for (int jj = 0; jj < kColGroupsPerHalf; ++jj) {
            const int j = h * kColGroupsPerHalf + jj;
            m = fmaxf(m, fmaxf(tSrS(4 * j + 2 * i), tSrS(4 * j + 2 * i + 1)));
          }
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
          rowmax[i][h] = m;
        }
      }
      const float lo = my_half ? rowmax[1][0] : rowmax[0][0];
      const float hi = my_half ? rowmax[1][1] : rowmax[0][1];
      float score;
      int block;
      bool mine;
      if (two_blocks_per_tile) {
        score = my_parity ? hi : lo;
        block = 2 * n + my_parity;
        mine = true;
      } else {
        score = fmaxf(lo, hi);
        block = n;
        mine = (n & 1) == my_parity;
      }
      if (mine && block >= cand_begin && block < cand_end && score > top.threshold()) {
        top.insert(score, block);
      }
    }
  }

  // ---------------- epilogue: merge the two parity lists of each row, write once ----------------
  auto& epi = smem.tensors.epilogue;
  // The operand buffers are reused below: every WGMMA has completed (waited in warpgroup_gemm) and
  // every issued TMA load has been consumed, so nothing else touches them any more.
  cutlass::arch::NamedBarrier::sync(kNumMmaThreads, static_cast<int>(common::SelectBarrier::ListsWritten));
  {
    float* my_scores = epi.score + my_row * kListStride + my_parity * kTopKCap;
    int* my_ids = epi.id + my_row * kListStride + my_parity * kTopKCap;
#pragma unroll
    for (int p = 0; p < kTopKCap; ++p) {
      my_scores[p] = top.score[p];
      my_ids[p] = top.id[p];
    }
  }
  cutlass::arch::NamedBarrier::sync(kNumMmaThreads, static_cast<int>(common::SelectBarrier::ListsWritten));

  if (my_row < tile.num_rows) {
    const int token = (tile.row_begin + my_row) / params.num_idx_heads;
    const common::BlockRanges ranges(seq.query_position(token) / params.block_size, params.init_blocks,
                                     params.local_blocks);
    const int num_selected = min(params.topk - ranges.num_forced(), ranges.num_candidates());
    const float* score_even = epi.score + my_row * kListStride;
    const int* id_even = epi.id + my_row * kListStride;
    const float* score_odd = score_even + kTopKCap;
    const int* id_odd = id_even + kTopKCap;
    // Merge walk: the top num_selected of the union are a prefix of each sorted list. Ties go to
    // the lower id; num_selected < kTopKCap, so neither index runs off its list. The lists can run
    // out early (NaN scores never enter a list): the walk stops there and the row selects fewer
    // blocks (the recent blocks follow them, the rest is -1).
    int take_even = 0, take_odd = 0;
    for (int s = 0; s < num_selected; ++s) {
      const int ie = id_even[take_even], io = id_odd[take_odd];
      if (ie < 0 && io < 0) break;
      const float se = score_even[take_even], so = score_odd[take_odd];
      const bool even_wins =
          ie >= 0 && (io < 0 || se > so || (se == so && ie < io));
      take_even += even_wins;
      take_odd += !even_wins;
    }
    // Each of the row's two threads places the selected entries of its own list: the position is
    // the number of selected ids smaller than it (ids are unique across the lists).
    const int* own = my_parity ? id_odd : id_even;
    const int own_taken = my_parity ? take_odd : take_even;
    int* slots = epi.slots + my_row * kTopKCap;
    for (int p = 0; p < own_taken; ++p) {
      const int id = own[p];
      int rank = 0;
      for (int e = 0; e < take_even; ++e) rank += id_even[e] < id;
      for (int o = 0; o < take_odd; ++o) rank += id_odd[o] < id;
      slots[ranges.init_end + rank] = id;
    }
    if (my_parity == 0) {
      const int recent_begin = ranges.init_end + take_even + take_odd;
      const int num_recent = ranges.local - ranges.local_begin + 1;
      for (int slot = 0; slot < params.topk; ++slot) {
        if (slot < ranges.init_end) {
          slots[slot] = slot;
        } else if (slot >= recent_begin && slot < recent_begin + num_recent) {
          slots[slot] = ranges.local_begin + (slot - recent_begin);
        } else if (slot >= recent_begin + num_recent) {
          slots[slot] = -1;
        }
      }
    }
  }
  cutlass::arch::NamedBarrier::sync(kNumMmaThreads, static_cast<int>(common::SelectBarrier::SlotsWritten));

  // Rows of a tile are contiguous in the output ([rows, topk] row-major): one coalesced sweep.
  const int64_t out_row0 = seq.q_token_start * params.num_idx_heads + tile.row_begin;
  int32_t* out = params.block_indices + out_row0 * params.topk;
  const int count = tile.num_rows * params.topk;
  for (int idx = mma_thread; idx < count; idx += kNumMmaThreads) {
    const int row = idx / params.topk;
    const int slot = idx - row * params.topk;
    out[idx] = epi.slots[row * kTopKCap + slot];
  }
#endif
}

}  // namespace msa::select
