/* What int8 weights in blocks of 32 times int16 activations per row cost on this CPU, over the default model's
 * decoder shapes (30 layers of q|k|v, o, gate|up, down: 106 M weights), M rows, on a persistent pool of threads.
 *
 * The product measured: W [K, N] as int8 in blocks of 32 along K (one fp32 scale per block and column), each row x of
 * the input as int16 under one scale (max|x| / 32767); per block an exact int32 sum (AVX-512 VNNI VPDPWSSD, 32 int16
 * products an instruction), turned to fp32 and multiplied by the block's scale. Each row's arithmetic is the same
 * whatever the other rows are, so a result depends on its row alone. Weights are stored 16 columns by 2 inputs per
 * 32 bytes, so one widened load feeds 16 columns (docs/quantization.md, "Where int8 rows loses agreement").
 *
 *   gcc -O3 -march=native -pthread -o /tmp/int16_rows_micro scripts/int16_rows_micro.c
 *   /tmp/int16_rows_micro THREADS ROWS...        # e.g. 2 1 2 4 8 16
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { BLOCK = 32, GROUP = 16, MAX_ROWS = 8, LAYERS = 30, MATS = 4 };
static const int64_t SHAPES[MATS][2] = {{576, 960}, {576, 576}, {576, 3072}, {1536, 576}};

typedef struct { int64_t k, n; const int8_t *w; const float *scale; } Weight;  /* w: [n/16][k/2][16][2] */

/* rows [m0, m0 + mr) of y = x W for the column groups [g0, g1); x int16 [rows, k], xs its row scales */
static inline __attribute__((always_inline)) void tile(int mr, const Weight *W, const int16_t *x, const float *xs,
                                                      float *y, int64_t g0, int64_t g1) {
  const int64_t k = W->k, blocks = k / BLOCK;
  for (int64_t g = g0; g < g1; g++) {
    __m512 acc[MAX_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const int8_t *wg = W->w + g * GROUP * k;
    const float *sg = W->scale + g * GROUP * blocks;
    for (int64_t b = 0; b < blocks; b++) {
#ifndef CHAINS  /* independent sums per row below this many rows: -DCHAINS=1 for one */
#define CHAINS 4
#endif
      const int chains = mr >= CHAINS ? 1 : CHAINS / mr;  /* independent sums: one chain per row waits on the latency */
      __m512i sum[MAX_ROWS][4];
      for (int m = 0; m < mr; m++)
        for (int c = 0; c < chains; c++) sum[m][c] = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int j = 0; j < BLOCK / 2; j++) {
        __m512i w = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *)(wg + (b * BLOCK / 2 + j) * 2 * GROUP)));
#pragma GCC unroll 8
        for (int m = 0; m < mr; m++) {
          int32_t pair = *(const int32_t *)(x + m * k + b * BLOCK + 2 * j);
          sum[m][j % chains] = _mm512_dpwssd_epi32(sum[m][j % chains], w, _mm512_set1_epi32(pair));
        }
      }
      __m512 s = _mm512_loadu_ps(sg + b * GROUP);
      for (int m = 0; m < mr; m++) {
        for (int c = 1; c < chains; c++) sum[m][0] = _mm512_add_epi32(sum[m][0], sum[m][c]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][0]), s, acc[m]);
      }
    }
    for (int m = 0; m < mr; m++)
      _mm512_storeu_ps(y + m * W->n + g * GROUP, _mm512_mul_ps(acc[m], _mm512_set1_ps(xs[m])));
  }
}

static void matmul(int rows, const Weight *W, const int16_t *x, const float *xs, float *y, int64_t g0, int64_t g1) {
  for (int m0 = 0; m0 < rows; m0 += MAX_ROWS) {
    int mr = rows - m0 < MAX_ROWS ? rows - m0 : MAX_ROWS;
    const int16_t *xr = x + m0 * W->k;
    float *yr = y + m0 * W->n;
    switch (mr) {  /* constant row counts: the accumulators stay in registers */
      case 1: tile(1, W, xr, xs + m0, yr, g0, g1); break;
      case 2: tile(2, W, xr, xs + m0, yr, g0, g1); break;
      case 4: tile(4, W, xr, xs + m0, yr, g0, g1); break;
      case 8: tile(8, W, xr, xs + m0, yr, g0, g1); break;
      default: for (int m = 0; m < mr; m++) tile(1, W, xr + m * W->k, xs + m0 + m, yr + m * W->n, g0, g1);
    }
  }
}

/* ---- a pool of threads that run one matmul's column groups together ---- */
typedef struct { Weight *W; int rows, threads; const int16_t *x; const float *xs; float *y; } Job;
static Job job;
static volatile int generation, done_count, stop;

static void part(int t) {
  int64_t groups = job.W->n / GROUP, per = (groups + job.threads - 1) / job.threads;
  int64_t g0 = t * per, g1 = g0 + per < groups ? g0 + per : groups;
  if (g0 < g1) matmul(job.rows, job.W, job.x, job.xs, job.y, g0, g1);
}

static void *worker(void *arg) {
  int t = (int)(intptr_t)arg, seen = 0;
  for (;;) {
    while (__atomic_load_n(&generation, __ATOMIC_ACQUIRE) == seen) _mm_pause();
    if (stop) return 0;
    seen = generation;
    part(t);
    __atomic_add_fetch(&done_count, 1, __ATOMIC_ACQ_REL);
  }
}

static void run(int threads) {
  __atomic_store_n(&done_count, 0, __ATOMIC_RELEASE);
  __atomic_add_fetch(&generation, 1, __ATOMIC_ACQ_REL);
  part(0);
  while (__atomic_load_n(&done_count, __ATOMIC_ACQUIRE) < threads - 1) _mm_pause();
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  Weight W[LAYERS * MATS];
  for (int i = 0; i < LAYERS * MATS; i++) {
    int64_t k = SHAPES[i % MATS][0], n = SHAPES[i % MATS][1];
    int8_t *w = aligned_alloc(64, k * n);
    float *s = aligned_alloc(64, k / BLOCK * n * sizeof(float));
    for (int64_t j = 0; j < k * n; j++) w[j] = (int8_t)(rand() % 255 - 127);
    for (int64_t j = 0; j < k / BLOCK * n; j++) s[j] = 1e-4f * (1 + rand() % 5);
    W[i] = (Weight){k, n, w, s};
  }
  int16_t *x = aligned_alloc(64, 64 * 1536 * sizeof(int16_t));
  float *xs = aligned_alloc(64, 64 * sizeof(float)), *y = aligned_alloc(64, 64 * 3072 * sizeof(float));
  for (int i = 0; i < 64 * 1536; i++) x[i] = (int16_t)(rand() % 65535 - 32767);
  for (int i = 0; i < 64; i++) xs[i] = 1e-5f;
  pthread_t th[64];
  for (int t = 1; t < threads; t++) pthread_create(&th[t], 0, worker, (void *)(intptr_t)t);
  for (int a = 2; a < argc; a++) {
    int rows = atoi(argv[a]);
    double best = 1e9, total = 0;
    int reps = 40;
    for (int r = 0; r < reps; r++) {
      double t0 = now();
      for (int i = 0; i < LAYERS * MATS; i++) {
        job = (Job){&W[i], rows, threads, x, xs, y};
        run(threads);
      }
      double dt = now() - t0;
      if (r >= 5) { total += dt; best = dt < best ? dt : best; }
    }
    printf("{\"rows\": %d, \"threads\": %d, \"best_ms\": %.2f, \"mean_ms\": %.2f}\n", rows, threads, best * 1e3,
           total / (reps - 5) * 1e3);
  }
  stop = 1;
  __atomic_add_fetch(&generation, 1, __ATOMIC_ACQ_REL);
  for (int t = 1; t < threads; t++) pthread_join(th[t], 0);
  return 0;
}
