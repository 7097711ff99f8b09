// Greedy tokens without the whole bf16 lm_head: greedy decoding needs one index per row, not
// 129280 logits. An int8 copy of the head gives every logit to within a bound; only the logits
// whose bound reaches the best lower bound are computed again from the bf16 weights, and the
// argmax is taken over those. Same token as the bf16 head's argmax (up to the fp32 order of a dot
// product's additions, as any two bf16 matmuls differ). At a few rows the head is bound by reading
// its weights (`small`'s 129280 x 512 bf16 head is 132 MB per step): the int8 copy halves that.
// Where the CPU has AVX512-VNNI the rows are quantized to int8 too and vpdpbusd multiplies 64 int8
// pairs per instruction, twice vdpbf16ps's 32: at a batch of 32 rows, where the bf16 head is
// compute-bound, the screen takes half its arithmetic.
//
//   expertmesh::head_screen_pack(q [Np, K] int8) -> this build's layout of the screen's weights
//   expertmesh::head_screen_argmax(x [M, K] bf16, wp [NB, K/2, 16, 2] bf16 (pack_pairs), n_out,
//                                  w8 (head_screen_pack), stats [4, NB * 16] fp32,
//                                  rowsum128 [NB * 16] int32, max_candidates) -> [M] int64
//   expertmesh::head_screen_vnni() -> bool: whether rows are quantized (the VNNI path)
//
// Row n of the head is W[n] = s_n q_n + d_n (q_n int8, stats[0] = s_n). stats[1] >= |d_n|_2,
// stats[2] >= s_n |q_n|_2, stats[3] = (2K + 16) 2^-24 max_k |W[n, k]| covers both fp32 sums'
// rounding relative to sum_k |x_k|. Without VNNI approx_n = s_n q_n . x and, by Cauchy-Schwarz,
// |W[n] . x - approx_n| <= stats[1] |x|_2 + stats[3] |x|_1. With VNNI x = t u + r (u int8, t its
// scale) and approx_n = s_n t q_n . u (exact in int32: rowsum128 = 128 sum_k q_n[k] undoes the
// +128 that makes u unsigned for vpdpbusd), so the bound gains stats[2] |r|_2. L = max_n (approx_n
// - bound_n) is below the winner's logit, and bf16 rounding is monotone: a row can only win if
// approx_n + bound_n >= L - one bf16 ulp of L. Rows keep their candidates while the blocks stream
// (pruned against the running L), are recomputed from the bf16 weights in ascending n, and the
// first maximum wins, as torch.argmax picks it. A row with more than max_candidates (a flat
// distribution) or a non-finite input returns -1: the caller computes its logits in full.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_vec.h"
#include "pair_gemm.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define EXPERTMESH_SCREEN_VNNI 1
#endif

namespace {

using namespace expertmesh_cpu;

// A quantized query row's terms of the bound: |x|_2, |r|_2 (0 without VNNI), |x|_1, and the
// row's int8 scale t (1 without VNNI). Norms in double, rounded up.
struct RowTerms {
  float norm2 = 0.f, resid2 = 0.f, norm1 = 0.f, scale = 1.f;
  bool finite = true;
};

inline float up(double v) { return static_cast<float>(v * (1.0 + 1e-6)); }

// Candidates of one row seen by one thread: (output index, upper bound), and the running lower
// bound per lane (no horizontal max per block; the lanes' max is the row's bound at the end).
struct RowCands {
  alignas(64) float low[16];
  std::vector<std::pair<int32_t, float>> items;
  RowCands() { std::fill(low, low + 16, -std::numeric_limits<float>::infinity()); }
  float lower_bound() const { return *std::max_element(low, low + 16); }
};

inline float bf16_slack(float L) { return std::max(std::fabs(L) * 0.0078125f, std::numeric_limits<float>::min()); }

// One (row, block of 16 outputs) meets the screen: approximations and bounds per output, the
// running lower bound raised, outputs whose upper bound can still reach it kept.
inline void screen_epilogue(const float* approx, const float* const* st, int64_t n0, int64_t n_out, const RowTerms& rt,
                            RowCands& rc) {
  const int64_t live = std::min<int64_t>(16, n_out - n0);
#if defined(__AVX512F__)
  const __mmask16 m = live >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << live) - 1u);
  const __m512 a = _mm512_maskz_loadu_ps(m, approx);
  __m512 b = _mm512_mul_ps(_mm512_loadu_ps(st[3] + n0), _mm512_set1_ps(rt.norm1));
  b = _mm512_fmadd_ps(_mm512_loadu_ps(st[2] + n0), _mm512_set1_ps(rt.resid2), b);
  b = _mm512_fmadd_ps(_mm512_loadu_ps(st[1] + n0), _mm512_set1_ps(rt.norm2), b);
  b = _mm512_mul_ps(b, _mm512_set1_ps(1.f + 0x1p-20f));
  const __m512 upper = _mm512_add_ps(a, b);
  const __m512 low = _mm512_mask_max_ps(_mm512_load_ps(rc.low), m, _mm512_load_ps(rc.low), _mm512_sub_ps(a, b));
  _mm512_store_ps(rc.low, low);
  // each lane's bound is below the row's: a threshold from it keeps a few more candidates, no fewer
  const __m512 slack = _mm512_max_ps(_mm512_mul_ps(_mm512_abs_ps(low), _mm512_set1_ps(0.0078125f)),
                                     _mm512_set1_ps(std::numeric_limits<float>::min()));
  uint32_t keep = _mm512_mask_cmp_ps_mask(m, upper, _mm512_sub_ps(low, slack), _CMP_GE_OQ);
  if (keep == 0) return;
  alignas(64) float ub[16];
  _mm512_store_ps(ub, upper);
  for (; keep != 0; keep &= keep - 1) {
    const int i = __builtin_ctz(keep);
    rc.items.emplace_back(static_cast<int32_t>(n0 + i), ub[i]);
  }
#else
  float upper[16];
  for (int64_t i = 0; i < live; ++i) {
    const int64_t n = n0 + i;
    const float b = (st[1][n] * rt.norm2 + st[2][n] * rt.resid2 + st[3][n] * rt.norm1) * (1.f + 0x1p-20f);
    upper[i] = approx[i] + b;
    rc.low[0] = std::max(rc.low[0], approx[i] - b);
  }
  const float thr = rc.low[0] - bf16_slack(rc.low[0]);
  for (int64_t i = 0; i < live; ++i)
    if (upper[i] >= thr) rc.items.emplace_back(static_cast<int32_t>(n0 + i), upper[i]);
#endif
}

#if defined(EXPERTMESH_SCREEN_VNNI)
// ---- int8 rows x int8 weights on vpdpbusd ---------------------------------------------------------
// w8 [NB, K4, 16, 4]: the 64 bytes at [b, k4] are 4 consecutive k of 16 outputs, so one vpdpbusd
// with the row's 4 unsigned bytes broadcast adds 4 products into each of the 16 outputs.
constexpr int VB = 2;  // blocks per tile
constexpr int VR = 12;  // rows per tile: 24 accumulators

template <int B, int R>
inline void vnni_tile(const int8_t* w, int64_t K4, const uint8_t* u, int64_t Kp, __m512i* acc) {
  __m512i a[B][R];
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < R; ++j) a[b][j] = _mm512_setzero_si512();
  const int64_t bs = K4 * 64;  // bytes per block
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    __m512i wv[B];
    for (int b = 0; b < B; ++b) {
      prefetch(w + b * bs + (k4 + 64) * 64, 64);  // 4 KB ahead in each block's stream
      wv[b] = _mm512_loadu_si512(w + b * bs + k4 * 64);
    }
    for (int j = 0; j < R; ++j) {
      int32_t quad;
      std::memcpy(&quad, u + j * Kp + 4 * k4, sizeof(quad));
      const __m512i xb = _mm512_set1_epi32(quad);
      for (int b = 0; b < B; ++b) a[b][j] = _mm512_dpbusd_epi32(a[b][j], xb, wv[b]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < R; ++j) acc[b * VR + j] = a[b][j];
}

// One row against one block: the weight is a single sequential stream (the two-block tile reads two
// streams 8 KB apart, ~25% slower from DRAM at one row), four accumulators over k.
inline __m512i vnni_block_row(const int8_t* w, int64_t K4, const uint8_t* u) {
  __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t k4 = 0;
  for (; k4 + 4 <= K4; k4 += 4) {
    prefetch(w + (k4 + 128) * 64, 256);  // 8 KB ahead
    prefetch_far(w + (k4 + 512) * 64, 256);  // 32 KB ahead, into L2
    for (int q = 0; q < 4; ++q) {
      int32_t quad;
      std::memcpy(&quad, u + 4 * (k4 + q), sizeof(quad));
      a[q] = _mm512_dpbusd_epi32(a[q], _mm512_set1_epi32(quad), _mm512_loadu_si512(w + (k4 + q) * 64));
    }
  }
  for (; k4 < K4; ++k4) {
    int32_t quad;
    std::memcpy(&quad, u + 4 * k4, sizeof(quad));
    a[0] = _mm512_dpbusd_epi32(a[0], _mm512_set1_epi32(quad), _mm512_loadu_si512(w + k4 * 64));
  }
  return _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
}

template <int B>
inline void vnni_rows(const int8_t* w, int64_t K4, const uint8_t* u, int64_t Kp, int64_t r, __m512i* acc) {
  switch (r) {
#define EXPERTMESH_VNNI_CASE(R) \
  case R: vnni_tile<B, R>(w, K4, u, Kp, acc); break;
    EXPERTMESH_VNNI_CASE(1) EXPERTMESH_VNNI_CASE(2) EXPERTMESH_VNNI_CASE(3) EXPERTMESH_VNNI_CASE(4)
    EXPERTMESH_VNNI_CASE(5) EXPERTMESH_VNNI_CASE(6) EXPERTMESH_VNNI_CASE(7) EXPERTMESH_VNNI_CASE(8)
    EXPERTMESH_VNNI_CASE(9) EXPERTMESH_VNNI_CASE(10) EXPERTMESH_VNNI_CASE(11)
#undef EXPERTMESH_VNNI_CASE
    default: vnni_tile<B, VR>(w, K4, u, Kp, acc); break;
  }
}

// pass 1: every block against every row, candidates kept per (thread, row)
void screen_pass(const bf16* X, int64_t M, int64_t K, const int8_t* W8, int64_t NB, int64_t n_out,
                 const float* const* st, const int32_t* RS, std::vector<RowTerms>& terms,
                 std::vector<std::vector<RowCands>>& cands) {
  const int64_t Kp = (K + 3) / 4 * 4, K4 = Kp / 4;
  std::vector<uint8_t> u(M * Kp, 128);
  for (int64_t j = 0; j < M; ++j) {
    const bf16* xr = X + j * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(xr[k])));
    RowTerms& t = terms[j];
    t.scale = amax > 0.f ? amax / 127.f : 1.f;
    double n2 = 0.0, r2 = 0.0, n1 = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double x = static_cast<float>(xr[k]);
      const float qf = std::nearbyint(static_cast<float>(xr[k]) / t.scale);
      const float q = std::min(127.f, std::max(-127.f, qf));
      u[j * Kp + k] = static_cast<uint8_t>(static_cast<int>(q) + 128);
      const double r = x - static_cast<double>(q) * t.scale;
      n2 += x * x;
      r2 += r * r;
      n1 += std::fabs(x);
    }
    t.finite = std::isfinite(n1) && std::isfinite(amax);
    t.norm2 = up(std::sqrt(n2));
    t.resid2 = up(std::sqrt(r2));
    t.norm1 = up(n1);
  }
  const int64_t groups = (NB + VB - 1) / VB;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    std::vector<RowCands>& rc = cands[at::get_thread_num()];
    __m512i acc[VB * VR];
    alignas(64) float approx[16];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b0 = g * VB, nb = std::min<int64_t>(VB, NB - b0);
      const int8_t* w = W8 + b0 * K4 * 64;
      for (int64_t j0 = 0; j0 < M; j0 += VR) {
        const int64_t r = std::min<int64_t>(VR, M - j0);
        const uint8_t* uj = u.data() + j0 * Kp;
        if (M == 1)
          for (int64_t b = 0; b < nb; ++b) acc[b * VR] = vnni_block_row(w + b * K4 * 64, K4, uj);
        else if (nb == VB)
          vnni_rows<VB>(w, K4, uj, Kp, r, acc);
        else  // NB is even: the last group may hold two blocks
          vnni_rows<2>(w, K4, uj, Kp, r, acc);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t n0 = (b0 + b) * 16;
          if (n0 >= n_out) break;  // the zero rows padding N to 32
          const __m512i rs = _mm512_loadu_si512(RS + n0);
          const __m512 sc = _mm512_loadu_ps(st[0] + n0);
          for (int64_t j = 0; j < r; ++j) {
            const RowTerms& t = terms[j0 + j];
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[b * VR + j], rs));
            _mm512_store_ps(approx, _mm512_mul_ps(dot, _mm512_mul_ps(sc, _mm512_set1_ps(t.scale))));
            screen_epilogue(approx, st, n0, n_out, t, rc[j0 + j]);
          }
        }
      }
    }
  });
}

at::Tensor pack_layout(const at::Tensor& q) {  // [Np, K] -> [NB, K4, 16, 4], k padded with zeros
  const int64_t Np = q.size(0), K = q.size(1), Kp = (K + 3) / 4 * 4;
  at::Tensor p = at::constant_pad_nd(q, {0, Kp - K}, 0);
  return p.view({Np / 16, 16, Kp / 4, 4}).permute({0, 2, 1, 3}).contiguous();
}
#else
// ---- int8 weights widened to fp32 against the fp32 row ----------------------------------------
// w8 [NB, K, 16]: 16 outputs' k side by side, widened and multiplied with the row broadcast.
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

void screen_pass(const bf16* X, int64_t M, int64_t K, const int8_t* W8, int64_t NB, int64_t n_out,
                 const float* const* st, const int32_t*, std::vector<RowTerms>& terms,
                 std::vector<std::vector<RowCands>>& cands) {
  std::vector<float> xf(M * K);
  for (int64_t j = 0; j < M; ++j) {
    double n2 = 0.0, n1 = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const float x = static_cast<float>(X[j * K + k]);
      xf[j * K + k] = x;
      n2 += static_cast<double>(x) * x;
      n1 += std::fabs(x);
    }
    terms[j].finite = std::isfinite(n1);
    terms[j].norm2 = up(std::sqrt(n2));
    terms[j].norm1 = up(n1);
  }
  at::parallel_for(0, NB, 16, [&](int64_t begin, int64_t end) {
    std::vector<RowCands>& rc = cands[at::get_thread_num()];
    vec acc[RT * 16 / VL];
    alignas(64) float buf[16];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * 16;
      if (n0 >= n_out) continue;  // the zero rows padding N to 32
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
          for (int i = 0; i < 16; ++i) buf[i] *= st[0][n0 + i];
          screen_epilogue(buf, st, n0, n_out, terms[j0 + j], rc[j0 + j]);
        }
      }
    }
  });
}

at::Tensor pack_layout(const at::Tensor& q) {  // [Np, K] -> [NB, K, 16]
  return q.view({q.size(0) / 16, 16, q.size(1)}).transpose(1, 2).contiguous();
}
#endif

// The 16 bf16 logits of block b for one row, as linear_packed computes them on the vector path
// (its own tile, given the block twice: a candidate block is a few microseconds either way).
inline void block_logits(const bf16* wp, int64_t K, int64_t b, const bf16* x, float* out) {
  const int64_t K2 = K / 2;
  const bf16* blk = wp + b * K2 * 32;
#if defined(__AVX512BF16__)
  __m512 tile[2];
  pair_tile<1>(blk, blk, x, K, K2, tile);
  _mm512_storeu_ps(out, tile[0]);
#else
  for (int i = 0; i < 16; ++i) out[i] = 0.f;
  for (int64_t k2 = 0; k2 < K2; ++k2)
    for (int i = 0; i < 16; ++i)
      for (int h = 0; h < 2; ++h)
        out[i] += static_cast<float>(blk[(k2 * 16 + i) * 2 + h]) * static_cast<float>(x[2 * k2 + h]);
#endif
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(static_cast<bf16>(out[i]));
}

at::Tensor head_screen_pack(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == 2 && q.size(0) % 16 == 0,
              "head_screen_pack: q [Np, K] int8 with Np a multiple of 16");
  return pack_layout(q.contiguous());
}

bool head_screen_vnni() {
#if defined(EXPERTMESH_SCREEN_VNNI)
  return true;
#else
  return false;
#endif
}

at::Tensor head_screen_argmax(const at::Tensor& x, const at::Tensor& wp, int64_t n_out, const at::Tensor& w8,
                              const at::Tensor& stats, const at::Tensor& rowsum128, int64_t max_candidates) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu() && w8.device().is_cpu() && stats.device().is_cpu() &&
                  rowsum128.device().is_cpu(),
              "head_screen_argmax: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16 && w8.scalar_type() == at::kChar &&
                  stats.scalar_type() == at::kFloat && rowsum128.scalar_type() == at::kInt,
              "head_screen_argmax: x, wp bf16; w8 int8; stats fp32; rowsum128 int32");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2,
              "head_screen_argmax: x [M, K], wp [NB, K/2, 16, 2]");
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0);
  TORCH_CHECK(wp.size(1) * 2 == K && NB % 2 == 0, "head_screen_argmax: x's width is the packed K, an even block count");
  TORCH_CHECK(w8.numel() == NB * 16 * ((K + 3) / 4 * 4) || w8.numel() == NB * 16 * K,
              "head_screen_argmax: w8 is head_screen_pack's layout of the packed head's rows");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 4 && stats.size(1) == NB * 16 && rowsum128.numel() == NB * 16,
              "head_screen_argmax: one scale and bound per row (stats [4, rows], rowsum128 [rows])");
  TORCH_CHECK(n_out > 0 && n_out <= NB * 16 && max_candidates > 0, "head_screen_argmax: 0 < n_out <= rows");
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return out;
  at::Tensor xc = x.contiguous(), wpc = wp.contiguous(), w8c = w8.contiguous(), stc = stats.contiguous(),
             rsc = rowsum128.contiguous();
  const bf16* X = xc.data_ptr<bf16>();
  const bf16* WP = wpc.data_ptr<bf16>();
  const float* ST = stc.data_ptr<float>();
  const float* st[4] = {ST, ST + NB * 16, ST + 2 * NB * 16, ST + 3 * NB * 16};
  int64_t* O = out.data_ptr<int64_t>();

  std::vector<RowTerms> terms(M);
  std::vector<std::vector<RowCands>> cands(at::get_num_threads(), std::vector<RowCands>(M));
  screen_pass(X, M, K, w8c.data_ptr<int8_t>(), NB, n_out, st, rsc.data_ptr<int32_t>(), terms, cands);

  // pass 2 per row: the candidates, recomputed from the bf16 weights in ascending order
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cand;
    alignas(64) float logits[16];
    for (int64_t j = begin; j < end; ++j) {
      float L = -std::numeric_limits<float>::infinity();
      for (const auto& per_thread : cands) L = std::max(L, per_thread[j].lower_bound());
      if (!terms[j].finite || !std::isfinite(L)) {
        O[j] = -1;
        continue;
      }
      const float thr = L - bf16_slack(L);
      cand.clear();
      for (const auto& per_thread : cands)
        for (const auto& [n, upper] : per_thread[j].items)
          if (upper >= thr) cand.push_back(n);
      if (static_cast<int64_t>(cand.size()) > max_candidates) {
        O[j] = -1;
        continue;
      }
      std::sort(cand.begin(), cand.end());
      int64_t best_n = -1, block = -1;
      float best = -std::numeric_limits<float>::infinity();
      for (int32_t n : cand) {
        if (n / 16 != block) {
          block = n / 16;
          block_logits(WP, K, block, X + j * K, logits);
        }
        const float logit = logits[n % 16];
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
  m.def("head_screen_pack(Tensor q) -> Tensor");
  m.def("head_screen_vnni() -> bool", &head_screen_vnni);
  m.def("head_screen_argmax(Tensor x, Tensor wp, int n_out, Tensor w8, Tensor stats, Tensor rowsum128, "
        "int max_candidates) -> Tensor");
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("head_screen_pack", &head_screen_pack);
  m.impl("head_screen_argmax", &head_screen_argmax);
}
