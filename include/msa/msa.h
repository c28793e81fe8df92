// Host entry points of msa_cuda's kernel families. Torch-free: the bindings fill a params struct
// and call one of these on the caller's stream.
#pragma once

#include <cuda_runtime.h>

#include "msa/params.h"

namespace msa {

// Runs the fused SM90 selector. Returns cudaSuccess or the first CUDA error met while
// configuring or launching; never synchronizes.
cudaError_t run_select(const SelectParams& params, cudaStream_t stream);

// Whether run_select has an instantiation for this (Di, topk); both dtypes are always built.
bool select_is_supported(int head_dim_idx, int topk);

// Human-readable list of the compiled selector variants, e.g. "bf16/di128/topk<=16".
const char* select_compiled_variants();

// Sets params.flags for a selection with out-of-range or repeated ids (one warp per row).
cudaError_t run_check_selection(const CheckSelectionParams& params, cudaStream_t stream);

// Block-sparse attention forward: query-outer for short contexts (one kernel), KV-outer otherwise
// (plan -> main -> combine, in query chunks); see FwdPath.
// `workspace` must hold fwd_workspace_bytes(params) bytes.
size_t fwd_workspace_bytes(const FwdParams& params);
cudaError_t run_fwd(const FwdParams& params, void* workspace, cudaStream_t stream);

// Block-sparse attention backward (KV-outer: plan (sorted when deterministic) -> one kernel
// accumulating dq per tile and dk, dv per run of same-block tiles with atomics, in fp32 or,
// deterministic, in 64-bit fixed point). `workspace` must hold bwd_workspace_bytes(params) bytes,
// 256-byte aligned (as torch allocations are).
size_t bwd_workspace_bytes(const BwdParams& params);
cudaError_t run_bwd(const BwdParams& params, void* workspace, cudaStream_t stream);

// The backward's per-row input: delta[r] = sum_d dout[r, d] out[r, d] - dlse[r] (dlse may be null),
// fp32, for rows = total_q x Hq rows of head_dim (64 or 128) elements.
cudaError_t run_bwd_delta(DType dtype, int head_dim, const void* dout, const void* out, const float* dlse,
                          float* delta, int64_t rows, cudaStream_t stream);

// Indexer distillation loss (two passes over the forward plan's lists with one row per token:
// the student's per-slot stats, then teacher + loss + gradients with fp32 atomics).
// `workspace` must hold kl_workspace_bytes(params) bytes.
size_t kl_workspace_bytes(const KlParams& params);
cudaError_t run_kl(const KlParams& params, void* workspace, cudaStream_t stream);

// The dense warm-up variant (support = the whole causal history; block_indices and topk unused):
// query-outer passes over TMA tiles, the student's per-chunk stats, then teacher + loss +
// gradients. `workspace` must hold kl_dense_workspace_bytes(params) bytes.
size_t kl_dense_workspace_bytes(const KlParams& params);
cudaError_t run_kl_dense(const KlParams& params, void* workspace, cudaStream_t stream);

// One decoding step over a KV cache (append -> split indexer + merge -> split sparse attention
// + combine), no host synchronization and a launch shape fixed by the shapes, so the step can
// be captured in a CUDA graph. `workspace` must hold decode_workspace_bytes(params) bytes.
bool decode_is_supported(const DecodeParams& params);
size_t decode_workspace_bytes(const DecodeParams& params);
cudaError_t run_decode(const DecodeParams& params, void* workspace, cudaStream_t stream);

}  // namespace msa
