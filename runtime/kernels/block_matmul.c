/* BlockMatMul16: int8 weights in blocks of 32 times each row's activations as int16 (included by row_attention.c).

     y [..., N] = BlockMatMul16(x [..., K] float, w [N/16, K/2, 32] int8, scale [N/16, K/32, 16] float[, signs [B]])

   The weights W [K, N] are int8 in blocks of 32 along K, one fp32 scale per block and column (the scale input), and
   packed 16 columns by 2 inputs to a 32-byte line: w[g, j, 2 c + i] = W8[2 j + i, 16 g + c]. Each row x is quantized
   by itself to int16, q = round(x * 32767 / max|x|) (after turning it by diag(signs) H per block of B when signs are
   given, as RowQuantize does). Per block an exact int32 sum of 32 products, turned to fp32 and multiplied-added by
   the block's scale, blocks in order; the row's scale last. A row's result therefore depends on that row alone, and
   the AVX-512 VNNI path (VPDPWSSD) and the AVX2 path (VPMADDWD) give the same bits: the integer sums are exact and the
   float operations are the same ones in the same order. About 15 bits of each row against RowQuantize's 8: measured
   in PyTorch, the activations' share of int8 rows' lost agreement (docs/quantization.md).

     y [..., N] = BlockMatMul16Q4(x [..., K] float, w [N/16, K/4, 32] uint8, scale [N/16, K/32, 16] float,
                                  offset [N/16, K/32, 16] float)

   The same for 4-bit weights W[k, n] = scale * (q - 8) + offset per block of 32 along K and column, q in 0..15:
   GGUF's Q4_1 blocks d q + m with offset = m + 8 d (0 for Q4_0), kept as the source has them. Line l (0..7) of block
   b of group g holds pair l in its low nibbles and pair l + 8 in its high ones: byte 2 c + i is
   q[32 b + 2 l + i, 16 g + c] | q[32 b + 2 (l + 8) + i, 16 g + c] << 4. Per block the exact int32 sum of the row's
   int16 values times q - 8 (the sum times q, less 8 times the block's sum of the row's values), multiplied-added by
   the scale, then the block's sum of the row's values multiplied-added by the offset; blocks in order, the row's
   scale last. Both paths do the same float operations in the same order, as above. */

enum { BM_BLOCK = 32, BM_GROUP = 16, BM_ROWS = 8, BM_LEVELS = 32767, BM_CHAINS = 4 };
/* Independent integer sums per row for one to three rows: with one chain a row waits on VPDPWSSD's latency (about 5
   cycles), which bounds a one-row product of the decoder near 2.8 ms on two cores, about what reading its weights
   from L3 takes (on this machine the difference did not show above the noise). Exact, so their order does not
   matter. */
#define BM_CHAINS_OF(mr) ((BM_CHAINS + (mr) - 1) / (mr))  /* 4, 2, 2, then 1 a row */

typedef struct {
  const int16_t *q;  /* [rows, k] the rows quantized */
  const float *row_scale;  /* [rows] */
  const int8_t *w;  /* 8 bits: [N/16, K/2, 32] */
  const float *scale;
  float *y;  /* [rows, n] */
  int64_t rows, k, n;
  const uint8_t *w4;  /* 4 bits (BlockMatMul16Q4, else NULL): [N/16, K/4, 32] */
  const float *offset;  /* 4 bits: [N/16, K/32, 16] */
  const int32_t *xsum;  /* 4 bits: [rows, K/32] each block's sum of a row's int16 values */
  int64_t amx_rows;  /* rows [0, amx_rows) go to the AMX path (`block_amx.c`), the others to the VNNI / AVX2 tiles */
  const uint8_t *a_tiles;  /* AMX: the rows' values as bytes by row tile and block (`amx_split_rows`) */
  const float *a_xsum;  /* AMX: xsum as float by row tile and block */
} BlockWork;

#include "block_amx.c"

static int bm_vnni512;  /* the AVX-512 path: the CPU has it and MEDUSA_EXPORT_KERNEL_AVX2 is off (tests); set by
                           `bm_detect` when the library registers (before its sessions compute; a later registration
                           writes the same value), read atomically */

/* Whether the switch ``name`` is on: set to something other than blank or "0" (MEDUSA_EXPORT_KERNEL_AVX2=0 keeps the
   AVX-512 path, as a blank value does, rather than leaving it). */
static int env_on(const char *name) {
  const char *v = getenv(name);
  if (!v) return 0;
  while (*v == ' ' || *v == '\t') v++;
  return *v && strcmp(v, "0") != 0;
}

static void bm_detect(void) {
  __builtin_cpu_init();  /* harmless when libgcc's constructor ran already */
  int vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
             !env_on("MEDUSA_EXPORT_KERNEL_AVX2");
  __atomic_store_n(&bm_vnni512, vnni, __ATOMIC_RELAXED);
  __atomic_store_n(&bm_amx, vnni && !env_on("MEDUSA_EXPORT_KERNEL_NO_AMX") && amx_permitted(), __ATOMIC_RELAXED);
}

/* The path the block products take in this process (detected now if no session registered the library yet): 2 AMX
   tiles from 16 rows on (VNNI below), 1 AVX-512 VNNI, 0 AVX2. For tests and reports (`kernels.block_matmul_path`). */
__attribute__((visibility("default"))) int medusa_export_block_path(void) {
  bm_detect();
  return __atomic_load_n(&bm_amx, __ATOMIC_RELAXED) ? 2 : __atomic_load_n(&bm_vnni512, __ATOMIC_RELAXED) ? 1 : 0;
}

/* One row to int16 under max|row| / 32767: the scale, or 1 for a row of zeros, NaN for a row holding NaN or inf.
   Eight values at a time: VCVTPS2DQ rounds as nearbyintf does (to nearest, ties to even), and |x| * 32767 / max
   rounds to at most 32767. */
static float quantize_row16(const float *row, int16_t *q, int64_t k) {
  int bad;
  float m = row_peak(row, k, &bad);
  int64_t j;
  float inv = (float)BM_LEVELS / m;
  if (bad || !(inv <= FLT_MAX)) {
    memset(q, 0, sizeof(int16_t) * (size_t)k);
    return bad ? NAN : 1.0f;
  }
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (j = 0; j + 8 <= k; j += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + j), inv8));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08);  /* the 8 int16 in the low half */
    _mm_storeu_si128((__m128i *)(q + j), _mm256_castsi256_si128(packed));
  }
  for (; j < k; j++) q[j] = (int16_t)nearbyintf(row[j] * inv);
  return m / (float)BM_LEVELS;
}

/* A work item of `over_rows` for BlockMatMul16: rows of w->in quantized to int16 into w->out (each turned first when
   signs are given, the 1 / sqrt(B) of H / sqrt(B) taken into the scale, as `quantize_row` does), scales in w->scale. */
static void bm_quantize_block(void *data, size_t index) {
  RowWork *w = (RowWork *)data;
  int64_t r0 = (int64_t)index * ROW_BLOCK, r1 = r0 + ROW_BLOCK < w->rows ? r0 + ROW_BLOCK : w->rows;
  float *work = NULL;
  if (w->signs && !(work = malloc(sizeof(float) * (size_t)w->k))) {
    __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);  /* other threads may be writing it too */
    return;
  }
  const float norm = w->signs ? 1.0f / sqrtf((float)w->block) : 1.0f;
  for (int64_t r = r0; r < r1; r++) {
    const float *row = (const float *)w->in + r * w->k;
    if (w->signs) {
      turn_row(row, work, w->signs, w->k, w->block);
      row = work;
    }
    w->scale[r] = quantize_row16(row, (int16_t *)w->out + r * w->k, w->k) * norm;
  }
  free(work);
}

/* Rows [m0, m0 + mr) of y for the column groups [g0, g1), AVX-512 VNNI: one zmm holds a group's 16 columns. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void bm_tile512(
    int mr, const BlockWork *w, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t k = w->k, blocks = k / BM_BLOCK;
  const int16_t *q = w->q + m0 * k;
  for (int64_t g = g0; g < g1; g++) {
    __m512 acc[BM_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const int8_t *wg = w->w + g * BM_GROUP * k;
    const float *sg = w->scale + g * BM_GROUP * blocks;
    for (int64_t b = 0; b < blocks; b++) {
      const int chains = BM_CHAINS_OF(mr);
      __m512i sum[BM_ROWS][BM_CHAINS];
      for (int m = 0; m < mr; m++)
        for (int c = 0; c < chains; c++) sum[m][c] = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int j = 0; j < BM_BLOCK / 2; j++) {  /* unrolled: each chain index a constant, the sums in registers */
        __m512i wj = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wg + (b * BM_BLOCK / 2 + j) * 32)));
        for (int m = 0; m < mr; m++) {
          int32_t pair;
          memcpy(&pair, q + m * k + b * BM_BLOCK + 2 * j, sizeof pair);
          sum[m][j % chains] = _mm512_dpwssd_epi32(sum[m][j % chains], wj, _mm512_set1_epi32(pair));
        }
      }
      __m512 s = _mm512_loadu_ps(sg + b * BM_GROUP);
      for (int m = 0; m < mr; m++) {
        for (int c = 1; c < chains; c++) sum[m][0] = _mm512_add_epi32(sum[m][0], sum[m][c]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][0]), s, acc[m]);
      }
    }
    for (int m = 0; m < mr; m++)
      _mm512_storeu_ps(w->y + (m0 + m) * w->n + g * BM_GROUP, _mm512_mul_ps(acc[m], _mm512_set1_ps(w->row_scale[m0 + m])));
  }
}

/* The same with AVX2: two ymm per group (columns 0-7 and 8-15), VPMADDWD then VPADDD for each pair of inputs. */
__attribute__((always_inline)) static inline void bm_tile256(int mr, const BlockWork *w, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t k = w->k, blocks = k / BM_BLOCK;
  const int16_t *q = w->q + m0 * k;
  for (int64_t g = g0; g < g1; g++) {
    __m256 acc[BM_ROWS][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const int8_t *wg = w->w + g * BM_GROUP * k;
    const float *sg = w->scale + g * BM_GROUP * blocks;
    for (int64_t b = 0; b < blocks; b++) {
      __m256i sum[BM_ROWS][2];  /* VPMADDWD does not accumulate: its products' chain is VPADDD's, one cycle */
      for (int m = 0; m < mr; m++) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
      for (int j = 0; j < BM_BLOCK / 2; j++) {
        const int8_t *line = wg + (b * BM_BLOCK / 2 + j) * 32;
        __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)line));
        __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(line + 16)));
        for (int m = 0; m < mr; m++) {
          int32_t pair;
          memcpy(&pair, q + m * k + b * BM_BLOCK + 2 * j, sizeof pair);
          __m256i x = _mm256_set1_epi32(pair);
          sum[m][0] = _mm256_add_epi32(sum[m][0], _mm256_madd_epi16(lo, x));
          sum[m][1] = _mm256_add_epi32(sum[m][1], _mm256_madd_epi16(hi, x));
        }
      }
      __m256 s0 = _mm256_loadu_ps(sg + b * BM_GROUP), s1 = _mm256_loadu_ps(sg + b * BM_GROUP + 8);
      for (int m = 0; m < mr; m++) {
        acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][0]), s0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][1]), s1, acc[m][1]);
      }
    }
    for (int m = 0; m < mr; m++) {
      __m256 r = _mm256_set1_ps(w->row_scale[m0 + m]);
      float *y = w->y + (m0 + m) * w->n + g * BM_GROUP;
      _mm256_storeu_ps(y, _mm256_mul_ps(acc[m][0], r));
      _mm256_storeu_ps(y + 8, _mm256_mul_ps(acc[m][1], r));
    }
  }
}

/* BlockMatMul16Q4's rows [m0, m0 + mr), AVX-512 VNNI: a 32-byte line widened to 32 int16 gives two pairs of inputs,
   its low nibbles and its high ones. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void bm4_tile512(
    int mr, const BlockWork *w, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t k = w->k, blocks = k / BM_BLOCK;
  const int16_t *q = w->q + m0 * k;
  const int32_t *xs = w->xsum + m0 * blocks;
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  for (int64_t g = g0; g < g1; g++) {
    __m512 acc[BM_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const uint8_t *wg = w->w4 + g * BM_GROUP * k / 2;
    const float *sg = w->scale + g * BM_GROUP * blocks, *og = w->offset + g * BM_GROUP * blocks;
    for (int64_t b = 0; b < blocks; b++) {
      const int chains = BM_CHAINS_OF(mr);
      __m512i sum[BM_ROWS][BM_CHAINS];
      for (int m = 0; m < mr; m++)
        for (int c = 0; c < chains; c++) sum[m][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int l = 0; l < BM_BLOCK / 4; l++) {  /* unrolled, as above */
        __m512i raw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wg + (b * BM_BLOCK / 4 + l) * 32)));
        __m512i low = _mm512_and_si512(raw, nibble), high = _mm512_srli_epi16(raw, 4);
        for (int m = 0; m < mr; m++) {
          int32_t pair_low, pair_high;
          memcpy(&pair_low, q + m * k + b * BM_BLOCK + 2 * l, sizeof pair_low);
          memcpy(&pair_high, q + m * k + b * BM_BLOCK + 2 * (l + BM_BLOCK / 4), sizeof pair_high);
          int c0 = (2 * l) % chains, c1 = (2 * l + 1) % chains;
          sum[m][c0] = _mm512_dpwssd_epi32(sum[m][c0], low, _mm512_set1_epi32(pair_low));
          sum[m][c1] = _mm512_dpwssd_epi32(sum[m][c1], high, _mm512_set1_epi32(pair_high));
        }
      }
      __m512 s = _mm512_loadu_ps(sg + b * BM_GROUP), o = _mm512_loadu_ps(og + b * BM_GROUP);
      for (int m = 0; m < mr; m++) {
        for (int c = 1; c < chains; c++) sum[m][0] = _mm512_add_epi32(sum[m][0], sum[m][c]);
        int32_t x = xs[m * blocks + b];
        __m512i centred = _mm512_sub_epi32(sum[m][0], _mm512_set1_epi32(8 * x));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), s, acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_set1_ps((float)x), o, acc[m]);
      }
    }
    for (int m = 0; m < mr; m++)
      _mm512_storeu_ps(w->y + (m0 + m) * w->n + g * BM_GROUP, _mm512_mul_ps(acc[m], _mm512_set1_ps(w->row_scale[m0 + m])));
  }
}

/* The same with AVX2: each half line (8 columns) widened to 16 int16, low and high nibbles as above. */
__attribute__((always_inline)) static inline void bm4_tile256(int mr, const BlockWork *w, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t k = w->k, blocks = k / BM_BLOCK;
  const int16_t *q = w->q + m0 * k;
  const int32_t *xs = w->xsum + m0 * blocks;
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  for (int64_t g = g0; g < g1; g++) {
    __m256 acc[BM_ROWS][2];
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const uint8_t *wg = w->w4 + g * BM_GROUP * k / 2;
    const float *sg = w->scale + g * BM_GROUP * blocks, *og = w->offset + g * BM_GROUP * blocks;
    for (int64_t b = 0; b < blocks; b++) {
      __m256i sum[BM_ROWS][2];
      for (int m = 0; m < mr; m++) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
      for (int l = 0; l < BM_BLOCK / 4; l++) {
        const uint8_t *line = wg + (b * BM_BLOCK / 4 + l) * 32;
        __m256i raw0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)line));
        __m256i raw1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(line + 16)));
        __m256i low0 = _mm256_and_si256(raw0, nibble), high0 = _mm256_srli_epi16(raw0, 4);
        __m256i low1 = _mm256_and_si256(raw1, nibble), high1 = _mm256_srli_epi16(raw1, 4);
        for (int m = 0; m < mr; m++) {
          int32_t pair_low, pair_high;
          memcpy(&pair_low, q + m * k + b * BM_BLOCK + 2 * l, sizeof pair_low);
          memcpy(&pair_high, q + m * k + b * BM_BLOCK + 2 * (l + BM_BLOCK / 4), sizeof pair_high);
          __m256i xl = _mm256_set1_epi32(pair_low), xh = _mm256_set1_epi32(pair_high);
          sum[m][0] = _mm256_add_epi32(sum[m][0], _mm256_add_epi32(_mm256_madd_epi16(low0, xl),
                                                                   _mm256_madd_epi16(high0, xh)));
          sum[m][1] = _mm256_add_epi32(sum[m][1], _mm256_add_epi32(_mm256_madd_epi16(low1, xl),
                                                                   _mm256_madd_epi16(high1, xh)));
        }
      }
      __m256 s0 = _mm256_loadu_ps(sg + b * BM_GROUP), s1 = _mm256_loadu_ps(sg + b * BM_GROUP + 8);
      __m256 o0 = _mm256_loadu_ps(og + b * BM_GROUP), o1 = _mm256_loadu_ps(og + b * BM_GROUP + 8);
      for (int m = 0; m < mr; m++) {
        int32_t x = xs[m * blocks + b];
        __m256i eight = _mm256_set1_epi32(8 * x);
        __m256 xf = _mm256_set1_ps((float)x);
        acc[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][0], eight)), s0, acc[m][0]);
        acc[m][0] = _mm256_fmadd_ps(xf, o0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[m][1], eight)), s1, acc[m][1]);
        acc[m][1] = _mm256_fmadd_ps(xf, o1, acc[m][1]);
      }
    }
    for (int m = 0; m < mr; m++) {
      __m256 r = _mm256_set1_ps(w->row_scale[m0 + m]);
      float *y = w->y + (m0 + m) * w->n + g * BM_GROUP;
      _mm256_storeu_ps(y, _mm256_mul_ps(acc[m][0], r));
      _mm256_storeu_ps(y + 8, _mm256_mul_ps(acc[m][1], r));
    }
  }
}

/* Constant row counts, so the accumulators stay in registers and each line of weights is read once a tile: the
   tiles are always inlined, since gcc otherwise keeps an out-of-line copy for some counts with ``mr`` a variable (the
   one-row 4-bit tile took about 1.4x its time so, the 8-bit AVX-512 tile every count). */
#define BM_DISPATCH(TILE)                                                                                          \
  switch (mr) {                                                                                                    \
    case 1: TILE(1, w, m0, g0, g1); break;                                                                         \
    case 2: TILE(2, w, m0, g0, g1); break;                                                                         \
    case 3: TILE(3, w, m0, g0, g1); break;                                                                         \
    case 4: TILE(4, w, m0, g0, g1); break;                                                                         \
    case 5: TILE(5, w, m0, g0, g1); break;                                                                         \
    case 6: TILE(6, w, m0, g0, g1); break;                                                                         \
    case 7: TILE(7, w, m0, g0, g1); break;                                                                         \
    default: TILE(8, w, m0, g0, g1);                                                                               \
  }

/* The rows of w from ``first`` on, BM_ROWS at a time, for the column groups [g0, g1). */
#define BM_ROW_TILES(TILE)                                                                                         \
  for (int64_t m0 = first; m0 < w->rows; m0 += BM_ROWS) {                                                          \
    int mr = (int)(w->rows - m0 < BM_ROWS ? w->rows - m0 : BM_ROWS);                                               \
    BM_DISPATCH(TILE)                                                                                              \
  }

/* One function per path and width: the AVX-512 ones need their target for the tile they inline. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void bm_groups512(const BlockWork *w, int64_t first,
                                                                                int64_t g0, int64_t g1) {
  BM_ROW_TILES(bm_tile512)
}
static void bm_groups256(const BlockWork *w, int64_t first, int64_t g0, int64_t g1) { BM_ROW_TILES(bm_tile256) }
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void bm4_groups512(const BlockWork *w, int64_t first,
                                                                                 int64_t g0, int64_t g1) {
  BM_ROW_TILES(bm4_tile512)
}
static void bm4_groups256(const BlockWork *w, int64_t first, int64_t g0, int64_t g1) { BM_ROW_TILES(bm4_tile256) }

/* Work item ``index``: column group ``index`` for every row, the first amx_rows on AMX (all of them on the VNNI
   tiles, with the same bits, if its scratch cannot be had). */
static void bm_item(void *data, size_t index) {
  const BlockWork *w = (const BlockWork *)data;
  int64_t g0 = (int64_t)index, g1 = g0 + 1, first = 0;
  int vnni = __atomic_load_n(&bm_vnni512, __ATOMIC_RELAXED);
  if (w->amx_rows) {
    int8_t *unpacked = aligned_alloc(64, (size_t)(w->k / BM_BLOCK) * AMX_B_BYTES);
    if (unpacked) {
      amx_rows(w, g0, unpacked);
      first = w->amx_rows;
    }
    free(unpacked);
  }
  if (w->w4)
    (vnni ? bm4_groups512 : bm4_groups256)(w, first, g0, g1);
  else
    (vnni ? bm_groups512 : bm_groups256)(w, first, g0, g1);
}

/* Both ops once their weights are checked: x's rows quantized (turned by ``signs`` when given), for 4-bit weights
   each block's sum of a row's int16 values, then the column groups over the threads. */
static OrtStatus *bm_run(OrtKernelContext *ctx, const char *op, const int64_t *xd, size_t xn, const void *x,
                         int64_t groups, const float *signs, int block, BlockWork w) {
  int64_t k = xd[xn - 1], rows = 1, yd[MAX_RANK];
  for (size_t i = 0; i + 1 < xn; i++) rows *= xd[i];
  memcpy(yd, xd, sizeof(int64_t) * xn);
  yd[xn - 1] = groups * BM_GROUP;
  void *out;
  OrtStatus *st;
  if ((st = any_output(ctx, 0, yd, xn, &out))) return st;
  if (!rows || !groups) return NULL;
  const int64_t blocks = k / BM_BLOCK;
  int16_t *q = malloc(sizeof(int16_t) * (size_t)(rows * k));
  float *row_scale = malloc(sizeof(float) * (size_t)rows);
  int32_t *xsum = w.w4 ? malloc(sizeof(int32_t) * (size_t)(rows * blocks)) : NULL;
  RowWork qw = {x, q, row_scale, NULL, signs, rows, k, block, 1, 0};
  if (!q || !row_scale || (w.w4 && !xsum) || (st = over_rows(ctx, bm_quantize_block, &qw, op))) {
    free(q); free(row_scale); free(xsum);
    return st ? st : error(w.w4 ? "BlockMatMul16Q4: out of memory" : "BlockMatMul16: out of memory");
  }
  for (int64_t i = 0; xsum && i < rows * blocks; i++) {
    int32_t t = 0;
    for (int j = 0; j < BM_BLOCK; j++) t += q[i * BM_BLOCK + j];
    xsum[i] = t;
  }
  w.q = q; w.row_scale = row_scale; w.xsum = xsum; w.y = (float *)out; w.rows = rows; w.k = k; w.n = groups * BM_GROUP;
  uint8_t *a_tiles = NULL;
  float *a_xsum = NULL;
  w.amx_rows = rows >= AMX_ROWS && __atomic_load_n(&bm_amx, __ATOMIC_RELAXED) ? rows / AMX_ROWS * AMX_ROWS : 0;
  if (w.amx_rows && (a_tiles = aligned_alloc(64, (size_t)(w.amx_rows * 2 * k))) &&
      (!xsum || (a_xsum = malloc(sizeof(float) * (size_t)(w.amx_rows * blocks)))))
    amx_split_rows(q, xsum, w.amx_rows / AMX_ROWS, k, a_tiles, a_xsum);
  else
    w.amx_rows = 0;  /* no scratch: the VNNI tiles take every row, with the same bits */
  w.a_tiles = a_tiles; w.a_xsum = a_xsum;
  if (groups > 1)
    st = parallel_for(ctx, bm_item, (size_t)groups, &w);
  else
    bm_item(&w, 0);
  free(q); free(row_scale); free(xsum); free(a_tiles); free(a_xsum);
  return st;
}

static OrtStatus *block_matmul_compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t xd[MAX_RANK], wd[MAX_RANK], sd[MAX_RANK];
  size_t xn = 0, wn = 0, sn = 0;
  void *x, *wt, *sc;
  OrtStatus *st;
  if ((st = any_input(ctx, 0, ELEM_FLOAT, xd, &xn, &x, "BlockMatMul16: x")) ||
      (st = any_input(ctx, 1, ELEM_INT8, wd, &wn, &wt, "BlockMatMul16: w")) ||
      (st = any_input(ctx, 2, ELEM_FLOAT, sd, &sn, &sc, "BlockMatMul16: scale")))
    return st;
  int64_t k = xd[xn - 1], groups = wd[0];
  if (k < BM_BLOCK || k % BM_BLOCK || wn != 3 || wd[1] != k / 2 || wd[2] != 32 || sn != 3 || sd[0] != groups ||
      sd[1] != k / BM_BLOCK || sd[2] != BM_GROUP)
    return error("BlockMatMul16: x's last size K must be a positive multiple of 32, w [N/16, K/2, 32] and scale "
                 "[N/16, K/32, 16]");
  const float *signs = NULL;
  int block = 1;
  if ((st = quantize_signs(ctx, 3, k, &signs, &block, "BlockMatMul16"))) return st;
  BlockWork w = {.w = (const int8_t *)wt, .scale = (const float *)sc};
  return bm_run(ctx, "BlockMatMul16", xd, xn, x, groups, signs, block, w);
}

static OrtStatus *block_matmul4_compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t xd[MAX_RANK], wd[MAX_RANK], sd[MAX_RANK], od[MAX_RANK];
  size_t xn = 0, wn = 0, sn = 0, on = 0;
  void *x, *wt, *sc, *of;
  OrtStatus *st;
  if ((st = any_input(ctx, 0, ELEM_FLOAT, xd, &xn, &x, "BlockMatMul16Q4: x")) ||
      (st = any_input(ctx, 1, ELEM_UINT8, wd, &wn, &wt, "BlockMatMul16Q4: w")) ||
      (st = any_input(ctx, 2, ELEM_FLOAT, sd, &sn, &sc, "BlockMatMul16Q4: scale")) ||
      (st = any_input(ctx, 3, ELEM_FLOAT, od, &on, &of, "BlockMatMul16Q4: offset")))
    return st;
  int64_t k = xd[xn - 1], groups = wd[0];
  if (k < BM_BLOCK || k % BM_BLOCK || wn != 3 || wd[1] != k / 4 || wd[2] != 32 || sn != 3 || sd[0] != groups ||
      sd[1] != k / BM_BLOCK || sd[2] != BM_GROUP || on != 3 || memcmp(od, sd, sizeof(int64_t) * 3))
    return error("BlockMatMul16Q4: x's last size K must be a positive multiple of 32, w [N/16, K/4, 32], scale and "
                 "offset [N/16, K/32, 16]");
  BlockWork w = {.w4 = (const uint8_t *)wt, .scale = (const float *)sc, .offset = (const float *)of};
  return bm_run(ctx, "BlockMatMul16Q4", xd, xn, x, groups, NULL, 1, w);
}
