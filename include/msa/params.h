// Plain parameter structs handed from the bindings to the kernel launchers.
// Torch-free on purpose: kernels and launchers never see an at::Tensor.
#pragma once

#include <cstdint>

namespace msa {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// Block selection (the routing branch), MSA_SPEC section 4.
//
// Inputs are viewed as flat row-major matrices:
//   q_idx  [total_q_rows, Di], total_q_rows = (tokens of all sequences) * Hkv.
//          Row r of a sequence is (token r / Hkv, index head r % Hkv): the Hkv index heads of one
//          token are contiguous, so heads and tokens pack into the MMA's M dimension.
//   k_idx  [total_k, Di]: one index-key head shared by all groups.
//   block_indices [total_q_rows, topk] int32 (same row order as q_idx).
// Sequences: padded batches use seqlen_q / seqlen_k and no cu_seqlens; varlen batches pass
// cu_seqlens_q / cu_seqlens_k (device pointers, [batch + 1]) and max_seqlen_q.
struct SelectParams {
  const void* q_idx = nullptr;            // [total_q_rows, Di]
  const void* k_idx = nullptr;            // [total_k, Di]
  int32_t* block_indices = nullptr;       // [total_q_rows, topk]
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] or null (padded)
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1] or null (padded)

  DType dtype = DType::kBF16;
  int64_t total_q_rows = 0;
  int64_t total_k = 0;
  int batch = 0;
  int seqlen_q = 0;       // padded: Sq; varlen: unused
  int seqlen_k = 0;       // padded: Sk; varlen: unused
  int max_seqlen_q = 0;   // longest query sequence (grid size)
  int num_idx_heads = 0;  // Hkv
  int head_dim_idx = 0;   // Di
  int block_size = 128;
  int topk = 16;
  int init_blocks = 0;
  int local_blocks = 1;   // effective count, already max(1, local_blocks)
  int num_sms = 0;
};

// The value check of a caller's selection (validate=True): flags[0] is set when an entry is
// below -1 or not a block of its sequence, flags[1] when a (token, group) row repeats an id.
struct CheckSelectionParams {
  const int32_t* block_indices = nullptr;  // [total_q, Hkv, topk]
  const int32_t* cu_seqlens_q = nullptr;   // [batch + 1] or null (padded)
  const int32_t* cu_seqlens_k = nullptr;   // [batch + 1] or null (padded)
  int32_t* flags = nullptr;                // [2], zeroed by the caller
  int64_t total_q = 0;
  int batch = 0;
  int seqlen_q = 0;  // padded: Sq; varlen: unused
  int seqlen_k = 0;  // padded: Sk; varlen: unused
  int num_heads_kv = 0;
  int topk = 0;      // 1..32
  int block_size = 128;
};

// Which forward kernel runs. kAuto: query-outer when a sequence has at most 32 key blocks and at
// most 2 x topk of them (so also whenever every query can select all of its visible blocks,
// max_seqlen_k <= topk x block_size), KV-outer otherwise. kQueryOuter needs at most 32 key blocks
// per sequence and falls back to KV-outer beyond that.
enum class FwdPath : int { kAuto = 0, kKVOuter = 1, kQueryOuter = 2 };

// Block-sparse attention forward (the main branch), MSA_SPEC s.5. Tokens are flat across the
// batch (padded batches are the varlen case with uniform lengths); heads are the last-but-one dim.
struct FwdParams {
  const void* q = nullptr;                // [total_q, Hq, D]
  const void* k = nullptr;                // [total_k, Hkv, D]
  const void* v = nullptr;                // [total_k, Hkv, D]
  const int32_t* block_indices = nullptr; // [total_q, Hkv, topk]; -1 = empty slot, any order
  void* out = nullptr;                    // [total_q, Hq, D]
  float* lse = nullptr;                   // padded [B, Hq, Sq] or varlen [Hq, total_q]
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] or null (padded)
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1] or null (padded)

  DType dtype = DType::kBF16;
  int64_t total_q = 0;
  int64_t total_k = 0;
  int batch = 0;
  int seqlen_q = 0;      // padded: Sq
  int seqlen_k = 0;      // padded: Sk
  int max_seqlen_k = 0;  // longest key sequence (sizes the per-block lists)
  int num_heads = 0;     // Hq
  int num_heads_kv = 0;  // Hkv
  int head_dim = 0;      // D
  int block_size = 128;
  int topk = 16;
  float softmax_scale = 0.f;
  int num_sms = 0;
  FwdPath path = FwdPath::kAuto;
};

// Block-sparse attention backward (MSA_SPEC s.6): dq, dk, dv of block_sparse_attn, given the
// forward's lse. Layouts as in FwdParams; the dk/dv accumulators are zeroed by the caller, dq's
// (per query chunk, in the workspace: 256-byte aligned, bwd_workspace_bytes) by run_bwd.
struct BwdParams {
  const void* q = nullptr;                // [total_q, Hq, D]
  const void* k = nullptr;                // [total_k, Hkv, D]
  const void* v = nullptr;                // [total_k, Hkv, D]
  const void* dout = nullptr;             // [total_q, Hq, D]
  const int32_t* block_indices = nullptr; // [total_q, Hkv, topk]
  const float* lse_log2 = nullptr;        // [total_q, Hq]: the forward's lse in log2 units, 0 where -inf
  const float* delta = nullptr;           // [total_q, Hq]: rowsum(dout * out) - grad_lse
  void* dq = nullptr;                     // [total_q, Hq, D] in q's dtype: written chunk by chunk
  // dq accumulates per query chunk in the workspace (run_bwd), then is converted into dq: 4 (8) bytes
  // per element of a chunk instead of the whole [total_q, Hq, D] (34 GB at 1M tokens of the M3 shape).
  float* dk_accum = nullptr;              // [total_k, Hkv, D], zeroed
  float* dv_accum = nullptr;              // [total_k, Hkv, D], zeroed
  // Deterministic mode (bitwise reproducible gradients): the plan's lists are sorted and the
  // gradients accumulate as 64-bit fixed point (integer adds commute): value x fixed_scale_* is
  // added to the zeroed int64 buffers below (and to dq's chunk accumulator) instead of fp32.
  bool deterministic = false;
  unsigned long long* dk_fixed = nullptr;  // [total_k, Hkv, D]
  unsigned long long* dv_fixed = nullptr;  // [total_k, Hkv, D]
  float fixed_scale_q = 0.f, fixed_scale_k = 0.f, fixed_scale_v = 0.f;  // powers of two
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  DType dtype = DType::kBF16;
  int64_t total_q = 0;
  int64_t total_k = 0;
  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int max_seqlen_k = 0;
  int num_heads = 0;
  int num_heads_kv = 0;
  int head_dim = 0;
  int block_size = 128;
  int topk = 16;
  float softmax_scale = 0.f;
  int num_sms = 0;
};

// Indexer distillation loss on the selected support (MSA_SPEC s.7): the loss and the gradients of
// q_idx and k_idx at once (the loss is a scalar: the caller scales them by the incoming gradient).
struct KlParams {
  const void* q = nullptr;                // [total_q, Hq, D]
  const void* k = nullptr;                // [total_k, Hkv, D]
  const void* q_idx = nullptr;            // [total_q, Hkv, Di]
  const void* k_idx = nullptr;            // [total_k, Di]
  const int32_t* block_indices = nullptr; // [total_q, Hkv, topk]; -1 = empty slot, any order, no repeats
  const float* lse_log2 = nullptr;        // [total_q, Hq]: the main branch's lse x log2(e), +inf where -inf
  float* dq_idx_accum = nullptr;          // [total_q, Hkv, Di], zeroed: d loss / d q_idx
  float* dk_idx_accum = nullptr;          // [total_k, Di], zeroed: d loss / d k_idx
  double* loss_sum = nullptr;             // [1], zeroed: sum over (token, group) of KL; / pairs = loss
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  DType dtype = DType::kBF16;
  int64_t total_q = 0;
  int64_t total_k = 0;
  int batch = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;
  int max_seqlen_k = 0;
  int max_seqlen_q = 0;  // varlen (the dense variant's row tiles); the padded seqlen_q otherwise
  int num_heads = 0;     // Hq
  int num_heads_kv = 0;  // Hkv
  int head_dim = 0;      // D
  int head_dim_idx = 0;  // Di
  int block_size = 128;
  int topk = 16;
  float softmax_scale = 0.f;
  float index_scale = 0.f;
  int num_sms = 0;
};

// One decoding step over a KV cache (MSA_SPEC s.8): append (optional), select, attend.
// Caches are flat row-major matrices of `cache_rows` token rows: contiguous caches [B, S_max, ..]
// (row of request b, position j = b * S_max + j) or paged caches [num_pages, page_size, ..]
// (row = block_table[b, j / page_size] * page_size + j % page_size).
// Request b holds L_b = cache_seqlens[b] + appended_tokens tokens (clamped to the capacity on the
// device, so a bad length cannot send a kernel out of the cache); its S_new queries sit at the last
// S_new positions. Nothing here is read on the host: a step can be captured in a CUDA graph.
struct DecodeParams {
  const void* q = nullptr;             // [B, S_new, Hq, D]
  const void* q_idx = nullptr;         // [B, S_new, Hkv, Di]
  void* k_cache = nullptr;             // [cache_rows, Hkv, D]
  void* v_cache = nullptr;             // [cache_rows, Hkv, D]
  void* k_idx_cache = nullptr;         // [cache_rows, Di]: q_idx's dtype, or e4m3 with k_idx_scale
  float* k_idx_scale = nullptr;        // [cache_rows]: per-token scales of an e4m3 index-key cache, else null
  const void* k_new = nullptr;         // [B, S_new, Hkv, D] or null (nothing appended)
  const void* v_new = nullptr;         // [B, S_new, Hkv, D]
  const void* k_idx_new = nullptr;     // [B, S_new, Di], q_idx's dtype (quantized on append for e4m3)
  const int32_t* cache_seqlens = nullptr;  // [B]
  const int32_t* block_table = nullptr;    // [B, max_pages] or null (contiguous)
  int32_t* block_indices = nullptr;    // [B, S_new, Hkv, topk]: the selection (output)
  void* out = nullptr;                 // [B, S_new, Hq, D]
  float* lse = nullptr;                // [B, Hq, S_new], natural log

  DType dtype = DType::kBF16;      // q, k, v
  DType idx_dtype = DType::kBF16;  // q_idx (and the index keys, unless e4m3)
  int batch = 0;
  int s_new = 0;
  int num_heads = 0;     // Hq
  int num_heads_kv = 0;  // Hkv
  int head_dim = 0;      // D
  int head_dim_idx = 0;  // Di
  int64_t cache_rows = 0;
  int capacity = 0;      // tokens a request can hold: S_max, or max_pages * page_size
  int page_size = 0;     // 0: contiguous
  int max_pages = 0;     // block_table's second dim
  int num_pages = 0;     // pages in the pool (paged)
  int appended_tokens = 0;  // S_new when k_new/v_new/k_idx_new are appended first, else 0
  int block_size = 128;
  int topk = 16;
  int init_blocks = 0;
  int local_blocks = 1;  // effective count (>= 1)
  float softmax_scale = 0.f;
  int num_sms = 0;
  // Launch the merge and attention kernels as programmatic dependents of the kernel before them
  // (overlaps each launch with the previous kernel's drain). Off only to profile the kernels
  // one at a time (MSA_CUDA_DECODE_PDL=0).
  bool programmatic_launch = true;
  // Measurement aid: when set, the split indexer's CTAs stamp %globaltimer at fixed points
  // ([CTA][kDecodeTraceSlots] nanoseconds; run_decode fills it when MSA_DECODE_TRACE_FILE is set).
  unsigned long long* select_trace = nullptr;
};

}  // namespace msa
