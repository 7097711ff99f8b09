// A linear for a few rows on the CPU: y = x W^T with x [M, K] (M small: decode's batch, the
// lm_head's sampled rows) and W [N, K] dense. At such M the matmul only streams W once; this
// streams it row by row (cpu_vec.h), split over torch's threads by blocks of rows.
//
//   expertmesh::linear_small(x [M, K], w [N, K]) -> [M, N] (x's dtype; fp32 accumulation)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx.h"
#include "cpu_vec.h"
#include "pair_gemm.h"
#include "rows.h"

// linear_packed exists where the CPU multiplies bf16 pairs (AVX512-BF16) or where oneDNN cannot
// pack bf16 and the pairs are widened by hand (AVX2 + FMA without AVX-512)
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
#define EXPERTMESH_PAIR_LINEAR 1
#endif

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

// ---- bf16 weights packed in vdpbf16ps pairs: any row count, no horizontal sums ------------------
// wp [N/16, K/2, 16, 2] (pack_pairs in kernels/__init__.py): pair_gemm.h's tiles.
#if defined(__AVX512BF16__)
#if defined(EXPERTMESH_AMX)
// From this many rows the tile unit beats vdpbf16ps on the same packed weight (an AMX Xeon, the
// 129k x 512 head); below it the weight's bytes bound both.
constexpr int64_t AMX_MIN_ROWS = 4;

// linear_packed on the tile unit: rows padded to 16 (zeros); a task is 32 outputs of up to 128
// rows, tasks ordered row chunk by row chunk, so a thread's rows stay in L2 while the weight
// blocks stream past them (one task per 32 outputs over all rows re-read the whole input from L3
// per task: 2-2.7x oneDNN's time at 4096 rows).
void linear_packed_amx(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O) {
  constexpr int64_t MC = 128;
  const int64_t K2 = K / 2, Mp = (M + 15) / 16 * 16, NP = NB / 2, chunks = (Mp + MC - 1) / MC;
  std::vector<bf16> padded;
  const bf16* A = X;
  if (Mp != M) {
    padded.assign(Mp * K, bf16(0.f));
    std::memcpy(padded.data(), X, M * K * sizeof(bf16));
    A = padded.data();
  }
  at::parallel_for(0, chunks * NP, 4, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    std::vector<float> C(std::min(MC, Mp) * 32);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mc = t / NP, p = t % NP, m0 = mc * MC, rows = std::min(MC, Mp - m0);
      const bf16* b0 = W + (2 * p) * K2 * 32;
      const bf16* next = t + 1 < end ? W + (2 * ((t + 1) % NP)) * K2 * 32 : nullptr;
      amx_pairs_32(A + m0 * K, K, rows, b0, b0 + K2 * 32, K2, C.data(), next);
      const int64_t n0 = 2 * p * 16, nr = std::min<int64_t>(32, n_out - n0);
      for (int64_t j = 0; j < rows && m0 + j < M; ++j)
        for (int64_t n = 0; n < nr; ++n) O[(m0 + j) * n_out + n0 + n] = static_cast<bf16>(C[j * 32 + n]);
    }
  });
}
#endif

// O [M, n_out] = X [M, K] . W^T for W in the pair layout (NB blocks of 16 outputs)
void packed_rows(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O) {
  const int64_t K2 = K / 2;
#if defined(EXPERTMESH_AMX)
  if (M >= AMX_MIN_ROWS && K2 % 16 == 0 && amx_ready()) {
    linear_packed_amx(X, M, K, W, NB, n_out, O);
    return;
  }
#endif
  at::parallel_for(0, NB / 2, 4, [&](int64_t begin, int64_t end) {
    __m512 tile[2 * PT];
    float buf[32];
    for (int64_t p = begin; p < end; ++p) {
      const bf16* b0 = W + (2 * p) * K2 * 32;
      const bf16* b1 = b0 + K2 * 32;
      for (int64_t j0 = 0; j0 < M; j0 += PT) {
        const int64_t m = std::min<int64_t>(PT, M - j0);
        pair_tile_rows(m, b0, b1, X + j0 * K, K, K2, tile);
        const int64_t n0 = 2 * p * 16, nr = std::min<int64_t>(32, n_out - n0);
        for (int64_t j = 0; j < m; ++j) {
          _mm512_storeu_ps(buf, tile[2 * j]);
          _mm512_storeu_ps(buf + 16, tile[2 * j + 1]);
          for (int64_t n = 0; n < nr; ++n) O[(j0 + j) * n_out + n0 + n] = static_cast<bf16>(buf[n]);
        }
      }
    }
  });
}
#elif defined(EXPERTMESH_PAIR_LINEAR)
// The same pair layout on AVX2 + FMA (no bf16 instructions): a 32-byte load holds the (2 k2,
// 2 k2 + 1) pairs of 8 outputs; shifting each 32-bit lane left by 16 widens the even k, masking its
// low half the odd k, so the weight is widened once per load and every row of the tile reuses it.
// Rows are widened to fp32 once per row chunk, 6 rows interleaved per panel ([K][6], as BLIS packs
// its A panels) so a tile's broadcasts walk one sequential stream. oneDNN cannot
// pack bf16 on such CPUs and emulates its matmuls: this serves every bf16 linear there.
constexpr int64_t PT_PAIR = 5;  // rows per pair-kernel tile: 10 accumulators (at 6 it spills)
constexpr int64_t PT_WIDE = 6;  // rows per widened-weight tile: 12 accumulators
constexpr int64_t MC2 = 64;     // rows per chunk: a task's widened rows stay in L2
// From this many rows a block's weights are widened to fp32 once and reused by every tile
// (fewer rows: the weight's bytes bound the time and widening it is an extra pass)
constexpr int64_t WIDEN_MIN_ROWS = 64;

// The even halves of the pairs meet every row before the odd halves are widened. x: a panel of
// rows interleaved [K][ld].
template <int M>
inline void packed_tile_avx2(const bf16* b, const float* x, int64_t ld, int64_t K2, __m256* out) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  // at one row the two halves of each pair go to their own accumulators (4 FMA chains, not 2)
  constexpr int S = M == 1 ? 2 : 1;
  __m256 acc[S][2][M];
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < M; ++j) acc[s][0][j] = acc[s][1][j] = _mm256_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    prefetch(b + (k2 + 128) * 32, 64);  // 8 KB ahead in the stream
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k2 * 32));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k2 * 32 + 16));
    const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
    const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
    for (int j = 0; j < M; ++j) {
      const __m256 xe = _mm256_broadcast_ss(x + (2 * k2) * ld + j);
      acc[0][0][j] = _mm256_fmadd_ps(e0, xe, acc[0][0][j]);
      acc[0][1][j] = _mm256_fmadd_ps(e1, xe, acc[0][1][j]);
    }
    const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(lo, odd_mask));
    const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(hi, odd_mask));
    for (int j = 0; j < M; ++j) {
      const __m256 xo = _mm256_broadcast_ss(x + (2 * k2 + 1) * ld + j);
      acc[S - 1][0][j] = _mm256_fmadd_ps(o0, xo, acc[S - 1][0][j]);
      acc[S - 1][1][j] = _mm256_fmadd_ps(o1, xo, acc[S - 1][1][j]);
    }
  }
  for (int j = 0; j < M; ++j) {
    out[2 * j] = S == 2 ? _mm256_add_ps(acc[0][0][j], acc[S - 1][0][j]) : acc[0][0][j];
    out[2 * j + 1] = S == 2 ? _mm256_add_ps(acc[0][1][j], acc[S - 1][1][j]) : acc[0][1][j];
  }
}

// Where a block meets more than one tile of rows, its 16 x K weights are widened once into fp32
// [K][16] and the tiles run the plain 6 x 16 fp32 kernel: one FMA per accumulator per k, no
// integer ops in the loop and 15 registers (the pair kernel above needs 18 at 6 rows and spills).
void widen_block(const bf16* b, int64_t K2, float* wf) {
  const __m256i odd_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k2 * 32));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k2 * 32 + 16));
    float* w = wf + k2 * 32;
    _mm256_storeu_ps(w, _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)));
    _mm256_storeu_ps(w + 8, _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)));
    _mm256_storeu_ps(w + 16, _mm256_castsi256_ps(_mm256_and_si256(lo, odd_mask)));
    _mm256_storeu_ps(w + 24, _mm256_castsi256_ps(_mm256_and_si256(hi, odd_mask)));
  }
}

template <int M>
inline void widened_tile_avx2(const float* w, const float* x, int64_t K, __m256* out) {
  __m256 acc[2][M];
  for (int j = 0; j < M; ++j) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * 16);
    const __m256 w1 = _mm256_loadu_ps(w + k * 16 + 8);
    for (int j = 0; j < M; ++j) {
      const __m256 xv = _mm256_broadcast_ss(x + k * PT_WIDE + j);
      acc[0][j] = _mm256_fmadd_ps(w0, xv, acc[0][j]);
      acc[1][j] = _mm256_fmadd_ps(w1, xv, acc[1][j]);
    }
  }
  for (int j = 0; j < M; ++j) {
    out[2 * j] = acc[0][j];
    out[2 * j + 1] = acc[1][j];
  }
}

template <int M>
inline void tile_avx2(const bf16* b, const float* wf, const float* x, int64_t K2, __m256* out) {
  if constexpr (M <= PT_WIDE) {
    if (wf != nullptr) return widened_tile_avx2<M>(wf, x, 2 * K2, out);
  }
  if constexpr (M <= PT_PAIR) packed_tile_avx2<M>(b, x, PT_PAIR, K2, out);
}

// O [M, n_out] = X [M, K] . W^T for W in the pair layout (NB blocks of 16 outputs)
void packed_rows(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O) {
  const int64_t K2 = K / 2;
  const bool widen = M >= WIDEN_MIN_ROWS;
  const int64_t pt = widen ? PT_WIDE : PT_PAIR;  // rows per tile and per panel
  const int64_t chunks = (M + MC2 - 1) / MC2;
  // tasks are (row chunk, 16 outputs), chunk-major: a thread widens its chunk's rows once
  at::parallel_for(0, chunks * NB, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> xf((std::min(MC2, M) + pt - 1) / pt * pt * K);
    std::vector<float> wf(widen ? K * 16 : 0);
    int64_t widened = -1;
    __m256 tile[2 * PT_WIDE];
    float buf[16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t mc = t / NB, b = t % NB, m0 = mc * MC2, rows = std::min(MC2, M - m0);
      if (mc != widened) {
        std::fill(xf.begin(), xf.end(), 0.f);
        for (int64_t j = 0; j < rows; ++j) {
          float* panel = xf.data() + j / pt * pt * K + j % pt;
          const bf16* xr = X + (m0 + j) * K;
          for (int64_t k = 0; k < K; ++k) panel[k * pt] = static_cast<float>(xr[k]);
        }
        widened = mc;
      }
      const bf16* wb = W + b * K2 * 32;
      const int64_t n0 = b * 16, nr = std::min<int64_t>(16, n_out - n0);
      if (nr <= 0) continue;  // the zero rows padding N to 32
      if (widen) widen_block(wb, K2, wf.data());
      const float* wfp = widen ? wf.data() : nullptr;
      for (int64_t j0 = 0; j0 < rows; j0 += pt) {
        const int64_t m = std::min<int64_t>(pt, rows - j0);
        const float* xj = xf.data() + j0 * K;  // its panel (j0 is a multiple of pt)
        switch (m) {
          case 1: tile_avx2<1>(wb, wfp, xj, K2, tile); break;
          case 2: tile_avx2<2>(wb, wfp, xj, K2, tile); break;
          case 3: tile_avx2<3>(wb, wfp, xj, K2, tile); break;
          case 4: tile_avx2<4>(wb, wfp, xj, K2, tile); break;
          case 5: tile_avx2<5>(wb, wfp, xj, K2, tile); break;
          default: tile_avx2<6>(wb, wfp, xj, K2, tile); break;
        }
        for (int64_t j = 0; j < m; ++j) {
          _mm256_storeu_ps(buf, tile[2 * j]);
          _mm256_storeu_ps(buf + 8, tile[2 * j + 1]);
          bf16* o = O + (m0 + j0 + j) * n_out + n0;
          for (int64_t n = 0; n < nr; ++n) o[n] = static_cast<bf16>(buf[n]);
        }
      }
    }
  });
}
#endif

#if defined(EXPERTMESH_PAIR_LINEAR)
inline vec _silu(vec g) { return vdiv(g, vadd(vset1(1.f), vexp(vsub(vzero(), g)))); }

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& wp, int64_t n_out) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "linear_packed: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16, "linear_packed: bfloat16");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2 && wp.size(0) % 2 == 0,
              "linear_packed: x [M, K], wp [N/16, K/2, 16, 2] with an even block count (pack_pairs)");
  TORCH_CHECK(wp.size(1) * 2 == x.size(1), "linear_packed: x's width is the packed K");
  TORCH_CHECK(n_out > 0 && n_out <= wp.size(0) * 16, "linear_packed: 0 < n_out <= the packed rows");
  at::Tensor xc = x.contiguous(), wc = wp.contiguous();
  at::Tensor out = at::empty({x.size(0), n_out}, x.options());
  if (x.size(0) > 0)
    packed_rows(xc.data_ptr<bf16>(), x.size(0), x.size(1), wc.data_ptr<bf16>(), wp.size(0), n_out,
                out.data_ptr<bf16>());
  return out;
}

// A SwiGLU MLP (dense layers, shared experts) in one call: gate and up as one packed weight (gate
// rows then up rows), silu(gate) * up, then down. The reference's roundings: gate and up to bf16,
// silu to bf16, the product to bf16, the output. At decode sizes its five torch-level calls were
// ~90 us of a ~100 us shared expert (cold).
//   expertmesh::swiglu_packed(x [M, K], gate_up (pack_pairs of [2I, K]), down (pack_pairs of
//                             [N, I]), n_out) -> [M, N]
at::Tensor swiglu_packed(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t n_out) {
  TORCH_CHECK(down.dim() == 4 && gate_up.dim() == 4 && gate_up.size(0) * 16 >= 4 * down.size(1),
              "swiglu_packed: gate_up packs 2I rows (gate then up) for down's I inputs");
  const int64_t I = down.size(1) * 2;
  at::Tensor gu = linear_packed(x, gate_up, 2 * I);
  const int64_t M = gu.size(0);
  at::Tensor act = at::empty({M, I}, gu.options());
  const bf16* G = gu.data_ptr<bf16>();
  bf16* A = act.data_ptr<bf16>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const bf16* g = G + m * 2 * I;
      const bf16* u = g + I;
      bf16* a = A + m * I;
      int64_t i = 0;
      alignas(64) float buf[VL];
      for (; i + VL <= I; i += VL) {
        const vec gv = vload(g + i);
        vstore(buf, vmul(vround_bf16(_silu(gv)), vload(u + i)));
        for (int j = 0; j < VL; ++j) a[i + j] = static_cast<bf16>(buf[j]);
      }
      for (; i < I; ++i) {
        const float gf = static_cast<float>(g[i]);
        a[i] = static_cast<bf16>(round_as<bf16>(gf / (1.f + std::exp(-gf))) * static_cast<float>(u[i]));
      }
    }
  });
  return linear_packed(act, down, n_out);
}
#endif

bool has_packed_linear() {
#if defined(EXPERTMESH_PAIR_LINEAR)
  return true;
#else
  return false;
#endif
}

// ---- per-head matmuls of absorbed MLA at decode sizes ------------------------------------------
// out[h] = x[h] . w[h] for x [H, M, K] (any strides), w [H, K, N] contiguous: the W_UK / W_UV
// products of absorbed attention. torch's bf16 bmm pays ~50 us of set-up for these few-row shapes;
// here each output row is K vector FMAs over N (fp32 accumulation, rounded once, as bmm rounds).
at::Tensor bmm_small(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bmm_small: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bmm_small: bfloat16");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.size(0) == w.size(0) && x.size(2) == w.size(1),
              "bmm_small: x [H, M, K], w [H, K, N]");
  at::Tensor wc = w.contiguous();
  const int64_t H = x.size(0), M = x.size(1), K = x.size(2), N = w.size(2);
  const int64_t sh = x.stride(0), sm = x.stride(1), sk = x.stride(2);
  at::Tensor out = at::empty({H, M, N}, x.options());
  const bf16* X = x.data_ptr<bf16>();
  const bf16* W = wc.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  at::parallel_for(0, H * M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(N);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / M, m = t % M;
      bmm_row(X + h * sh + m * sm, sk, W + h * K * N, K, N, acc.data(), O + t * N);
    }
  });
  return out;
}

// Whether this build and this process run AMX tiles (linear_packed uses them from AMX_MIN_ROWS rows).
bool has_amx() {
#if defined(EXPERTMESH_AMX)
  return amx_ready();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("linear_small(Tensor x, Tensor w) -> Tensor");
  m.def("has_packed_linear() -> bool", &has_packed_linear);
  m.def("has_amx() -> bool", &has_amx);
  m.def("bmm_small(Tensor x, Tensor w) -> Tensor");
#if defined(EXPERTMESH_PAIR_LINEAR)
  m.def("linear_packed(Tensor x, Tensor wp, int n_out) -> Tensor");
  m.def("swiglu_packed(Tensor x, Tensor gate_up, Tensor down, int n_out) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("linear_small", &linear_small);
  m.impl("bmm_small", &bmm_small);
#if defined(EXPERTMESH_PAIR_LINEAR)
  m.impl("linear_packed", &linear_packed);
  m.impl("swiglu_packed", &swiglu_packed);
#endif
}
