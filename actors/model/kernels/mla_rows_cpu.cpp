// MLA's per-row steps around its projections, in one call each instead of the ~10 torch-level calls
// they took per layer (each ~10-20 us at decode sizes with the weights cold: the rows' arithmetic
// is microseconds, the calls were most of a batch-1 layer's attention time).
//
//   expertmesh::mla_kv_write(kv_a [T, rank + rope] (rows may be strided), norm_w [rank], eps,
//                            cos [T, rope/2], sin, cache [S, rank + rope] (one layer), slots [T],
//                            interleave) -> nothing
//     cache[slots[t]] = [rms_norm(kv_a[t, :rank]) | rope(kv_a[t, rank:])]: the latent and the
//     rotated k_pe written where the KV cache keeps them (kv_a_layernorm, rotate_tail, kv.write)
//   expertmesh::mla_query(q_a [T, q_lora] (rows may be strided), norm_w [q_lora], eps,
//                         q_b (pack_pairs of [H (nope + rope), q_lora]), cos, sin,
//                         w_uk [H, nope, rank], interleave) -> [T, H, rank + rope]
//     the absorbed query: q = q_b(rms_norm(q_a)); per head [q_nope . W_UK | rope(q_rot)]
//     (q_a_layernorm, q_b_proj, rotate_tail, attention._query_latent)
//   expertmesh::mla_attention(x [T, hidden], qkv_a (pack_pairs of [q_lora + rank + rope, hidden]),
//                             q_lora, kv_norm_w, kv_eps, q_norm_w, q_eps, q_b, cos, sin, w_uk,
//                             w_uv_t [H, rank, v], cache, out_slots, shared, slots, seq, lens, scale,
//                             o_proj (pack_pairs of [n_out, H v]), n_out, interleave,
//                             norm_w?, norm_eps) -> [T, n_out]
//     the whole absorbed attention block: qkv_a, mla_kv_write, mla_query, mla_attend (its plan:
//     shared, slots, seq, lens), the per-head W_UV, o_proj -- the ops MLAttention chains, called
//     here through the dispatcher: at one token a layer's ~20 torch-level calls and views around
//     them cost ~90 us of Python with the caches cold, the arithmetic ~80 us. With norm_w (the
//     layer's input RMSNorm) the decoder layer's residual block: x + attention(rms_norm(x)).
//
// bf16 only, with rows.h's steps: bitwise the separate kernels' outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu_vec.h"
#include "ops.h"
#include "rows.h"

namespace {

using namespace expertmesh_cpu;

void check_rope(const at::Tensor& cos, const at::Tensor& sin, int64_t T, int64_t rope) {
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) == T && cos.size(1) * 2 == rope &&
                  cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              "mla rows: cos/sin [T, rope / 2] bfloat16");
}

void mla_kv_write(const at::Tensor& kv_a, const at::Tensor& norm_w, double eps, const at::Tensor& cos,
                  const at::Tensor& sin, const at::Tensor& cache, const at::Tensor& slots, bool interleave) {
  TORCH_CHECK(kv_a.device().is_cpu() && cache.device().is_cpu() && slots.device().is_cpu(), "mla_kv_write: CPU tensors");
  TORCH_CHECK(kv_a.scalar_type() == at::kBFloat16 && cache.scalar_type() == at::kBFloat16 &&
                  norm_w.scalar_type() == at::kBFloat16 && slots.scalar_type() == at::kLong,
              "mla_kv_write: kv_a, norm_w and cache bfloat16, slots int64");
  TORCH_CHECK(kv_a.dim() == 2 && kv_a.stride(1) == 1 && cache.dim() == 2 && cache.is_contiguous() &&
                  cache.size(1) == kv_a.size(1) && slots.dim() == 1 && slots.size(0) == kv_a.size(0),
              "mla_kv_write: kv_a [T, D] (unit column stride), cache [S, D] contiguous, slots [T]");
  const int64_t T = kv_a.size(0), D = kv_a.size(1), rank = norm_w.numel(), rope = D - rank, S = cache.size(0);
  TORCH_CHECK(rank > 0 && rope >= 0 && rope % 2 == 0, "mla_kv_write: norm_w covers the latent, the rest (even) rotates");
  check_rope(cos, sin, T, rope);
  at::Tensor sl = slots.contiguous(), w = norm_w.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  const int64_t* SL = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(SL[t] >= 0 && SL[t] < S, "mla_kv_write: slot ", SL[t], " outside the cache's ", S);
  const bf16* X = kv_a.data_ptr<bf16>();
  const bf16* W = w.data_ptr<bf16>();
  const bf16* C = c.data_ptr<bf16>();
  const bf16* Sn = s.data_ptr<bf16>();
  bf16* K = cache.data_ptr<bf16>();
  const int64_t ld = kv_a.stride(0), half = rope / 2;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* row = X + t * ld;
      bf16* dst = K + SL[t] * D;
      rms_norm_row(row, W, rank, e, dst);
      rope_row(row + rank, C + t * half, Sn + t * half, half, interleave, dst + rank);
    }
  });
}

at::Tensor mla_query(const at::Tensor& q_a, const at::Tensor& norm_w, double eps, const at::Tensor& q_b,
                     const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& w_uk, bool interleave) {
  TORCH_CHECK(q_a.device().is_cpu() && w_uk.device().is_cpu(), "mla_query: CPU tensors");
  TORCH_CHECK(q_a.scalar_type() == at::kBFloat16 && norm_w.scalar_type() == at::kBFloat16 &&
                  w_uk.scalar_type() == at::kBFloat16,
              "mla_query: bfloat16");
  TORCH_CHECK(q_a.dim() == 2 && q_a.stride(1) == 1 && norm_w.numel() == q_a.size(1) && w_uk.dim() == 3,
              "mla_query: q_a [T, q_lora] (unit column stride), norm_w [q_lora], w_uk [H, nope, rank]");
  const int64_t T = q_a.size(0), L = q_a.size(1), H = w_uk.size(0), nope = w_uk.size(1), rank = w_uk.size(2);
  const int64_t rope = cos.size(1) * 2, qk = nope + rope;
  check_rope(cos, sin, T, rope);
  // q = q_b(rms_norm(q_a)) through linear_packed (linear_cpu.cpp), called in C++: no Python between
  at::Tensor w = norm_w.contiguous();
  at::Tensor qn = at::empty({T, L}, q_a.options());
  const bf16* QA = q_a.data_ptr<bf16>();
  bf16* QN = qn.data_ptr<bf16>();
  const int64_t lda = q_a.stride(0);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rms_norm_row(QA + t * lda, w.data_ptr<bf16>(), L, e, QN + t * L);
  });
  const at::Tensor q = ops::linear_packed().call(qn, q_b, H * qk);  // [T, H * qk]
  at::Tensor out = at::empty({T, H, rank + rope}, q_a.options());
  at::Tensor wk = w_uk.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  const bf16* Q = q.data_ptr<bf16>();
  const bf16* WK = wk.data_ptr<bf16>();
  const bf16* C = c.data_ptr<bf16>();
  const bf16* Sn = s.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  const int64_t half = rope / 2;
  at::parallel_for(0, T * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(rank);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const bf16* qr = Q + (t * H + h) * qk;
      bf16* o = O + r * (rank + rope);
      bmm_row(qr, 1, WK + h * nope * rank, nope, rank, acc.data(), o);  // q_nope . W_UK
      rope_row(qr + nope, C + t * half, Sn + t * half, half, interleave, o + rank);
    }
  });
  return out;
}

at::Tensor mla_attention(const at::Tensor& x, const at::Tensor& qkv_a, int64_t q_lora, const at::Tensor& kv_norm_w,
                         double kv_eps, const at::Tensor& q_norm_w, double q_eps, const at::Tensor& q_b,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& w_uk, const at::Tensor& w_uv_t,
                         const at::Tensor& cache, const at::Tensor& out_slots, const at::Tensor& shared,
                         const at::Tensor& slots, const at::Tensor& seq, const at::Tensor& lens, double scale,
                         const at::Tensor& o_proj, int64_t n_out, bool interleave,
                         const std::optional<at::Tensor>& norm_w, double norm_eps) {
  TORCH_CHECK(x.dim() == 2 && w_uv_t.dim() == 3 && w_uk.dim() == 3 && w_uv_t.size(0) == w_uk.size(0) &&
                  w_uv_t.size(1) == kv_norm_w.numel() && q_lora > 0,
              "mla_attention: x [T, hidden], w_uk [H, nope, rank], w_uv_t [H, rank, v], q_lora > 0");
  const int64_t T = x.size(0), H = w_uv_t.size(0), rank = w_uv_t.size(1), v = w_uv_t.size(2);
  const int64_t rope = cos.dim() == 2 ? cos.size(1) * 2 : 0;
  const at::Tensor h = norm_w.has_value() ? ops::rms_norm().call(x, *norm_w, norm_eps) : x;
  const at::Tensor a = ops::linear_packed().call(h, qkv_a, q_lora + rank + rope);  // [T, q_lora + rank + rope]
  mla_kv_write(a.narrow(1, q_lora, rank + rope), kv_norm_w, kv_eps, cos, sin, cache, out_slots, interleave);
  const at::Tensor q = mla_query(a.narrow(1, 0, q_lora), q_norm_w, q_eps, q_b, cos, sin, w_uk, interleave);
  const at::Tensor lat = ops::mla_attend().call(q, cache, shared, slots, seq, lens, scale, rank);  // [T, H, rank]
  const at::Tensor o = ops::bmm_small().call(lat.transpose(0, 1), w_uv_t).transpose(0, 1);  // [T, H, v]
  const at::Tensor out = ops::linear_packed().call(o.reshape({T, H * v}), o_proj, n_out);
  return norm_w.has_value() ? x + out : out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("mla_kv_write(Tensor kv_a, Tensor norm_w, float eps, Tensor cos, Tensor sin, Tensor(a!) cache, Tensor slots, "
        "bool interleave) -> ()");
  m.def("mla_query(Tensor q_a, Tensor norm_w, float eps, Tensor q_b, Tensor cos, Tensor sin, Tensor w_uk, "
        "bool interleave) -> Tensor");
  m.def("mla_attention(Tensor x, Tensor qkv_a, int q_lora, Tensor kv_norm_w, float kv_eps, Tensor q_norm_w, "
        "float q_eps, Tensor q_b, Tensor cos, Tensor sin, Tensor w_uk, Tensor w_uv_t, Tensor(a!) cache, "
        "Tensor out_slots, Tensor shared, Tensor slots, Tensor seq, Tensor lens, float scale, Tensor o_proj, "
        "int n_out, bool interleave, Tensor? norm_w=None, float norm_eps=1e-6) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("mla_kv_write", &mla_kv_write);
  m.impl("mla_query", &mla_query);
  m.impl("mla_attention", &mla_attention);
}
