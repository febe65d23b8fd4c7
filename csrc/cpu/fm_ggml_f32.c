/* llama.cpp's F32 numerics (fm_ggml_f32.h): ggml-cpu's vec_dot_f32, llamafile's tinyBLAS dot,
 * soft_max, the RoPE angle cache and the non-flash attention built from them. */
#include "fm_ggml_f32.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fm_gguf.h"

#pragma STDC FP_CONTRACT OFF
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

/* Cloned for x86-64-v3/v4 (fmaf one instruction, vectorized lanes) and the baseline (fmaf a libm
 * call): every FMA is explicit and nothing else is contracted, so the clones give the same bits. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define F32_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define F32_CLONES
#endif

/* _mm512_reduce_add_ps as GCC expands it: halves, then quarters, then (0+2)+(1+3). */
static inline float reduce16(const float *v)
{
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = v[i + 8] + v[i];
    for (int i = 0; i < 4; i++) s4[i] = s8[i + 4] + s8[i];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static float dot_tiny(const float *x, const float *y, int64_t n)
{
    float acc[16] = {0};
    for (int64_t l = 0; l < n; l += 16)
        for (int t = 0; t < 16; t++) acc[t] = fmaf(x[l + t], y[l + t], acc[t]);
    return reduce16(acc);
}

static float dot_vec(const float *x, const float *y, int64_t n)
{
    float acc[4][16] = {{0}};
    const int64_t np = n & ~(int64_t)63;
    for (int64_t i = 0; i < np; i += 64)
        for (int a = 0; a < 4; a++)
            for (int t = 0; t < 16; t++) acc[a][t] = fmaf(x[i + 16 * a + t], y[i + 16 * a + t], acc[a][t]);
    float s[16];
    for (int t = 0; t < 16; t++) s[t] = (acc[0][t] + acc[2][t]) + (acc[1][t] + acc[3][t]);
    float sum = reduce16(s);
    for (int64_t i = np; i < n; i++) {
        const float p = x[i] * y[i];
        sum += p;
    }
    return sum;
}

/* dot_vec over the element order of llama.cpp's permuted q/k rows when interleaved (its element
 * 2i is our i, 2i + 1 our i + n/2), read in place. */
static inline float dot_vec_kq(const float *x, const float *y, int64_t n, int interleaved)
{
    if (!interleaved) return dot_vec(x, y, n);
    float acc[4][16] = {{0}};
    const int64_t np = n & ~(int64_t)63, half = n / 2;
    for (int64_t i = 0; i < np; i += 64)
        for (int a = 0; a < 4; a++)
            for (int t = 0; t < 16; t++) {
                const int64_t e = i + 16 * a + t, j = (e & 1) ? half + e / 2 : e / 2;
                acc[a][t] = fmaf(x[j], y[j], acc[a][t]);
            }
    float s[16];
    for (int t = 0; t < 16; t++) s[t] = (acc[0][t] + acc[2][t]) + (acc[1][t] + acc[3][t]);
    float sum = reduce16(s);
    for (int64_t e = np; e < n; e++) {
        const int64_t j = (e & 1) ? half + e / 2 : e / 2;
        const float p = x[j] * y[j];
        sum += p;
    }
    return sum;
}

float fmg_f32_dot(const float *x, const float *y, int64_t n, int sgemm)
{
    return sgemm ? dot_tiny(x, y, n) : dot_vec(x, y, n);
}

F32_CLONES void fmg_f32_matmul(const float *x, int64_t T, int64_t ldx, const float *w, int64_t rows, int64_t ldw, int64_t n,
                    float *y, int64_t ldy)
{
    const int sgemm = T >= 2 && rows % 4 == 0 && n % 16 == 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) y[t * ldy + r] = fmg_f32_dot(w + r * ldw, x + t * ldx, n, sgemm);
}

/* ggml_v_expf (vec.h, AVX-512 variant) lane by lane: fmaf is the vector FMA's single rounding,
 * ldexpf the same as scalef. */
static inline float ggml_expf(float x)
{
    const float r = 0x1.8p23f, z = fmaf(x, 0x1.715476p+0f, r), n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    if (fabsf(n) > 192) return n <= 0 ? 0.0f : INFINITY;
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), u,
                         fmaf(0x1.ffffecp-1f, b, 1.0f));
    return ldexpf(j, (int)n);
}

float fmg_expf(float x)
{
    return ggml_expf(x);
}

F32_CLONES void fmg_softmax_row(float *x, int64_t n, int64_t valid, float scale)
{
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        x[i] = i < valid ? x[i] * scale : -INFINITY;
        if (x[i] > max) max = x[i];
    }
    double sum = 0;
    int64_t i = 0;
    for (; i + 15 < n; i += 16) {
        for (int t = 0; t < 16; t++) x[i + t] = ggml_expf(x[i + t] - max);
        sum += (double)reduce16(x + i);
    }
    for (; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += (double)x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j < n; j++) x[j] *= inv;
}

void fmg_rope_cache(int64_t pos, int64_t n_dims, float base, float *cos_out, float *sin_out)
{
    const float theta_scale = powf(base, -2.0f / (float)n_dims);
    float theta = (float)pos;
    for (int64_t i = 0; i < n_dims / 2; i++) {
        cos_out[i] = cosf(theta);
        sin_out[i] = sinf(theta);
        theta *= theta_scale;
    }
}

F32_CLONES void fmg_rope_apply(float *x, int64_t T, int64_t heads, int64_t d, int64_t ld, const float *cos_t, const float *sin_t)
{
    const int64_t half = d / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_t + t * half, *sn = sin_t + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *r = x + t * ld + h * d;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = r[i], x1 = r[i + half], a = x1 * sn[i], b = x1 * cs[i];
                r[i] = fmaf(x0, cs[i], -a);
                r[i + half] = fmaf(x0, sn[i], b);
            }
        }
    }
}

/* ------------------------------------------------------------------ attention */

typedef struct {
    const float *q, *k, *v;
    int64_t ldq, ldk, ldv, T, start, H, Hkv, d, ldo;
    float scale, *out;
    int interleaved;
} att_ctx;

/* One (token, head): scores K.q by vec_dot, the softmax over the padded row, then P.V by tinyBLAS
 * (a batch) or vec_dot (one token), as lane accumulators over the key positions. */
F32_CLONES static void att_task(void *vc, int64_t task, float *scratch)
{
    const att_ctx *c = vc;
    const int64_t t = task / c->H, h = task % c->H, g = h / (c->H / c->Hkv), d = c->d;
    const int64_t valid = c->start + t + 1, n = (valid + 63) & ~(int64_t)63;
    const float *q = c->q + t * c->ldq + h * d;
    float *p = scratch, *acc = scratch + n; /* acc: [4 groups][16 lanes][d] */
    for (int64_t j = 0; j < valid; j++) p[j] = dot_vec_kq(c->k + j * c->ldk + g * d, q, d, c->interleaved);
    fmg_softmax_row(p, c->T >= 2 ? (valid + 15) & ~(int64_t)15 : n, valid, c->scale);
    const int groups = c->T >= 2 ? 1 : 4; /* tinyBLAS: one accumulator; vec_dot: four, over steps of 64 */
    memset(acc, 0, sizeof(float) * 4 * 16 * d);
    for (int64_t j = 0; j < valid; j++) {
        const float *vr = c->v + j * c->ldv + g * d;
        float *a = acc + (((j / 16) % groups) * 16 + j % 16) * d; /* lane j % 16 of its group */
        for (int64_t i = 0; i < d; i++) a[i] = fmaf(vr[i], p[j], a[i]);
    }
    float *o = c->out + t * c->ldo + h * d;
    for (int64_t i = 0; i < d; i++) {
        float s[16];
        for (int l = 0; l < 16; l++) {
            const float *a = acc + l * d + i;
            s[l] = groups == 1 ? a[0] : (a[0] + a[2 * 16 * d]) + (a[16 * d] + a[3 * 16 * d]);
        }
        o[i] = reduce16(s);
    }
}

int fmg_attention(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv, int64_t T,
                  int64_t start, int64_t H, int64_t Hkv, int64_t d, float scale, int interleaved, float *out,
                  int64_t ldo)
{
    if (T < 1 || H < 1 || Hkv < 1 || H % Hkv || d < 1 || d % 2) return FMG_EINVAL;
    att_ctx c = {q, k, v, ldq, ldk, ldv, T, start, H, Hkv, d, ldo, scale, out, interleaved};
    const int64_t n = (start + T + 63) & ~(int64_t)63;
    return fmg_run(att_task, &c, T * H, (size_t)(n + 4 * d * 16));
}
