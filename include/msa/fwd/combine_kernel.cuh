// Merge the per-slot partial outputs of each (query, head) by their lse (MSA_SPEC s.5):
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) * O_s,
// where the main kernel stores bf16 O_s unnormalized (P V, P = exp(S - max_s)) with (max_s, lse_s)
// in log2 units, so the weight of slot s is 2^(max_s - LSE) (exp(lse_s - lse) / sum_s P = that);
// fp16 O_s is stored normalized with max_s = lse_s, which the same weight handles.
// One warp per (query, head). The combine only streams partials (about as many bytes as the main
// kernel writes): lane s learns from block_indices whether slot s is valid and reads its stats,
// then the valid partial rows are read with 16-byte loads (D/8 lanes per row, 32/(D/8) rows per
// warp-wide load) and weighted.
// A (query, head) with no visible key gets out = 0 and lse = -inf.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

template <class Element>
struct CombineParams {
  const Element* part_o;        // [chunk tokens, Hq, topk, D]
  const float2* part_stats;     // [chunk tokens, Hq, topk]: (max, lse) per partial, log2 units
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

// One (query, head) row, by one warp: lane s (< topk) holds slot s's (max, lse) in `slot_stats`
// (log2 units) and whether it takes part (`valid`); load_chunk(s, c, pred) returns 16-byte chunk c
// of slot s's partial row when pred (zeros otherwise). Writes the merged row to `out` (D
// elements) and returns the natural-log lse (-inf when no slot saw a key; out is then 0).
template <class Element, int kHeadDim, class LoadChunk>
__device__ __forceinline__ float merge_slots(bool valid, float2 slot_stats, LoadChunk&& load_chunk, Element* out,
                                             int lane) {
  constexpr int kLanesPerRow = kHeadDim / 8;            // 16-byte chunks of a partial row
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;       // slots one warp-wide load covers
  constexpr int kMaxLoads = 32 / kRowsPerLoad;          // topk <= 32
  const unsigned valid_mask = __ballot_sync(0xffffffff, valid);
  const float slot_lse = valid ? slot_stats.y : -CUDART_INF_F;
  // Lane l reads chunk l % kLanesPerRow of slots l / kLanesPerRow + kRowsPerLoad * k.
  const int chunk = lane % kLanesPerRow;
  const int slot_in_load = lane / kLanesPerRow;
  uint4 rows[kMaxLoads];
#pragma unroll
  for (int k = 0; k < kMaxLoads; ++k) {
    const int s = slot_in_load + kRowsPerLoad * k;
    rows[k] = load_chunk(s, chunk, ((valid_mask >> s) & 1u) != 0);
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
    const int s = slot_in_load + kRowsPerLoad * k;
    const float w = __shfl_sync(0xffffffff, weight, s % 32);
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
  return total > 0.f ? (m + __log2f(total)) * 0.69314718055994531f : -CUDART_INF_F;
}

// Index of (token, head) in the lse output: padded [B, Hq, Sq] or varlen [Hq, total_q].
template <class Element>
__device__ __forceinline__ int64_t lse_index(const CombineParams<Element>& p, int64_t token, int head) {
  if (p.cu_seqlens_q != nullptr) return head * p.total_q + token;
  const int64_t b = token / p.seqlen_q;
  return (b * p.num_heads + head) * p.seqlen_q + (token - b * p.seqlen_q);
}

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(128) combine_kernel(const CombineParams<Element> p) {
  const int64_t pair = blockIdx.x * 4LL + threadIdx.x / 32;  // (chunk token, head)
  const int lane = threadIdx.x % 32;
  if (pair >= (p.token_end - p.token_begin) * p.num_heads) return;
  const int64_t q_local = pair / p.num_heads;
  const int head = static_cast<int>(pair % p.num_heads);
  const int64_t token = p.token_begin + q_local;
  const int group = head / (p.num_heads / p.num_heads_kv);
  const int b = sequence_of_query(token, p.cu_seqlens_q, p.batch, p.seqlen_q);
  const common::SeqInfo seq(b, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
  const int num_blocks = min(num_key_blocks(seq, p.block_size), p.num_blocks_max);

  const bool valid =
      lane < p.topk && slot_is_valid(p.block_indices[(token * p.num_heads_kv + group) * p.topk + lane], num_blocks);
  const float2 slot_stats = valid ? p.part_stats[pair * p.topk + lane] : make_float2(0.f, -CUDART_INF_F);
  const uint4* rows = reinterpret_cast<const uint4*>(p.part_o + pair * p.topk * kHeadDim);
  const float lse = merge_slots<Element, kHeadDim>(
      valid, slot_stats,
      [&](int s, int chunk, bool pred) { return load_streaming_16(rows + s * (kHeadDim / 8) + chunk, pred); },
      p.out + (token * p.num_heads + head) * kHeadDim, lane);
  if (lane == 0) p.lse[lse_index(p, token, head)] = lse;
}

// The combine of a finished query chunk, run by the last CTAs of the next chunk's main kernel
// (fwd_kernel, blockIdx.x >= num_main_ctas) so that its partial reads overlap that kernel's
// compute instead of following it. Few CTAs must stream many bytes each, so the work is laid out
// for loads in flight rather than for short chains: kHeadDim / 8 threads share a (query, head)
// row, each owns one 16-byte column chunk of every slot and issues all its loads (stats and up to
// 16 slots) at once; the row's max and sum are shuffles inside the thread's segment. Validity
// comes from the stats alone: the plan marks every invalid slot's lse -inf (plan_count_kernel),
// so block_indices is not read, and an invalid slot's never-written partial is loaded but given
// no weight (a select, not a product: the bits may be NaN).
// Eight 16-bit floats (one 16-byte chunk) to fp32: bf16 is the upper half of an fp32, so a shift or
// a mask per value.
template <class Element>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&x)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
      x[2 * i] = __uint_as_float(words[i] << 16);
      x[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
}

template <class Element, int kHeadDim>
__device__ __forceinline__ void streamed_combine(const CombineParams<Element>& p, int cta, int num_ctas) {
  constexpr int kThreadsPerRow = kHeadDim / 8;
  // Slots loaded per pass (and per row group in flight): the registers of two groups fit for D 128;
  // D 64 holds four partial sums per thread (kResidues), so its passes are shorter.
  constexpr int kSlotsPerPass = kHeadDim == 128 ? 16 : 8;
  constexpr int kStatsPerThread = 32 / kThreadsPerRow;  // topk <= 32: thread c holds slots c + j kThreadsPerRow
  // merge_slots sums slot s into lane (s % kResidues) and then adds the lanes by a shuffle tree;
  // the same order here keeps both merges bit-identical (a chunked forward equals an unchunked one).
  constexpr int kResidues = 32 / kThreadsPerRow;
  const int rows_per_group = static_cast<int>(blockDim.x) / kThreadsPerRow;
  const int chunk = threadIdx.x % kThreadsPerRow;
  const int64_t rows = (p.token_end - p.token_begin) * p.num_heads;
  struct Loaded {
    float2 st[kStatsPerThread];
    uint4 v[kSlotsPerPass];
  };
  auto row_of = [&](int64_t first) { return first + threadIdx.x / kThreadsPerRow; };
  auto part_of = [&](int64_t row) {
    // Threads past the end read the last row and take part in the shuffles only.
    return reinterpret_cast<const uint4*>(p.part_o + (row < rows ? row : rows - 1) * p.topk * kHeadDim) + chunk;
  };
  auto load = [&](int64_t first, Loaded& g) {
    const int64_t row = row_of(first);
    const float2* stats = p.part_stats + (row < rows ? row : rows - 1) * p.topk;
#pragma unroll
    for (int j = 0; j < kStatsPerThread; ++j) {
      const int s = chunk + j * kThreadsPerRow;
      g.st[j] = s < p.topk ? __ldg(stats + s) : make_float2(0.f, -CUDART_INF_F);
    }
    const uint4* part = part_of(row);
#pragma unroll
    for (int k = 0; k < kSlotsPerPass; ++k) g.v[k] = load_streaming_16(part + k * kThreadsPerRow, k < p.topk);
  };
  auto merge = [&](int64_t first, Loaded& g) {
    const int64_t row = row_of(first);
    float m = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < kStatsPerThread; ++j) m = fmaxf(m, g.st[j].y);
#pragma unroll
    for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o, kThreadsPerRow));
    float t[kStatsPerThread], weight[kStatsPerThread];
#pragma unroll
    for (int j = 0; j < kStatsPerThread; ++j) {
      const bool valid = g.st[j].y != -CUDART_INF_F;
      t[j] = valid ? exp2f(g.st[j].y - m) : 0.f;
      weight[j] = valid ? exp2f(g.st[j].x - m) : 0.f;
    }
    // merge_slots' tree: levels 16 .. kThreadsPerRow pair slots held by this thread, the rest lanes.
#pragma unroll
    for (int half = kStatsPerThread / 2; half > 0; half >>= 1) {
#pragma unroll
      for (int j = 0; j < half; ++j) t[j] += t[j + half];
    }
    float total = t[0];
#pragma unroll
    for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o, kThreadsPerRow);

    float acc[kResidues][8] = {};
#pragma unroll
    for (int pass = 0; pass < 32 / kSlotsPerPass; ++pass) {
      if (pass > 0) {
        if (pass * kSlotsPerPass >= p.topk) break;
        const uint4* part = part_of(row);
#pragma unroll
        for (int k = 0; k < kSlotsPerPass; ++k) {
          g.v[k] = load_streaming_16(part + (pass * kSlotsPerPass + k) * kThreadsPerRow, pass * kSlotsPerPass + k < p.topk);
        }
      }
#pragma unroll
      for (int k = 0; k < kSlotsPerPass; ++k) {
        const int s = pass * kSlotsPerPass + k;
        const float w = __shfl_sync(0xffffffff, weight[s / kThreadsPerRow], s % kThreadsPerRow, kThreadsPerRow);
        float x[8];
        to_float8<Element>(w != 0.f ? g.v[k] : make_uint4(0, 0, 0, 0), x);
#pragma unroll
        for (int d = 0; d < 8; ++d) acc[s % kResidues][d] += w * x[d];
      }
    }
#pragma unroll
    for (int half = kResidues / 2; half > 0; half >>= 1) {
#pragma unroll
      for (int r = 0; r < half; ++r) {
#pragma unroll
        for (int d = 0; d < 8; ++d) acc[r][d] += acc[r + half][d];
      }
    }
    if (row < rows) {
      const float inv_total = total > 0.f ? 1.f / total : 0.f;
      cutlass::Array<Element, 8> res;
#pragma unroll
      for (int d = 0; d < 8; ++d) res[d] = static_cast<Element>(acc[0][d] * inv_total);
      *reinterpret_cast<cutlass::Array<Element, 8>*>(p.out + (p.token_begin * p.num_heads + row) * kHeadDim + chunk * 8) =
          res;
      if (chunk == 0) {
        p.lse[lse_index(p, p.token_begin + row / p.num_heads, static_cast<int>(row % p.num_heads))] =
            total > 0.f ? (m + __log2f(total)) * 0.69314718055994531f : -CUDART_INF_F;
      }
    }
  };
  // Two row groups in flight: the next group's loads are issued before this one is merged.
  const int64_t step = int64_t{num_ctas} * rows_per_group;
  Loaded a, b;
  int64_t first = int64_t{cta} * rows_per_group;
  if (first < rows) load(first, a);
  while (first < rows) {
    if (first + step < rows) load(first + step, b);
    merge(first, a);
    first += step;
    if (first >= rows) break;
    if (first + step < rows) load(first + step, a);
    merge(first, b);
    first += step;
  }
}
}  // namespace msa::fwd
