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
// blocking wins. Where the CPU has AMX (amx.h), bf16 takes the tile unit instead, for every expert
// at any row count (max_rows does not apply there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "cpu_vec.h"
#include "fp8.h"
#include "ops.h"
#include "pair_gemm.h"

namespace {

using namespace expertmesh_cpu;

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

constexpr int64_t ROW_BLOCK = 32;  // weight rows per task: gate/up rows of phase 1, down rows of phase 2

constexpr int64_t TB = 16;  // tokens per block of the pair layout (an AMX B tile)

// rows [m, K] (K even) -> P [ceil(m / 16), K / 2, 16, 2] (pack_pairs' layout of the rows), missing
// tokens zero
void pack_tokens(const bf16* X, int64_t m, int64_t K, bf16* P) {
  const int64_t K2 = K / 2, tbs = (m + TB - 1) / TB;
  for (int64_t tb = 0; tb < tbs; ++tb)
    for (int64_t k2 = 0; k2 < K2; ++k2) {
      bf16* dst = P + (tb * K2 + k2) * 2 * TB;
      for (int64_t t = 0; t < TB; ++t) {
        const int64_t row = tb * TB + t;
        if (row < m) {
          dst[2 * t] = X[row * K + 2 * k2];
          dst[2 * t + 1] = X[row * K + 2 * k2 + 1];
        } else {
          dst[2 * t] = dst[2 * t + 1] = bf16(0.f);
        }
      }
    }
}

#if defined(__AVX512BF16__)
// silu(gate) * up for 16 tokens of intermediate rows i and i + 1 (g0/u0 and g1/u1: 16 fp32 each),
// rounded as the reference's bf16 ops round them (gate and up, silu, the product), tokens past
// `live` zero: the 16 (i, i + 1) pairs of the pair layout phase 2 multiplies, stored at dst
inline void act_pairs(const float* g0, const float* u0, const float* g1, const float* u1, __mmask16 live, bf16* dst) {
  // (a[0], b[0]), (a[1], b[1]), ... from a in the low half, b in the high half
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* g[2] = {g0, g1};
  const float* u[2] = {u0, u1};
  __m512 act[2];
  for (int r = 0; r < 2; ++r) {
    const __m512 gv = vround_bf16(_mm512_loadu_ps(g[r]));
    const __m512 uv = vround_bf16(_mm512_loadu_ps(u[r]));
    const __m512 sg = vround_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
    act[r] = _mm512_maskz_mov_ps(live, _mm512_mul_ps(sg, uv));
  }
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(act[1], act[0]);  // act[0] low, act[1] high
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, both));
}
#endif

#if defined(EXPERTMESH_AMX)
// ---- bf16 on the AMX tile unit ------------------------------------------------------------------
// The weights stay dense, [rows, K] row-major: 16 weight rows x 32 k of them are exactly a tile's
// A operand, so the tile multiply runs transposed, C[weight row, token] = W . X^T, and only the
// tokens (a few per expert) are rearranged into the B operand's pair layout [16-token block][K/2]
// [16][2]. Phase 1 holds an expert's gate and up tiles for the same 16 intermediate rows side by
// side (A = gate, A' = up; B, B' two token blocks), so silu(gate) * up is formed straight from the
// accumulators and written into phase 2's B layout; phase 2 takes 32 hidden rows at a time.
// Rounding is the reference's: gate and up to bf16 after their matmul, silu, the product, the output.
// C0 += A0 . B0, C1 += A1 . B0 (and with B1 into C2, C3 when `two`) over K = 32 * chunks, A0/A1
// dense weight rows with `lda` elements per row, B0 the pair-packed tokens (B1 = B0 + the next
// block). The 16 rows of A0 (and of A1) are one contiguous region, and the next task's rows lie
// `ahead` rows further (0: no prefetch): each chunk fetches 1 KB of both next regions into L2, so
// the weights stream (32 rows read 64 bytes at a time are more streams than the hardware
// prefetcher follows).
inline void amx_weight_tokens(const bf16* A0, const bf16* A1, int64_t lda, const bf16* B0, const bf16* B1,
                              int64_t chunks, bool two, int64_t ahead) {
  const int64_t stride = lda * 2, per_chunk = 16 * lda * 2 / chunks;
  const char* next0 = reinterpret_cast<const char*>(A0 + ahead * lda);
  const char* next1 = reinterpret_cast<const char*>(A1 + ahead * lda);
  for (int64_t kc = 0; kc < chunks; ++kc) {
    if (ahead > 0)
      for (int64_t o = kc * per_chunk; o < (kc + 1) * per_chunk; o += 64) {
        _mm_prefetch(next0 + o, _MM_HINT_T1);
        _mm_prefetch(next1 + o, _MM_HINT_T1);
      }
    _tile_loadd(4, A0 + kc * 32, stride);
    _tile_loadd(5, A1 + kc * 32, stride);
    _tile_loadd(6, B0 + kc * 16 * 2 * TB, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (two) {
      _tile_loadd(7, B1 + kc * 16 * 2 * TB, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Writes the FFN rows of `experts` (each with more rows than the vector kernel takes) into out.
void grouped_ffn_amx(const bf16* X, const bf16* W13, const bf16* W2, int64_t H, int64_t I,
                     const std::vector<int64_t>& experts, const std::vector<int64_t>& counts,
                     const std::vector<int64_t>& start, bf16* O) {
  const int64_t H2 = H / 2, I2 = I / 2, A = static_cast<int64_t>(experts.size());
  std::vector<int64_t> pstart(A + 1, 0);  // 16-token blocks before experts[i]
  for (int64_t i = 0; i < A; ++i) pstart[i + 1] = pstart[i] + (counts[experts[i]] + TB - 1) / TB;
  // every element of both is written before it is read (pack_tokens pads, phase 1 zeroes missing
  // tokens); kept per calling thread so a prefill does not page-fault tens of MB in on every layer
  thread_local std::vector<bf16> xp_buf, ap_buf;
  xp_buf.resize(std::max<size_t>(xp_buf.size(), pstart[A] * H2 * 2 * TB));
  ap_buf.resize(std::max<size_t>(ap_buf.size(), pstart[A] * I2 * 2 * TB));
  bf16* const xp = xp_buf.data();
  bf16* const ap = ap_buf.data();
  at::parallel_for(0, pstart[A], 1, [&](int64_t begin, int64_t end) {  // one task per 16-token block
    for (int64_t i = 0; i < A; ++i) {
      const int64_t e = experts[i];
      for (int64_t blk = std::max(begin, pstart[i]); blk < std::min(end, pstart[i + 1]); ++blk) {
        const int64_t row0 = (blk - pstart[i]) * TB, m = std::min<int64_t>(TB, counts[e] - row0);
        pack_tokens(X + (start[e] + row0) * H, m, H, xp + blk * H2 * 2 * TB);
      }
    }
  });
  // phase 1: one task per (expert, 16 intermediate rows): act = silu(gate) * up, in phase 2's B layout
  const int64_t nb1 = I / 16;
  at::parallel_for(0, A * nb1, 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    alignas(64) float C[4][16 * 16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / nb1, e = experts[i], n0 = (task % nb1) * 16, m = counts[e];
      const bf16* gate = W13 + (e * 2 * I + n0) * H;
      const bf16* up = gate + I * H;
      const int64_t tbs = pstart[i + 1] - pstart[i];
      for (int64_t tb = 0; tb < tbs; tb += 2) {
        const bool two = tb + 1 < tbs;
        tiles_zero4();
        const bf16* b0 = xp + (pstart[i] + tb) * H2 * 2 * TB;
        amx_weight_tokens(gate, up, H, b0, b0 + H2 * 2 * TB, H / 32, two, tb == 0 ? 16 : 0);
        float* const c[4] = {C[0], C[1], C[2], C[3]};
        tiles_store4(c, 64, two);
        for (int half = 0; half < (two ? 2 : 1); ++half) {
          const int64_t blk = tb + half, valid = std::min<int64_t>(TB, m - blk * TB);
          const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1u);
          bf16* dst = ap + (pstart[i] + blk) * I2 * 2 * TB + (n0 / 2) * 2 * TB;
          for (int n = 0; n < 16; n += 2)
            act_pairs(C[2 * half] + n * 16, C[2 * half + 1] + n * 16, C[2 * half] + (n + 1) * 16,
                      C[2 * half + 1] + (n + 1) * 16, live, dst + (n / 2) * 2 * TB);
        }
      }
    }
  });
  // phase 2: one task per (expert, 32 hidden rows): out rows = act W2^T
  const int64_t nb2 = H / 32;
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  at::parallel_for(0, A * nb2, 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    alignas(64) float C[4][16 * 16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / nb2, e = experts[i], h0 = (task % nb2) * 32, m = counts[e], s = start[e];
      const bf16* w = W2 + (e * H + h0) * I;
      const int64_t tbs = pstart[i + 1] - pstart[i];
      for (int64_t tb = 0; tb < tbs; tb += 2) {
        const bool two = tb + 1 < tbs;
        tiles_zero4();
        const bf16* b0 = ap + (pstart[i] + tb) * I2 * 2 * TB;
        amx_weight_tokens(w, w + 16 * I, I, b0, b0 + I2 * 2 * TB, I / 32, two, tb == 0 ? 32 : 0);
        float* const c[4] = {C[0], C[1], C[2], C[3]};
        tiles_store4(c, 64, two);
        for (int half = 0; half < (two ? 2 : 1); ++half) {
          const int64_t blk = tb + half, valid = std::min<int64_t>(TB, m - blk * TB);
          for (int64_t t = 0; t < valid; ++t) {  // C is [hidden row][token]: a column per output row
            bf16* o = O + (s + blk * TB + t) * H + h0;
            const __m512 lo = _mm512_i32gather_ps(column, C[2 * half] + t, 4);
            const __m512 hi = _mm512_i32gather_ps(column, C[2 * half + 1] + t, 4);
            _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          }
        }
      }
    }
  });
}

bool amx_fits(int64_t H, int64_t I) { return H % 32 == 0 && I % 32 == 0 && amx_ready(); }
#endif

#if defined(__AVX512BF16__)
// ---- bf16 experts with many rows on vdpbf16ps (AVX512-BF16; AMX CPUs use their tiles) ------------
// A prefill's experts: the weights stay dense and serve as the GEMM's broadcast rows, the expert's
// tokens are packed in the pair layout (as AMX's B operand), so C = W . X^T runs on pair_gemm.h's
// tiles; silu(gate) * up is formed from phase 1's columns straight into phase 2's pair layout, and
// phase 2's columns are the output rows. Rounding is the reference's: gate and up to bf16 after their
// matmul, silu, the product, the output. at::linear per expert re-laid each expert's weights out on
// every call (oneDNN's reorder): 3072 rows over 64 experts of `small` 20 -> 9 ms a layer.
void expert_ffn_pairs(const bf16* X, int64_t m, const bf16* W13, const bf16* W2, int64_t H, int64_t I, bf16* O) {
  const int64_t nb = ((m + TB - 1) / TB + 1) / 2 * 2, cols = nb * TB;  // token blocks, even
  thread_local std::vector<bf16> xp, ap;
  thread_local std::vector<float> c1, c2;
  xp.resize(std::max<size_t>(xp.size(), nb * H * TB));
  ap.resize(std::max<size_t>(ap.size(), nb * I * TB));
  c1.resize(std::max<size_t>(c1.size(), 2 * I * cols));
  c2.resize(std::max<size_t>(c2.size(), H * cols));
  pack_tokens(X, m, H, xp.data());
  std::fill(xp.data() + (m + TB - 1) / TB * H * TB, xp.data() + nb * H * TB, bf16(0.f));
  pair_gemm_serial(W13, H, 2 * I, H / 2, xp.data(), nb, c1.data(), cols);  // [2I, cols]
  const int64_t I2 = I / 2;
  for (int64_t tb = 0; tb < nb; ++tb) {
    const int64_t valid = std::clamp<int64_t>(m - tb * TB, 0, TB);
    const __mmask16 live = static_cast<__mmask16>(valid == TB ? 0xFFFFu : (1u << valid) - 1u);
    for (int64_t i = 0; i < I; i += 2) {
      const float* g = c1.data() + i * cols + tb * TB;  // rows i and i + 1 of gate, then of up
      act_pairs(g, g + I * cols, g + cols, g + (I + 1) * cols, live, ap.data() + (tb * I2 + i / 2) * 2 * TB);
    }
  }
  pair_gemm_serial(W2, I, H, I2, ap.data(), nb, c2.data(), cols);  // [H, cols]
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(cols)));
  for (int64_t t = 0; t < m; ++t)  // C2 is [hidden row][token]: a column per output row
    for (int64_t h = 0; h < H; h += 32) {
      const __m512 lo = _mm512_i32gather_ps(column, c2.data() + h * cols + t, 4);
      const __m512 hi = _mm512_i32gather_ps(column, c2.data() + (h + 16) * cols + t, 4);
      _mm512_storeu_si512(O + t * H + h, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

inline bool pairs_fit(int64_t H, int64_t I) { return H % 32 == 0 && I % 32 == 0; }
#endif

// The experts with at most max_rows rows each, on the vector kernel: phase 1 act = silu(x W1^T) *
// (x W3^T), one task per (expert, block of intermediate columns); phase 2 out = act W2^T, one task
// per (expert, block of hidden columns), tasks writing disjoint cells. rows13(e, r0, nr, scratch)
// and rows2 give rows [r0, r0 + nr) of expert e's w13 / w2 in T, contiguous: the dense weights in
// place, or (scratch_rows > 0) FP8 ones dequantized into `scratch` (scratch_rows rows of the widest).
// Each expert's first row in xs (rows sorted by expert), and the experts with rows split at max_rows:
// `small` for the vector kernel (the most rows of one of them: `widest`), `big` for the GEMM paths.
struct ExpertSplit {
  std::vector<int64_t> start, small, big;
  int64_t widest = 0, big_rows = 0;
  ExpertSplit(const std::vector<int64_t>& counts, int64_t max_rows) : start(counts.size() + 1, 0) {
    for (size_t e = 0; e < counts.size(); ++e) {
      start[e + 1] = start[e] + counts[e];
      if (counts[e] == 0) continue;
      if (counts[e] <= max_rows) {
        small.push_back(static_cast<int64_t>(e));
        widest = std::max(widest, counts[e]);
      } else {
        big.push_back(static_cast<int64_t>(e));
        big_rows += counts[e];
      }
    }
  }
};

template <typename T, typename Rows13, typename Rows2>
void small_ffn(const at::Tensor& xs, const std::vector<int64_t>& small, const std::vector<int64_t>& counts,
               const std::vector<int64_t>& start, int64_t widest, int64_t I, at::Tensor& out, int64_t scratch_rows,
               Rows13 rows13, Rows2 rows2) {
  const int64_t N = xs.size(0), H = xs.size(1);
  // the FFN's hidden rows, in T: each value is rounded to T anyway (silu(gate) * up, as the
  // reference's bf16 ops give it), so phase 2 reads them as bf16 pairs where the CPU has them
  at::Tensor act = at::empty({N, I}, xs.options());
  const T* X = xs.data_ptr<T>();
  T* A = act.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t nb1 = (I + ROW_BLOCK - 1) / ROW_BLOCK, nb2 = (H + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t S = static_cast<int64_t>(small.size());
  at::parallel_for(0, S * nb1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(widest * ROW_BLOCK), up(widest * ROW_BLOCK);
    std::vector<T> sg(scratch_rows * H), su(scratch_rows * H);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = small[t / nb1], n0 = (t % nb1) * ROW_BLOCK, nr = std::min(ROW_BLOCK, I - n0);
      const int64_t s = start[e], m = counts[e];
      matmul_small(rows13(e, n0, nr, sg.data()), H, nr, X + s * H, H, m, gate.data(), ROW_BLOCK);
      matmul_small(rows13(e, I + n0, nr, su.data()), H, nr, X + s * H, H, m, up.data(), ROW_BLOCK);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t n = 0; n < nr; ++n) {
          const float g = round_as<T>(gate[j * ROW_BLOCK + n]), u = round_as<T>(up[j * ROW_BLOCK + n]);
          A[(s + j) * I + n0 + n] = static_cast<T>(round_as<T>(silu(g)) * u);
        }
    }
  });
  at::parallel_for(0, S * nb2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(widest * ROW_BLOCK);
    std::vector<T> sd(scratch_rows * I);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = small[t / nb2], h0 = (t % nb2) * ROW_BLOCK, hr = std::min(ROW_BLOCK, H - h0);
      const int64_t s = start[e], m = counts[e];
      matmul_small(rows2(e, h0, hr, sd.data()), I, hr, A + s * I, I, m, acc.data(), ROW_BLOCK);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t h = 0; h < hr; ++h) O[(s + j) * H + h0 + h] = static_cast<T>(acc[j * ROW_BLOCK + h]);
    }
  });
}

template <typename T>
at::Tensor grouped_ffn_impl(const at::Tensor& xs, const at::Tensor& w13, const at::Tensor& w2,
                            const std::vector<int64_t>& counts, int64_t max_rows) {
  const int64_t N = xs.size(0), H = xs.size(1), I = w2.size(2), E = w13.size(0);
  at::Tensor out = at::empty_like(xs);
  if (N == 0) return out;
  const ExpertSplit sp(counts, max_rows);
  const std::vector<int64_t>&start = sp.start, &small = sp.small, &big = sp.big;
  const int64_t widest = sp.widest;
  bool big_done = false;  // the experts past max_rows computed by a tile or pair path
#if defined(EXPERTMESH_AMX)
  if constexpr (std::is_same_v<T, bf16>) {
    big_done = !big.empty() && amx_fits(H, I);
    if (big_done)
      grouped_ffn_amx(xs.data_ptr<bf16>(), w13.data_ptr<bf16>(), w2.data_ptr<bf16>(), H, I, big, counts, start,
                      out.data_ptr<bf16>());
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    if (!big_done && !big.empty() && pairs_fit(H, I)) {
      const bf16* X = xs.data_ptr<bf16>();
      bf16* Y = out.data_ptr<bf16>();
      at::parallel_for(0, static_cast<int64_t>(big.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t e = big[i];
          expert_ffn_pairs(X + start[e] * H, counts[e], w13.data_ptr<bf16>() + e * 2 * I * H,
                           w2.data_ptr<bf16>() + e * H * I, H, I, Y + start[e] * H);
        }
      });
      big_done = true;
    }
  }
#endif
#if defined(__AVX512F__)
  constexpr bool upcast = false;
#else
  // no AVX-512: oneDNN has no bf16 matmul here and emulates it at 4-7x its fp32 time, so bf16
  // experts run their matmuls in fp32 (weights widened per call: ~7% of the matmuls' time),
  // rounded to bf16 where a bf16 linear rounds its output
  constexpr bool upcast = std::is_same_v<T, bf16>;
#endif
  const auto linear = [&](const at::Tensor& a, const at::Tensor& w) {
    return upcast ? at::linear(a.to(at::kFloat), w.to(at::kFloat)).to(a.scalar_type()) : at::linear(a, w);
  };
  if (!big_done)
    for (int64_t e : big) {
      at::Tensor rows = xs.narrow(0, start[e], counts[e]);
      auto gu = linear(rows, w13[e]).chunk(2, -1);
      out.narrow(0, start[e], counts[e]).copy_(linear(at::silu(gu[0]) * gu[1], w2[e]));
    }
  if (small.empty()) return out;

  const T* W13 = w13.data_ptr<T>();
  const T* W2 = w2.data_ptr<T>();
  small_ffn<T>(xs, small, counts, start, widest, I, out, 0,
            [&](int64_t e, int64_t r0, int64_t, T*) { return W13 + (e * 2 * I + r0) * H; },
            [&](int64_t e, int64_t h0, int64_t, T*) { return W2 + (e * H + h0) * I; });
  return out;
}

// counts as a vector, after checking there is one per expert, none negative, summing to the rows
std::vector<int64_t> checked_counts(at::IntArrayRef counts, int64_t E, int64_t rows, int64_t max_rows, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, op, ": one count per expert");
  TORCH_CHECK(max_rows >= 0, op, ": max_rows >= 0");
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, op, ": counts are non-negative");
    total += c;
  }
  TORCH_CHECK(total == rows, op, ": counts sum to xs.size(0)");
  return {counts.begin(), counts.end()};
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
  const std::vector<int64_t> cs = checked_counts(counts, E, xs.size(0), max_rows, "grouped_ffn");
  at::Tensor x = xs.contiguous(), a = w13.contiguous(), b = w2.contiguous();
  if (x.scalar_type() == at::kFloat) return grouped_ffn_impl<float>(x, a, b, cs, max_rows);

  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "grouped_ffn: float32 or bfloat16, not ", x.scalar_type());
  return grouped_ffn_impl<bf16>(x, a, b, cs, max_rows);
}

// ---- FP8-resident experts: e4m3 weights with fp32 block scales, dequantized row block by row block
// Each weight row is dequantized to the compute dtype T right before its dot products (into a
// per-thread block of 32 rows that stays in L1/L2), with the values the dequantize-at-load path
// holds: T(e4m3 * scale), the fp32 product rounded once. The dot products then run the dense
// kernel's code on them, so the outputs are bitwise the dense experts'; the weights stream at 1 byte
// each instead of 2 (bf16) or 4. Experts past max_rows are dequantized whole and take the dense
// big-expert path (tiles, pair GEMMs or at::linear), also bitwise.
//
//   expertmesh::grouped_ffn_fp8(xs [N, H], w13 [E, 2I, H] e4m3, w2 [E, H, I] e4m3, s1, s3 [E, I/br,
//                               H/bc], s2 [E, H/br, I/bc] fp32 (cropped edge blocks rounded up),
//                               block_rows, block_cols, counts [E], max_rows) -> [N, H] (xs' dtype)

template <typename T>
at::Tensor grouped_ffn_fp8_impl(const at::Tensor& xs, const uint8_t* W13, const uint8_t* W2, const float* S1,
                                const float* S3, const float* S2, int64_t E, int64_t I, int64_t br, int64_t bc,
                                const std::vector<int64_t>& counts, int64_t max_rows) {
  const int64_t N = xs.size(0), H = xs.size(1);
  const int64_t gr1 = (I + br - 1) / br, gc1 = (H + bc - 1) / bc, gr2 = (H + br - 1) / br, gc2 = (I + bc - 1) / bc;
  at::Tensor out = at::empty_like(xs);
  if (N == 0) return out;
  const ExpertSplit sp(counts, max_rows);
  const std::vector<int64_t>&start = sp.start, &small = sp.small, &big = sp.big;
  // the scales of weight row r of expert e's w13 (gate rows, then up rows with their own grid) and w2
  const auto w13_grid = [&](int64_t e, int64_t r) {
    const bool up = r >= I;
    return (up ? S3 : S1) + (e * gr1 + (up ? r - I : r) / br) * gc1;
  };
  const auto w2_grid = [&](int64_t e, int64_t h) { return S2 + (e * gr2 + h / br) * gc2; };
  // rows [r0, r0 + nr) of expert e's w13 / w2 into dst
  const auto w13_rows = [&](int64_t e, int64_t r0, int64_t nr, T* dst) {
    dequant_rows(W13 + (e * 2 * I + r0) * H, nr, H, [&](int64_t r) { return w13_grid(e, r0 + r); }, bc, dst);
  };
  const auto w2_rows = [&](int64_t e, int64_t h0, int64_t nr, T* dst) {
    dequant_rows(W2 + (e * H + h0) * I, nr, I, [&](int64_t h) { return w2_grid(e, h0 + h); }, bc, dst);
  };
  if (!big.empty()) {  // dequantized whole, through the dense experts' big path
    const int64_t B = static_cast<int64_t>(big.size());
    at::Tensor d13 = at::empty({B, 2 * I, H}, xs.options()), d2 = at::empty({B, H, I}, xs.options());
    at::Tensor bx = at::empty({sp.big_rows, H}, xs.options());
    std::vector<int64_t> bcounts(B);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        w13_rows(big[i], 0, 2 * I, d13.data_ptr<T>() + i * 2 * I * H);
        w2_rows(big[i], 0, H, d2.data_ptr<T>() + i * H * I);
      }
    });
    int64_t at_row = 0;
    for (int64_t i = 0; i < B; ++i) {
      bcounts[i] = counts[big[i]];
      bx.narrow(0, at_row, bcounts[i]).copy_(xs.narrow(0, start[big[i]], bcounts[i]));
      at_row += bcounts[i];
    }
    at::Tensor by = grouped_ffn_impl<T>(bx, d13, d2, bcounts, max_rows);
    at_row = 0;
    for (int64_t i = 0; i < B; ++i) {
      out.narrow(0, start[big[i]], bcounts[i]).copy_(by.narrow(0, at_row, bcounts[i]));
      at_row += bcounts[i];
    }
  }
  if (small.empty()) return out;
  small_ffn<T>(xs, small, counts, start, sp.widest, I, out, ROW_BLOCK,
            [&](int64_t e, int64_t r0, int64_t nr, T* dst) {
              w13_rows(e, r0, nr, dst);
              return static_cast<const T*>(dst);
            },
            [&](int64_t e, int64_t h0, int64_t nr, T* dst) {
              w2_rows(e, h0, nr, dst);
              return static_cast<const T*>(dst);
            });
  return out;
}

at::Tensor grouped_ffn_fp8(const at::Tensor& xs, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& s1,
                           const at::Tensor& s3, const at::Tensor& s2, int64_t block_rows, int64_t block_cols,
                           at::IntArrayRef counts, int64_t max_rows) {
  TORCH_CHECK(xs.device().is_cpu() && w13.device().is_cpu() && w2.device().is_cpu(), "grouped_ffn_fp8: CPU tensors");
  TORCH_CHECK(w13.scalar_type() == at::kFloat8_e4m3fn && w2.scalar_type() == at::kFloat8_e4m3fn,
              "grouped_ffn_fp8: w13 and w2 float8_e4m3fn");
  TORCH_CHECK(s1.scalar_type() == at::kFloat && s3.scalar_type() == at::kFloat && s2.scalar_type() == at::kFloat,
              "grouped_ffn_fp8: fp32 scales");
  TORCH_CHECK(xs.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, "grouped_ffn_fp8: xs [N, H], w13 [E, 2I, H], w2 [E, H, I]");
  const int64_t E = w13.size(0), H = xs.size(1), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(0) == E && w2.size(1) == H,
              "grouped_ffn_fp8: shapes disagree");
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "grouped_ffn_fp8: positive block sizes");
  const int64_t gr1 = (I + block_rows - 1) / block_rows, gc1 = (H + block_cols - 1) / block_cols;
  const int64_t gr2 = (H + block_rows - 1) / block_rows, gc2 = (I + block_cols - 1) / block_cols;
  TORCH_CHECK(s1.numel() == E * gr1 * gc1 && s3.numel() == E * gr1 * gc1 && s2.numel() == E * gr2 * gc2,
              "grouped_ffn_fp8: one scale per block of each projection");
  const std::vector<int64_t> cs = checked_counts(counts, E, xs.size(0), max_rows, "grouped_ffn_fp8");
  at::Tensor x = xs.contiguous(), a = w13.contiguous(), b = w2.contiguous();
  at::Tensor c1 = s1.contiguous(), c3 = s3.contiguous(), c2 = s2.contiguous();
  const auto* A = static_cast<const uint8_t*>(a.data_ptr());
  const auto* B = static_cast<const uint8_t*>(b.data_ptr());
  if (x.scalar_type() == at::kFloat)
    return grouped_ffn_fp8_impl<float>(x, A, B, c1.data_ptr<float>(), c3.data_ptr<float>(), c2.data_ptr<float>(), E,
                                       I, block_rows, block_cols, cs, max_rows);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "grouped_ffn_fp8: float32 or bfloat16 rows, not ", x.scalar_type());
  return grouped_ffn_fp8_impl<bf16>(x, A, B, c1.data_ptr<float>(), c3.data_ptr<float>(), c2.data_ptr<float>(), E, I,
                                    block_rows, block_cols, cs, max_rows);
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

// The (token, choice) pairs of ids in stable expert order, and their rows of x gathered
struct Routed {
  std::vector<int64_t> counts;  // rows per local expert
  at::Tensor order;             // [T * k] the pairs' flat indices, expert by expert
  at::Tensor xs;                // [T * k, H] x's row of each pair, in that order
};

Routed route_rows(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, int64_t E, int64_t first) {
  TORCH_CHECK(x.device().is_cpu() && ids.device().is_cpu() && weights.device().is_cpu(), "moe_experts: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "moe_experts: x [T, H], ids and weights [T, k]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "moe_experts: ids int64, weights float32");
  const int64_t T = x.size(0), k = ids.size(1), N = T * k;
  at::Tensor idc = ids.contiguous();
  const int64_t* I = idc.data_ptr<int64_t>();
  Routed r{std::vector<int64_t>(E, 0), at::empty({N}, idc.options()), at::empty({N, x.size(1)}, x.options())};
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = I[i] - first;
    TORCH_CHECK(e >= 0 && e < E, "moe_experts: expert ", I[i], " is not one of [", first, ", ", first + E, ")");
    ++r.counts[e];
  }
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + r.counts[e - 1];
  int64_t* O = r.order.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) O[next[I[i] - first]++] = i;  // stable: ascending (token, choice) per expert
  at::Tensor xc = x.contiguous();
  const int64_t row = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(r.xs.data_ptr());
  for (int64_t i = 0; i < N; ++i) std::memcpy(dst + i * row, src + (O[i] / k) * row, row);
  return r;
}

// The whole routed-experts step of a MoE layer whose experts all live here, in one call: the
// (token, choice) pairs in stable expert order, their rows gathered, grouped_ffn, combine. The
// same values as permute_by_expert + gather_rows + grouped_ffn + combine (experts.py), without
// their eight small torch ops (~100 us a MoE layer at decode sizes).
//   expertmesh::moe_experts(x [T, H], ids [T, k] (global expert ids), weights [T, k] fp32,
//                           w13 [E, 2I, H], w2 [E, H, I], first, max_rows) -> [T, H] fp32
//   expertmesh::moe_experts_fp8(x, ids, weights, w13, w2 (e4m3), s1, s3, s2, block_rows, block_cols,
//                               first, max_rows): the same through grouped_ffn_fp8
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w13,
                       const at::Tensor& w2, int64_t first, int64_t max_rows) {
  const Routed r = route_rows(x, ids, weights, w13.size(0), first);
  return combine(grouped_ffn(r.xs, w13, w2, r.counts, max_rows), r.order, weights);
}

at::Tensor moe_experts_fp8(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w13,
                           const at::Tensor& w2, const at::Tensor& s1, const at::Tensor& s3, const at::Tensor& s2,
                           int64_t block_rows, int64_t block_cols, int64_t first, int64_t max_rows) {
  const Routed r = route_rows(x, ids, weights, w13.size(0), first);
  return combine(grouped_ffn_fp8(r.xs, w13, w2, s1, s3, s2, block_rows, block_cols, r.counts, max_rows), r.order,
                 weights);
}

// A whole MoE layer whose experts all live here, in one call: moe_gate (route_cpu.cpp), the
// routed experts (moe_experts) rounded to x's dtype, plus the shared experts (swiglu_packed,
// linear_cpu.cpp) where given, and the layer's expert load counted -- what MoE.forward chains,
// bitwise, without the ~8 torch-level calls around them (~20 us each at one token, caches cold).
//   expertmesh::moe_layer(x [T, H] bf16, gate_w [n_experts, H] fp32, bias [n_experts] fp32, n_group,
//                         topk_group, top_k, normalize, scaling, w13, w2, first, max_rows,
//                         shared_gate_up?, shared_down? (pack_pairs), load [n_experts] int64 (a!),
//                         norm_w?, norm_eps) -> [T, H] bf16; load[e] += the (token, choice) pairs
//                         routed to e. With norm_w (the layer's post-attention RMSNorm) the decoder
//                         layer's residual block: x + moe(rms_norm(x)).
at::Tensor moe_layer(const at::Tensor& x, const at::Tensor& gate_w, const at::Tensor& bias, int64_t n_group,
                     int64_t topk_group, int64_t top_k, bool normalize, double scaling, const at::Tensor& w13,
                     const at::Tensor& w2, int64_t first, int64_t max_rows, const std::optional<at::Tensor>& shared_gate_up,
                     const std::optional<at::Tensor>& shared_down, const at::Tensor& load,
                     const std::optional<at::Tensor>& norm_w, double norm_eps) {
  TORCH_CHECK(load.device().is_cpu() && load.scalar_type() == at::kLong && load.dim() == 1 &&
                  load.is_contiguous() && load.size(0) == gate_w.size(0),
              "moe_layer: load [n_experts] int64, contiguous, on the CPU");
  TORCH_CHECK(shared_gate_up.has_value() == shared_down.has_value(), "moe_layer: shared_gate_up and shared_down together");
  const at::Tensor h = norm_w.has_value() ? ops::rms_norm().call(x, *norm_w, norm_eps) : x;
  const auto [ids, weights] = ops::moe_gate().call(h, gate_w, bias, n_group, topk_group, top_k, normalize, scaling);
  at::Tensor out = moe_experts(h, ids, weights, w13, w2, first, max_rows).to(h.scalar_type());
  const int64_t* I = ids.data_ptr<int64_t>();
  int64_t* L = load.data_ptr<int64_t>();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i) ++L[I[i]];  // ids come from the gate: < n_experts
  if (shared_gate_up.has_value()) out = out + ops::swiglu_packed().call(h, *shared_gate_up, *shared_down, h.size(1));
  return norm_w.has_value() ? x + out : out;
}

// Which vector width this build runs: 16 (AVX-512), 8 (AVX2 + FMA) or 1 (scalar).
int64_t vector_width() { return VL; }

// Whether bf16 experts past max_rows take the pair GEMMs (expert_ffn_pairs) rather than at::linear.
bool has_pair_experts() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(expertmesh, m) {
  m.def("grouped_ffn(Tensor xs, Tensor w13, Tensor w2, int[] counts, int max_rows) -> Tensor");
  m.def("combine(Tensor outs, Tensor order, Tensor weights) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor w2, int first, int max_rows) -> Tensor");
  m.def("moe_layer(Tensor x, Tensor gate_w, Tensor bias, int n_group, int topk_group, int top_k, bool normalize, "
        "float scaling, Tensor w13, Tensor w2, int first, int max_rows, Tensor? shared_gate_up, Tensor? shared_down, "
        "Tensor(a!) load, Tensor? norm_w=None, float norm_eps=1e-6) -> Tensor");
  m.def("vector_width() -> int", &vector_width);
  m.def("has_pair_experts() -> bool", &has_pair_experts);
  m.def("grouped_ffn_fp8(Tensor xs, Tensor w13, Tensor w2, Tensor s1, Tensor s3, Tensor s2, int block_rows, "
        "int block_cols, int[] counts, int max_rows) -> Tensor");
  m.def("moe_experts_fp8(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor w2, Tensor s1, Tensor s3, "
        "Tensor s2, int block_rows, int block_cols, int first, int max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("grouped_ffn", &grouped_ffn);
  m.impl("combine", &combine);
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_layer", &moe_layer);
  m.impl("grouped_ffn_fp8", &grouped_ffn_fp8);
  m.impl("moe_experts_fp8", &moe_experts_fp8);
}
