/* BlockMatMul16 and BlockMatMul16Q4 on AMX for steps of many rows (prompt chunks; included by block_matmul.c).

   VPDPWSSD takes 32 int16 products an instruction, so from a few rows on both products are bound by it. The AMX tile
   product takes 16 rows x 16 columns x 32 inputs of int8 in one instruction. An int16 row value splits exactly into
   x = 256 hi + lo (hi signed, lo in 0..255), so a block's sum is 256 sum(hi w) + sum(lo w), w the int8 weight or the
   4-bit level less 8: two tile products (TDPBSSD, TDPBUSD) per block of 32 inputs, their int32 sums exact. That
   integer is the one the VNNI and AVX2 paths compute (for 4 bits: sum(x q) - 8 sum(x)), and the float work after it
   is theirs, the same operations in the same order: every path gives the same bits, whichever rows a step holds.
   The per-block scales keep the tiles from accumulating over the whole of K, so every block's sums leave the tiles;
   two sets of sum tiles, for even and odd blocks, let the tile unit work on one block while the vector units finish
   the other.

   Tiles: 0, 1 the even block's sums (hi, lo), 2, 3 the odd block's, 4, 5 the rows' hi and lo bytes, 6 the even
   block's weights, 7 the odd block's. Linux hands out the tile state on request (arch_prctl), once per process. */

#include <sys/syscall.h>

long syscall(long number, ...);  /* unistd.h declares it only outside strict C11 */

/* AMX intrinsics came with gcc 11 and clang 12 (and binutils 2.36 for gcc's); older compilers build the library
   without this path, as does MEDUSA_EXPORT_NO_AMX (the retry when a first compile fails: `kernels._compile`). */
#if !defined(MEDUSA_EXPORT_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define BM_AMX_BUILT 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni")))
#else
#define BM_AMX_BUILT 0
#endif

/* Rows of a tile; one block's weights for a group; one block of a row tile's hi then lo bytes. */
enum { AMX_ROWS = 16, AMX_B_BYTES = BM_BLOCK * BM_GROUP, AMX_A_BYTES = 2 * AMX_ROWS * BM_BLOCK };

static int bm_amx;  /* the AMX path: the CPU and the kernel allow it and MEDUSA_EXPORT_KERNEL_NO_AMX is off (tests);
                       set by `bm_detect` like bm_vnni512 */

/* Whether this CPU has AMX int8 and Linux gave this process the tile state. */
static int amx_permitted(void) {
  if (!BM_AMX_BUILT) return 0;
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!(d & (1u << 24)) || !(d & (1u << 25))) return 0;  /* AMX-TILE, AMX-INT8 */
  enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} AmxConfig;

#if BM_AMX_BUILT

/* Group g's weights as tile rows, block b's 8 rows of 64 bytes: row r holds for each column c the weights of inputs
   4 r .. 4 r + 3 (TDPB*'s layout), for 4 bits the levels less 8. A line of the packed weights is 16 columns x a pair
   of inputs (for 4 bits: a pair in the low nibbles, the pair 16 inputs on in the high ones), so a tile row
   interleaves two consecutive lines by pairs. */
AMX_TARGET static void amx_unpack(const BlockWork *w, int64_t g, int8_t *out) {
  const int64_t blocks = w->k / BM_BLOCK;
  static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_loadu_si512((const void *)order);  /* word c of each line, then of the next */
  const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t b = 0; b < blocks; b++) {
    int8_t *tile = out + b * AMX_B_BYTES;
    if (!w->w4) {  /* lines 2 r and 2 r + 1 of the block: tile row r */
      const int8_t *lines = w->w + g * BM_GROUP * w->k + b * BM_BLOCK * BM_GROUP;
      for (int r = 0; r < BM_BLOCK / 4; r++)
        _mm512_store_si512((void *)(tile + r * 64),
                           _mm512_permutexvar_epi16(pairs, _mm512_loadu_si512((const void *)(lines + r * 64))));
      continue;
    }
    const uint8_t *lines = w->w4 + g * BM_GROUP * w->k / 2 + b * BM_BLOCK * BM_GROUP / 2;
    for (int r = 0; r < BM_BLOCK / 8; r++) {  /* low nibbles: tile row r; high ones: row r + 4 */
      __m512i two = _mm512_permutexvar_epi16(pairs, _mm512_loadu_si512((const void *)(lines + r * 64)));
      _mm512_store_si512((void *)(tile + r * 64), _mm512_sub_epi8(_mm512_and_si512(two, nibble), eight));
      _mm512_store_si512((void *)(tile + (r + 4) * 64),
                         _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(two, 4), nibble), eight));
    }
  }
}

/* One block's sums from tiles HI and LO finished into acc: for each row the exact sum times the scale (the step),
   then for 4 bits (``four``, a constant of each inlined copy) the block's sum of the row's values (``xs``, as float)
   times the offset, as the VNNI path does. */
AMX_TARGET static inline __attribute__((always_inline)) void amx_finish(const int32_t *hi, const int32_t *lo,
                                                                        __m512 *acc, int four, const float *xs,
                                                                        __m512 s, __m512 o) {
#pragma GCC unroll 16
  for (int m = 0; m < AMX_ROWS; m++) {
    __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512((const void *)(hi + 16 * m)), 8),
                                   _mm512_load_si512((const void *)(lo + 16 * m)));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[m]);
    if (four) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xs[m]), o, acc[m]);
  }
}

/* Block BLK's tile products into sum tiles HI, LO from weight tile B (tile numbers are constants of the
   instructions). */
#define AMX_BLOCK(HI, LO, B, BLK)                                                                                    \
  do {                                                                                                               \
    _tile_zero(HI);                                                                                                  \
    _tile_zero(LO);                                                                                                  \
    _tile_loadd(4, rows + (BLK) * AMX_A_BYTES, BM_BLOCK);                                                            \
    _tile_loadd(5, rows + (BLK) * AMX_A_BYTES + AMX_A_BYTES / 2, BM_BLOCK);                                          \
    _tile_loadd(B, unpacked + (BLK) * AMX_B_BYTES, 64);                                                              \
    _tile_dpbssd(HI, 4, B);                                                                                          \
    _tile_dpbusd(LO, 5, B);                                                                                          \
  } while (0)

/* Rows [0, amx_rows) of column group g, AMX_ROWS at a time; ``unpacked``: scratch for the group's weights. Block
   b + 1's products are issued before block b's sums are stored (even blocks in tiles 0, 1, odd ones in 2, 3), so the
   stores do not wait on the products' latency. */
AMX_TARGET static inline __attribute__((always_inline)) void amx_rows_as(const BlockWork *w, int64_t g,
                                                                         int8_t *unpacked, const int four) {
  const int64_t k = w->k, blocks = k / BM_BLOCK;
  AmxConfig cfg = {.palette = 1};
  for (int t = 0; t < 4; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = 64;  /* sums: 16 rows x 16 int32 */
  for (int t = 4; t < 6; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = BM_BLOCK;  /* rows' bytes: 16 x 32 */
  for (int t = 6; t < 8; t++) cfg.rows[t] = BM_BLOCK / 4, cfg.colsb[t] = 64;  /* weights: 8 x 64 */
  /* gcc's ldtilecfg builtin declares fewer bytes read than the 64 it reads, so nothing else would keep the compiler
     from dropping the stores above (a configuration of zero rows: #GP) */
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
  amx_unpack(w, g, unpacked);
  const float *sg = w->scale + g * BM_GROUP * blocks, *og = four ? w->offset + g * BM_GROUP * blocks : NULL;
  int32_t hi[AMX_ROWS * BM_GROUP] __attribute__((aligned(64))), lo[AMX_ROWS * BM_GROUP] __attribute__((aligned(64)));
  for (int64_t m0 = 0; m0 < w->amx_rows; m0 += AMX_ROWS) {
    const uint8_t *rows = w->a_tiles + m0 * 2 * k;  /* this row tile's blocks */
    const float *xs = four ? w->a_xsum + m0 * blocks : NULL;
    __m512 acc[AMX_ROWS];
    for (int m = 0; m < AMX_ROWS; m++) acc[m] = _mm512_setzero_ps();
    AMX_BLOCK(0, 1, 6, 0);
    for (int64_t b = 0; b < blocks; b++) {  /* the tile unit runs in order: b + 1's products go in before b's stores */
      if (b % 2 == 0) {
        if (b + 1 < blocks) AMX_BLOCK(2, 3, 7, b + 1);
        _tile_stored(0, hi, 64);
        _tile_stored(1, lo, 64);
      } else {
        if (b + 1 < blocks) AMX_BLOCK(0, 1, 6, b + 1);
        _tile_stored(2, hi, 64);
        _tile_stored(3, lo, 64);
      }
      amx_finish(hi, lo, acc, four, four ? xs + b * AMX_ROWS : NULL, _mm512_loadu_ps(sg + b * BM_GROUP),
                 four ? _mm512_loadu_ps(og + b * BM_GROUP) : _mm512_setzero_ps());
    }
    for (int m = 0; m < AMX_ROWS; m++)
      _mm512_storeu_ps(w->y + (m0 + m) * w->n + g * BM_GROUP,
                       _mm512_mul_ps(acc[m], _mm512_set1_ps(w->row_scale[m0 + m])));
  }
  _tile_release();
}
#undef AMX_BLOCK

/* One copy for each kind of weights. */
AMX_TARGET static void amx_rows(const BlockWork *w, int64_t g, int8_t *unpacked) {
  if (w->w4)
    amx_rows_as(w, g, unpacked, 1);
  else
    amx_rows_as(w, g, unpacked, 0);
}
#else
static void amx_rows(const BlockWork *w, int64_t g, int8_t *unpacked) { (void)w; (void)g; (void)unpacked; }
#endif

/* The first ``tiles`` x AMX_ROWS rows (int16, k values each) split for the tiles, x = 256 hi + lo exactly (hi = x >> 8
   signed, lo = x & 255), block by block: row tile t's block b at out + (t blocks + b) AMX_A_BYTES, its 16 rows' hi
   bytes (32 each), then their lo bytes; for 4 bits (``xsum`` given) each block's sum of a row's values as float,
   xsf[(t blocks + b) 16 + m] for row 16 t + m (the value the VNNI path converts). */
static void amx_split_rows(const int16_t *q, const int32_t *xsum, int64_t tiles, int64_t k, uint8_t *out,
                           float *xsf) {
  const int64_t blocks = k / BM_BLOCK;
  for (int64_t t = 0; t < tiles; t++)
    for (int64_t b = 0; b < blocks; b++) {
      uint8_t *hi = out + (t * blocks + b) * AMX_A_BYTES, *lo = hi + AMX_A_BYTES / 2;
      for (int m = 0; m < AMX_ROWS; m++) {
        const int16_t *x = q + (t * AMX_ROWS + m) * k + b * BM_BLOCK;
        for (int j = 0; j < BM_BLOCK; j++) {
          hi[m * BM_BLOCK + j] = (uint8_t)(int8_t)(x[j] >> 8);
          lo[m * BM_BLOCK + j] = (uint8_t)(x[j] & 0xFF);
        }
        if (xsum) xsf[(t * blocks + b) * AMX_ROWS + m] = (float)xsum[(t * AMX_ROWS + m) * blocks + b];
      }
    }
}
