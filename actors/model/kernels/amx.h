// Intel AMX (the tile unit of Sapphire Rapids and later Xeons) for bf16 weights held in the pair
// layout of kernels.pack_pairs: [N/16, K/2, 16, 2], where the 64 bytes at [b, k2] are the (2 k2,
// 2 k2 + 1) pair of 16 consecutive outputs. That is exactly the B operand of TDPBF16PS (16 rows of
// k-pairs x 16 outputs), so one packed weight serves both the AVX512-BF16 kernels and this one.
//
// A tile multiply is 16 x 16 x 32 products per instruction, 16x an AVX-512 vdpbf16ps: at 16+ rows
// (a batch-32 lm_head, a prefill's experts) the matmul stops being compute-bound. Built only where
// the compiler targets AMX (-march=native on such a CPU); at run time the process must ask Linux
// for the tile state once (arch_prctl ARCH_REQ_XCOMP_PERM), and every thread loads a tile
// configuration before its first tile instruction and releases it after.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define EXPERTMESH_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/BFloat16.h>

#include "cpu_vec.h"  // vexp, vround_bf16 for the epilogues

#include <cstdint>
#include <cstdlib>
#include <string>

namespace expertmesh_cpu {

// Linux: ARCH_REQ_XCOMP_PERM and the XTILEDATA feature number (asm/prctl.h, arch/x86 fpu xstate)
constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

// True once this process may run tile instructions (asked once; false on kernels without AMX, or
// with EXPERTMESH_AMX=0 in the environment: the AVX-512 kernels then serve, for A/B runs).
inline bool amx_ready() {
  static const bool ok = [] {
    const char* off = std::getenv("EXPERTMESH_AMX");
    if (off != nullptr && std::string(off) == "0") return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// One palette-1 configuration for every tile used here: 8 tiles of 16 rows x 64 bytes.
// tmm0-3 accumulate (fp32 16 x 16), tmm4-5 hold activations (bf16 16 x 32), tmm6-7 weights.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration on this thread for as long as the guard lives.
class TileScope {
 public:
  TileScope() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) {
      cfg.colsb[i] = 64;
      cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Zeroes the four accumulators (tmm0-3).
inline void tiles_zero4() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Stores accumulators 0 and 1 (and 2 and 3 when `both`) to c[0..3], `stride` bytes per row.
inline void tiles_store4(float* const c[4], int64_t stride, bool both) {
  _tile_stored(0, c[0], stride);
  _tile_stored(1, c[1], stride);
  if (both) {
    _tile_stored(2, c[2], stride);
    _tile_stored(3, c[3], stride);
  }
}

// C[m, 0:32] = A[m, :] . (blocks b0 and b1 of the pair layout) for m in [0, rows), rows a multiple
// of 16: A bf16 with `lda` elements per row (K = 2 * k2s of them used), b0/b1 the two 16-output
// blocks (each k2s x 16 x 2 bf16, contiguous), C fp32 with 32 per row. k2s a multiple of 16.
// `next` (or null): the next call's b0, whose two blocks are fetched into L2 while this one runs
// (the tile loads stall on DRAM otherwise: 16 GB/s instead of 26 for a cold 132 MB head).
// Runs inside a TileScope.
inline void amx_pairs_32(const c10::BFloat16* A, int64_t lda, int64_t rows, const c10::BFloat16* b0,
                         const c10::BFloat16* b1, int64_t k2s, float* C, const c10::BFloat16* next = nullptr) {
  const int64_t stride_a = lda * 2;  // bytes
  for (int64_t m0 = 0; m0 < rows; m0 += 32) {
    const bool two = m0 + 16 < rows;
    const c10::BFloat16* a0 = A + m0 * lda;
    const c10::BFloat16* a1 = a0 + 16 * lda;
    tiles_zero4();
    for (int64_t k2 = 0; k2 < k2s; k2 += 16) {
      if (next != nullptr && m0 == 0)
        for (int64_t line = 0; line < 2 * 16 * 64; line += 64)  // 1 KB of each of the next two blocks
          _mm_prefetch(reinterpret_cast<const char*>(next + (line >= 1024 ? k2s * 32 : 0) + k2 * 32) + line % 1024,
                       _MM_HINT_T1);
      _tile_loadd(6, b0 + k2 * 32, 64);
      _tile_loadd(7, b1 + k2 * 32, 64);
      _tile_loadd(4, a0 + 2 * k2, stride_a);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, a1 + 2 * k2, stride_a);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* const c[4] = {C + m0 * 32, C + m0 * 32 + 16, C + (m0 + 16) * 32, C + (m0 + 16) * 32 + 16};
    tiles_store4(c, 128, two);
  }
}

}  // namespace expertmesh_cpu
#endif
