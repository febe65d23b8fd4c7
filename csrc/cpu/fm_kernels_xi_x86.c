/* AVX2 and AVX-512 (VNNI) kernels of decode with integer activations, and the AVX-512 preparation;
 * formats, layout and numerics in fm_kernels_xi.h. Compiled without -m flags: each function
 * carries its target attribute; fm_kernels_xi.c dispatches. */
#include "fm_kernels_xi.h"

#ifdef FM_HAVE_X86
#include <float.h>
#include <immintrin.h>

#include "fm_x86.h"

#define INL_XI2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define T_XI2 __attribute__((target("avx2,fma,f16c")))
#define INL_XI512 static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define T_XI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* ------------------------------------------------------------------ AVX2 */

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
    *bs = br ? fm_hsum256(bacc) + bt : 0.0f;
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
    for (int i = 0; i < NR; i++) res[i] = fm_hsum256(acc[i]) + bs[i];
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
    for (int i = 0; i < NR; i++) res[i] = fm_hsum256(acc[i]) + bs[i];
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
            tail = fm_hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(A), _mm256_set1_ps(sc[i][g - g0])));
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

T_XI512 static void xi_prepare_avx512(int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp)
{
    const int64_t G = gb;
    int8_t *dg = (int8_t *)xp;
    int32_t *corr = (int32_t *)((uint8_t *)xp + 3 * K);
    float *steps = (float *)((uint8_t *)xp + 4 * K);
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g0 = ga; g0 < G;) {
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
                fm_xi_quantize_group(v, Xs, steps + g);
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
fm_rows_fn fm_xi_rows_x86(int level, int fmt)
{
    if (level == FM_ISA_AVX512) return fmt == FM_Q4 ? rows_q4_xi_avx512 : rows_q8_xi_avx512;
    return fmt == FM_Q4 ? rows_q4_xi_avx2 : rows_q8_xi_avx2;
}

void fm_xi_prepare_avx512(int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp)
{
    xi_prepare_avx512(fmt, x, K, ga, gb, xp);
}
#endif /* FM_HAVE_X86 */
