/* Fused element-wise steps of a decoder layer on the CPU, float32: each is one pass over its rows
 * where torch runs it as 3 to 8 separate ops (and, at a decode step's few rows, pays each op's
 * dispatch more than its arithmetic).
 *
 *   epd_add_rms_norm  sum = x + h (h optional), out = weight * sum / rms(sum)
 *   epd_rotary        rotary embedding applied in place to the first `heads` heads of every row
 *   epd_silu_mul      out = silu(gate) * up, gate and up the two halves of each row
 *   epd_write_kv      a step's new keys and values copied into their pool slots
 *
 * Rows may be strided (a row of the fused QKV projection holds q, k and v side by side); a row's
 * elements are contiguous. The caller passes only what these loops take (float32, CPU) and otherwise
 * uses its torch path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void epd_add_rms_norm(const float *x, const float *h, float *sum, const float *weight, float *out, int64_t rows,
                      int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *sr = sum ? sum + r * dim : (float *)xr;
        if (h) {
            const float *hr = h + r * dim;
            for (int64_t i = 0; i < dim; i++) sr[i] = xr[i] + hr[i];
        }
        float ss = 0.f;
        for (int64_t i = 0; i < dim; i++) ss += sr[i] * sr[i];
        /* As the reference: x * rsqrt(mean(x^2) + eps), then the weight. */
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        float *orow = out + r * dim;
        for (int64_t i = 0; i < dim; i++) orow[i] = weight[i] * (sr[i] * inv);
    }
}

/* x * cos + rotate_half(x) * sin for each of the `heads` heads of each row, in place; cos and sin are
 * (rows, dim). rotate_half(x) = (-x[half:], x[:half]). */
void epd_rotary(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim, const float *cos_,
                const float *sin_) {
    const int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_ + r * dim, *s = sin_ + r * dim;
        for (int64_t g = 0; g < heads; g++) {
            float *v = x + r * row_stride + g * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

void epd_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t hidden) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * hidden, *u = g + hidden;
        float *o = out + r * hidden;
        for (int64_t i = 0; i < hidden; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

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

/* bfloat16 versions: each rounds to bfloat16 where the torch ops they replace do (after every op), so
 * they give the same numbers up to the last bit of an exp. */
static inline float bf(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float rbf(float f) { return bf(to_bf(f)); }

void epd_add_rms_norm_bf16(const uint16_t *x, const uint16_t *h, uint16_t *sum, const uint16_t *weight,
                           uint16_t *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        const uint16_t *sr = xr;
        if (h) {
            uint16_t *dst = sum + r * dim;
            const uint16_t *hr = h + r * dim;
            for (int64_t i = 0; i < dim; i++) dst[i] = to_bf(bf(xr[i]) + bf(hr[i]));
            sr = dst;
        }
        float ss = 0.f;
        for (int64_t i = 0; i < dim; i++) ss += bf(sr[i]) * bf(sr[i]);
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        uint16_t *orow = out + r * dim;
        for (int64_t i = 0; i < dim; i++) orow[i] = to_bf(bf(weight[i]) * rbf(bf(sr[i]) * inv));
    }
}

void epd_rotary_bf16(uint16_t *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t dim,
                     const uint16_t *cos_, const uint16_t *sin_) {
    const int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos_ + r * dim, *s = sin_ + r * dim;
        for (int64_t g = 0; g < heads; g++) {
            uint16_t *v = x + r * row_stride + g * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = bf(v[i]), b = bf(v[i + half]);
                v[i] = to_bf(rbf(a * bf(c[i])) + rbf(-b * bf(s[i])));
                v[i + half] = to_bf(rbf(b * bf(c[i + half])) + rbf(a * bf(s[i + half])));
            }
        }
    }
}

void epd_silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t hidden) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * hidden, *u = g + hidden;
        uint16_t *o = out + r * hidden;
        for (int64_t i = 0; i < hidden; i++) {
            const float x = bf(g[i]);
            o[i] = to_bf(rbf(x / (1.f + expf(-x))) * bf(u[i]));
        }
    }
}
