// Indexer distillation loss (MSA_SPEC s.7) on the selected support, KV-outer over the forward
// plan's lists built with one row per token: a tile is one selected key block and up to 128 query
// tokens of one group that chose it.
//
// Math per (token t, group g) and key j of the support (log2 units, s2 = index_scale log2(e) q_idx.k_idx):
//   teacher  P_j = mean over the G heads h of 2^(softmax_scale log2(e) q_h.k_j - lse2_h)
//   student  Q_j = 2^(s2_j - Z_t), Z_t = log2 sum over the support of 2^s2
//   loss    += ln 2 sum_j P_j (log2 P_j - s2_j + Z_t)            (0 log 0 = 0)
//   dS_j     = Q_j - P_j;  dq_idx_t += c sum_j dS_j k_idx_j;  dk_idx_j += c sum_t dS_j q_idx_t,
// with c = index_scale / (number of (token, group) pairs) applied at the atomics.
// Z_t spans every block of the support, so it comes from a first pass (kStatsPass): per
// (token, group, slot) the max and the exp-sum of s2 over the block's visible keys, merged by the
// second pass's producer. Neither pass stores an Sq x Sk (or Sq x support) matrix.
//
// Warp roles: warpgroup 0 produces (thread 0 TMA-loads K and k_idx when the block changes; all
// 128 threads gather the tile's q_idx rows and, in pass 2, one head's query rows per stage);
// warpgroups 1-2 consume, 64 tokens each. Pass 2 per tile:
//   for each head h: S = Q_h K^T (SS) -> P accumulated in registers
//   s = q_idx k_idx^T (SS) -> Q, loss terms, dS (registers)
//   dS -> staging tile -> dK_idx = dS^T q_idx (SS), dQ_idx = dS k_idx (RS) -> fp32 atomics.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/fast_math.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/fwd/fwd_common.cuh"
#include "msa/fwd/fwd_scheduler.cuh"
#include "msa/kl/kl_collective.cuh"
#include "msa/kl/kl_traits.cuh"

namespace msa::kl {

using namespace cute;

template <class Traits>
struct KlKernelParams {
  using Element = typename Traits::Element;
  typename Traits::TmaK tma_k;
  typename Traits::TmaKi tma_ki;
  int32_t total_k;
  const Element* q;          // [total_q, Hq, D]
  const Element* q_idx;      // [total_q, Hkv, Di]
  const float* lse_log2;     // [total_q, Hq]: lse in log2 units, +inf where lse = -inf
  float2* stats;             // [total_q, Hkv, topk]: (max s2, sum 2^(s2 - max)); zeroed, l = 0: no key
  const float* logz;         // [total_q, Hkv]: the student's log2-normaliser (kl_logz_kernel, pass 2)
  float* dq_idx_accum;       // [total_q, Hkv, Di], zeroed
  float* dk_idx_accum;       // [total_k, Di], zeroed
  double* loss_sum;          // [1], zeroed: sum over pairs of KL (natural log)
  const int32_t* entries;    // pack_entry(token, slot) per list entry
  const int4* work;          // (list, first entry, entries, 0) per tile, then the sentinel
  const int32_t* num_work;   // [1]
  int32_t* work_counter;     // [1], zeroed before each pass
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int seqlen_q, seqlen_k;
  int num_heads, num_heads_kv, group_size, topk;
  cutlass::FastDivmod num_blocks_max_div, num_heads_kv_div;
  float scale_log2;        // softmax_scale * log2(e)
  float index_scale_log2;  // index_scale * log2(e)
  float grad_scale;        // index_scale / pairs
};

// K (pass 2) and k_idx of one key block into the single K/V stage; called by one thread.
template <class Traits, class Params, class SK, class SKi>
__device__ __forceinline__ void load_key_block(Params const& params, SK& sK, SKi& sKi, uint64_t* barrier,
                                               int key_row, int group) {
  constexpr int kBlockN = Traits::kBlockN;
  Tensor mKi = params.tma_ki.get_tma_tensor(make_shape(params.total_k, Int<Traits::kIdxDim>{}));
  Tensor gKi = local_tile(domain_offset(make_coord(key_row, _0{}), mKi), Shape<Int<kBlockN>, Int<Traits::kIdxDim>>{},
                          make_coord(_0{}, _0{}));
  auto [tKigKi, tKisKi] = tma_partition(params.tma_ki, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sKi),
                                        group_modes<0, 2>(gKi));
  copy(params.tma_ki.with(*barrier, 0), tKigKi, tKisKi);
  if constexpr (!Traits::kStatsPass) {
    Tensor mK =
        params.tma_k.get_tma_tensor(make_shape(params.total_k, Int<Traits::kHeadDim>{}, params.num_heads_kv));
    Tensor gK = local_tile(domain_offset(make_coord(key_row, _0{}), mK(_, _, group)),
                           Shape<Int<kBlockN>, Int<Traits::kHeadDim>>{}, make_coord(_0{}, _0{}));
    auto [tKgK, tKsK] =
        tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    copy(params.tma_k.with(*barrier, 0), tKgK, tKsK);
  }
}

// Gathers 128 rows of kDim elements into a SW128 K-major tile stage: row r comes from
// src + row_offset(r) (elements), or is zero-filled when row_offset(r) < 0 (padding rows meet
// dS = 0 in the gradient GEMMs, and 0 x NaN from stale bits would poison whole columns).
template <int kDim, class Element, class RowOffset>
__device__ __forceinline__ void gather_rows(uint32_t smem_thread, const Element* src, int tid, RowOffset&& row_offset) {
  constexpr int kChunksPerRow = kDim / 8;
  constexpr int kRowStep = common::kThreadsPerWarpGroup / kChunksPerRow;
  static_assert(kRowStep % 8 == 0 && 128 / kRowStep == kChunksPerRow);
  const int chunk_col = (tid % kChunksPerRow) * 8;
#pragma unroll
  for (int k = 0; k < kChunksPerRow; ++k) {
    const int row = tid / kChunksPerRow + k * kRowStep;
    const int64_t offset = row_offset(row);
    const uint32_t dst = smem_thread + k * kRowStep * 128;
    if (offset >= 0) {
      fwd::cp_async_16(dst, src + offset + chunk_col);
    } else {
      asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0));
    }
  }
}

// Shared address of this producer thread's first chunk in a row-gathered tile.
template <int kDim, class TensorS>
__device__ __forceinline__ uint32_t gather_base(TensorS const& sX, int tid) {
  constexpr int kChunksPerRow = kDim / 8;
  return static_cast<uint32_t>(__cvta_generic_to_shared(&sX(tid / kChunksPerRow, (tid % kChunksPerRow) * 8, 0)));
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    kl_kernel(CUTE_GRID_CONSTANT KlKernelParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using TilePipeline = typename Traits::TilePipeline;
  using QPipeline = typename Traits::QPipeline;
  using KVPipeline = typename Traits::KVPipeline;
  constexpr bool kStats = Traits::kStatsPass;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kIdxDim = Traits::kIdxDim;
  constexpr int kThreadsPerWG = common::kThreadsPerWarpGroup;
  constexpr int kMmaThreads = Traits::kNumMmaThreads;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int G = params.group_size;

  TilePipeline tile_pipeline =
      fwd::make_query_ring<TilePipeline>(smem.tile_pipeline, warp_group, 2 * kThreadsPerWG, kMmaThreads);
  KVPipeline kv_pipeline = fwd::make_kv_ring<KVPipeline>(smem.kv_pipeline, warp_group, Traits::kTmaBytesKV, kMmaThreads);
  auto make_q_ring = [&]() {
    if constexpr (kStats) {
      return 0;
    } else {
      return fwd::make_query_ring<QPipeline>(smem.q_pipeline, warp_group, 2 * kThreadsPerWG, kMmaThreads);
    }
  };
  auto q_pipeline = make_q_ring();
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_ki.get_tma_descriptor());
    if constexpr (!kStats) cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
  }
  __syncthreads();

  const int num_work = *params.num_work;
  Tensor sQi = make_tensor(make_smem_ptr(smem.qi.data()), typename Traits::SmemLayoutQi{});
  Tensor sKi = make_tensor(make_smem_ptr(smem.ki.data()), typename Traits::SmemLayoutKi{});
  auto k_smem = [&]() {
    if constexpr (kStats) {
      return sKi;  // unused
    } else {
      return make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
    }
  };
  auto sK = k_smem();

  if (warp_group == 0) {
    // ---------------- producer warpgroup ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int tid = threadIdx.x;
    const uint32_t qi_smem_thread = gather_base<kIdxDim>(sQi, tid);
    auto tile_state = cutlass::make_producer_start_state<TilePipeline>();
    auto kv_state = cutlass::make_producer_start_state<KVPipeline>();
    auto q_state = [&]() {
      if constexpr (kStats) {
        return 0;
      } else {
        return cutlass::make_producer_start_state<QPipeline>();
      }
    }();
    int loaded_list = -1;
    fwd::DynamicTileScheduler scheduler(params.work_counter, num_work, &smem.grab_slot,
                                        static_cast<int>(KlBarrier::ProducerGrab));
    auto sync_producer = [] {
      cutlass::arch::NamedBarrier::sync(kThreadsPerWG, static_cast<int>(KlBarrier::ProducerRows));
    };
    // Thread 0: K / k_idx of the tile's block when it changes. Issued after the tile's first
    // stage: with one K/V stage the consumers free the old block's stage only once they see it.
    auto load_block_if_new = [&](int4 item) {
      if (item.x != loaded_list) {
        if (tid == 0) {
          const fwd::TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
          const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                    params.seqlen_k);
          kv_pipeline.producer_acquire(kv_state);
          load_key_block<Traits>(params, sK, sKi, kv_pipeline.producer_get_barrier(kv_state),
                                 static_cast<int>(seq.k_token_start) + tc.block * kBlockN, tc.group);
        }
        ++kv_state;
        loaded_list = item.x;
      }
      __syncwarp();  // thread 0 may have branched off; bar.sync needs the whole warp
    };
    for (;;) {
      const int4 item = params.work[scheduler.tile()];  // the plan's sentinel (list -1) at the end
      const bool last = scheduler.done();
      int token = -1, slot = 0;
      if (!last && tid < item.z) {
        const int32_t entry = params.entries[item.y + tid];
        token = fwd::entry_token(entry);
        slot = fwd::entry_slot(entry);
      }
      const int group = last ? 0 : fwd::TileCoord(item.x, params.num_blocks_max_div, params.num_heads_kv_div).group;

      if constexpr (!kStats) {
        // Teacher: one stage per head of the group (only the sentinel's stage at the end).
        const uint32_t q_smem_thread = gather_base<kHeadDim>(
            make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{}), tid);
        const int heads = last ? 1 : G;
        // Each head's lse is loaded one head ahead, so its latency overlaps the previous stage's
        // acquire and gather instead of delaying this stage's hand-over.
        const float* row_lse = token >= 0 ? params.lse_log2 + int64_t{token} * params.num_heads + group * G : nullptr;
        float next_lse = row_lse != nullptr ? row_lse[0] : 0.f;
        for (int h = 0; h < heads; ++h) {
          const float lse = next_lse;
          if (row_lse != nullptr && h + 1 < heads) next_lse = row_lse[h + 1];
          q_pipeline.producer_acquire(q_state);
          const int stage = q_state.index();
          const int head = group * G + h;
          if (tid == 0) smem.q_item[stage] = item;
          smem.q_row_token[stage][tid] = token;
          smem.q_row_lse[stage][tid] = lse;
          sync_producer();
          gather_rows<kHeadDim>(q_smem_thread + stage * Traits::kQStageBytes, params.q, tid, [&](int row) {
            const int tok = smem.q_row_token[stage][row];
            return tok >= 0 ? (int64_t{tok} * params.num_heads + head) * kHeadDim : int64_t{-1};
          });
          cutlass::arch::cpasync_barrier_arrive_noinc(q_pipeline.producer_get_barrier(q_state));
          q_pipeline.producer_commit(q_state);
          ++q_state;
          if (h == 0 && !last) load_block_if_new(item);
        }
        if (last) break;
      }

      // The tile stage: row data and the index queries.
      tile_pipeline.producer_acquire(tile_state);
      const int tstage = tile_state.index();
      smem.t_row_token[tstage][tid] = token;
      if constexpr (kStats) {
        if (tid == 0) smem.t_item[tstage] = item;
        smem.t_row_slot[tstage][tid] = slot;
      } else {
        smem.t_row_logz[tstage][tid] = token >= 0 ? params.logz[int64_t{token} * params.num_heads_kv + group] : 0.f;
      }
      sync_producer();
      gather_rows<kIdxDim>(qi_smem_thread + tstage * Traits::kQiStageBytes, params.q_idx, tid, [&](int row) {
        const int tok = smem.t_row_token[tstage][row];
        return tok >= 0 ? (int64_t{tok} * params.num_heads_kv + group) * kIdxDim : int64_t{-1};
      });
      cutlass::arch::cpasync_barrier_arrive_noinc(tile_pipeline.producer_get_barrier(tile_state));
      tile_pipeline.producer_commit(tile_state);
      ++tile_state;
      if constexpr (kStats) {
        if (!last) load_block_if_new(item);
        if (last) break;
      }
      scheduler.advance();
    }
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const int mma_wg = mma_thread / kThreadsPerWG;
  const int warp_in_wg = (mma_thread % kThreadsPerWG) / 32;
  const int row_base = warp_in_wg * 16 + lane / 4;  // + 8 i: this thread's rows of its warpgroup's 64

  typename Traits::TiledMmaIdx tiled_mma_idx;
  auto thr_idx = tiled_mma_idx.get_thread_slice(mma_thread);
  Tensor tIrQi = thr_idx.partition_fragment_A(sQi);
  Tensor tIrKi = thr_idx.partition_fragment_B(sKi);
  Tensor tIrS = partition_fragment_C(tiled_mma_idx, Shape<Int<kBlockM>, Int<kBlockN>>{});

  auto tile_state = typename TilePipeline::PipelineState{};
  auto kv_state = typename KVPipeline::PipelineState{};
  int current_list = -1;
  // The K/V stage of a tile's block: the previous block's stage is released on a change.
  auto switch_block = [&](int list) {
    if (list != current_list) {
      if (current_list >= 0) {
        kv_pipeline.consumer_release(kv_state);
        ++kv_state;
      }
      kv_pipeline.consumer_wait(kv_state);
      current_list = list;
    }
  };
  // Last visible key of the block (relative) for each of this thread's two rows; -1: none.
  auto last_keys = [&](const int32_t* row_token, const fwd::TileCoord& tc, int (&last_key)[2]) {
    const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                              params.seqlen_k);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tok = row_token[mma_wg * 64 + row_base + 8 * i];
      last_key[i] = tok >= 0 ? seq.query_position(static_cast<int>(tok - seq.q_token_start)) - tc.block * kBlockN : -1;
    }
  };

  if constexpr (kStats) {
    for (;;) {
      tile_pipeline.consumer_wait(tile_state);
      const int tstage = tile_state.index();
      cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
      const int4 item = smem.t_item[tstage];
      if (item.x < 0) break;
      const fwd::TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
      switch_block(item.x);
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_idx, tIrQi(_, _, _, tstage), tIrKi, tIrS);
      int last_key[2];
      last_keys(smem.t_row_token[tstage], tc, last_key);
      int row_token[2], row_slot[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        row_token[i] = smem.t_row_token[tstage][mma_wg * 64 + row_base + 8 * i];
        row_slot[i] = smem.t_row_slot[tstage][mma_wg * 64 + row_base + 8 * i];
      }
      tile_pipeline.consumer_release(tile_state);
      ++tile_state;
      fwd::mask_block_columns<kBlockN>(tIrS, last_key, quad);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float m = fwd::block_row_max<kBlockN>(tIrS, i);
        const float m2 = m * params.index_scale_log2;
        const float l = fwd::exp2_row_sum<kBlockN>(tIrS, i, params.index_scale_log2, m == -CUDART_INF_F ? 0.f : m2);
        if (quad == 0 && row_token[i] >= 0 && m != -CUDART_INF_F) {
          params.stats[(int64_t{row_token[i]} * params.num_heads_kv + tc.group) * params.topk + row_slot[i]] =
              make_float2(m2, l);
        }
      }
    }
  } else {
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sQit = make_tensor(make_smem_ptr(smem.qi.data()), typename Traits::SmemLayoutQit{});
    Tensor sKit = make_tensor(make_smem_ptr(smem.ki.data()), typename Traits::SmemLayoutKit{});
    Tensor sPt = make_tensor(make_smem_ptr(Traits::kStageInQ ? smem.q.data() : smem.staging.data()),
                             typename Traits::SmemLayoutPt{});
    typename Traits::TiledMmaS tiled_mma_s;
    typename Traits::TiledMmaDq tiled_mma_dq;
    typename Traits::TiledMmaDk tiled_mma_dk;
    auto thr_s = tiled_mma_s.get_thread_slice(mma_thread);
    auto thr_dq = tiled_mma_dq.get_thread_slice(mma_thread);
    auto thr_dk = tiled_mma_dk.get_thread_slice(mma_thread);
    Tensor tSrQ = thr_s.partition_fragment_A(sQ);
    Tensor tSrK = thr_s.partition_fragment_B(sK);
    Tensor tSrS = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tSrP = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tDQrKi = thr_dq.partition_fragment_B(sKit);
    Tensor tDQrDQ = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kIdxDim>>{});
    Tensor tDKrPt = thr_dk.partition_fragment_A(sPt);
    Tensor tDKrQi = thr_dk.partition_fragment_B(sQit);
    Tensor tDKrDK = partition_fragment_C(tiled_mma_dk, Shape<Int<kBlockN>, Int<kIdxDim>>{});
    // dS as the A operand of dQ_idx = dS k_idx (the accumulator's register order, as P in O = P V).
    Tensor tDQrdS = make_tensor<Element>(common::AccumulatorAsOperandA<kBlockN>{});
    static_assert(decltype(size(tIrS))::value == decltype(size(tDQrdS))::value &&
                  decltype(size(tSrS))::value == decltype(size(tIrS))::value);
    const uint32_t q_smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.q.data()));
    const uint32_t own_staging_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.staging.data()));
    const int dk_key_base = (Traits::kSplitKeys ? mma_wg * 64 : 0) + row_base;
    const int dk_col_base = (Traits::kSplitKeys ? 0 : mma_wg * (kIdxDim / 2)) + 2 * quad;
    constexpr int kDkCols = Traits::kSplitKeys ? kIdxDim : kIdxDim / 2;
    const float inv_group = 1.f / static_cast<float>(G);
    auto q_state = typename QPipeline::PipelineState{};
    float loss_acc = 0.f;  // sum of P (log2 P - log2 Q) over this thread's elements

    for (;;) {
      // Teacher: P summed over the group's heads, one query stage per head.
      int4 item;
      int last_key[2];
      bool full_block = false;  // every row of this warp sees the whole block: no per-element mask
      bool finished = false;
      typename QPipeline::PipelineState last_q_state;  // the last head's stage: held for dS staging
      for (int h = 0; h < G; ++h) {
        q_pipeline.consumer_wait(q_state);
        const int stage = q_state.index();
        cutlass::arch::fence_view_async_shared();
        if (h == 0) {
          item = smem.q_item[stage];
          if (item.x < 0) {
            finished = true;
            break;
          }
          switch_block(item.x);
          last_keys(smem.q_row_token[stage], fwd::TileCoord(item.x, params.num_blocks_max_div, params.num_heads_kv_div),
                    last_key);
          full_block = __all_sync(0xffffffff, min(last_key[0], last_key[1]) >= kBlockN - 1);
        }
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_s, tSrQ(_, _, _, stage), tSrK, tSrS);
        float row_lse[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) row_lse[i] = smem.q_row_lse[stage][mma_wg * 64 + row_base + 8 * i];
        if (h + 1 < G) {
          q_pipeline.consumer_release(q_state);
        } else {
          last_q_state = q_state;
        }
        ++q_state;
        // Most tiles are full blocks: a selected block wholly in the past of its tokens.
        accumulate_teacher_head(tSrS, tSrP, h, full_block, last_key, row_lse, params.scale_log2, quad);
      }
      if (finished) break;
      const fwd::TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
      const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                params.seqlen_k);

      // Student, loss terms, dS.
      tile_pipeline.consumer_wait(tile_state);
      const int tstage = tile_state.index();
      cutlass::arch::fence_view_async_shared();
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_idx, tIrQi(_, _, _, tstage), tIrKi, tIrS);
      int row_token[2];
      float row_logz[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        row_token[i] = smem.t_row_token[tstage][mma_wg * 64 + row_base + 8 * i];
        row_logz[i] = smem.t_row_logz[tstage][mma_wg * 64 + row_base + 8 * i];
      }
      student_terms(tIrS, tSrP, tDQrdS, full_block, last_key, row_logz, inv_group, params.index_scale_log2, quad,
                    loss_acc);

      // dK_idx = dS^T q_idx through the staging tile.
      const int staging_stage = Traits::kStageInQ ? last_q_state.index() : 0;
      const uint32_t staging_base =
          Traits::kStageInQ ? q_smem_base + staging_stage * Traits::kQStageBytes : own_staging_base;
      fwd::stage_fragment_rows<kBlockN>(tDQrdS, staging_base, mma_wg, warp_in_wg, lane);
      cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> WGMMA reads
      cutlass::arch::NamedBarrier::sync(kMmaThreads, static_cast<int>(KlBarrier::StagingWritten));
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dk, tDKrPt(_, _, _, staging_stage),
                                                 tDKrQi(_, _, _, tstage), tDKrDK);
      // Both warpgroups have read the staging tile and the index queries: the tile stage and the
      // last head's query stage are free.
      cutlass::arch::NamedBarrier::sync(kMmaThreads, static_cast<int>(KlBarrier::StagingRead));
      tile_pipeline.consumer_release(tile_state);
      ++tile_state;
      q_pipeline.consumer_release(last_q_state);
      const int block_start = tc.block * kBlockN;
      atomic_add_rows<kDkCols>(
          tDKrDK, params.grad_scale, [&](int i) { return block_start + dk_key_base + 8 * i < seq.seqlen_k; },
          [&](int i) {
            return params.dk_idx_accum + (seq.k_token_start + block_start + dk_key_base + 8 * i) * kIdxDim + dk_col_base;
          });

      // dQ_idx = dS k_idx from registers.
      warpgroup_fence_operand(tDQrdS);
      common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dq, tDQrdS, tDQrKi, tDQrDQ);
      atomic_add_rows<kIdxDim>(
          tDQrDQ, params.grad_scale, [&](int i) { return row_token[i] >= 0; },
          [&](int i) {
            return params.dq_idx_accum + (int64_t{row_token[i]} * params.num_heads_kv + tc.group) * kIdxDim + 2 * quad;
          });
    }
    add_warp_loss(loss_acc, params.loss_sum, lane);
  }
  if (current_list >= 0) kv_pipeline.consumer_release(kv_state);
#endif
}

}  // namespace msa::kl
