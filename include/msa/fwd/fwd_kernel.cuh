// KV-outer block-sparse attention forward (MSA_SPEC s.5, s.10).
//
// Math: a work tile is (sequence b, group g, key block kb, up to 128/G query tokens that selected
// kb for g). Its 128 rows are those tokens x the G query heads of g (the heads of a token are
// contiguous in q, so a row gather is 16-byte vector copies). For each row:
//   S = scale * q K_kb^T (keys j > p(i) masked), P = exp(S - max), O_part = P V_kb (bf16:
//   unnormalized; fp16: / sum(P)), with (max, lse_part = max + log(sum(P))) kept next to it,
// written per (query, slot, head); combine_kernel merges the slots of a query by lse. The partials
// are slot-major ([token, slot, Hq, D]) so that a tile's rows of one token (the G heads of its
// group) land in one contiguous G x D run: scattered 256-byte rows ([token, Hq, slot, D]) cost the
// DRAM more time (main kernel at 128K: 30.0 -> 23.7 ms on an H100, 23.5 -> 22.0 ms on an H200;
// bench/RESULTS.md).
//
// Grid: persistent, one CTA per SM; CTAs take runs of consecutive tiles of the work list
// fwd_plan_kernel.cuh produced (sorted by list, i.e. by key block) from a global counter
// (fwd_scheduler.cuh), so K/V of a block is loaded once per run of tiles and the SMs stay balanced.
// Warp roles: warpgroup 0 = producer. Thread 0 TMA-loads K and V into the K/V ring whenever the
// block changes. Each tile's query rows go into the query ring by TMA (8-head boxes, G >= 8) or by
// a cp.async gather over all 128 threads (G < 8); the 128 threads also copy the row metadata and
// each signals the stage's full barrier when its copies land (cp.async.mbarrier.arrive.noinc; the
// TMA bytes are expected on the same barrier). Warpgroups 1-2 = consumers, 64 rows of every tile each:
// WGMMA S = Q K^T (SS), the softmax in registers, WGMMA O = P V (P from registers, V^T read
// MN-major from the TMA tile), then the partial output and the lse straight from registers. Each
// consumer pipelines its own tiles: the next tile's S = Q K^T runs during this tile's stores.
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
#include "msa/fwd/fwd_phase_clock.h"
#include "msa/fwd/fwd_scheduler.cuh"
#include "msa/fwd/fwd_traits.cuh"

namespace msa::fwd {

using namespace cute;

template <class Traits>
struct FwdKernelParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  cute::TmaDescriptor tma_q;  // q as [total_q * Hq, D], 8 x 64 SW128 boxes (used when G >= 8)
  int32_t total_k;
  const Element* q;          // [total_q, Hq, D]
  const int32_t* entries;    // pack_entry(token - token_begin, slot) per list entry
  const int4* work;          // (list, first entry, entries, 0) per tile
  const int32_t* num_work;   // [1]
  int32_t* work_counter;     // [1], zeroed by the plan: the dynamic scheduler's next free tile
  Element* part_o;           // [chunk tokens, topk, Hq, D], unnormalized partial outputs P V
  float2* part_stats;        // [chunk tokens, topk, Hq]: (row max, lse) of each partial, log2 units
  int64_t token_begin;       // first flat query token of the chunk
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int num_heads, num_heads_kv, group_size, topk;
  cutlass::FastDivmod num_blocks_max_div, num_heads_kv_div;
  float scale_log2;  // softmax_scale * log2(e)
  int group_shift;  // log2(G): G is a power of two, so row / G and row % G are a shift and a mask
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    fwd_kernel(CUTE_GRID_CONSTANT FwdKernelParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using QPipeline = typename Traits::QPipeline;
  using KVPipeline = typename Traits::KVPipeline;
  using QState = typename QPipeline::PipelineState;
  using KVState = typename KVPipeline::PipelineState;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreadsPerWG = common::kThreadsPerWarpGroup;
  constexpr int kRowsPerWG = Traits::kRowsPerWarpGroup;
  constexpr uint32_t kQStageBytes = Traits::kQStageBytes;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;
  const int G = params.group_size;
  const int g_shift = params.group_shift;

  // Query ring: 128 cp.async arrivals (one per producer thread) fill a stage; every consumer
  // thread releases it once its S = Q K^T is done.
  QPipeline q_pipeline =
      make_query_ring<QPipeline>(smem.q_pipeline, warp_group, kThreadsPerWG, Traits::kNumMmaThreads);
  KVPipeline kv_pipeline =
      make_kv_ring<KVPipeline>(smem.kv_pipeline, warp_group, Traits::kTmaBytesKV, Traits::kNumMmaThreads);
  if (threadIdx.x == 0) {
    if (G >= 8) cute::prefetch_tma_descriptor(&params.tma_q);
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
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
    static_assert(kBlockM / kRowStep == kChunksPerRow && 32 % kChunksPerRow == 0);
    const int chunk_col = (tid % kChunksPerRow) * 8;
    // Thread tid copies chunk tid % C of rows tid / C + k * kRowStep, k < C (C = kChunksPerRow).
    // The row -> token lookups of a warp are 32 distinct rows: lane L loads the token of the row
    // (L / C, k = L % C) stands for, one load per lane per tile issued a tile ahead, and each
    // thread takes its tokens with shuffles, so no global load sits between acquire and cp.async.
    const int loader_row = (tid / 32) * (32 / kChunksPerRow) + lane / kChunksPerRow + (lane % kChunksPerRow) * kRowStep;
    const int shuffle_base = lane & ~(kChunksPerRow - 1);
    // Shared-memory byte address of this thread's first chunk in stage 0. In the SW128 K-major
    // tile a row is 128 bytes inside its 64-column half and the XOR pattern repeats every 8 rows;
    // kRowStep is a multiple of 8, so the thread's k-th chunk sits k * kRowStep * 128 bytes later.
    static_assert(kRowStep % 8 == 0);
    const Element* q_chunk = params.q + chunk_col;
    const uint32_t q_smem_thread =
        static_cast<uint32_t>(__cvta_generic_to_shared(&sQ(tid / kChunksPerRow, chunk_col, 0)));

    // G >= 8: each token's G heads are G whole 8-row SW128 boxes, so the queries arrive by TMA
    // (lane L of warp 0 copies box L: token L / (G/8 * D/64), rows 8 ((L / (D/64)) % (G/8)),
    // half L % (D/64)); the 128 threads only copy the row metadata. G < 8: cp.async gather.
    constexpr int kHalves = kHeadDim / 64;
    const bool use_tma = G >= 8;
    const int boxes_per_token = (G / 8) * kHalves;
    const int tma_token = use_tma ? lane / boxes_per_token : 0;
    const int tma_rows = use_tma ? 8 * ((lane / kHalves) % (G / 8)) : 0;
    const int tma_half = lane % kHalves;
    // The entry (pack_entry) this lane needs for a tile, -1 if none: loaded a tile ahead and only
    // decoded when the tile is produced, so no load result is waited for in the loop.
    auto entry_index = [&](const int4& tile) -> int {
      const int e = use_tma ? tma_token : (loader_row >> g_shift);
      return e < tile.z ? tile.y + e : -1;
    };
    auto load_entry = [&](const int4& tile) -> int32_t {
      const int idx = entry_index(tile);
      return idx >= 0 ? params.entries[idx] : -1;
    };

    QState q_state = cutlass::make_producer_start_state<QPipeline>();
    KVState kv_state = cutlass::make_producer_start_state<KVPipeline>();
    int loaded_list = -1;
    DynamicTileScheduler scheduler(params.work_counter, num_work, &smem.grab_slot,
                                   static_cast<int>(FwdBarrier::ProducerGrab));
    // params.work[num_work] is the plan's sentinel (list -1, no entries): producing it tells the
    // consumers to stop.
    int4 item = params.work[scheduler.tile()];
    int4 next_item = params.work[scheduler.peek_next()];
    int32_t entry = load_entry(item);
    PhaseClock<kProducerPhases> phase_clock;
    phase_clock.start();
    for (;;) {
      const int w = scheduler.tile();
      const bool last = scheduler.done();
      // In flight while this tile is produced: the work item after next and the next tile's
      // entries (its work item arrived during the previous tile).
      int4 after_next_item = next_item;
      int after_next = -1;
      int32_t next_entry = -1;
      if (!last) {
        after_next = scheduler.peek_after_next();
        if (after_next >= 0) after_next_item = params.work[after_next];
        next_entry = load_entry(next_item);
      }
      const TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
      phase_clock.mark(kPrefetch);
      if (!last && item.x != loaded_list) {
        // A new key block: K and V into the next K/V stage (thread 0 only; the other threads go on
        // gathering queries, the consumers wait on both rings).
        if (tid == 0) {
          kv_pipeline.producer_acquire(kv_state);
          const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                    params.seqlen_k);
          const int key_row = static_cast<int>(seq.k_token_start) + tc.block * kBlockN;
          load_kv_block<Traits>(params.tma_k, params.tma_v, mK, mV, sK, sV, kv_pipeline.producer_get_barrier(kv_state),
                                kv_state.index(), key_row, tc.group);
        }
        ++kv_state;
        loaded_list = item.x;
      }
      phase_clock.mark(kKVLoad);
      // Row of q ([total_q * Hq, D]; < 2^31, checked on the host) of this lane's entry.
      const int q_row = entry >= 0 ? (static_cast<int>(params.token_begin) + entry_token(entry)) * params.num_heads +
                                         tc.group * G + (use_tma ? tma_rows : (loader_row & (G - 1)))
                                   : -1;
      phase_clock.mark_after(kEntryWait, q_row);
      q_pipeline.producer_acquire(q_state);
      phase_clock.mark(kQueryAcquire);
      const int stage = q_state.index();
      auto* full_barrier = q_pipeline.producer_get_barrier(q_state);
      if (tid == 0) {
        cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(&smem.tile[stage])), params.work + w);
      }
      // Row metadata: thread tid owns row tid.
      if ((tid >> g_shift) < item.z) {
        cp_async_4(&smem.rows[stage][tid], params.entries + item.y + (tid >> g_shift));
      }
      __syncwarp();  // thread 0 may have branched off for the K/V load; the shuffles need the warp
      if (use_tma) {
        if (tid < 32) {
          if (lane == 0 && item.z > 0) {
            cutlass::arch::ClusterTransactionBarrier::expect_transaction(full_barrier,
                                                                         item.z * G * kHeadDim * sizeof(Element));
          }
          __syncwarp();
          if (q_row >= 0) {
            char* dst = reinterpret_cast<char*>(smem.q.data()) + stage * kQStageBytes + tma_half * (kBlockM * 128) +
                        (tma_token * G + tma_rows) * 128;
            SM90_TMA_LOAD_2D::copy(&params.tma_q, full_barrier, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                                   dst, tma_half * 64, q_row);
          }
        }
      } else {
        // Query rows: the G heads of a token are contiguous in q.
        const uint32_t q_smem = q_smem_thread + stage * kQStageBytes;
#pragma unroll
        for (int k = 0; k < kChunksPerRow; ++k) {
          const int src_row = __shfl_sync(0xffffffff, q_row, shuffle_base + k);
          if (src_row >= 0) cp_async_16(q_smem + k * kRowStep * 128, q_chunk + int64_t{src_row} * kHeadDim);
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(full_barrier);
      ++q_state;
      phase_clock.mark(kQueryCopies);
      if (last) break;
      phase_clock.tile();
      item = next_item;
      entry = next_entry;
      scheduler.advance();
      next_item = after_next >= 0 ? after_next_item : params.work[scheduler.peek_next()];
      phase_clock.mark(kAdvance);
    }
    phase_clock.save(0, tid == 0);
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  const int mma_wg = warp_group - 1;             // 0 or 1: rows [64 mma_wg, 64 mma_wg + 64) of each tile
  const int wg_thread = mma_thread % kThreadsPerWG;
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});
  typename Traits::TiledMmaQK tiled_mma_qk;
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(mma_thread);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(mma_thread);
  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K, q stages)
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K, kv stages)
  Tensor tOrVt = thr_mma_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, kv stages)
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // P as the A operand of O = P V: the fp32 accumulator of S, in its own register order, is the
  // A fragment of the k-slices (value 8s + v of S is value v of k-slice s), so only the type
  // changes.
  Tensor tOrP = make_tensor<Element>(common::AccumulatorAsOperandA<kBlockN>{});
  static_assert(decltype(size(tSrS))::value == kBlockN / 2 && decltype(size(tOrP))::value == kBlockN / 2);
  static_assert(decltype(size(tOrO))::value == kHeadDim / 2);

  // Each consumer warpgroup is its own software pipeline over the tiles (both take every tile,
  // 64 rows each): while the tensor cores run S = Q K^T of the next tile, the warpgroup stores the
  // current tile's partial output, and its softmax overlaps the other warpgroup's GEMMs.
  //   wait S(t) -> softmax(t) -> issue P V(t) -> [load tile t+1] issue Q K^T(t+1)
  //   -> wait P V(t) (Q K^T(t+1) still running) -> epilogue(t) -> wait S(t+1) -> ...

  QState q_state;
  QState loaded_q_state;
  KVState kv_state;
  int current_list = -1;
  bool release_kv = false;  // the previous block's K/V stage is freed once its last P V is done
  KVState old_kv_state;
  const int quad = lane % 4;
  const int warp_in_wg = wg_thread / 32;
  // This thread's accumulator rows are row_base and row_base + 8 of the warpgroup's 64 rows.
  const int row_base = warp_in_wg * 16 + lane / 4;

  // The tile being computed: its K/V stage, and per accumulator row where its partial goes
  // (-1: padding row) and the last visible key column of the block.
  int kv_stage = 0, part[2], last_col[2];

  // Waits for the next tile's queries (and K/V when its block changes) and reads its metadata;
  // false at the sentinel.
  int q_stage = 0;
  auto load_tile = [&]() -> bool {
    q_pipeline.consumer_wait(q_state);
    q_stage = q_state.index();
    loaded_q_state = q_state;
    ++q_state;
    const int stage = q_stage;
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
    const int4 item = smem.tile[stage];
    if (item.x < 0) return false;
    const TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
    const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                              params.seqlen_k);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = mma_wg * kRowsPerWG + row_base + 8 * i;
      if ((row >> g_shift) < item.z) {
        const int32_t entry = smem.rows[stage][row];
        const int local_token = entry_token(entry);
        const int head = tc.group * G + (row & (G - 1));
        part[i] = (local_token * params.topk + entry_slot(entry)) * params.num_heads + head;
        last_col[i] = seq.query_position(static_cast<int>(params.token_begin + local_token - seq.q_token_start)) -
                      tc.block * kBlockN;
      } else {
        part[i] = -1;
        last_col[i] = -1;
      }
    }
    if (item.x != current_list) {
      if (current_list >= 0) {  // the previous block's last P V may still run: release it later
        old_kv_state = kv_state;
        release_kv = true;
        ++kv_state;
      }
      kv_pipeline.consumer_wait(kv_state);
      current_list = item.x;
    }
    kv_stage = kv_state.index();
    return true;
  };
  // S = Q K^T of the loaded tile. Issued on every path, also after the sentinel (a discarded
  // product of stale shared memory): a WGMMA issued under a branch makes ptxas serialize them all.
  auto issue_qk = [&]() {
    common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_qk, tSrQ(_, _, _, q_stage),
                                                                 tSrK(_, _, _, kv_stage), tSrS);
  };

  bool have_tile = load_tile();
  issue_qk();
  PhaseClock<kConsumerPhases> phase_clock;
  phase_clock.start();
  while (have_tile) {
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    phase_clock.mark(kWaitS);
    // The epilogue stores from registers, so the query stage is free once S = Q K^T has read it:
    // the producer refills it about two tiles before it is needed.
    q_pipeline.consumer_release(loaded_q_state);
    const int pv_kv_stage = kv_stage;
    const int tile_part[2] = {part[0], part[1]};

    // Softmax of each row within the block (masked keys -> -inf, fully masked rows -> P = 0). Only
    // a query's own block (and blocks past it) needs the causal mask.
    mask_block_columns<kBlockN>(tSrS, last_col, quad);
    float row_max[2], row_sum[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float m = block_row_max<kBlockN>(tSrS, i);
      row_max[i] = m == -CUDART_INF_F ? 0.f : m * params.scale_log2;
      row_sum[i] = exp2_row_sum<kBlockN>(tSrS, i, params.scale_log2, row_max[i]);
    }
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) {
      tOrP(v) = static_cast<Element>(tSrS(v));
    }
    phase_clock.mark(kSoftmax);

    // O = P V, then (overlapping it) the next tile's S = Q K^T.
    warpgroup_fence_operand(tOrP);
    common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_pv, tOrP, tOrVt(_, _, _, pv_kv_stage), tOrO);
    phase_clock.mark(kIssuePV);
    have_tile = load_tile();
    phase_clock.mark(kLoadTile);
    issue_qk();
    phase_clock.mark(kIssueQK);
    warpgroup_wait<1>();  // P V done; Q K^T of the next tile may still run
    warpgroup_fence_operand(tOrO);
    if (release_kv) {
      kv_pipeline.consumer_release(old_kv_state);
      release_kv = false;
    }
    phase_clock.mark(kWaitPV);

    // Epilogue: partial rows straight from registers to global memory in 16-byte stores (a quad
    // transpose, store_output_rows_direct); each row's (max, lse) in log2 units. The combine weighs
    // slot s by 2^(max_s - LSE), which normalizes P V, so bf16 partials skip the division. fp16
    // partials are normalized here (P V can exceed fp16's range) and record max = lse, which makes
    // the same weight exact.
    constexpr bool kNormalize = cute::is_same_v<Element, cutlass::half_t>;
    float out_scale[2];
    Element* row_dst[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float lse2 = row_sum[i] > 0.f ? row_max[i] + __log2f(row_sum[i]) : -CUDART_INF_F;
      out_scale[i] = kNormalize ? (row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f) : 1.f;
      if (quad == 0 && tile_part[i] >= 0) {
        params.part_stats[tile_part[i]] = make_float2(kNormalize ? lse2 : row_max[i], lse2);
      }
      row_dst[i] = tile_part[i] >= 0 ? params.part_o + static_cast<int64_t>(tile_part[i]) * kHeadDim : nullptr;
    }
    store_output_rows_direct<Element, kHeadDim>(tOrO, out_scale, row_dst, quad);
    phase_clock.mark(kEpilogue);
    phase_clock.tile();
  }
  phase_clock.save(1 + mma_wg, wg_thread == 0);
  warpgroup_wait<0>();  // the discarded product issued after the sentinel
#endif
}

}  // namespace msa::fwd
