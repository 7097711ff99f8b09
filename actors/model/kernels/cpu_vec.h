// Vector helpers the CPU kernels share: weight rows (fp32 or bf16) widened to fp32 lanes, FMA
// accumulation, and a register-tiled "few tokens x many rows" dot product. One build per machine
// (-march=native): AVX-512, AVX2 + FMA, or plain scalar code.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace expertmesh_cpu {

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
inline vec vload_i8(const int8_t* p) {  // 16 int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
#define EXPERTMESH_VEC_EXP 1
// vexp's per-ISA steps (the polynomial itself is written once, below)
constexpr float kExpHi = 88.7f;  // scalef keeps e^x finite up to FLT_MAX
inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec vfnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
inline vec vround_nearest(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vldexp(vec p, vec n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
// fp32 -> nearest-even bf16 -> fp32, as c10::BFloat16's conversion rounds (subnormals kept, NaN
// stays NaN; vcvtneps2bf16 would flush subnormals)
inline vec vround_bf16(vec x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  const __m512 r = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline float vhmax(vec a) { return _mm512_reduce_max_ps(a); }
// 16 lanes stored as bf16, rounded as c10::BFloat16 rounds (vround_bf16)
inline void vstore_bf16(bf16* p, vec a) {
  const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(vround_bf16(a)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(hi));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VL = 8;
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec vload_i8(const int8_t* p) {  // 8 int8 -> fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
#define EXPERTMESH_VEC_EXP 1
// vexp's per-ISA steps (the polynomial itself is written once, below)
constexpr float kExpHi = 88.3f;  // 2^n is built in the exponent bits: n stays below 128
inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec vfnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline vec vround_nearest(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec vldexp(vec p, vec n) {  // p * 2^n, n integral
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// fp32 -> nearest-even bf16 -> fp32, as c10::BFloat16's conversion rounds (NaN stays NaN)
inline vec vround_bf16(vec x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  const __m256 r = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline float vhmax(vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 8 lanes stored as bf16, rounded as c10::BFloat16 rounds (vround_bf16)
inline void vstore_bf16(bf16* p, vec a) {
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(vround_bf16(a)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#else
constexpr int VL = 1;
struct vec { float v; };
inline vec vload(const float* p) { return {*p}; }
inline vec vload(const bf16* p) { return {static_cast<float>(*p)}; }
inline vec vload_i8(const int8_t* p) { return {static_cast<float>(*p)}; }
inline vec vzero() { return {0.f}; }
inline vec vfma(vec a, vec b, vec c) { return {a.v * b.v + c.v}; }
inline vec vadd(vec a, vec b) { return {a.v + b.v}; }
inline float vsum(vec a) { return a.v; }
inline vec vset1(float v) { return {v}; }
inline void vstore(float* p, vec a) { *p = a.v; }
#endif
#if defined(EXPERTMESH_VEC_EXP)
// e^x within 2 ulp of expf over [-87, kExpHi] (a softmax's x - max, silu's -x): Cody-Waite ln 2
// split, degree-6 polynomial, 2^n applied by the ISA's vldexp; below -87 it flushes to ~2^-126
inline vec vexp(vec x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(kExpHi));
  const vec n = vround_nearest(vmul(x, vset1(1.44269504088896341f)));
  vec r = vfnmadd(n, vset1(0.693359375f), x);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  vec p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
  return vldexp(p, n);
}
#endif

constexpr int TOKENS = 4;  // tokens per tile: 2 x 4 accumulators

inline float widen(float v) { return v; }
inline float widen(bf16 v) { return static_cast<float>(v); }

// prefetches every 64-byte line of [p, p + bytes)
inline void prefetch(const void* p, int bytes) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T0);
#endif
}

// the same into L2 only, for lines further ahead: more misses in flight than L1's fill buffers hold
// (the rows of a decode step's experts each start on a cold 4 KB page the hardware prefetcher does
// not enter). dot_tile prefetches PREFETCH_FAR times as far ahead this way as into L1: `small`'s
// routed experts at one token 1.12x (median of 16 alternating runs, 0.93-1.29) with 32 rows ahead,
// 16 and 64 rows measured less.
constexpr int PREFETCH_FAR = 4;

inline void prefetch_far(const void* p, int bytes) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T2);
#endif
}

// out[j * ldo] = dot(w[0 : K], x[j * ldx : +K]) for j < M, accumulated in fp32. One weight row at a
// time: a single sequential stream per thread ran 2x faster here than interleaving four rows (the
// hardware prefetcher follows one stream; 1 KB rows are too short for it to catch four). pf > 0
// also prefetches w + pf into L1 and w + PREFETCH_FAR * pf into L2. Two accumulator sets hide the
// FMA latency when M is small.
template <int M, typename W, typename X>
inline void dot_tile(const W* w, const X* x, int64_t ldx, int64_t K, float* out, int64_t ldo, int64_t pf) {
  vec acc[2][M];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < M; ++j) acc[u][j] = vzero();
  int64_t k = 0;
  for (; k + 2 * VL <= K; k += 2 * VL) {
    if (pf) {
      prefetch(w + k + pf, 2 * VL * sizeof(W));
      prefetch_far(w + k + PREFETCH_FAR * pf, 2 * VL * sizeof(W));
    }
    for (int u = 0; u < 2; ++u) {
      const vec wv = vload(w + k + u * VL);
      for (int j = 0; j < M; ++j) acc[u][j] = vfma(wv, vload(x + j * ldx + k + u * VL), acc[u][j]);
    }
  }
  for (int j = 0; j < M; ++j) {
    float s = vsum(vadd(acc[0][j], acc[1][j]));
    for (int64_t t = k; t < K; ++t) s += widen(w[t]) * widen(x[j * ldx + t]);
    out[j * ldo] = s;
  }
}

#if defined(__AVX512BF16__)
// bf16 weights x bf16 activations: vdpbf16ps multiplies 32 pairs per instruction straight from
// memory (no widening), products exact and summed in fp32 -- half the uops of the path above.
template <int M>
inline void dot_tile(const bf16* w, const bf16* x, int64_t ldx, int64_t K, float* out, int64_t ldo, int64_t pf) {
  __m512 acc[2][M];
  for (int u = 0; u < 2; ++u)
    for (int j = 0; j < M; ++j) acc[u][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (pf) {
      prefetch(w + k + pf, 128);
      prefetch_far(w + k + PREFETCH_FAR * pf, 128);
    }
    for (int u = 0; u < 2; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + u * 32);
      for (int j = 0; j < M; ++j)
        acc[u][j] = _mm512_dpbf16_ps(acc[u][j], wv, (__m512bh)_mm512_loadu_si512(x + j * ldx + k + u * 32));
    }
  }
  for (int j = 0; j < M; ++j) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]));
    for (int64_t t = k; t < K; ++t) s += static_cast<float>(w[t]) * static_cast<float>(x[j * ldx + t]);
    out[j * ldo] = s;
  }
}
#endif

// dot_tile over m tokens (any count), TOKENS at a time; the first pass over the row prefetches
template <typename W, typename X>
inline void dot_row(const W* w, const X* x, int64_t ldx, int64_t K, int64_t m, float* out, int64_t ldo,
                    int64_t pf = 0) {
  int64_t j = 0;
  for (; j + TOKENS <= m; j += TOKENS, pf = 0) dot_tile<TOKENS>(w, x + j * ldx, ldx, K, out + j * ldo, ldo, pf);
  switch (m - j) {
    case 1: dot_tile<1>(w, x + j * ldx, ldx, K, out + j * ldo, ldo, pf); break;
    case 2: dot_tile<2>(w, x + j * ldx, ldx, K, out + j * ldo, ldo, pf); break;
    case 3: dot_tile<3>(w, x + j * ldx, ldx, K, out + j * ldo, ldo, pf); break;
    default: break;
  }
}

constexpr int PREFETCH_ROWS = 8;  // how many rows ahead matmul_small prefetches (4-16 measured alike)

// C[j * ldc + n] = dot(W[n], X[j]) for n in [0, N), j in [0, m): W rows of length K, contiguous.
template <typename W, typename X>
void matmul_small(const W* w, int64_t K, int64_t N, const X* x, int64_t ldx, int64_t m, float* c, int64_t ldc) {
  for (int64_t n = 0; n < N; ++n) dot_row(w + n * K, x, ldx, K, m, c + n, ldc, PREFETCH_ROWS * K);
}

template <typename T>
inline float round_as(float v) {
  return static_cast<float>(static_cast<T>(v));
}
}  // namespace expertmesh_cpu
