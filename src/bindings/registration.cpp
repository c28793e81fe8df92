// The extension module msa_cuda._C: op schemas (namespace msa_cuda_kernels) and build metadata.
// The public, traceable ops (namespace msa_cuda) are defined in Python on top of these.
#include <Python.h>
#include <torch/library.h>

#include "msa/msa.h"

#ifndef MSA_CUTLASS_VERSION
#define MSA_CUTLASS_VERSION "unknown"
#endif

TORCH_LIBRARY(msa_cuda_kernels, m) {
  m.def(
      "select_blocks(Tensor q_idx, Tensor k_idx, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int block_size, int topk, int init_blocks, int local_blocks) -> Tensor");
  m.def(
      "check_block_indices(Tensor block_indices, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int seqlen_k, "
      "int block_size) -> Tensor");
  m.def(
      "block_sparse_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor block_indices, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_k, int block_size, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor block_indices, "
      "Tensor out, Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_k, int block_size, "
      "float softmax_scale, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def(
      "indexer_kl(Tensor q, Tensor k, Tensor q_idx, Tensor k_idx, Tensor block_indices, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_k, int block_size, float softmax_scale, "
      "float index_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "indexer_kl_dense(Tensor q, Tensor k, Tensor q_idx, Tensor k_idx, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int block_size, float softmax_scale, "
      "float index_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "decode_step(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor q_idx, Tensor(c!) k_idx_cache, "
      "Tensor(d!)? k_idx_scale_cache, Tensor cache_seqlens, Tensor? k, Tensor? v, Tensor? k_idx, Tensor? block_table, int block_size, int topk, "
      "float softmax_scale, int init_blocks, int local_blocks) -> (Tensor, Tensor, Tensor)");
}

namespace {

PyObject* compiled_variants(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s,s:s,s:s}", "select_blocks", msa::select_compiled_variants(), "block_sparse_attn",
                       "forward and backward: dtype={bf16,fp16} D={64,128} block_size={64,128} G={1,2,4,8,16} topk=1..32",
                       "indexer_kl_loss",
                       "selected support (dense=False) and dense warm-up (dense=True): dtype={bf16,fp16} D={64,128} "
                       "Di={64,128} block_size={64,128} G={1,2,4,8,16} topk=1..32 (selected support)",
                       "sparse_attn_with_kvcache",
                       "dtype={bf16,fp16} D={64,128} Di={64,128} block_size={64,128} G={1,2,4,8,16} topk=1..32 "
                       "S_new=1..16, contiguous or paged caches, index-key cache in q_idx's dtype or float8_e4m3fn");
}

PyObject* cutlass_version(PyObject*, PyObject*) { return PyUnicode_FromString(MSA_CUTLASS_VERSION); }

PyMethodDef methods[] = {
    {"compiled_variants", compiled_variants, METH_NOARGS, "Kernel variants compiled into this build, per op."},
    {"cutlass_version", cutlass_version, METH_NOARGS, "CUTLASS version the kernels were built against."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "msa_cuda compiled kernels (SM90).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
