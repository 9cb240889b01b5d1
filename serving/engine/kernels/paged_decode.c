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
 * heads that share the kv head (a few keys at a time for all of them, in tiles of 16 dot products
 * reduced together), then the weighted sum of the values with the accumulators in registers. A sequence of several units merges their partial outputs by
 * their maxima and sums (flash-decoding's split-K merge); one unit normalises directly. With whole
 * sequences as units a layer took 1.37-1.65x as long (measured: 4 to 32 sequences of 700-2,000 tokens):
 * prefetching the next one evicted the current one's values before their pass, so memory and
 * arithmetic took turns. A one-pass online softmax, a block at a time,
 * was also tried and measured slower. With a bfloat16 pool on AVX512-BF16 both passes run on bfloat16
 * dot products (tile_dots_bf16, weighted_values_bf16): a layer at 16 sequences of 720 tokens went from
 * 0.64 to 0.55 ms, where converting every element to float32 had made the kernel compute-bound. Score
 * tiles and a prefetch cursor with no test per line then took that layer from 0.77 to 0.64 ms in
 * float32 and from 0.55 to 0.42 ms in bfloat16.
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

/* Prefetches of the next work unit's lines (its blocks' keys and values, a line at a time), spread
 * over the current unit's passes, so its streaming overlaps this unit's arithmetic. */
typedef struct {
    const char *base;
    const int64_t *blocks;
    int64_t nblocks, b;
    size_t stride, region;   /* region: bytes of a block's lines, a whole number of lines */
    const char *line, *end;  /* the next line to request, and the end of its block's region */
    int per_step;            /* lines per step; divides a region's lines, so a step never crosses one */
} Cursor;

/* A step requests a few consecutive lines with no test per line: with a test and an address computed
 * per line, the cursor took a third of the score pass's time. */
static inline void cursor_step(Cursor *c) {
    if (!c || c->b >= c->nblocks) return;
    for (int i = 0; i < c->per_step; i++) __builtin_prefetch(c->line + 64 * i, 0, 2);
    c->line += (size_t)64 * c->per_step;
    if (c->line >= c->end && ++c->b < c->nblocks) {
        c->line = c->base + (size_t)c->blocks[c->b] * c->stride;
        c->end = c->line + c->region;
    }
}

/* What is left of the unit's prefetches, issued at once (the passes' rows ran out before the lines). */
static inline void cursor_step_all(Cursor *c) {
    while (c->b < c->nblocks) {
        for (const char *p = c->line; p < c->end; p += 64) __builtin_prefetch(p, 0, 2);
        if (++c->b < c->nblocks) {
            c->line = c->base + (size_t)c->blocks[c->b] * c->stride;
            c->end = c->line + c->region;
        }
    }
}

#if defined(__AVX512F__)
/* Lane m of the result is the sum of a[m]'s lanes: unpack-and-add within 128-bit lanes twice, then
 * two rounds of 128-bit shuffles and adds; 45 operations for 16 sums. */
static inline __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int m = 0; m < 8; m++) /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = a[2m], y = a[2m+1] */
        b[m] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * m], a[2 * m + 1]), _mm512_unpackhi_ps(a[2 * m], a[2 * m + 1]));
    for (int m = 0; m < 4; m++) { /* per 128-bit lane: the lane's sums of a[4m] .. a[4m+3] */
        const __m512d x = _mm512_castps_pd(b[2 * m]), y = _mm512_castps_pd(b[2 * m + 1]);
        c[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* A tile's scores: lane j * KP + i of s is head j's score of key p0 + i. Each head's KP scores go to
 * w[j][p0 ..] in one masked store, and into that head's lanes of the running maxima. */
static inline void keep_tile(__m512 s, float *w, int64_t ctx, int64_t p0, __m512 *mx, const int G, const int KP) {
    for (int j = 0; j < G; j++)
        _mm512_mask_storeu_ps(w + (int64_t)j * ctx + p0 - j * KP, (__mmask16)(((1u << KP) - 1u) << (j * KP)), s);
    *mx = _mm512_max_ps(*mx, s);
}

/* Each head's maximum from the running maxima of its lanes; a tail of fewer than KP keys is scored
 * one key at a time by the caller's scalar loop. */
static inline void tile_maxima(__m512 mx, float *maxs, const int G, const int KP) {
    float x[16];
    _mm512_storeu_ps(x, mx);
    for (int j = 0; j < G; j++)
        for (int i = 0; i < KP; i++)
            if (x[j * KP + i] > maxs[j]) maxs[j] = x[j * KP + i];
}

/* The rows of keys p0 .. p0 + KP - 1 of kv head offset `head`, one cursor step each. */
static inline void tile_rows(const Task *t, const int64_t *blocks, int64_t p0, int64_t head, Cursor *cur,
                             int64_t rows[16], const int KP) {
    for (int i = 0; i < KP; i++) {
        const int64_t p = p0 + i;
        rows[i] = blocks[p / t->block_size] * t->block_stride + (p % t->block_size) * t->slot_stride + head;
        cursor_step(cur);
    }
}

/* One tile's 16 (head, key) dot products, head j and key i in acc[j * KP + i], in float32. */
static inline __attribute__((always_inline)) void tile_dots_f32(const Task *t, const int64_t *rows,
                                                                const float *restrict q, __m512 acc[16],
                                                                const int G, const int KP) {
    for (int c = 0; c < t->head_dim / 16; c++) {
        __m512 k[16];
        for (int i = 0; i < KP; i++) k[i] = load16(t, t->cache, rows[i] + 16 * c);
        for (int j = 0; j < G; j++) {
            const __m512 qj = _mm512_loadu_ps(q + (int64_t)j * t->head_dim + 16 * c);
            for (int i = 0; i < KP; i++) acc[j * KP + i] = _mm512_fmadd_ps(qj, k[i], acc[j * KP + i]);
        }
    }
}

#if defined(__AVX512BF16__)
/* The same on a bfloat16 pool with AVX512-BF16: bfloat16 pairs (two multiply-adds per float lane,
 * float32 accumulation), so a key row is loaded with no conversion; qb holds the queries rounded to
 * bfloat16, exact for a bfloat16 model, whose queries are bfloat16 values. */
static inline __attribute__((always_inline)) void tile_dots_bf16(const Task *t, const int64_t *rows,
                                                                 const __m512bh qb[8][4], __m512 acc[16],
                                                                 const int G, const int KP) {
    for (int c = 0; c < t->head_dim / 32; c++) {
        __m512bh k[16];
        for (int i = 0; i < KP; i++) k[i] = (__m512bh)_mm512_loadu_si512((const uint16_t *)t->cache + rows[i] + 32 * c);
        for (int j = 0; j < G; j++)
            for (int i = 0; i < KP; i++) acc[j * KP + i] = _mm512_dpbf16_ps(acc[j * KP + i], qb[j][c], k[i]);
    }
}
#endif

/* Scores of G heads (G <= 8) sharing a kv head, KP = 16 / G keys at a time: the 16 (head, key) dot
 * products accumulate in 16 registers and are reduced together (reduce16), about 3 operations a score.
 * One key at a time, reducing each head's dot product took 13 operations for 4 heads, plus a scalar
 * store and compare per score, and the score pass took 1.6-2.1 times as long as the value pass. BF: the
 * bfloat16 dot products (a bfloat16 pool, head_dim a multiple of 32 up to 128). Returns the keys
 * scored: a multiple of KP. */
static inline __attribute__((always_inline)) int64_t scores_tiles(const Task *t, const int64_t *blocks,
                                                                  int64_t ctx, const float *restrict q,
                                                                  int64_t head, float *restrict w,
                                                                  float *restrict maxs, Cursor *cur,
                                                                  const int G, const int BF) {
    const int KP = 16 / G;
    const __m512 scale = _mm512_set1_ps(t->scale);
#if defined(__AVX512BF16__)
    __m512bh qb[8][4]; /* G heads x head_dim / 32 pairs of 16 */
    if (BF)
        for (int j = 0; j < G; j++)
            for (int c = 0; c < t->head_dim / 32; c++)
                qb[j][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + (int64_t)j * t->head_dim + 32 * c + 16),
                                               _mm512_loadu_ps(q + (int64_t)j * t->head_dim + 32 * c));
#endif
    __m512 mx = _mm512_set1_ps(-FLT_MAX);
    int64_t p0 = 0;
    for (; p0 + KP <= ctx; p0 += KP) {
        int64_t rows[16];
        tile_rows(t, blocks, p0, head, cur, rows, KP);
        __m512 acc[16];
        for (int m = 0; m < 16; m++) acc[m] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
        if (BF) tile_dots_bf16(t, rows, (const __m512bh(*)[4])qb, acc, G, KP);
        else
#endif
            tile_dots_f32(t, rows, q, acc, G, KP);
        keep_tile(_mm512_mul_ps(reduce16(acc), scale), w, ctx, p0, &mx, G, KP);
    }
    tile_maxima(mx, maxs, G, KP);
    return p0;
}
#endif

/* The scores of G <= 8 heads by tiles, keys [0, returned) of them; the rest is the caller's. */
static int64_t scores_part(const Task *t, const int64_t *blocks, int64_t ctx, const float *q, int64_t head,
                           float *w, float *maxs, Cursor *cur, int G) {
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
    const int bf = t->bf16 && t->head_dim % 32 == 0 && t->head_dim <= 128;
#else
    const int bf = 0; /* a bfloat16 pool takes the float32 dot products, its rows converted */
#endif
#define TILES(G) \
    case G: return bf ? scores_tiles(t, blocks, ctx, q, head, w, maxs, cur, G, 1) \
                      : scores_tiles(t, blocks, ctx, q, head, w, maxs, cur, G, 0);
    if (VEC_OK(t)) {
        switch (G) {
        TILES(1) TILES(2) TILES(3) TILES(4) TILES(5) TILES(6) TILES(7) TILES(8)
        default: return 0;
        }
    }
#undef TILES
#endif
    (void)t; (void)blocks; (void)ctx; (void)q; (void)head; (void)w; (void)maxs; (void)cur; (void)G;
    return 0;
}

/* w[j][p] = scale * q_j . k_p for the `group` heads sharing kv head g, and each head's maximum. A key
 * row is loaded once for up to 8 heads that read it: a larger group goes in equal parts of at most 8,
 * each reading the rows again (from cache). Keys past the last whole tile, and every key where the
 * tiles cannot run, are scored one at a time. */
static void query_scores(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict q, int g,
                         int group, float *restrict w, float *restrict maxs, Cursor *cur) {
    const int D = t->head_dim;
    const int64_t head = (int64_t)g * D;
    for (int j = 0; j < group; j++) maxs[j] = -FLT_MAX;
    int parts = 1;
    while (group % parts || group / parts > 8) parts++;
    const int G = group / parts;
    int64_t done = 0;
    for (int part = 0; part < parts; part++)
        done = scores_part(t, blocks, ctx, q + (int64_t)part * G * D, head, w + (int64_t)part * G * ctx,
                           maxs + part * G, part == 0 ? cur : NULL, G);
    for (int64_t p = done; p < ctx; p++) {
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
    const int64_t region_lines = (int64_t)(((size_t)(t->kv_stride * 2) * elem + 63) / 64);
    c->region = (size_t)region_lines * 64;
    const int64_t lines = c->nblocks * region_lines;
    int64_t per = (lines + visits - 1) / (visits > 0 ? visits : 1);
    if (per < 1) per = 1;
    while (region_lines % per) per++;
    c->per_step = (int)per;
    if (c->nblocks > 0) {
        c->line = c->base + (size_t)blocks[0] * c->stride;
        c->end = c->line + c->region;
    }
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
