// Per-row steps the CPU kernels share: RMSNorm, the rotary embedding and a per-head matmul row,
// each with the reference's roundings. norm_cpu.cpp, rope_cpu.cpp and linear_cpu.cpp run them over
// a tensor's rows; mla_rows_cpu.cpp chains them around MLA's projections in one call.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_vec.h"

namespace expertmesh_cpu {

// o = weight * round(h * rsqrt(mean(h^2) + eps)) for one bf16 row (h its fp32 values), rounded to
// bf16: the reference's order and roundings; only the mean's additions run in another order
inline void rms_norm_row(const bf16* row, const bf16* W, int64_t D, float eps, bf16* o) {
  vec acc = vzero();
  int64_t d = 0;
  for (; d + VL <= D; d += VL) {
    const vec v = vload(row + d);
    acc = vfma(v, v, acc);
  }
  float sq = vsum(acc);
  for (; d < D; ++d) sq += widen(row[d]) * widen(row[d]);
  const float r = 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
  for (d = 0; d < D; ++d) o[d] = static_cast<bf16>(widen(W[d]) * round_as<bf16>(widen(row[d]) * r));
}

// o[0 : 2 half] = the rotation of xp[0 : 2 half] by one position's cos/sin [half], as
// rope.RotaryEmbedding.rotate computes it (interleave: pairs (2i, 2i+1) rotate and come out
// de-interleaved), each product, the difference and the sum rounded to T
template <typename T>
inline void rope_row(const T* xp, const T* c, const T* s, int64_t half, bool interleave, T* o) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(interleave ? xp[2 * i] : xp[i]);
    const float x2 = static_cast<float>(interleave ? xp[2 * i + 1] : xp[half + i]);
    const float ci = static_cast<float>(c[i]), si = static_cast<float>(s[i]);
    o[i] = static_cast<T>(round_as<T>(x1 * ci) - round_as<T>(x2 * si));
    o[half + i] = static_cast<T>(round_as<T>(x2 * ci) + round_as<T>(x1 * si));
  }
}

// o[0 : N] = xr . w for one row of K bf16 values (sk apart) and w [K, N] row-major: K vector FMAs
// over N in fp32 (acc [N] scratch), rounded once, as a bf16 bmm rounds
inline void bmm_row(const bf16* xr, int64_t sk, const bf16* w, int64_t K, int64_t N, float* acc, bf16* o) {
  for (int64_t n = 0; n < N; ++n) acc[n] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const vec xv = vset1(widen(xr[k * sk]));
    const bf16* wr = w + k * N;
    int64_t n = 0;
    for (; n + VL <= N; n += VL) vstore(acc + n, vfma(xv, vload(wr + n), vload(acc + n)));
    for (; n < N; ++n) acc[n] += widen(xr[k * sk]) * widen(wr[n]);
  }
  for (int64_t n = 0; n < N; ++n) o[n] = static_cast<bf16>(acc[n]);
}

}  // namespace expertmesh_cpu
