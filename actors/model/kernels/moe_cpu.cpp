// Routed experts on the CPU, for the decode regime: each expert sees a handful of tokens, so its
// FFN is bound by reading its weights, not by arithmetic. oneDNN's matmul pays ~100 us of set-up
// per call and reads bf16 weights through a reorder; here one call walks every active expert's
// gate/up rows and then its down rows once, with all of that expert's tokens in registers, on
// torch's thread pool (at::parallel_for honours torch.set_num_threads).
//
//   expertmesh::grouped_ffn(xs [N, H], w13 [E, 2I, H], w2 [E, H, I], counts [E]) -> [N, H]
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
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using bf16 = c10::BFloat16;

// ---- vector loads: weights (fp32 or bf16) widened to fp32 lanes -------------------------------
#if defined(__AVX512F__)
constexpr int VL = 16;
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
constexpr int ROWS = 4;  // weight rows per tile: 4 rows x 4 tokens = 16 of 32 zmm accumulators
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VL = 8;
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
constexpr int ROWS = 2;  // 2 rows x 4 tokens = 8 of 16 ymm accumulators
#else
constexpr int VL = 1;
struct vec { float v; };
inline vec vload(const float* p) { return {*p}; }
inline vec vload(const bf16* p) { return {static_cast<float>(*p)}; }
inline vec vzero() { return {0.f}; }
inline vec vfma(vec a, vec b, vec c) { return {a.v * b.v + c.v}; }
inline float vsum(vec a) { return a.v; }
constexpr int ROWS = 2;
#endif
constexpr int TOKENS = 4;  // tokens per tile

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }

// out[j * ldo + r] = dot(w[r * ldw : +K], x[j * ldx : +K]) for r < R, j < M (x in fp32).
template <int R, int M, typename W>
inline void dot_tile(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo) {
  vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = vzero();
  int64_t k = 0;
  for (; k + VL <= K; k += VL) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * ldw + k);
    for (int j = 0; j < M; ++j) {
      vec xv = vload(x + j * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][j] = vfma(wv[r], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) {
      float s = vsum(acc[r][j]);
      for (int64_t t = k; t < K; ++t) s += widen(w[r * ldw + t]) * x[j * ldx + t];
      out[j * ldo + r] = s;
    }
}

template <int R, typename W>
inline void dot_rows(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, int64_t m, float* out,
                     int64_t ldo) {
  int64_t j = 0;
  for (; j + TOKENS <= m; j += TOKENS) dot_tile<R, TOKENS>(w, ldw, x + j * ldx, ldx, K, out + j * ldo, ldo);
  switch (m - j) {
    case 1: dot_tile<R, 1>(w, ldw, x + j * ldx, ldx, K, out + j * ldo, ldo); break;
    case 2: dot_tile<R, 2>(w, ldw, x + j * ldx, ldx, K, out + j * ldo, ldo); break;
    case 3: dot_tile<R, 3>(w, ldw, x + j * ldx, ldx, K, out + j * ldo, ldo); break;
    default: break;
  }
}

// C[j * ldc + n] = dot(W[n], X[j]) for n in [0, N), j in [0, m): W rows of length K.
template <typename W>
void matmul_small(const W* w, int64_t K, int64_t N, const float* x, int64_t ldx, int64_t m, float* c, int64_t ldc) {
  int64_t n = 0;
  for (; n + ROWS <= N; n += ROWS) dot_rows<ROWS>(w + n * K, K, x, ldx, K, m, c + n, ldc);
  for (; n < N; ++n) dot_rows<1>(w + n * K, K, x, ldx, K, m, c + n, ldc);
}

template <typename T>
inline float round_as(float v) {
  return static_cast<float>(static_cast<T>(v));
}

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
  // fp32 copies of the activations the kernel reads (exact for bf16), and the FFN's hidden rows
  at::Tensor xf = xs.to(at::kFloat).contiguous();
  at::Tensor act = at::empty({N, I}, xs.options().dtype(at::kFloat));
  const float* X = xf.data_ptr<float>();
  float* A = act.data_ptr<float>();
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
          A[(s + j) * I + n0 + n] = round_as<T>(round_as<T>(silu(g)) * u);
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

// Which vector width this build runs: 16 (AVX-512), 8 (AVX2 + FMA) or 1 (scalar).
int64_t vector_width() { return VL; }

}  // namespace

TORCH_LIBRARY(expertmesh, m) {
  m.def("grouped_ffn(Tensor xs, Tensor w13, Tensor w2, int[] counts, int max_rows) -> Tensor");
  m.def("vector_width() -> int", &vector_width);
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("grouped_ffn", &grouped_ffn); }
