// A linear for a few rows on the CPU: y = x W^T with x [M, K] (M small: decode's batch, the
// lm_head's sampled rows) and W [N, K] dense. At such M the matmul only streams W once; this
// streams it row by row (cpu_vec.h), split over torch's threads by blocks of rows.
//
//   expertmesh::linear_small(x [M, K], w [N, K]) -> [M, N] (x's dtype; fp32 accumulation)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_vec.h"

namespace {

using namespace expertmesh_cpu;

constexpr int64_t BLOCK = 256;  // weight rows per task

template <typename T>
void linear_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* X = x.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * BLOCK);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * BLOCK, nr = std::min(BLOCK, N - n0);
      matmul_small(W + n0 * K, K, nr, X, K, M, acc.data(), BLOCK);
      for (int64_t j = 0; j < M; ++j)
        for (int64_t n = 0; n < nr; ++n) O[j * N + n0 + n] = static_cast<T>(acc[j * BLOCK + n]);
    }
  });
}

at::Tensor linear_small(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_small: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_small: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_small: x and w share one dtype");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.size(0) == 0 || w.size(0) == 0) return out;
  if (x.scalar_type() == at::kFloat)
    linear_impl<float>(xc, wc, out);
  else if (x.scalar_type() == at::kBFloat16)
    linear_impl<bf16>(xc, wc, out);
  else
    TORCH_CHECK(false, "linear_small: float32 or bfloat16, not ", x.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) { m.def("linear_small(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("linear_small", &linear_small); }
