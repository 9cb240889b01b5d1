/* A decode step's decoder layers as one call (`models/decode_layers.py`).
 *
 * The same kernels the layer modules call one at a time from Python -- the residual add and norm, the
 * few-row linears, rotary, the KV write, paged decode attention, the gated product -- in the same
 * order, on buffers of the same types, so the numbers are the same to the bit. What goes away is the
 * Python between them: about ten calls per layer, each a few microseconds of argument checks and
 * tensor allocation, which at a decode step's few rows is about as long as the arithmetic.
 *
 * The kernels live in their own libraries and arrive as function pointers the caller looked up once,
 * so this file builds alone and links nothing.
 */
#include <stdint.h>
#include <string.h>

typedef void (*linear_fn)(const void *x, int64_t ldx, const void *w, const void *bias, void *y,
                          int64_t ldy, int64_t M, int64_t K, int64_t N, int bf16, int threads);
typedef void (*add_norm_fn)(const void *x, const void *h, void *sum, const void *weight, void *out,
                            int64_t rows, int64_t dim, float eps);
typedef void (*rotary_fn)(void *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim,
                          const void *cos, const void *sin);
typedef void (*silu_mul_fn)(const void *gate_up, void *out, int64_t rows, int64_t hidden);
typedef void (*write_kv_fn)(const char *k, const char *v, int64_t k_row_stride, int64_t v_row_stride,
                            int64_t rows, int64_t row_bytes, char *layer, int64_t block_stride,
                            int64_t kind_stride, int64_t slot_stride, const int64_t *blocks,
                            const int64_t *offsets);
typedef int (*attend_fn)(const float *q, const void *cache, int bf16, int64_t block_stride,
                         int64_t kv_stride, int64_t slot_stride, int block_size, int kv_heads,
                         int head_dim, int heads, const int64_t *blocks, const int64_t *block_start,
                         const int64_t *ctx, int seqs, float scale, float *out, int threads);

/* The kernels, in the variant of the model's dtype. */
typedef struct {
    linear_fn linear;
    add_norm_fn add_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    write_kv_fn write_kv;
    attend_fn attend;
} Ops;

/* One decoder layer's weights as the kernels take them: norms' weights, and the linears packed for the
 * few-row kernel with their biases (NULL for none). */
typedef struct {
    const void *norm1, *qkv, *qkv_bias, *o, *o_bias, *norm2, *gate_up, *gate_up_bias, *down, *down_bias;
} Layer;

/* The model's shape and the KV pool's layout, `(blocks, layers, 2, block_size, kv_heads, head_dim)`
 * strides in elements. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    int64_t layer_stride, block_stride, kind_stride, slot_stride, block_size;
    float eps, scale;
    int bf16;
} Shape;

/* The work buffers of a step over `rows` rows, each at a 64-byte boundary. */
typedef struct {
    size_t x, y, qkv, q32, out32, out, o, gate_up, product, mlp, end;
} Work;

static size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static Work plan(const Shape *s, int64_t rows) {
    const size_t es = s->bf16 ? 2 : 4, r = (size_t)rows;
    const size_t hd = (size_t)(s->heads * s->head_dim), qkv = hd + 2 * (size_t)(s->kv_heads * s->head_dim);
    const size_t sizes[] = {
        r * (size_t)s->hidden * es, r * (size_t)s->hidden * es, r * qkv * es, r * hd * 4, r * hd * 4,
        r * hd * es, r * (size_t)s->hidden * es, r * 2 * (size_t)s->intermediate * es,
        r * (size_t)s->intermediate * es, r * (size_t)s->hidden * es,
    };
    size_t at[sizeof sizes / sizeof *sizes + 1];
    at[0] = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        at[i + 1] = at[i] + up64(sizes[i]);
    return (Work){at[0], at[1], at[2], at[3], at[4], at[5], at[6], at[7], at[8], at[9], at[10]};
}

/* Bytes of work memory a step over `rows` rows needs. */
int64_t epd_decode_layers_work(const Shape *s, int64_t rows) { return (int64_t)plan(s, rows).end; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's copy does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The query heads of each fused QKV row, widened to float32 and packed: the attention kernel's input. */
static void queries(const Shape *s, const char *qkv, int64_t row_stride, int64_t rows, float *q) {
    const int64_t n = s->heads * s->head_dim;
    for (int64_t r = 0; r < rows; r++) {
        if (s->bf16) {
            const uint16_t *src = (const uint16_t *)qkv + r * row_stride;
            for (int64_t i = 0; i < n; i++)
                q[r * n + i] = bf16_to_f32(src[i]);
        } else {
            memcpy(q + r * n, (const float *)qkv + r * row_stride, (size_t)n * sizeof(float));
        }
    }
}

/* The decoder over a decode-only batch: `rows` sequences, one new token each. embeds (rows, hidden);
 * cos, sin (rows, head_dim); slot_blocks / slot_offsets where each new token's keys and values go;
 * blocks / block_start / ctx each sequence's blocks and context length (as epd_paged_decode takes
 * them). Writes the final norm's output (rows, hidden) to `out` and every layer's new keys and values
 * to the pool. Returns 0, or the attention kernel's nonzero status (the caller then runs its modules,
 * which write the same keys and values again). */
int epd_decode_layers(const Ops *ops, const Shape *s, const Layer *layers, int64_t num_layers,
                      const void *final_norm, const void *embeds, int64_t rows, const void *cos,
                      const void *sin, char *pool, const int64_t *slot_blocks, const int64_t *slot_offsets,
                      const int64_t *blocks, const int64_t *block_start, const int64_t *ctx,
                      int linear_threads, int attend_threads, char *work, void *out) {
    const int64_t es = s->bf16 ? 2 : 4, hidden = s->hidden, inter = s->intermediate;
    const int64_t hd = s->heads * s->head_dim, kvd = s->kv_heads * s->head_dim, qkv_n = hd + 2 * kvd;
    const int bf16 = s->bf16, lt = linear_threads;
    const Work w = plan(s, rows);
    char *x = work + w.x, *y = work + w.y, *qkv = work + w.qkv, *o = work + w.o, *mlp = work + w.mlp;
    char *gate_up = work + w.gate_up, *product = work + w.product;
    float *q32 = (float *)(work + w.q32), *out32 = (float *)(work + w.out32);
    /* Attention's float32 output feeds o_proj as it is in float32; bfloat16 rounds it first. */
    const void *attn = bf16 ? (const void *)(work + w.out) : (const void *)out32;

    memcpy(x, embeds, (size_t)(rows * hidden * es)); /* the residual stream, updated in place */
    for (int64_t l = 0; l < num_layers; l++) {
        const Layer *L = &layers[l];
        char *kv = pool + l * s->layer_stride * es;
        /* Layer 0 has no MLP output to add yet. The sum is written over x row by row, each element
         * read before it is written, as the module's separate sum tensor would hold it. */
        ops->add_norm(x, l ? mlp : NULL, x, L->norm1, y, rows, hidden, s->eps);
        ops->linear(y, hidden, L->qkv, L->qkv_bias, qkv, qkv_n, rows, hidden, qkv_n, bf16, lt);
        ops->rotary(qkv, qkv_n, rows, s->heads + s->kv_heads, s->head_dim, cos, sin);
        ops->write_kv(qkv + hd * es, qkv + (hd + kvd) * es, qkv_n * es, qkv_n * es, rows, kvd * es, kv,
                      s->block_stride * es, s->kind_stride * es, s->slot_stride * es, slot_blocks,
                      slot_offsets);
        queries(s, qkv, qkv_n, rows, q32);
        int status = ops->attend(q32, kv, bf16, s->block_stride, s->kind_stride, s->slot_stride,
                                 (int)s->block_size, (int)s->kv_heads, (int)s->head_dim, (int)s->heads,
                                 blocks, block_start, ctx, (int)rows, s->scale, out32, attend_threads);
        if (status)
            return status;
        if (bf16)
            for (int64_t i = 0; i < rows * hd; i++)
                ((uint16_t *)(work + w.out))[i] = f32_to_bf16(out32[i]);
        ops->linear(attn, hd, L->o, L->o_bias, o, hidden, rows, hd, hidden, bf16, lt);
        ops->add_norm(x, o, x, L->norm2, y, rows, hidden, s->eps);
        ops->linear(y, hidden, L->gate_up, L->gate_up_bias, gate_up, 2 * inter, rows, hidden, 2 * inter,
                    bf16, lt);
        ops->silu_mul(gate_up, product, rows, inter);
        ops->linear(product, inter, L->down, L->down_bias, mlp, hidden, rows, inter, hidden, bf16, lt);
    }
    ops->add_norm(x, num_layers ? mlp : NULL, x, final_norm, out, rows, hidden, s->eps);
    return 0;
}
