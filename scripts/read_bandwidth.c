/* Memory read bandwidth by the length of contiguous runs: threads read fp16 blocks of BLOCK_KB from a 1.6 GB buffer
   (beyond the L3) in a scattered order, widening them as the attention kernel does, and report GB/s. Shows why the
   kernel reads a decoding row's keys in long runs (docs/results.md, "Keys in chunks").

       gcc -O3 -mavx2 -mf16c -pthread -o /tmp/read_bandwidth scripts/read_bandwidth.c
       /tmp/read_bandwidth BLOCK_KB THREADS        # e.g. 32 2, then 1024 2
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char *buffer;
static size_t total = (size_t)1600 << 20, block;
static int threads;

typedef struct { int id; float sum; } Reader;

static void *read_blocks(void *arg) {
  Reader *r = (Reader *)arg;
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  size_t blocks = total / block;
  for (size_t i = (size_t)r->id; i < blocks; i += (size_t)threads) {
    const uint16_t *p = (const uint16_t *)(buffer + (i * 7919 % blocks) * block);  /* scattered, each block once */
    for (size_t j = 0; j < block / 2; j += 16) {
      a = _mm256_add_ps(a, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + j))));
      b = _mm256_add_ps(b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + j + 8))));
    }
  }
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(a, b));
  r->sum = out[0];  /* kept, so the loads are not optimized away */
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3 || atol(argv[1]) < 1 || atoi(argv[2]) < 1 || atoi(argv[2]) > 64) {
    fprintf(stderr, "usage: read_bandwidth BLOCK_KB THREADS (1 .. 64)\n");
    return 2;
  }
  block = (size_t)atol(argv[1]) << 10;
  threads = atoi(argv[2]);
  buffer = aligned_alloc(4096, total);
  if (!buffer) return 1;
  memset(buffer, 1, total);
  pthread_t ids[64];
  Reader readers[64];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int k = 0; k < threads; k++) {
    readers[k].id = k;
    pthread_create(&ids[k], NULL, read_blocks, &readers[k]);
  }
  for (int k = 0; k < threads; k++) pthread_join(ids[k], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("blocks of %zu KB, %d threads: %.1f GB/s\n", block >> 10, threads, (double)(total / block * block) / seconds / 1e9);
  free(buffer);
  return 0;
}
