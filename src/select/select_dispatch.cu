// Runtime dispatch of the selector over (dtype, Di). The instantiations live in one file each so
// they compile in parallel.
#include <cutlass/numeric_types.h>

#include "msa/msa.h"

namespace msa {
namespace select {
template <class Element, int kHeadDimIdx>
cudaError_t run_select_for(const SelectParams& p, cudaStream_t stream);
}  // namespace select

bool select_is_supported(int head_dim_idx, int topk) {
  return (head_dim_idx == 64 || head_dim_idx == 128) && topk >= 1 && topk <= 32;
}

const char* select_compiled_variants() {
  return "dtype={bf16,fp16} Di={64,128} block_size={64,128} topk=1..32";
}

cudaError_t run_select(const SelectParams& p, cudaStream_t stream) {
  if (!select_is_supported(p.head_dim_idx, p.topk)) {
    return cudaErrorInvalidValue;
  }
  const bool bf16 = p.dtype == DType::kBF16;
  if (p.head_dim_idx == 128) {
    return bf16 ? select::run_select_for<cutlass::bfloat16_t, 128>(p, stream)
                : select::run_select_for<cutlass::half_t, 128>(p, stream);
  }
  return bf16 ? select::run_select_for<cutlass::bfloat16_t, 64>(p, stream)
              : select::run_select_for<cutlass::half_t, 64>(p, stream);
}

}  // namespace msa
