/* llama.cpp's quantized matmul numerics: see fm_gguf_q8.h. The activation quantizers follow
 * ggml-cpu's x86 code (arch/x86/quants.c quantize_row_q8_0 / q8_1, ggml-quants.c
 * quantize_row_q8_K_ref, and repack.cpp's 4-row twins, which compute the same values):
 *   Q8_0: amax of 32; d = amax / 127 (stored fp16); q = round_half_even(x * (127 / amax)).
 *   Q8_1: as Q8_0, and s = fp16(d * sum(q)) with the unrounded d.
 *   Q8_K: max = the first element of largest |x| in 256 (signed); iscale = -127 / max;
 *         q = min(127, round_half_even(iscale * x)); d = 1 / iscale (fp32); bsums of 16. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "fm_gguf_q8.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fm_ggml_f32.h" /* fmg_expf */
#include "fm_gguf.h"
#include "fm_kernels_internal.h" /* fm_h2f, fm_ld16 */

#define QK 32
#define QK_K 256

static inline uint32_t f2bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> fp16, round to nearest even (what F16C's _cvtss_sh(x, 0) gives; ggml's own twin). */
static inline uint16_t f2h(float f)
{
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f2bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits2f((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f2bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* round half to even for |v| < 2^22 (ggml's nearest_int; _mm256_round_ps(.., NEAREST) alike). */
static inline int nearest_int(float v)
{
    const float val = v + 12582912.f;
    int32_t i;
    memcpy(&i, &val, 4);
    return (i & 0x007fffff) - 0x00400000;
}

float fmg_q8_silu(float x)
{
    return x / (1.0f + fmg_expf(0.0f - x)); /* ggml_v_silu, with ggml's own expf */
}

int fmg_q8_supported(int type)
{
    switch (type) {
    case FMG_Q4_0: case FMG_Q4_1: case FMG_Q5_0: case FMG_Q5_1: case FMG_Q8_0:
    case FMG_Q4_K: case FMG_Q5_K: case FMG_Q6_K: case FMG_MXFP4:
        return 1;
    default:
        return 0;
    }
}

static int is_k(int type)
{
    return type == FMG_Q4_K || type == FMG_Q5_K || type == FMG_Q6_K;
}

/* ------------------------------------------------------------------ activations */

static void quantize_q8_0(const float *x, int64_t n, int8_t *q, float *d, float *s)
{
    for (int64_t b = 0; b < n / QK; b++, x += QK, q += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float db = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            q[j] = (int8_t)nearest_int(x[j] * id);
            sum += q[j];
        }
        d[b] = fm_h2f(f2h(db));
        if (s) s[b] = fm_h2f(f2h(db * (float)sum));
    }
}

static void quantize_q8_k(const float *x, int64_t n, int8_t *q, float *d, int32_t *bsum)
{
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K, q += QK_K, bsum += QK_K / 16) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(q, 0, QK_K);
            memset(bsum, 0, QK_K / 16 * sizeof(int32_t));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            q[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += q[16 * g + l];
            bsum[g] = sum;
        }
        d[b] = 1 / iscale;
    }
}

int fmg_q8_quantize(int type, const float *x, int64_t T, int64_t ldx, int64_t n, fmg_qact *a)
{
    memset(a, 0, sizeof(*a));
    a->n = n;
    a->T = T;
    a->q = malloc((size_t)(T * n));
    a->d = calloc((size_t)(T * (n / QK)), sizeof(float));  /* zeroed: each type fills only its own */
    a->s = calloc((size_t)(T * (n / QK)), sizeof(float));
    a->bsum = calloc((size_t)(T * (n / 16)), sizeof(int32_t));
    if (!a->q || !a->d || !a->s || !a->bsum) {
        fmg_q8_free(a);
        return FMG_ENOMEM;
    }
    const int q81 = type == FMG_Q4_1 || type == FMG_Q5_1;
    for (int64_t t = 0; t < T; t++) {
        if (is_k(type))
            quantize_q8_k(x + t * ldx, n, a->q + t * n, a->d + t * (n / QK), a->bsum + t * (n / 16));
        else
            quantize_q8_0(x + t * ldx, n, a->q + t * n, a->d + t * (n / QK), q81 ? a->s + t * (n / QK) : NULL);
    }
    return FMG_OK;
}

void fmg_q8_free(fmg_qact *a)
{
    free(a->q);
    free(a->d);
    free(a->s);
    free(a->bsum);
    memset(a, 0, sizeof(*a));
}

/* ------------------------------------------------------------------ weights */

static inline void scale_min_k4(const uint8_t *s, int j, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* MXFP4: an e2m1 code doubled (ggml's kvalues_mxfp4: 0 1 2 3 4 6 8 12, bit 3 the sign), by
 * arithmetic rather than a table so that the unpacking loop vectorizes. */
static inline int8_t mxfp4_value(uint8_t c)
{
    const uint8_t m = c & 7, v = m < 4 ? m : (uint8_t)(m + m - 4 + (m == 7 ? 2 : 0)), s = (uint8_t)(0 - (c >> 3));
    return (int8_t)((v ^ s) - s);  /* s = 0 or 0xFF: v or -v */
}

static inline float e8m0_half(uint8_t x)
{
    return bits2f(x < 2 ? (uint32_t)0x00200000 << x : (uint32_t)(x - 1) << 23);
}

/* The row's quants as int8, in element order: Q4_0 q-8, Q5_0 q-16, Q6_K q-32, the others as
 * stored (unsigned ones fit: at most 31), MXFP4 its doubled e2m1 values. */
static void unpack_row(int type, const uint8_t *restrict b, int64_t n, int8_t *restrict w)
{
    switch (type) {
    case FMG_Q8_0:
        for (int64_t i = 0; i < n; i += QK, b += 34, w += QK) memcpy(w, b + 2, QK);
        break;
    case FMG_MXFP4:  /* 1 scale byte, 16 code bytes: low nibbles are elements 0..15, high 16..31 */
        for (int64_t i = 0; i < n; i += QK, b += 17, w += QK)
            for (int j = 0; j < 16; j++) {
                w[j] = mxfp4_value(b[1 + j] & 15);
                w[j + 16] = mxfp4_value(b[1 + j] >> 4);
            }
        break;
    case FMG_Q4_0:  /* each format with its constants: loops the compiler vectorizes */
        for (int64_t i = 0; i < n; i += QK, b += 18, w += QK)
            for (int j = 0; j < 16; j++) {
                w[j] = (int8_t)((b[2 + j] & 15) - 8);
                w[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
            }
        break;
    case FMG_Q4_1:
        for (int64_t i = 0; i < n; i += QK, b += 20, w += QK)
            for (int j = 0; j < 16; j++) {
                w[j] = (int8_t)(b[4 + j] & 15);
                w[j + 16] = (int8_t)(b[4 + j] >> 4);
            }
        break;
    case FMG_Q5_0:
    case FMG_Q5_1: {
        const int q51 = type == FMG_Q5_1, bs = q51 ? 24 : 22, off = q51 ? 0 : 16;
        for (int64_t i = 0; i < n; i += QK, b += bs, w += QK) {
            const uint8_t *qh8 = b + (q51 ? 4 : 2), *qs = qh8 + 4;
            const uint32_t qh = (uint32_t)qh8[0] | (uint32_t)qh8[1] << 8 | (uint32_t)qh8[2] << 16 | (uint32_t)qh8[3] << 24;
            for (int j = 0; j < 16; j++) {
                w[j] = (int8_t)(((qs[j] & 15) | (int)((qh >> j) & 1) << 4) - off);
                w[j + 16] = (int8_t)(((qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4) - off);
            }
        }
        break;
    }
    case FMG_Q4_K:
    case FMG_Q5_K: {
        const int q5 = type == FMG_Q5_K, bs = q5 ? 176 : 144;
        for (int64_t i = 0; i < n; i += QK_K, b += bs, w += QK_K) {
            const uint8_t *qh = b + 16, *qs = b + 16 + (q5 ? 32 : 0);
            for (int s = 0; s < 8; s++) {
                const uint8_t *q = qs + 32 * (s / 2);
                const int shift = 4 * (s & 1);
                for (int l = 0; l < 32; l++)
                    w[32 * s + l] = (int8_t)(((q[l] >> shift) & 15) | (q5 ? ((qh[l] >> s) & 1) << 4 : 0));
            }
        }
        break;
    }
    case FMG_Q6_K:  /* ggml's dequantize_row_q6_K order: runs of 32 bytes, which the compiler vectorizes */
        for (int64_t i = 0; i < n; i += QK_K, b += 210) {
            const uint8_t *ql = b, *qh = b + 128;
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, w += 128)
                for (int l = 0; l < 32; l++) {
                    w[l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
                    w[l + 32] = (int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    w[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    w[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
        }
        break;
    }
}

/* s[j] = sum of a[16j + l] * b[16j + l], l < 16 (a: weights, b: activations in [-127, 127]).
 * Integer sums are exact, so the AVX2 twin and the portable loop give the same sums. */
static void idot16_portable(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    for (int64_t j = 0; j < n / 16; j++) {
        int32_t acc = 0;
        for (int l = 0; l < 16; l++) acc += (int16_t)a[16 * j + l] * (int16_t)b[16 * j + l];
        s[j] = acc;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FMG_HAVE_AVX2 1
/* 8 groups of 16 per step: |a| * sign(b, a) as u8 x s8 pairs (ggml's trick; no int16 saturation,
 * since |b| <= 127), pairs of pairs to int32, then the four int32 of each group added. */
__attribute__((target("avx2"))) static void idot16_avx2(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    const __m256i ones = _mm256_set1_epi16(1), perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t j = 0;
    for (; j + 128 <= n; j += 128) {
        __m256i r[4];
        for (int k = 0; k < 4; k++) {
            const __m256i va = _mm256_loadu_si256((const __m256i *)(a + j + 32 * k));
            const __m256i vb = _mm256_loadu_si256((const __m256i *)(b + j + 32 * k));
            r[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va)), ones);
        }
        /* r[k]: int32 lanes 0-3 hold group 2k's quarters, lanes 4-7 group 2k+1's */
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(r[0], r[1]), _mm256_hadd_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(s + j / 16), _mm256_permutevar8x32_epi32(h, perm));
    }
    if (j < n) idot16_portable(a + j, b + j, n - j, s + j / 16);
}

/* AVX-512BW twin: 16 groups of 16 per step. No vpsignb at 512 bits: b is negated where a < 0
 * (a byte mask) and |a| taken, then the same u8 x s8 pairs; the four int32 of each group are
 * added by two unpack rounds per 128-bit lane and one 4x4 transpose. */
__attribute__((target("avx512f,avx512bw"))) static void idot16_avx512(const int8_t *a, const int8_t *b, int64_t n,
                                                                    int32_t *s)
{
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
    const __m512i tr = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int64_t j = 0;
    for (; j + 256 <= n; j += 256) {
        __m512i r[4];
        for (int k = 0; k < 4; k++) {
            const __m512i va = _mm512_loadu_si512((const void *)(a + j + 64 * k));
            const __m512i vb = _mm512_loadu_si512((const void *)(b + j + 64 * k));
            const __m512i sb = _mm512_mask_sub_epi8(vb, _mm512_movepi8_mask(va), zero, vb);
            r[k] = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(va), sb), ones);
        }
        /* r[k]: each 128-bit lane holds one group's four quarter sums (group 4k + lane) */
        const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi32(r[0], r[1]), _mm512_unpackhi_epi32(r[0], r[1]));
        const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi32(r[2], r[3]), _mm512_unpackhi_epi32(r[2], r[3]));
        const __m512i g = _mm512_add_epi32(_mm512_unpacklo_epi64(t, u), _mm512_unpackhi_epi64(t, u));
        _mm512_storeu_si512((void *)(s + j / 16), _mm512_permutexvar_epi32(tr, g));
    }
    if (j < n) idot16_avx2(a + j, b + j, n - j, s + j / 16);
}
#endif

typedef void (*idot16_fn)(const int8_t *, const int8_t *, int64_t, int32_t *);
static idot16_fn g_idot16 = NULL;

int fmg_q8_set_isa(const char *isa)
{
    if (isa && !strcmp(isa, "portable")) {
        g_idot16 = idot16_portable;
        return 0;
    }
#ifdef FMG_HAVE_AVX2
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (avx512 && (!isa || !strcmp(isa, "avx512"))) {
        g_idot16 = idot16_avx512;
        return 0;
    }
    if (avx2 && (!isa || !strcmp(isa, "avx2"))) {
        g_idot16 = idot16_avx2;
        return 0;
    }
#endif
    if (!isa) {
        g_idot16 = idot16_portable;
        return 0;
    }
    return -1;
}

const char *fmg_q8_isa(void)
{
    if (!g_idot16) fmg_q8_set_isa(NULL);
#ifdef FMG_HAVE_AVX2
    if (g_idot16 == idot16_avx512) return "avx512";
    if (g_idot16 == idot16_avx2) return "avx2";
#endif
    return "portable";
}

/* s[j] = sum of a[4j + l] * b[4j + l], l < 4: Q8_0's lanes (exact integers, as idot16). */
static void idot4_portable(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    for (int64_t j = 0; j < n / 4; j++)
        s[j] = (int16_t)a[4 * j] * b[4 * j] + (int16_t)a[4 * j + 1] * b[4 * j + 1] + (int16_t)a[4 * j + 2] * b[4 * j + 2] +
               (int16_t)a[4 * j + 3] * b[4 * j + 3];
}

#ifdef FMG_HAVE_AVX2
__attribute__((target("avx2"))) static void idot4_avx2(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m256i va = _mm256_loadu_si256((const __m256i *)(a + j)), vb = _mm256_loadu_si256((const __m256i *)(b + j));
        _mm256_storeu_si256((__m256i *)(s + j / 4),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va)), ones));
    }
    if (j < n) idot4_portable(a + j, b + j, n - j, s + j / 4);
}
#endif

static inline void idot4(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    if (!g_idot16) fmg_q8_set_isa(NULL);
#ifdef FMG_HAVE_AVX2
    if (g_idot16 != idot16_portable) {  /* the AVX2 and AVX-512 choices */
        idot4_avx2(a, b, n, s);
        return;
    }
#endif
    idot4_portable(a, b, n, s);
}

static inline void idot16(const int8_t *a, const int8_t *b, int64_t n, int32_t *s)
{
    if (!g_idot16) fmg_q8_set_isa(NULL);
    g_idot16(a, b, n, s);
}

/* K-quants as ggml-cpu's tiled matmul (tiled/tiled-kernel.cpp, AVX512-VNNI) computes a batch of 8
 * or more tokens over weights outside the repack buffer: per super-block the integer sums times the
 * weight's d, less its dmin times the mins' sum (one fused op), then times the activation's d,
 * added to the row's total. */
static inline __attribute__((always_inline)) float combine_tiled(int type, const uint8_t *b, const int32_t *s16,
                                                                 const float *xd, const int32_t *bsum, int64_t n)
{
    float acc = 0.0f;
    if (type == FMG_Q6_K) {
        for (int64_t i = 0; i < n / QK_K; i++, b += 210, s16 += 16) {
            const int8_t *sc = (const int8_t *)(b + 192);
            int32_t isum = 0;
            for (int g = 0; g < 16; g++) isum += sc[g] * s16[g];
            const float res = (float)isum * fm_h2f(fm_ld16((const uint16_t *)(b + 208)));
            acc += res * xd[i];
        }
        return acc;
    }
    const int bs = type == FMG_Q4_K ? 144 : 176;
    for (int64_t i = 0; i < n / QK_K; i++, b += bs, s16 += 16, bsum += 16) {
        int32_t isum = 0, msum = 0;
        for (int s = 0; s < 8; s++) {
            int sc, m;
            scale_min_k4(b + 4, s, &sc, &m);
            isum += sc * (s16[2 * s] + s16[2 * s + 1]);
            msum += m * (bsum[2 * s] + bsum[2 * s + 1]);
        }
        const float r1 = (float)isum * fm_h2f(fm_ld16((const uint16_t *)b));
        const float res = fmaf(-fm_h2f(fm_ld16((const uint16_t *)(b + 2))), (float)msum, r1);
        acc += res * xd[i];
    }
    return acc;
}

/* Which float order llama.cpp's CPU backend (x86, AVX-512 build) gives a K-quant product of token
 * t: Q4_K weights live in its repack buffer (rows % 8 == 0, every Q4_K matrix of real models):
 * a matmul takes its GEMM for the tokens in whole groups of 4 and its GEMV for the rest, an
 * expert's rows (mul_mat_id) the GEMV; Q5_K and Q6_K go through the tiled matmul from 8 tokens
 * on (per matmul or per expert), below that through vec_dot (AVX2). */
enum { ORD_PLAIN, ORD_GEMM, ORD_GEMV, ORD_TILED, ORD_VEC };

static inline int k_order(int type, const fmg_qact *a, int64_t t)
{
    if (type == FMG_Q4_K)
        return !a->mmid && a->T > 3 && t < a->T - a->T % 4 ? ORD_GEMM : ORD_GEMV;
    if (type == FMG_Q5_K || type == FMG_Q6_K) return a->T >= 8 ? ORD_TILED : ORD_VEC;
    return ORD_PLAIN;
}

/* Q4_K through ggml's repacked q4_K_8x8 kernels (arch/x86/repack.cpp): the integer sums times
 * d_w * d_x fused into a float accumulator, and the mins' apart, once per pair of sub-blocks (the
 * GEMM) or per super-block (the GEMV); then one from the other. */
static inline __attribute__((always_inline)) float repack_q4_k(const uint8_t *b, const int32_t *s16, const float *xd,
                                                               const int32_t *bsum, int64_t n, int per_pair)
{
    float acc = 0.0f, accm = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, b += 144, s16 += 16, bsum += 16) {
        const float dd = fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i];
        const float dm = fm_h2f(fm_ld16((const uint16_t *)(b + 2))) * xd[i];
        int32_t isum = 0, msum = 0;
        for (int p = 0; p < 4; p++) {
            int32_t ip = 0, mp = 0;
            for (int s = 2 * p; s < 2 * p + 2; s++) {
                int sc, m;
                scale_min_k4(b + 4, s, &sc, &m);
                ip += sc * (s16[2 * s] + s16[2 * s + 1]);
                mp += m * (bsum[2 * s] + bsum[2 * s + 1]);
            }
            if (per_pair) {
                acc = fmaf((float)ip, dd, acc);
                accm = fmaf((float)mp, dm, accm);
            }
            isum += ip;
            msum += mp;
        }
        if (!per_pair) {
            acc = fmaf((float)isum, dd, acc);
            accm = fmaf((float)msum, dm, accm);
        }
    }
    return acc - accm;
}

/* hsum_float_8: the upper half onto the lower, then (0 + 2) + (1 + 3). */
static inline float hsum8(const float *v)
{
    float s4[4];
    for (int i = 0; i < 4; i++) s4[i] = v[i + 4] + v[i];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* ggml_vec_dot_q5_K_q8_K (AVX2): 8 lanes, lane k summing elements 4k..4k+3 of every sub-block
 * times its scale, one fused multiply-add a super-block each; the mins' term in a scalar. s4: the
 * sums of 4 (unsigned quants). */
static float vec_q5_k(const uint8_t *b, const int32_t *s4, const float *xd, const int32_t *bsum, int64_t n)
{
    float acc[8] = {0}, summs = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, b += 176, s4 += 64, bsum += 16) {
        const float d = xd[i] * fm_h2f(fm_ld16((const uint16_t *)b));
        const float dmin = -xd[i] * fm_h2f(fm_ld16((const uint16_t *)(b + 2)));
        int sc[8], m[8];
        int32_t msum = 0;
        for (int s = 0; s < 8; s++) {
            scale_min_k4(b + 4, s, &sc[s], &m[s]);
            msum += m[s] * (bsum[2 * s] + bsum[2 * s + 1]);
        }
        summs = fmaf(dmin, (float)msum, summs);
        for (int k = 0; k < 8; k++) {
            int32_t l = 0;
            for (int s = 0; s < 8; s++) l += sc[s] * s4[8 * s + k];
            acc[k] = fmaf(d, (float)l, acc[k]);
        }
    }
    return hsum8(acc) + summs;
}

/* ggml_vec_dot_q6_K_q8_K (AVX2): lane k sums elements 4k..4k+3 of each run of 32 (unsigned quants,
 * the scale of its half), less 32 * the scaled sums of the 16-groups 2k and 2k+1. s4: sums of 4
 * of the signed (q - 32) quants; xq: the activation quants. */
static float vec_q6_k(const uint8_t *b, const int32_t *s4, const int8_t *xq, const float *xd, const int32_t *bsum,
                      int64_t n)
{
    float acc[8] = {0};
    for (int64_t i = 0; i < n / QK_K; i++, b += 210, s4 += 64, xq += QK_K, bsum += 16) {
        const float d = xd[i] * fm_h2f(fm_ld16((const uint16_t *)(b + 208)));
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int k = 0; k < 8; k++) {
            int32_t l = 0;
            for (int c = 0; c < 8; c++) {
                const int j = 8 * c + k;
                const int32_t x4 = xq[4 * j] + xq[4 * j + 1] + xq[4 * j + 2] + xq[4 * j + 3];
                l += sc[2 * c + (k >= 4)] * (s4[j] + 32 * x4);
            }
            l -= 32 * (sc[2 * k] * bsum[2 * k] + sc[2 * k + 1] * bsum[2 * k + 1]);
            acc[k] = fmaf(d, (float)l, acc[k]);
        }
    }
    return hsum8(acc);
}

/* The row's dot from its per-16 integer sums and the block scales, block by block. */
static inline __attribute__((always_inline)) float combine(int type, const uint8_t *b, const int32_t *s16,
                                                           const float *xd, const float *xs,
                                                           const int32_t *bsum, int64_t n)
{
    float acc = 0.0f;
    switch (type) {
    case FMG_Q4_0:  /* ggml's repacked Q4_0 (q4_0_8x8, its x86 GEMV and GEMM): one fused multiply-add a block */
        for (int64_t i = 0; i < n / QK; i++, b += 18)
            acc = fmaf((float)(s16[2 * i] + s16[2 * i + 1]), fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i], acc);
        break;
    case FMG_Q8_0: {  /* ggml_vec_dot_q8_0_q8_0 (AVX2) and llamafile's tinyBLAS_Q0: 8 lanes of 4
                       * elements (s16 holds sums of 4 here), a fused multiply-add a block in each,
                       * then hsum_float_8's order */
        float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < n / QK; i++, b += 34, s16 += 8) {
            const float d = fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i];
            for (int k = 0; k < 8; k++) l[k] = fmaf((float)s16[k], d, l[k]);
        }
        acc = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
        break;
    }
    case FMG_Q5_0: {
        const int bs = 22;
        for (int64_t i = 0; i < n / QK; i++, b += bs) {
            const float d = fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i];
            acc += (float)(s16[2 * i] + s16[2 * i + 1]) * d;
        }
        break;
    }
    case FMG_MXFP4:  /* ggml_vec_dot_mxfp4_q8_0: d = x's fp16 scale times half the e8m0 one */
        for (int64_t i = 0; i < n / QK; i++, b += 17) {
            const float d = xd[i] * e8m0_half(b[0]);
            acc += d * (float)(s16[2 * i] + s16[2 * i + 1]);
        }
        break;
    case FMG_Q4_1: case FMG_Q5_1: {
        const int bs = type == FMG_Q4_1 ? 20 : 24;
        for (int64_t i = 0; i < n / QK; i++, b += bs) {
            const float d = fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i];
            const float m = fm_h2f(fm_ld16((const uint16_t *)(b + 2))) * xs[i];
            acc += (float)(s16[2 * i] + s16[2 * i + 1]) * d + m;
        }
        break;
    }
    case FMG_Q4_K: case FMG_Q5_K: {
        const int bs = type == FMG_Q4_K ? 144 : 176;
        for (int64_t i = 0; i < n / QK_K; i++, b += bs, s16 += 16, bsum += 16) {
            int32_t isum = 0, msum = 0;
            for (int s = 0; s < 8; s++) {
                int sc, m;
                scale_min_k4(b + 4, s, &sc, &m);
                isum += sc * (s16[2 * s] + s16[2 * s + 1]);
                msum += m * (bsum[2 * s] + bsum[2 * s + 1]);
            }
            const float d = fm_h2f(fm_ld16((const uint16_t *)b)) * xd[i];
            const float dmin = fm_h2f(fm_ld16((const uint16_t *)(b + 2))) * xd[i];
            acc += d * (float)isum;
            acc -= dmin * (float)msum;
        }
        break;
    }
    case FMG_Q6_K:
        for (int64_t i = 0; i < n / QK_K; i++, b += 210, s16 += 16) {
            const int8_t *sc = (const int8_t *)(b + 192);
            int32_t isum = 0;
            for (int g = 0; g < 16; g++) isum += sc[g] * s16[g];
            acc += fm_h2f(fm_ld16((const uint16_t *)(b + 208))) * xd[i] * (float)isum;
        }
        break;
    }
    return acc;
}

int64_t fmg_q8_scratch_bytes(int64_t n)
{
    return n + n / 4 * (int64_t)sizeof(int32_t) + 64;  /* Q8_0 keeps sums of 4, the others of 16 */
}

/* Cloned for x86-64-v3 (FMA: fmaf inlined as one instruction, not a libm call) and the baseline;
 * fmaf is one rounding either way and this file forbids contraction, so the clones agree. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void fmg_q8_rows_dot(int type, const uint8_t *data, int64_t row_bytes, int64_t r0, int64_t r1, const fmg_qact *a,
                     float *out, int64_t ldo, void *scratch)
{
    const int64_t n = a->n;
    int32_t *s16 = (int32_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    int8_t *w = (int8_t *)(s16 + n / 4);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = data + r * row_bytes;
        unpack_row(type, b, n, w);
        for (int64_t t = 0; t < a->T; t++) {
            const int ord = k_order(type, a, t);
            const float *xd = a->d + t * (n / QK);
            const int32_t *bs = a->bsum + t * (n / 16);
            if (ord == ORD_VEC) {
                idot4(w, a->q + t * n, n, s16);
                out[t * ldo + r - r0] = type == FMG_Q5_K ? vec_q5_k(b, s16, xd, bs, n)
                                                         : vec_q6_k(b, s16, a->q + t * n, xd, bs, n);
                continue;
            }
            if (type == FMG_Q8_0)
                idot4(w, a->q + t * n, n, s16);
            else
                idot16(w, a->q + t * n, n, s16);
            out[t * ldo + r - r0] = ord == ORD_TILED ? combine_tiled(type, b, s16, xd, bs, n)
                                  : ord != ORD_PLAIN ? repack_q4_k(b, s16, xd, bs, n, ord == ORD_GEMM)
                                  : combine(type, b, s16, xd, a->s + t * (n / QK), bs, n);
        }
    }
}
