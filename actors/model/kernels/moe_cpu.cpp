// Routed experts on the CPU, for the decode regime: each expert sees a handful of tokens, so its
// FFN is bound by reading its weights, not by arithmetic. oneDNN's matmul pays ~100 us of set-up
// per call; here one call walks every active expert's gate/up rows and then its down rows once
// each, with that expert's tokens (4 at a time) in registers, on torch's thread pool
// (at::parallel_for honours torch.set_num_threads).
//
//   expertmesh::grouped_ffn(xs [N, H], w13 [E, 2I, H], w2 [E, H, I], counts [E]) -> [N, H]
//   expertmesh::combine(outs [T * k, H], order [T * k], weights [T, k]) -> [T, H] fp32
//
// xs rows are sorted by expert (counts[e] rows for expert e, as experts.permute_by_expert orders
// them); the output rows are the FFN outputs in the same order. Weights and xs are float32 or
// bfloat16 (the same dtype); products accumulate in fp32. In bf16 every intermediate is rounded
// the way the reference's bf16 ops round it (gate and up after their matmul, silu, the product,
// the output), so only the order of each dot product's additions differs from F.linear's.
// Experts with more than `max_rows` tokens (a prefill) go through at::linear, where oneDNN's
// blocking wins.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_vec.h"

namespace {

using namespace expertmesh_cpu;

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

constexpr int64_t ROW_BLOCK = 32;  // weight rows per task: gate/up rows of phase 1, down rows of phase 2

template <typename T>
at::Tensor grouped_ffn_impl(const at::Tensor& xs, const at::Tensor& w13, const at::Tensor& w2,
                            const std::vector<int64_t>& counts, int64_t max_rows) {
  const int64_t N = xs.size(0), H = xs.size(1), I = w2.size(2), E = w13.size(0);
  at::Tensor out = at::empty_like(xs);
  if (N == 0) return out;
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];

  std::vector<int64_t> small;  // experts for the kernel below; the rest go through at::linear
  int64_t widest = 0;          // most rows of one of them
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = counts[e];
    if (m == 0) continue;
    if (m <= max_rows) {
      small.push_back(e);
      widest = std::max(widest, m);
      continue;
    }
    at::Tensor rows = xs.narrow(0, start[e], m);
    auto gu = at::linear(rows, w13[e]).chunk(2, -1);
    out.narrow(0, start[e], m).copy_(at::linear(at::silu(gu[0]) * gu[1], w2[e]));
  }
  if (small.empty()) return out;

  const T* W13 = w13.data_ptr<T>();
  const T* W2 = w2.data_ptr<T>();
  T* O = out.data_ptr<T>();
  // the FFN's hidden rows, in T: each value is rounded to T anyway (silu(gate) * up, as the
  // reference's bf16 ops give it), so phase 2 reads them as bf16 pairs where the CPU has them
  at::Tensor act = at::empty({N, I}, xs.options());
  const T* X = xs.data_ptr<T>();
  T* A = act.data_ptr<T>();
  const int64_t nb1 = (I + ROW_BLOCK - 1) / ROW_BLOCK, nb2 = (H + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t S = static_cast<int64_t>(small.size());

  // phase 1: act = silu(x W1^T) * (x W3^T), one task per (expert, block of intermediate columns)
  at::parallel_for(0, S * nb1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(widest * ROW_BLOCK), up(widest * ROW_BLOCK);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = small[t / nb1], n0 = (t % nb1) * ROW_BLOCK, nr = std::min(ROW_BLOCK, I - n0);
      const int64_t s = start[e], m = counts[e];
      const T* we = W13 + e * 2 * I * H;
      matmul_small(we + n0 * H, H, nr, X + s * H, H, m, gate.data(), ROW_BLOCK);
      matmul_small(we + (I + n0) * H, H, nr, X + s * H, H, m, up.data(), ROW_BLOCK);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t n = 0; n < nr; ++n) {
          const float g = round_as<T>(gate[j * ROW_BLOCK + n]), u = round_as<T>(up[j * ROW_BLOCK + n]);
          A[(s + j) * I + n0 + n] = static_cast<T>(round_as<T>(silu(g)) * u);
        }
    }
  });
  // phase 2: out = act W2^T, one task per (expert, block of hidden columns): tasks write disjoint cells
  at::parallel_for(0, S * nb2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(widest * ROW_BLOCK);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = small[t / nb2], h0 = (t % nb2) * ROW_BLOCK, hr = std::min(ROW_BLOCK, H - h0);
      const int64_t s = start[e], m = counts[e];
      matmul_small(W2 + e * H * I + h0 * I, I, hr, A + s * I, I, m, acc.data(), ROW_BLOCK);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t h = 0; h < hr; ++h) O[(s + j) * H + h0 + h] = static_cast<T>(acc[j * ROW_BLOCK + h]);
    }
  });
  return out;
}

at::Tensor grouped_ffn(const at::Tensor& xs, const at::Tensor& w13, const at::Tensor& w2, at::IntArrayRef counts,
                       int64_t max_rows) {
  TORCH_CHECK(xs.device().is_cpu() && w13.device().is_cpu() && w2.device().is_cpu(), "grouped_ffn: CPU tensors");
  TORCH_CHECK(xs.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, "grouped_ffn: xs [N, H], w13 [E, 2I, H], w2 [E, H, I]");
  TORCH_CHECK(xs.scalar_type() == w13.scalar_type() && w13.scalar_type() == w2.scalar_type(),
              "grouped_ffn: xs, w13 and w2 share one dtype");
  const int64_t E = w13.size(0), H = xs.size(1), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H,
              "grouped_ffn: shapes disagree");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "grouped_ffn: one count per expert");
  TORCH_CHECK(max_rows >= 0, "grouped_ffn: max_rows >= 0");
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "grouped_ffn: counts are non-negative");
    total += c;
  }
  TORCH_CHECK(total == xs.size(0), "grouped_ffn: counts sum to xs.size(0)");
  std::vector<int64_t> cs(counts.begin(), counts.end());
  at::Tensor x = xs.contiguous(), a = w13.contiguous(), b = w2.contiguous();
  if (x.scalar_type() == at::kFloat) return grouped_ffn_impl<float>(x, a, b, cs, max_rows);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "grouped_ffn: float32 or bfloat16, not ", x.scalar_type());
  return grouped_ffn_impl<bf16>(x, a, b, cs, max_rows);
}

// out[t] = sum over t's k chosen experts of weight * that expert's output row, in fp32, adding the
// rows in the order `order` lists them (ascending expert, as the reference sums): bitwise what
// experts.combine's multiply + index_add_ gives, without its [T * k, H] fp32 temporaries (at a
// 2048-token prefill those two passes cost ~17 ms per MoE layer here).
template <typename T>
void combine_impl(const at::Tensor& outs, const at::Tensor& order, const at::Tensor& weights, at::Tensor& out) {
  const int64_t N = outs.size(0), H = outs.size(1), K = weights.size(1), tokens = weights.size(0);
  const T* Y = outs.data_ptr<T>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const float* Wt = weights.data_ptr<float>();
  float* O = out.data_ptr<float>();
  std::vector<int64_t> pos(N);  // flat (token, slot) pair -> its row in outs
  for (int64_t i = 0; i < N; ++i) pos[ord[i]] = i;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(K);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < K; ++j) rows[j] = pos[t * K + j];
      std::sort(rows.begin(), rows.end());
      float* o = O + t * H;
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = rows[j];
        const float w = Wt[ord[i]];
        const T* y = Y + i * H;
        for (int64_t h = 0; h < H; ++h) o[h] += static_cast<float>(y[h]) * w;
      }
    }
  });
}

at::Tensor combine(const at::Tensor& outs, const at::Tensor& order, const at::Tensor& weights) {
  TORCH_CHECK(outs.device().is_cpu() && order.device().is_cpu() && weights.device().is_cpu(), "combine: CPU tensors");
  TORCH_CHECK(outs.dim() == 2 && order.dim() == 1 && weights.dim() == 2, "combine: outs [T*k, H], order [T*k], weights [T, k]");
  TORCH_CHECK(order.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "combine: order int64, weights float32");
  TORCH_CHECK(outs.size(0) == order.size(0) && order.size(0) == weights.numel(), "combine: one row per (token, expert)");
  at::Tensor ord = order.contiguous(), wt = weights.contiguous(), ys = outs.contiguous();
  const int64_t N = ord.numel();
  const int64_t* o = ord.data_ptr<int64_t>();
  std::vector<char> seen(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(o[i] >= 0 && o[i] < N && !seen[o[i]], "combine: order is not a permutation of [0, T*k)");
    seen[o[i]] = 1;
  }
  at::Tensor out = at::empty({weights.size(0), outs.size(1)}, outs.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.zero_();
  if (ys.scalar_type() == at::kFloat)
    combine_impl<float>(ys, ord, wt, out);
  else if (ys.scalar_type() == at::kBFloat16)
    combine_impl<bf16>(ys, ord, wt, out);
  else
    TORCH_CHECK(false, "combine: float32 or bfloat16 rows, not ", ys.scalar_type());
  return out;
}

// Which vector width this build runs: 16 (AVX-512), 8 (AVX2 + FMA) or 1 (scalar).
int64_t vector_width() { return VL; }

}  // namespace

TORCH_LIBRARY(expertmesh, m) {
  m.def("grouped_ffn(Tensor xs, Tensor w13, Tensor w2, int[] counts, int max_rows) -> Tensor");
  m.def("combine(Tensor outs, Tensor order, Tensor weights) -> Tensor");
  m.def("vector_width() -> int", &vector_width);
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("grouped_ffn", &grouped_ffn);
  m.impl("combine", &combine);
}
