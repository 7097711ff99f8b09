// Rotary embedding of the rope part of MLA's queries and keys on the CPU, in one pass instead of
// torch's ~8 ops per rotation (two strided slices, four products, a difference, a sum and a cat,
// twice a layer: ~0.2 ms of a ~7 ms batch-1 token of `small`).
//
//   expertmesh::rope_rows(x [T, H, D] (last dim contiguous), cos [T, R/2], sin [T, R/2], offset,
//                         interleave) -> [T, H, D] contiguous, R = D - offset
//
// out[..., :offset] = x[..., :offset]; the last R dims rotate as rope.RotaryEmbedding.rotate does
// (interleave: pairs (2i, 2i+1) rotate and come out de-interleaved), with its roundings: each
// product, the difference and the sum rounded to x's dtype (the reference's bf16 ops), so bf16
// and fp32 outputs are bitwise the torch path's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu_vec.h"
#include "rows.h"

namespace {

using namespace expertmesh_cpu;

template <typename T>
void rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t offset, bool interleave,
               at::Tensor& out) {
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2), half = (D - offset) / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const T* X = x.data_ptr<T>();
  const T* C = cos.data_ptr<T>();
  const T* S = sin.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, Tn * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const T* xr = X + t * s0 + h * s1;
      T* o = O + r * D;
      for (int64_t d = 0; d < offset; ++d) o[d] = xr[d];
      const T* xp = xr + offset;
      rope_row(xp, C + t * half, S + t * half, half, interleave, o + offset);
    }
  });
}

at::Tensor rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t offset,
                     bool interleave) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rope_rows: CPU tensors");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && sin.sizes() == cos.sizes(), "rope_rows: x [T, H, D], cos/sin [T, R/2]");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && cos.scalar_type() == sin.scalar_type(),
              "rope_rows: x, cos and sin share one dtype");
  TORCH_CHECK(offset >= 0 && offset <= x.size(2) && (x.size(2) - offset) % 2 == 0 &&
                  cos.size(0) == x.size(0) && cos.size(1) * 2 == x.size(2) - offset,
              "rope_rows: the last D - offset dims (even) rotate, cos/sin [T, (D - offset) / 2]");
  at::Tensor xs = x.stride(2) == 1 ? x : x.contiguous();
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    rope_impl<float>(xs, c, s, offset, interleave, out);
  else if (x.scalar_type() == at::kBFloat16)
    rope_impl<bf16>(xs, c, s, offset, interleave, out);
  else
    TORCH_CHECK(false, "rope_rows: float32 or bfloat16, not ", x.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("rope_rows(Tensor x, Tensor cos, Tensor sin, int offset, bool interleave) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("rope_rows", &rope_rows); }
