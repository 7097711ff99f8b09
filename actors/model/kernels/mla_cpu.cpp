// Absorbed MLA decode on the CPU: each sequence's new token attends over its cached latents where
// they lie in the KV cache. The torch path gathers every context into a padded [B, L, D] copy,
// then runs bf16 bmm's whose set-up (~350 us each here) dwarfs their arithmetic; here each task
// (one sequence, up to four heads) reads its context rows by slot, once per pass, on torch's
// thread pool.
//
//   expertmesh::mla_decode(q [B, H, D], cache [S, D], shared [P], slots [B, L], lens [B],
//                          scale, rank) -> out [B, H, rank]
//
// q is [q_lat | q_rot] per head (D = kv_lora_rank + rope); cache is one layer's joint latent|k_pe
// rows; sequence b's context is shared (slots every row starts with, may be empty) followed by
// slots[b, :lens[b]]. out[b, h] = softmax(scale * q[b, h] . ctx) . ctx[:, :rank]. fp32 softmax and
// accumulation; in bf16 the scores, the scaled scores, the probabilities and the output are
// rounded where the reference's bf16 ops round them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_vec.h"

namespace {

using namespace expertmesh_cpu;

constexpr int HEADS = 4;  // heads per task: their queries stay in L1 while context rows stream past

// acc[j][c0 : c0 + CV * VL] += p[j][l] * row_l[c0 : ...] over all l, for M heads
template <int CV, int M, typename T>
inline void weighted_rows(const T* const* rows, int64_t n, const float* p, int64_t ldp, int64_t c0, float* out,
                          int64_t ldo) {
  vec acc[M][CV];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < CV; ++v) acc[j][v] = vzero();
  for (int64_t l = 0; l < n; ++l) {
    vec r[CV];
    for (int v = 0; v < CV; ++v) r[v] = vload(rows[l] + c0 + v * VL);
    for (int j = 0; j < M; ++j) {
      vec pj = vset1(p[j * ldp + l]);
      for (int v = 0; v < CV; ++v) acc[j][v] = vfma(pj, r[v], acc[j][v]);
    }
  }
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < CV; ++v) vstore(out + j * ldo + c0 + v * VL, acc[j][v]);
}

template <int M, typename T>
inline void weighted_sum(const T* const* rows, int64_t n, const float* p, int64_t ldp, int64_t rank, float* out,
                         int64_t ldo) {
  int64_t c = 0;
  for (; c + 4 * VL <= rank; c += 4 * VL) weighted_rows<4, M>(rows, n, p, ldp, c, out, ldo);
  for (; c + VL <= rank; c += VL) weighted_rows<1, M>(rows, n, p, ldp, c, out, ldo);
  for (; c < rank; ++c)
    for (int j = 0; j < M; ++j) {
      float s = 0.f;
      for (int64_t l = 0; l < n; ++l) s += p[j * ldp + l] * widen(rows[l][c]);
      out[j * ldo + c] = s;
    }
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                 const at::Tensor& lens, double scale, int64_t rank, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), P = shared.numel(), L = slots.size(1);
  const T* C = cache.data_ptr<T>();
  const int64_t* SH = shared.data_ptr<int64_t>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  at::Tensor qc = q.contiguous();
  const T* Q = qc.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t hb = (H + HEADS - 1) / HEADS;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * hb, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows;
    std::vector<float> p, acc(HEADS * rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / hb, h0 = (t % hb) * HEADS, m = std::min<int64_t>(HEADS, H - h0), n = P + LN[b];
      rows.resize(n);
      for (int64_t l = 0; l < P; ++l) rows[l] = C + SH[l] * D;
      for (int64_t l = 0; l < LN[b]; ++l) rows[P + l] = C + SL[b * L + l] * D;
      p.assign(HEADS * n, 0.f);
      const T* qb = Q + (b * H + h0) * D;
      // scores: one row of context against the m heads' queries
      for (int64_t l = 0; l < n; ++l) dot_row(rows[l], qb, D, D, m, p.data() + l, n);
      for (int64_t j = 0; j < m; ++j) {  // softmax in fp32 over the scaled (and, in bf16, rounded) scores
        float* pj = p.data() + j * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          pj[i] = round_as<T>(round_as<T>(pj[i]) * sc);
          mx = std::max(mx, pj[i]);
        }
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          pj[i] = std::exp(pj[i] - mx);
          sum += pj[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) pj[i] = round_as<T>(pj[i] * inv);
      }
      switch (m) {
        case 1: weighted_sum<1>(rows.data(), n, p.data(), n, rank, acc.data(), rank); break;
        case 2: weighted_sum<2>(rows.data(), n, p.data(), n, rank, acc.data(), rank); break;
        case 3: weighted_sum<3>(rows.data(), n, p.data(), n, rank, acc.data(), rank); break;
        default: weighted_sum<4>(rows.data(), n, p.data(), n, rank, acc.data(), rank); break;
      }
      for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < rank; ++c) O[(b * H + h0 + j) * rank + c] = static_cast<T>(acc[j * rank + c]);
    }
  });
}

at::Tensor mla_decode(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                      const at::Tensor& lens, double scale, int64_t rank) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "mla_decode: CPU tensors");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 2 && slots.dim() == 2 && lens.dim() == 1 && shared.dim() == 1,
              "mla_decode: q [B, H, D], cache [S, D], shared [P], slots [B, L], lens [B]");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "mla_decode: q and cache share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "mla_decode: float32 or bfloat16, not ", q.scalar_type());
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && shared.scalar_type() == at::kLong,
              "mla_decode: slots, lens and shared are int64");
  const int64_t B = q.size(0), D = q.size(2), S = cache.size(0);
  TORCH_CHECK(cache.size(1) == D && cache.stride(1) == 1 && cache.stride(0) == D,
              "mla_decode: cache rows are contiguous [S, D] with D = q.size(2)");
  TORCH_CHECK(slots.size(0) == B && lens.size(0) == B, "mla_decode: one slots row and one length per sequence");
  TORCH_CHECK(rank > 0 && rank <= D, "mla_decode: 0 < rank <= D");
  at::Tensor sh = shared.contiguous(), sl = slots.contiguous(), ln = lens.contiguous();
  const int64_t* L = ln.data_ptr<int64_t>();
  const int64_t W = sl.size(1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(L[b] >= 0 && L[b] <= W, "mla_decode: lens[", b, "] = ", L[b], " outside [0, ", W, "]");
    TORCH_CHECK(L[b] + sh.numel() > 0, "mla_decode: sequence ", b, " has no context");
    const int64_t* row = sl.data_ptr<int64_t>() + b * W;
    for (int64_t l = 0; l < L[b]; ++l)
      TORCH_CHECK(row[l] >= 0 && row[l] < S, "mla_decode: slot ", row[l], " outside the cache's ", S);
  }
  const int64_t* P = sh.data_ptr<int64_t>();
  for (int64_t l = 0; l < sh.numel(); ++l)
    TORCH_CHECK(P[l] >= 0 && P[l] < S, "mla_decode: shared slot ", P[l], " outside the cache's ", S);
  at::Tensor out = at::empty({B, q.size(1), rank}, q.options());
  if (B == 0) return out;
  if (q.scalar_type() == at::kFloat)
    decode_impl<float>(q, cache, sh, sl, ln, scale, rank, out);
  else
    decode_impl<bf16>(q, cache, sh, sl, ln, scale, rank, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("mla_decode(Tensor q, Tensor cache, Tensor shared, Tensor slots, Tensor lens, float scale, int rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("mla_decode", &mla_decode); }
