/* BlockMatMulF32Q4: fp32 rows times 4-bit weight blocks, in fp32 arithmetic (included by row_attention.c).

     y [..., N] = BlockMatMulF32Q4(x [..., K] float, w [N/16, K/2, 16] uint8, step [N/16, K/32, 16] float16,
                                   low [N/16, K/32, 16] float16)

   W[k, n] = fma(step, q, low) in fp32 with the step and low of the block of 32 along K and column that k, n lie in
   (fp16 values, as GGUF stores a block's d and m: exact in fp32), q in 0..15; byte c of line j of group g holds
   q[2 j, 16 g + c] in its low nibble and q[2 j + 1, 16 g + c] in its high one. The exporter writes the op only
   where that fma gives the model's fp32 weights' values (a Q4_0 / Q4_1 GGUF's blocks, dequantized), so a step
   reads 5 bits of a weight instead of 32 and computes fp32's product:

     y[r, n] = even + odd,  even = fma chain over the even k ascending of x[r, k] W[k, n] (from 0), odd the same over
     the odd k

   Two chains, so that a one-row step does not wait on each multiply-add's latency. A row's result depends on that
   row alone, and the AVX-512 path (16 columns a vector) and the AVX2 path (8) give the same bits: each column's
   lane does the same operations in the same order. */

/* AVX-512 tiles: up to 4 rows by 2 column groups (a one-row step: 4 chains in flight), or from 5 rows on up to 8 rows
   by one group (each line of weights rebuilt once for 8 rows); 16 accumulators either way. */
enum { BF_GROUP = 16, BF_BLOCK = 32, BF_ROWS512 = 8, BF_ROWS_PAIR = 4, BF_ROWS256 = 4, BF_GROUPS_PER_ITEM = 2 };

typedef struct {
  const float *x;  /* [rows, k] */
  const uint8_t *w;  /* [N/16, K/2, 16] */
  const uint16_t *step, *low;  /* [N/16, K/32, 16] fp16 */
  float *y;  /* [rows, n] */
  int64_t rows, k, n;  /* n: 16 columns a group */
} F32BlockWork;

/* Rows [m0, m0 + mr) times the column groups [g0, g0 + ng) with AVX-512. */
__attribute__((target("avx512f"))) static inline void bf_tile512(int mr, int ng, const F32BlockWork *w, int64_t m0,
                                                                  int64_t g0) {
  const int64_t k = w->k, blocks = k / BF_BLOCK;
  const float *x = w->x + m0 * k;
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  __m512 even[BF_ROWS512][BF_GROUPS_PER_ITEM], odd[BF_ROWS512][BF_GROUPS_PER_ITEM];
  for (int m = 0; m < mr; m++)
    for (int g = 0; g < ng; g++) even[m][g] = odd[m][g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m512 step[BF_GROUPS_PER_ITEM], low[BF_GROUPS_PER_ITEM];
    for (int g = 0; g < ng; g++) {
      step[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->step + ((g0 + g) * blocks + b) * BF_GROUP)));
      low[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->low + ((g0 + g) * blocks + b) * BF_GROUP)));
    }
    for (int64_t j = b * BF_BLOCK / 2; j < (b + 1) * BF_BLOCK / 2; j++) {
      __m512 w_even[BF_GROUPS_PER_ITEM], w_odd[BF_GROUPS_PER_ITEM];
      for (int g = 0; g < ng; g++) {
        const uint8_t *line = w->w + (((g0 + g) * k / 2) + j) * BF_GROUP;
        __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)line));
        w_even[g] = _mm512_fmadd_ps(step[g], _mm512_cvtepi32_ps(_mm512_and_si512(raw, nibble)), low[g]);
        w_odd[g] = _mm512_fmadd_ps(step[g], _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4)), low[g]);
      }
      for (int m = 0; m < mr; m++) {
        __m512 xe = _mm512_set1_ps(x[m * k + 2 * j]), xo = _mm512_set1_ps(x[m * k + 2 * j + 1]);
        for (int g = 0; g < ng; g++) {
          even[m][g] = _mm512_fmadd_ps(xe, w_even[g], even[m][g]);
          odd[m][g] = _mm512_fmadd_ps(xo, w_odd[g], odd[m][g]);
        }
      }
    }
  }
  for (int m = 0; m < mr; m++)
    for (int g = 0; g < ng; g++)
      _mm512_storeu_ps(w->y + (m0 + m) * w->n + (g0 + g) * BF_GROUP, _mm512_add_ps(even[m][g], odd[m][g]));
}

/* The same with AVX2, half a group (8 columns) at a time. */
static inline void bf_tile256(int mr, const F32BlockWork *w, int64_t m0, int64_t g, int half) {
  const int64_t k = w->k, blocks = k / BF_BLOCK;
  const float *x = w->x + m0 * k;
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  __m256 even[BF_ROWS256], odd[BF_ROWS256];
  for (int m = 0; m < mr; m++) even[m] = odd[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m256 step = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->step + (g * blocks + b) * BF_GROUP + 8 * half)));
    __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->low + (g * blocks + b) * BF_GROUP + 8 * half)));
    for (int64_t j = b * BF_BLOCK / 2; j < (b + 1) * BF_BLOCK / 2; j++) {
      const uint8_t *line = w->w + (g * k / 2 + j) * BF_GROUP + 8 * half;
      __m256i raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)line));
      __m256 w_even = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(_mm256_and_si256(raw, nibble)), low);
      __m256 w_odd = _mm256_fmadd_ps(step, _mm256_cvtepi32_ps(_mm256_srli_epi32(raw, 4)), low);
      for (int m = 0; m < mr; m++) {
        even[m] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * k + 2 * j]), w_even, even[m]);
        odd[m] = _mm256_fmadd_ps(_mm256_set1_ps(x[m * k + 2 * j + 1]), w_odd, odd[m]);
      }
    }
  }
  for (int m = 0; m < mr; m++)
    _mm256_storeu_ps(w->y + (m0 + m) * w->n + g * BF_GROUP + 8 * half, _mm256_add_ps(even[m], odd[m]));
}

/* Constant row and group counts, so that the accumulators stay in registers. */
__attribute__((target("avx512f"))) static void bf_groups512(const F32BlockWork *w, int64_t g0, int ng) {
  for (int64_t m0 = 0; m0 < w->rows;) {
    int64_t left = w->rows - m0;
    int mr = (int)(left < BF_ROWS512 ? left : BF_ROWS512);
    if (mr <= BF_ROWS_PAIR && ng == 2) {
      switch (mr) {
        case 1: bf_tile512(1, 2, w, m0, g0); break;
        case 2: bf_tile512(2, 2, w, m0, g0); break;
        case 3: bf_tile512(3, 2, w, m0, g0); break;
        default: bf_tile512(4, 2, w, m0, g0);
      }
    } else {
      for (int g = 0; g < ng; g++) switch (mr) {
          case 1: bf_tile512(1, 1, w, m0, g0 + g); break;
          case 2: bf_tile512(2, 1, w, m0, g0 + g); break;
          case 3: bf_tile512(3, 1, w, m0, g0 + g); break;
          case 4: bf_tile512(4, 1, w, m0, g0 + g); break;
          case 5: bf_tile512(5, 1, w, m0, g0 + g); break;
          case 6: bf_tile512(6, 1, w, m0, g0 + g); break;
          case 7: bf_tile512(7, 1, w, m0, g0 + g); break;
          default: bf_tile512(8, 1, w, m0, g0 + g);
        }
    }
    m0 += mr;
  }
}

static void bf_groups256(const F32BlockWork *w, int64_t g0, int ng) {
  for (int64_t g = g0; g < g0 + ng; g++)
    for (int half = 0; half < 2; half++)
      for (int64_t m0 = 0; m0 < w->rows; m0 += BF_ROWS256) {
        int mr = (int)(w->rows - m0 < BF_ROWS256 ? w->rows - m0 : BF_ROWS256);
        switch (mr) {
          case 1: bf_tile256(1, w, m0, g, half); break;
          case 2: bf_tile256(2, w, m0, g, half); break;
          case 3: bf_tile256(3, w, m0, g, half); break;
          default: bf_tile256(4, w, m0, g, half);
        }
      }
}

static int bf_avx512;  /* the AVX-512 path: the CPU has AVX-512F and MEDUSA_EXPORT_KERNEL_AVX2 is off (tests) */

static void bf_detect(void) {
  __builtin_cpu_init();
  __atomic_store_n(&bf_avx512, __builtin_cpu_supports("avx512f") && !env_on("MEDUSA_EXPORT_KERNEL_AVX2"),
                   __ATOMIC_RELAXED);
}

/* Work item ``index``: a pair of column groups (the last one alone when the count is odd), every row. */
static void bf_item(void *data, size_t index) {
  const F32BlockWork *w = (const F32BlockWork *)data;
  int64_t g0 = (int64_t)index * BF_GROUPS_PER_ITEM;
  int64_t groups = w->n / BF_GROUP;
  int ng = (int)(groups - g0 < BF_GROUPS_PER_ITEM ? groups - g0 : BF_GROUPS_PER_ITEM);
  (__atomic_load_n(&bf_avx512, __ATOMIC_RELAXED) ? bf_groups512 : bf_groups256)(w, g0, ng);
}

static OrtStatus *block_f32_compute(void *kernel, OrtKernelContext *ctx) {
  (void)kernel;
  int64_t xd[MAX_RANK], wd[MAX_RANK], sd[MAX_RANK], ld[MAX_RANK], yd[MAX_RANK];
  size_t xn = 0, wn = 0, sn = 0, ln = 0;
  void *x, *wt, *sc, *lo, *out;
  OrtStatus *st;
  if ((st = any_input(ctx, 0, ELEM_FLOAT, xd, &xn, &x, "BlockMatMulF32Q4: x")) ||
      (st = any_input(ctx, 1, ELEM_UINT8, wd, &wn, &wt, "BlockMatMulF32Q4: w")) ||
      (st = any_input(ctx, 2, ELEM_FLOAT16, sd, &sn, &sc, "BlockMatMulF32Q4: step")) ||
      (st = any_input(ctx, 3, ELEM_FLOAT16, ld, &ln, &lo, "BlockMatMulF32Q4: low")))
    return st;
  int64_t k = xd[xn - 1], groups = wd[0], rows = 1;
  if (k < BF_BLOCK || k % BF_BLOCK || wn != 3 || wd[1] != k / 2 || wd[2] != BF_GROUP || sn != 3 || sd[0] != groups ||
      sd[1] != k / BF_BLOCK || sd[2] != BF_GROUP || ln != 3 || memcmp(ld, sd, sizeof(int64_t) * 3))
    return error("BlockMatMulF32Q4: x's last size K must be a positive multiple of 32, w [N/16, K/2, 16], step and "
                 "low [N/16, K/32, 16]");
  for (size_t i = 0; i + 1 < xn; i++) rows *= xd[i];
  memcpy(yd, xd, sizeof(int64_t) * xn);
  yd[xn - 1] = groups * BF_GROUP;
  if ((st = any_output(ctx, 0, yd, xn, &out))) return st;
  if (!rows || !groups) return NULL;
  F32BlockWork w = {(const float *)x, (const uint8_t *)wt, (const uint16_t *)sc, (const uint16_t *)lo, (float *)out,
                    rows, k, groups * BF_GROUP};
  size_t items = (size_t)((groups + BF_GROUPS_PER_ITEM - 1) / BF_GROUPS_PER_ITEM);
  if (items > 1) return parallel_for(ctx, bf_item, items, &w);
  bf_item(&w, 0);
  return NULL;
}

/* The path this process takes: 1 AVX-512, 0 AVX2 (for tests and reports: `kernels.block_f32_path`). */
__attribute__((visibility("default"))) int medusa_export_block_f32_path(void) {
  bf_detect();
  return __atomic_load_n(&bf_avx512, __ATOMIC_RELAXED);
}
