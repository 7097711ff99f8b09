// Absorbed MLA attention on the CPU: query rows attend over cached latents where they lie in the KV
// cache. The torch path gathers every context into a padded [B, L, D] copy, then runs bf16 bmm's
// whose set-up (~350 us each here) dwarfs their arithmetic. Two paths:
//  - vectors (any CPU, fp32 or bf16): each task (one query row, up to four heads) reads its context
//    rows by slot, once per pass, on torch's thread pool; the decode path;
//  - AMX tiles (bf16 where the CPU has AMX, amx.h): the shared prefix and each sequence's own
//    context are rearranged once per call into the tile layouts, and 32 (row, head) pairs at a time
//    multiply them: decode with a shared prefix reads it once for the whole batch, and a prefill's
//    rows (causal: each its own length) run as small GEMMs instead of a per-sequence expansion.
//
//   expertmesh::mla_attend(q [R, H, D], cache [S, D], shared [P], slots [B, L], seq [R], lens [R],
//                          scale, rank) -> out [R, H, rank]
//
// q is [q_lat | q_rot] per head (D = kv_lora_rank + rope); cache is one layer's joint latent|k_pe
// rows. Query row r belongs to sequence seq[r] and sees shared (slots every sequence starts with, may
// be empty) followed by slots[seq[r], :lens[r]] (a decode row sees its whole context, a prefill row
// the part up to itself). out[r, h] = softmax(scale * q[r, h] . ctx) . ctx[:, :rank]. fp32 softmax
// and accumulation; in bf16 the scores, the scaled scores, the probabilities and the output are
// rounded where the reference's bf16 ops round them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "cpu_vec.h"
#include "pair_gemm.h"

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

// out[j] = sum_l p[j][l] * rows[l][:rank] for m <= HEADS heads (p: n per head, out: rank per head)
template <typename T>
inline void weighted_sum_heads(int64_t m, const T* const* rows, int64_t n, const float* p, int64_t rank, float* out) {
  switch (m) {
    case 1: weighted_sum<1>(rows, n, p, n, rank, out, rank); break;
    case 2: weighted_sum<2>(rows, n, p, n, rank, out, rank); break;
    case 3: weighted_sum<3>(rows, n, p, n, rank, out, rank); break;
    default: weighted_sum<4>(rows, n, p, n, rank, out, rank); break;
  }
}

#if defined(EXPERTMESH_VEC_EXP)
// p[0 : n] = the bf16 reference's softmax of round(round(p) * scale): probabilities rounded to bf16
inline void softmax_bf16(float* p, int64_t n, float scale) {
  const vec sc = vset1(scale);
  vec mxv = vset1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const vec s = vround_bf16(vmul(vround_bf16(vload(p + i)), sc));
    vstore(p + i, s);
    mxv = vmax(mxv, s);
  }
  float mx = vhmax(mxv);
  for (int64_t t = i; t < n; ++t) {
    p[t] = round_as<bf16>(round_as<bf16>(p[t]) * scale);
    mx = std::max(mx, p[t]);
  }
  const vec mv = vset1(mx);
  vec sumv = vzero();
  for (i = 0; i + VL <= n; i += VL) {
    const vec e = vexp(vsub(vload(p + i), mv));
    vstore(p + i, e);
    sumv = vadd(sumv, e);
  }
  float sum = vsum(sumv);
  for (int64_t t = i; t < n; ++t) {
    p[t] = std::exp(p[t] - mx);
    sum += p[t];
  }
  const float inv = 1.f / sum;
  const vec iv = vset1(inv);
  for (i = 0; i + VL <= n; i += VL) vstore(p + i, vround_bf16(vmul(vload(p + i), iv)));
  for (int64_t t = i; t < n; ++t) p[t] = round_as<bf16>(p[t] * inv);
}
#endif

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                 const at::Tensor& seq, const at::Tensor& lens, double scale, int64_t rank, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), P = shared.numel(), L = slots.size(1);
  const T* C = cache.data_ptr<T>();
  const int64_t* SH = shared.data_ptr<int64_t>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* SQ = seq.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  at::Tensor qc = q.contiguous();
  const T* Q = qc.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t hb = (H + HEADS - 1) / HEADS;
  const float sc = static_cast<float>(scale);

#if defined(__AVX512BF16__)
  using QT = T;  // bf16 queries meet bf16 rows in vdpbf16ps pairs (cpu_vec.h)
#else
  using QT = float;  // queries widened once per task, not once per context row
#endif
  at::parallel_for(0, B * hb, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows;
    std::vector<float> p, acc(HEADS * rank);
    std::vector<QT> qw(HEADS * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / hb, h0 = (t % hb) * HEADS, m = std::min<int64_t>(HEADS, H - h0), n = P + LN[b];
      rows.resize(n);
      for (int64_t l = 0; l < P; ++l) rows[l] = C + SH[l] * D;
      for (int64_t l = 0; l < LN[b]; ++l) rows[P + l] = C + SL[SQ[b] * L + l] * D;
      p.assign(HEADS * n, 0.f);
      const T* qr = Q + (b * H + h0) * D;
      for (int64_t i = 0; i < m * D; ++i) qw[i] = static_cast<QT>(qr[i]);
      const QT* qb = qw.data();
      // scores: one row of context against the m heads' queries
      for (int64_t l = 0; l < n; ++l) dot_row(rows[l], qb, D, D, m, p.data() + l, n);
      for (int64_t j = 0; j < m; ++j) {  // softmax in fp32 over the scaled (and, in bf16, rounded) scores
        float* pj = p.data() + j * n;
#if defined(EXPERTMESH_VEC_EXP)
        if constexpr (std::is_same_v<T, bf16>) {  // vectors: scalar expf was most of a decode's time
          softmax_bf16(pj, n, sc);
          continue;
        }
#endif
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
      weighted_sum_heads(m, rows.data(), n, p.data(), rank, acc.data());
      for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < rank; ++c) O[(b * H + h0 + j) * rank + c] = static_cast<T>(acc[j * rank + c]);
    }
  });
}

#if defined(__AVX512BF16__)
// ---- a context in the pair layouts (pair_gemm.h; the AMX tiles' B operands) ---------------------
inline int64_t up_to(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A context (n rows of the cache, by slot) in the two B-operand layouts:
//   kt [ceil(n / 16)][Dp / 2][16][2]  scores = q . ctx^T: 16 tokens per block, pairs along D
//   v  [rank / 16][n32 / 2][16][2]    out = p . ctx[:, :rank]: 16 columns per block, token pairs
// Tokens past n and dimensions past D are zero (Dp = D rounded up to 32, n32 = n rounded up to 32).
void pack_context(const bf16* C, int64_t D, const int64_t* slots, int64_t n, int64_t Dp, int64_t rank, bf16* kt,
                  bf16* v) {
  const int64_t D2 = Dp / 2, nb = (n + 15) / 16, n2 = up_to(n, 32) / 2;
  for (int64_t blk = 0; blk < nb; ++blk) {
    alignas(64) int64_t off[16];
    const int64_t valid = std::min<int64_t>(16, n - blk * 16);
    for (int t = 0; t < 16; ++t) off[t] = (t < valid ? slots[blk * 16 + t] : slots[blk * 16]) * D * 2;
    __m512i lo = _mm512_load_si512(off), hi = _mm512_load_si512(off + 8);
    const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512i four = _mm512_set1_epi64(4);
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      __m512i dw = _mm512_setzero_si512();
      if (2 * d2 < D) {
        const __m256i a = _mm512_i64gather_epi32(lo, C, 1), b = _mm512_i64gather_epi32(hi, C, 1);
        dw = _mm512_maskz_mov_epi32(live, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
      }
      _mm512_storeu_si512(kt + (blk * D2 + d2) * 32, dw);
      lo = _mm512_add_epi64(lo, four);
      hi = _mm512_add_epi64(hi, four);
    }
  }
  alignas(64) int16_t pairs[32];
  for (int c = 0; c < 16; ++c) {
    pairs[2 * c] = static_cast<int16_t>(c);
    pairs[2 * c + 1] = static_cast<int16_t>(16 + c);
  }
  const __m512i interleave = _mm512_load_si512(pairs);
  for (int64_t j2 = 0; j2 < n2; ++j2) {
    const int64_t j = 2 * j2;
    const bf16* r0 = j < n ? C + slots[j] * D : nullptr;
    const bf16* r1 = j + 1 < n ? C + slots[j + 1] * D : nullptr;
    for (int64_t cb = 0; cb < rank / 16; ++cb) {
      const __m256i a = r0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + cb * 16)) : _mm256_setzero_si256();
      const __m256i b = r1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + cb * 16)) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(v + (cb * n2 + j2) * 32, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

inline int64_t kt_size(int64_t n, int64_t Dp) { return up_to(n, 16) * Dp; }
inline int64_t v_size(int64_t n, int64_t rank) { return up_to(n, 32) * rank; }

// Tokens [j0, j0 + 64) of a shared prefix of P tokens (slots SH) into the whole prefix's layouts:
// kt_sh [ceil(P / 16)][Dp / 2][16][2], v_sh [rank / 16][P32 / 2][16][2].
void pack_piece(const bf16* C, int64_t D, const int64_t* SH, int64_t P, int64_t j0, int64_t Dp, int64_t rank,
                bf16* kt_sh, bf16* v_sh) {
  const int64_t n = std::min<int64_t>(64, P - j0);
  std::vector<bf16> v_piece(v_size(n, rank));
  pack_context(C, D, SH + j0, n, Dp, rank, kt_sh + j0 * Dp, v_piece.data());
  // the piece's 32 token pairs of every column block, into the whole prefix's column blocks
  const int64_t pn2 = up_to(n, 32) / 2, n2 = up_to(P, 32) / 2;
  for (int64_t cb = 0; cb < rank / 16; ++cb)
    std::memcpy(v_sh + (cb * n2 + j0 / 2) * 32, v_piece.data() + cb * pn2 * 32, pn2 * 32 * sizeof(bf16));
}

// Whether a prefix of P tokens meets all G (row, head) pairs at once: while the whole [G, P] score
// matrix is small (decode batches; a long prefill keeps it per task).
inline bool prefix_batched(int64_t G, int64_t P) { return P > 0 && up_to(G, 32) * up_to(P, 32) * 4 <= (int64_t{32} << 20); }

// x[0, n) <- round(round(x) * scale) (bf16 steps, as the reference's bf16 scores), returns the max
inline float scale_scores(float* x, int64_t n, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = vround_bf16(_mm512_mul_ps(vround_bf16(_mm512_loadu_ps(x + i)), sc));
    _mm512_storeu_ps(x + i, v);
    mx = _mm512_max_ps(mx, v);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = vround_bf16(_mm512_mul_ps(vround_bf16(_mm512_maskz_loadu_ps(k, x + i)), sc));
    _mm512_mask_storeu_ps(x + i, k, v);
    mx = _mm512_mask_max_ps(mx, k, mx, v);
  }
  return _mm512_reduce_max_ps(mx);
}

// x[0, n) <- exp(x - mx), returns the sum
inline float exp_shifted(float* x, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(k, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m)));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// p[0, width) <- bf16(x * inv) for x's first n, zeros after
inline void to_probs(const float* x, int64_t n, float inv, bf16* p, int64_t width) {
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < width; i += 16) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - i));
    const __mmask16 k = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), s);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(k, v)));
  }
}

// ---- bf16 rows over a shared prefix on vdpbf16ps (AVX512-BF16 without AMX) ----------------------
// The prefix is packed once per call and meets every (row, head) pair in two GEMMs (pair_gemm.h):
// scores = q . prefix^T, then probabilities . prefix[:, :rank]; each row's own context (a decode
// row's few tokens past the prefix) takes the vector path beside it, in the same softmax. Per
// (row, head) the vector path read the whole prefix again: 32 decode rows of `small` over a
// 1000-token prefix 3.6 ms a layer.
bool attend_shared_vec(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                       const at::Tensor& seq, const at::Tensor& lens, double scale, int64_t rank, at::Tensor& out) {
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), P = shared.numel(), L = slots.size(1), G = R * H;
  if (!prefix_batched(G, P) || rank % 32 != 0 || D % 2 != 0) return false;
  const int64_t P32 = up_to(P, 32);
  const bf16* C = cache.data_ptr<bf16>();
  const int64_t* SH = shared.data_ptr<int64_t>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* SQ = seq.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  at::Tensor qc = q.contiguous();
  const bf16* Q = qc.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  // every element is written before it is read; kept by the calling thread across calls
  thread_local std::vector<bf16> kt_buf, v_buf, p_buf;
  thread_local std::vector<float> s_buf, o_buf, own_buf;
  kt_buf.resize(std::max<size_t>(kt_buf.size(), P32 * D));
  v_buf.resize(std::max<size_t>(v_buf.size(), v_size(P, rank)));
  p_buf.resize(std::max<size_t>(p_buf.size(), G * P32));
  s_buf.resize(std::max<size_t>(s_buf.size(), G * P32));
  o_buf.resize(std::max<size_t>(o_buf.size(), G * rank));
  own_buf.resize(std::max<size_t>(own_buf.size(), G * rank));
  bf16* const kt = kt_buf.data();
  bf16* const vs = v_buf.data();
  float* const S = s_buf.data();
  bf16* const Pr = p_buf.data();
  float* const O_sh = o_buf.data();  // (the buffers are this thread's: pointers, not names, go to the pool)
  float* const O_own = own_buf.data();
  std::fill(kt + up_to(P, 16) * D, kt + P32 * D, bf16(0.f));  // the block pair's unwritten half
  at::parallel_for(0, (P + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) pack_piece(C, D, SH, P, t * 64, D, rank, kt, vs);
  });
  pair_gemm_f32(Q, D, G, D / 2, kt, P32 / 16, S, P32);
  const int64_t hb = (H + HEADS - 1) / HEADS;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, R * hb, 1, [&](int64_t begin, int64_t end) {
    std::vector<const bf16*> rows;
    std::vector<float> p, acc(HEADS * rank);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / hb, h0 = (t % hb) * HEADS, m = std::min<int64_t>(HEADS, H - h0), n = LN[r];
      rows.resize(n);
      for (int64_t l = 0; l < n; ++l) rows[l] = C + SL[SQ[r] * L + l] * D;
      p.assign(HEADS * std::max<int64_t>(n, 1), 0.f);
      const bf16* qb = Q + (r * H + h0) * D;
      for (int64_t l = 0; l < n; ++l) dot_row(rows[l], qb, D, D, m, p.data() + l, n);
      for (int64_t j = 0; j < m; ++j) {  // one softmax over the prefix's scores and the own ones
        const int64_t g = r * H + h0 + j;
        float* a = S + g * P32;
        float* c = p.data() + j * n;
        float mx = scale_scores(a, P, sc);
        if (n > 0) mx = std::max(mx, scale_scores(c, n, sc));
        const float sum = exp_shifted(a, P, mx) + (n > 0 ? exp_shifted(c, n, mx) : 0.f);
        const float inv = 1.f / sum;
        to_probs(a, P, inv, Pr + g * P32, P32);
        for (int64_t i = 0; i < n; ++i) c[i] = round_as<bf16>(c[i] * inv);
      }
      float* own = O_own + (r * H + h0) * rank;
      if (n == 0) {
        std::fill(own, own + m * rank, 0.f);
        continue;
      }
      weighted_sum_heads(m, rows.data(), n, p.data(), rank, own);
    }
  });
  pair_gemm_f32(Pr, P32, G, P32 / 2, vs, rank / 16, O_sh, rank);
  at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t c = 0; c < rank; c += 16) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(O_sh + g * rank + c), _mm512_loadu_ps(O_own + g * rank + c));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + g * rank + c), (__m256i)_mm512_cvtneps_pbh(v));
      }
  });
  return true;
}
#endif

#if defined(EXPERTMESH_AMX)
// ---- bf16 on the AMX tile unit ------------------------------------------------------------------
constexpr int64_t PAIRS = 32;  // (row, head) pairs per task: two A tiles

// S[m, j] (fp32, ld columns) = qa[m, :] . ctx_j over the context's n tokens, for m < rows (<= 32)
inline void amx_scores(const bf16* qa, int64_t Dp, int64_t rows, const bf16* kt, int64_t n, float* S, int64_t ld) {
  const int64_t D2 = Dp / 2, nb = (n + 15) / 16;
  const bool two_rows = rows > 16;
  for (int64_t blk = 0; blk < nb; blk += 2) {
    const bool two = blk + 1 < nb;
    tiles_zero4();
    const bf16* b0 = kt + blk * D2 * 32;
    for (int64_t kc = 0; kc < Dp / 32; ++kc) {
      _tile_loadd(4, qa + kc * 32, Dp * 2);
      _tile_loadd(6, b0 + kc * 16 * 32, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (two) {
        _tile_loadd(7, b0 + (D2 + kc * 16) * 32, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (two_rows) {
        _tile_loadd(5, qa + 16 * Dp + kc * 32, Dp * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (two) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, S + blk * 16, ld * 4);
    if (two) _tile_stored(1, S + (blk + 1) * 16, ld * 4);
    if (two_rows) {
      _tile_stored(2, S + 16 * ld + blk * 16, ld * 4);
      if (two) _tile_stored(3, S + 16 * ld + (blk + 1) * 16, ld * 4);
    }
  }
}

// O[m, c] += p[m, :] . v[:, c] over the first `used` tokens (rounded up to 32) of a context packed
// with n tokens (p bf16 with ld columns, zero past each row's length)
inline void amx_values(const bf16* p, int64_t ld, int64_t rows, const bf16* v, int64_t n, int64_t used, int64_t rank,
                       float* O) {
  const int64_t n2 = up_to(n, 32) / 2, steps = up_to(used, 32) / 32;
  const bool two_rows = rows > 16;
  for (int64_t cb = 0; cb < rank / 16; cb += 2) {
    _tile_loadd(0, O + cb * 16, rank * 4);
    _tile_loadd(1, O + (cb + 1) * 16, rank * 4);
    _tile_loadd(2, O + 16 * rank + cb * 16, rank * 4);
    _tile_loadd(3, O + 16 * rank + (cb + 1) * 16, rank * 4);
    for (int64_t ts = 0; ts < steps; ++ts) {
      _tile_loadd(4, p + ts * 32, ld * 2);
      _tile_loadd(6, v + (cb * n2 + ts * 16) * 32, 64);
      _tile_loadd(7, v + ((cb + 1) * n2 + ts * 16) * 32, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two_rows) {
        _tile_loadd(5, p + 16 * ld + ts * 32, ld * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, O + cb * 16, rank * 4);
    _tile_stored(1, O + (cb + 1) * 16, rank * 4);
    _tile_stored(2, O + 16 * rank + cb * 16, rank * 4);
    _tile_stored(3, O + 16 * rank + (cb + 1) * 16, rank * 4);
  }
}

bool attend_on_tiles(int64_t D, int64_t rank) { return D % 2 == 0 && rank % 32 == 0 && amx_ready(); }

void attend_amx(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                const at::Tensor& seq, const at::Tensor& lens, double scale, int64_t rank, at::Tensor& out) {
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), P = shared.numel(), B = slots.size(0), L = slots.size(1);
  const int64_t Dp = up_to(D, 32);
  const bf16* C = cache.data_ptr<bf16>();
  const int64_t* SQ = seq.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  at::Tensor qc = q.contiguous();
  const bf16* Q = qc.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  // each sequence's rows, and the own context it needs packed (its rows' longest)
  std::vector<std::vector<int64_t>> rows_of(B);
  std::vector<int64_t> own(B, 0);
  for (int64_t r = 0; r < R; ++r) {
    rows_of[SQ[r]].push_back(r);
    own[SQ[r]] = std::max(own[SQ[r]], LN[r]);
  }
  std::vector<int64_t> kt_at(B + 1, 0), v_at(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    kt_at[b + 1] = kt_at[b] + kt_size(own[b], Dp);
    v_at[b + 1] = v_at[b] + v_size(own[b], rank);
  }
  // packed contexts: written whole before they are read; kept by the calling thread across calls
  thread_local std::vector<bf16> pack_buf;
  const int64_t sh_kt = kt_size(P, Dp), sh_v = v_size(P, rank);
  pack_buf.resize(std::max<size_t>(pack_buf.size(), sh_kt + sh_v + kt_at[B] + v_at[B]));
  bf16* const kt_sh = pack_buf.data();
  bf16* const v_sh = kt_sh + sh_kt;
  bf16* const kt_own = v_sh + sh_v;
  bf16* const v_own = kt_own + kt_at[B];
  const int64_t* SH = shared.data_ptr<int64_t>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  // the shared prefix in 64-token pieces (blocks of both layouts), then the sequences' own contexts
  const int64_t pieces = (P + 63) / 64;
  at::parallel_for(0, pieces + B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < pieces) {
        pack_piece(C, D, SH, P, t * 64, Dp, rank, kt_sh, v_sh);
      } else if (own[t - pieces] > 0) {
        const int64_t b = t - pieces;
        pack_context(C, D, SL + b * L, own[b], Dp, rank, kt_own + kt_at[b], v_own + v_at[b]);
      }
    }
  });
  // tasks: 32 (row, head) pairs of one sequence
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (sequence, first pair)
  int64_t widest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pairs = static_cast<int64_t>(rows_of[b].size()) * H;
    for (int64_t m0 = 0; m0 < pairs; m0 += PAIRS) tasks.emplace_back(b, m0);
    widest = std::max(widest, own[b]);
  }
  const int64_t P32 = up_to(P, 32), W32 = up_to(widest, 32);
  const float sc = static_cast<float>(scale);
  // The shared prefix against all (row, head) pairs at once, 32 pairs of any sequences per tile
  // task (a decode sequence has only H pairs: per sequence its tiles ran half empty), when the
  // whole [pairs, P] score matrix is small (decode batches; a long prefill keeps it per task).
  const int64_t G = R * H, G32 = up_to(G, 32);
  const bool batched = prefix_batched(G, P);
  thread_local std::vector<bf16> qa_buf, pr_buf;
  thread_local std::vector<float> sc_buf, ob_buf;
  bf16 *qa_all = nullptr, *p_all = nullptr;
  float *s_all = nullptr, *o_all = nullptr;
  if (batched) {
    qa_buf.resize(std::max<size_t>(qa_buf.size(), G32 * Dp));
    pr_buf.resize(std::max<size_t>(pr_buf.size(), G32 * P32));
    sc_buf.resize(std::max<size_t>(sc_buf.size(), G32 * P32));
    ob_buf.resize(std::max<size_t>(ob_buf.size(), G32 * rank));
    qa_all = qa_buf.data(), p_all = pr_buf.data(), s_all = sc_buf.data(), o_all = ob_buf.data();
    at::parallel_for(0, G32 / PAIRS, 1, [&](int64_t begin, int64_t end) {
      TileScope tiles;
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t g = t * PAIRS; g < (t + 1) * PAIRS; ++g) {  // q rows padded to Dp; zero past G
          bf16* dst = qa_all + g * Dp;
          std::fill(dst, dst + Dp, bf16(0.f));
          if (g < G) std::memcpy(dst, Q + g * D, D * sizeof(bf16));
          std::fill(p_all + g * P32, p_all + (g + 1) * P32, bf16(0.f));  // rows past G stay zero
        }
        amx_scores(qa_all + t * PAIRS * Dp, Dp, PAIRS, kt_sh, P, s_all + t * PAIRS * P32, P32);
      }
    });
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    std::vector<bf16> qa(PAIRS * Dp), p_sh(PAIRS * P32), p_own(PAIRS * W32);
    std::vector<float> s_sh(PAIRS * P32), s_own(PAIRS * W32), acc(PAIRS * rank);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, m0] = tasks[t];
      const auto& rows = rows_of[b];
      const int64_t pairs = std::min<int64_t>(PAIRS, static_cast<int64_t>(rows.size()) * H - m0);
      int64_t n_own = 0;
      std::fill(qa.begin(), qa.end(), bf16(0.f));
      for (int64_t m = 0; m < pairs; ++m) {
        const int64_t r = rows[(m0 + m) / H], h = (m0 + m) % H;
        std::memcpy(qa.data() + m * Dp, Q + (r * H + h) * D, D * sizeof(bf16));
        n_own = std::max(n_own, LN[r]);
      }
      const int64_t o32 = up_to(n_own, 32);
      if (P > 0 && !batched) amx_scores(qa.data(), Dp, pairs, kt_sh, P, s_sh.data(), P32);
      if (n_own > 0) amx_scores(qa.data(), Dp, pairs, kt_own + kt_at[b], n_own, s_own.data(), W32);
      for (int64_t m = 0; m < pairs; ++m) {
        const int64_t r = rows[(m0 + m) / H], g = r * H + (m0 + m) % H, len = LN[r];
        float* a = batched ? s_all + g * P32 : s_sh.data() + m * P32;
        float* c = s_own.data() + m * W32;
        float mx = -std::numeric_limits<float>::infinity();
        if (P > 0) mx = std::max(mx, scale_scores(a, P, sc));
        if (len > 0) mx = std::max(mx, scale_scores(c, len, sc));
        float sum = 0.f;
        if (P > 0) sum += exp_shifted(a, P, mx);
        if (len > 0) sum += exp_shifted(c, len, mx);
        const float inv = 1.f / sum;
        if (P > 0) to_probs(a, P, inv, (batched ? p_all + g * P32 : p_sh.data() + m * P32), P32);
        if (o32 > 0) to_probs(c, len, inv, p_own.data() + m * W32, o32);
      }
      // rows past the task's pairs, up to the A tiles it runs (one under 17 pairs): zero probabilities
      for (int64_t m = pairs; m < (pairs > 16 ? PAIRS : 16); ++m) {
        if (P > 0 && !batched) std::fill(p_sh.begin() + m * P32, p_sh.begin() + (m + 1) * P32, bf16(0.f));
        if (o32 > 0) std::fill(p_own.begin() + m * W32, p_own.begin() + m * W32 + o32, bf16(0.f));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (P > 0 && !batched) amx_values(p_sh.data(), P32, pairs, v_sh, P, P, rank, acc.data());
      // the own context was packed for the sequence's longest row; this task's rows use n_own of it
      if (n_own > 0) amx_values(p_own.data(), W32, pairs, v_own + v_at[b], own[b], n_own, rank, acc.data());
      for (int64_t m = 0; m < pairs; ++m) {
        const int64_t r = rows[(m0 + m) / H], h = (m0 + m) % H;
        if (batched) {  // the own part; the shared prefix's values are added below
          std::memcpy(o_all + (r * H + h) * rank, acc.data() + m * rank, rank * sizeof(float));
          continue;
        }
        bf16* o = O + (r * H + h) * rank;
        for (int64_t c = 0; c < rank; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc.data() + m * rank + c)));
      }
    }
  });
  if (!batched) return;
  at::parallel_for(0, G32 / PAIRS, 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    for (int64_t t = begin; t < end; ++t) {
      amx_values(p_all + t * PAIRS * P32, P32, PAIRS, v_sh, P, P, rank, o_all + t * PAIRS * rank);
      for (int64_t g = t * PAIRS; g < std::min(G, (t + 1) * PAIRS); ++g)
        for (int64_t c = 0; c < rank; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + g * rank + c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(o_all + g * rank + c)));
    }
  });
}
#endif

at::Tensor mla_attend(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& shared, const at::Tensor& slots,
                      const at::Tensor& seq, const at::Tensor& lens, double scale, int64_t rank) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "mla_attend: CPU tensors");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 2 && slots.dim() == 2 && seq.dim() == 1 && lens.dim() == 1 &&
                  shared.dim() == 1,
              "mla_attend: q [R, H, D], cache [S, D], shared [P], slots [B, L], seq [R], lens [R]");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "mla_attend: q and cache share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "mla_attend: float32 or bfloat16, not ", q.scalar_type());
  TORCH_CHECK(slots.scalar_type() == at::kLong && seq.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                  shared.scalar_type() == at::kLong,
              "mla_attend: slots, seq, lens and shared are int64");
  const int64_t R = q.size(0), D = q.size(2), S = cache.size(0), B = slots.size(0);
  TORCH_CHECK(cache.size(1) == D && cache.stride(1) == 1 && cache.stride(0) == D,
              "mla_attend: cache rows are contiguous [S, D] with D = q.size(2)");
  TORCH_CHECK(seq.size(0) == R && lens.size(0) == R, "mla_attend: one sequence and one length per query row");
  TORCH_CHECK(rank > 0 && rank <= D, "mla_attend: 0 < rank <= D");
  at::Tensor sh = shared.contiguous(), sl = slots.contiguous(), sq = seq.contiguous(), ln = lens.contiguous();
  const int64_t* L = ln.data_ptr<int64_t>();
  const int64_t* Q = sq.data_ptr<int64_t>();
  const int64_t W = sl.size(1);
  std::vector<int64_t> widest(B, 0);  // the longest length any row asks of each sequence
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(Q[r] >= 0 && Q[r] < B, "mla_attend: seq[", r, "] = ", Q[r], " outside [0, ", B, ")");
    TORCH_CHECK(L[r] >= 0 && L[r] <= W, "mla_attend: lens[", r, "] = ", L[r], " outside [0, ", W, "]");
    TORCH_CHECK(L[r] + sh.numel() > 0, "mla_attend: row ", r, " has no context");
    widest[Q[r]] = std::max(widest[Q[r]], L[r]);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = sl.data_ptr<int64_t>() + b * W;
    for (int64_t l = 0; l < widest[b]; ++l)
      TORCH_CHECK(row[l] >= 0 && row[l] < S, "mla_attend: slot ", row[l], " outside the cache's ", S);
  }
  const int64_t* P = sh.data_ptr<int64_t>();
  for (int64_t l = 0; l < sh.numel(); ++l)
    TORCH_CHECK(P[l] >= 0 && P[l] < S, "mla_attend: shared slot ", P[l], " outside the cache's ", S);
  at::Tensor out = at::empty({R, q.size(1), rank}, q.options());
  if (R == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    decode_impl<float>(q, cache, sh, sl, sq, ln, scale, rank, out);
    return out;
  }
#if defined(EXPERTMESH_AMX)
  if (attend_on_tiles(D, rank)) {
    attend_amx(q, cache, sh, sl, sq, ln, scale, rank, out);
    return out;
  }
#endif
#if defined(__AVX512BF16__)
  if (attend_shared_vec(q, cache, sh, sl, sq, ln, scale, rank, out)) return out;
#endif
  decode_impl<bf16>(q, cache, sh, sl, sq, ln, scale, rank, out);
  return out;
}

// Whether bf16 rows of this shape take the AMX path here (attention.py routes prefill rows through
// mla_attend only where they do; the vector path is for decode rows).
bool mla_attend_on_tiles(int64_t dim, int64_t rank) {
#if defined(EXPERTMESH_AMX)
  return attend_on_tiles(dim, rank);
#else
  (void)dim;
  (void)rank;
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expertmesh, m) {
  m.def("mla_attend(Tensor q, Tensor cache, Tensor shared, Tensor slots, Tensor seq, Tensor lens, float scale, int rank) -> Tensor");
  m.def("mla_attend_on_tiles(int dim, int rank) -> bool", &mla_attend_on_tiles);
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) { m.impl("mla_attend", &mla_attend); }
