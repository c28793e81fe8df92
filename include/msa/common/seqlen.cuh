// Where one sequence of a (padded or varlen) batch lives, and the bottom-right position rule.
// Shared by every kernel family so p(i) = Sk - Sq + i is written exactly once (MSA_SPEC s.3).
#pragma once

#include <cstdint>

namespace msa::common {

struct SeqInfo {
  int64_t q_token_start;  // first query token of the sequence in the flat token dimension
  int64_t k_token_start;  // first key token of the sequence
  int seqlen_q;
  int seqlen_k;

  // Padded batches have no cu_seqlens: sequence b starts at b * seqlen.
  __host__ __device__ SeqInfo(int batch_idx, const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                              int padded_seqlen_q, int padded_seqlen_k) {
    if (cu_seqlens_q != nullptr) {
      q_token_start = cu_seqlens_q[batch_idx];
      seqlen_q = static_cast<int>(cu_seqlens_q[batch_idx + 1] - q_token_start);
      k_token_start = cu_seqlens_k[batch_idx];
      seqlen_k = static_cast<int>(cu_seqlens_k[batch_idx + 1] - k_token_start);
    } else {
      q_token_start = static_cast<int64_t>(batch_idx) * padded_seqlen_q;
      seqlen_q = padded_seqlen_q;
      k_token_start = static_cast<int64_t>(batch_idx) * padded_seqlen_k;
      seqlen_k = padded_seqlen_k;
    }
  }

  // Absolute position of query i (bottom-right alignment).
  __host__ __device__ int query_position(int i) const { return seqlen_k - seqlen_q + i; }
};

}  // namespace msa::common
