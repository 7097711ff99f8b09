// bf16 rows times a weight in the pair layout of kernels.pack_pairs ([N/16, K/2, 16, 2]: the 64
// bytes at [b, k2] hold the (2 k2, 2 k2 + 1) pair of 16 consecutive outputs) on AVX512-BF16: one
// vdpbf16ps per (block, pair, row) adds into 16 outputs at once and the weight streams
// sequentially, block after block, with no horizontal sums. linear_packed's vector path and MLA's
// GEMMs against a shared prefix (its keys and its values packed in the same layout) share it.
#pragma once

#include "cpu_vec.h"

#if defined(__AVX512BF16__)
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace expertmesh_cpu {

constexpr int PT = 6;  // rows per tile: 2 blocks x 6 rows = 12 accumulators

// acc[i][j] += the (2 k2, 2 k2 + 1) pair of row j (ldx elements apart) times w0 (i = 0) and w1:
// one pair of both blocks' 16 outputs
template <int M>
inline void pair_step(__m512bh w0, __m512bh w1, const bf16* x, int64_t ldx, int64_t k2, __m512 (&acc)[2][M]) {
  for (int j = 0; j < M; ++j) {
    int32_t pair;
    std::memcpy(&pair, x + j * ldx + 2 * k2, sizeof(pair));
    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
    acc[0][j] = _mm512_dpbf16_ps(acc[0][j], w0, xb);
    acc[1][j] = _mm512_dpbf16_ps(acc[1][j], w1, xb);
  }
}

// out[2 j + i] = rows j (ldx elements apart) . blocks b0 (i = 0) and b1 (i = 1) over K2 pairs, fp32
template <int M>
inline void pair_tile(const bf16* b0, const bf16* b1, const bf16* x, int64_t ldx, int64_t K2, __m512* out) {
  __m512 acc[2][M];
  for (int j = 0; j < M; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    prefetch(b0 + (k2 + 128) * 32, 64);  // 8 KB ahead in each stream (1-2 KB ahead ran 25% slower)
    prefetch(b1 + (k2 + 128) * 32, 64);
    pair_step<M>((__m512bh)_mm512_loadu_si512(b0 + k2 * 32), (__m512bh)_mm512_loadu_si512(b1 + k2 * 32), x, ldx, k2,
                 acc);
  }
  for (int j = 0; j < M; ++j) {
    out[2 * j] = acc[0][j];
    out[2 * j + 1] = acc[1][j];
  }
}

// pair_tile over m <= PT rows
inline void pair_tile_rows(int64_t m, const bf16* b0, const bf16* b1, const bf16* x, int64_t ldx, int64_t K2,
                           __m512* out) {
  switch (m) {
    case 1: pair_tile<1>(b0, b1, x, ldx, K2, out); break;
    case 2: pair_tile<2>(b0, b1, x, ldx, K2, out); break;
    case 3: pair_tile<3>(b0, b1, x, ldx, K2, out); break;
    case 4: pair_tile<4>(b0, b1, x, ldx, K2, out); break;
    case 5: pair_tile<5>(b0, b1, x, ldx, K2, out); break;
    default: pair_tile<6>(b0, b1, x, ldx, K2, out); break;
  }
}

// C[m, n] (fp32, ldc per row) = A[m, :2 K2] . W[n, :2 K2] for m in [m0, m1), the 2 blocks of pair p
inline void pair_gemm_part(const bf16* A, int64_t lda, int64_t m0, int64_t m1, int64_t K2, const bf16* W, int64_t p,
                           float* C, int64_t ldc) {
  __m512 tile[2 * PT];
  const bf16* b0 = W + (2 * p) * K2 * 32;
  for (int64_t j0 = m0; j0 < m1; j0 += PT) {
    const int64_t m = std::min<int64_t>(PT, m1 - j0);
    pair_tile_rows(m, b0, b0 + K2 * 32, A + j0 * lda, lda, K2, tile);
    for (int64_t j = 0; j < m; ++j) {
      float* c = C + (j0 + j) * ldc + 2 * p * 16;
      _mm512_storeu_ps(c, tile[2 * j]);
      _mm512_storeu_ps(c + 16, tile[2 * j + 1]);
    }
  }
}

constexpr int64_t PAIR_MC = 8 * PT;  // rows per task: a chunk's rows stay in L1/L2 while the blocks pass

// The whole product C [M, 16 NB] on this thread (W with NB, even, blocks).
inline void pair_gemm_serial(const bf16* A, int64_t lda, int64_t M, int64_t K2, const bf16* W, int64_t NB, float* C,
                             int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += PAIR_MC)
    for (int64_t p = 0; p < NB / 2; ++p) pair_gemm_part(A, lda, m0, std::min(M, m0 + PAIR_MC), K2, W, p, C, ldc);
}

// The same on torch's thread pool: tasks are (row chunk, block pair).
inline void pair_gemm_f32(const bf16* A, int64_t lda, int64_t M, int64_t K2, const bf16* W, int64_t NB, float* C,
                          int64_t ldc) {
  const int64_t chunks = (M + PAIR_MC - 1) / PAIR_MC, NP = NB / 2;
  at::parallel_for(0, chunks * NP, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / NP) * PAIR_MC;
      pair_gemm_part(A, lda, m0, std::min(M, m0 + PAIR_MC), K2, W, t % NP, C, ldc);
    }
  });
}

}  // namespace expertmesh_cpu
#endif
