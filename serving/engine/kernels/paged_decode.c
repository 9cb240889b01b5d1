/* Paged decode attention on the CPU: one query token per sequence attends over its context where it
 * lies in the block pool, without copying the context out first.
 *
 * Layout (one layer of the pool): block b, kind k (0 keys, 1 values), slot s, kv head g, dim d at
 *   cache[b * block_stride + k * kv_stride + s * slot_stride + g * head_dim + d].
 * Queries q (seqs, heads, head_dim) and out (seqs, heads, head_dim) are contiguous float32; the pool is
 * float32 or bfloat16.
 *
 * Work goes in units of a few hundred tokens of one sequence (`chunk_of`): small enough that a unit's
 * keys and values and the next unit's fit in L2 together. Per unit: its lines are loaded (`touch_context`;
 * after the first unit they were already requested by prefetches spread over the previous unit's
 * passes, so memory streams while the arithmetic runs), then per kv head two passes: the scores of the
 * heads that share the kv head (each key row loaded once for all of them), then the weighted sum of the
 * values with the accumulators in registers. A sequence of several units merges their partial outputs by
 * their maxima and sums (flash-decoding's split-K merge); one unit normalises directly. With whole
 * sequences as units a layer took 1.37-1.65x as long (measured: 4 to 32 sequences of 700-2,000 tokens):
 * prefetching the next one evicted the current one's values before their pass, so memory and
 * arithmetic took turns. A one-pass online softmax, a block at a time,
 * was also tried and measured slower. With a bfloat16 pool on AVX512-BF16 both passes run on bfloat16
 * dot products (SCORES_BF16, weighted_values_bf16): a layer at 16 sequences of 720 tokens went from
 * 0.64 to 0.55 ms, where converting every element to float32 had made the kernel compute-bound.
 * Sequences are split across `threads` POSIX threads; one thread runs inline.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *q;
    const void *cache;
    int bf16;
    int64_t block_stride, kv_stride, slot_stride;
    int block_size, kv_heads, head_dim, heads;
    const int64_t *blocks;      /* every sequence's blocks, packed */
    const int64_t *block_start; /* each sequence's first entry in blocks */
    const int64_t *ctx;         /* each sequence's context length */
    int seqs;
    float scale;
    float *out;
    uint16_t *wbuf; /* bfloat16 weights for weighted_values_bf16, wstride per head */
    int64_t wstride;
    int first, last; /* this task's sequences [first, last) */
    int status;
    float sink; /* keeps touch_context's loads */
} Task;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define MAX_HEADS 256

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load16(const Task *t, const void *base, int64_t off) {
    if (t->bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + off);
}
#define VEC_OK(t) ((t)->head_dim % 16 == 0)
#else
#define VEC_OK(t) 0
#endif

static inline float load1(const Task *t, int64_t off) {
    if (t->bf16) return bf16_to_f32(((const uint16_t *)t->cache)[off]);
    return ((const float *)t->cache)[off];
}

#if defined(__AVX512F__)
/* The four horizontal sums [sum a, sum b, sum c, sum d] with 13 shuffles and adds, where four separate
 * reductions take about 32: the score pass is reduction-bound at a head size of 64. */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const __m512 x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
}


#endif

#if defined(__AVX512F__)
/* Four heads' scores of key p from their accumulators (each a vector of partial sums): reduced, scaled,
 * stored as w[j + i][p] and kept in each head's running maximum. */
static inline void keep_scores4(const __m512 acc[4], float scale, float *w, float *maxs, int j, int64_t ctx,
                                int64_t p) {
    float x[4];
    _mm_storeu_ps(x, _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
    for (int i = 0; i < 4; i++) {
        w[(int64_t)(j + i) * ctx + p] = x[i];
        if (x[i] > maxs[j + i]) maxs[j + i] = x[i];
    }
}

static inline void keep_score1(__m512 acc, float scale, float *w, float *maxs, int j, int64_t ctx, int64_t p) {
    const float x = _mm512_reduce_add_ps(acc) * scale;
    w[(int64_t)j * ctx + p] = x;
    if (x > maxs[j]) maxs[j] = x;
}
#endif

/* Prefetches of the next work unit's lines (its blocks' keys and values, a line at a time), spread
 * over the current unit's passes, so its streaming overlaps this unit's arithmetic. */
typedef struct {
    const char *base;
    const int64_t *blocks;
    int64_t nblocks, b;
    size_t stride, region, off;
    int per_step;
} Cursor;

static inline void cursor_step(Cursor *c) {
    if (!c) return;
    for (int i = 0; i < c->per_step && c->b < c->nblocks; i++) {
        __builtin_prefetch(c->base + (size_t)c->blocks[c->b] * c->stride + c->off, 0, 2);
        c->off += 64;
        if (c->off >= c->region) { c->off = 0; c->b++; }
    }
}

/* What is left of the unit's prefetches, issued at once (the passes' rows ran out before the lines). */
static inline void cursor_step_all(Cursor *c) {
    for (; c->b < c->nblocks; c->b++, c->off = 0)
        for (; c->off < c->region; c->off += 64)
            __builtin_prefetch(c->base + (size_t)c->blocks[c->b] * c->stride + c->off, 0, 2);
}

#if defined(__AVX512F__)
#define SCORES_FIXED(ND)                                                                                     \
    for (int64_t p = 0; p < ctx; p++) {                                                                      \
        const int64_t row = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + \
                            head;                                                                            \
        cursor_step(cur);                                                                                    \
        __m512 k[ND];                                                                                        \
        for (int c = 0; c < ND; c++) k[c] = load16(t, t->cache, row + 16 * c);                             \
        int j = 0;                                                                                           \
        for (; j + 4 <= group; j += 4) {                                                                     \
            __m512 acc[4];                                                                                   \
            for (int i = 0; i < 4; i++) {                                                                    \
                const float *qj = q + (int64_t)(j + i) * D;                                                  \
                acc[i] = _mm512_mul_ps(_mm512_loadu_ps(qj), k[0]);                                          \
                for (int c = 1; c < ND; c++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * c), k[c], acc[i]); \
            }                                                                                                \
            keep_scores4(acc, t->scale, w, maxs, j, ctx, p);                                                \
        }                                                                                                    \
        for (; j < group; j++) {                                                                             \
            const float *qj = q + (int64_t)j * D;                                                            \
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qj), k[0]);                                          \
            for (int c = 1; c < ND; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * c), k[c], acc);    \
            keep_score1(acc, t->scale, w, maxs, j, ctx, p);                                                 \
        }                                                                                                    \
    }
#endif

#if defined(__AVX512BF16__)
/* A bfloat16 pool on AVX512-BF16: the dot products run on bfloat16 pairs (two multiply-adds per float
 * lane, float32 accumulation), so a key row is two loads and no conversion. The queries are rounded to
 * bfloat16 for it: exact for a bfloat16 model, whose queries are bfloat16 values. Groups of more than
 * BF16_GROUP heads per kv head take the float32 arithmetic. */
#define BF16_GROUP 16
#define SCORES_BF16(NC)                                                                                       \
    __m512bh qb[BF16_GROUP][NC];                                                                              \
    for (int j = 0; j < group; j++)                                                                           \
        for (int c = 0; c < NC; c++)                                                                          \
            qb[j][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + (int64_t)j * D + 32 * c + 16),                \
                                           _mm512_loadu_ps(q + (int64_t)j * D + 32 * c));                     \
    for (int64_t p = 0; p < ctx; p++) {                                                                       \
        const int64_t row = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + \
                            head;                                                                             \
        cursor_step(cur);                                                                                     \
        __m512bh k[NC];                                                                                       \
        for (int c = 0; c < NC; c++) k[c] = (__m512bh)_mm512_loadu_si512((const uint16_t *)t->cache + row + 32 * c); \
        int j = 0;                                                                                            \
        for (; j + 4 <= group; j += 4) {                                                                      \
            __m512 acc[4];                                                                                    \
            for (int i = 0; i < 4; i++) {                                                                     \
                acc[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[j + i][0], k[0]);                           \
                for (int c = 1; c < NC; c++) acc[i] = _mm512_dpbf16_ps(acc[i], qb[j + i][c], k[c]);          \
            }                                                                                                 \
            keep_scores4(acc, t->scale, w, maxs, j, ctx, p);                                                 \
        }                                                                                                     \
        for (; j < group; j++) {                                                                              \
            __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[j][0], k[0]);                               \
            for (int c = 1; c < NC; c++) acc = _mm512_dpbf16_ps(acc, qb[j][c], k[c]);                        \
            keep_score1(acc, t->scale, w, maxs, j, ctx, p);                                                 \
        }                                                                                                     \
    }
#endif

/* w[j][p] = scale * q_j . k_p for the `group` heads sharing kv head g, and each head's maximum. A key
 * row is loaded once for all the heads that read it. */
static void query_scores(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict q, int g,
                         int group, float *restrict w, float *restrict maxs, Cursor *cur) {
    const int D = t->head_dim;
    const int64_t head = (int64_t)g * D;
    for (int j = 0; j < group; j++) maxs[j] = -FLT_MAX;
#if defined(__AVX512BF16__)
    if (t->bf16 && group <= BF16_GROUP) {
        switch (D) {
        case 64: { SCORES_BF16(2) } return;
        case 128: { SCORES_BF16(4) } return;
        default: break;
        }
    }
#endif
#if defined(__AVX512F__)
    /* Head sizes with a fixed number of 16-float chunks, so the key row stays in registers. */
    switch (VEC_OK(t) ? D : 0) {
    case 64: SCORES_FIXED(4); return;
    case 128: SCORES_FIXED(8); return;
    default: break;
    }
#endif
    for (int64_t p = 0; p < ctx; p++) {
        const int64_t row = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + head;
        for (int j = 0; j < group; j++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += q[(int64_t)j * D + d] * load1(t, row + d);
            const float x = acc * t->scale;
            w[(int64_t)j * ctx + p] = x;
            if (x > maxs[j]) maxs[j] = x;
        }
    }
}

#if defined(__AVX512BF16__)
/* weighted_values on bfloat16 pairs of consecutive keys: each head's weights are rounded to bfloat16
 * once (in key order, so two neighbours are one 32-bit lane), two value rows are interleaved per dim
 * (unpacklo / unpackhi within 128-bit lanes: the accumulators hold the dims permuted, put back in
 * order at the store), and one dot-product instruction adds two keys' terms per lane. */
static void weighted_values_bf16(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict w,
                                 int64_t head, int group, const float *restrict inv, float *restrict o, Cursor *cur) {
    const int D = t->head_dim;
    const int64_t pairs = (ctx + 1) / 2;
    for (int j = 0; j < group; j++) {
        const float *wj = w + (int64_t)j * ctx;
        uint16_t *wbj = t->wbuf + (int64_t)j * t->wstride;
        int64_t p = 0;
        for (; p + 16 <= ctx; p += 16)
            _mm256_storeu_si256((__m256i *)(wbj + p), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(wj + p)));
        const __mmask16 rest = (__mmask16)((1u << (ctx - p)) - 1u);
        _mm256_storeu_si256((__m256i *)(wbj + p), (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(rest, wj + p)));
    }
    const uint16_t *base = (const uint16_t *)t->cache;
    for (int j0 = 0; j0 < group; j0 += 4) {
        const int nj = group - j0 < 4 ? group - j0 : 4;
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int nz = D - d0 < 64 ? 1 : 2; /* 32-dim halves of this pass */
            __m512 acc[4][4];
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
            for (int64_t k2 = 0; k2 < pairs; k2++) {
                const int64_t p = 2 * k2;
                const int64_t ra = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + head + d0;
                const int have_b = p + 1 < ctx;
                const int64_t rb = have_b ? blocks[(p + 1) / t->block_size] * t->block_stride +
                                                ((p + 1) % t->block_size) * t->slot_stride + head + d0
                                          : 0;
                cursor_step(cur);
                cursor_step(cur);
                __m512bh v[4];
                for (int z = 0; z < nz; z++) {
                    const __m512i a = _mm512_loadu_si512(base + ra + 32 * z);
                    const __m512i b = have_b ? _mm512_loadu_si512(base + rb + 32 * z) : _mm512_setzero_si512();
                    v[2 * z] = (__m512bh)_mm512_unpacklo_epi16(a, b);
                    v[2 * z + 1] = (__m512bh)_mm512_unpackhi_epi16(a, b);
                }
                for (int j = 0; j < 4; j++) {
                    if (j >= nj) break;
                    uint32_t pair;
                    memcpy(&pair, t->wbuf + (int64_t)(j0 + j) * t->wstride + p, sizeof pair); /* 0 past the context */
                    const __m512bh wp = (__m512bh)_mm512_set1_epi32((int32_t)pair);
                    for (int c = 0; c < 2 * nz; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], v[c], wp);
                }
            }
            for (int j = 0; j < nj; j++) {
                float *dst = o + (int64_t)(j0 + j) * D + d0;
                for (int z = 0; z < nz; z++) {
                    float lo[16], hi[16];
                    _mm512_storeu_ps(lo, _mm512_mul_ps(acc[j][2 * z], _mm512_set1_ps(inv[j0 + j])));
                    _mm512_storeu_ps(hi, _mm512_mul_ps(acc[j][2 * z + 1], _mm512_set1_ps(inv[j0 + j])));
                    /* Lane 4L + i of lo holds dim 8L + i of this half, of hi dim 8L + 4 + i. */
                    for (int l = 0; l < 4; l++)
                        for (int i = 0; i < 4; i++) {
                            dst[32 * z + 8 * l + i] = lo[4 * l + i];
                            dst[32 * z + 8 * l + 4 + i] = hi[4 * l + i];
                        }
                }
            }
        }
    }
}
#endif

/* o[j] = inv[j] * sum_p w[j][p] * v_p for the `group` heads sharing kv head g. Vectorised, the
 * accumulators of up to 4 heads x 64 dims stay in registers over the whole context (a store and reload
 * of the output per value row cost more than the rest of the kernel together). */
static void weighted_values(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict w, int g,
                            int group, const float *restrict inv, float *restrict o, Cursor *cur) {
    const int D = t->head_dim;
    const int64_t head = (int64_t)g * D + t->kv_stride;
#if defined(__AVX512BF16__)
    if (t->bf16 && D % 32 == 0 && ctx + 16 <= t->wstride) {
        weighted_values_bf16(t, blocks, ctx, w, head, group, inv, o, cur);
        return;
    }
#endif
#if defined(__AVX512F__)
    if (VEC_OK(t)) {
        for (int j0 = 0; j0 < group; j0 += 4) {
            const int nj = group - j0 < 4 ? group - j0 : 4;
            for (int d0 = 0; d0 < D; d0 += 64) {
                const int nd = (D - d0 < 64 ? D - d0 : 64) / 16;
                __m512 acc[4][4];
                for (int j = 0; j < 4; j++)
                    for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
                for (int64_t p = 0; p < ctx; p++) {
                    const int64_t row = blocks[p / t->block_size] * t->block_stride +
                                        (p % t->block_size) * t->slot_stride + head + d0;
                    cursor_step(cur);
                    __m512 v[4];
                    for (int c = 0; c < 4; c++) v[c] = c < nd ? load16(t, t->cache, row + 16 * c) : _mm512_setzero_ps();
                    for (int j = 0; j < 4; j++) {
                        if (j >= nj) break;
                        const __m512 wj = _mm512_set1_ps(w[(int64_t)(j0 + j) * ctx + p]);
                        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(wj, v[c], acc[j][c]);
                    }
                }
                for (int j = 0; j < nj; j++) {
                    const __m512 scale = _mm512_set1_ps(inv[j0 + j]);
                    for (int c = 0; c < nd; c++)
                        _mm512_storeu_ps(o + (int64_t)(j0 + j) * D + d0 + 16 * c, _mm512_mul_ps(acc[j][c], scale));
                }
            }
        }
        return;
    }
#endif
    memset(o, 0, sizeof(float) * (size_t)group * (size_t)D);
    for (int64_t p = 0; p < ctx; p++) {
        const int64_t row = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + head;
        for (int j = 0; j < group; j++) {
            const float wj = w[(int64_t)j * ctx + p];
            for (int d = 0; d < D; d++) o[(int64_t)j * D + d] += wj * load1(t, row + d);
        }
    }
    for (int j = 0; j < group; j++)
        for (int d = 0; d < D; d++) o[(int64_t)j * D + d] *= inv[j];
}

/* Read every block of a unit's context for this layer (keys and values, one contiguous region per
 * block) with plain independent loads, front to back, before the passes that use it. The passes walk
 * rows in an order the hardware cannot run far ahead of (a reduction per row), so from DRAM they ran
 * 3x slower than from cache; this loop streams at memory speed and leaves the unit in L2 for them.
 * The returned sum is only there so the loads are not optimised away. */
static float touch_context(const Task *t, const int64_t *blocks, int64_t ctx) {
    const size_t elem = t->bf16 ? 2 : 4;
    const int64_t nblocks = (ctx + t->block_size - 1) / t->block_size;
    const size_t bytes = (size_t)(t->kv_stride * 2) * elem; /* keys then values of one block */
    uint64_t acc = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const uint64_t *p = (const uint64_t *)((const char *)t->cache + (size_t)(blocks[b] * t->block_stride) * elem);
        for (size_t i = 0; i < bytes / 8; i += 8) acc += p[i];
    }
    return (float)(acc & 1);
}

/* Tokens per work unit: a unit's keys and values (a quarter megabyte at float32 with two kv heads of
 * 64) fit in L2 next to the following unit's, whose lines are prefetched while this one computes. A
 * whole sequence of several hundred tokens did not: prefetching the next one evicted the current one's
 * values before their pass, and memory and arithmetic took turns. */
#define CHUNK_TOKENS 256

static void set_cursor(const Task *t, Cursor *c, const int64_t *blocks, int64_t tokens, int64_t visits) {
    const size_t elem = t->bf16 ? 2 : 4;
    *c = (Cursor){0};
    c->base = (const char *)t->cache;
    c->blocks = blocks;
    c->nblocks = (tokens + t->block_size - 1) / t->block_size;
    c->stride = (size_t)t->block_stride * elem;
    c->region = (size_t)(t->kv_stride * 2) * elem;
    const int64_t lines = c->nblocks * (int64_t)(c->region / 64);
    c->per_step = (int)((lines + visits - 1) / (visits > 0 ? visits : 1));
}

/* A context's chunk length: equal block-aligned chunks of at most about CHUNK_TOKENS (a short last
 * chunk would pay a pass's fixed costs for little work). */
static int64_t chunk_of(const Task *t, int64_t ctx) {
    const int64_t bs = t->block_size;
    const int64_t nb = (ctx + bs - 1) / bs;
    const int64_t parts = (ctx + CHUNK_TOKENS - 1) / CHUNK_TOKENS;
    const int64_t per = parts > 0 ? (nb + parts - 1) / parts : 1;
    return (per > 0 ? per : 1) * bs;
}

static void *run_task(void *arg) {
    Task *t = (Task *)arg;
    const int D = t->head_dim, H = t->heads, group = t->heads / t->kv_heads;
    const int64_t most = CHUNK_TOKENS + t->block_size; /* chunk_of never exceeds this */
    float *scores = (float *)malloc(sizeof(float) * (size_t)(most * H));
    float *part = (float *)malloc(sizeof(float) * (size_t)(H * D)); /* one chunk's unnormalised output */
    /* Rows of 16-aligned length past the longest unit, for the bfloat16 weights (their stores are 16 wide). */
    t->wstride = (most + 31) / 16 * 16;
    t->wbuf = t->bf16 ? (uint16_t *)calloc((size_t)(t->wstride * H), sizeof(uint16_t)) : NULL;
    if (!scores || !part || (t->bf16 && !t->wbuf)) {
        free(scores); free(part); free(t->wbuf); t->status = 1; return NULL;
    }
    int touched = 0; /* the current unit's lines were prefetched by the previous unit */
    for (int s = t->first; s < t->last; s++) {
        const int64_t ctx = t->ctx[s];
        const int64_t *blocks = t->blocks + t->block_start[s];
        const float *q = t->q + (int64_t)s * H * D;
        float *o = t->out + (int64_t)s * H * D;
        float m_run[MAX_HEADS], l_run[MAX_HEADS];
        const int64_t chunk = chunk_of(t, ctx), chunk_blocks = chunk / t->block_size;
        const int64_t nchunks = ctx > 0 ? (ctx + chunk - 1) / chunk : 0;
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t *cb = blocks + c * chunk_blocks;
            const int64_t n = ctx - c * chunk < chunk ? ctx - c * chunk : chunk;
            if (!touched) t->sink += touch_context(t, cb, n);
            Cursor next;
            int have_next = 1;
            if (c + 1 < nchunks) {
                const int64_t rest = ctx - (c + 1) * chunk;
                set_cursor(t, &next, cb + chunk_blocks, rest < chunk ? rest : chunk, n * 2 * t->kv_heads);
            } else if (s + 1 < t->last && t->ctx[s + 1] > 0) {
                const int64_t next_chunk = chunk_of(t, t->ctx[s + 1]);
                const int64_t first = t->ctx[s + 1] < next_chunk ? t->ctx[s + 1] : next_chunk;
                set_cursor(t, &next, t->blocks + t->block_start[s + 1], first, n * 2 * t->kv_heads);
            } else {
                have_next = 0;
            }
            float maxs[MAX_HEADS], inv[MAX_HEADS];
            for (int g = 0; g < t->kv_heads; g++)
                query_scores(t, cb, n, q + (int64_t)g * group * D, g, group, scores + (int64_t)g * group * n,
                             maxs + g * group, have_next ? &next : NULL);
            float sums[MAX_HEADS];
            for (int h = 0; h < H; h++) {
                float *sh = scores + (int64_t)h * n, m = maxs[h], sum = 0.f;
                for (int64_t p = 0; p < n; p++) {
                    /* Exponents are clamped at -80: such weights are far under float precision next to
                     * the largest (1), and e^-80 is still a normal float, where an underflow to a
                     * denormal would make every later multiply by it slow. The clamp keeps the loop
                     * vectorisable. */
                    sh[p] = expf(fmaxf(sh[p] - m, -80.f));
                    sum += sh[p];
                }
                sums[h] = sum;
                inv[h] = nchunks == 1 ? 1.f / sum : 1.f;
            }
            float *dst = nchunks == 1 ? o : part;
            for (int g = 0; g < t->kv_heads; g++)
                weighted_values(t, cb, n, scores + (int64_t)g * group * n, g, group, inv + g * group,
                                dst + (int64_t)g * group * D, have_next ? &next : NULL);
            if (have_next) cursor_step_all(&next);
            touched = have_next;
            if (nchunks == 1) continue;
            /* Merge this chunk into the running output (flash-decoding's split-K merge). */
            for (int h = 0; h < H; h++) {
                float *oh = o + (int64_t)h * D;
                const float *ph = part + (int64_t)h * D;
                if (c == 0) {
                    m_run[h] = maxs[h];
                    l_run[h] = sums[h];
                    for (int d = 0; d < D; d++) oh[d] = ph[d];
                    continue;
                }
                const float m = maxs[h] > m_run[h] ? maxs[h] : m_run[h];
                const float a = expf(m_run[h] - m), b = expf(maxs[h] - m);
                for (int d = 0; d < D; d++) oh[d] = oh[d] * a + ph[d] * b;
                l_run[h] = l_run[h] * a + sums[h] * b;
                m_run[h] = m;
            }
            if (c + 1 == nchunks)
                for (int h = 0; h < H; h++) {
                    const float r = 1.f / l_run[h];
                    for (int d = 0; d < D; d++) o[(int64_t)h * D + d] *= r;
                }
        }
        if (ctx == 0) for (int64_t i = 0; i < (int64_t)H * D; i++) o[i] = 0.f;
    }
    free(scores);
    free(part);
    free(t->wbuf);
    return NULL;
}

/* Returns 0 on success, 1 when out of memory or arguments are out of range, 2 when a thread failed to
 * start (the caller then falls back to its portable path). */
int epd_paged_decode(const float *q, const void *cache, int bf16, int64_t block_stride, int64_t kv_stride,
                     int64_t slot_stride, int block_size, int kv_heads, int head_dim, int heads,
                     const int64_t *blocks, const int64_t *block_start, const int64_t *ctx, int seqs,
                     float scale, float *out, int threads) {
    if (heads > MAX_HEADS || kv_heads <= 0 || heads % kv_heads) return 1;
    const int items = seqs;
    if (threads < 1) threads = 1;
    if (threads > items) threads = items;
    if (threads > 64) threads = 64;
    Task tasks[64];
    for (int i = 0; i < threads; i++) {
        tasks[i] = (Task){q, cache, bf16, block_stride, kv_stride, slot_stride, block_size, kv_heads,
                          head_dim, heads, blocks, block_start, ctx, seqs, scale, out, NULL, 0,
                          (int)((int64_t)items * i / threads), (int)((int64_t)items * (i + 1) / threads), 0};
    }
    if (threads <= 1) {
        if (items) run_task(&tasks[0]);
        return tasks[0].status;
    }
    pthread_t ids[64];
    int started = 0, status = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, run_task, &tasks[i]) != 0) { status = 2; break; }
        started = i;
    }
    run_task(&tasks[0]);
    for (int i = 1; i <= started; i++) pthread_join(ids[i], NULL);
    if (status) return status;
    for (int i = 0; i < threads; i++) if (tasks[i].status) return tasks[i].status;
    return 0;
}
