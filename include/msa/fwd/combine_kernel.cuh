// Merge the per-slot partial outputs of each (query, head) by their lse (MSA_SPEC s.5):
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) * O_s,
// where the main kernel stores bf16 O_s unnormalized (P V, P = exp(S - max_s)) with (max_s, lse_s)
// in log2 units, so the weight of slot s is 2^(max_s - LSE) (exp(lse_s - lse) / sum_s P = that);
// fp16 O_s is stored normalized with max_s = lse_s, which the same weight handles.
// One warp per (query, head). The combine only streams partials (about as many bytes as the main
// kernel writes): the warp loads the row's topk partial rows (16-byte loads, D/8 lanes per row,
// 32/(D/8) rows per warp-wide load) and stats at once, then lane s learns from block_indices
// whether slot s is valid; only valid slots are weighted.
// A (query, head) with no visible key gets out = 0 and lse = -inf.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include <cutlass/array.h>

#include "msa/common/lse.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

template <class Element>
struct CombineParams {
  const Element* part_o;        // [chunk tokens, topk, Hq, D]
  const float2* part_stats;     // [chunk tokens, topk, Hq]: (max, lse) per partial, log2 units
  const int32_t* block_indices; // [total_q, Hkv, topk]
  Element* out;                 // [total_q, Hq, D]
  float* lse;                   // padded [B, Hq, Sq] or varlen [Hq, total_q]
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int64_t total_q;
  int64_t token_begin, token_end;
  int num_heads, num_heads_kv, topk, block_size, num_blocks_max;
};

// 16-byte streaming load (read-only path, no L1 allocation: each partial is read once) when
// `pred`, zeros otherwise.
__device__ __forceinline__ uint4 load_streaming_16(const void* ptr, bool pred) {
  uint4 r = make_uint4(0, 0, 0, 0);
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return r;
}

// How a warp holds one (query, head) row's partial rows: lane l has 16-byte chunk l % kLanesPerRow
// of slots l / kLanesPerRow + kRowsPerLoad k, k < kLoads; kMaxSlots (16 or 32) bounds topk.
template <int kHeadDim, int kMaxSlots>
struct SlotChunks {
  static constexpr int kLanesPerRow = kHeadDim / 8;       // 16-byte chunks of a partial row
  static constexpr int kRowsPerLoad = 32 / kLanesPerRow;  // slots one warp-wide load covers
  static constexpr int kLoads = kMaxSlots / kRowsPerLoad;
  __device__ static int slot(int lane, int k) { return lane / kLanesPerRow + kRowsPerLoad * k; }
};

// One (query, head) row, by one warp: lane s (< topk) holds slot s's (max, lse) in `slot_stats`
// (log2 units) and whether it takes part (`valid`); `loaded` holds the lane's chunks of the row's
// partials (SlotChunks), those of invalid slots dropped here. Writes the merged row to `out` (D
// elements) and returns the natural-log lse (-inf when no slot saw a key; out is then 0).
template <class Element, int kHeadDim, int kMaxSlots>
__device__ __forceinline__ float merge_slots(bool valid, float2 slot_stats,
                                             const uint4 (&loaded)[SlotChunks<kHeadDim, kMaxSlots>::kLoads],
                                             Element* out, int lane) {
  using Chunks = SlotChunks<kHeadDim, 32>;  // every slot a row may have (topk <= 32)
  constexpr int kLanesPerRow = Chunks::kLanesPerRow;
  constexpr int kMaxLoads = Chunks::kLoads;
  constexpr int kLoads = SlotChunks<kHeadDim, kMaxSlots>::kLoads;
  const unsigned valid_mask = __ballot_sync(0xffffffff, valid);
  const float slot_lse = valid ? slot_stats.y : -CUDART_INF_F;
  const int chunk = lane % kLanesPerRow;
  uint4 rows[kMaxLoads];  // zero for invalid slots and slots past kMaxSlots
#pragma unroll
  for (int k = 0; k < kMaxLoads; ++k) {
    const bool keep = ((valid_mask >> Chunks::slot(lane, k)) & 1u) != 0 && k < kLoads;
    rows[k] = keep ? loaded[k < kLoads ? k : 0] : make_uint4(0, 0, 0, 0);
  }

  float m = slot_lse;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  // -inf: invalid slot or a row with no visible key in the block.
  float total = slot_lse == -CUDART_INF_F ? 0.f : exp2f(slot_lse - m);
  const float weight = slot_lse == -CUDART_INF_F ? 0.f : exp2f(slot_stats.x - m);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);

  float acc[8] = {};
#pragma unroll
  for (int k = 0; k < kMaxLoads; ++k) {
    const float w = __shfl_sync(0xffffffff, weight, Chunks::slot(lane, k) % 32);
    const Element* v = reinterpret_cast<const Element*>(&rows[k]);
#pragma unroll
    for (int d = 0; d < 8; ++d) acc[d] += w * static_cast<float>(v[d]);
  }
  // Lanes with the same chunk hold different slots: sum them.
#pragma unroll
  for (int o = kLanesPerRow; o < 32; o <<= 1) {
#pragma unroll
    for (int d = 0; d < 8; ++d) acc[d] += __shfl_xor_sync(0xffffffff, acc[d], o);
  }
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  if (lane < kLanesPerRow) {
    cutlass::Array<Element, 8> res;
#pragma unroll
    for (int d = 0; d < 8; ++d) res[d] = static_cast<Element>(acc[d] * inv_total);
    *reinterpret_cast<cutlass::Array<Element, 8>*>(out + chunk * 8) = res;
  }
  return common::natural_lse(m, total);
}

// Index of (token, head) in the lse output: padded [B, Hq, Sq] or varlen [Hq, total_q].
template <class Element>
__device__ __forceinline__ int64_t lse_index(const CombineParams<Element>& p, int64_t token, int head) {
  if (p.cu_seqlens_q != nullptr) return head * p.total_q + token;
  const int64_t b = token / p.seqlen_q;
  return (b * p.num_heads + head) * p.seqlen_q + (token - b * p.seqlen_q);
}

// Every slot's partial row and stats are loaded before block_indices says which slots take part
// (an invalid slot's data is then dropped, never weighted), so the row loads do not wait behind the
// sequence lookup and the block_indices load: 10.7 -> 8.7 ms at 128K (M3, H200), the copy ceiling.
// kMaxSlots (16 or 32) bounds topk, and so the registers the loads take (56 / 95 at D 128).
template <class Element, int kHeadDim, int kMaxSlots>
__global__ void __launch_bounds__(128) combine_kernel(const CombineParams<Element> p) {
  using Chunks = SlotChunks<kHeadDim, kMaxSlots>;
  const int64_t pair = blockIdx.x * 4LL + threadIdx.x / 32;  // (chunk token, head)
  const int lane = threadIdx.x % 32;
  if (pair >= (p.token_end - p.token_begin) * p.num_heads) return;
  // The pair's first partial row; its slots are Hq rows apart.
  const int64_t first = (pair / p.num_heads) * p.topk * p.num_heads + pair % p.num_heads;
  const int64_t slot_stride = p.num_heads;
  const uint4* rows = reinterpret_cast<const uint4*>(p.part_o + first * kHeadDim) + lane % Chunks::kLanesPerRow;
  uint4 loaded[Chunks::kLoads];
#pragma unroll
  for (int k = 0; k < Chunks::kLoads; ++k) {
    const int s = Chunks::slot(lane, k);
    loaded[k] = load_streaming_16(rows + s * slot_stride * Chunks::kLanesPerRow, s < p.topk);
  }
  const float2 stats = lane < p.topk ? p.part_stats[first + lane * slot_stride] : make_float2(0.f, -CUDART_INF_F);

  const int64_t q_local = pair / p.num_heads;
  const int head = static_cast<int>(pair % p.num_heads);
  const int64_t token = p.token_begin + q_local;
  const int group = head / (p.num_heads / p.num_heads_kv);
  const int b = sequence_of_query(token, p.cu_seqlens_q, p.batch, p.seqlen_q);
  const common::SeqInfo seq(b, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
  const int num_blocks = min(num_key_blocks(seq, p.block_size), p.num_blocks_max);
  const bool valid =
      lane < p.topk && slot_is_valid(p.block_indices[(token * p.num_heads_kv + group) * p.topk + lane], num_blocks);
  const float lse =
      merge_slots<Element, kHeadDim, kMaxSlots>(valid, valid ? stats : make_float2(0.f, -CUDART_INF_F), loaded,
                                                p.out + (token * p.num_heads + head) * kHeadDim, lane);
  if (lane == 0) p.lse[lse_index(p, token, head)] = lse;
}

}  // namespace msa::fwd
