#include "fm_quant.h"

#include <math.h>
#include <string.h>

static inline float to_half_and_back(float x, uint16_t *bits) {
    _Float16 h = (_Float16)x;  /* round to nearest even, like torch's .half() */
    memcpy(bits, &h, 2);
    return (float)h;
}

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* round-half-to-even of a value already clamped to a small integer range: adding and removing
 * 1.5 * 2^23 leaves the nearest integer under the default rounding mode, without a libm call
 * (nearbyintf is one unless SSE4.1 is enabled at compile time). */
static inline float round_clamped(float x, float lo, float hi) {
    float t = clampf(x, lo, hi) + 12582912.0f;
    return t - 12582912.0f;
}

/* Affine fit for codes 0..levels: shrunken min-max ranges, each refined twice by least squares,
 * scale and bias rounded to fp16, best squared error kept (quant._fit_affine). */
static void fit_affine(const float *w, int levels, const float *shrinks, int nshrinks,
                       uint16_t *s_out, uint16_t *b_out, float *s_f, float *b_f) {
    float lo = w[0], hi = w[0];
    for (int i = 1; i < FMQ_GROUP; i++) { lo = w[i] < lo ? w[i] : lo; hi = w[i] > hi ? w[i] : hi; }
    float mid = (hi + lo) / 2, half = (hi - lo) / 2;
    float wm = 0;
    for (int i = 0; i < FMQ_GROUP; i++) wm += w[i];
    wm /= FMQ_GROUP;
    float best_err = INFINITY, best_s = 0, best_b = lo;
    uint16_t best_sb = 0, best_bb = 0;
    for (int k = 0; k < nshrinks; k++) {
        float s = 2 * half * shrinks[k] / levels;
        if (s < 1e-12f) s = 1e-12f;
        float b = mid - half * shrinks[k];
        for (int it = 0; it < 2; it++) {
            float qm = 0, qq = 0, qw = 0;
            for (int i = 0; i < FMQ_GROUP; i++) {
                float q = round_clamped((w[i] - b) / s, 0, (float)levels);
                qm += q; qq += q * q; qw += q * w[i];
            }
            qm /= FMQ_GROUP; qq /= FMQ_GROUP; qw /= FMQ_GROUP;
            float var = qq - qm * qm, cov = qw - qm * wm;
            if (var > 1e-12f) { s = cov / var; b = wm - s * qm; } else { b = wm; }
            if (fabsf(s) < 1e-12f) s = 1e-12f;
        }
        uint16_t sb, bb;
        float s16 = to_half_and_back(s, &sb), b16 = to_half_and_back(b, &bb);
        float err = 0;
        for (int i = 0; i < FMQ_GROUP; i++) {
            float q = s16 != 0 ? round_clamped((w[i] - b16) / s16, 0, (float)levels) : 0;
            float d = q * s16 + b16 - w[i];
            err += d * d;
        }
        if (err < best_err) { best_err = err; best_s = s16; best_b = b16; best_sb = sb; best_bb = bb; }
    }
    *s_out = best_sb; *b_out = best_bb; *s_f = best_s; *b_f = best_b;
}

/* Symmetric fit for codes -qmax..qmax (quant._fit_symmetric). */
static void fit_symmetric(const float *w, int qmax, uint16_t *s_out, float *s_f) {
    static const float shrinks[] = {1.0f, 0.98f, 0.96f, 0.94f, 0.92f, 0.9f};
    float amax = 0;
    for (int i = 0; i < FMQ_GROUP; i++) amax = fabsf(w[i]) > amax ? fabsf(w[i]) : amax;
    if (amax < 1e-12f) amax = 1e-12f;
    float best_err = INFINITY, best_s = amax / qmax;
    uint16_t best_sb;
    to_half_and_back(best_s, &best_sb);
    for (int k = 0; k < 6; k++) {
        float s = amax * shrinks[k] / qmax, qq = 0, qw = 0;
        for (int i = 0; i < FMQ_GROUP; i++) {
            float q = round_clamped(w[i] / s, -qmax, qmax);
            qq += q * q; qw += q * w[i];
        }
        if (qq > 0) s = qw / (qq > 1e-12f ? qq : 1e-12f);
        if (s < 1e-12f) s = 1e-12f;
        uint16_t sb;
        s = to_half_and_back(s, &sb);
        if (s < 0x1p-24f) { s = 0x1p-24f; to_half_and_back(s, &sb); }
        float err = 0;
        for (int i = 0; i < FMQ_GROUP; i++) {
            float d = round_clamped(w[i] / s, -qmax, qmax) * s - w[i];
            err += d * d;
        }
        if (err < best_err) { best_err = err; best_s = s; best_sb = sb; }
    }
    *s_out = best_sb; *s_f = best_s;
}

int fmq_quantize(const float *w, int64_t rows, int64_t cols, int bits,
                 uint8_t *q, uint16_t *scales, uint16_t *biases) {
    if (!w || !q || !scales || rows < 0 || cols <= 0 || cols % FMQ_GROUP) return -1;
    if (bits != 8 && bits != 4 && bits != 2) return -1;
    if (bits != 8 && !biases) return -1;
    static const float shrinks4[] = {1.0f, 0.95f, 0.9f, 0.85f};
    static const float shrinks2[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f};
    const int64_t groups = cols / FMQ_GROUP, row_bytes = cols * bits / 8;
    const int levels = (1 << bits) - 1, per_byte = 8 / bits;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const float *wg = w + r * cols + g * FMQ_GROUP;
            int64_t gi = r * groups + g;
            if (bits == 8) {
                float s;
                fit_symmetric(wg, 127, &scales[gi], &s);
                int8_t *dst = (int8_t *)(q + r * row_bytes + g * FMQ_GROUP);
                for (int i = 0; i < FMQ_GROUP; i++) dst[i] = (int8_t)round_clamped(wg[i] / s, -127, 127);
                continue;
            }
            float s, b;
            if (bits == 4) fit_affine(wg, levels, shrinks4, 4, &scales[gi], &biases[gi], &s, &b);
            else fit_affine(wg, levels, shrinks2, 7, &scales[gi], &biases[gi], &s, &b);
            uint8_t *dst = q + r * row_bytes + g * FMQ_GROUP / per_byte;
            memset(dst, 0, FMQ_GROUP / per_byte);
            for (int i = 0; i < FMQ_GROUP; i++) {
                int code = s != 0 ? (int)round_clamped((wg[i] - b) / s, 0, (float)levels) : 0;
                dst[i / per_byte] |= (uint8_t)(code << (bits * (i % per_byte)));
            }
        }
    }
    return 0;
}

/* q8 with the plain absmax scale per group (no search): s = fp16(max|w| / 127), codes
 * round(w * (1 / s)). One pass over the weights, loops the compiler vectorises: the load-time
 * quantizer of the dense part (quant.quantize_q8_absmax is its reference). bf16 != 0: w holds
 * bfloat16 values (the stored dtype of a bf16 dense part, read without a float32 copy). */
int fmq_quantize_q8_absmax(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *q, uint16_t *scales) {
    if (!w || !q || !scales || rows < 0 || cols <= 0 || cols % FMQ_GROUP) return -1;
    const int64_t groups = cols / FMQ_GROUP;
    float buf[FMQ_GROUP];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = r * cols + g * FMQ_GROUP;
            const float *wg;
            if (bf16) {
                const uint16_t *src = (const uint16_t *)w + at;
                for (int i = 0; i < FMQ_GROUP; i++) {
                    uint32_t u = (uint32_t)src[i] << 16;
                    memcpy(&buf[i], &u, 4);
                }
                wg = buf;
            } else {
                wg = (const float *)w + at;
            }
            float amax = 0;
            for (int i = 0; i < FMQ_GROUP; i++) {
                const float a = fabsf(wg[i]);
                amax = a > amax ? a : amax;
            }
            float s = amax / 127;
            if (s < 0x1p-24f) s = 0x1p-24f; /* an all-zero group: codes 0 */
            uint16_t sb;
            s = to_half_and_back(s, &sb);
            const float inv = 1.0f / s;
            int8_t *dst = q + at;
            for (int i = 0; i < FMQ_GROUP; i++) dst[i] = (int8_t)round_clamped(wg[i] * inv, -127, 127);
            scales[r * groups + g] = sb;
        }
    }
    return 0;
}
