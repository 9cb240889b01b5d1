/* Linear layers for a few rows (decode steps): y[m][n] = sum_k x[m][k] w[n][k] (+ b[n]).
 *
 * With one to a few rows, a linear is a pass over its weights: each weight is read once and used by
 * every row, so the time is the weights' bytes over the memory bandwidth. The weights are packed once,
 * at load, into groups of 64 output columns, k-major: group g holds w[64g + c][k] at [g][k][c]
 * (float32), or at [g][k / 2][c][k % 2] (bfloat16: the pairs vdpbf16ps multiplies), zeros past N
 * (and past K). A whole linear is then one sequential stream, which the hardware prefetcher follows
 * with no help; each step of k loads four 16-column vectors and multiplies each by every row's x[m][k],
 * broadcast, into 4 x rows accumulators. Rows go up to six at a time (24 accumulators of the 32
 * registers); a group's weights are read from memory by the first rows and from L2 by the rest.
 *
 * Sums run in float32 in the order of k (bfloat16: pairs of k); the result is rounded once to the
 * output type, as oneDNN's bfloat16 matmul rounds its float32 sums.
 *
 * Built for AVX-512 (float32) and AVX512-BF16 (bfloat16); elsewhere `epd_small_linear_supports` says
 * no and the caller keeps its oneDNN matmul.
 *
 * With several threads the groups are split in contiguous runs, one stream per thread, through OpenMP
 * when built with it: torch's own OpenMP runtime (libgomp, already loaded) and its waiting team, so a
 * call costs microseconds where starting threads would cost tens of them, which is the whole call.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_F32 1
#if defined(__AVX512BF16__)
#define HAVE_BF16 1
#endif
#endif

/* Whether this build runs float32 (bf16 = 0) or bfloat16 (bf16 = 1) linears. */
int epd_small_linear_supports(int bf16) {
#if defined(HAVE_BF16)
  (void)bf16;
  return 1;
#elif defined(HAVE_F32)
  return !bf16;
#else
  (void)bf16;
  return 0;
#endif
}

/* Whether this build splits a call across threads (built with OpenMP). */
int epd_small_linear_parallel(void) {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}

#if defined(HAVE_F32)

#define GROUP 64
#define ROWS 6

typedef uint16_t bf16_t;

static inline __m512 bias_f32(const void *bias, int bf16, int64_t n, __mmask16 mask) {
  if (bias == 0)
    return _mm512_setzero_ps();
  if (!bf16)
    return _mm512_maskz_loadu_ps(mask, (const float *)bias + n);
  __m256i raw = _mm256_maskz_loadu_epi16(mask, (const bf16_t *)bias + n);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* The output columns [n, n + 16) of this group that exist (N need not be a multiple of 16). */
static inline __mmask16 columns(int64_t n, int64_t N) {
  int64_t left = N - n;
  if (left >= 16)
    return 0xFFFF;
  return left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

static inline void store(void *y, int bf16, int64_t at, __m512 v, __mmask16 mask) {
#if defined(HAVE_BF16)
  if (bf16) {
    _mm256_mask_storeu_epi16((bf16_t *)y + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
#endif
  _mm512_mask_storeu_ps((float *)y + at, mask, v);
}

static inline __attribute__((always_inline)) void finish(__m512 acc[ROWS][4], int rows, void *y,
                                                         int64_t ldy, int bf16, const void *bias,
                                                         int64_t n0, int64_t N) {
  for (int j = 0; j < 4; j++) {
    int64_t n = n0 + 16 * j;
    __mmask16 mask = columns(n, N);
    if (mask == 0)
      break;
    __m512 b = bias_f32(bias, bf16, n, mask);
    for (int m = 0; m < rows; m++)
      store(y, bf16, m * ldy + n, _mm512_add_ps(acc[m][j], b), mask);
  }
}

/* One group of 64 columns for `rows` (1-6, a constant once inlined) rows of float32 x. */
static inline __attribute__((always_inline)) void group_f32(const float *x, int64_t ldx,
                                                            const float *w, int64_t K, int rows,
                                                            __m512 acc[ROWS][4]) {
  for (int m = 0; m < rows; m++)
    for (int j = 0; j < 4; j++)
      acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const float *wk = w + k * GROUP;
    __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
    __m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
    for (int m = 0; m < rows; m++) {
      __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xb, w3, acc[m][3]);
    }
  }
}

#if defined(HAVE_BF16)
/* The pair (x[k], x[k + 1]) of one bfloat16 row as vdpbf16ps takes it, broadcast; `last` when k + 1
 * is past the row (odd K), whose missing half is zero rather than whatever follows the row. */
static inline __m512i pair(const bf16_t *row, int64_t k, int last) {
  uint32_t bits = row[k];
  if (!last) /* memcpy: a row may start at any element, so the pair need not be 4-byte aligned */
    memcpy(&bits, row + k, sizeof bits);
  return _mm512_set1_epi32((int)bits);
}

static inline __attribute__((always_inline)) void group_bf16(const bf16_t *x, int64_t ldx,
                                                             const bf16_t *w, int64_t K, int rows,
                                                             __m512 acc[ROWS][4]) {
  for (int m = 0; m < rows; m++)
    for (int j = 0; j < 4; j++)
      acc[m][j] = _mm512_setzero_ps();
  int64_t pairs = (K + 1) / 2;
  for (int64_t kk = 0; kk < pairs; kk++) {
    const bf16_t *wk = w + kk * 2 * GROUP;
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64), w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
    int last = 2 * kk + 1 >= K;
    for (int m = 0; m < rows; m++) {
      __m512bh xb = (__m512bh)pair(x + m * ldx, 2 * kk, last);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
    }
  }
}
#endif

#define FOR_ROWS(CALL)                                                                             \
  switch (rows) {                                                                                  \
  case 1: CALL(1); break;                                                                          \
  case 2: CALL(2); break;                                                                          \
  case 3: CALL(3); break;                                                                          \
  case 4: CALL(4); break;                                                                          \
  case 5: CALL(5); break;                                                                          \
  default: CALL(6); break;                                                                         \
  }

/* x: M rows of K (row stride ldx elements); w: packed as above for N columns; bias: N values or
 * NULL; y: M rows of N (row stride ldy). float32 throughout, or bfloat16 throughout when bf16.
 * threads: how many to split the groups across (1 where the build has no OpenMP). */
void epd_small_linear(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t ldy,
                      int64_t M, int64_t K, int64_t N, int bf16, int threads) {
  int64_t groups = (N + GROUP - 1) / GROUP;
  int64_t group_size = bf16 ? ((K + 1) / 2) * 2 * GROUP : K * GROUP;
  /* Measured: bfloat16 ran 4-7 % slower six rows at a time than four from 256 rows (float32 the
   * other way round), and faster at six rows. */
  int64_t block = bf16 && M > ROWS ? 4 : ROWS;
  if (threads > groups)
    threads = (int)groups;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads > 1 ? threads : 1) if (threads > 1)
#endif
  for (int64_t g = 0; g < groups; g++) {
    __m512 acc[ROWS][4];
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      int rows = M - m0 < block ? (int)(M - m0) : (int)block;
      if (!bf16) {
        const float *xm = (const float *)x + m0 * ldx, *wg = (const float *)w + g * group_size;
#define F32(R) group_f32(xm, ldx, wg, K, R, acc)
        FOR_ROWS(F32)
      } else {
#if defined(HAVE_BF16)
        const bf16_t *xm = (const bf16_t *)x + m0 * ldx, *wg = (const bf16_t *)w + g * group_size;
#define BF16(R) group_bf16(xm, ldx, wg, K, R, acc)
        FOR_ROWS(BF16)
#endif
      }
      int64_t out = m0 * ldy;
      finish(acc, rows, bf16 ? (void *)((bf16_t *)y + out) : (void *)((float *)y + out), ldy, bf16,
             bias, g * GROUP, N);
    }
  }
}
#endif
