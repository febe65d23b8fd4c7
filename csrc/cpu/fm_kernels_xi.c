/* Decode (one token) of q4 / q8 weights with integer activations: the preparation of the
 * activations (21-bit integers per group of 64 as three int8 digits), the portable kernel and the
 * dispatch to fm_kernels_xi_x86.c's. Formats, layout and numerics: fm_kernels_xi.h. */
#include "fm_kernels_xi.h"

#include <float.h>
#include <math.h>

static int q4_block(int level) { return level == FM_ISA_AVX512 ? 2 : 1; }

int fm_xi_level(int isa)
{
#ifdef FM_HAVE_X86
    if (isa >= FM_ISA_AVX512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        return FM_ISA_AVX512;
    if (isa >= FM_ISA_AVX2) return FM_ISA_AVX2;
#endif
    (void)isa;
    return FM_ISA_PORTABLE;
}

/* ------------------------------------------------------------------ preparation */

/* The step of a group whose largest |x| is m: X = rint(x * inv) with inv = FM_XI_MAX / m (float,
 * so |X| <= FM_XI_MAX without a clamp), d = m / FM_XI_MAX. Groups of zeros, of a NaN or inf, or
 * with m below 1e-30 (inv would overflow) take quantize_special. */

static void quantize_special(const float *v, float m, int32_t *X, float *step)
{
    if (!(m <= FLT_MAX) || m == 0.0f) { /* NaN or inf (outputs NaN), or zeros */
        for (int i = 0; i < 64; i++) X[i] = 0;
        *step = m == 0.0f ? 0.0f : NAN;
        return;
    }
    const double inv = (double)FM_XI_MAX / (double)m;
    for (int i = 0; i < 64; i++) X[i] = (int32_t)nearbyint((double)v[i] * inv);
    *step = (float)((double)m / FM_XI_MAX);
}

void fm_xi_quantize_group(const float *v, int32_t *X, float *step)
{
    uint32_t mb = 0; /* max |x| by bits: orders finite floats, and NaN above inf */
    for (int i = 0; i < 64; i++) {
        uint32_t b;
        memcpy(&b, v + i, 4);
        b &= 0x7fffffffu;
        mb = b > mb ? b : mb;
    }
    float m;
    memcpy(&m, &mb, 4);
    if (mb > 0x7f7fffffu || m < XI_TINY) {
        quantize_special(v, mb > 0x7f800000u ? NAN : m, X, step);
        return;
    }
    const float inv = (float)FM_XI_MAX / m;
    for (int i = 0; i < 64; i++) { /* round to nearest even, as cvtps2dq: |x * inv| < 2^22 */
        const float t = v[i] * inv;
        X[i] = (int32_t)((t + 12582912.0f) - 12582912.0f);
    }
    *step = m / (float)FM_XI_MAX;
}

static inline void digits(int32_t X, int8_t d[3])
{
    const int32_t d0 = ((X + 64) & 127) - 64, X1 = (X - d0) >> 7;
    const int32_t d1 = ((X1 + 64) & 127) - 64;
    d[0] = (int8_t)((X1 - d1) >> 7); /* x2 */
    d[1] = (int8_t)d1;
    d[2] = (int8_t)d0;
}

static void xi_prepare_scalar(int level, int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp)
{
    const int64_t G = gb;
    int8_t *dg = (int8_t *)xp;
    int32_t *corr = (int32_t *)((uint8_t *)xp + 3 * K);
    float *steps = (float *)((uint8_t *)xp + 4 * K);
    const int nb = fmt == FM_Q4 ? q4_block(level) : 1;
    int32_t X[64];
    int8_t d[3];
    for (int64_t g0 = ga; g0 < G;) {
        const int n = G - g0 >= nb ? nb : 1;
        for (int j = 0; j < n; j++) {
            const int64_t g = g0 + j;
            fm_xi_quantize_group(x + g * 64, X, steps + g);
            if (fmt == FM_Q4) {
                int8_t *base = dg + g0 * XI_GROUP_BYTES;
                for (int e = 0; e < 64; e++) {
                    digits(X[e], d);
                    for (int p = 0; p < 3; p++) base[((2 * p + (e & 1)) * n + j) * 32 + e / 2] = d[p];
                }
            } else {
                int8_t *base = dg + g * XI_GROUP_BYTES;
                for (int e = 0; e < 64; e++) {
                    digits(X[e], d);
                    for (int p = 0; p < 3; p++) base[64 * p + e] = d[p];
                }
                for (int l = 0; l < 16; l++)
                    corr[g * 16 + l] = -128 * (X[4 * l] + X[4 * l + 1] + X[4 * l + 2] + X[4 * l + 3]);
            }
        }
        g0 += n;
    }
}

/* ------------------------------------------------------------------ portable */

static inline int32_t xi_value(const int8_t *d, int stride) { return d[0] * 16384 + d[stride] * 128 + d[2 * stride]; }

static void rows_xi_portable(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    (void)ldo;
    const int64_t K = w->cols, G = K / 64;
    const int8_t *dg = xi_digits(a);
    const float *st = xi_steps(a, K);
    for (int64_t r = r0; r < r1; r++) {
        float acc = 0.0f, bacc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const int8_t *d = dg + g * XI_GROUP_BYTES;
            int64_t D = 0;
            if (w->fmt == FM_Q4) { /* blocks of one group: even elements at 64p + c, odd at 64p + 32 + c */
                const uint8_t *q = w->q + r * (K / 2) + g * 32;
                for (int c = 0; c < 32; c++)
                    D += (int64_t)(q[c] & 15) * xi_value(d + c, 64) + (int64_t)(q[c] >> 4) * xi_value(d + 32 + c, 64);
            } else {
                const int8_t *q = (const int8_t *)w->q + r * K + g * 64;
                for (int e = 0; e < 64; e++) D += (int64_t)q[e] * xi_value(d + e, 64);
            }
            acc += (float)D * (fm_h2f(fm_ld16(w->s + r * G + g)) * st[g]);
            if (w->b) bacc += fm_h2f(fm_ld16(w->b + r * G + g)) * a->xs[g];
        }
        out[r - r0] = acc + bacc;
    }
}

fm_rows_fn fm_xi_rows(int level, int fmt)
{
    if (fmt != FM_Q4 && fmt != FM_Q8) return NULL;
#ifdef FM_HAVE_X86
    if (level >= FM_ISA_AVX2) return fm_xi_rows_x86(level, fmt);
#endif
    (void)level;
    return rows_xi_portable;
}

void fm_xi_prepare_groups(int level, int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp)
{
#ifdef FM_HAVE_X86
    if (level == FM_ISA_AVX512) {
        fm_xi_prepare_avx512(fmt, x, K, ga, gb, xp);
        return;
    }
#endif
    xi_prepare_scalar(level, fmt, x, K, ga, gb, xp);
}

void fm_xi_prepare(int level, int fmt, const float *x, int64_t K, float *xp)
{
    fm_xi_prepare_groups(level, fmt, x, K, 0, K / 64, xp);
}
