// Greedy tokens without the whole bf16 lm_head: at a few rows the head is bound by reading its
// weights (129280 x 512 bf16 = 132 MB per step for `small`, a third of a batch-1 token), yet greedy
// decoding needs one index per row. An int8 copy of the head (half the bytes) gives every logit to
// within a bound; only the logits whose bound reaches the best lower bound are computed again
// from the bf16 weights, and the argmax is taken over those. Same token as the bf16 head's argmax
// (up to the fp32 order of a dot product's additions, as any two bf16 matmuls differ).
//
//   expertmesh::head_screen_argmax(x [M, K] bf16, wp [NB, K/2, 16, 2] bf16 (pack_pairs), n_out,
//                                  w8 [NB, K, 16] int8, scale [NB * 16], err [NB * 16] fp32,
//                                  max_candidates) -> [M] int64
//
// Row n of the head is W[n] ~ scale[n] * w8[n] with |W[n, k] - scale[n] * w8[n, k]| <= e_n, and
// err[n] = e_n + (2K + 16) 2^-24 max_k |W[n, k]| also covers both fp32 sums' rounding. So with
// S = sum_k |x_k|, the recomputed logit lies in approx_n +- err[n] S. L = max_n (approx_n -
// err[n] S) is below the winner's logit, and bf16 rounding is monotone: a row can only win if
// approx_n + err[n] S >= L - one bf16 ulp of L. Candidates are recomputed in ascending n and the
// first maximum wins, as torch.argmax picks it. A row with more than max_candidates (a flat
// distribution) or a non-finite input returns -1: the caller computes its logits in full.
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

constexpr int64_t RT = 4;  // rows per tile: each widened weight vector meets RT broadcast inputs

// acc[v * R + j] = sum_k w8[k][v * VL + lane] * x[j][k] over one block of 16 outputs. At one or
// two rows, U interleaved accumulator sets over k keep enough FMA chains in flight (one chain per
// accumulator would wait on the FMA latency: 4.2 ms for `small`'s head at one row, not 2.3).
template <int R>
inline void screen_tile(const int8_t* w, const float* x, int64_t K, vec* acc) {
  constexpr int NV = 16 / VL, U = R == 1 ? 4 : R == 2 ? 2 : 1;
  vec a[U][NV][R];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v)
      for (int j = 0; j < R; ++j) a[u][v][j] = vzero();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    prefetch(w + (k + 256) * 16, 16 * U);  // 4 KB ahead in the stream
    for (int u = 0; u < U; ++u) {
      vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = vload_i8(w + (k + u) * 16 + v * VL);
      for (int j = 0; j < R; ++j) {
        const vec xb = vset1(x[j * K + k + u]);
        for (int v = 0; v < NV; ++v) a[u][v][j] = vfma(wv[v], xb, a[u][v][j]);
      }
    }
  }
  for (; k < K; ++k) {
    vec wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = vload_i8(w + k * 16 + v * VL);
    for (int j = 0; j < R; ++j) {
      const vec xb = vset1(x[j * K + k]);
      for (int v = 0; v < NV; ++v) a[0][v][j] = vfma(wv[v], xb, a[0][v][j]);
    }
  }
  for (int v = 0; v < NV; ++v)
    for (int j = 0; j < R; ++j) {
      vec t = a[0][v][j];
      for (int u = 1; u < U; ++u) t = vadd(t, a[u][v][j]);
      acc[v * R + j] = t;
    }
}

// element (n, k) of the pair layout [NB][K/2][16][2]
inline float pair_at(const bf16* wp, int64_t K, int64_t n, int64_t k) {
  return static_cast<float>(wp[(((n / 16) * (K / 2) + k / 2) * 16 + n % 16) * 2 + k % 2]);
}

at::Tensor head_screen_argmax(const at::Tensor& x, const at::Tensor& wp, int64_t n_out, const at::Tensor& w8,
                              const at::Tensor& scale, const at::Tensor& err, int64_t max_candidates) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu() && w8.device().is_cpu(), "head_screen_argmax: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16 && w8.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat && err.scalar_type() == at::kFloat,
              "head_screen_argmax: x, wp bf16; w8 int8; scale, err fp32");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 4 && w8.dim() == 3 && wp.size(2) == 16 && wp.size(3) == 2,
              "head_screen_argmax: x [M, K], wp [NB, K/2, 16, 2], w8 [NB, K, 16]");
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0);
  TORCH_CHECK(wp.size(1) * 2 == K && w8.size(0) == NB && w8.size(1) == K && w8.size(2) == 16,
              "head_screen_argmax: x's width is both layouts' K, one w8 block per packed block");
  TORCH_CHECK(scale.numel() == NB * 16 && err.numel() == NB * 16, "head_screen_argmax: one scale and bound per row");
  TORCH_CHECK(n_out > 0 && n_out <= NB * 16 && max_candidates > 0, "head_screen_argmax: 0 < n_out <= rows");
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return out;
  at::Tensor xc = x.contiguous(), wpc = wp.contiguous(), w8c = w8.contiguous();
  const bf16* X = xc.data_ptr<bf16>();
  const bf16* WP = wpc.data_ptr<bf16>();
  const int8_t* W8 = w8c.data_ptr<int8_t>();
  const float* SC = scale.contiguous().data_ptr<float>();
  const float* ER = err.contiguous().data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();

  std::vector<float> xf(M * K), S(M, 0.f);
  std::vector<char> finite(M, 1);
  for (int64_t j = 0; j < M; ++j)
    for (int64_t k = 0; k < K; ++k) {
      xf[j * K + k] = static_cast<float>(X[j * K + k]);
      S[j] += std::fabs(xf[j * K + k]);
    }
  for (int64_t j = 0; j < M; ++j) finite[j] = std::isfinite(S[j]);
  // pass 1: every approximate logit, and the best lower bound per row
  std::vector<float> approx(M * NB * 16);
  const int threads = at::get_num_threads();
  std::vector<float> lows(static_cast<size_t>(threads) * M, -std::numeric_limits<float>::infinity());
  at::parallel_for(0, NB, 16, [&](int64_t begin, int64_t end) {
    float* low = lows.data() + at::get_thread_num() * M;
    vec acc[RT * 16 / VL];
    alignas(64) float buf[16];
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* wb = W8 + b * K * 16;
      for (int64_t j0 = 0; j0 < M; j0 += RT) {
        const int64_t r = std::min(RT, M - j0);
        switch (r) {
          case 1: screen_tile<1>(wb, xf.data() + j0 * K, K, acc); break;
          case 2: screen_tile<2>(wb, xf.data() + j0 * K, K, acc); break;
          case 3: screen_tile<3>(wb, xf.data() + j0 * K, K, acc); break;
          default: screen_tile<4>(wb, xf.data() + j0 * K, K, acc); break;
        }
        for (int64_t j = 0; j < r; ++j) {
          for (int v = 0; v < 16 / VL; ++v) vstore(buf + v * VL, acc[v * r + j]);
          float* a = approx.data() + (j0 + j) * NB * 16 + b * 16;
          float lo = low[j0 + j];
          const float s = S[j0 + j];
          for (int64_t i = 0; i < 16 && b * 16 + i < n_out; ++i) {
            const int64_t n = b * 16 + i;
            a[i] = buf[i] * SC[n];
            lo = std::max(lo, a[i] - ER[n] * s);
          }
          low[j0 + j] = lo;
        }
      }
    }
  });
  // pass 2 per row: the candidates, recomputed from the bf16 weights in ascending order
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cand;
    for (int64_t j = begin; j < end; ++j) {
      float L = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < threads; ++t) L = std::max(L, lows[t * M + j]);
      if (!finite[j] || !std::isfinite(L)) {
        O[j] = -1;
        continue;
      }
      const float thr = L - std::max(std::fabs(L) * 0.0078125f, std::numeric_limits<float>::min());
      const float* a = approx.data() + j * NB * 16;
      cand.clear();
      for (int64_t n = 0; n < n_out && static_cast<int64_t>(cand.size()) <= max_candidates; ++n)
        if (a[n] + ER[n] * S[j] >= thr) cand.push_back(n);
      if (static_cast<int64_t>(cand.size()) > max_candidates) {
        O[j] = -1;
        continue;
      }
      const float* xr = xf.data() + j * K;
      int64_t best_n = -1;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t n : cand) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += pair_at(WP, K, n, k) * xr[k];
        const float logit = static_cast<float>(static_cast<bf16>(s));
        if (best_n < 0 || logit > best) {
          best = logit;
          best_n = n;
        }
      }
      O[j] = best_n;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("head_screen_argmax(Tensor x, Tensor wp, int n_out, Tensor w8, Tensor scale, Tensor err, int max_candidates) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("head_screen_argmax", &head_screen_argmax); }
