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
#include "fp8.h"
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

// ---- FP8 weights in the pair layout (linear_packed_fp8 below) ------------------------------------
// The scale row of pair-layout block b (16 outputs, br a multiple of 16); the zero rows padding N
// to 32 take the last one
inline const float* fp8_block_scales(const float* S, int64_t b, int64_t br, int64_t gr, int64_t gc) {
  return S + std::min(b * 16 / br, gr - 1) * gc;
}

// one pair-layout block's per_block e4m3 bytes -> bf16: one run of weights whose scale column changes
// every 16 bc of them (a (k, k + 1) pair of 16 outputs per 32 bytes)
inline void dequant_pair_block(const uint8_t* q, const float* scales, int64_t bc, int64_t per_block, bf16* dst) {
  dequant_rows(q, 1, per_block, [&](int64_t) { return scales; }, 16 * bc, dst);
}

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
void linear_packed_amx(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O,
                       int64_t ldo) {
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
        for (int64_t n = 0; n < nr; ++n) O[(m0 + j) * ldo + n0 + n] = static_cast<bf16>(C[j * 32 + n]);
    }
  });
}
#endif

// a pair tile's m rows (two fp32 blocks of 16 each) into o (ldo apart), its first nr outputs, as bf16
inline void store_pair_tile(const __m512* tile, int64_t m, bf16* o, int64_t ldo, int64_t nr) {
  float buf[32];
  for (int64_t j = 0; j < m; ++j) {
    _mm512_storeu_ps(buf, tile[2 * j]);
    _mm512_storeu_ps(buf + 16, tile[2 * j + 1]);
    for (int64_t n = 0; n < nr; ++n) o[j * ldo + n] = static_cast<bf16>(buf[n]);
  }
}

// O [M, n_out] (ldo apart) = X [M, K] . W^T for W in the pair layout (NB blocks of 16 outputs)
void packed_rows(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O,
                 int64_t ldo) {
  const int64_t K2 = K / 2;
#if defined(EXPERTMESH_AMX)
  if (M >= AMX_MIN_ROWS && K2 % 16 == 0 && amx_ready()) {
    linear_packed_amx(X, M, K, W, NB, n_out, O, ldo);
    return;
  }
#endif
  at::parallel_for(0, NB / 2, 4, [&](int64_t begin, int64_t end) {
    __m512 tile[2 * PT];
    for (int64_t p = begin; p < end; ++p) {
      const bf16* b0 = W + (2 * p) * K2 * 32;
      const bf16* b1 = b0 + K2 * 32;
      for (int64_t j0 = 0; j0 < M; j0 += PT) {
        const int64_t m = std::min<int64_t>(PT, M - j0);
        pair_tile_rows(m, b0, b1, X + j0 * K, K, K2, tile);
        store_pair_tile(tile, m, O + j0 * ldo + 2 * p * 16, ldo, std::min<int64_t>(32, n_out - 2 * p * 16));
      }
    }
  });
}

// ---- FP8 weights on vdpbf16ps: a task is one block pair (see linear_packed_fp8 below) -------------
// Up to PT rows meet the weights as they are looked up (e4m3_lookup, one table per scale block), so
// the e4m3 bytes stream once and no bf16 copy is written; more rows meet the pair dequantized once
// into per-thread scratch. Either way the dot products are pair_tile's, in its order.
template <int M>
inline void pair_tile_fp8(const uint8_t* q0, const uint8_t* q1, const float* s0, const float* s1, int64_t kb2,
                          const bf16* x, int64_t ldx, int64_t K2, __m512* out) {
  __m512 acc[2][M];
  for (int j = 0; j < M; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c * kb2 < K2; ++c) {
    const E4m3Table t0 = e4m3_table(s0[c]), t1 = e4m3_table(s1[c]);
    for (int64_t k2 = c * kb2, end = std::min(K2, k2 + kb2); k2 < end; ++k2) {
      prefetch(q0 + (k2 + 128) * 32, 32);  // 4 KB ahead in each stream
      prefetch(q1 + (k2 + 128) * 32, 32);
      pair_step<M>((__m512bh)e4m3_lookup(t0, q0 + k2 * 32), (__m512bh)e4m3_lookup(t1, q1 + k2 * 32), x, ldx, k2, acc);
    }
  }
  for (int j = 0; j < M; ++j) {
    out[2 * j] = acc[0][j];
    out[2 * j + 1] = acc[1][j];
  }
}

// O [M, n_out] = X . W^T for Q the e4m3 pair layout (NB blocks), block b's scale row at S + row(b) * gc
void packed_rows_fp8(const bf16* X, int64_t M, int64_t K, const uint8_t* Q, const float* S, int64_t gr, int64_t gc,
                     int64_t br, int64_t bc, int64_t NB, int64_t n_out, bf16* O) {
  const int64_t K2 = K / 2, kb2 = bc / 2, per_block = K2 * 32;
  const auto scales = [&](int64_t b) { return fp8_block_scales(S, b, br, gr, gc); };
  at::parallel_for(0, NB / 2, 2, [&](int64_t begin, int64_t end) {
    std::vector<bf16> scratch(M > PT ? 2 * per_block : 0);
    __m512 tile[2 * PT];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = 2 * p * 16, nr = std::min<int64_t>(32, n_out - n0);
      if (nr <= 0) continue;
      const uint8_t* q0 = Q + 2 * p * per_block;
      const float *s0 = scales(2 * p), *s1 = scales(2 * p + 1);
      if (M > PT) {
        dequant_pair_block(q0, s0, bc, per_block, scratch.data());
        dequant_pair_block(q0 + per_block, s1, bc, per_block, scratch.data() + per_block);
      }
      for (int64_t j0 = 0; j0 < M; j0 += PT) {
        const int64_t m = std::min<int64_t>(PT, M - j0);
        const bf16* xj = X + j0 * K;
        if (M > PT) {
          pair_tile_rows(m, scratch.data(), scratch.data() + per_block, xj, K, K2, tile);
        } else {
          switch (m) {
            case 1: pair_tile_fp8<1>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
            case 2: pair_tile_fp8<2>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
            case 3: pair_tile_fp8<3>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
            case 4: pair_tile_fp8<4>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
            case 5: pair_tile_fp8<5>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
            default: pair_tile_fp8<6>(q0, q0 + per_block, s0, s1, kb2, xj, K, K2, tile); break;
          }
        }
        store_pair_tile(tile, m, O + j0 * n_out + n0, n_out, nr);
      }
    }
  });
}
#define EXPERTMESH_FP8_PAIRS 1
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

// O [M, n_out] (ldo apart) = X [M, K] . W^T for W in the pair layout (NB blocks of 16 outputs)
void packed_rows(const bf16* X, int64_t M, int64_t K, const bf16* W, int64_t NB, int64_t n_out, bf16* O,
                 int64_t ldo) {
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
          bf16* o = O + (m0 + j0 + j) * ldo + n0;
          for (int64_t n = 0; n < nr; ++n) o[n] = static_cast<bf16>(buf[n]);
        }
      }
    }
  });
}
#endif

// An e4m3 weight [N, K] with its block scales dequantized whole, in one call: what absorbed attention
// reads of an FP8-resident kv_b_proj each step (fp8.dequantize_fp8's ~10 torch ops, the same values)
//   expertmesh::dequantize_fp8(w [N, K] e4m3, scale [ceil(N / br), ceil(K / bc)], br, bc, dtype) -> [N, K]
at::Tensor dequantize_fp8(const at::Tensor& w, const at::Tensor& scale, int64_t br, int64_t bc, at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu() && scale.device().is_cpu(), "dequantize_fp8: CPU tensors");
  TORCH_CHECK(w.scalar_type() == at::kFloat8_e4m3fn && scale.scalar_type() == at::kFloat && w.dim() == 2 &&
              scale.dim() == 2, "dequantize_fp8: w [N, K] float8_e4m3fn, scale 2-D float32");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dequantize_fp8: to float32 or bfloat16");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(br > 0 && bc > 0 && scale.size(0) == (N + br - 1) / br && scale.size(1) == (K + bc - 1) / bc,
              "dequantize_fp8: one scale per ", br, " x ", bc, " block");
  at::Tensor wc = w.contiguous(), sc = scale.contiguous();
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  const auto* Q = static_cast<const uint8_t*>(wc.data_ptr());
  const float* S = sc.data_ptr<float>();
  const int64_t gc = scale.size(1);
  at::parallel_for(0, (N + br - 1) / br, 1, [&](int64_t begin, int64_t end) {  // a task per block-row
    for (int64_t g = begin; g < end; ++g) {
      const int64_t r0 = g * br, nr = std::min(br, N - r0);
      const auto grid = [&](int64_t) { return S + g * gc; };
      if (dtype == at::kBFloat16)
        dequant_rows(Q + r0 * K, nr, K, grid, bc, out.data_ptr<bf16>() + r0 * K);
      else
        dequant_rows(Q + r0 * K, nr, K, grid, bc, out.data_ptr<float>() + r0 * K);
    }
  });
  return out;
}

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
                out.data_ptr<bf16>(), n_out);
  return out;
}

// ---- FP8-resident linears: e4m3 weights in the pair layout, dequantized a chunk of blocks at a time
// wq [NB, K/2, 16, 2] float8_e4m3fn is pack_pairs of the checkpoint's e4m3 weight [N, K], scale its
// weight_scale_inv [ceil(N / br), ceil(K / bc)] fp32. A block's 16 outputs share one scale row (br a
// multiple of 16) and each (k, k + 1) pair one scale column (bc even), so a block's K2 * 32 bytes
// dequantize as one run whose scale changes every 16 bc bytes, to the values the dequantize-at-load
// path packs. On AVX512-BF16 (packed_rows_fp8) a task is one block pair, looked up inside the tile
// or dequantized once into per-thread scratch; elsewhere (AVX2, AMX's tile rows) a chunk of blocks
// is dequantized and handed to packed_rows. Either way the outputs are bitwise linear_packed's on
// the dequantized weight, the weight streams at 1 byte each and its bf16 form exists one block pair
// or one chunk at a time.
//   expertmesh::linear_packed_fp8(x [M, K] bf16, wq, scale, block_rows, block_cols, n_out) -> [M, n_out]
constexpr int64_t FP8_CHUNK = 1 << 20;  // weights dequantized per chunk: 2 MB of bf16

at::Tensor linear_packed_fp8(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scale, int64_t br,
                             int64_t bc, int64_t n_out) {
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && scale.device().is_cpu(), "linear_packed_fp8: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wq.scalar_type() == at::kFloat8_e4m3fn &&
              scale.scalar_type() == at::kFloat, "linear_packed_fp8: x bfloat16, wq float8_e4m3fn, scale float32");
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 4 && wq.size(2) == 16 && wq.size(3) == 2 && wq.size(0) % 2 == 0 &&
              scale.dim() == 2, "linear_packed_fp8: x [M, K], wq [N/16, K/2, 16, 2] (even block count), scale 2-D");
  TORCH_CHECK(wq.size(1) * 2 == x.size(1), "linear_packed_fp8: x's width is the packed K");
  TORCH_CHECK(br > 0 && br % 16 == 0 && bc > 0 && bc % 2 == 0,
              "linear_packed_fp8: block rows a multiple of 16 and even block columns, not ", br, " x ", bc);
  TORCH_CHECK(n_out > 0 && n_out <= wq.size(0) * 16 && scale.size(0) * br >= n_out && scale.size(1) * bc >= x.size(1),
              "linear_packed_fp8: 0 < n_out <= the packed rows, and a scale for every block");
  const int64_t M = x.size(0), K = x.size(1), NB = wq.size(0), per_block = K / 2 * 32, gr = scale.size(0),
                gc = scale.size(1);
  at::Tensor xc = x.contiguous(), wc = wq.contiguous(), sc = scale.contiguous();
  at::Tensor out = at::empty({M, n_out}, x.options());
  if (M == 0) return out;
#if defined(EXPERTMESH_FP8_PAIRS)
#if defined(EXPERTMESH_AMX)
  if (!(M >= AMX_MIN_ROWS && K % 32 == 0 && amx_ready()))  // where packed_rows takes the tile unit: below
#endif
  {
    packed_rows_fp8(xc.data_ptr<bf16>(), M, K, static_cast<const uint8_t*>(wc.data_ptr()), sc.data_ptr<float>(),
                    gr, gc, br, bc, NB, n_out, out.data_ptr<bf16>());
    return out;
  }
#endif
  const int64_t chunk = std::min(NB, std::max<int64_t>(4, FP8_CHUNK / per_block / 2 * 2));  // blocks, even
  at::Tensor scratch = at::empty({chunk * per_block}, x.options());
  const uint8_t* Q = static_cast<const uint8_t*>(wc.data_ptr());
  const float* S = sc.data_ptr<float>();
  bf16* D = scratch.data_ptr<bf16>();
  for (int64_t b0 = 0; b0 < NB && b0 * 16 < n_out; b0 += chunk) {
    const int64_t nb = std::min(chunk, NB - b0);
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        dequant_pair_block(Q + (b0 + b) * per_block, fp8_block_scales(S, b0 + b, br, gr, gc), bc, per_block,
                           D + b * per_block);
      }
    });
    packed_rows(xc.data_ptr<bf16>(), M, K, D, nb, std::min(nb * 16, n_out - b0 * 16), out.data_ptr<bf16>() + b0 * 16,
                n_out);
  }
  return out;
}

// silu(gate) * up for the rows of gu [M, 2I] (gate columns, then up), with the reference's
// roundings: gate and up are bf16 already, silu to bf16, the product to bf16
at::Tensor swiglu_act(const at::Tensor& gu, int64_t I) {
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
      for (; i + VL <= I; i += VL) vstore_bf16(a + i, vmul(vround_bf16(_silu(vload(g + i))), vload(u + i)));
      for (; i < I; ++i) {
        const float gf = static_cast<float>(g[i]);
        a[i] = static_cast<bf16>(round_as<bf16>(gf / (1.f + std::exp(-gf))) * static_cast<float>(u[i]));
      }
    }
  });
  return act;
}

// A SwiGLU MLP (dense layers, shared experts) in one call: gate and up as one packed weight (gate
// rows then up rows), silu(gate) * up, then down. The reference's roundings: gate and up to bf16,
// silu to bf16, the product to bf16, the output. At decode sizes its five torch-level calls were
// ~90 us of a ~100 us shared expert (cold).
//   expertmesh::swiglu_packed(x [M, K], gate_up (pack_pairs of [2I, K]), down (pack_pairs of
//                             [N, I]), n_out) -> [M, N]
//   expertmesh::swiglu_packed_fp8(x, gate_up, gate_up_scale, down, down_scale, block_rows,
//                                 block_cols, n_out): the same with FP8-resident weights (e4m3 pairs,
//                                 linear_packed_fp8), gate_up's scale rows those of gate, then up
at::Tensor swiglu_packed(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t n_out) {
  TORCH_CHECK(down.dim() == 4 && gate_up.dim() == 4 && gate_up.size(0) * 16 >= 4 * down.size(1),
              "swiglu_packed: gate_up packs 2I rows (gate then up) for down's I inputs");
  const int64_t I = down.size(1) * 2;
  return linear_packed(swiglu_act(linear_packed(x, gate_up, 2 * I), I), down, n_out);
}

at::Tensor swiglu_packed_fp8(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& gate_up_scale,
                             const at::Tensor& down, const at::Tensor& down_scale, int64_t br, int64_t bc,
                             int64_t n_out) {
  TORCH_CHECK(down.dim() == 4 && gate_up.dim() == 4 && gate_up.size(0) * 16 >= 4 * down.size(1),
              "swiglu_packed_fp8: gate_up packs 2I rows (gate then up) for down's I inputs");
  const int64_t I = down.size(1) * 2;
  at::Tensor gu = linear_packed_fp8(x, gate_up, gate_up_scale, br, bc, 2 * I);
  return linear_packed_fp8(swiglu_act(gu, I), down, down_scale, br, bc, n_out);
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
  m.def("dequantize_fp8(Tensor w, Tensor scale, int block_rows, int block_cols, ScalarType dtype) -> Tensor");
#if defined(EXPERTMESH_PAIR_LINEAR)
  m.def("linear_packed(Tensor x, Tensor wp, int n_out) -> Tensor");
  m.def("swiglu_packed(Tensor x, Tensor gate_up, Tensor down, int n_out) -> Tensor");
  m.def("linear_packed_fp8(Tensor x, Tensor wq, Tensor scale, int block_rows, int block_cols, int n_out) -> Tensor");
  m.def("swiglu_packed_fp8(Tensor x, Tensor gate_up, Tensor gate_up_scale, Tensor down, Tensor down_scale, "
        "int block_rows, int block_cols, int n_out) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("linear_small", &linear_small);
  m.impl("bmm_small", &bmm_small);
  m.impl("dequantize_fp8", &dequantize_fp8);
#if defined(EXPERTMESH_PAIR_LINEAR)
  m.impl("linear_packed", &linear_packed);
  m.impl("swiglu_packed", &swiglu_packed);
  m.impl("linear_packed_fp8", &linear_packed_fp8);
  m.impl("swiglu_packed_fp8", &swiglu_packed_fp8);
#endif
}
