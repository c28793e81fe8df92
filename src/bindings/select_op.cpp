// torch ops msa_cuda_kernels::select_blocks -> msa::run_select and
// msa_cuda_kernels::check_block_indices -> msa::run_check_selection.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "msa/msa.h"
#include "tensor_checks.h"

namespace msa::bindings {

// q_idx [B, Sq, Hkv, Di] (padded) or [Tq, Hkv, Di] (varlen); k_idx [B, Sk, Di] or [Tk, Di].
// Returns int32 block ids with q_idx's leading dims and topk last.
at::Tensor select_blocks_cuda(const at::Tensor& q_idx, const at::Tensor& k_idx,
                              const c10::optional<at::Tensor>& cu_seqlens_q,
                              const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t block_size, int64_t topk, int64_t init_blocks, int64_t local_blocks) {
  check_cuda_contiguous(q_idx, "q_idx");
  check_cuda_contiguous(k_idx, "k_idx");
  TORCH_CHECK(k_idx.get_device() == q_idx.get_device(), "q_idx and k_idx must be on the same device");
  const DType dtype = dtype_of(q_idx, "q_idx");
  TORCH_CHECK_TYPE(k_idx.scalar_type() == q_idx.scalar_type(), "k_idx must have q_idx's dtype");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  TORCH_CHECK(q_idx.dim() == (varlen ? 3 : 4), "q_idx must be ", varlen ? "[Tq, Hkv, Di]" : "[B, Sq, Hkv, Di]");
  TORCH_CHECK(k_idx.dim() == (varlen ? 2 : 3), "k_idx must be ", varlen ? "[Tk, Di]" : "[B, Sk, Di]");
  const int64_t di = q_idx.size(-1);
  TORCH_CHECK(di == 64 || di == 128, "Di must be 64 or 128, got ", di);
  TORCH_CHECK(k_idx.size(-1) == di, "k_idx's last dim must equal q_idx's");
  TORCH_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128");
  TORCH_CHECK(topk >= 1 && topk <= 32, "topk must be in [1, 32]");
  TORCH_CHECK(init_blocks >= 0 && local_blocks >= 1 && init_blocks + local_blocks <= topk,
              "need init_blocks >= 0, local_blocks >= 1 and init_blocks + local_blocks <= topk");
  const int64_t num_heads = q_idx.size(-2);
  const int64_t total_q_rows = q_idx.numel() / di;
  const int64_t total_k = k_idx.numel() / di;
  TORCH_CHECK(total_q_rows < (int64_t{1} << 31) && total_k < (int64_t{1} << 31),
              "the selector indexes rows with 32-bit TMA coordinates: tokens x heads must stay below 2^31");

  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q_idx.size(0);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q_idx);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, q_idx);
  if (!varlen) {
    TORCH_CHECK(k_idx.size(0) == batch, "k_idx's batch must equal q_idx's");
    TORCH_CHECK(q_idx.size(1) <= k_idx.size(1), "Sq must not exceed Sk");
  } else {
    TORCH_CHECK(max_seqlen_q >= 1 || q_idx.size(0) == 0, "max_seqlen_q must be >= 1 (the longest query sequence)");
  }
  check_sm90(q_idx);

  std::vector<int64_t> out_shape(q_idx.sizes().begin(), q_idx.sizes().end() - 1);
  out_shape.push_back(topk);
  // Varlen rows are only reached through max_seqlen_q and cu_seqlens_q, which are trusted here
  // (checked on the host by the Python layer); start from -1 so a wrong value cannot leave
  // uninitialized ids behind.
  at::Tensor out = varlen ? at::full(out_shape, -1, q_idx.options().dtype(at::kInt))
                          : at::empty(out_shape, q_idx.options().dtype(at::kInt));
  if (out.numel() == 0 || batch == 0) return out;

  c10::cuda::CUDAGuard guard(q_idx.device());
  SelectParams p;
  p.q_idx = q_idx.data_ptr();
  p.k_idx = k_idx.data_ptr();
  p.block_indices = out.data_ptr<int32_t>();
  p.cu_seqlens_q = varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype;
  p.total_q_rows = total_q_rows;
  p.total_k = total_k;
  p.batch = static_cast<int>(batch);
  p.seqlen_q = varlen ? 0 : static_cast<int>(q_idx.size(1));
  p.seqlen_k = varlen ? 0 : static_cast<int>(k_idx.size(1));
  p.max_seqlen_q = varlen ? static_cast<int>(max_seqlen_q) : p.seqlen_q;
  TORCH_CHECK(p.max_seqlen_q >= 0, "max_seqlen_q must be >= 0");
  p.num_idx_heads = static_cast<int>(num_heads);
  p.head_dim_idx = static_cast<int>(di);
  p.block_size = static_cast<int>(block_size);
  p.topk = static_cast<int>(topk);
  p.init_blocks = static_cast<int>(init_blocks);
  p.local_blocks = static_cast<int>(local_blocks);
  check_launch(run_select(p, c10::cuda::getCurrentCUDAStream()), "msa_cuda select_blocks kernel");
  return out;
}

// block_indices int32 [B, Sq, Hkv, topk] (padded; seqlen_k = Sk) or [Tq, Hkv, topk] (varlen).
// Returns int32 [2] on the device: (some id out of range, some row repeats an id), 0 or 1 each.
at::Tensor check_block_indices_cuda(const at::Tensor& block_indices, const c10::optional<at::Tensor>& cu_seqlens_q,
                                    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t seqlen_k,
                                    int64_t block_size) {
  check_cuda_contiguous(block_indices, "block_indices");
  TORCH_CHECK_TYPE(block_indices.scalar_type() == at::kInt, "block_indices must be int32");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  TORCH_CHECK(block_indices.dim() == (varlen ? 3 : 4), "block_indices must be ",
              varlen ? "[Tq, Hkv, topk]" : "[B, Sq, Hkv, topk]");
  const int64_t topk = block_indices.size(-1);
  TORCH_CHECK(topk >= 1 && topk <= 32, "topk must be in [1, 32]");
  TORCH_CHECK(block_size >= 1, "block_size must be positive");
  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : block_indices.size(0);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, block_indices);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, block_indices);
  TORCH_CHECK(varlen || (seqlen_k >= 0 && seqlen_k < (int64_t{1} << 31)), "seqlen_k must be in [0, 2^31)");
  at::Tensor flags = at::zeros({2}, block_indices.options());
  if (block_indices.numel() == 0 || batch == 0) return flags;
  c10::cuda::CUDAGuard guard(block_indices.device());
  CheckSelectionParams p;
  p.block_indices = block_indices.data_ptr<int32_t>();
  p.cu_seqlens_q = varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  p.flags = flags.data_ptr<int32_t>();
  p.num_heads_kv = static_cast<int>(block_indices.size(-2));
  p.total_q = block_indices.numel() / (topk * p.num_heads_kv);
  p.batch = static_cast<int>(batch);
  p.seqlen_q = varlen ? 0 : static_cast<int>(block_indices.size(1));
  p.seqlen_k = varlen ? 0 : static_cast<int>(seqlen_k);
  p.topk = static_cast<int>(topk);
  p.block_size = static_cast<int>(block_size);
  check_launch(run_check_selection(p, c10::cuda::getCurrentCUDAStream()), "msa_cuda check_block_indices kernel");
  return flags;
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("select_blocks", &msa::bindings::select_blocks_cuda);
  m.impl("check_block_indices", &msa::bindings::check_block_indices_cuda);
}
