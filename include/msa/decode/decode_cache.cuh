// Where a request's tokens live in a contiguous or paged KV cache, and its length, read on the
// device (MSA_SPEC s.8). Shared by the append, indexer and attention kernels of a decoding step.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "msa/params.h"

namespace msa::decode {

struct CacheGeometry {
  const int32_t* cache_seqlens;  // [B]
  const int32_t* block_table;    // [B, max_pages] or null (contiguous)
  int capacity;                  // tokens per request
  int page_size;                 // paged only
  int max_pages;
  int num_pages;
  int appended_tokens;

  static CacheGeometry from(const DecodeParams& p) {
    return {p.cache_seqlens, p.block_table, p.capacity, p.page_size, p.max_pages, p.num_pages, p.appended_tokens};
  }

  // L_b, clamped to [0, capacity]: the host does not read the lengths (graph capture), so a bad
  // value must not move any access outside the request's cache.
  __device__ __forceinline__ int length(int b) const {
    const int64_t l = static_cast<int64_t>(cache_seqlens[b]) + appended_tokens;
    return static_cast<int>(l < 0 ? 0 : (l > capacity ? capacity : l));
  }

  // Cache row of position pos (0 <= pos < capacity) of request b. Page ids are clamped to the
  // pool for the same reason as the lengths.
  __device__ __forceinline__ int64_t row(int b, int pos) const {
    if (block_table == nullptr) {
      return static_cast<int64_t>(b) * capacity + pos;
    }
    int page = block_table[static_cast<int64_t>(b) * max_pages + pos / page_size];
    page = page < 0 ? 0 : (page >= num_pages ? num_pages - 1 : page);
    return static_cast<int64_t>(page) * page_size + pos % page_size;
  }
};

// Packed (token, index head) rows per indexer CTA, the N of its WGMMA: 16 for a step of up to 16
// rows (M3: up to 4 tokens), else 64.
inline int decode_select_block_q(int rows) { return rows <= 16 ? 16 : 64; }

// Splits of the indexer: enough CTAs to fill every SM's two CTA slots once, whatever the batch
// (they are memory-bound and equal in work: each takes an equal share of its request's blocks);
// bounded so the merge's lists fit in shared memory. A function of the shapes (and of
// MSA_DECODE_CTAS_PER_SM, which overrides the two, for measuring), so a captured step keeps its
// launch shape.
inline int decode_select_splits(const DecodeParams& p) {
  const int rows = p.s_new * p.num_heads_kv;
  const int block_q = decode_select_block_q(rows);
  const int m_tiles = (rows + block_q - 1) / block_q;
  const int max_blocks = (p.capacity + p.block_size - 1) / p.block_size;
  int ctas_per_sm = 2;
  if (const char* env = std::getenv("MSA_DECODE_CTAS_PER_SM")) {
    const long value = std::strtol(env, nullptr, 10);
    if (value > 0) ctas_per_sm = static_cast<int>(value < 8 ? value : 8);
  }
  int splits = ctas_per_sm * p.num_sms / (p.batch * m_tiles);
  splits = splits < 1 ? 1 : (splits > 256 ? 256 : splits);  // <= the merge's kMaxSplits
  return splits < max_blocks ? splits : (max_blocks < 1 ? 1 : max_blocks);
}

// The attention's chunks of a row merge inside a thread-block cluster (at most 16 CTAs, the
// largest cluster SM90 allows) unless MSA_DECODE_CLUSTER_MERGE=0 (for measuring the global path).
constexpr int kMaxClusterChunks = 16;
inline bool decode_cluster_merge_enabled() {
  const char* env = std::getenv("MSA_DECODE_CLUSTER_MERGE");
  return env == nullptr || std::strtol(env, nullptr, 10) != 0;
}

// Scratch of one decoding step (carved from one workspace by run_decode).
struct DecodeWorkspace {
  float* part_score;      // indexer lists: [B * S_new * Hkv, splits, cap] scores
  int32_t* part_id;       // and block ids
  void* part_o;           // attention partials [B * S_new, Hq, topk, D] (q's dtype)
  float2* part_stats;     // [B * S_new, Hq, topk]
  int32_t* row_arrivals;  // [B * S_new * Hkv]
};

// Append: new token i of request b goes to position cache_seqlens[b] + i of k, v and the
// index-key cache (positions past the capacity are dropped). One CTA per (request, new token);
// rows are copied in 16-byte pieces (row sizes are multiples of 128 bytes); into an e4m3
// index-key cache the new keys are quantized with a per-token scale.
struct AppendParams {
  CacheGeometry cache;
  const uint4* k_new;    // [B * S_new, kv_row_chunks]
  const uint4* v_new;
  const uint4* k_idx_new;  // [B * S_new, idx_row_chunks]
  uint4* k_cache;          // [cache rows, kv_row_chunks]
  uint4* v_cache;
  uint4* k_idx_cache;      // [cache rows, idx_row_chunks] (e4m3: [cache rows, Di] bytes)
  float* k_idx_scale;      // [cache rows] for an e4m3 index-key cache, else null
  int s_new;
  int kv_row_chunks;   // Hkv * D * 2 bytes / 16
  int idx_row_chunks;  // Di * 2 bytes / 16 (of the new rows)
  bool keys_bf16;      // dtype of the new index keys (e4m3 cache: quantized from it)
};

}  // namespace msa::decode
