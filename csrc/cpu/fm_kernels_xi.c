/* Decode (one token) of q4 / q8 weights with integer activations: integer dot products in place
 * of the fp32 decode-and-FMA of fm_kernels_x86.c (issue 10: those spend an AND, a conversion and
 * a multiply per 16 weights besides the FMA, and ran at ~0.55 of the copy bandwidth on 2 cores).
 *
 * Each group of 64 activations is quantized to 21-bit integers, X = round(x / d) with
 * d = max|x| / FM_XI_MAX, and X is written as three balanced base-128 digits,
 *     X = x2 * 2^14 + x1 * 2^7 + x0,   x2, x1, x0 in [-64, 63],
 * each an int8 that a u8 x s8 integer dot (AVX-512 VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd)
 * multiplies with the weight codes. Per 32-bit lane the three digit sums are combined exactly in
 * int32 (A = ((A2 << 7) + A1) << 7) + A0 = sum q*X), converted to float once per lane and
 * scaled once per group by s_g * d_g. The activation error is at most d/2 = max|x_g| * 4.8e-7
 * per element, the order of fp32 rounding: the kernels keep the fp32 path's 1e-5 bound (tested)
 * and the engine's 1e-4 logit checks. q8 codes are signed: they are offset to u = q + 128 (an XOR)
 * and 128 * sum X per lane, prepared with the digits, is subtracted in integers (exact; the
 * prepared value starts the lane's accumulator).
 *
 * Prepared area of one token (a->xp, 4K + 4G bytes for K columns, G = K/64 groups):
 *   bytes [0, 3K)     digits, 192 bytes per group (group g at 192 g);
 *                     q8: digit p of element e at 64 p + e;
 *                     q4, a block of n groups (AVX-512: pairs, then a lone last group; else 1):
 *                     digit p of element e of group j at ((2 p + e % 2) n + j) 32 + e / 2,
 *                     i.e. even elements (low nibbles) then odd ones (high nibbles);
 *   bytes [3K, 4K)    q8: int32 lane corrections, -128 * sum of X over elements 4l..4l+3;
 *   bytes [4K, 4K+4G) float steps d_g.
 * Sums of the lanes can overflow nowhere: |sum q*X| per lane <= 8 * 15 * 2^20 (q4) and
 * 4 * 255 * 2^20 (q8) < 2^31; vpmaddubsw pairs <= 2 * 255 * 64 < 2^15 (no saturation). */
#include "fm_kernels_internal.h"

#include <float.h>
#include <math.h>

#define FM_XI_MAX 1040319 /* 63 * (2^14 + 2^7 + 1): every X in [-FM_XI_MAX, FM_XI_MAX] has 3 digits */
#define XI_GROUP_BYTES 192

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
#define XI_TINY 1e-30f

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

static void quantize_group(const float *v, int32_t *X, float *step)
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

static void xi_prepare_scalar(int level, int fmt, const float *x, int64_t K, float *xp)
{
    const int64_t G = K / 64;
    int8_t *dg = (int8_t *)xp;
    int32_t *corr = (int32_t *)((uint8_t *)xp + 3 * K);
    float *steps = (float *)((uint8_t *)xp + 4 * K);
    const int nb = fmt == FM_Q4 ? q4_block(level) : 1;
    int32_t X[64];
    int8_t d[3];
    for (int64_t g0 = 0; g0 < G;) {
        const int n = G - g0 >= nb ? nb : 1;
        for (int j = 0; j < n; j++) {
            const int64_t g = g0 + j;
            quantize_group(x + g * 64, X, steps + g);
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

static inline const int8_t *xi_digits(const fm_act *a) { return (const int8_t *)a->xp; }
static inline const int32_t *xi_corr(const fm_act *a, int64_t K) { return (const int32_t *)((const uint8_t *)a->xp + 3 * K); }
static inline const float *xi_steps(const fm_act *a, int64_t K) { return (const float *)((const uint8_t *)a->xp + 4 * K); }

/* ------------------------------------------------------------------ drivers
 * Rows of up to XI_LONG_COLS columns are computed one at a time, whole (their digits stay in
 * L1). Longer rows (Mixtral's down projection: 14336 columns, 43 KB of digits) go NR rows at a
 * time in column blocks of at most 112 groups, so that each digit vector loaded serves NR rows
 * (as fm_kernels_x86.c's DECODE_DRIVER). A row's result does not depend on NR: every row is one
 * accumulation chain in the same order, so thread counts and chunking change no bit. */
#define XI_LONG_COLS 6144
#define XI_MAXGB 112

static inline int64_t xi_colblock(int64_t G)
{
    if (G <= XI_MAXGB) return G;
    const int64_t nb = (G + XI_MAXGB - 1) / XI_MAXGB;
    return ((G + nb - 1) / nb + 3) & ~(int64_t)3; /* equal blocks, a multiple of 4 groups */
}

/* RANGE(w, r, g0, g1, a, NR, pf, res): rows r..r+NR-1 over groups [g0, g1) into res[0..NR).
 * Software prefetch, pf.l1 bytes ahead into L1 and pf.l2 ahead into L2: a whole row streams
 * contiguously (fm_prefetch_bytes and 4x that ahead); a column block prefetches the next row
 * block's same columns into L1 and the one after into L2. The far L2 prefetch matters here:
 * these kernels need ~half the cycles of the fp32 ones, so a stream's misses are exposed (q4
 * 14336x4096 on one Zen 4 core: 11.0 GB/s with the L1 prefetch alone, 16.4 with both; fp32 12.3). */
typedef struct {
    int64_t l1, l2;
} xi_pf;
static inline xi_pf xi_prefetch(int64_t ahead_rows_bytes, int blocked)
{
    xi_pf p = {0, 0};
    if (!fm_prefetch_bytes) return p;
    p.l1 = blocked ? ahead_rows_bytes : fm_prefetch_bytes;
    p.l2 = blocked ? 2 * ahead_rows_bytes : 4 * (int64_t)fm_prefetch_bytes;
    return p;
}
#define XI_PREFETCH(q, pf)                                                                        \
    do {                                                                                          \
        if ((pf).l1) {                                                                            \
            _mm_prefetch((const char *)(q) + (pf).l1, _MM_HINT_T0);                               \
            _mm_prefetch((const char *)(q) + (pf).l2, _MM_HINT_T1);                               \
        }                                                                                         \
    } while (0)
#define XI_DRIVER(RANGE, NR)                                                                      \
    do {                                                                                          \
        const int64_t G_ = w->cols / 64, GB_ = w->cols > XI_LONG_COLS ? xi_colblock(G_) : G_;     \
        const int64_t rb_ = xi_row_bytes(w);                                                     \
        for (int64_t g0 = 0; g0 < G_; g0 += GB_) {                                                \
            const int64_t g1 = g0 + GB_ < G_ ? g0 + GB_ : G_;                                     \
            const xi_pf pfn = xi_prefetch((NR) * rb_, GB_ < G_), pf1 = xi_prefetch(rb_, GB_ < G_);  \
            int64_t r = r0;                                                                       \
            float part[NR];                                                                       \
            if (GB_ < G_)                                                                         \
                for (; r + (NR) <= r1; r += (NR)) {                                               \
                    RANGE(w, r, g0, g1, a, NR, pfn, part);                                        \
                    for (int i_ = 0; i_ < (NR); i_++)                                             \
                        out[r + i_ - r0] = g0 == 0 ? part[i_] : out[r + i_ - r0] + part[i_];      \
                }                                                                                 \
            for (; r < r1; r++) {                                                                 \
                RANGE(w, r, g0, g1, a, 1, pf1, part);                                             \
                out[r - r0] = g0 == 0 ? part[0] : out[r - r0] + part[0];                          \
            }                                                                                     \
        }                                                                                         \
    } while (0)

static inline int64_t xi_row_bytes(const fm_mat *w) { return w->fmt == FM_Q4 ? w->cols / 2 : w->cols; }

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

#ifdef FM_HAVE_X86
#include <immintrin.h>

#define INL_XI2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define T_XI2 __attribute__((target("avx2,fma,f16c")))
#define INL_XI512 static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define T_XI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* ------------------------------------------------------------------ AVX2 */

INL_XI2 float xi_hsum256(__m256 v)
{
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

/* groups [g0, g0+n) of one row: sc[j] = s_g * d_g (sc holds n + 16, the rest zeroed) and the
 * bias term sum b_g * sum(x_g) */
INL_XI2 void xi_prologue_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t n, const fm_act *a, const float *st,
                              float *sc, float *bs)
{
    const int64_t G = w->cols / 64;
    const uint16_t *sr = w->s + r * G + g0, *br = w->b ? w->b + r * G + g0 : NULL;
    const float *xs = a->xs + g0;
    st += g0;
    __m256 bacc = _mm256_setzero_ps();
    float bt = 0.0f;
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) {
        _mm256_storeu_ps(sc + g, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g))), _mm256_loadu_ps(st + g)));
        if (br) bacc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br + g))), _mm256_loadu_ps(xs + g), bacc);
    }
    for (; g < n; g++) {
        sc[g] = fm_h2f(fm_ld16(sr + g)) * st[g];
        if (br) bt += fm_h2f(fm_ld16(br + g)) * xs[g];
    }
    for (int i = 0; i < 16; i++) sc[n + i] = 0.0f;
    *bs = br ? xi_hsum256(bacc) + bt : 0.0f;
}

/* one digit's lane sums of a q4 group (lo: low nibbles, hi: high nibbles; x: the digit's 64 bytes) */
INL_XI2 __m256i q4_digit_avx2(__m256i lo, __m256i hi, const int8_t *x, __m256i ones)
{
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_madd_epi16(p, ones);
}

INL_XI2 void q4_xi_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NR, xi_pf pf,
                        float *res)
{
    const int64_t K = w->cols, rb = K / 2;
    const int8_t *dg = xi_digits(a);
    const float *st = xi_steps(a, K);
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    float sc[2][XI_MAXGB + 16], bs[2];
    __m256 acc[2];
    for (int i = 0; i < NR; i++) {
        xi_prologue_avx2(w, r + i, g0, g1 - g0, a, st, sc[i], &bs[i]);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *xb = dg + g * XI_GROUP_BYTES;
        for (int i = 0; i < NR; i++) {
            const uint8_t *q = w->q + (r + i) * rb + g * 32;
            if (!(g & 1)) XI_PREFETCH(q, pf);
            const __m256i v = _mm256_loadu_si256((const __m256i *)q);
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            __m256i A = q4_digit_avx2(lo, hi, xb, ones);
            A = _mm256_add_epi32(_mm256_slli_epi32(A, 7), q4_digit_avx2(lo, hi, xb + 64, ones));
            A = _mm256_add_epi32(_mm256_slli_epi32(A, 7), q4_digit_avx2(lo, hi, xb + 128, ones));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(A), _mm256_broadcast_ss(sc[i] + (g - g0)), acc[i]);
        }
    }
    for (int i = 0; i < NR; i++) res[i] = xi_hsum256(acc[i]) + bs[i];
}

INL_XI2 __m256i q8_digit_avx2(__m256i u, const int8_t *x, __m256i ones)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)x)), ones);
}

INL_XI2 void q8_xi_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NR, xi_pf pf,
                        float *res)
{
    const int64_t K = w->cols, rb = K;
    const int8_t *dg = xi_digits(a);
    const int32_t *xc = xi_corr(a, K);
    const float *st = xi_steps(a, K);
    const __m256i sgn = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    float sc[2][XI_MAXGB + 16], bs[2];
    __m256 acc[2];
    for (int i = 0; i < NR; i++) {
        xi_prologue_avx2(w, r + i, g0, g1 - g0, a, st, sc[i], &bs[i]);
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *xb = dg + g * XI_GROUP_BYTES;
        const __m256i c0 = _mm256_loadu_si256((const __m256i *)(xc + g * 16));
        const __m256i c1 = _mm256_loadu_si256((const __m256i *)(xc + g * 16 + 8));
        for (int i = 0; i < NR; i++) {
            const uint8_t *q = w->q + (r + i) * rb + g * 64;
            XI_PREFETCH(q, pf);
            const __m256i u0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)q), sgn);
            const __m256i u1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + 32)), sgn);
            __m256i A0 = q8_digit_avx2(u0, xb, ones), A1 = q8_digit_avx2(u1, xb + 32, ones);
            A0 = _mm256_add_epi32(_mm256_slli_epi32(A0, 7), q8_digit_avx2(u0, xb + 64, ones));
            A1 = _mm256_add_epi32(_mm256_slli_epi32(A1, 7), q8_digit_avx2(u1, xb + 96, ones));
            A0 = _mm256_add_epi32(_mm256_slli_epi32(A0, 7), q8_digit_avx2(u0, xb + 128, ones));
            A1 = _mm256_add_epi32(_mm256_slli_epi32(A1, 7), q8_digit_avx2(u1, xb + 160, ones));
            const __m256i A = _mm256_add_epi32(_mm256_add_epi32(A0, c0), _mm256_add_epi32(A1, c1));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(A), _mm256_broadcast_ss(sc[i] + (g - g0)), acc[i]);
        }
    }
    for (int i = 0; i < NR; i++) res[i] = xi_hsum256(acc[i]) + bs[i];
}

#define Q4_XI_AVX2(w, r, g0, g1, a, NR, pf, res) q4_xi_avx2(w, r, g0, g1, a, NR, pf, res)
#define Q8_XI_AVX2(w, r, g0, g1, a, NR, pf, res) q8_xi_avx2(w, r, g0, g1, a, NR, pf, res)
T_XI2 static void rows_q4_xi_avx2(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    (void)ldo;
    XI_DRIVER(Q4_XI_AVX2, 2);
}
T_XI2 static void rows_q8_xi_avx2(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    (void)ldo;
    XI_DRIVER(Q8_XI_AVX2, 2);
}

/* ------------------------------------------------------------------ AVX-512 (VNNI) */

INL_XI512 void xi_prologue_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t n, const fm_act *a,
                                  const float *st, float *sc, float *bs)
{
    const int64_t G = w->cols / 64;
    const uint16_t *sr = w->s + r * G + g0, *br = w->b ? w->b + r * G + g0 : NULL;
    const float *xs = a->xs + g0;
    st += g0;
    __m512 bacc = _mm512_setzero_ps();
    float bt = 0.0f;
    int64_t g = 0;
    for (; g + 16 <= n; g += 16) {
        _mm512_storeu_ps(sc + g, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sr + g))),
                                               _mm512_loadu_ps(st + g)));
        if (br)
            bacc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(br + g))), _mm512_loadu_ps(xs + g), bacc);
    }
    for (; g < n; g++) {
        sc[g] = fm_h2f(fm_ld16(sr + g)) * st[g];
        if (br) bt += fm_h2f(fm_ld16(br + g)) * xs[g];
    }
    for (int i = 0; i < 16; i++) sc[n + i] = 0.0f;
    *bs = br ? _mm512_reduce_add_ps(bacc) + bt : 0.0f;
}

#define XI_NR512 4

/* q4: a 64-byte block is two groups (bytes 0-31 the first); their digits are prepared in pairs
 * (digit p: 64 bytes of low-nibble partners, then 64 of high-nibble partners) */
INL_XI512 void q4_xi_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NR,
                            xi_pf pf, float *res)
{
    const int64_t K = w->cols, rb = K / 2;
    const int8_t *dg = xi_digits(a);
    const float *st = xi_steps(a, K);
    const __m512i m4 = _mm512_set1_epi8(0x0F), z = _mm512_setzero_si512();
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    float sc[XI_NR512][XI_MAXGB + 16], bs[XI_NR512];
    __m512 acc[XI_NR512];
    for (int i = 0; i < NR; i++) {
        xi_prologue_avx512(w, r + i, g0, g1 - g0, a, st, sc[i], &bs[i]);
        acc[i] = _mm512_setzero_ps();
    }
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) {
        const int8_t *xb = dg + g * XI_GROUP_BYTES;
        const __m512i x2l = _mm512_loadu_si512(xb), x2h = _mm512_loadu_si512(xb + 64);
        const __m512i x1l = _mm512_loadu_si512(xb + 128), x1h = _mm512_loadu_si512(xb + 192);
        const __m512i x0l = _mm512_loadu_si512(xb + 256), x0h = _mm512_loadu_si512(xb + 320);
        for (int i = 0; i < NR; i++) {
            const uint8_t *q = w->q + (r + i) * rb + g * 32;
            XI_PREFETCH(q, pf);
            const __m512i v = _mm512_loadu_si512(q);
            const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            /* three independent digit sums (short dependency chains), combined exactly */
            const __m512i A2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, x2l), hi, x2h);
            const __m512i A1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, x1l), hi, x1h);
            const __m512i A0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, x0l), hi, x0h);
            const __m512i A = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(A2, 7), A1), 7), A0);
            const __m512 S = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(_mm_loadu_ps(sc[i] + (g - g0))));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A), S, acc[i]);
        }
    }
    for (int i = 0; i < NR; i++) {
        float tail = 0.0f;
        if (g < g1) { /* the lone last group of a row (blocks of one group: 32 bytes a half-digit) */
            const int8_t *xb = dg + g * XI_GROUP_BYTES;
            const __m256i m4h = _mm256_set1_epi8(0x0F), zh = _mm256_setzero_si256();
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w->q + (r + i) * rb + g * 32));
            const __m256i lo = _mm256_and_si256(v, m4h), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4h);
#define LD(o) _mm256_loadu_si256((const __m256i *)(xb + (o)))
            __m256i A = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zh, lo, LD(0)), hi, LD(32));
            A = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(A, 7), lo, LD(64)), hi, LD(96));
            A = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(A, 7), lo, LD(128)), hi, LD(160));
#undef LD
            tail = xi_hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(A), _mm256_set1_ps(sc[i][g - g0])));
        }
        res[i] = _mm512_reduce_add_ps(acc[i]) + tail + bs[i];
    }
}

INL_XI512 void q8_xi_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NR,
                            xi_pf pf, float *res)
{
    const int64_t K = w->cols, rb = K;
    const int8_t *dg = xi_digits(a);
    const int32_t *xc = xi_corr(a, K);
    const float *st = xi_steps(a, K);
    const __m512i sgn = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    float sc[XI_NR512][XI_MAXGB + 16], bs[XI_NR512];
    __m512 acc[XI_NR512];
    for (int i = 0; i < NR; i++) {
        xi_prologue_avx512(w, r + i, g0, g1 - g0, a, st, sc[i], &bs[i]);
        acc[i] = _mm512_setzero_ps();
    }
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *xb = dg + g * XI_GROUP_BYTES;
        const __m512i x2 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64), x0 = _mm512_loadu_si512(xb + 128);
        const __m512i c = _mm512_loadu_si512(xc + g * 16);
        for (int i = 0; i < NR; i++) {
            const uint8_t *q = w->q + (r + i) * rb + g * 64;
            XI_PREFETCH(q, pf);
            const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q), sgn);
            const __m512i A2 = _mm512_dpbusd_epi32(z, u, x2), A0 = _mm512_dpbusd_epi32(c, u, x0);
            const __m512i A = _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(A2, 7), u, x1), 7), A0);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A), _mm512_set1_ps(sc[i][g - g0]), acc[i]);
        }
    }
    for (int i = 0; i < NR; i++) res[i] = _mm512_reduce_add_ps(acc[i]) + bs[i];
}

/* the preparation (layout above), 64 activations at a time */
INL_XI512 void xi_digits512(__m512i X, __m512i d[3])
{
    const __m512i c64 = _mm512_set1_epi32(64), m127 = _mm512_set1_epi32(127);
    d[2] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c64), m127), c64);
    const __m512i X1 = _mm512_srai_epi32(_mm512_sub_epi32(X, d[2]), 7);
    d[1] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X1, c64), m127), c64);
    d[0] = _mm512_srai_epi32(_mm512_sub_epi32(X1, d[1]), 7);
}

/* the digits of four vectors of 16 (a, b, c, d in that order) as 64 bytes per digit */
INL_XI512 void xi_pack512(const __m512i X[4], __m512i out[3])
{
    __m512i d[4][3];
    for (int k = 0; k < 4; k++) xi_digits512(X[k], d[k]);
    for (int p = 0; p < 3; p++) {
        __m512i v = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(d[0][p]));
        v = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(d[1][p]), 1);
        v = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(d[2][p]), 2);
        out[p] = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(d[3][p]), 3);
    }
}

T_XI512 static void xi_prepare_avx512(int fmt, const float *x, int64_t K, float *xp)
{
    const int64_t G = K / 64;
    int8_t *dg = (int8_t *)xp;
    int32_t *corr = (int32_t *)((uint8_t *)xp + 3 * K);
    float *steps = (float *)((uint8_t *)xp + 4 * K);
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g0 = 0; g0 < G;) {
        const int n = fmt == FM_Q4 && G - g0 >= 2 ? 2 : 1;
        __m512i D[2][3]; /* q4: per group of the block, the 64 bytes [even 32 | odd 32] of each digit */
        for (int j = 0; j < n; j++) {
            const int64_t g = g0 + j;
            const float *v = x + g * 64;
            __m512 a[4];
            __m512i X[4];
            __m512 mx = _mm512_setzero_ps();
            for (int k = 0; k < 4; k++) {
                a[k] = _mm512_loadu_ps(v + 16 * k);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(a[k]));
            }
            const float m = _mm512_reduce_max_ps(mx); /* max_ps drops NaNs: quantize_group sees them */
            int special = !(m <= FLT_MAX) || m < XI_TINY;
            for (int k = 0; k < 4; k++) special |= _mm512_cmp_ps_mask(a[k], a[k], _CMP_UNORD_Q) != 0;
            if (special) {
                int32_t Xs[64];
                quantize_group(v, Xs, steps + g);
                for (int k = 0; k < 4; k++) X[k] = _mm512_loadu_si512(Xs + 16 * k);
            } else {
                const __m512 inv = _mm512_set1_ps((float)FM_XI_MAX / m);
                for (int k = 0; k < 4; k++) X[k] = _mm512_cvtps_epi32(_mm512_mul_ps(a[k], inv));
                steps[g] = m / (float)FM_XI_MAX;
            }
            if (fmt == FM_Q4) {
                const __m512i E[4] = {_mm512_permutex2var_epi32(X[0], ev, X[1]), _mm512_permutex2var_epi32(X[2], ev, X[3]),
                                      _mm512_permutex2var_epi32(X[0], od, X[1]), _mm512_permutex2var_epi32(X[2], od, X[3])};
                xi_pack512(E, D[j]);
            } else {
                __m512i P[3];
                xi_pack512(X, P);
                int8_t *base = dg + g * XI_GROUP_BYTES;
                __m512i S = _mm512_setzero_si512();
                for (int p = 0; p < 3; p++) {
                    _mm512_storeu_si512(base + 64 * p, P[p]);
                    S = _mm512_dpbusd_epi32(p ? _mm512_slli_epi32(S, 7) : S, ones, P[p]);
                }
                _mm512_storeu_si512(corr + g * 16, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(S, 7)));
            }
        }
        if (fmt == FM_Q4) {
            int8_t *base = dg + g0 * XI_GROUP_BYTES;
            for (int p = 0; p < 3; p++) {
                if (n == 2) { /* [g even | g+1 even], [g odd | g+1 odd] */
                    _mm512_storeu_si512(base + 128 * p, _mm512_shuffle_i64x2(D[0][p], D[1][p], 0x44));
                    _mm512_storeu_si512(base + 128 * p + 64, _mm512_shuffle_i64x2(D[0][p], D[1][p], 0xEE));
                } else {
                    _mm512_storeu_si512(base + 64 * p, D[0][p]);
                }
            }
        }
        g0 += n;
    }
}

#define Q4_XI_512(w, r, g0, g1, a, NR, pf, res) q4_xi_avx512(w, r, g0, g1, a, NR, pf, res)
#define Q8_XI_512(w, r, g0, g1, a, NR, pf, res) q8_xi_avx512(w, r, g0, g1, a, NR, pf, res)
T_XI512 static void rows_q4_xi_avx512(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    (void)ldo;
    XI_DRIVER(Q4_XI_512, XI_NR512);
}
T_XI512 static void rows_q8_xi_avx512(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    (void)ldo;
    XI_DRIVER(Q8_XI_512, XI_NR512);
}
#endif /* FM_HAVE_X86 */

fm_rows_fn fm_xi_rows(int level, int fmt)
{
    if (fmt != FM_Q4 && fmt != FM_Q8) return NULL;
#ifdef FM_HAVE_X86
    if (level == FM_ISA_AVX512) return fmt == FM_Q4 ? rows_q4_xi_avx512 : rows_q8_xi_avx512;
    if (level == FM_ISA_AVX2) return fmt == FM_Q4 ? rows_q4_xi_avx2 : rows_q8_xi_avx2;
#endif
    (void)level;
    return rows_xi_portable;
}

void fm_xi_prepare(int level, int fmt, const float *x, int64_t K, float *xp)
{
#ifdef FM_HAVE_X86
    if (level == FM_ISA_AVX512) {
        xi_prepare_avx512(fmt, x, K, xp);
        return;
    }
#endif
    xi_prepare_scalar(level, fmt, x, K, xp);
}
