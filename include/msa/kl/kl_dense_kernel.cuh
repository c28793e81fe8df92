// Dense warm-up indexer distillation loss (MSA_SPEC s.7 with the support = the whole causal
// history): flash-style, query-outer, never storing an Sq x Sk matrix.
//
// The math is the selected-support kernel's (kl_kernel.cuh), per (token t, group g) and key j <= p(t):
//   teacher  P_j = mean over the G heads h of 2^(softmax_scale log2(e) q_h.k_j - lse2_h)
//   student  log2 Q_j = s2_j - Z_t, s2 = index_scale log2(e) q_idx.k_idx, Z_t = log2 sum_j 2^s2_j
//   loss    += ln 2 sum_j P_j (log2 P_j - log2 Q_j);  dS_j = Q_j - P_j
//   dq_idx_t += c sum_j dS_j k_idx_j;  dk_idx_j += c sum_t dS_j q_idx_t,  c = index_scale / pairs.
//
// Work item: 128 consecutive query tokens (one student row each, 64 per consumer warpgroup) of
// one group and a chunk of up to `chunk_blocks` of the key blocks they see. Items are grabbed from
// a global counter, longest query tiles first; the chunks of one tile run side by side on
// different SMs, so the tile's G query heads (re-read for every key block) come from L2.
// Pass 1 (kStatsPass) writes the student's (max, exp-sum) per (token, group, chunk); a small
// kernel merges them into Z_t; pass 2 per key block:
//   for each head h: S = Q_h K^T (SS) -> P summed in registers          (teacher)
//   s = q_idx k_idx^T (SS) -> loss terms, dS                            (student)
//   dS -> staging -> dK_idx = dS^T q_idx (SS) -> fp32 atomics per block
//   dQ_idx += dS k_idx (RS), kept in registers over the chunk -> fp32 atomics per item.
// Warp roles: thread 0 of warpgroup 0 grabs items and issues every TMA load; warpgroups 1-2
// consume.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/kl/kl_collective.cuh"
#include "msa/kl/kl_dense_traits.cuh"

namespace msa::kl {

using namespace cute;

template <class Traits>
struct KlDenseKernelParams {
  typename Traits::TmaQ tma_q;
  typename Traits::TmaQi tma_qi;
  typename Traits::TmaK tma_k;
  typename Traits::TmaKi tma_ki;
  int32_t total_q, total_k;
  const float* lse_log2;  // [total_q, Hq]: the teacher's lse in log2 units (pass 2)
  float2* stats;          // [total_q, Hkv, num_chunks]: (max s2, sum 2^(s2 - max)); zeroed (pass 1)
  const float* logz;      // [total_q, Hkv]: the student's log2-normaliser (pass 2)
  float* dq_idx_accum;    // [total_q, Hkv, Di], zeroed
  float* dk_idx_accum;    // [total_k, Di], zeroed
  double* loss_sum;       // [1], zeroed: sum over pairs of KL (natural log)
  int32_t* work_counter;  // [1], zeroed before the pass
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int seqlen_q, seqlen_k;  // padded batches
  int batch, num_heads, num_heads_kv, group_size;
  int num_row_tiles;  // ceil(max_seqlen_q / 128)
  int num_chunks;     // key chunks per row tile (of the longest sequence)
  int chunk_blocks;   // key blocks per chunk
  float scale_log2;        // softmax_scale * log2(e)
  float index_scale_log2;  // index_scale * log2(e)
  float grad_scale;        // index_scale / pairs
};

// The key blocks a work item's chunk covers.
struct DenseItemRange {
  int first_block = 0, end_block = 0;  // the chunk's key blocks [first, end)
};

// Key blocks of row tile m seen by its last row, and the chunk's share of them (empty when the
// tile or the chunk lies past the sequence).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ DenseItemRange dense_item_range(const common::SeqInfo& seq, int m, int chunk,
                                                          int chunk_blocks) {
  DenseItemRange r;
  const int first_row = m * kBlockM;
  if (first_row >= seq.seqlen_q) return r;
  const int last_row = min(first_row + kBlockM, seq.seqlen_q) - 1;
  const int num_blocks = seq.query_position(last_row) / kBlockN + 1;
  r.first_block = chunk * chunk_blocks;
  r.end_block = min(r.first_block + chunk_blocks, num_blocks);
  return r;
}

// One kRows x kCols tile of a (row, col, head) tensor into stage `stage` of sX by TMA.
template <int kRows, int kCols, class Tma, class TensorS>
__device__ __forceinline__ void tma_load_rows(Tma const& tma, TensorS& sX, uint64_t* barrier, int stage,
                                              int32_t total_rows, int num_heads, int row, int head) {
  Tensor mX = tma.get_tma_tensor(make_shape(total_rows, Int<kCols>{}, num_heads));
  Tensor gX = local_tile(domain_offset(make_coord(row, _0{}), mX(_, _, head)), Shape<Int<kRows>, Int<kCols>>{},
                         make_coord(_0{}, _0{}));
  auto [tXgX, tXsX] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sX), group_modes<0, 2>(gX));
  copy(tma.with(*barrier, 0), tXgX, tXsX(_, stage));
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    kl_dense_kernel(CUTE_GRID_CONSTANT KlDenseKernelParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using Item = typename Traits::Item;
  using QiPipeline = typename Traits::QiPipeline;
  using KiPipeline = typename Traits::KiPipeline;
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

  QiPipeline qi_pipeline = fwd::make_kv_ring<QiPipeline>(smem.qi_pipeline, warp_group, Traits::kQiBytes, kMmaThreads);
  KiPipeline ki_pipeline = fwd::make_kv_ring<KiPipeline>(smem.ki_pipeline, warp_group, Traits::kKiBytes, kMmaThreads);
  // The teacher's rings (pass 2 only; ints stand in for them in pass 1).
  auto q_pipeline = [&]() {
    if constexpr (kStats) {
      return 0;
    } else {
      return fwd::make_kv_ring<typename Traits::QPipeline>(smem.q_pipeline, warp_group, Traits::kQBytes, kMmaThreads);
    }
  }();
  auto k_pipeline = [&]() {
    if constexpr (kStats) {
      return 0;
    } else {
      return fwd::make_kv_ring<typename Traits::KPipeline>(smem.k_pipeline, warp_group, Traits::kKBytes, kMmaThreads);
    }
  }();
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_qi.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_ki.get_tma_descriptor());
    if constexpr (!kStats) {
      cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    }
  }
  __syncthreads();

  Tensor sQi = make_tensor(make_smem_ptr(smem.qi.data()), typename Traits::SmemLayoutQi{});
  Tensor sKi = make_tensor(make_smem_ptr(smem.ki.data()), typename Traits::SmemLayoutKi{});
  const int total_items = params.num_row_tiles * params.batch * params.num_heads_kv * params.num_chunks;

  if (warp_group == 0) {
    // ---------------- producer: one thread ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x != 0) return;
    auto qi_state = cutlass::make_producer_start_state<QiPipeline>();
    auto ki_state = cutlass::make_producer_start_state<KiPipeline>();
    auto q_state = [&]() {
      if constexpr (kStats) {
        return 0;
      } else {
        return cutlass::make_producer_start_state<typename Traits::QPipeline>();
      }
    }();
    auto k_state = [&]() {
      if constexpr (kStats) {
        return 0;
      } else {
        return cutlass::make_producer_start_state<typename Traits::KPipeline>();
      }
    }();
    Tensor mKi = params.tma_ki.get_tma_tensor(make_shape(params.total_k, Int<kIdxDim>{}));
    int pending = atomicAdd(params.work_counter, 1);  // one grab always in flight
    for (int n = 0;; ++n) {
      // The next item with work: index -> (row tile, longest first; batch; group; chunk).
      Item item{-1, 0, 0, 0};
      DenseItemRange range;
      common::SeqInfo seq(0, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q, params.seqlen_k);
      while (pending < total_items) {
        const int idx = pending;
        pending = atomicAdd(params.work_counter, 1);
        const int chunk = idx % params.num_chunks;
        int rest = idx / params.num_chunks;
        const int group = rest % params.num_heads_kv;
        rest /= params.num_heads_kv;
        const int batch = rest % params.batch;
        const int m = params.num_row_tiles - 1 - rest / params.batch;
        seq = common::SeqInfo(batch, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q, params.seqlen_k);
        range = dense_item_range<kBlockM, kBlockN>(seq, m, chunk, params.chunk_blocks);
        if (range.first_block < range.end_block) {
          item = Item{m, batch, group, chunk};
          break;
        }
      }
      // Written before the acquire, whose arrive publishes it with the stage: the slot was last
      // read for item n - kItemSlots, released before the acquire of item n - 1 returned.
      smem.item[n % Traits::kItemSlots] = item;
      const bool last = item.m < 0;
      qi_pipeline.producer_acquire(qi_state);
      // The sentinel loads a harmless tile so that its stage completes like any other.
      tma_load_rows<kBlockM, kIdxDim>(params.tma_qi, sQi, qi_pipeline.producer_get_barrier(qi_state),
                                      qi_state.index(), params.total_q, params.num_heads_kv,
                                      last ? 0 : static_cast<int>(seq.q_token_start) + item.m * kBlockM,
                                      last ? 0 : item.group);
      ++qi_state;
      if (last) break;
      for (int block = range.first_block; block < range.end_block; ++block) {
        const int key_row = static_cast<int>(seq.k_token_start) + block * kBlockN;
        auto load_ki = [&] {
          ki_pipeline.producer_acquire(ki_state);
          Tensor gKi = local_tile(domain_offset(make_coord(key_row, _0{}), mKi), Shape<Int<kBlockN>, Int<kIdxDim>>{},
                                  make_coord(_0{}, _0{}));
          auto [tKigKi, tKisKi] = tma_partition(params.tma_ki, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sKi),
                                                group_modes<0, 2>(gKi));
          copy(params.tma_ki.with(*ki_pipeline.producer_get_barrier(ki_state), 0), tKigKi,
               tKisKi(_, ki_state.index()));
          ++ki_state;
        };
        if constexpr (kStats) {
          load_ki();
        } else {
          Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
          Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKStage1{});
          k_pipeline.producer_acquire(k_state);
          tma_load_rows<kBlockN, kHeadDim>(params.tma_k, sK, k_pipeline.producer_get_barrier(k_state), 0,
                                           params.total_k, params.num_heads_kv, key_row, item.group);
          ++k_state;
          load_ki();  // two stages: the student of the previous block still reads the other one
          const int q_row = static_cast<int>(seq.q_token_start) + item.m * kBlockM;
          for (int h = 0; h < G; ++h) {
            q_pipeline.producer_acquire(q_state);
            tma_load_rows<kBlockM, kHeadDim>(params.tma_q, sQ, q_pipeline.producer_get_barrier(q_state),
                                             q_state.index(), params.total_q, params.num_heads, q_row,
                                             item.group * G + h);
            ++q_state;
          }
        }
      }
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
  Tensor tSrS = partition_fragment_C(tiled_mma_idx, Shape<Int<kBlockM>, Int<kBlockN>>{});

  auto qi_state = typename QiPipeline::PipelineState{};
  auto ki_state = typename KiPipeline::PipelineState{};

  // This thread's two rows of a work item: flat token, position (-1: past the sequence).
  struct Rows {
    int32_t token[2];  // total_q < 2^31 (checked on the host); products are widened at use
    int pos[2];
  };
  auto item_rows = [&](const Item& item, const common::SeqInfo& seq) {
    Rows r;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = item.m * kBlockM + mma_wg * 64 + row_base + 8 * i;
      const bool valid = row < seq.seqlen_q;
      r.token[i] = static_cast<int32_t>(seq.q_token_start) + row;
      r.pos[i] = valid ? seq.query_position(row) : -1;
    }
    return r;
  };
  // Last visible key of `block` (relative) per row; negative: none.
  auto last_keys = [&](const Rows& r, int block, int (&last_key)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) last_key[i] = r.pos[i] >= 0 ? r.pos[i] - block * kBlockN : -1;
  };
  auto wait_item = [&](int n, Item& item, common::SeqInfo& seq, DenseItemRange& range) {
    qi_pipeline.consumer_wait(qi_state);
    item = smem.item[n % Traits::kItemSlots];
    if (item.m < 0) return false;
    seq = common::SeqInfo(item.batch, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q, params.seqlen_k);
    range = dense_item_range<kBlockM, kBlockN>(seq, item.m, item.chunk, params.chunk_blocks);
    return true;
  };

  if constexpr (kStats) {
    for (int n = 0;; ++n) {
      Item item;
      common::SeqInfo seq(0, nullptr, nullptr, 0, 0);
      DenseItemRange range;
      if (!wait_item(n, item, seq, range)) break;
      const Rows rows = item_rows(item, seq);
      float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, row_sum[2] = {0.f, 0.f};
      for (int block = range.first_block; block < range.end_block; ++block) {
        ki_pipeline.consumer_wait(ki_state);
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_idx, tIrQi(_, _, _, qi_state.index()),
                                                   tIrKi(_, _, _, ki_state.index()), tSrS);
        ki_pipeline.consumer_release(ki_state);
        ++ki_state;
        int last_key[2];
        last_keys(rows, block, last_key);
        fwd::mask_block_columns<kBlockN>(tSrS, last_key, quad);
        float alpha[2];  // applied to row_sum only: there is no output to rescale
        fwd::online_softmax_rows<kBlockN>(tSrS, row_max, row_sum, params.index_scale_log2, alpha);
      }
      qi_pipeline.consumer_release(qi_state);
      ++qi_state;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (quad == 0 && rows.pos[i] >= 0 && row_sum[i] > 0.f) {
          params.stats[(int64_t{rows.token[i]} * params.num_heads_kv + item.group) * params.num_chunks + item.chunk] =
              make_float2(row_max[i], row_sum[i]);
        }
      }
    }
  } else {
    using QPipeline = typename Traits::QPipeline;
    using KPipeline = typename Traits::KPipeline;
    Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});
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
    Tensor tSrP = partition_fragment_C(tiled_mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tDQrKi = thr_dq.partition_fragment_B(sKit);
    Tensor tDQrDQ = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kIdxDim>>{});
    Tensor tDKrPt = thr_dk.partition_fragment_A(sPt);
    Tensor tDKrQi = thr_dk.partition_fragment_B(sQit);
    Tensor tDKrDK = partition_fragment_C(tiled_mma_dk, Shape<Int<kBlockN>, Int<kIdxDim>>{});
    // dS as the A operand of dQ_idx = dS k_idx (the accumulator's register order, as P in O = P V).
    Tensor tDQrdS = make_tensor<Element>(common::AccumulatorAsOperandA<kBlockN>{});
    static_assert(decltype(size(tSrS))::value == decltype(size(tDQrdS))::value &&
                  decltype(size(tSrP))::value == decltype(size(tSrS))::value);
    const uint32_t q_smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.q.data()));
    const uint32_t own_staging_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.staging.data()));
    const int dk_key_base = (Traits::kSplitKeys ? mma_wg * 64 : 0) + row_base;
    const int dk_col_base = (Traits::kSplitKeys ? 0 : mma_wg * (kIdxDim / 2)) + 2 * quad;
    constexpr int kDkCols = Traits::kSplitKeys ? kIdxDim : kIdxDim / 2;
    const float inv_group = 1.f / static_cast<float>(G);
    auto q_state = typename QPipeline::PipelineState{};
    auto k_state = typename KPipeline::PipelineState{};

    for (int n = 0;; ++n) {
      Item item;
      common::SeqInfo seq(0, nullptr, nullptr, 0, 0);
      DenseItemRange range;
      if (!wait_item(n, item, seq, range)) break;
      const Rows rows = item_rows(item, seq);
      const int qi_stage = qi_state.index();
      float loss_acc = 0.f;  // sum of P (log2 P - log2 Q) over this thread's elements of the item
      float row_logz[2];
      int32_t row_lse[2];  // offset of the row's first head of the group in lse_log2 (< total_q Hq < 2^31)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool valid = rows.pos[i] >= 0;
        row_logz[i] = valid ? params.logz[int64_t{rows.token[i]} * params.num_heads_kv + item.group] : 0.f;
        row_lse[i] = rows.token[i] * params.num_heads + item.group * G;
      }
#pragma unroll
      for (int v = 0; v < size(tDQrDQ); ++v) tDQrDQ(v) = 0.f;

      for (int block = range.first_block; block < range.end_block; ++block) {
        int last_key[2];
        last_keys(rows, block, last_key);
        // Every row of this warp sees the whole block: no per-element mask (all but the diagonal).
        const bool full_block = __all_sync(0xffffffff, min(last_key[0], last_key[1]) >= kBlockN - 1);

        // Teacher: P summed over the group's heads, one query stage per head. Each head's lse is
        // loaded one head ahead.
        k_pipeline.consumer_wait(k_state);
        float next_lse[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) next_lse[i] = rows.pos[i] >= 0 ? params.lse_log2[row_lse[i]] : CUDART_INF_F;
        typename QPipeline::PipelineState held_q_state;  // the last head's stage: held for dS staging
        for (int h = 0; h < G; ++h) {
          const float lse[2] = {next_lse[0], next_lse[1]};
          if (h + 1 < G) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              next_lse[i] = rows.pos[i] >= 0 ? params.lse_log2[row_lse[i] + h + 1] : CUDART_INF_F;
            }
          }
          q_pipeline.consumer_wait(q_state);
          common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_s, tSrQ(_, _, _, q_state.index()), tSrK, tSrS);
          if (h + 1 < G) {
            q_pipeline.consumer_release(q_state);
          } else {
            held_q_state = q_state;
            k_pipeline.consumer_release(k_state);  // the next block's K loads during the student
            ++k_state;
          }
          ++q_state;
          accumulate_teacher_head(tSrS, tSrP, h, full_block, last_key, lse, params.scale_log2, quad);
        }

        // Student, loss terms, dS.
        ki_pipeline.consumer_wait(ki_state);
        const int ki_stage = ki_state.index();
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_idx, tIrQi(_, _, _, qi_stage), tIrKi(_, _, _, ki_stage),
                                                   tSrS);
        student_terms(tSrS, tSrP, tDQrdS, full_block, last_key, row_logz, inv_group, params.index_scale_log2, quad,
                      loss_acc);

        // dK_idx = dS^T q_idx through the staging tile (the held query stage when it fits).
        const int staging_stage = Traits::kStageInQ ? held_q_state.index() : 0;
        const uint32_t staging_base =
            Traits::kStageInQ ? q_smem_base + staging_stage * Traits::kQStageBytes : own_staging_base;
        fwd::stage_fragment_rows<kBlockN>(tDQrdS, staging_base, mma_wg, warp_in_wg, lane);
        cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> WGMMA reads (and the next TMA)
        cutlass::arch::NamedBarrier::sync(kMmaThreads, static_cast<int>(KlBarrier::StagingWritten));
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dk, tDKrPt(_, _, _, staging_stage),
                                                   tDKrQi(_, _, _, qi_stage), tDKrDK);
        // Both warpgroups have read the staging tile: the held query stage is free.
        cutlass::arch::NamedBarrier::sync(kMmaThreads, static_cast<int>(KlBarrier::StagingRead));
        q_pipeline.consumer_release(held_q_state);
        const int block_start = block * kBlockN;
        atomic_add_rows<kDkCols>(
            tDKrDK, params.grad_scale, [&](int i) { return block_start + dk_key_base + 8 * i < seq.seqlen_k; },
            [&](int i) {
              return params.dk_idx_accum + (seq.k_token_start + block_start + dk_key_base + 8 * i) * kIdxDim +
                     dk_col_base;
            });

        // dQ_idx += dS k_idx from registers.
        warpgroup_fence_operand(tDQrdS);
        common::warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_dq, tDQrdS, tDQrKi(_, _, _, ki_stage), tDQrDQ);
        ki_pipeline.consumer_release(ki_state);
        ++ki_state;
      }
      qi_pipeline.consumer_release(qi_state);
      ++qi_state;
      atomic_add_rows<kIdxDim>(
          tDQrDQ, params.grad_scale, [&](int i) { return rows.pos[i] >= 0; },
          [&](int i) {
            return params.dq_idx_accum + (int64_t{rows.token[i]} * params.num_heads_kv + item.group) * kIdxDim +
                   2 * quad;
          });
      // The item's loss, per item: a float sum over a CTA's whole share of rows would drift.
      add_warp_loss(loss_acc, params.loss_sum, lane);
    }
  }
#endif
}

}  // namespace msa::kl
