/* RowAttention: GroupQueryAttention's job (rotary embedding at explicit positions, new K/V rows written into the
   cache in place, causal attention with an additive bias over the cache) computed so that each query row's numbers
   depend only on its own query, the keys and values it sees and its bias row: never on how many rows the step has,
   on the other rows, or on the threads. A one-token step, a tree node and a lane of a batched step therefore agree
   to the last bit, with no extra query row (docs/graphs.md, "The attention kernel").

   An ONNX Runtime custom-op library: `RegisterCustomOps` adds the domain "medusa_export" with RowAttention (one
   sequence) and LanesAttention (the sequences of a batched step in one call, below), each also over fp16 K/V caches
   (RowAttention16, LanesAttention16: half the bytes a step reads; new rows rounded to the nearest fp16 as they are
   written, every key and value widened exactly by F16C as it is read, the rest in fp32), the int8 row ops and
   ScreenedVocab (`screened_vocab.c`, included below).
   RowAttention inputs: qkv [1, S, (nh + 2 kvh) hd] packed q | k | v; past_key, past_value [1, kvh, cap, hd]; seqlens_k int32 [1]
   (total - 1); total_sequence_length int32 (past + S); cos_cache, sin_cache [positions, hd / 2]; position_ids int64
   [1, S]; attention_bias [1, 1, S, total] (0 or -inf). Outputs: [1, S, nh hd]; present_key, present_value (the past
   buffers, the S new rows written at past .. total - 1: bind them to the same memory to skip a copy).
   Attributes: num_heads, kv_num_heads; skip_last_row = 1: the last row is not computed (its output is zeros, its K/V
   row not written), for graphs that carry an extra row for another operator's sake.

   The C API is used through its function table by index (ONNX Runtime's C API is append-only, so indices are
   stable across versions); the few declarations needed are written out below. AVX2 + FMA + F16C. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the ONNX Runtime C API, the part used ------------------------------------------------------------------- */
typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTypeShape;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef void *const *OrtApiTable;
typedef struct {
  OrtApiTable (*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ELEM_FLOAT = 1, ELEM_UINT8 = 2, ELEM_INT8 = 3, ELEM_INT32 = 6, ELEM_INT64 = 7, ELEM_FLOAT16 = 10 };
enum { ORT_INVALID_ARGUMENT = 2, ORT_FAIL = 1 };
enum { API_VERSION = 16 };  /* CreateKernelV2 / KernelComputeV2 and KernelContext_ParallelFor (ONNX Runtime >= 1.16) */

enum {  /* indices into OrtApi */
  API_CreateStatus = 0, API_CreateCustomOpDomain = 26, API_CustomOpDomain_Add = 27, API_AddCustomOpDomain = 28,
  API_GetTensorMutableData = 51, API_GetTensorElementType = 60, API_GetDimensionsCount = 61, API_GetDimensions = 62,
  API_GetTensorTypeAndShape = 65, API_KernelInfoGetAttribute_int64 = 86, API_KernelContext_GetInputCount = 88,
  API_KernelContext_GetOutputCount = 89, API_KernelContext_GetInput = 90, API_KernelContext_GetOutput = 91, API_ReleaseStatus = 93,
  API_ReleaseTensorTypeAndShapeInfo = 99, API_KernelContext_ParallelFor = 274,
};

static OrtApiTable api;
#define CALL(name, type) ((type)api[API_##name])

typedef struct OrtCustomOp OrtCustomOp;
struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const OrtCustomOp *, OrtApiTable, const OrtKernelInfo *);
  const char *(*GetName)(const OrtCustomOp *);
  const char *(*GetExecutionProviderType)(const OrtCustomOp *);
  int (*GetInputType)(const OrtCustomOp *, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOp *);
  int (*GetOutputType)(const OrtCustomOp *, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOp *);
  void (*KernelCompute)(void *, OrtKernelContext *);
  void (*KernelDestroy)(void *);
  int (*GetInputCharacteristic)(const OrtCustomOp *, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOp *, size_t);
  int (*GetInputMemoryType)(const OrtCustomOp *, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOp *);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp *);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp *);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp *);
  OrtStatus *(*CreateKernelV2)(const OrtCustomOp *, OrtApiTable, const OrtKernelInfo *, void **);
  OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
};

static OrtStatus *error(const char *message) {
  return CALL(CreateStatus, OrtStatus *(*)(int, const char *))(ORT_INVALID_ARGUMENT, message);
}

/* ---- arithmetic ------------------------------------------------------------------------------------------------ */
/* The one order every 8-lane sum uses: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)). */
static inline float hsum8(__m256 v) {
  __m128 a = _mm_hadd_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  /* x0+x1, x2+x3, x4+x5, x6+x7 */
  __m128 b = _mm_hadd_ps(a, a);
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* The sums of eight vectors at once, lane k = hsum8(a[k]) exactly (the same pairs in the same order). */
static inline __m256 hsum8x8(const __m256 *a) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The sums of four vectors at once, lane k = hsum8(a[k]) exactly (the same pairs in the same order). */
static inline __m128 hsum8x4(const __m256 *a) {
  __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

/* exp(x) for x <= 0 (a score minus the row's maximum); exactly 0 below -87 (a masked key's -inf, or a weight
   under 1.6e-38), so such keys add nothing. Cephes' expf polynomial after the usual range reduction. */
static inline __m256 exp8(__m256 x) {
  __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

/* Rotary embedding, rotate-half form (Llama): the halves of x turned by the position's angles. */
static void rotate(const float *x, float *out, const float *cos, const float *sin, int hd) {
  int h = hd / 2;
  for (int d = 0; d < h; d++) {
    out[d] = x[d] * cos[d] - x[d + h] * sin[d];
    out[d + h] = x[d + h] * cos[d] + x[d] * sin[d];
  }
}

enum { TILE = 4 };  /* query rows of one head that share each key's load */

/* Eight floats of a K or V cache at element ``at``: fp32, or fp16 widened (exactly) by F16C. ``half`` is a constant
   in every inlined copy, so each copy has one kind of load. */
static inline __attribute__((always_inline)) __m256 load_kv(const void *cache, size_t at, int half) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + at)))
              : _mm256_loadu_ps((const float *)cache + at);
}

enum { PREFETCH_KEYS = 32 };  /* how far ahead of the keys and values being read their cache lines are asked for */

/* ``count`` elements of a cache from element ``at`` on, asked into the L1 cache (callers ask only for rows they will
   read). */
static inline __attribute__((always_inline)) void prefetch_rows(const void *cache, size_t at, int count, int half) {
  const char *p = (const char *)cache + at * (half ? 2 : 4);
  for (int b = 0; b < count * (half ? 2 : 4); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

/* ``hd`` floats into a cache at element ``at``: copied (fp32), or rounded to the nearest fp16 (ties to even; from
   65520 on an infinity, whose attention then comes out NaN, as the math would). */
static void store_kv(void *cache, size_t at, const float *x, int hd, int half) {
  if (!half) {
    memcpy((float *)cache + at, x, sizeof(float) * hd);
    return;
  }
  uint16_t *dst = (uint16_t *)cache + at;
  for (int d = 0; d < hd; d += 8)
    _mm_storeu_si128((__m128i *)(dst + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* A row's keys go in chunks of CHUNK at fixed offsets (0, CHUNK, 2 CHUNK, ...). Each chunk gives a partial: its
   maximum score, the sum of its exponentials and their weighted sum of values, all against its own maximum; the
   partials are then merged in chunk order (`merge_parts`). The numbers depend on the keys' offsets only, never on
   who computes a chunk, so the chunks of one decoding row can go to different threads; a row of up to CHUNK keys is
   exactly one softmax. */
enum { CHUNK = 256 };  /* keys per chunk, a multiple of 8 */

static inline int chunks_of(int n) { return (n + CHUNK - 1) / CHUNK; }
static inline size_t part_floats(int hd) { return 2 + (size_t)hd; }  /* max, sum, hd weighted values */

/* Scores of up to TILE query rows of one head over the keys j0 .. j0 + CHUNK - 1 (j0 a multiple of CHUNK): row t
   sees keys 0 .. n[t] - 1 and gets -inf beyond (up to the last row's n); key j's score goes to scores[t][j - j0].
   A row's score of a key is one fused multiply-add chain over the head's 8-float blocks, the `hsum8` order over its
   lanes, times the scale, plus the bias: keys go four at a time for up to three rows (each key block loaded and
   widened once for all of them, `hsum8x4`), else eight at a time (`hsum8x8`, the rows reusing each block of keys
   from the L1 cache), and the last few one at a time, with the same arithmetic, so a score depends on nothing but
   its row and key. */
static inline __attribute__((always_inline)) void scores_hd(const float *const *q, int rows, const void *K, int half,
                                                            const float *const *bias, const int *n, int hd,
                                                            float scale, float *const *scores, int j0) {
  int blocks = hd / 8, last = n[rows - 1], end = last < j0 + CHUNK ? last : j0 + CHUNK, j = j0;
  const __m256 scale8 = _mm256_set1_ps(scale), lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  if (rows <= 3) /* 12 accumulators: three rows by four keys */
    for (; j + 4 <= end; j += 4) {
      size_t k = (size_t)j * hd;
      if ((j & 7) == 0 && j + PREFETCH_KEYS + 8 <= last) prefetch_rows(K, k + PREFETCH_KEYS * (size_t)hd, 8 * hd, half);
      __m256 acc[3][4];
      for (int t = 0; t < rows; t++)
        for (int key = 0; key < 4; key++) acc[t][key] = _mm256_setzero_ps();
      for (int b = 0; b < blocks; b++)
        for (int key = 0; key < 4; key++) {
          __m256 kb = load_kv(K, k + key * hd + 8 * b, half);
          for (int t = 0; t < rows; t++) acc[t][key] = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + 8 * b), kb, acc[t][key]);
        }
      for (int t = 0; t < rows; t++) {
        __m128 sc = _mm_add_ps(_mm_mul_ps(hsum8x4(acc[t]), _mm256_castps256_ps128(scale8)), _mm_loadu_ps(bias[t] + j));
        __m128 seen = _mm_cmp_ps(_mm256_castps256_ps128(lane), _mm_set1_ps((float)(n[t] - j)), _CMP_LT_OQ);
        _mm_storeu_ps(scores[t] + (j - j0), _mm_blendv_ps(_mm_set1_ps(-INFINITY), sc, seen));
      }
    }
  for (; j + 8 <= end; j += 8) {
    size_t k = (size_t)j * hd;
    if (j + PREFETCH_KEYS + 8 <= last) prefetch_rows(K, k + PREFETCH_KEYS * (size_t)hd, 8 * hd, half);
    for (int t = 0; t < rows; t++) {
      __m256 acc[8];
      for (int key = 0; key < 8; key++) acc[key] = _mm256_setzero_ps();
      for (int b = 0; b < blocks; b++) {
        __m256 qb = _mm256_loadu_ps(q[t] + 8 * b);
        for (int key = 0; key < 8; key++) acc[key] = _mm256_fmadd_ps(qb, load_kv(K, k + key * hd + 8 * b, half), acc[key]);
      }
      __m256 sc = _mm256_add_ps(_mm256_mul_ps(hsum8x8(acc), scale8), _mm256_loadu_ps(bias[t] + j));
      __m256 seen = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n[t] - j)), _CMP_LT_OQ);
      _mm256_storeu_ps(scores[t] + (j - j0), _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc, seen));
    }
  }
  for (; j < end; j++) {
    size_t k = (size_t)j * hd;
    for (int t = 0; t < rows; t++) {
      __m256 acc = _mm256_setzero_ps();
      for (int b = 0; b < blocks; b++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q[t] + 8 * b), load_kv(K, k + 8 * b, half), acc);
      __m128 sc = _mm_add_ss(_mm_mul_ss(_mm_set_ss(hsum8(acc)), _mm_set_ss(scale)), _mm_set_ss(bias[t][j]));
      scores[t][j - j0] = j < n[t] ? _mm_cvtss_f32(sc) : -INFINITY;
    }
  }
}

/* One row's softmax numerators over the chunk at key j0, of which it sees ``count`` keys: its scores (rounded up to 8
   with -inf) turned in place into exp(score - the chunk's maximum) (masked keys exactly 0). part: max (NaN when a
   score is NaN: a NaN in the query, a key or the bias, passed on as the math would), then sum. The sum goes in 8
   lanes by each key's rank among the keys the row sees (its index when none is masked): a tree node, whose
   ancestors' keys sit between masked siblings', sums exactly as a one-token step over the same keys side by side
   does. Whether the row has values to weigh: its maximum is finite. */
static inline __attribute__((always_inline)) int softmax_chunk(int count, float *scores, float *part) {
  int n8 = (count + 7) & ~7, full = count & ~7, j;
  for (j = count; j < n8; j++) scores[j] = -INFINITY;
  __m256 m8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps(), hole8 = _mm256_setzero_ps();
  for (j = 0; j < n8; j += 8) {
    __m256 x = _mm256_loadu_ps(scores + j);
    m8 = _mm256_max_ps(m8, x);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    if (j < full) hole8 = _mm256_or_ps(hole8, _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
  }
  int holes = _mm256_movemask_ps(hole8) != 0;
  for (j = full; j < count && !holes; j++) holes = scores[j] == -INFINITY;
  float m = _mm256_movemask_ps(nan8) ? NAN : hmax8(m8);
  part[0] = m;
  if (!(m > -INFINITY)) return 0;  /* NaN, or sees nothing in this chunk: the merge skips it */
  int seen[CHUNK], c = 0;  /* with holes: the seen keys, found before the exp turns masked and tiny weights alike to 0 */
  if (holes)
    for (j = 0; j < count; j++)
      if (scores[j] != -INFINITY) seen[c++] = j;
  __m256 mv = _mm256_set1_ps(m), sum8 = _mm256_setzero_ps();
  for (j = 0; j < n8; j += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mv));
    _mm256_storeu_ps(scores + j, p);
    if (!holes) sum8 = _mm256_add_ps(sum8, p);
  }
  if (holes) {  /* the seen keys' weights side by side, summed as a step without the masked keys would sum them */
    float side[CHUNK];
    for (j = 0; j < c; j++) side[j] = scores[seen[j]];
    for (j = c; j < ((c + 7) & ~7); j++) side[j] = 0.0f;  /* a padding key's weight, exp(-inf) */
    for (j = 0; j < c; j += 8) sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(side + j));
  }
  part[1] = hsum8(sum8);
  return 1;
}

/* One row's weighted sum of the chunk's values (weights p, ``count`` keys from j0; ``ahead`` keys from j0 on exist,
   for the prefetch) into part + 2, in one fixed order over the keys; a key of weight 0 adds exactly nothing. */
static inline __attribute__((always_inline)) void weigh_chunk(const void *V, int half, int j0, int count, int ahead,
                                                              int hd, const float *p, float *part) {
  __m256 acc[32];
  for (int b = 0; b < hd / 8; b++) acc[b] = _mm256_setzero_ps();
  for (int j = 0; j < count; j++) {
    size_t v = (size_t)(j0 + j) * hd;
    if ((j & 7) == 0 && j + PREFETCH_KEYS + 8 <= ahead) prefetch_rows(V, v + PREFETCH_KEYS * (size_t)hd, 8 * hd, half);
    if (p[j] == 0.0f) continue;
    __m256 w = _mm256_set1_ps(p[j]);
    for (int b = 0; b < hd / 8; b++) acc[b] = _mm256_fmadd_ps(w, load_kv(V, v + 8 * b, half), acc[b]);
  }
  for (int b = 0; b < hd / 8; b++) _mm256_storeu_ps(part + 2 + 8 * b, acc[b]);
}

/* `weigh_chunk` for ``rows`` (2 or 3) rows that see the same ``count`` keys (one row's query heads), each value
   block widened once for all of them: every row gets the same multiply-adds in the same order as alone (a key a
   row weighs 0 is skipped for that row only). hd in passes of up to 32 (12 accumulators). */
static inline __attribute__((always_inline)) void weigh_shared(const void *V, int half, int j0, int count, int ahead,
                                                               int rows, int hd, float *const *p, float *const *parts) {
  for (int b0 = 0; b0 < hd / 8; b0 += 4) {
    int nb = hd / 8 - b0 < 4 ? hd / 8 - b0 : 4;
    __m256 acc[3][4];
    for (int t = 0; t < rows; t++)
      for (int b = 0; b < nb; b++) acc[t][b] = _mm256_setzero_ps();
    for (int j = 0; j < count; j++) {
      size_t v = (size_t)(j0 + j) * hd + 8 * b0;
      if (b0 == 0 && (j & 7) == 0 && j + PREFETCH_KEYS + 8 <= ahead)
        prefetch_rows(V, v + PREFETCH_KEYS * (size_t)hd, 8 * hd, half);
      int all = 1;
      for (int t = 0; t < rows; t++) all &= p[t][j] != 0.0f;
      for (int b = 0; b < nb; b++) {
        __m256 vb = load_kv(V, v + 8 * b, half);
        for (int t = 0; t < rows; t++)
          if (all || p[t][j] != 0.0f) acc[t][b] = _mm256_fmadd_ps(_mm256_set1_ps(p[t][j]), vb, acc[t][b]);
      }
    }
    for (int t = 0; t < rows; t++)
      for (int b = 0; b < nb; b++) _mm256_storeu_ps(parts[t] + 2 + 8 * (b0 + b), acc[t][b]);
  }
}

/* A row's output from the partials of its ``chunks`` chunks (``stride`` floats apart), merged in chunk order: each
   chunk's sums times exp(its maximum - the row's), so a row of one chunk is its softmax's acc / sum. A NaN partial
   makes the row NaN; a row that sees no key is 0. */
static void merge_parts(const float *part, int chunks, size_t stride, int hd, float *out) {
  float m = -INFINITY;
  for (int c = 0; c < chunks; c++) {
    float mc = part[c * stride];
    if (mc != mc) {
      for (int d = 0; d < hd; d++) out[d] = NAN;
      return;
    }
    m = mc > m ? mc : m;
  }
  if (m == -INFINITY) {
    memset(out, 0, sizeof(float) * hd);
    return;
  }
  __m256 acc[32];
  float sum = 0.0f;
  for (int b = 0; b < hd / 8; b++) acc[b] = _mm256_setzero_ps();
  for (int c = 0; c < chunks; c++) {
    const float *p = part + c * stride;
    /* The chunk's weight by the kernel's own exp: exactly 1 for a chunk that holds the maximum (also an infinite
       one), exactly 0 from 87 below it, where the chunk's keys are as masked as a single softmax's would be: skipped,
       so an infinite value among them adds nothing. */
    float w = p[0] == m ? 1.0f : _mm256_cvtss_f32(exp8(_mm256_set1_ps(p[0] - m)));
    if (w == 0.0f) continue;
    __m256 w8 = _mm256_set1_ps(w);
    sum += p[1] * w;
    for (int b = 0; b < hd / 8; b++) acc[b] = _mm256_add_ps(acc[b], _mm256_mul_ps(_mm256_loadu_ps(p + 2 + 8 * b), w8));
  }
  __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int b = 0; b < hd / 8; b++) _mm256_storeu_ps(out + 8 * b, _mm256_mul_ps(acc[b], inv));
}

/* A tile of query rows of one head over the chunk at j0: scores together, then each row's partial (rows that see
   no key of the chunk get none). */
static inline __attribute__((always_inline)) void attend_hd(const float *const *q, int rows, const void *K,
                                                            const void *V, int half, const float *const *bias,
                                                            const int *n, int hd, float scale, float *const *scores,
                                                            float *const *parts, int j0) {
  scores_hd(q, rows, K, half, bias, n, hd, scale, scores, j0);
  int live[TILE], count[TILE], all = rows > 1 && rows <= 3 && n[0] == n[rows - 1];
  for (int t = 0; t < rows; t++) {
    count[t] = n[t] - j0 < CHUNK ? n[t] - j0 : CHUNK;  /* the chunk's keys row t sees */
    live[t] = count[t] > 0 && softmax_chunk(count[t], scores[t], parts[t]);
    all &= live[t];
  }
  if (all) {  /* one row's query heads: the value loads shared */
    weigh_shared(V, half, j0, count[0], n[0] - j0, rows, hd, scores, parts);
    return;
  }
  for (int t = 0; t < rows; t++)
    if (live[t]) weigh_chunk(V, half, j0, count[t], n[t] - j0, hd, scores[t], parts[t]);
}

/* Full tiles, tiles of 3 and single rows get their own inlined copies (row and head counts and the cache's type constant:
   accumulators in registers); all compute each row alike. */
static inline __attribute__((always_inline)) void attend_as(const float *const *q, int rows, const void *K,
                                                            const void *V, const int half, const float *const *bias,
                                                            const int *n, int hd, float scale, float *const *scores,
                                                            float *const *parts, int j0) {
#define ATTEND_TILE(R)                                                                                                \
  switch (hd) {                                                                                                      \
    case 64: attend_hd(q, R, K, V, half, bias, n, 64, scale, scores, parts, j0); return;                             \
    case 128: attend_hd(q, R, K, V, half, bias, n, 128, scale, scores, parts, j0); return;                           \
    default: attend_hd(q, R, K, V, half, bias, n, hd, scale, scores, parts, j0); return;                             \
  }
  if (rows == TILE) ATTEND_TILE(TILE)
  if (rows == 3) ATTEND_TILE(3)  /* three query heads per KV head, as the default model has (`group_chunk`) */
#undef ATTEND_TILE
  for (int t = 0; t < rows; t++) {
    switch (hd) {
      case 64: attend_hd(q + t, 1, K, V, half, bias + t, n + t, 64, scale, scores + t, parts + t, j0); break;
      case 128: attend_hd(q + t, 1, K, V, half, bias + t, n + t, 128, scale, scores + t, parts + t, j0); break;
      default: attend_hd(q + t, 1, K, V, half, bias + t, n + t, hd, scale, scores + t, parts + t, j0);
    }
  }
}

static void attend(const float *const *q, int rows, const void *K, const void *V, int half, const float *const *bias,
                   const int *n, int hd, float scale, float *const *scores, float *const *parts, int j0) {
  if (half)
    attend_as(q, rows, K, V, 1, bias, n, hd, scale, scores, parts, j0);
  else
    attend_as(q, rows, K, V, 0, bias, n, hd, scale, scores, parts, j0);
}

/* ---- the op ---------------------------------------------------------------------------------------------------- */
typedef struct {
  int64_t heads, kv_heads, skip_last_row;
  int half;  /* the caches are fp16 (RowAttention16, LanesAttention16) */
  int64_t passes;  /* RowQuantize / ScaleRows: 1, or 2 for a row and what its first quantization left */
} Kernel;

typedef struct {  /* one sequence's step: shapes and pointers, shared by the threads */
  const float *qkv, *cos, *sin, *bias;
  void *kcache, *vcache;  /* [kvh, cap, hd] each: fp32, or fp16 when ``half`` */
  const int64_t *pos;
  float *out;
  float *parts;  /* a decoding step's (one computed row): its heads' chunk partials, [heads][chunks][part_floats] */
  int rows, computed, past, heads, kv_heads, hd, cap;
  int width;  /* the bias' row length: keys up to past + rows (a lane's bias also has its extra row's key) */
  int chunks;  /* a decoding step's: chunks_of(past + 1) */
  int half;
} Step;

typedef struct {  /* up to TILE (row, query head) pairs of one KV head, attended together */
  const float *q[TILE], *bias[TILE];
  float *scores[TILE], *parts[TILE], *out[TILE];  /* parts[t]: entry t's partials, chunk after chunk */
  int n[TILE];
  float rotated[TILE][256];  /* the queries, turned at their rows' positions */
  float score_rows[TILE][CHUNK];
} Tile;

/* Entry t of a tile: row i of query head h, its chunks' partials at ``parts``. */
static void tile_entry(const Step *s, Tile *tile, int t, int i, int h, float *parts) {
  int qkv_width = (s->heads + 2 * s->kv_heads) * s->hd;
  const float *c = s->cos + s->pos[i] * (s->hd / 2), *sn = s->sin + s->pos[i] * (s->hd / 2);
  rotate(s->qkv + (size_t)i * qkv_width + h * s->hd, tile->rotated[t], c, sn, s->hd);
  tile->q[t] = tile->rotated[t];
  tile->bias[t] = s->bias + (size_t)i * s->width;
  tile->n[t] = s->past + i + 1;
  tile->scores[t] = tile->score_rows[t];
  tile->parts[t] = parts;
  tile->out[t] = s->out + ((size_t)i * s->heads + h) * s->hd;
}

/* The tile's ``count`` entries over chunk c of KV head kh's keys and values. */
static void attend_chunk(const Step *s, Tile *tile, int count, int kh, int c) {
  size_t head = (size_t)kh * s->cap * s->hd, bytes = s->half ? 2 : 4;
  float *parts[TILE];
  for (int t = 0; t < count; t++) parts[t] = tile->parts[t] + c * part_floats(s->hd);
  attend(tile->q, count, (const char *)s->kcache + head * bytes, (const char *)s->vcache + head * bytes, s->half,
         tile->bias, tile->n, s->hd, 1.0f / sqrtf((float)s->hd), tile->scores, parts, c * CHUNK);
}

/* Rows r0 .. r1 - 1 of query head h, TILE rows at a time: each tile's chunks in turn, then each row's merged.
   parts: room for TILE rows' partials of chunks_of(width) chunks. */
static void head_block(const Step *s, int h, int r0, int r1, float *parts) {
  size_t per_row = (size_t)chunks_of(s->width) * part_floats(s->hd);
  Tile tile;
  for (int i0 = r0; i0 < r1; i0 += TILE) {
    int rows = r1 - i0 < TILE ? r1 - i0 : TILE;
    for (int t = 0; t < rows; t++) tile_entry(s, &tile, t, i0 + t, h, parts + t * per_row);
    for (int c = 0; c < chunks_of(tile.n[rows - 1]); c++) attend_chunk(s, &tile, rows, h / (s->heads / s->kv_heads), c);
    for (int t = 0; t < rows; t++) merge_parts(tile.parts[t], chunks_of(tile.n[t]), part_floats(s->hd), s->hd, tile.out[t]);
  }
}

/* The floats of one query head's partials in a decoding step's ``parts``: one per chunk. */
static inline size_t head_parts(const Step *s) { return (size_t)s->chunks * part_floats(s->hd); }

/* Chunk c of a decoding step's row for query heads h0 .. h1 - 1 of KV head kh, up to TILE heads as the entries of
   one tile, so they share each key's load and fp16 widening (a score depends on nothing but its query and key, so
   each head's partial is the one `head_block` computes). The partials go to the step's ``parts``
   (`merge_heads`). */
static void group_chunk(const Step *s, int kh, int h0, int h1, int c) {
  Tile tile;
  for (int g = h0; g < h1; g += TILE) {
    int heads = h1 - g < TILE ? h1 - g : TILE;
    for (int t = 0; t < heads; t++) tile_entry(s, &tile, t, 0, g + t, s->parts + (g + t) * head_parts(s));
    attend_chunk(s, &tile, heads, kh, c);
  }
}

/* A decoding step's output for query heads h0 .. h1 - 1: each head's chunks merged. */
static void merge_heads(const Step *s, int h0, int h1) {
  for (int h = h0; h < h1; h++)
    merge_parts(s->parts + h * head_parts(s), s->chunks, part_floats(s->hd), s->hd, s->out + (size_t)h * s->hd);
}

/* The step's new K (rotated) and V rows into the cache, before any row attends: every row reads its keys from the
   cache, so an fp16 cache rounds a key alike whether it is new in this step or past. */
static void write_rows(const Step *s) {
  int width = (s->heads + 2 * s->kv_heads) * s->hd;
  float key[256];
  for (int i = 0; i < s->computed; i++) {
    const float *c = s->cos + s->pos[i] * (s->hd / 2), *sn = s->sin + s->pos[i] * (s->hd / 2);
    for (int kh = 0; kh < s->kv_heads; kh++) {
      const float *row = s->qkv + (size_t)i * width;
      size_t at = ((size_t)kh * s->cap + s->past + i) * s->hd;
      rotate(row + (s->heads + kh) * s->hd, key, c, sn, s->hd);
      store_kv(s->kcache, at, key, s->hd, s->half);
      store_kv(s->vcache, at, row + (s->heads + s->kv_heads + kh) * s->hd, s->hd, s->half);
    }
  }
}

/* ---- work items: RowAttention's step or LanesAttention's steps over the session's threads ---------------------- */
/* fn(data, 0 .. n - 1) over the session's intra-op threads (the calling thread among them); ONNX Runtime picks the
   batches. */
static OrtStatus *parallel_for(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t n, void *data) {
  return CALL(KernelContext_ParallelFor, OrtStatus *(*)(OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                                        void *))(ctx, fn, n, 0, data);
}

enum { BLOCK_ROWS = 32 };

typedef struct {
  int step, head, r0, r1;
  int c0, c1;  /* c0 -1: rows r0 .. r1 - 1 of query head `head` (`head_block`); else chunks c0 .. c1 - 1 of a
                  decoding step's row for query heads r0 .. r1 - 1, all of KV head `head` (`group_chunk`) */
} Item;

typedef struct {
  const Step *steps;
  const Item *items;
  int failed;  /* an item found no memory for its partials: the call fails */
} Work;

/* Step b's work items (of ``steps`` in the call), written to ``out`` unless it is NULL; their count. A decoding step
   (one computed row) among several is one item per KV head, its query heads together; the call's only decoding step
   is two items per KV head, each half of its chunks, so that a long context spreads over the threads in long
   contiguous reads (a thread streams a KV head's keys and values from memory faster in runs of 100 KB than of one
   chunk's 32 KB), or, when its keys are one chunk, one item per query head (nine heads rather than three KV heads).
   Other steps are items per query head and block of rows, which a tile of rows shares. Items only decide who
   computes what: every row's numbers are the same whichever way. */
static int chunks_split(const Step *s, int steps) { return s->computed == 1 && steps == 1 && s->chunks > 1; }

static int64_t step_items(const Step *s, int b, int steps, Item *out) {
  int64_t n = 0;
  if (s->computed == 1) {
    int group = s->heads / s->kv_heads, each = s->chunks == 1 && steps == 1 ? 1 : group;
    int span = chunks_split(s, steps) ? (s->chunks + 1) / 2 : s->chunks;
    for (int h = 0; h < s->heads; h += each)
      for (int c = 0; c < s->chunks; c += span, n++)
        if (out) out[n] = (Item){b, h / group, h, h + each, c, c + span < s->chunks ? c + span : s->chunks};
    return n;
  }
  for (int h = 0; h < s->heads; h++)
    for (int r0 = 0; r0 < s->computed; r0 += BLOCK_ROWS, n++)
      if (out) out[n] = (Item){b, h, r0, r0 + BLOCK_ROWS < s->computed ? r0 + BLOCK_ROWS : s->computed, -1, -1};
  return n;
}

static void run_item(void *data, size_t i) {
  Work *w = (Work *)data;
  const Item *it = &w->items[i];
  const Step *s = &w->steps[it->step];
  if (it->c0 >= 0) {
    for (int c = it->c0; c < it->c1; c++) group_chunk(s, it->head, it->r0, it->r1, c);
    if (it->c1 - it->c0 == s->chunks) merge_heads(s, it->r0, it->r1);  /* all its chunks here: no waiting */
    return;
  }
  float *parts = malloc(sizeof(float) * TILE * (size_t)chunks_of(s->width) * part_floats(s->hd));
  if (!parts) {
    __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  head_block(s, it->head, it->r0, it->r1, parts);
  free(parts);
}

/* The steps' attention: their new K/V rows into the caches, the work items over the threads, then the chunks of a
   decoding step whose chunks went to different items merged. ``op`` names the op in messages. */
static OrtStatus *attend_steps(OrtKernelContext *ctx, Step *steps, int count, const char *op) {
  int64_t n_items = 0;
  size_t n_parts = 0;
  for (int b = 0; b < count; b++) {
    Step *s = &steps[b];
    write_rows(s);
    s->chunks = chunks_of(s->past + 1);
    if (s->computed == 1) n_parts += s->heads * head_parts(s);
    n_items += step_items(s, b, count, NULL);
  }
  Item *items = n_items ? malloc(sizeof(Item) * (size_t)n_items) : NULL;
  float *parts = n_parts ? malloc(sizeof(float) * n_parts) : NULL;
  OrtStatus *st = NULL;
  char message[120];
  snprintf(message, sizeof message, "%s: out of memory for the attention's partial sums", op);
  if ((n_items && !items) || (n_parts && !parts)) st = error(message);
  int64_t i = 0;
  size_t at = 0;
  for (int b = 0; b < count && !st; b++) {
    Step *s = &steps[b];
    if (s->computed == 1) {
      s->parts = parts + at;
      at += s->heads * head_parts(s);
    }
    i += step_items(s, b, count, items + i);
  }
  Work work = {steps, items, 0};
  if (!st && n_items)
    st = parallel_for(ctx, run_item, (size_t)n_items, &work);
  if (!st && work.failed) st = error(message);
  for (int b = 0; b < count && !st; b++)
    if (chunks_split(&steps[b], count)) merge_heads(&steps[b], 0, steps[b].heads);
  free(parts);
  free(items);
  return st;
}

/* The name of a RowAttention or LanesAttention input, for messages. */
static const char *input_name(const char *op, size_t index) {
  static const char *row[] = {"qkv", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
                              "sin_cache", "position_ids", "attention_bias"};
  static const char *lanes[] = {"qkv", "lane_sizes", "cos_cache", "sin_cache"};
  static const char *lane[] = {"position_ids", "attention_bias", "past_key", "past_value"};
  if (op[0] == 'R') return index < 9 ? row[index] : "?";
  return index < 4 ? lanes[index] : lane[(index - 4) % 4];
}

enum { MAX_RANK = 8 };

/* Input ``index``: its value (NULL when the node gives none), element type and shape (the dimensions are read when
   there are at most MAX_RANK of them). */
static OrtStatus *tensor_of(OrtKernelContext *ctx, size_t index, const OrtValue **value, int *elem, int64_t *shape,
                            size_t *count) {
  OrtTypeShape *info = NULL;
  *value = NULL;
  OrtStatus *st = CALL(KernelContext_GetInput, OrtStatus *(*)(OrtKernelContext *, size_t, const OrtValue **))(ctx, index, value);
  if (st || !*value) return st;
  if ((st = CALL(GetTensorTypeAndShape, OrtStatus *(*)(const OrtValue *, OrtTypeShape **))(*value, &info))) return st;
  if (!(st = CALL(GetTensorElementType, OrtStatus *(*)(const OrtTypeShape *, int *))(info, elem)) &&
      !(st = CALL(GetDimensionsCount, OrtStatus *(*)(const OrtTypeShape *, size_t *))(info, count)) && *count <= MAX_RANK)
    st = CALL(GetDimensions, OrtStatus *(*)(const OrtTypeShape *, int64_t *, size_t))(info, shape, *count);
  CALL(ReleaseTensorTypeAndShapeInfo, void (*)(OrtTypeShape *))(info);
  return st;
}

static OrtStatus *data_of(const OrtValue *value, void **data) {
  return CALL(GetTensorMutableData, OrtStatus *(*)(OrtValue *, void **))((OrtValue *)value, data);
}

/* An input's data, element type and shape (up to 4 dimensions; ndims 0 with any_rank: dims[0] is the element
   count, whatever the rank). */
static OrtStatus *input(OrtKernelContext *ctx, size_t index, const char *what, int type, size_t ndims, int64_t *dims,
                        void **data, int any_rank) {
  const OrtValue *value = NULL;
  int elem = 0;
  size_t count = 0;
  int64_t shape[MAX_RANK] = {1, 1, 1, 1, 1, 1, 1, 1};
  OrtStatus *st = tensor_of(ctx, index, &value, &elem, shape, &count);
  if (st || !value) {
    char message[160];
    snprintf(message, sizeof message, "%s: input %s is missing", what, input_name(what, index));
    return st ? st : error(message);
  }
  if (any_rank && count <= 4) {
    dims[0] = shape[0] * shape[1] * shape[2] * shape[3];
    count = ndims;
  } else if (count == ndims) {
    memcpy(dims, shape, sizeof(int64_t) * ndims);
  }
  if (elem != type || count != ndims) {
    char message[200];  /* CreateStatus copies it */
    snprintf(message, sizeof message, "%s: input %s has element type %d and rank %zu, expected %d and %zu", what,
             input_name(what, index), elem, count, type, ndims);
    return error(message);
  }
  return data_of(value, data);
}

/* Output ``index`` allocated with ``dims``, and its data. */
static OrtStatus *any_output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t ndims, void **data) {
  OrtValue *value = NULL;
  OrtStatus *st = CALL(KernelContext_GetOutput, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
      ctx, index, dims, ndims, &value);
  if (st) return st;
  if (!value) return error("an output of a medusa_export op is missing (the node must name all of them)");
  return data_of(value, data);
}

static OrtStatus *output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t ndims, float **data) {
  return any_output(ctx, index, dims, ndims, (void **)data);
}

/* Present caches not bound in place: the past rows, then zeros where the new rows go (elements of ``bytes``). */
static void copy_past(void *key, const void *pk, void *value, const void *pv, int kv_heads, int hd, int in_cap, int cap,
                      int past, size_t bytes) {
  size_t row_bytes = bytes * (size_t)hd;
  for (int kh = 0; kh < kv_heads; kh++) {
    size_t head = (size_t)kh * cap * row_bytes, in_head = (size_t)kh * in_cap * row_bytes;
    if (key != pk) {
      memcpy((char *)key + head, (const char *)pk + in_head, row_bytes * past);
      memset((char *)key + head + row_bytes * past, 0, row_bytes * (cap - past));
    }
    if (value != pv) {
      memcpy((char *)value + head, (const char *)pv + in_head, row_bytes * past);
      memset((char *)value + head + row_bytes * past, 0, row_bytes * (cap - past));
    }
  }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *k = (const Kernel *)kernel;
  int64_t qd[3] = {0}, kd[4] = {0}, vd[4] = {0}, sd[1] = {0}, td[1] = {0}, cd[2] = {0}, nd[2] = {0}, pd[1] = {0},
          bd[4] = {0};
  void *qkv, *pk, *pv, *seqlens, *total, *cos, *sin, *pos, *bias;
  OrtStatus *st;
  const char *R = "RowAttention";
  int half = k->half, kv_elem = half ? ELEM_FLOAT16 : ELEM_FLOAT;
  if ((st = input(ctx, 0, R, ELEM_FLOAT, 3, qd, &qkv, 0)) || (st = input(ctx, 1, R, kv_elem, 4, kd, &pk, 0)) ||
      (st = input(ctx, 2, R, kv_elem, 4, vd, &pv, 0)) || (st = input(ctx, 3, R, ELEM_INT32, 1, sd, &seqlens, 1)) ||
      (st = input(ctx, 4, R, ELEM_INT32, 1, td, &total, 1)) || (st = input(ctx, 5, R, ELEM_FLOAT, 2, cd, &cos, 0)) ||
      (st = input(ctx, 6, R, ELEM_FLOAT, 2, nd, &sin, 0)) || (st = input(ctx, 7, R, ELEM_INT64, 1, pd, &pos, 1)) ||
      (st = input(ctx, 8, R, ELEM_FLOAT, 4, bd, &bias, 0)))
    return st;
  if (sd[0] != 1 || td[0] != 1) return error("RowAttention: seqlens_k and total_sequence_length must hold one value each");
  if (qd[1] > (1 << 24) || kd[2] > (1 << 24) || kd[3] > 256 || kd[1] > 4096)
    return error("RowAttention: more rows, cache rows or head size than the op takes (2^24, 2^24, 256)");
  int rows = (int)qd[1], hd = (int)kd[3], in_cap = (int)kd[2], tot = *(const int32_t *)total;
  int heads = (int)k->heads, kv_heads = (int)k->kv_heads, past = tot - rows;
  if (qd[0] != 1 || kd[0] != 1 || rows < 1 || kd[1] != kv_heads || memcmp(kd, vd, sizeof kd) ||
      qd[2] != (int64_t)(heads + 2 * kv_heads) * hd || hd < 8 || hd % 8 || hd > 256 || cd[1] * 2 != hd || nd[0] != cd[0] ||
      nd[1] != cd[1])
    return error("RowAttention: qkv, cache or rotary shapes do not match the op's heads");
  int cap = in_cap > tot ? in_cap : tot;  /* present: the past buffer, or a larger one when the past is shorter */
  if (past < 0 || past > in_cap || *(const int32_t *)seqlens != tot - 1 || pd[0] != rows ||
      bd[0] != 1 || bd[1] != 1 || bd[2] != rows || bd[3] != tot) {
    char message[240];
    snprintf(message, sizeof message, "RowAttention: %d rows, total length %d (seqlens_k %d), %lld positions and a "
             "bias of [%lld, %lld, %lld, %lld] do not fit each other or a cache of %d rows", rows, tot,
             *(const int32_t *)seqlens, (long long)pd[0], (long long)bd[0], (long long)bd[1], (long long)bd[2],
             (long long)bd[3], in_cap);
    return error(message);
  }
  const int64_t *p = (const int64_t *)pos;
  for (int i = 0; i < rows; i++)
    if (p[i] < 0 || p[i] >= cd[0]) return error("RowAttention: a position is outside the rotary cache");
  int64_t od[3] = {1, rows, (int64_t)heads * hd}, cd4[4] = {1, kv_heads, cap, hd};
  float *out;
  void *key, *value;
  if ((st = output(ctx, 0, od, 3, &out)) || (st = any_output(ctx, 1, cd4, 4, &key)) ||
      (st = any_output(ctx, 2, cd4, 4, &value)))
    return st;
  copy_past(key, pk, value, pv, kv_heads, hd, in_cap, cap, past, half ? 2 : 4);
  Step s = {.qkv = qkv, .cos = cos, .sin = sin, .bias = bias, .kcache = key, .vcache = value, .pos = p, .out = out,
            .rows = rows, .computed = rows - (k->skip_last_row && rows > 1 ? 1 : 0), .past = past, .heads = heads,
            .kv_heads = kv_heads, .hd = hd, .cap = cap, .width = tot, .half = half};
  if (s.computed < rows) memset(out + (size_t)s.computed * heads * hd, 0, sizeof(float) * heads * hd);
  return attend_steps(ctx, &s, 1, R);
}

/* ---- LanesAttention: the sequences of a batched step in one call --------------------------------------------- */
/* Inputs: qkv [1, R, (nh + 2 kvh) hd], the real rows of every lane back to back in lane order; lane_sizes int64 [L],
   each lane's rows + 1 (the lanes graph's count, whose + 1 is the extra row a one-sequence graph carries; no extra
   row is read here); cos_cache, sin_cache; then four per lane (variadic): position_ids int64 [1, rows + 1] and
   attention_bias [1, 1, rows + 1, past + rows + 1], the same inputs RowAttention gets in the one-sequence graph (their
   last row, the extra row's, is not read), past_key and past_value [1, kvh, cap, hd]. Outputs: [1, R, nh hd]; per
   lane present_key and present_value (bind them to the past's memory). Each lane's rows are computed exactly as
   RowAttention computes them with skip_last_row; a lane of no rows writes nothing. All lanes' work items
   (`step_items`) go over the session's threads together: decoding steps of one row per lane keep both threads busy,
   where one call per lane split nine heads over two threads. */
enum { LANE_INPUTS = 4, LANES_FIXED = 4, MAX_LANES = 256 };

static OrtStatus *lanes_compute(void *kernel, OrtKernelContext *ctx) {
  const Kernel *k = (const Kernel *)kernel;
  const char *L = "LanesAttention";
  int heads = (int)k->heads, kv_heads = (int)k->kv_heads;
  int64_t qd[3] = {0}, ld[1] = {0}, cd[2] = {0}, nd[2] = {0};
  void *qkv, *sizes, *cos, *sin;
  OrtStatus *st;
  if ((st = input(ctx, 0, L, ELEM_FLOAT, 3, qd, &qkv, 0)) || (st = input(ctx, 1, L, ELEM_INT64, 1, ld, &sizes, 0)) ||
      (st = input(ctx, 2, L, ELEM_FLOAT, 2, cd, &cos, 0)) || (st = input(ctx, 3, L, ELEM_FLOAT, 2, nd, &sin, 0)))
    return st;
  size_t count = 0, outputs = 0;
  if ((st = CALL(KernelContext_GetInputCount, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &count)) ||
      (st = CALL(KernelContext_GetOutputCount, OrtStatus *(*)(const OrtKernelContext *, size_t *))(ctx, &outputs)))
    return st;
  if (ld[0] < 1 || ld[0] > MAX_LANES || count != (size_t)(LANES_FIXED + LANE_INPUTS * ld[0]) ||
      outputs != (size_t)(1 + 2 * ld[0])) {
    char message[200];
    snprintf(message, sizeof message, "LanesAttention: %zu inputs and %zu outputs for %lld lanes; expected 4 + 4 per "
             "lane and 1 + 2 per lane (1 .. %d lanes)", count, outputs, (long long)ld[0], MAX_LANES);
    return error(message);
  }
  if (cd[1] < 4 || cd[1] > 128) return error("LanesAttention: the rotary cache's width must be head_size / 2, 4 .. 128");
  int lanes = (int)ld[0], hd = (int)cd[1] * 2, width = (heads + 2 * kv_heads) * hd;
  if (qd[0] != 1 || qd[1] > (1 << 24) || hd < 8 || hd % 8 || hd > 256 || qd[2] != width || nd[0] != cd[0] || nd[1] != cd[1])
    return error("LanesAttention: qkv or rotary shapes do not match the op's heads");
  int64_t od[3] = {1, qd[1], (int64_t)heads * hd};
  float *out = NULL;
  if ((st = output(ctx, 0, od, 3, &out))) return st;
  Step *steps = calloc((size_t)lanes, sizeof(Step));
  if (!steps) return error("LanesAttention: out of memory");
  const int64_t *lane_rows = (const int64_t *)sizes;
  int64_t offset = 0;
  int half = k->half, kv_elem = half ? ELEM_FLOAT16 : ELEM_FLOAT;
  for (int b = 0; b < lanes && !st; b++) {
    int64_t pd[2] = {0}, bd[4] = {0}, kd[4] = {0}, vd[4] = {0};
    void *pos, *bias, *pk, *pv;
    size_t at = LANES_FIXED + (size_t)LANE_INPUTS * b;
    if ((st = input(ctx, at, L, ELEM_INT64, 2, pd, &pos, 0)) || (st = input(ctx, at + 1, L, ELEM_FLOAT, 4, bd, &bias, 0)) ||
        (st = input(ctx, at + 2, L, kv_elem, 4, kd, &pk, 0)) || (st = input(ctx, at + 3, L, kv_elem, 4, vd, &pv, 0)))
      break;
    int64_t rows = lane_rows[b] >= 1 && lane_rows[b] <= qd[1] + 1 ? lane_rows[b] - 1 : -1;
    int64_t tot = bd[3], in_cap = kd[2], past = tot - rows - 1;
    if (rows < 0 || in_cap > (1 << 24) || rows > qd[1] - offset || pd[0] != 1 || pd[1] != rows + 1 || bd[0] != 1 || bd[1] != 1 ||
        bd[2] != rows + 1 || past < 0 || past > in_cap || tot > (1 << 24) || kd[0] != 1 || kd[1] != kv_heads ||
        kd[3] != hd || memcmp(kd, vd, sizeof kd)) {
      char message[240];
      snprintf(message, sizeof message, "LanesAttention: lane %d: %lld rows, positions [%lld, %lld], a bias of [%lld, "
               "%lld, %lld, %lld] and a cache of %lld rows do not fit each other or the %lld rows left of qkv", b,
               (long long)rows, (long long)pd[0], (long long)pd[1], (long long)bd[0], (long long)bd[1],
               (long long)bd[2], (long long)bd[3], (long long)in_cap, (long long)(qd[1] - offset));
      st = error(message);
      break;
    }
    const int64_t *p = (const int64_t *)pos;
    for (int i = 0; i < rows && !st; i++)
      if (p[i] < 0 || p[i] >= cd[0]) st = error("LanesAttention: a position is outside the rotary cache");
    int cap = (int)(in_cap > tot ? in_cap : tot);
    int64_t cd4[4] = {1, kv_heads, cap, hd};
    void *key, *value;
    if (st || (st = any_output(ctx, 1 + 2 * (size_t)b, cd4, 4, &key)) || (st = any_output(ctx, 2 + 2 * (size_t)b, cd4, 4, &value)))
      break;
    copy_past(key, pk, value, pv, kv_heads, hd, (int)in_cap, cap, (int)past, half ? 2 : 4);
    steps[b] = (Step){.qkv = (const float *)qkv + offset * width, .cos = cos, .sin = sin, .bias = bias, .kcache = key,
                      .vcache = value, .pos = p, .out = out + offset * heads * hd, .rows = (int)rows,
                      .computed = (int)rows, .past = (int)past, .heads = heads, .kv_heads = kv_heads, .hd = hd,
                      .cap = cap, .width = (int)tot, .half = half};
    offset += rows;
  }
  if (!st && offset != qd[1]) st = error("LanesAttention: the lanes' rows do not add up to qkv's rows");
  if (!st) st = attend_steps(ctx, steps, lanes, L);
  free(steps);
  return st;
}

/* ---- int8 matmuls with activations quantized per row ---------------------------------------------------------- */
/* RowQuantize: x float [..., K] (and optionally signs float [B]) -> q uint8 [..., K], scale float [..., 1]: each row
   by itself, symmetric, q = clamp(round_half_even(x * (127 / max|x|)), -127, 127) + 128 and scale = max|x| / 127 (a
   row of zeros, or of subnormals only: scale 1, q 128; a row holding a NaN or an infinity: scale NaN, so its
   products come out NaN). With signs, each block of B columns is first turned by diag(signs) H / sqrt(B) (H the
   Sylvester Hadamard matrix, B a power of two dividing K): the fast Walsh-Hadamard transform of the signed block, in
   one fixed order, the 1 / sqrt(B) taken into the row's scale. This is the input rotation (`exporter/rotation.py`)
   the graph otherwise runs as a MatMul of [B, B] before the quantization: O(B log B) per block, and no extra nodes.
   ScaleRows: y int32 [..., N] (MatMulInteger of q with zero point 128 against int8 weights), the rows' scales and
   the weights' column scales col float [N] -> float [..., N] = (float(y) * row scale) * column scale. The integer
   product is exact, so a row's result depends on nothing but the row: batched, tree and one-token steps agree to
   the bit.
   With the attribute passes = 2 (both ops), RowQuantize also quantizes what the first pass left of each row (the
   row minus its dequantized first pass, in the turned basis, under its own scale): q [..., 2, K], scale [..., 2, 1],
   so one MatMulInteger multiplies both passes; ScaleRows then takes y [..., 2, N] and row_scale [..., 2, 1] and
   writes (float(y0) * s0 + float(y1) * s1) * column scale, [..., N]. About 15 bits of the row instead of 8, for a
   second row through the integer product (whose cost grows slowly with rows). A row whose largest value is within
   about 1 % of FLT_MAX dequantizes to infinity in the first pass and comes out NaN with two passes. */
/* An input of rank 1 .. MAX_RANK: its data, shape and rank. */
static OrtStatus *any_input(OrtKernelContext *ctx, size_t index, int type, int64_t *dims, size_t *ndims, void **data,
                            const char *what) {
  const OrtValue *value = NULL;
  int elem = 0;
  OrtStatus *st = tensor_of(ctx, index, &value, &elem, dims, ndims);
  if (st || !value) return st ? st : error("an int8 row op's input is missing");
  if (elem != type || *ndims < 1 || *ndims > MAX_RANK) {
    char message[160];
    snprintf(message, sizeof message, "%s has element type %d and rank %zu, expected %d and 1 .. %d", what, elem,
             *ndims, type, MAX_RANK);
    return error(message);
  }
  return data_of(value, data);
}

/* One row's blocks of ``block`` columns times diag(signs) H, unnormalized: the butterflies stage by stage (spans 1, 2,
   4, ...), so every path through the transform sums in one fixed order. From blocks of 8 on, the spans below 8 run
   inside a vector (the same additions and subtractions of the same pairs) and the others across vectors. */
static void turn_row(const float *x, float *out, const float *signs, int64_t k, int block) {
  for (int64_t b0 = 0; b0 < k; b0 += block) {
    float *z = out + b0;
    int h = 1;
    if (block >= 8) {
      for (int i = 0; i < block; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + b0 + i), _mm256_loadu_ps(signs + i)), t;
        t = _mm256_permute_ps(v, 0xB1);  /* span 1: lanes 1 0 3 2 */
        v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xAA);
        t = _mm256_permute_ps(v, 0x4E);  /* span 2: lanes 2 3 0 1 */
        v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xCC);
        t = _mm256_permute2f128_ps(v, v, 0x01);  /* span 4: the halves swapped */
        v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xF0);
        _mm256_storeu_ps(z + i, v);
      }
      for (h = 8; h < block; h *= 2)
        for (int i = 0; i < block; i += 2 * h)
          for (int j = i; j < i + h; j += 8) {
            __m256 a = _mm256_loadu_ps(z + j), c = _mm256_loadu_ps(z + j + h);
            _mm256_storeu_ps(z + j, _mm256_add_ps(a, c));
            _mm256_storeu_ps(z + j + h, _mm256_sub_ps(a, c));
          }
      continue;
    }
    for (int i = 0; i < block; i++) z[i] = x[b0 + i] * signs[i];
    for (; h < block; h *= 2)
      for (int i = 0; i < block; i += 2 * h)
        for (int j = i; j < i + h; j++) {
          float a = z[j], c = z[j + h];
          z[j] = a + c;
          z[j + h] = a - c;
        }
  }
}

/* RowQuantize's optional signs: NULL when the node gives none; else their block, a power of two dividing k. */
static OrtStatus *quantize_signs(OrtKernelContext *ctx, size_t index, int64_t k, const float **signs, int *block,
                                 const char *op) {
  const OrtValue *value = NULL;
  int elem = 0;
  size_t count = 0;
  int64_t dims[MAX_RANK] = {0};
  void *data = NULL;
  *signs = NULL;
  OrtStatus *st = tensor_of(ctx, index, &value, &elem, dims, &count);
  if (st || !value) return st;
  if (elem != ELEM_FLOAT || count != 1 || dims[0] < 2 || dims[0] > 4096 || (dims[0] & (dims[0] - 1)) || k % dims[0]) {
    char message[160];
    snprintf(message, sizeof message, "%s: signs must be a float vector whose length is a power of two, 2 .. 4096, "
             "dividing the rows' length", op);
    return error(message);
  }
  if ((st = data_of(value, &data))) return st;
  *signs = (const float *)data;
  *block = (int)dims[0];
  return NULL;
}

/* max |row[j]| over k values, and *bad = 1 where one of them is a NaN or an infinity (else 0). */
static float row_peak(const float *row, int64_t k, int *bad) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
  __m256 m8 = _mm256_setzero_ps(), bad8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 a = _mm256_and_ps(_mm256_loadu_ps(row + j), abs_mask);
    bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  /* NaN or infinity: not <= FLT_MAX */
    m8 = _mm256_max_ps(m8, a);
  }
  float m = hmax8(m8);
  *bad = _mm256_movemask_ps(bad8) != 0;
  for (; j < k; j++) {
    float a = fabsf(row[j]);
    if (!(a <= FLT_MAX)) *bad = 1;
    m = a > m ? a : m;
  }
  return m;
}

/* One quantization of a row of k values: q (uint8, offset 128) and *scale = max|row| / 127, returning 1; a row of
   zeros or of subnormals only: scale 1, q 128; a row holding a NaN or an infinity: scale NaN, q 128; both return 0. */
static int quantize_pass(const float *row, uint8_t *qr, int64_t k, float *scale) {
  int bad;
  float m = row_peak(row, k, &bad);
  float inv_m = 127.0f / m;
  if (bad || !(inv_m <= FLT_MAX)) {  /* zeros, or so small that 127 / max overflows: a row of zeros */
    memset(qr, 128, (size_t)k);
    *scale = bad ? NAN : 1.0f;
    return 0;
  }
  const __m256 inv = _mm256_set1_ps(inv_m), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i offset = _mm256_set1_epi32(128), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {  /* four vectors of 8 -> 32 bytes, packed in order */
    __m256i v[4];
    for (int t = 0; t < 4; t++) {
      __m256 f = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j + 8 * t), inv),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v[t] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi)), offset);
    }
    __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_packus_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)(qr + j), _mm256_permutevar8x32_epi32(packed, order));
  }
  for (; j < k; j++) {
    __m128 v = _mm_round_ss(_mm_setzero_ps(), _mm_mul_ss(_mm_set_ss(row[j]), _mm_set_ss(inv_m)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    float f = _mm_cvtss_f32(v);
    f = f < -127.0f ? -127.0f : f > 127.0f ? 127.0f : f;
    qr[j] = (uint8_t)((int)f + 128);
  }
  *scale = m / 127.0f;
  return 1;
}

/* What a pass of scale s left of row: row - (q - 128) * s, into out (which may be row). */
static void residual_row(const float *row, const uint8_t *qr, float s, float *out, int64_t k) {
  const __m256 s8 = _mm256_set1_ps(s), off = _mm256_set1_ps(128.0f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + j))));
    _mm256_storeu_ps(out + j, _mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_mul_ps(_mm256_sub_ps(q, off), s8)));
  }
  for (; j < k; j++) out[j] = row[j] - ((float)qr[j] - 128.0f) * s;
}

/* One row of RowQuantize: turned first when ``signs`` is given (into ``work``, k floats); with two passes the
   residual goes to qr + k and scale[1] (``work`` holds it). */
static void quantize_row(const float *row, uint8_t *qr, float *scale, int64_t k, const float *signs, int block,
                         int passes, float *work) {
  if (signs) {
    turn_row(row, work, signs, k, block);
    row = work;
  }
  const float norm = signs ? 1.0f / sqrtf((float)block) : 1.0f;  /* H / sqrt(B): taken into the scale */
  float s;
  if (!quantize_pass(row, qr, k, &s)) {  /* zeros (scale 1) or a NaN / infinity (NaN): the second pass the same */
    scale[0] = s;
    if (passes > 1) {
      memset(qr + k, 128, (size_t)k);
      scale[1] = s;
    }
    return;
  }
  scale[0] = s * norm;
  if (passes < 2) return;
  residual_row(row, qr, s, work, k);
  float r;
  scale[1] = quantize_pass(work, qr + k, k, &r) ? r * norm : r;
}

/* One row of ScaleRows: (float(y) * row scale) * column scale. */
static void scale_row(const int32_t *yr, float s, const float *col, float *orow, int64_t n) {
  const __m256 s8 = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(orow + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(yr + j))), s8),
                                             _mm256_loadu_ps(col + j)));
  for (; j < n; j++) orow[j] = ((float)yr[j] * s) * col[j];
}

/* One row of ScaleRows with two passes: (float(y0) * s0 + float(y1) * s1) * column scale. */
static void scale_row2(const int32_t *y0, const int32_t *y1, const float *s, const float *col, float *orow,
                       int64_t n) {
  const __m256 a8 = _mm256_set1_ps(s[0]), b8 = _mm256_set1_ps(s[1]);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(y0 + j))), a8);
    __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(y1 + j))), b8);
    _mm256_storeu_ps(orow + j, _mm256_mul_ps(_mm256_add_ps(a, b), _mm256_loadu_ps(col + j)));
  }
  for (; j < n; j++) orow[j] = ((float)y0[j] * s[0] + (float)y1[j] * s[1]) * col[j];
}

/* The rows of one RowQuantize or ScaleRows call, in blocks of ROW_BLOCK spread over ONNX Runtime's threads when
   there are enough of them (a prompt chunk, a tree); a row's numbers do not depend on which thread ran it. */
enum { ROW_BLOCK = 8, PARALLEL_VALUES = 16384 };  /* below 16k values a thread's hand-off costs more than it saves */
typedef struct {
  const void *in;
  void *out;
  float *scale;  /* the rows' scales: RowQuantize writes them, ScaleRows reads them */
  const float *col, *signs;  /* ScaleRows' column scales; RowQuantize's signs (or NULL) */
  int64_t rows, k;  /* the length of a row RowQuantize quantizes, of a row ScaleRows writes */
  int block, passes, failed;
} RowWork;

static void quantize_block(void *data, size_t index) {
  RowWork *w = (RowWork *)data;
  int64_t r0 = (int64_t)index * ROW_BLOCK, r1 = r0 + ROW_BLOCK < w->rows ? r0 + ROW_BLOCK : w->rows;
  float *work = NULL;
  if ((w->signs || w->passes > 1) && w->k && !(work = malloc(sizeof(float) * (size_t)w->k))) {
    __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);  /* other threads may be writing it too */
    return;
  }
  for (int64_t r = r0; r < r1; r++)
    quantize_row((const float *)w->in + r * w->k, (uint8_t *)w->out + r * w->passes * w->k, w->scale + r * w->passes,
                 w->k, w->signs, w->block, w->passes, work);
  free(work);
}

static void scale_rows_block(void *data, size_t index) {
  RowWork *w = (RowWork *)data;
  int64_t r0 = (int64_t)index * ROW_BLOCK, r1 = r0 + ROW_BLOCK < w->rows ? r0 + ROW_BLOCK : w->rows;
  const int32_t *y = (const int32_t *)w->in;
  for (int64_t r = r0; r < r1; r++) {
    float *orow = (float *)w->out + r * w->k;
    if (w->passes > 1)
      scale_row2(y + 2 * r * w->k, y + (2 * r + 1) * w->k, w->scale + 2 * r, w->col, orow, w->k);
    else
      scale_row(y + r * w->k, w->scale[r], w->col, orow, w->k);
  }
}

/* Runs fn over w's row blocks: on the calling thread for a few rows, else through ONNX Runtime's threads. */
static OrtStatus *over_rows(OrtKernelContext *ctx, void (*fn)(void *, size_t), RowWork *w, const char *op) {
  size_t blocks = (size_t)((w->rows + ROW_BLOCK - 1) / ROW_BLOCK);
  OrtStatus *st = NULL;
  if (blocks > 1 && w->rows * w->k >= PARALLEL_VALUES)
    st = parallel_for(ctx, fn, blocks, w);
  else
    for (size_t i = 0; i < blocks; i++) fn(w, i);
  if (!st && w->failed) {
    char message[80];
    snprintf(message, sizeof message, "%s: out of memory", op);
    st = error(message);
  }
  return st;
}

static OrtStatus *quantize_compute(void *kernel, OrtKernelContext *ctx) {
  const int passes = (int)((Kernel *)kernel)->passes;
  int64_t dims[MAX_RANK];
  size_t nd = 0;
  void *in, *q, *sc;
  OrtStatus *st;
  if ((st = any_input(ctx, 0, ELEM_FLOAT, dims, &nd, &in, "RowQuantize: x"))) return st;
  int64_t k = dims[nd - 1], rows = 1;
  for (size_t i = 0; i + 1 < nd; i++) rows *= dims[i];
  const float *signs = NULL;
  int block = 1;
  if ((st = quantize_signs(ctx, 1, k, &signs, &block, "RowQuantize"))) return st;
  if (passes > 1 && nd == MAX_RANK) return error("RowQuantize: with passes = 2, x may have at most 7 dimensions");
  int64_t qdims[MAX_RANK], sdims[MAX_RANK];
  memcpy(qdims, dims, sizeof(int64_t) * nd);
  size_t qn = nd;
  if (passes > 1) {  /* [..., K] -> [..., 2, K] */
    qdims[nd - 1] = 2;
    qdims[qn++] = k;
  }
  memcpy(sdims, qdims, sizeof(int64_t) * qn);
  sdims[qn - 1] = 1;
  if ((st = any_output(ctx, 0, qdims, qn, &q)) || (st = any_output(ctx, 1, sdims, qn, &sc))) return st;
  RowWork w = {in, q, (float *)sc, NULL, signs, rows, k, block, passes, 0};
  return over_rows(ctx, quantize_block, &w, "RowQuantize");
}

static OrtStatus *scale_rows_compute(void *kernel, OrtKernelContext *ctx) {
  const int passes = (int)((Kernel *)kernel)->passes;
  int64_t yd[MAX_RANK], sd[MAX_RANK], cd[MAX_RANK];
  size_t yn = 0, sn = 0, cn = 0;
  void *y, *rs, *cs, *o;
  OrtStatus *st;
  if ((st = any_input(ctx, 0, ELEM_INT32, yd, &yn, &y, "ScaleRows: y")) ||
      (st = any_input(ctx, 1, ELEM_FLOAT, sd, &sn, &rs, "ScaleRows: row_scale")) ||
      (st = any_input(ctx, 2, ELEM_FLOAT, cd, &cn, &cs, "ScaleRows: column_scale")))
    return st;
  int64_t n = yd[yn - 1], rows = 1;
  for (size_t i = 0; i + 1 < yn; i++) rows *= yd[i];
  int ok = sn == yn && sd[sn - 1] == 1 && cn == 1 && cd[0] == n && (passes < 2 || (yn >= 2 && yd[yn - 2] == 2));
  for (size_t i = 0; ok && i + 1 < yn; i++) ok = sd[i] == yd[i];
  if (!ok)
    return error(passes < 2 ? "ScaleRows: row_scale must be y's shape with a last size of 1, column_scale y's last size"
                            : "ScaleRows: with passes = 2, y must be [..., 2, N], row_scale [..., 2, 1], "
                              "column_scale [N]");
  int64_t od[MAX_RANK];
  memcpy(od, yd, sizeof(int64_t) * yn);
  size_t on = yn;
  if (passes > 1) {  /* [..., 2, N] -> [..., N] */
    od[yn - 2] = n;
    on--;
    rows /= 2;
  }
  if ((st = any_output(ctx, 0, od, on, &o))) return st;
  RowWork w = {y, o, (float *)rs, (const float *)cs, NULL, rows, n, 1, passes, 0};
  return over_rows(ctx, scale_rows_block, &w, "ScaleRows");
}

static OrtStatus *create_as(const OrtKernelInfo *info, void **kernel, int half) {
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) return error("RowAttention: out of memory");
  OrtStatus *(*attr)(const OrtKernelInfo *, const char *, int64_t *) =
      CALL(KernelInfoGetAttribute_int64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *));
  OrtStatus *st;
  if ((st = attr(info, "num_heads", &k->heads)) || (st = attr(info, "kv_num_heads", &k->kv_heads))) {
    free(k);
    return st;
  }
  if ((st = attr(info, "skip_last_row", &k->skip_last_row))) {  /* optional */
    CALL(ReleaseStatus, void (*)(OrtStatus *))(st);
    k->skip_last_row = 0;
  }
  if (k->heads < 1 || k->kv_heads < 1 || k->heads > 4096 || k->kv_heads > 4096 || k->heads % k->kv_heads) {
    free(k);
    return error("RowAttention: num_heads must be a multiple of kv_num_heads, both 1 .. 4096");
  }
  k->half = half;
  *kernel = k;
  return NULL;
}

static OrtStatus *create(const OrtCustomOp *op, OrtApiTable table, const OrtKernelInfo *info, void **kernel) {
  (void)op; (void)table;
  return create_as(info, kernel, 0);
}

static OrtStatus *create16(const OrtCustomOp *op, OrtApiTable table, const OrtKernelInfo *info, void **kernel) {
  (void)op; (void)table;
  return create_as(info, kernel, 1);
}

static const char *name(const OrtCustomOp *op) { (void)op; return "RowAttention"; }
static const char *provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 3 || i == 4 ? ELEM_INT32 : i == 7 ? ELEM_INT64 : ELEM_FLOAT;
}
static int input_type16(const OrtCustomOp *op, size_t i) { return i == 1 || i == 2 ? ELEM_FLOAT16 : input_type(op, i); }
static size_t input_count(const OrtCustomOp *op) { (void)op; return 9; }
static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static int output_type16(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ELEM_FLOAT : ELEM_FLOAT16; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 3; }
static void destroy(void *kernel) { free(kernel); }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; /* INPUT_OUTPUT_REQUIRED */ }
static int cpu_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; /* OrtMemTypeDefault */ }
static int one(const OrtCustomOp *op) { (void)op; return 1; }

/* An op of fixed inputs and outputs (all required but those INPUT_KIND calls optional). */
#define FIXED_OP(NAME, IN_TYPE, IN_COUNT, OUT_TYPE, OUT_COUNT, CREATE, COMPUTE, INPUT_KIND)                                      \
  {                                                                                                                  \
    .version = API_VERSION, .GetName = NAME, .GetExecutionProviderType = provider, .GetInputType = IN_TYPE,          \
    .GetInputTypeCount = IN_COUNT, .GetOutputType = OUT_TYPE, .GetOutputTypeCount = OUT_COUNT,                       \
    .KernelDestroy = destroy, .GetInputCharacteristic = INPUT_KIND, .GetOutputCharacteristic = required,              \
    .GetInputMemoryType = cpu_memory, .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = one,          \
    .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one, .CreateKernelV2 = CREATE,               \
    .KernelComputeV2 = COMPUTE,                                                                                      \
  }

static OrtCustomOp row_attention = FIXED_OP(name, input_type, input_count, output_type, output_count, create, compute,
                                            required);
static const char *name16(const OrtCustomOp *op) { (void)op; return "RowAttention16"; }
static OrtCustomOp row_attention16 = FIXED_OP(name16, input_type16, input_count, output_type16, output_count, create16,
                                              compute, required);

static const char *lanes_name(const OrtCustomOp *op) { (void)op; return "LanesAttention"; }
static int lanes_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 1 ? ELEM_INT64 : i == 4 ? 0 /* UNDEFINED: the per-lane inputs are of several types */ : ELEM_FLOAT;
}
static size_t lanes_input_count(const OrtCustomOp *op) { (void)op; return LANES_FIXED + 1; }
static size_t lanes_output_count(const OrtCustomOp *op) { (void)op; return 2; }
static int lanes_input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == LANES_FIXED ? 2 : 0; /* VARIADIC */ }
static int lanes_output_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? 2 : 0; }
static int lanes_min_inputs(const OrtCustomOp *op) { (void)op; return LANE_INPUTS; }
static int lanes_min_outputs(const OrtCustomOp *op) { (void)op; return 2; }
static int zero(const OrtCustomOp *op) { (void)op; return 0; }

/* LanesAttention and LanesAttention16: variadic per-lane inputs of several types, one type of present outputs. */
#define LANES_OP(NAME, OUT_TYPE, CREATE)                                                                            \
  {                                                                                                                  \
    .version = API_VERSION, .GetName = NAME, .GetExecutionProviderType = provider,                                  \
    .GetInputType = lanes_input_type, .GetInputTypeCount = lanes_input_count, .GetOutputType = OUT_TYPE,          \
    .GetOutputTypeCount = lanes_output_count, .KernelDestroy = destroy, .GetInputCharacteristic = lanes_input_kind, \
    .GetOutputCharacteristic = lanes_output_kind, .GetInputMemoryType = cpu_memory,                                 \
    .GetVariadicInputMinArity = lanes_min_inputs, .GetVariadicInputHomogeneity = zero,                              \
    .GetVariadicOutputMinArity = lanes_min_outputs, .GetVariadicOutputHomogeneity = one, .CreateKernelV2 = CREATE, \
    .KernelComputeV2 = lanes_compute,                                                                                \
  }

static OrtCustomOp lanes_attention = LANES_OP(lanes_name, output_type, create);
static const char *lanes_name16(const OrtCustomOp *op) { (void)op; return "LanesAttention16"; }
static OrtCustomOp lanes_attention16 = LANES_OP(lanes_name16, output_type16, create16);

/* RowQuantize / ScaleRows: the optional attribute passes, 1 (default) or 2. */
static OrtStatus *create_rows(const OrtCustomOp *op, OrtApiTable table, const OrtKernelInfo *info, void **kernel) {
  (void)op; (void)table;
  Kernel *k = calloc(1, sizeof(Kernel));
  if (!k) return error("out of memory");
  OrtStatus *st = CALL(KernelInfoGetAttribute_int64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))(
      info, "passes", &k->passes);
  if (st) {  /* absent: one pass */
    CALL(ReleaseStatus, void (*)(OrtStatus *))(st);
    k->passes = 1;
  }
  if (k->passes < 1 || k->passes > 2) {
    free(k);
    return error("RowQuantize / ScaleRows: the attribute passes must be 1 or 2");
  }
  *kernel = k;
  return NULL;
}

static const char *quantize_name(const OrtCustomOp *op) { (void)op; return "RowQuantize"; }
static int quantize_output_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ELEM_UINT8 : ELEM_FLOAT; }
static int float_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t one_count(const OrtCustomOp *op) { (void)op; return 1; }
static size_t two_count(const OrtCustomOp *op) { (void)op; return 2; }
static size_t three_count(const OrtCustomOp *op) { (void)op; return 3; }
static const char *scale_rows_name(const OrtCustomOp *op) { (void)op; return "ScaleRows"; }
static int scale_rows_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ELEM_INT32 : ELEM_FLOAT; }

static int second_optional(const OrtCustomOp *op, size_t i) { (void)op; return i == 1; /* INPUT_OUTPUT_OPTIONAL */ }
static OrtCustomOp row_quantize = FIXED_OP(quantize_name, float_type, two_count, quantize_output_type, two_count,
                                           create_rows, quantize_compute, second_optional);
static OrtCustomOp scale_rows = FIXED_OP(scale_rows_name, scale_rows_input_type, three_count, float_type, one_count,
                                         create_rows, scale_rows_compute, required);

#include "block_matmul.c"
static const char *block_matmul_name(const OrtCustomOp *op) { (void)op; return "BlockMatMul16"; }
static int block_matmul_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 1 ? ELEM_INT8 : ELEM_FLOAT;
}
static size_t four_count(const OrtCustomOp *op) { (void)op; return 4; }
static int fourth_optional(const OrtCustomOp *op, size_t i) { (void)op; return i == 3; /* INPUT_OUTPUT_OPTIONAL */ }
static OrtStatus *create_plain(const OrtCustomOp *op, OrtApiTable table, const OrtKernelInfo *info, void **kernel) {
  (void)op; (void)table; (void)info;
  return (*kernel = calloc(1, sizeof(Kernel))) ? NULL : error("out of memory");
}
static OrtCustomOp block_matmul = FIXED_OP(block_matmul_name, block_matmul_input_type, four_count, float_type, one_count,
                                           create_plain, block_matmul_compute, fourth_optional);
static const char *block_matmul4_name(const OrtCustomOp *op) { (void)op; return "BlockMatMul16Q4"; }
static int block_matmul4_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 1 ? ELEM_UINT8 : ELEM_FLOAT;
}
static OrtCustomOp block_matmul4 = FIXED_OP(block_matmul4_name, block_matmul4_input_type, four_count, float_type,
                                            one_count, create_plain, block_matmul4_compute, required);

#include "block_f32.c"
static const char *block_f32_name(const OrtCustomOp *op) { (void)op; return "BlockMatMulF32Q4"; }
static int block_f32_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 0 ? ELEM_FLOAT : i == 1 ? ELEM_UINT8 : ELEM_FLOAT16;
}
static OrtCustomOp block_f32 = FIXED_OP(block_f32_name, block_f32_input_type, four_count, float_type, one_count,
                                        create_plain, block_f32_compute, required);

#include "screened_vocab.c"
static OrtCustomOp screened_vocab = {
    .version = API_VERSION, .GetName = screen_name, .GetExecutionProviderType = provider,
    .GetInputType = screen_input_type, .GetInputTypeCount = screen_input_count, .GetOutputType = screen_output_type,
    .GetOutputTypeCount = screen_output_count, .KernelDestroy = destroy, .GetInputCharacteristic = screen_input_kind,
    .GetOutputCharacteristic = screen_output_kind, .GetInputMemoryType = cpu_memory, .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = one, .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one,
    .CreateKernelV2 = create_screen, .KernelComputeV2 = screen_compute,
};

__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  OrtApiTable table = base->GetApi(API_VERSION);
  if (!table) {  /* an ONNX Runtime older than 1.16: say so through the oldest table */
    OrtApiTable first = base->GetApi(1);
    return first ? ((OrtStatus * (*)(int, const char *)) first[API_CreateStatus])(
                       ORT_FAIL, "the medusa_export attention kernel needs onnxruntime >= 1.16")
                 : NULL;
  }
  __atomic_store_n(&api, table, __ATOMIC_RELEASE);  /* the same table for every registration in a process */
  bm_detect();  /* BlockMatMul16's path, the same at every registration */
  bf_detect();  /* BlockMatMulF32Q4's */
  OrtCustomOpDomain *domain = NULL;  /* kept for the process' lifetime: sessions refer to it */
  OrtStatus *st = CALL(CreateCustomOpDomain, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("medusa_export", &domain);
  if (st) return st;
  OrtStatus *(*add)(OrtCustomOpDomain *, const OrtCustomOp *) =
      CALL(CustomOpDomain_Add, OrtStatus *(*)(OrtCustomOpDomain *, const OrtCustomOp *));
  if ((st = add(domain, &row_attention)) || (st = add(domain, &lanes_attention)) || (st = add(domain, &row_attention16)) ||
      (st = add(domain, &lanes_attention16)) || (st = add(domain, &row_quantize)) || (st = add(domain, &scale_rows)) ||
      (st = add(domain, &screened_vocab)) || (st = add(domain, &block_matmul)) ||
      (st = add(domain, &block_matmul4)) || (st = add(domain, &block_f32)))
    return st;
  return CALL(AddCustomOpDomain, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
