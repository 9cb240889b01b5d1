/* Paged causal attention for prompt tokens on the CPU: each sequence's new tokens (a whole prompt or a
 * chunk after cached ones) attend over its context where it lies in the block pool.
 *
 * Layout as in paged_decode.c: block b, kind k (0 keys, 1 values), slot s, kv head g, dim d at
 *   cache[b * block_stride + k * kv_stride + s * slot_stride + g * head_dim + d].
 * q and out are (rows, heads, head_dim) float32, contiguous; sequence i owns rows
 * [q_start[i], q_start[i] + q_len[i]), the last q_len[i] positions of its ctx[i] tokens (causal, aligned
 * bottom-right). Other rows of out are left alone.
 *
 * Flash attention in tiles. A work item is one sequence's kv head and a tile of QT query positions: the
 * `group` heads that share the kv head are stacked into one tile of QT * group query rows, so every key
 * and value row read serves all of them. The query tile is scaled and transposed once per item. Per
 * tile of KT keys: scores in register blocks of 8 keys x 32 query rows, key-major (each key's dims are
 * broadcast from its row where it lies in the pool; a bfloat16 pool's tile is converted first), so the
 * online softmax (running maximum and sum per row) runs across 16 rows per vector, with one exp
 * polynomial; then O += P V in blocks of 4 rows x 64 dims with the rescale of O folded into the
 * block's load. Key tiles wholly after a tile's last position are skipped, and only the tiles that
 * cross the diagonal are masked: the causal half of the work is never done, where torch's CPU flash
 * attention, given a mask, computes the whole rectangle. A first version with row-major scores
 * (keys transposed per tile, softmax along each row with libm's expf) took 5.4-5.7 ms for a
 * 600-token prompt's layer against 4.6-4.8 ms for this one. The full blocks of both matmuls then got
 * loops with constant bounds (scores_8x32_full, values_4x64_full): same arithmetic in the same order,
 * the same bits out, and one layer of a 2,000-token prompt (8 heads over 2 kv heads of 64, one thread,
 * in two 1,024-token chunks) took 48.3 and 46.6 ms against 64.0 and 65.5 ms in two runs of the two
 * built side by side and called in turn (1.32x, 1.40x; a 600-token prompt 6.1 against 8.8 ms).
 * With a bfloat16 pool and AVX512-BF16, both matmuls run on bfloat16 dot products (see BF16_MATH): a
 * 600-token prompt's layer took 2.8 ms. Items go to `threads` POSIX threads through a shared counter
 * (later tiles have more keys).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Measured on a 600-token prompt and a 256-token step's chunks: 16 or 32 positions and 64 or 128 keys
 * were within noise of each other; 8 positions were 10-12 % slower (in a first version of the kernel). */
#define QT 32 /* query positions per tile */
#define KT 64 /* keys per tile */
#define MAX_THREADS 64

typedef struct {
    const float *q;
    const void *cache;
    int bf16;
    int64_t block_stride, kv_stride, slot_stride;
    int block_size, kv_heads, head_dim, heads;
    const int64_t *blocks, *block_start, *ctx, *q_start, *q_len;
    int seqs;
    float scale;
    float *out;
    const int64_t *item_end; /* items of sequences [0, i], cumulative */
    int64_t items;
    int64_t next; /* shared counter of items handed out */
    int status;
} Job;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even (the values a bfloat16 model passes are exact already). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Row `p` of sequence `blocks` for kind `kind` (0 keys, 1 values), kv head g: element offset. */
static inline int64_t row_of(const Job *j, const int64_t *blocks, int64_t p, int kind, int g) {
    return blocks[p / j->block_size] * j->block_stride + kind * j->kv_stride + (p % j->block_size) * j->slot_stride +
           (int64_t)g * j->head_dim;
}

static inline float load1(const Job *j, int64_t off) {
    if (j->bf16) return bf16_to_f32(((const uint16_t *)j->cache)[off]);
    return ((const float *)j->cache)[off];
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* Scratch of one thread, float32. Rows of a tile are padded to a multiple of 16 (`rp`). */
typedef struct {
    float *qt;    /* D x rp: the query tile, scaled and transposed (row r's dims down column r) */
    float *o;     /* rp x D: output accumulators */
    float *s;     /* KT x rp: scores, then weights, key-major so the softmax runs across rows */
    float *kb;    /* KT x D: a bfloat16 key tile converted (float32 keys are read in place) */
    float *vb;    /* KT x D: the same for values */
    float *m, *l, *alpha; /* rp each: running maximum, running sum, this tile's rescale */
    int32_t *pos; /* rp: each row's position */
    uint32_t *p2; /* KT/2 x rp: the weights as bfloat16 pairs of consecutive keys (bfloat16 arithmetic) */
} Scratch;

/* e^x for x <= 0 (clamped at -80, as in paged_decode.c: no denormals): x = n ln2 + r with |r| <= ln2/2
 * (ln2 split in two so r is exact), e^r by its Taylor series to r^7 (error under 1e-8), times 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-80.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* S[k][r0:r0+32) for keys k0..k0+nk (nk <= 8): q . k, the key's dims broadcast from its row. */
static inline void scores_8x32(const float *qt, const float *const *krow, float *s, int D, int rp, int r0, int k0,
                               int nk) {
    __m512 a[8][2];
    for (int k = 0; k < 8; k++) a[k][0] = a[k][1] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const __m512 q0 = _mm512_loadu_ps(qt + (int64_t)d * rp + r0);
        const __m512 q1 = _mm512_loadu_ps(qt + (int64_t)d * rp + r0 + 16);
        for (int k = 0; k < 8; k++) {
            if (k >= nk) break;
            const __m512 kb = _mm512_set1_ps(krow[k0 + k][d]);
            a[k][0] = _mm512_fmadd_ps(kb, q0, a[k][0]);
            a[k][1] = _mm512_fmadd_ps(kb, q1, a[k][1]);
        }
    }
    for (int k = 0; k < nk; k++) {
        _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0, a[k][0]);
        _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0 + 16, a[k][1]);
    }
}

/* scores_8x32 for a full group of 8 keys, the case of every group but a tile's last. The bounds are
 * constants so that the compiler keeps the 8 key pointers in registers and unrolls the keys: with nk
 * a variable, gcc reloaded a pointer and tested nk before each key of each dim, and a 2,000-token
 * prompt's layer took 1.3-1.5x as long (see the header). */
static inline void scores_8x32_full(const float *qt, const float *const *krow, float *s, int D, int rp, int r0,
                                    int k0) {
    const float *kp[8];
    for (int k = 0; k < 8; k++) kp[k] = krow[k0 + k];
    __m512 a[8][2];
    for (int k = 0; k < 8; k++) a[k][0] = a[k][1] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const __m512 q0 = _mm512_loadu_ps(qt + (int64_t)d * rp + r0);
        const __m512 q1 = _mm512_loadu_ps(qt + (int64_t)d * rp + r0 + 16);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            const __m512 kb = _mm512_set1_ps(kp[k][d]);
            a[k][0] = _mm512_fmadd_ps(kb, q0, a[k][0]);
            a[k][1] = _mm512_fmadd_ps(kb, q1, a[k][1]);
        }
    }
    for (int k = 0; k < 8; k++) {
        _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0, a[k][0]);
        _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0 + 16, a[k][1]);
    }
}

/* As scores_8x32 for the last 16 rows of a tile whose padded row count is an odd multiple of 16. */
static inline void scores_8x16(const float *qt, const float *const *krow, float *s, int D, int rp, int r0, int k0,
                               int nk) {
    __m512 a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const __m512 q0 = _mm512_loadu_ps(qt + (int64_t)d * rp + r0);
        for (int k = 0; k < 8; k++) {
            if (k >= nk) break;
            a[k] = _mm512_fmadd_ps(_mm512_set1_ps(krow[k0 + k][d]), q0, a[k]);
        }
    }
    for (int k = 0; k < nk; k++) _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0, a[k]);
}

/* The accumulators of a 4-row x 64-dim block of O, loaded and rescaled by each row's alpha (zero past
 * nr rows and nd vectors), and their store: shared by the float32 and bfloat16 value passes. */
static inline void load_rescaled(__m512 a[4][4], const float *o, const float *alpha, int D, int r0, int nr, int d0,
                                 int nd) {
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++)
            a[r][c] = (r < nr && c < nd) ? _mm512_mul_ps(_mm512_loadu_ps(o + (int64_t)(r0 + r) * D + d0 + 16 * c),
                                                          _mm512_set1_ps(alpha[r0 + r]))
                                         : _mm512_setzero_ps();
}

static inline void store_block(__m512 a[4][4], float *o, int D, int r0, int nr, int d0, int nd) {
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nd; c++) _mm512_storeu_ps(o + (int64_t)(r0 + r) * D + d0 + 16 * c, a[r][c]);
}

/* O[r][d0:d0+16*nd) = O * alpha[r] + sum_k P[k][r] V[k] for rows r0..r0+nr (nr <= 4), nd <= 4. */
static inline void values_4x64(float *o, const float *p, const float *const *vrow, const float *alpha, int D, int rp,
                               int nk, int r0, int nr, int d0, int nd) {
    __m512 a[4][4];
    load_rescaled(a, o, alpha, D, r0, nr, d0, nd);
    for (int k = 0; k < nk; k++) {
        __m512 vv[4];
        for (int c = 0; c < 4; c++) vv[c] = c < nd ? _mm512_loadu_ps(vrow[k] + d0 + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < 4; r++) {
            if (r >= nr) break;
            const __m512 pb = _mm512_set1_ps(p[(int64_t)k * rp + r0 + r]);
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_fmadd_ps(pb, vv[c], a[r][c]);
        }
    }
    store_block(a, o, D, r0, nr, d0, nd);
}

/* values_4x64 for a whole block of 4 rows and 64 dims, with constant bounds for the reason given at
 * scores_8x32_full. */
static inline void values_4x64_full(float *o, const float *p, const float *const *vrow, const float *alpha, int D,
                                    int rp, int nk, int r0, int d0) {
    __m512 a[4][4];
    load_rescaled(a, o, alpha, D, r0, 4, d0, 4);
    for (int k = 0; k < nk; k++) {
        const float *v = vrow[k] + d0, *pk = p + (int64_t)k * rp + r0;
        __m512 vv[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) vv[c] = _mm512_loadu_ps(v + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512 pb = _mm512_set1_ps(pk[r]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_fmadd_ps(pb, vv[c], a[r][c]);
        }
    }
    store_block(a, o, D, r0, 4, d0, 4);
}

#if defined(__AVX512BF16__)
/* With a bfloat16 pool the two matmuls run on AVX512-BF16 dot products (two multiply-adds per float
 * lane), as torch's bfloat16 attention runs its matmuls in bfloat16: the queries (bfloat16 values
 * already, in a bfloat16 model) and the keys multiply exactly, and the softmax weights are rounded to
 * bfloat16 for the sum over values, with float32 accumulation throughout. Operands are pairs of
 * bfloat16 along the reduced dimension in each 32-bit lane. */
#define BF16_MATH 1

/* S[k][r0:r0+16*NV) for keys k0..k0+NK (NK <= 8): queries as (dim pair, row) lanes, each key's dim pair
 * broadcast from its row in the pool. NK is the constant 8 for a full group of keys (see
 * scores_8x32_full for why), `nk` otherwise. */
#define SCORES_BF16(NV, NK)                                                                               \
    const uint32_t *kp[8];                                                                                \
    for (int k = 0; k < 8; k++) kp[k] = krow[k0 + (k < (NK) ? k : 0)];                                    \
    __m512 a[8][NV];                                                                                      \
    for (int k = 0; k < 8; k++)                                                                           \
        for (int c = 0; c < NV; c++) a[k][c] = _mm512_setzero_ps();                                       \
    for (int d2 = 0; d2 < D / 2; d2++) {                                                                  \
        __m512bh qv[NV];                                                                                  \
        for (int c = 0; c < NV; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qt2 + (int64_t)d2 * rp + r0 + 16 * c); \
        for (int k = 0; k < 8; k++) {                                                                     \
            if (k >= (NK)) break;                                                                         \
            const __m512bh kb = (__m512bh)_mm512_set1_epi32((int32_t)kp[k][d2]);                          \
            for (int c = 0; c < NV; c++) a[k][c] = _mm512_dpbf16_ps(a[k][c], qv[c], kb);                 \
        }                                                                                                 \
    }                                                                                                     \
    for (int k = 0; k < (NK); k++)                                                                        \
        for (int c = 0; c < NV; c++) _mm512_storeu_ps(s + (int64_t)(k0 + k) * rp + r0 + 16 * c, a[k][c]);

static inline void scores_bf16_8x32(const uint32_t *qt2, const uint32_t *const *krow, float *s, int D, int rp,
                                    int r0, int k0, int nk) {
    SCORES_BF16(2, nk)
}

static inline void scores_bf16_8x32_full(const uint32_t *qt2, const uint32_t *const *krow, float *s, int D, int rp,
                                         int r0, int k0) {
    SCORES_BF16(2, 8)
}

static inline void scores_bf16_8x16(const uint32_t *qt2, const uint32_t *const *krow, float *s, int D, int rp,
                                    int r0, int k0, int nk) {
    SCORES_BF16(1, nk)
}

/* Two float32 vectors as one vector of bfloat16 pairs: a in each lane's low half, b in its high half. */
static inline __m512i pair_bf16(__m512 a, __m512 b) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* O[r][d0:d0+16*nd) = O * alpha[r] + sum over key pairs of P V, rows r0..r0+nr (nr <= 4), nd <= 4; v2
 * holds the value tile as pairs of consecutive keys per dim (KT/2 x D lanes). */
static inline void values_bf16_4x64(float *o, const uint32_t *p2, const uint32_t *v2, const float *alpha, int D,
                                    int rp, int pairs, int r0, int nr, int d0, int nd) {
    __m512 a[4][4];
    load_rescaled(a, o, alpha, D, r0, nr, d0, nd);
    for (int k2 = 0; k2 < pairs; k2++) {
        __m512bh vv[4];
        for (int c = 0; c < 4; c++)
            vv[c] = (__m512bh)(c < nd ? _mm512_loadu_si512(v2 + (int64_t)k2 * D + d0 + 16 * c) : _mm512_setzero_si512());
        for (int r = 0; r < 4; r++) {
            if (r >= nr) break;
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int32_t)p2[(int64_t)k2 * rp + r0 + r]);
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], vv[c], pb);
        }
    }
    store_block(a, o, D, r0, nr, d0, nd);
}

/* values_bf16_4x64 for a whole block of 4 rows and 64 dims (constant bounds, as values_4x64_full). */
static inline void values_bf16_4x64_full(float *o, const uint32_t *p2, const uint32_t *v2, const float *alpha, int D,
                                         int rp, int pairs, int r0, int d0) {
    __m512 a[4][4];
    load_rescaled(a, o, alpha, D, r0, 4, d0, 4);
    for (int k2 = 0; k2 < pairs; k2++) {
        const uint32_t *v = v2 + (int64_t)k2 * D + d0, *pk = p2 + (int64_t)k2 * rp + r0;
        __m512bh vv[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) vv[c] = (__m512bh)_mm512_loadu_si512(v + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int32_t)pk[r]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], vv[c], pb);
        }
    }
    store_block(a, o, D, r0, 4, d0, 4);
}
#else
#define BF16_MATH 0
#endif

/* Rows of a key tile as float32 pointers: in place for a float32 pool, converted into `buf` for
 * bfloat16 (a contiguous copy, cheap next to the arithmetic that reads each row rp times). */
static void tile_rows(const Job *j, const int64_t *blocks, int64_t k0, int nk, int kind, int g, float *buf,
                      const float **rows) {
    const int D = j->head_dim;
    for (int k = 0; k < nk; k++) {
        const int64_t off = row_of(j, blocks, k0 + k, kind, g);
        if (!j->bf16) { rows[k] = (const float *)j->cache + off; continue; }
        const uint16_t *src = (const uint16_t *)j->cache + off;
        float *dst = buf + (int64_t)k * D;
        for (int d = 0; d < D; d += 16) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(src + d));
            _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
        rows[k] = dst;
    }
}

/* One work item: sequence `i`, kv head g, query positions [t0, t0 + nq) of its q_len new tokens. */
static void tile(const Job *j, Scratch *w, int i, int g, int64_t t0, int nq) {
    const int D = j->head_dim, G = j->heads / j->kv_heads, R = nq * G, rp = (R + 15) / 16 * 16;
    const int64_t ctx = j->ctx[i], first_pos = ctx - j->q_len[i] + t0; /* position of query t0 */
    const int64_t last_pos = first_pos + nq - 1;
    const int64_t *blocks = j->blocks + j->block_start[i];
    /* float32: the scale is folded into the queries. bfloat16 arithmetic: the queries stay as they are
     * (exact in bfloat16) and the scores are scaled in the softmax. */
    const int bf = BF16_MATH && j->bf16;
    const float score_scale = bf ? j->scale : 1.f;
    uint32_t *qt2 = (uint32_t *)w->qt; /* D/2 x rp lanes of dim pairs, in the same memory */
    /* Row r = position-major, r = t * G + h for query head g * G + h: those G heads are adjacent in q.
     * Padding rows (r >= R) have zero queries and the last position; their output is never written. */
    for (int t = 0; t < nq; t++) {
        const float *src = j->q + ((j->q_start[i] + t0 + t) * j->heads + (int64_t)g * G) * D;
        for (int h = 0; h < G; h++) {
            const float *qh = src + (int64_t)h * D;
            if (bf)
                for (int d = 0; d < D; d += 2)
                    qt2[(int64_t)(d / 2) * rp + t * G + h] = f32_to_bf16(qh[d]) | (uint32_t)f32_to_bf16(qh[d + 1]) << 16;
            else
                for (int d = 0; d < D; d++) w->qt[(int64_t)d * rp + t * G + h] = qh[d] * j->scale;
        }
    }
    for (int r = R; r < rp; r++)
        for (int d = 0; d < D; d++) w->qt[(int64_t)d * rp + r] = 0.f; /* covers the pair layout too */
    for (int r = 0; r < rp; r++) {
        w->pos[r] = (int32_t)(r < R ? first_pos + r / G : last_pos);
        w->m[r] = -FLT_MAX;
        w->l[r] = 0.f;
    }
    memset(w->o, 0, sizeof(float) * (size_t)rp * (size_t)D);
    const float *krow[KT], *vrow[KT];
    const __m512 vscale = _mm512_set1_ps(score_scale);
    for (int64_t k0 = 0; k0 <= last_pos; k0 += KT) {
        const int nk = (int)(last_pos + 1 - k0 < KT ? last_pos + 1 - k0 : KT), pairs = (nk + 1) / 2;
        (void)pairs; /* used by the bfloat16 arithmetic only */
        if (bf) {
#if BF16_MATH
            const uint32_t *krow2[KT];
            for (int k = 0; k < nk; k++)
                krow2[k] = (const uint32_t *)((const uint16_t *)j->cache + row_of(j, blocks, k0 + k, 0, g));
            for (int kk = 0; kk < nk; kk += 8) {
                const int n8 = nk - kk < 8 ? nk - kk : 8;
                int r0 = 0;
                if (n8 == 8)
                    for (; r0 + 32 <= rp; r0 += 32) scores_bf16_8x32_full(qt2, krow2, w->s, D, rp, r0, kk);
                for (; r0 + 32 <= rp; r0 += 32) scores_bf16_8x32(qt2, krow2, w->s, D, rp, r0, kk, n8);
                if (r0 < rp) scores_bf16_8x16(qt2, krow2, w->s, D, rp, r0, kk, n8);
            }
            /* The value tile as pairs of consecutive keys per dim (an odd last key pairs with zero). */
            uint32_t *v2 = (uint32_t *)w->kb;
            for (int k2 = 0; k2 < pairs; k2++) {
                const uint16_t *a = (const uint16_t *)j->cache + row_of(j, blocks, k0 + 2 * k2, 1, g);
                const uint16_t *b =
                    2 * k2 + 1 < nk ? (const uint16_t *)j->cache + row_of(j, blocks, k0 + 2 * k2 + 1, 1, g) : NULL;
                for (int d = 0; d < D; d += 16) {
                    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + d)));
                    const __m512i hi =
                        b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + d))) : _mm512_setzero_si512();
                    _mm512_storeu_si512(v2 + (int64_t)k2 * D + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                }
            }
#endif
        } else {
            tile_rows(j, blocks, k0, nk, 0, g, w->kb, krow);
            tile_rows(j, blocks, k0, nk, 1, g, w->vb, vrow);
            for (int kk = 0; kk < nk; kk += 8) {
                const int n8 = nk - kk < 8 ? nk - kk : 8;
                int r0 = 0;
                if (n8 == 8)
                    for (; r0 + 32 <= rp; r0 += 32) scores_8x32_full(w->qt, krow, w->s, D, rp, r0, kk);
                for (; r0 + 32 <= rp; r0 += 32) scores_8x32(w->qt, krow, w->s, D, rp, r0, kk, n8);
                if (r0 < rp) scores_8x16(w->qt, krow, w->s, D, rp, r0, kk, n8);
            }
        }
        /* Online softmax, 16 rows at a time; in a tile that crosses the diagonal, a key after a row's
         * position gets weight 0 (the first tile holds key 0, so every row's maximum is finite after it). */
        const int masked = k0 + nk - 1 > first_pos;
        for (int r0 = 0; r0 < rp; r0 += 16) {
            const __m512i pos = _mm512_loadu_si512(w->pos + r0);
            const __m512 m_old = _mm512_loadu_ps(w->m + r0);
            __m512 m = m_old;
            for (int k = 0; k < nk; k++) {
                const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(w->s + (int64_t)k * rp + r0), vscale);
                const __mmask16 vis =
                    masked ? _mm512_cmp_epi32_mask(_mm512_set1_epi32((int32_t)(k0 + k)), pos, _MM_CMPINT_LE) : 0xFFFF;
                m = _mm512_mask_max_ps(m, vis, m, x);
            }
            __m512 sum = _mm512_setzero_ps();
            for (int k = 0; k < nk; k++) {
                float *sk = w->s + (int64_t)k * rp + r0;
                const __mmask16 vis =
                    masked ? _mm512_cmp_epi32_mask(_mm512_set1_epi32((int32_t)(k0 + k)), pos, _MM_CMPINT_LE) : 0xFFFF;
                const __m512 p = _mm512_maskz_mov_ps(vis, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(sk), vscale, m)));
                _mm512_storeu_ps(sk, p);
                sum = _mm512_add_ps(sum, p);
            }
            const __m512 alpha = exp16(_mm512_sub_ps(m_old, m));
            _mm512_storeu_ps(w->alpha + r0, alpha);
            _mm512_storeu_ps(w->l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(w->l + r0), alpha, sum));
            _mm512_storeu_ps(w->m + r0, m);
        }
        if (bf) {
#if BF16_MATH
            for (int k2 = 0; k2 < pairs; k2++) {
                const float *a = w->s + (int64_t)(2 * k2) * rp, *b = 2 * k2 + 1 < nk ? a + rp : NULL;
                for (int r0 = 0; r0 < rp; r0 += 16)
                    _mm512_storeu_si512(w->p2 + (int64_t)k2 * rp + r0,
                                        pair_bf16(_mm512_loadu_ps(a + r0), b ? _mm512_loadu_ps(b + r0) : _mm512_setzero_ps()));
            }
            for (int r0 = 0; r0 < R; r0 += 4)
                for (int d0 = 0; d0 < D; d0 += 64)
                    if (R - r0 >= 4 && D - d0 >= 64)
                        values_bf16_4x64_full(w->o, w->p2, (const uint32_t *)w->kb, w->alpha, D, rp, pairs, r0, d0);
                    else
                        values_bf16_4x64(w->o, w->p2, (const uint32_t *)w->kb, w->alpha, D, rp, pairs, r0,
                                     R - r0 < 4 ? R - r0 : 4, d0, (D - d0 < 64 ? D - d0 : 64) / 16);
#endif
        } else {
            for (int r0 = 0; r0 < R; r0 += 4)
                for (int d0 = 0; d0 < D; d0 += 64)
                    if (R - r0 >= 4 && D - d0 >= 64) values_4x64_full(w->o, w->s, vrow, w->alpha, D, rp, nk, r0, d0);
                    else values_4x64(w->o, w->s, vrow, w->alpha, D, rp, nk, r0, R - r0 < 4 ? R - r0 : 4, d0,
                                (D - d0 < 64 ? D - d0 : 64) / 16);
        }
    }
    for (int t = 0; t < nq; t++) {
        float *dst = j->out + ((j->q_start[i] + t0 + t) * j->heads + (int64_t)g * G) * D;
        for (int h = 0; h < G; h++) {
            const int r = t * G + h;
            const float inv = 1.f / w->l[r];
            for (int d = 0; d < D; d++) dst[(int64_t)h * D + d] = w->o[(int64_t)r * D + d] * inv;
        }
    }
}
#define VECTOR 1
#else
#define VECTOR 0
#endif

/* The same attention, one query row at a time, for builds without AVX-512 and head sizes that are not
 * a multiple of 16: correct everywhere, fast nowhere. */
static void rows_scalar(const Job *j, int i, int g, int64_t t0, int nq, float *p) {
    const int D = j->head_dim, G = j->heads / j->kv_heads;
    const int64_t first_pos = j->ctx[i] - j->q_len[i] + t0;
    const int64_t *blocks = j->blocks + j->block_start[i];
    for (int t = 0; t < nq; t++) {
        const int64_t pos = first_pos + t;
        for (int h = 0; h < G; h++) {
            const int64_t row = (j->q_start[i] + t0 + t) * j->heads + (int64_t)g * G + h;
            const float *q = j->q + row * D;
            float *o = j->out + row * D, m = -FLT_MAX, sum = 0.f;
            for (int64_t k = 0; k <= pos; k++) {
                const int64_t kr = row_of(j, blocks, k, 0, g);
                float x = 0.f;
                for (int d = 0; d < D; d++) x += q[d] * load1(j, kr + d);
                p[k] = x * j->scale;
                m = p[k] > m ? p[k] : m;
            }
            for (int d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t k = 0; k <= pos; k++) {
                const float e = expf(fmaxf(p[k] - m, -80.f));
                const int64_t vr = row_of(j, blocks, k, 1, g);
                sum += e;
                for (int d = 0; d < D; d++) o[d] += e * load1(j, vr + d);
            }
            for (int d = 0; d < D; d++) o[d] /= sum;
        }
    }
}

static void *run(void *arg) {
    Job *j = (Job *)arg;
    const int D = j->head_dim;
    int64_t longest = 0;
    for (int i = 0; i < j->seqs; i++) longest = j->ctx[i] > longest ? j->ctx[i] : longest;
    const int vector = VECTOR && D % 16 == 0;
    float *buf = NULL;
#if VECTOR
    Scratch *w = NULL;
    if (vector) {
        const size_t rp = ((size_t)QT * (size_t)(j->heads / j->kv_heads) + 15) / 16 * 16, d = (size_t)D;
        w = (Scratch *)malloc(sizeof(Scratch));
        buf = (float *)malloc(sizeof(float) * (d * rp * 2 + KT * rp + KT * d * 2 + rp * 4 + KT / 2 * rp));
        if (w && buf) {
            w->qt = buf;
            w->o = w->qt + d * rp;
            w->s = w->o + rp * d;
            w->kb = w->s + KT * rp;
            w->vb = w->kb + KT * d;
            w->m = w->vb + KT * d;
            w->l = w->m + rp;
            w->alpha = w->l + rp;
            w->pos = (int32_t *)(w->alpha + rp);
            w->p2 = (uint32_t *)(w->pos + rp);
        }
    }
    if (vector && (!w || !buf)) { free(w); free(buf); __atomic_store_n(&j->status, 1, __ATOMIC_RELAXED); return NULL; }
#endif
    if (!vector) {
        buf = (float *)malloc(sizeof(float) * (size_t)(longest > 0 ? longest : 1));
        if (!buf) { __atomic_store_n(&j->status, 1, __ATOMIC_RELAXED); return NULL; }
    }
    int i = 0;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (item >= j->items) break;
        while (j->item_end[i] <= item) i++; /* items are handed out in order, so i only moves forward */
        const int64_t local = item - (i ? j->item_end[i - 1] : 0);
        const int g = (int)(local % j->kv_heads);
        const int64_t t0 = (local / j->kv_heads) * QT;
        const int nq = (int)(j->q_len[i] - t0 < QT ? j->q_len[i] - t0 : QT);
#if VECTOR
        if (vector) { tile(j, w, i, g, t0, nq); continue; }
#endif
        rows_scalar(j, i, g, t0, nq, buf);
    }
#if VECTOR
    free(w);
#endif
    free(buf);
    return NULL;
}

/* Returns 0 on success, 1 when out of memory or arguments are out of range (the caller then falls back
 * to its portable path). A thread that fails to start costs only speed: the others take its items. */
int epd_paged_prefill(const float *q, const void *cache, int bf16, int64_t block_stride, int64_t kv_stride,
                      int64_t slot_stride, int block_size, int kv_heads, int head_dim, int heads,
                      const int64_t *blocks, const int64_t *block_start, const int64_t *ctx, const int64_t *q_start,
                      const int64_t *q_len, int seqs, float scale, float *out, int threads) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > 256 || head_dim <= 0 || seqs < 0) return 1;
    int64_t *item_end = (int64_t *)malloc(sizeof(int64_t) * (size_t)(seqs > 0 ? seqs : 1));
    if (!item_end) return 1;
    int64_t items = 0;
    for (int i = 0; i < seqs; i++) {
        if (q_len[i] < 0 || q_len[i] > ctx[i]) { free(item_end); return 1; }
        items += (q_len[i] + QT - 1) / QT * kv_heads;
        item_end[i] = items;
    }
    Job job = {q, cache, bf16, block_stride, kv_stride, slot_stride, block_size, kv_heads, head_dim, heads,
               blocks, block_start, ctx, q_start, q_len, seqs, scale, out, item_end, items, 0, 0};
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > items) threads = (int)(items > 0 ? items : 1);
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&ids[t], NULL, run, &job) != 0) break;
        started = t;
    }
    run(&job);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    free(item_end);
    return job.status;
}
