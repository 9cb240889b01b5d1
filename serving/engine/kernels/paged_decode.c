/* Paged decode attention on the CPU: one query token per sequence attends over its context where it
 * lies in the block pool, without copying the context out first.
 *
 * Layout (one layer of the pool): block b, kind k (0 keys, 1 values), slot s, kv head g, dim d at
 *   cache[b * block_stride + k * kv_stride + s * slot_stride + g * head_dim + d].
 * Queries q (seqs, heads, head_dim) and out (seqs, heads, head_dim) are contiguous float32; the pool is
 * float32 or bfloat16. Per sequence: its context is first streamed into cache with plain loads
 * (`touch_context`; for every sequence after a thread's first, its lines were already requested by
 * prefetches spread over the previous sequence's first score pass), then per kv head two passes: the
 * scores of the heads that share the kv head (each key row loaded once for all of them), then the
 * softmax-weighted sum of the values with the accumulators in registers. A one-pass online softmax, a block at a time, was tried and measured
 * slower here. Sequences are split across `threads` POSIX threads; one thread runs inline.
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


/* Prefetches of the next sequence's context, spread over this sequence's first score pass, so its
 * streaming overlaps this one's arithmetic. */
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
            float x[4];                                                                                      \
            _mm_storeu_ps(x, _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(t->scale)));  \
            for (int i = 0; i < 4; i++) {                                                                    \
                w[(int64_t)(j + i) * ctx + p] = x[i];                                                        \
                if (x[i] > maxs[j + i]) maxs[j + i] = x[i];                                                  \
            }                                                                                                \
        }                                                                                                    \
        for (; j < group; j++) {                                                                             \
            const float *qj = q + (int64_t)j * D;                                                            \
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qj), k[0]);                                          \
            for (int c = 1; c < ND; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * c), k[c], acc);    \
            const float x = _mm512_reduce_add_ps(acc) * t->scale;                                           \
            w[(int64_t)j * ctx + p] = x;                                                                     \
            if (x > maxs[j]) maxs[j] = x;                                                                    \
        }                                                                                                    \
    }
#endif

/* w[j][p] = scale * q_j . k_p for the `group` heads sharing kv head g, and each head's maximum. A key
 * row is loaded once for all the heads that read it. */
static void query_scores(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict q, int g,
                         int group, float *restrict w, float *restrict maxs, Cursor *cur) {
    const int D = t->head_dim;
    const int64_t head = (int64_t)g * D;
    for (int j = 0; j < group; j++) maxs[j] = -FLT_MAX;
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

/* o[j] = inv[j] * sum_p w[j][p] * v_p for the `group` heads sharing kv head g. Vectorised, the
 * accumulators of up to 4 heads x 64 dims stay in registers over the whole context (a store and reload
 * of the output per value row cost more than the rest of the kernel together). */
static void weighted_values(const Task *t, const int64_t *blocks, int64_t ctx, const float *restrict w, int g,
                            int group, const float *restrict inv, float *restrict o) {
    const int D = t->head_dim;
    const int64_t head = (int64_t)g * D + t->kv_stride;
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

/* One work item is one sequence, all heads: a slot's keys (or values) for every kv head are one
 * contiguous run, so each block is read front to back once per pass. */
/* Read every block of a sequence's context for this layer (keys and values, one contiguous region per
 * block) with plain independent loads, front to back, before the passes that use it. The passes walk
 * rows in an order the hardware cannot run far ahead of (a reduction per row), so from DRAM they ran
 * 3x slower than from cache; this loop streams at memory speed and leaves the context in L2 for them.
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

static void *run_task(void *arg) {
    Task *t = (Task *)arg;
    const int D = t->head_dim, H = t->heads, group = t->heads / t->kv_heads;
    float *scores = NULL;
    int64_t capacity = 0;
    for (int s = t->first; s < t->last; s++) {
        const int64_t ctx = t->ctx[s];
        const int64_t *blocks = t->blocks + t->block_start[s];
        t->sink += touch_context(t, blocks, ctx);
        Cursor next = {0};
        const int have_next = s + 1 < t->last;
        if (have_next) {
            const size_t elem = t->bf16 ? 2 : 4;
            next.base = (const char *)t->cache;
            next.blocks = t->blocks + t->block_start[s + 1];
            next.nblocks = (t->ctx[s + 1] + t->block_size - 1) / t->block_size;
            next.stride = (size_t)t->block_stride * elem;
            next.region = (size_t)(t->kv_stride * 2) * elem;
            const int64_t lines = next.nblocks * (int64_t)(next.region / 64);
            next.per_step = (int)((lines + ctx - 1) / (ctx > 0 ? ctx : 1));
        }
        if (ctx * H > capacity) {
            free(scores);
            capacity = ctx * H;
            scores = (float *)malloc(sizeof(float) * (size_t)capacity);
            if (!scores) { t->status = 1; return NULL; }
        }
        const float *q = t->q + (int64_t)s * H * D;
        float maxs[MAX_HEADS];
        for (int g = 0; g < t->kv_heads; g++)
            query_scores(t, blocks, ctx, q + (int64_t)g * group * D, g, group, scores + (int64_t)g * group * ctx,
                         maxs + g * group, g == 0 && have_next ? &next : NULL);
        float inv[MAX_HEADS];
        for (int h = 0; h < H; h++) {
            float *sh = scores + (int64_t)h * ctx, m = maxs[h], sum = 0.f;
            for (int64_t p = 0; p < ctx; p++) {
                /* Exponents are clamped at -80: such weights are far under float precision next to the
                 * largest (1), and e^-80 is still a normal float, where an underflow to a denormal would
                 * make every later multiply by it slow. The clamp keeps the loop vectorisable. */
                sh[p] = expf(fmaxf(sh[p] - m, -80.f));
                sum += sh[p];
            }
            inv[h] = 1.f / sum;
        }
        float *o = t->out + (int64_t)s * H * D;
        for (int g = 0; g < t->kv_heads; g++)
            weighted_values(t, blocks, ctx, scores + (int64_t)g * group * ctx, g, group, inv + g * group,
                            o + (int64_t)g * group * D);
    }
    free(scores);
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
                          head_dim, heads, blocks, block_start, ctx, seqs, scale, out,
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
