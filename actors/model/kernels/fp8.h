// FP8 weight rows (e4m3 with fp32 block scales) dequantized to the compute dtype right before the
// dense kernels' dot products: the routed experts' (moe_cpu.cpp) and the pair-packed linears'
// (linear_cpu.cpp). The values are the dequantize-at-load path's, T(e4m3 * scale) with the fp32
// product rounded once, so each kernel's outputs are bitwise its dense form's.
#pragma once

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_vec.h"

namespace expertmesh_cpu {

// dst[0 : K] = T(e4m3(src[k]) * scale[k / bc]) for one run of weights (scale: the scales of its
// block-row). The e4m3 sign, exponent and mantissa bits placed in a bf16's (sign << 15 | bits << 4)
// are exactly the value times 2^-120 (subnormals included; no checkpoint holds e4m3's NaN), so
// value = that times 2^120, exact, and one rounded multiply by the scale; bf16 stores round as
// c10::BFloat16 does (vstore_bf16).
template <typename T>
inline void dequant_row(const uint8_t* src, int64_t K, const float* scale, int64_t bc, T* dst) {
  int64_t k = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  const vec two120 = vset1(0x1p120f);
  for (; k + VL <= K; k += VL) {
    if (k / bc != (k + VL - 1) / bc) break;  // a chunk across a block edge: the scalar loop below
#if defined(__AVX512F__)
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
    const __m512i bits = _mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32(static_cast<int>(0x87f00000u)));
    const vec w = vmul(vmul(_mm512_castsi512_ps(bits), two120), vset1(scale[k / bc]));
#else
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k)));
    const __m256i bits = _mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32(static_cast<int>(0x87f00000u)));
    const vec w = vmul(vmul(_mm256_castsi256_ps(bits), two120), vset1(scale[k / bc]));
#endif
    if constexpr (std::is_same_v<T, float>)
      vstore(dst + k, w);
    else
      vstore_bf16(dst + k, w);
  }
#endif
  for (; k < K; ++k) {
    const float v = static_cast<float>(c10::bit_cast<c10::Float8_e4m3fn>(src[k]));
    dst[k] = static_cast<T>(v * scale[k / bc]);
  }
}

#if defined(__AVX512BW__)
// ---- e4m3 -> bf16 by table: 32 weights per lookup -----------------------------------------------
// Within one scale block every weight is T(e4m3 * s), a function of its byte alone, so a block's
// 128 magnitudes are dequantized once into a table (4 zmm of bf16) and each 32 bytes of weights
// become bf16 by two 64-entry word permutes, a blend on bit 6 and the sign bit (-v * s rounds to
// -(v * s)): ~8 instructions per 32 weights instead of ~26 for the arithmetic above. The table
// holds dequant_row's values, so both give the same bits.
struct E4m3Table {
  __m512i t[4];
};

// The table for scale s: entry i = bf16(e4m3 magnitude i * s)
inline E4m3Table e4m3_table(float s) {
  struct Magnitudes {
    alignas(64) float v[128];
    Magnitudes() {
      for (int i = 0; i < 128; ++i) v[i] = static_cast<float>(c10::bit_cast<c10::Float8_e4m3fn>(static_cast<uint8_t>(i)));
    }
  };
  static const Magnitudes magnitudes;
  alignas(64) bf16 vals[128];
  const vec sv = vset1(s);
  for (int i = 0; i < 128; i += VL) vstore_bf16(vals + i, vmul(vload(magnitudes.v + i), sv));
  E4m3Table table;
  for (int i = 0; i < 4; ++i) table.t[i] = _mm512_load_si512(vals + 32 * i);
  return table;
}

// 32 e4m3 bytes -> 32 bf16 (as a bf16 vector's bits)
inline __m512i e4m3_lookup(const E4m3Table& table, const uint8_t* src) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  const __m512i lo = _mm512_permutex2var_epi16(table.t[0], b, table.t[1]);
  const __m512i hi = _mm512_permutex2var_epi16(table.t[2], b, table.t[3]);
  const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(b, _mm512_set1_epi16(0x40)), lo, hi);
  // mag | ((b << 8) & 0x8000): the byte's sign bit onto the bf16's
  return _mm512_ternarylogic_epi32(mag, _mm512_slli_epi16(b, 8), _mm512_set1_epi16(static_cast<int16_t>(0x8000)), 0xF8);
}
#endif

// rows [0, nr) of an e4m3 weight (K bytes apart from src) -> T rows (K apart from dst), row r's
// scales at grid(r) (its block-row's). In bf16 on AVX512BW, rows sharing a scale row take one table
// per scale column; elsewhere dequant_row row by row. The same values either way.
template <typename T, typename Grid>
inline void dequant_rows(const uint8_t* src, int64_t nr, int64_t K, Grid grid, int64_t bc, T* dst) {
#if defined(__AVX512BW__)
  if (std::is_same_v<T, bf16> && bc % 32 == 0) {
    for (int64_t r0 = 0, r1; r0 < nr; r0 = r1) {
      const float* g = grid(r0);
      for (r1 = r0 + 1; r1 < nr && grid(r1) == g;) ++r1;
      for (int64_t c = 0; c * bc < K; ++c) {
        const E4m3Table t = e4m3_table(g[c]);
        const int64_t k0 = c * bc, k1 = std::min(K, k0 + bc), kv = k0 + (k1 - k0) / 32 * 32;
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t k = k0; k < kv; k += 32)
            _mm512_storeu_si512(dst + r * K + k, e4m3_lookup(t, src + r * K + k));
          dequant_row(src + r * K + kv, k1 - kv, g + c, bc, dst + r * K + kv);  // a tail short of 32
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < nr; ++r) dequant_row(src + r * K, K, grid(r), bc, dst + r * K);
}

}  // namespace expertmesh_cpu
