// Merge the per-slot partial outputs of each (query, head) by their lse (MSA_SPEC s.5):
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) * O_s.
// One warp per (query, head); lane s reads slot s's lse, every lane owns D/32 output columns.
// A (query, head) with no visible key gets out = 0 and lse = -inf.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_common.cuh"

namespace msa::fwd {

template <class Element>
struct CombineParams {
  const Element* part_o;        // [chunk tokens, Hq, topk, D]
  const float* part_lse;        // [chunk tokens, Hq, topk]
  const int32_t* block_indices; // [total_q, Hkv, topk]
  Element* out;                 // [total_q, Hq, D]
  float* lse;                   // padded [B, Hq, Sq] or varlen [Hq, total_q]
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int64_t total_q;
  int64_t token_begin, token_end;
  int num_heads, num_heads_kv, topk, block_size;
};

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(128) combine_kernel(const CombineParams<Element> p) {
  constexpr int kPerLane = kHeadDim / 32;
  const int64_t pair = blockIdx.x * 4LL + threadIdx.x / 32;  // (chunk token, head)
  const int lane = threadIdx.x % 32;
  if (pair >= (p.token_end - p.token_begin) * p.num_heads) return;
  const int64_t q_local = pair / p.num_heads;
  const int head = static_cast<int>(pair % p.num_heads);
  const int64_t token = p.token_begin + q_local;
  const int group = head / (p.num_heads / p.num_heads_kv);
  const int b = sequence_of_query(token, p.cu_seqlens_q, p.batch, p.seqlen_q);
  const common::SeqInfo seq(b, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
  const int num_blocks = num_key_blocks(seq, p.block_size);

  float slot_lse = -CUDART_INF_F;
  if (lane < p.topk) {
    const int block = p.block_indices[(token * p.num_heads_kv + group) * p.topk + lane];
    if (slot_is_valid(block, num_blocks)) slot_lse = p.part_lse[pair * p.topk + lane];
  }
  float m = slot_lse;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  const float weight = slot_lse == -CUDART_INF_F ? 0.f : __expf(slot_lse - m);
  float total = weight;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);

  float acc[kPerLane] = {};
  const Element* part = p.part_o + pair * p.topk * kHeadDim + lane * kPerLane;
  for (int s = 0; s < p.topk; ++s) {
    const float w = __shfl_sync(0xffffffff, weight, s);
    if (w == 0.f) continue;
#pragma unroll
    for (int d = 0; d < kPerLane; ++d) acc[d] += w * static_cast<float>(part[s * kHeadDim + d]);
  }
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  Element* out = p.out + (token * p.num_heads + head) * kHeadDim + lane * kPerLane;
#pragma unroll
  for (int d = 0; d < kPerLane; ++d) out[d] = static_cast<Element>(acc[d] * inv_total);
  if (lane == 0) {
    const float lse = total > 0.f ? m + __logf(total) : -CUDART_INF_F;
    const int64_t idx = p.cu_seqlens_q != nullptr
                            ? head * p.total_q + token
                            : (static_cast<int64_t>(b) * p.num_heads + head) * p.seqlen_q + (token - seq.q_token_start);
    p.lse[idx] = lse;
  }
}

}  // namespace msa::fwd
