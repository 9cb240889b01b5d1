/* Fused element-wise steps of a decoder layer on the CPU, float32 and bfloat16 (`_bf16`): each is one
 * pass over its rows where torch runs it as 3 to 8 separate ops (and, at a decode step's few rows, pays
 * each op's dispatch more than its arithmetic).
 *
 *   epd_add_rms_norm  sum = x + h (h optional), out = weight * sum / rms(sum)
 *   epd_rotary        rotary embedding applied in place to the first `heads` heads of every row
 *   epd_silu_mul      out = silu(gate) * up, gate and up the two halves of each row
 *   epd_write_kv      a step's new keys and values copied into their pool slots
 *
 * Rows may be strided (a row of the fused QKV projection holds q, k and v side by side); a row's
 * elements are contiguous. The caller passes only what these loops take (float32 or bfloat16, CPU) and
 * otherwise uses its torch path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Element access per type. float32: loads, stores and roundings are the identity. bfloat16: values are
 * widened to float for the arithmetic and rounded back to bfloat16 after every step where the torch
 * ops they replace round (after every op), so they give the same numbers up to the last bit of an exp. */
static inline float ld_f32(const float *p) { return *p; }
static inline void st_f32(float *p, float f) { *p = f; }
static inline float rd_f32(float f) { return f; }

static inline float ld_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline void st_bf16(uint16_t *p, float f) { *p = to_bf16(f); }
static inline float rd_bf16(float f) {
    const uint16_t h = to_bf16(f);
    return ld_bf16(&h);
}

/* The three element-wise steps for element type T; SUF names the variant (empty for float32), LD, ST
 * and RD load, store and round one value. */
#define FUSED_OPS(T, SUF, LD, ST, RD)                                                                        \
    void epd_add_rms_norm##SUF(const T *x, const T *h, T *sum, const T *weight, T *out, int64_t rows,      \
                               int64_t dim, float eps) {                                                   \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const T *sr = x + r * dim;                                                                     \
            if (h) {                                                                                       \
                T *dst = sum + r * dim;                                                                    \
                for (int64_t i = 0; i < dim; i++) ST(dst + i, LD(sr + i) + LD(h + r * dim + i));          \
                sr = dst;                                                                                  \
            }                                                                                              \
            float ss = 0.f;                                                                                \
            for (int64_t i = 0; i < dim; i++) ss += LD(sr + i) * LD(sr + i);                               \
            /* As the reference: x * rsqrt(mean(x^2) + eps), rounded, then times the weight. */           \
            const float inv = 1.f / sqrtf(ss / (float)dim + eps);                                          \
            for (int64_t i = 0; i < dim; i++) ST(out + r * dim + i, LD(weight + i) * RD(LD(sr + i) * inv)); \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* x * cos + rotate_half(x) * sin for each of the `heads` heads of each row, in place; cos and sin are \
     * (rows, dim). rotate_half(x) = (-x[half:], x[:half]). */                                             \
    void epd_rotary##SUF(T *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim, const T *cos_, \
                         const T *sin_) {                                                                  \
        const int64_t half = dim / 2;                                                                      \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const T *c = cos_ + r * dim, *s = sin_ + r * dim;                                              \
            for (int64_t g = 0; g < heads; g++) {                                                          \
                T *v = x + r * row_stride + g * dim;                                                       \
                for (int64_t i = 0; i < half; i++) {                                                       \
                    const float a = LD(v + i), b = LD(v + i + half);                                       \
                    ST(v + i, RD(a * LD(c + i)) + RD(-b * LD(s + i)));                                     \
                    ST(v + i + half, RD(b * LD(c + i + half)) + RD(a * LD(s + i + half)));                 \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    void epd_silu_mul##SUF(const T *gate_up, T *out, int64_t rows, int64_t hidden) {                       \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const T *g = gate_up + r * 2 * hidden, *u = g + hidden;                                        \
            for (int64_t i = 0; i < hidden; i++) {                                                         \
                const float x = LD(g + i);                                                                 \
                ST(out + r * hidden + i, RD(x / (1.f + expf(-x))) * LD(u + i));                            \
            }                                                                                              \
        }                                                                                                  \
    }

FUSED_OPS(float, , ld_f32, st_f32, rd_f32)
FUSED_OPS(uint16_t, _bf16, ld_bf16, st_bf16, rd_bf16)

/* The new keys and values of a step into their slots of one layer of the pool: row r of k and of v
 * (each `row_bytes` contiguous bytes: every kv head of the token) to slot offsets[r] of block
 * blocks[r]. Strides are in bytes; any element type. */
void epd_write_kv(const char *k, const char *v, int64_t k_row_stride, int64_t v_row_stride, int64_t rows,
                  int64_t row_bytes, char *layer, int64_t block_stride, int64_t kind_stride, int64_t slot_stride,
                  const int64_t *blocks, const int64_t *offsets) {
    for (int64_t r = 0; r < rows; r++) {
        char *dst = layer + blocks[r] * block_stride + offsets[r] * slot_stride;
        memcpy(dst, k + r * k_row_stride, (size_t)row_bytes);
        memcpy(dst + kind_stride, v + r * v_row_stride, (size_t)row_bytes);
    }
}
