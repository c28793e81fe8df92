// torch op msa_cuda_kernels::decode_step -> msa::run_decode.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "msa/msa.h"
#include "tensor_checks.h"

namespace msa::bindings {

// One decoding step (see msa_cuda.sparse_attn_with_kvcache): q [B, S_new, Hq, D]; q_idx
// [B, S_new, Hkv, Di]; caches contiguous [B, S_max, Hkv, D] / [B, S_max, (1,) Di], or paged
// [num_pages, page_size, Hkv, D] / [num_pages, page_size, (1,) Di] with block_table [B, pages];
// cache_seqlens int32 [B]; k, v [B, S_new, Hkv, D] and k_idx [B, S_new, (1,) Di] appended in place
// when given. An e4m3 k_idx_cache comes with k_idx_scale_cache (fp32, one per cached token); new
// index keys are then quantized on append. Values (lengths, page ids) are not read on the host: the kernels clamp them.
// Returns out [B, S_new, Hq, D], lse [B, Hq, S_new] (fp32, natural log) and the selection
// [B, S_new, Hkv, topk] (int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_step_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& q_idx,
    const at::Tensor& k_idx_cache, const c10::optional<at::Tensor>& k_idx_scale_cache,
    const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const c10::optional<at::Tensor>& k_idx,
    const c10::optional<at::Tensor>& block_table, int64_t block_size, int64_t topk, double softmax_scale,
    int64_t init_blocks, int64_t local_blocks) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&q_idx, "q_idx"},
                         {&k_idx_cache, "k_idx_cache"}, {&cache_seqlens, "cache_seqlens"}}) {
    check_cuda_contiguous(*t, name);
    check_same_device_as(*t, name, q);
  }
  const DType dtype = dtype_of(q, "q");
  const DType idx_dtype = dtype_of(q_idx, "q_idx");
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                   "k_cache and v_cache must have q's dtype");
  const bool fp8_keys = k_idx_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8_keys || k_idx_cache.scalar_type() == q_idx.scalar_type(),
                   "k_idx_cache must have q_idx's dtype or be float8_e4m3fn");
  TORCH_CHECK(fp8_keys == k_idx_scale_cache.has_value(),
              "k_idx_scale_cache must be given exactly when k_idx_cache is float8_e4m3fn");
  if (fp8_keys) {
    check_cuda_contiguous(*k_idx_scale_cache, "k_idx_scale_cache");
    check_same_device_as(*k_idx_scale_cache, "k_idx_scale_cache", q);
    TORCH_CHECK_TYPE(k_idx_scale_cache->scalar_type() == at::kFloat, "k_idx_scale_cache must be float32");
    TORCH_CHECK(k_idx_scale_cache->numel() == k_cache.size(0) * k_cache.size(1) &&
                    k_idx_scale_cache->size(0) == k_cache.size(0),
                "k_idx_scale_cache must be [.., S_max] or [.., page_size] over k_cache's first two dims");
    check_aligned_16(*k_idx_scale_cache, "k_idx_scale_cache");
    // 64 scales per TMA box, starting at a 64-aligned position of a page or of a request's rows.
    TORCH_CHECK(block_table.has_value() || k_cache.size(1) % 4 == 0,
                "with an fp8 index-key cache, a contiguous cache's S_max must be a multiple of 4");
  }
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32");
  TORCH_CHECK(q.dim() == 4, "q must be [B, S_new, Hq, D]");
  const int64_t batch = q.size(0), s_new = q.size(1), hq = q.size(2), d = q.size(3);
  TORCH_CHECK(s_new >= 1 && s_new <= 16, "q must have 1 to 16 new tokens per request");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache and v_cache must be [B, S_max, Hkv, D] or [num_pages, page_size, Hkv, D], same shape");
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "k_cache must have q's head dim");
  TORCH_CHECK(q_idx.dim() == 4 && q_idx.size(0) == batch && q_idx.size(1) == s_new && q_idx.size(2) == hkv,
              "q_idx must be [B, S_new, Hkv, Di]");
  const int64_t di = q_idx.size(3);
  TORCH_CHECK(k_idx_cache.size(0) == k_cache.size(0) && k_idx_cache.size(1) == k_cache.size(1) &&
                  k_idx_cache.size(-1) == di && k_idx_cache.numel() == k_cache.size(0) * k_cache.size(1) * di,
              "k_idx_cache must be [.., (1,) Di] over k_cache's first two dims");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch, "cache_seqlens must be [B]");
  const bool paged = block_table.has_value();
  if (paged) {
    check_cuda_contiguous(*block_table, "block_table");
    check_same_device_as(*block_table, "block_table", q);
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, "block_table must be int32");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == batch && block_table->size(1) >= 1,
                "block_table must be [B, pages]");
    TORCH_CHECK(k_cache.size(1) % block_size == 0, "the page size must be a multiple of block_size");
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "a contiguous k_cache must be [B, S_max, Hkv, D]");
  }
  const bool append = k.has_value();
  TORCH_CHECK(append == v.has_value() && append == k_idx.has_value(), "k, v and k_idx must be given together");
  if (append) {
    for (auto [t, name] : {std::pair{&*k, "k"}, {&*v, "v"}, {&*k_idx, "k_idx"}}) {
      check_cuda_contiguous(*t, name);
      check_same_device_as(*t, name, q);
      check_aligned_16(*t, name);
    }
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                     "k and v must have q's dtype");
    TORCH_CHECK_TYPE(k_idx->scalar_type() == q_idx.scalar_type(), "k_idx must have q_idx's dtype");
    TORCH_CHECK(k->dim() == 4 && k->size(0) == batch && k->size(1) == s_new && k->size(2) == hkv && k->size(3) == d &&
                    v->sizes() == k->sizes(),
                "k and v must be [B, S_new, Hkv, D]");
    TORCH_CHECK(k_idx->size(0) == batch && k_idx->size(1) == s_new && k_idx->size(-1) == di &&
                    k_idx->numel() == batch * s_new * di,
                "k_idx must be [B, S_new, (1,) Di]");
  }
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&q_idx, "q_idx"},
                         {&k_idx_cache, "k_idx_cache"}}) {
    check_aligned_16(*t, name);
  }
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");
  const int64_t cache_rows = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(cache_rows < (int64_t{1} << 31), "cache rows must stay below 2^31 (32-bit TMA coordinates)");
  const int64_t capacity = paged ? block_table->size(1) * k_cache.size(1) : k_cache.size(1);
  TORCH_CHECK(capacity < (int64_t{1} << 30), "the per-request capacity must stay below 2^30 tokens");

  DecodeParams p;
  p.q = q.data_ptr();
  p.q_idx = q_idx.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_idx_cache = k_idx_cache.data_ptr();
  p.k_idx_scale = fp8_keys ? k_idx_scale_cache->data_ptr<float>() : nullptr;
  p.k_new = append ? k->data_ptr() : nullptr;
  p.v_new = append ? v->data_ptr() : nullptr;
  p.k_idx_new = append ? k_idx->data_ptr() : nullptr;
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype;
  p.idx_dtype = idx_dtype;
  p.batch = static_cast<int>(batch);
  p.s_new = static_cast<int>(s_new);
  p.num_heads = static_cast<int>(hq);
  p.num_heads_kv = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.head_dim_idx = static_cast<int>(di);
  p.cache_rows = cache_rows;
  p.capacity = static_cast<int>(capacity);
  p.page_size = paged ? static_cast<int>(k_cache.size(1)) : 0;
  p.max_pages = paged ? static_cast<int>(block_table->size(1)) : 0;
  p.num_pages = paged ? static_cast<int>(k_cache.size(0)) : 0;
  p.appended_tokens = append ? static_cast<int>(s_new) : 0;
  p.block_size = static_cast<int>(block_size);
  p.topk = static_cast<int>(topk);
  p.init_blocks = static_cast<int>(init_blocks);
  p.local_blocks = static_cast<int>(local_blocks < 1 ? 1 : local_blocks);
  p.softmax_scale = static_cast<float>(softmax_scale);
  // MSA_CUDA_DECODE_PDL=0 launches the decode kernels one after the other (for profiling).
  const char* pdl = std::getenv("MSA_CUDA_DECODE_PDL");
  p.programmatic_launch = pdl == nullptr || std::strcmp(pdl, "0") != 0;
  TORCH_CHECK(init_blocks >= 0 && local_blocks >= 1 && init_blocks + local_blocks <= topk,
              "need init_blocks >= 0, local_blocks >= 1 and init_blocks + local_blocks <= topk");
  TORCH_CHECK(decode_is_supported(p), "unsupported decode configuration: D and Di must be 64 or 128, block_size 64 "
              "or 128, topk 1..32, G = Hq / Hkv in {1, 2, 4, 8, 16}");
  check_sm90(q);
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, q.get_device());

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, hq, s_new}, q.options().dtype(at::kFloat));
  at::Tensor block_indices = at::empty({batch, s_new, hkv, topk}, q.options().dtype(at::kInt));
  if (batch == 0) return {out, lse, block_indices};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.block_indices = block_indices.data_ptr<int32_t>();

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor workspace = at::empty({static_cast<int64_t>(decode_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_launch(run_decode(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()), "msa_cuda decode kernels");
  return {out, lse, block_indices};
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) { m.impl("decode_step", &msa::bindings::decode_step_cuda); }
