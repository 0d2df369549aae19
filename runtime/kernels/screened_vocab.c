/* ScreenedVocab: the vocabulary reduction of an fp32 lm_head (top-S words, their probabilities, the probabilities of
   the step's input tokens, the entropy) with the full fp32 product replaced by an int8 one plus exact fp32 dot
   products for the few words that could rank among the top S. Included by row_attention.c (one library).

   The graph computes ``approx`` = the rows' int8 product: RowQuantize (passes = 2) -> MatMulInteger -> ScaleRows with
   the weight quantized per word (column), symmetric, to nearest. For a row x and word v, with x^ the row as the two
   passes hold it and w^ the word's int8 column, exact - approx = (x - x^) . w + x^ . (w - w^), so by Cauchy-Schwarz

       |x . w_v - approx_v| <= |x - x^| |w_v| + |x^| |w_v - w^_v|   (+ the float rounding of both sides: SLACK)

   ``bounds`` holds |w_v| and |w_v - w^_v| per word (rounded up at build time); this op recomputes x^ with the same
   functions RowQuantize uses. A word whose upper bound lies below the S-th largest lower bound cannot be among the
   top S: only the others (a few hundred of 49,152 on the default model) get their exact logit, a fixed-order dot
   product of x with the word's fp32 row. The top S and their order are therefore those of exact fp32 logits, and
   greedy decoding takes the exact argmax ("exact": this op's fixed-order fp32 dot product, which may differ from
   another fp32 MatMul's in the last bit, so two words within rounding of each other may rank the other way). The
   probabilities and the entropy use the exact logits of the kept words and the int8 product's for the rest (words
   whose upper bound lies below the S-th largest lower bound).

   Each row is computed by itself, on one thread, in one fixed order: a row's outputs depend on nothing else in the
   call, as for the other ops of this library.

   Inputs: approx float [..., R, V]; x float [..., R, H]; weight float [V, H] (the lm_head's rows); bounds float
   [2, V]; input_ids int64 [B, T] (optional; x then [B, R, H]); temperature float, 1 value or one per row.
   Outputs: ids int64 [..., R, S] (best first; equal logits: the smaller id first); probs float [..., R, S];
   input_probs float [B, R, T] (only with input_ids); entropy float [..., R]. Attribute top_k = S. */

enum { SV_APPROX, SV_X, SV_WEIGHT, SV_BOUNDS, SV_IDS, SV_TEMPERATURE };
/* Allowance, relative to |x| |w_v|, for the float rounding of the int8 product's scaling (a few units of 2^-24), of
   an exact dot product (at most (h / 8 + 3) 2^-24 in its 8-lane order) and of the bound itself: SLACK + h 1e-8, at
   least twice the worst case for any row length. */
static const float SLACK = 1e-4f, SLACK_PER_VALUE = 1e-8f;

typedef struct {
  int64_t top_k;
} ScreenKernel;

typedef struct {
  const float *approx, *x, *weight, *norms, *drift, *temperature;
  const int64_t *ids;
  int64_t *out_ids;
  float *probs, *input_probs, *entropy;
  int64_t rows, per_batch, v, h, t, top_k, temperatures;
  int failed;
} Screen;

/* The exact logit of word v: x . weight[v] in one fixed order (8 lanes, then hsum8). */
static float exact_logit(const float *x, const float *w, int64_t h) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= h; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(w + j), acc);
  float sum = hsum8(acc);
  for (; j < h; j++) sum += x[j] * w[j];
  return sum;
}

/* |x - x^| for RowQuantize's two passes of x (h values; ``q`` h bytes and ``work`` h floats of scratch). */
static float quantization_error(const float *x, uint8_t *q, float *work, int64_t h) {
  float s;
  quantize_pass(x, q, h, &s);
  residual_row(x, q, s, work, h);
  quantize_pass(work, q, h, &s);
  residual_row(work, q, s, work, h);
  double sum = 0.0;
  for (int64_t j = 0; j < h; j++) sum += (double)work[j] * work[j];
  return (float)sqrt(sum);
}

typedef struct {
  float logit;
  int32_t id;
} Word;

/* Best first: the larger logit, then the smaller id; NaN logits last (by id), so that the order is total. */
static int word_order(const void *a, const void *b) {
  const Word *p = (const Word *)a, *q = (const Word *)b;
  const int p_nan = p->logit != p->logit, q_nan = q->logit != q->logit;
  if (p_nan != q_nan) return p_nan ? 1 : -1;
  if (!p_nan && p->logit != q->logit) return p->logit > q->logit ? -1 : 1;
  return (p->id > q->id) - (p->id < q->id);
}

/* Min-heap of the S largest lower bounds seen: heap[0] the smallest of them. A NaN lower bound counts as -inf (the
   word's NaN upper bound keeps it a candidate), so the heap's order always holds. */
static void heap_push(float *heap, int64_t *n, float value, int64_t cap) {
  if (value != value) value = -INFINITY;
  if (*n < cap) {
    int64_t i = (*n)++;
    while (i > 0 && heap[(i - 1) / 2] > value) {
      heap[i] = heap[(i - 1) / 2];
      i = (i - 1) / 2;
    }
    heap[i] = value;
    return;
  }
  if (!(value > heap[0])) return;
  int64_t i = 0;
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= cap) break;
    if (c + 1 < cap && heap[c + 1] < heap[c]) c++;
    if (!(heap[c] < value)) break;
    heap[i] = heap[c];
    i = c;
  }
  heap[i] = value;
}

/* Word w's error bound for a row of constants alpha = |x - x^| (+ slack) and beta = |x^| (+ slack); 8 at once alike. */
static inline float word_bound(const Screen *s, int64_t w, float alpha, float beta) {
  return alpha * s->norms[w] + beta * s->drift[w];
}

static inline __m256 bound8(const Screen *s, int64_t w, __m256 alpha, __m256 beta) {
  return _mm256_add_ps(_mm256_mul_ps(alpha, _mm256_loadu_ps(s->norms + w)),
                       _mm256_mul_ps(beta, _mm256_loadu_ps(s->drift + w)));
}

/* The S-th largest lower bound of a row's words (``heap``: S floats): 8 words at a time, a word to the heap only
   where it beats the heap's least. */
static float lower_floor(const Screen *s, const float *a, float alpha, float beta, float *heap) {
  const int64_t v = s->v, top = s->top_k;
  const __m256 al8 = _mm256_set1_ps(alpha), be8 = _mm256_set1_ps(beta);
  int64_t filled = 0, w = 0;
  for (; w < v && filled < top; w++) heap_push(heap, &filled, a[w] - word_bound(s, w, alpha, beta), top);
  for (; w + 8 <= v; w += 8) {
    __m256 lo = _mm256_sub_ps(_mm256_loadu_ps(a + w), bound8(s, w, al8, be8));
    int above = _mm256_movemask_ps(_mm256_cmp_ps(lo, _mm256_set1_ps(heap[0]), _CMP_NLE_UQ));  /* or NaN */
    for (; above; above &= above - 1) {
      int64_t u = w + __builtin_ctz(above);
      heap_push(heap, &filled, a[u] - word_bound(s, u, alpha, beta), top);
    }
  }
  for (; w < v; w++) heap_push(heap, &filled, a[w] - word_bound(s, w, alpha, beta), top);
  return heap[0];
}

/* The words whose upper bound is not below ``floor_`` (a NaN keeps the word), with their exact logits; their count. */
static int64_t kept_words(const Screen *s, const float *a, const float *x, float alpha, float beta, float floor_,
                          Word *words) {
  const int64_t v = s->v, h = s->h;
  const __m256 al8 = _mm256_set1_ps(alpha), be8 = _mm256_set1_ps(beta), f8 = _mm256_set1_ps(floor_);
  int64_t n = 0, w = 0;
  for (; w + 8 <= v; w += 8) {
    __m256 hi = _mm256_add_ps(_mm256_loadu_ps(a + w), bound8(s, w, al8, be8));
    for (int keep = _mm256_movemask_ps(_mm256_cmp_ps(hi, f8, _CMP_NLT_UQ)); keep; keep &= keep - 1) {
      int64_t u = w + __builtin_ctz(keep);
      words[n++] = (Word){exact_logit(x, s->weight + u * h, h), (int32_t)u};
    }
  }
  for (; w < v; w++)
    if (!(a[w] + word_bound(s, w, alpha, beta) < floor_))
      words[n++] = (Word){exact_logit(x, s->weight + w * h, h), (int32_t)w};
  return n;
}

/* Over v logits: the sums of exp(z) and of z exp(z), z = (logit - top_logit) / tau <= 0. */
static void softmax_sums(const float *logits, int64_t v, float top_logit, float tau, float *total, float *weighted) {
  const __m256 m8 = _mm256_set1_ps(top_logit), t8 = _mm256_set1_ps(tau);
  __m256 z8 = _mm256_setzero_ps(), ez8 = _mm256_setzero_ps();
  int64_t w = 0;
  for (; w + 8 <= v; w += 8) {
    __m256 z = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(logits + w), m8), t8), e = exp8(z);
    z8 = _mm256_add_ps(z8, e);
    ez8 = _mm256_add_ps(ez8, _mm256_mul_ps(e, z));
  }
  *total = hsum8(z8);
  *weighted = hsum8(ez8);
  for (; w < v; w++) {
    float z = (logits[w] - top_logit) / tau, e = expf(z);
    *total += e;
    *weighted += e * z;
  }
}

/* One row: candidates, their exact logits, the top S, then the distribution over every word. */
static int screen_row(const Screen *s, int64_t r, Word *words, float *logits, float *heap, uint8_t *q, float *work) {
  const int64_t v = s->v, h = s->h, top = s->top_k;
  const float *a = s->approx + r * v, *x = s->x + r * h;
  double xx = 0.0;
  for (int64_t j = 0; j < h; j++) xx += (double)x[j] * x[j];
  const float xn = (float)sqrt(xx), dx = quantization_error(x, q, work, h), slack = SLACK + SLACK_PER_VALUE * (float)h;
  const float alpha = dx + slack * xn, beta = xn + dx + slack * xn;  /* |x^| <= |x| + |x - x^| */
  const int64_t n = kept_words(s, a, x, alpha, beta, lower_floor(s, a, alpha, beta, heap), words);
  if (n < top) return 0;  /* cannot happen with finite bounds (the S words in the heap are kept); refused, not read */
  qsort(words, (size_t)n, sizeof(Word), word_order);
  memcpy(logits, a, sizeof(float) * (size_t)v);
  for (int64_t i = 0; i < n; i++) logits[words[i].id] = words[i].logit;
  const float tau = s->temperature[s->temperatures == 1 ? 0 : r], top_logit = words[0].logit;
  float total, weighted;
  softmax_sums(logits, v, top_logit, tau, &total, &weighted);
  for (int64_t i = 0; i < top; i++) {
    s->out_ids[r * top + i] = words[i].id;
    s->probs[r * top + i] = expf((words[i].logit - top_logit) / tau) / total;
  }
  s->entropy[r] = logf(total) - weighted / total;
  if (s->input_probs) {
    const int64_t *ids = s->ids + (r / s->per_batch) * s->t;
    for (int64_t j = 0; j < s->t; j++) {
      if (ids[j] < 0 || ids[j] >= v) return 0;
      s->input_probs[r * s->t + j] = expf((logits[ids[j]] - top_logit) / tau) / total;
    }
  }
  return 1;
}

/* A thread's scratch for its rows, kept between calls and freed when the thread ends: a row's arrays are a few hundred
   KB, and pages freshly mapped for them cost more to touch than the rest of the row's work. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct {
  size_t bytes;
  _Alignas(32) unsigned char data[];
} Scratch;

static void scratch_key_create(void) { (void)pthread_key_create(&scratch_key, free); }

static void *scratch_of(size_t bytes) {
  (void)pthread_once(&scratch_once, scratch_key_create);
  Scratch *s = pthread_getspecific(scratch_key);
  if (s && s->bytes >= bytes) return s->data;
  free(s);
  s = malloc(sizeof(Scratch) + bytes);
  if (s) s->bytes = bytes;
  (void)pthread_setspecific(scratch_key, s);
  return s ? s->data : NULL;
}

static inline size_t aligned32(size_t bytes) { return (bytes + 31) & ~(size_t)31; }

static void screen_rows(void *data, size_t index) {
  Screen *s = (Screen *)data;
  const size_t v = (size_t)s->v, h = (size_t)s->h, words_bytes = aligned32(sizeof(Word) * v);
  const size_t logits_bytes = aligned32(sizeof(float) * v), heap_bytes = aligned32(sizeof(float) * (size_t)s->top_k);
  const size_t work_bytes = aligned32(sizeof(float) * h);
  unsigned char *base = scratch_of(words_bytes + logits_bytes + heap_bytes + work_bytes + h);
  if (!base || !screen_row(s, (int64_t)index, (Word *)base, (float *)(base + words_bytes),
                           (float *)(base + words_bytes + logits_bytes),
                           base + words_bytes + logits_bytes + heap_bytes + work_bytes,
                           (float *)(base + words_bytes + logits_bytes + heap_bytes)))
    __atomic_store_n(&s->failed, 1, __ATOMIC_RELAXED);
}

static OrtStatus *screen_compute(void *kernel, OrtKernelContext *ctx) {
  const int64_t top = ((ScreenKernel *)kernel)->top_k;
  int64_t ad[MAX_RANK], xd[MAX_RANK], wd[MAX_RANK], bd[MAX_RANK], id[MAX_RANK] = {0}, td[MAX_RANK];
  size_t an = 0, xn = 0, wn = 0, bn = 0, idn = 0, tn = 0;
  void *a, *x, *w, *b, *ids = NULL, *t;
  OrtStatus *st;
  if ((st = any_input(ctx, SV_APPROX, ELEM_FLOAT, ad, &an, &a, "ScreenedVocab: approx")) ||
      (st = any_input(ctx, SV_X, ELEM_FLOAT, xd, &xn, &x, "ScreenedVocab: x")) ||
      (st = any_input(ctx, SV_WEIGHT, ELEM_FLOAT, wd, &wn, &w, "ScreenedVocab: weight")) ||
      (st = any_input(ctx, SV_BOUNDS, ELEM_FLOAT, bd, &bn, &b, "ScreenedVocab: bounds")) ||
      (st = any_input(ctx, SV_TEMPERATURE, ELEM_FLOAT, td, &tn, &t, "ScreenedVocab: temperature")))
    return st;
  const OrtValue *given = NULL;
  int elem = 0;
  if ((st = tensor_of(ctx, SV_IDS, &given, &elem, id, &idn))) return st;
  if (given && (st = any_input(ctx, SV_IDS, ELEM_INT64, id, &idn, &ids, "ScreenedVocab: input_ids"))) return st;
  const int64_t v = ad[an - 1], h = xd[xn - 1];
  int64_t rows = 1, temperatures = 1;
  for (size_t i = 0; i + 1 < an; i++) rows *= ad[i];
  for (size_t i = 0; i < tn; i++) temperatures *= td[i];
  int ok = an >= 2 && xn == an && wn == 2 && wd[0] == v && wd[1] == h && bn == 2 && bd[0] == 2 && bd[1] == v &&
           v >= top && (temperatures == 1 || temperatures == rows);
  for (size_t i = 0; ok && i + 1 < an; i++) ok = xd[i] == ad[i];
  if (!ok)
    return error("ScreenedVocab: approx must be [..., R, V] with V >= top_k, x [..., R, H], weight [V, H], bounds "
                 "[2, V], temperature one value or one per row");
  if (ids && (an != 3 || idn != 2 || id[0] != ad[0]))
    return error("ScreenedVocab: with input_ids [B, T], approx must be [B, R, V]");
  int64_t od[MAX_RANK];
  memcpy(od, ad, sizeof(int64_t) * an);
  od[an - 1] = top;
  void *out_ids, *probs, *input_probs = NULL, *entropy;
  if ((st = any_output(ctx, 0, od, an, &out_ids)) || (st = any_output(ctx, 1, od, an, &probs)) ||
      (st = any_output(ctx, 3, od, an - 1, &entropy)))
    return st;
  if (ids) {
    int64_t pd[3] = {ad[0], ad[1], id[1]};
    if ((st = any_output(ctx, 2, pd, 3, &input_probs))) return st;
  }
  Screen s = {(const float *)a, (const float *)x, (const float *)w, (const float *)b, (const float *)b + v,
              (const float *)t, (const int64_t *)ids, (int64_t *)out_ids, (float *)probs, (float *)input_probs,
              (float *)entropy, rows, an == 3 ? ad[1] : rows, v, h, ids ? id[1] : 0, top, temperatures, 0};
  if (rows > 1)
    st = parallel_for(ctx, screen_rows, (size_t)rows, &s);
  else if (rows == 1)
    screen_rows(&s, 0);
  if (!st && s.failed)
    st = error("ScreenedVocab: out of memory, an input id outside the vocabulary, or non-finite word bounds");
  return st;
}

static OrtStatus *create_screen(const OrtCustomOp *op, OrtApiTable table, const OrtKernelInfo *info, void **kernel) {
  (void)op; (void)table;
  ScreenKernel *k = calloc(1, sizeof(ScreenKernel));
  if (!k) return error("out of memory");
  OrtStatus *st = CALL(KernelInfoGetAttribute_int64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))(
      info, "top_k", &k->top_k);
  if (st || k->top_k < 1 || k->top_k > 4096) {
    if (st) CALL(ReleaseStatus, void (*)(OrtStatus *))(st);
    free(k);
    return error("ScreenedVocab: the attribute top_k must be given, 1 .. 4096");
  }
  *kernel = k;
  return NULL;
}

static const char *screen_name(const OrtCustomOp *op) { (void)op; return "ScreenedVocab"; }
static int screen_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == SV_IDS ? ELEM_INT64 : ELEM_FLOAT; }
static size_t screen_input_count(const OrtCustomOp *op) { (void)op; return 6; }
static int screen_output_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? ELEM_INT64 : ELEM_FLOAT; }
static size_t screen_output_count(const OrtCustomOp *op) { (void)op; return 4; }
static int screen_input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == SV_IDS; /* optional */ }
static int screen_output_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == 2; /* optional */ }
