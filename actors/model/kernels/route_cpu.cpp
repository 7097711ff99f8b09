// DeepSeek-V3's noaux_tc router in one call: torch spends ~20 small ops a MoE layer on it (fp32
// matmul, sigmoid, bias, group top-2 sums, group top-k, mask, top-k, gather, normalise, scale).
//
//   expertmesh::moe_gate(x [T, H] bf16, weight [E, H] fp32, bias [E] fp32, n_group, topk_group,
//                        top_k, normalize, scaling) -> (ids [T, top_k] int64, weights [T, top_k] fp32)
//
// Scores are the reference's sigmoid(fp32 x . W^T) (the dot's additions in another order).
//
// The selection is the reference's: the groups with the largest sums of their two best biased
// scores, then the top_k biased scores inside them; weights are the unbiased scores of the chosen
// experts, normalised over them (+ 1e-20) and scaled. Ids come in descending biased score (ties:
// lower id first); torch.topk(sorted=False) leaves its order unspecified, so a normalisation sum
// can differ from it in the last bit: the model uses this for bf16 only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu_vec.h"

namespace {

using namespace expertmesh_cpu;

std::tuple<at::Tensor, at::Tensor> moe_gate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            int64_t n_group, int64_t topk_group, int64_t top_k, bool normalize,
                                            double scaling) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && bias.device().is_cpu(), "moe_gate: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "moe_gate: x bfloat16, weight and bias float32");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && bias.dim() == 1 && weight.size(1) == x.size(1) &&
                  bias.size(0) == weight.size(0),
              "moe_gate: x [T, H], weight [E, H], bias [E]");
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  TORCH_CHECK(n_group > 0 && E % n_group == 0 && E / n_group >= 2, "moe_gate: E splits into groups of 2+");
  TORCH_CHECK(topk_group > 0 && topk_group <= n_group && top_k > 0 && top_k <= topk_group * (E / n_group),
              "moe_gate: 0 < topk_group <= n_group, 0 < top_k <= the experts of the kept groups");
  at::Tensor xc = x.contiguous(), w = weight.contiguous(), b = bias.contiguous();
  const bf16* X = xc.data_ptr<bf16>();
  const float* Wt = w.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  at::Tensor ids = at::empty({T, top_k}, w.options().dtype(at::kLong));
  at::Tensor weights = at::empty({T, top_k}, w.options());
  int64_t* I = ids.data_ptr<int64_t>();
  float* W = weights.data_ptr<float>();
  const int64_t per = E / n_group;
  const float neg = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(H), st(E), choice(E), group(n_group);
    std::vector<int64_t> order(std::max(E, n_group));
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < H; ++h) xf[h] = static_cast<float>(X[t * H + h]);
      for (int64_t e = 0; e < E; ++e) {  // fp32 logits as the reference's fp32 linear, then sigmoid
        dot_row(Wt + e * H, xf.data(), H, H, 1, st.data() + e, 1);
        st[e] = 1.f / (1.f + std::exp(-st[e]));
      }
      for (int64_t e = 0; e < E; ++e) choice[e] = st[e] + B[e];
      for (int64_t g = 0; g < n_group; ++g) {
        float a = neg, c = neg;  // the group's best two
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          if (choice[e] > a) {
            c = a;
            a = choice[e];
          } else if (choice[e] > c) {
            c = choice[e];
          }
        }
        group[g] = a + c;
      }
      std::iota(order.begin(), order.begin() + n_group, 0);
      std::partial_sort(order.begin(), order.begin() + topk_group, order.begin() + n_group,
                        [&](int64_t x, int64_t y) { return group[x] > group[y] || (group[x] == group[y] && x < y); });
      std::vector<char> kept(n_group, 0);
      for (int64_t j = 0; j < topk_group; ++j) kept[order[j]] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!kept[e / per]) choice[e] = neg;
      std::iota(order.begin(), order.begin() + E, 0);
      std::partial_sort(order.begin(), order.begin() + top_k, order.begin() + E,
                        [&](int64_t x, int64_t y) { return choice[x] > choice[y] || (choice[x] == choice[y] && x < y); });
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) sum += st[order[j]];
      const float denom = sum + 1e-20f;
      for (int64_t j = 0; j < top_k; ++j) {
        I[t * top_k + j] = order[j];
        W[t * top_k + j] = (normalize ? st[order[j]] / denom : st[order[j]]) * static_cast<float>(scaling);
      }
    }
  });
  return {ids, weights};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("moe_gate(Tensor x, Tensor weight, Tensor bias, int n_group, int topk_group, int top_k, bool normalize, "
        "float scaling) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("moe_gate", &moe_gate);
}
