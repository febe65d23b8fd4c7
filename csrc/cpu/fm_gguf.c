/* llama.cpp block formats on the CPU: see fm_gguf.h. The block layouts follow ggml-quants.c and
 * gguf-py's quants.py; every value is computed with the same float operations in the same
 * order as gguf-py (no FMA contraction in the exact path: baseline x86-64 has no FMA, and
 * deq_task forbids it where the baseline has one), so dequantization is bit-exact. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include "fm_gguf.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fm_gguf_q8.h"
#include "fm_kernels_internal.h" /* fm_h2f, fm_bf2f, fm_ld16 */

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FMG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FMG_CLONES
#endif

#define QK 32
#define QK_K 256

int64_t fmg_row_bytes(int type, int64_t cols)
{
    if (cols <= 0) return -1;
    switch (type) {
    case FMG_F32: return cols * 4;
    case FMG_F16: case FMG_BF16: return cols * 2;
    case FMG_Q4_0: return cols % QK ? -1 : cols / QK * 18;
    case FMG_Q4_1: return cols % QK ? -1 : cols / QK * 20;
    case FMG_Q5_0: return cols % QK ? -1 : cols / QK * 22;
    case FMG_Q5_1: return cols % QK ? -1 : cols / QK * 24;
    case FMG_Q8_0: return cols % QK ? -1 : cols / QK * 34;
    case FMG_Q4_K: return cols % QK_K ? -1 : cols / QK_K * 144;
    case FMG_Q5_K: return cols % QK_K ? -1 : cols / QK_K * 176;
    case FMG_Q6_K: return cols % QK_K ? -1 : cols / QK_K * 210;
    case FMG_MXFP4: return cols % QK ? -1 : cols / QK * 17;
    default: return -1;
    }
}

/* ------------------------------------------------------------------ one row, exact */

static inline void scale_min_k4(const uint8_t *s, int j, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* MXFP4 (OCP microscaling): e2m1 codes doubled, times half the e8m0 scale (ggml_e8m0_to_fp32_half) */
static const float MXFP4_KVALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float e8m0_half(uint8_t x)
{
    union { uint32_t u; float f; } v;
    v.u = x < 2 ? (uint32_t)0x00200000 << x : (uint32_t)(x - 1) << 23;
    return v.f;
}

static inline __attribute__((always_inline)) void dequant_row(int type, const uint8_t *b, float *y, int64_t n)
{
    switch (type) {
    case FMG_F32:
        memcpy(y, b, (size_t)n * 4);
        break;
    case FMG_F16:
        for (int64_t i = 0; i < n; i++) y[i] = fm_h2f(fm_ld16((const uint16_t *)(b + 2 * i)));
        break;
    case FMG_BF16:
        for (int64_t i = 0; i < n; i++) y[i] = fm_bf2f(fm_ld16((const uint16_t *)(b + 2 * i)));
        break;
    case FMG_Q8_0:
        for (int64_t i = 0; i < n; i += QK, b += 34, y += QK) {
            float d = fm_h2f(fm_ld16((const uint16_t *)b));
            for (int j = 0; j < QK; j++) y[j] = d * (float)(int8_t)b[2 + j];
        }
        break;
    case FMG_Q4_0:
        for (int64_t i = 0; i < n; i += QK, b += 18, y += QK) {
            float d = fm_h2f(fm_ld16((const uint16_t *)b));
            for (int j = 0; j < 16; j++) y[j] = d * (float)((b[2 + j] & 15) - 8);  /* two loops: vectorizable */
            for (int j = 0; j < 16; j++) y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
        }
        break;
    case FMG_Q4_1:
        for (int64_t i = 0; i < n; i += QK, b += 20, y += QK) {
            float d = fm_h2f(fm_ld16((const uint16_t *)b)), m = fm_h2f(fm_ld16((const uint16_t *)(b + 2)));
            for (int j = 0; j < 16; j++) {
                float lo = d * (float)(b[4 + j] & 15);
                y[j] = lo + m;
            }
            for (int j = 0; j < 16; j++) {
                float hi = d * (float)(b[4 + j] >> 4);
                y[j + 16] = hi + m;
            }
        }
        break;
    case FMG_Q5_0:
    case FMG_Q5_1: {
        const int q51 = type == FMG_Q5_1, bs = q51 ? 24 : 22;
        for (int64_t i = 0; i < n; i += QK, b += bs, y += QK) {
            float d = fm_h2f(fm_ld16((const uint16_t *)b)), m = q51 ? fm_h2f(fm_ld16((const uint16_t *)(b + 2))) : 0.0f;
            const uint8_t *qh8 = b + (q51 ? 4 : 2), *qs = qh8 + 4;
            uint32_t qh = (uint32_t)qh8[0] | (uint32_t)qh8[1] << 8 | (uint32_t)qh8[2] << 16 | (uint32_t)qh8[3] << 24;
            for (int j = 0; j < 32; j++) {
                int v = ((j < 16 ? qs[j] : qs[j - 16] >> 4) & 15) | (int)((qh >> j) & 1) << 4;
                if (q51) {
                    float t = d * (float)v;
                    y[j] = t + m;
                } else {
                    y[j] = d * (float)(v - 16);
                }
            }
        }
        break;
    }
    case FMG_Q4_K:
    case FMG_Q5_K: {
        const int q5 = type == FMG_Q5_K, bs = q5 ? 176 : 144;
        for (int64_t i = 0; i < n; i += QK_K, b += bs, y += QK_K) {
            float d = fm_h2f(fm_ld16((const uint16_t *)b)), dmin = fm_h2f(fm_ld16((const uint16_t *)(b + 2)));
            const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + 16 + (q5 ? 32 : 0);
            for (int s = 0; s < 8; s++) {
                uint8_t a, m;
                scale_min_k4(sc, s, &a, &m);
                float dl = d * (float)a, ml = dmin * (float)m;
                const uint8_t *q = qs + 32 * (s / 2);
                const int shift = 4 * (s & 1);
                for (int l = 0; l < 32; l++) {
                    int v = (q[l] >> shift) & 15;
                    if (q5) v |= ((qh[l] >> s) & 1) << 4;
                    float t = dl * (float)v;
                    y[32 * s + l] = t - ml;
                }
            }
        }
        break;
    }
    case FMG_MXFP4:  /* 1 byte e8m0 scale, 16 bytes of codes: low nibbles are 0..15, high 16..31 */
        for (int64_t i = 0; i < n; i += QK, b += 17, y += QK) {
            const float d = e8m0_half(b[0]);
            for (int j = 0; j < 16; j++) y[j] = d * MXFP4_KVALUES[b[1 + j] & 15];
            for (int j = 0; j < 16; j++) y[j + 16] = d * MXFP4_KVALUES[b[1 + j] >> 4];
        }
        break;
    case FMG_Q6_K:
        for (int64_t i = 0; i < n; i += QK_K, b += 210, y += QK_K) {
            const uint8_t *ql = b, *qh = b + 128;
            const int8_t *sc = (const int8_t *)(b + 192);
            float d = fm_h2f(fm_ld16((const uint16_t *)(b + 208)));
            for (int g = 0; g < 16; g++) {  /* 16 groups of 16 elements, one scale each */
                const int h = g / 8, s = (g / 4) & 1, c = (g / 2) & 1, sh = 2 * ((g / 2) & 3), o = 16 * (g & 1);
                const uint8_t *lq = ql + 64 * h + 32 * c + o, *hq = qh + 32 * h + o;
                const float ds = d * (float)sc[g];
                for (int l = 0; l < 16; l++) {
                    int v = ((lq[l] >> (4 * s)) & 15) | (((hq[l] >> sh) & 3) << 4);
                    y[16 * g + l] = ds * (float)(v - 32);
                }
            }
        }
        break;
    }
}

/* ------------------------------------------------------------------ a small thread pool */

typedef fmg_task_fn task_fn;

static int g_threads = 0;

int fmg_get_num_threads(void)
{
    if (g_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        g_threads = n > 0 ? (int)n : 1;
    }
    return g_threads;
}

void fmg_set_num_threads(int n)
{
    g_threads = n;
    if (n <= 0) fmg_get_num_threads();
}

typedef struct {
    task_fn fn;
    void *ctx;
    int64_t ntasks;
    size_t scratch;
    atomic_llong next;
    atomic_int failed;
} job_t;

static void *worker(void *arg)
{
    job_t *j = arg;
    float *s = malloc(j->scratch * sizeof(float) + 64);
    if (!s) {
        atomic_store(&j->failed, 1);
        return NULL;
    }
    for (;;) {
        int64_t t = atomic_fetch_add(&j->next, 1);
        if (t >= j->ntasks) break;
        j->fn(j->ctx, t, s);
    }
    free(s);
    return NULL;
}

/* Runs fn(ctx, t, scratch) for t < ntasks on up to fmg_get_num_threads() threads (the caller is
 * one of them); scratch: `scratch` floats per thread. */
static int run(task_fn fn, void *ctx, int64_t ntasks, size_t scratch)
{
    job_t j = {fn, ctx, ntasks, scratch, 0, 0};
    int n = fmg_get_num_threads();
    if (n > ntasks) n = (int)ntasks;
    pthread_t th[256];
    if (n > 256) n = 256;
    int started = 0;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&th[started], NULL, worker, &j) == 0) started++;
    }
    worker(&j);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    return atomic_load(&j.failed) ? FMG_ENOMEM : FMG_OK;
}

int fmg_run(fmg_task_fn fn, void *ctx, int64_t ntasks, size_t scratch)
{
    return run(fn, ctx, ntasks, scratch);
}

/* ------------------------------------------------------------------ exact dequantization */

typedef struct {
    const fmg_mat *w;
    int64_t r0, r1, rb;
    float *out;
} deq_ctx;

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void deq_task(void *vc, int64_t t, float *scratch)
{
    (void)scratch;
    deq_ctx *c = vc;
    const int64_t rb = fmg_row_bytes(c->w->type, c->w->cols);
    for (int64_t r = c->r0 + t * c->rb; r < c->r0 + (t + 1) * c->rb && r < c->r1; r++)
        dequant_row(c->w->type, c->w->data + r * rb, c->out + (r - c->r0) * c->w->cols, c->w->cols);
}

int fmg_dequant(const fmg_mat *w, int64_t r0, int64_t r1, float *out)
{
    if (fmg_row_bytes(w->type, w->cols) < 0 || r0 < 0 || r1 > w->rows || r0 > r1) return FMG_EINVAL;
    deq_ctx c = {w, r0, r1, 64, out};
    return run(deq_task, &c, (r1 - r0 + 63) / 64, 0);
}

/* ------------------------------------------------------------------ fused kernels */

FMG_CLONES static float dot(const float *a, const float *b, int64_t n)
{
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* out[t * ldo + r - r0] = W[r] . x[t * ldx], r0 <= r < r1, t < T (row buffer: scratch). */
FMG_CLONES static void rows_dot(const fmg_mat *w, int64_t r0, int64_t r1, const float *x, int64_t T, int64_t ldx,
                                float *out, int64_t ldo, float *row)
{
    const int64_t rb = fmg_row_bytes(w->type, w->cols);
    for (int64_t r = r0; r < r1; r++) {
        dequant_row(w->type, w->data + r * rb, row, w->cols);
        for (int64_t t = 0; t < T; t++) out[t * ldo + r - r0] = dot(row, x + t * ldx, w->cols);
    }
}

/* The same with the activations already quantized to the weight type's vec_dot_type (llama.cpp's
 * numerics, fm_gguf_q8.c) when q is not NULL. */
static void rows_dot_any(const fmg_mat *w, int64_t r0, int64_t r1, const fmg_qact *q, const float *x, int64_t T,
                         int64_t ldx, float *out, int64_t ldo, float *scratch)
{
    if (q)
        fmg_q8_rows_dot(w->type, w->data, fmg_row_bytes(w->type, w->cols), r0, r1, q, out, ldo, scratch);
    else
        rows_dot(w, r0, r1, x, T, ldx, out, ldo, scratch);
}

/* Per-thread scratch floats for one weight row of n columns (float or quantized path). */
static size_t row_scratch(int64_t n)
{
    size_t q = (size_t)(fmg_q8_scratch_bytes(n) + 3) / 4;
    return q > (size_t)n ? q : (size_t)n;
}

#define ROWS_PER_TASK 16

typedef struct {
    const fmg_mat *w;
    const float *x;
    const fmg_qact *q;
    int64_t T, ldx, ldy;
    float *y, alpha;
    int accumulate;
} lin_ctx;

static void lin_task(void *vc, int64_t task, float *scratch)
{
    lin_ctx *c = vc;
    int64_t r0 = task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK;
    if (r1 > c->w->rows) r1 = c->w->rows;
    float *row = scratch, *tmp = scratch + row_scratch(c->w->cols);
    rows_dot_any(c->w, r0, r1, c->q, c->x, c->T, c->ldx, tmp, ROWS_PER_TASK, row);
    for (int64_t t = 0; t < c->T; t++)
        for (int64_t r = r0; r < r1; r++) {
            float v = c->alpha * tmp[t * ROWS_PER_TASK + r - r0];
            c->y[t * c->ldy + r] = c->accumulate ? c->y[t * c->ldy + r] + v : v;
        }
}

static int check(const fmg_mat *w)
{
    return w && w->data && w->rows > 0 && fmg_row_bytes(w->type, w->cols) > 0 ? FMG_OK : FMG_EINVAL;
}

int fmg_linear(const fmg_mat *w, const float *x, int64_t T, int64_t ldx, float *y, int64_t ldy, float alpha,
               int accumulate, int act)
{
    if (check(w) || T <= 0 || (act != FMG_ACT_F32 && act != FMG_ACT_Q8)) return FMG_EINVAL;
    fmg_qact qa, *q = NULL;
    if (act == FMG_ACT_Q8 && fmg_q8_supported(w->type)) {
        if (fmg_q8_quantize(w->type, x, T, ldx, w->cols, &qa)) return FMG_ENOMEM;
        q = &qa;
    }
    lin_ctx c = {w, x, q, T, ldx, ldy, y, alpha, accumulate};
    int rc = run(lin_task, &c, (w->rows + ROWS_PER_TASK - 1) / ROWS_PER_TASK, row_scratch(w->cols) + ROWS_PER_TASK * T);
    if (q) fmg_q8_free(q);
    return rc;
}

typedef struct {
    const fmg_expert *ex;
    const float *wts, *x;
    int k;
    int64_t T, H, I, tasks13, tasks2;
    float *h;   /* [k][T][2I]: gate then up dots, then the activation in the first I */
    float *y;
    const fmg_qact *q13, *q2;  /* quantized x [T][H] and activations [k][T][I], or NULL */
} moe_ctx;

static void moe1_task(void *vc, int64_t task, float *scratch)
{
    moe_ctx *c = vc;
    int64_t e = task / c->tasks13, r0 = task % c->tasks13 * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK;
    if (r1 > 2 * c->I) r1 = 2 * c->I;
    float *he = c->h + e * c->T * 2 * c->I;
    rows_dot_any(&c->ex[e].w13, r0, r1, c->q13, c->x, c->T, c->H, he + r0, 2 * c->I, scratch);
}

static void moe2_task(void *vc, int64_t task, float *scratch)
{
    moe_ctx *c = vc;
    int64_t r0 = task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK;
    if (r1 > c->H) r1 = c->H;
    float *row = scratch, *tmp = scratch + row_scratch(c->I);
    for (int e = 0; e < c->k; e++) {
        float *he = c->h + e * c->T * 2 * c->I;
        fmg_qact qe, *q = NULL;
        if (c->q2) {  /* expert e's T rows of the quantized activations */
            const int64_t I = c->I, o = e * c->T;
            qe = (fmg_qact){I, c->T, c->q2->q + o * I, c->q2->d + o * (I / 32), c->q2->s + o * (I / 32),
                            c->q2->bsum + o * (I / 16), 1};
            q = &qe;
        }
        rows_dot_any(&c->ex[e].w2, r0, r1, q, he, c->T, 2 * c->I, tmp, ROWS_PER_TASK, row);
        for (int64_t t = 0; t < c->T; t++)
            for (int64_t r = r0; r < r1; r++) c->y[t * c->H + r] += c->wts[e] * tmp[t * ROWS_PER_TASK + r - r0];
    }
}

int fmg_moe(const fmg_expert *ex, const float *wts, int k, const float *x, int64_t T, float *y, int act)
{
    if (k <= 0 || T <= 0 || (act != FMG_ACT_F32 && act != FMG_ACT_Q8)) return FMG_EINVAL;
    const int64_t H = ex[0].w2.rows, I = ex[0].w2.cols;
    for (int e = 0; e < k; e++)
        if (check(&ex[e].w13) || check(&ex[e].w2) || ex[e].w13.rows != 2 * I || ex[e].w13.cols != H ||
            ex[e].w2.rows != H || ex[e].w2.cols != I)
            return FMG_EINVAL;
    for (int e = 1; e < k; e++)  /* one quantization of x serves every expert */
        if (ex[e].w13.type != ex[0].w13.type || ex[e].w2.type != ex[0].w2.type) return FMG_EINVAL;
    const int q8_13 = act == FMG_ACT_Q8 && fmg_q8_supported(ex[0].w13.type);
    const int q8_2 = act == FMG_ACT_Q8 && fmg_q8_supported(ex[0].w2.type);
    fmg_qact q13, q2;
    float *h = malloc((size_t)k * T * 2 * I * sizeof(float));
    if (!h) return FMG_ENOMEM;
    if (q8_13 && fmg_q8_quantize(ex[0].w13.type, x, T, H, H, &q13)) {
        free(h);
        return FMG_ENOMEM;
    }
    q13.mmid = 1;
    moe_ctx c = {ex, wts, x, k, T, H, I, (2 * I + ROWS_PER_TASK - 1) / ROWS_PER_TASK,
                 (H + ROWS_PER_TASK - 1) / ROWS_PER_TASK, h, y, q8_13 ? &q13 : NULL, NULL};
    int rc = run(moe1_task, &c, k * c.tasks13, row_scratch(H));
    if (q8_13) fmg_q8_free(&q13);
    if (rc == FMG_OK) {
        for (int64_t i = 0; i < (int64_t)k * T; i++) {
            float *g = h + i * 2 * I;
            if (act == FMG_ACT_Q8)  /* llama.cpp's silu, as its swiglu computes it */
                for (int64_t j = 0; j < I; j++) g[j] = fmg_q8_silu(g[j]) * g[I + j];
            else
                for (int64_t j = 0; j < I; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * g[I + j];
        }
        if (q8_2 && fmg_q8_quantize(ex[0].w2.type, h, (int64_t)k * T, 2 * I, I, &q2)) rc = FMG_ENOMEM;
        else c.q2 = q8_2 ? &q2 : NULL;
        if (rc == FMG_OK) rc = run(moe2_task, &c, c.tasks2, row_scratch(I) + ROWS_PER_TASK * T);
        if (c.q2) fmg_q8_free(&q2);
    }
    free(h);
    return rc;
}

const char *fmg_isa(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return "avx512";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
    return "portable";
}
