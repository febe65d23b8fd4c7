/* AVX2 and AVX-512 row kernels (x86-64 only). Compiled without -m flags: each function carries
 * its own target attribute and fm_kernels.c picks a table at run time (__builtin_cpu_supports).
 *
 * Quantized rows are computed as sum_g s_g*(q_g·x_g) + b_g*sum(x_g) with fp32 accumulation.
 * Packed fields are taken in place: a 32-bit lane holds 8 nibbles (q4) or 16 crumbs (q2); the
 * lane is shifted right by 16 (q4) or 8/16/24 (q2) bits and one of four masks picks field f as
 * q << bits*(f%4), which converts to float exactly. The activations were prepared (fm_prepare)
 * in the matching permuted order and pre-multiplied by 2^-(bits*(f%4)), so each product is
 * exactly q*x. The scale is folded in once per converted vector (w = q*s, shared by every token
 * of a block) and w*x accumulates into several independent chains per token, so FMA latency is
 * hidden. The bias term b_g*sum(x_g) is one short dot per row (f16 biases x group sums). Per
 * weight: an AND, an int->float conversion and a multiply, shared by the tokens, and one FMA
 * per token (prefill reuses each register tile for up to 4 (AVX2) or 8 (AVX-512) tokens). */
#include "fm_kernels_internal.h"

#ifdef FM_HAVE_X86
#include <immintrin.h>

#include "fm_x86.h"

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define INL_AVX2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))
#define INL_AVX512 static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))

/* Column blocks (token blocks of 2+): a row is computed in blocks of groups whose prepared
 * activations for all tokens of the block (<= 24 KiB) stay in L1 while every row of the task's
 * chunk streams past them. A single token reads one activation per 8 weights and keeps whole
 * rows, so that the weights stream through memory contiguously (prefetchers, software
 * prefetch ahead in the stream). */
#define MAXGB 1024 /* groups per block at most (65536 columns); a multiple of 4 */
static inline int64_t colblock_groups(int nt, int64_t G)
{
    if (nt == 1) return G < MAXGB ? G : MAXGB;
    int64_t gb = ((24 << 10) / (nt * 256)) & ~(int64_t)3;
    return gb < 4 ? 4 : gb > MAXGB ? MAXGB : gb;
}

/* The software prefetch target, bytes ahead of the weights being read: for one token the
 * contiguous stream (fm_prefetch_bytes); for column blocks the same block of the next row. */
static inline int64_t prefetch_offset(int nt, int64_t rowbytes)
{
    return fm_prefetch_bytes == 0 ? 0 : nt == 1 ? fm_prefetch_bytes : rowbytes;
}

/* Drives RANGE(r, g0, g1, part) over the column blocks and rows of a task; part[t] is the
 * partial dot of row r with token t over groups [g0, g1). */
#define COLBLOCK_DRIVER(RANGE)                                                                   \
    do {                                                                                         \
        const int64_t G_ = w->cols / 64, GB_ = colblock_groups(NT, G_);                          \
        for (int64_t g0 = 0; g0 < G_; g0 += GB_) {                                               \
            const int64_t g1 = g0 + GB_ < G_ ? g0 + GB_ : G_;                                    \
            for (int64_t r = r0; r < r1; r++) {                                                  \
                float part[FM_MAX_NT];                                                           \
                RANGE(w, r, g0, g1, a, NT, part);                                                \
                float *o = out + (r - r0);                                                       \
                if (g0 == 0)                                                                     \
                    for (int t = 0; t < NT; t++) o[t * ldo] = part[t];                           \
                else                                                                             \
                    for (int t = 0; t < NT; t++) o[t * ldo] += part[t];                          \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* Decode (one token) drives RANGE_NR over NR rows at a time, so that every activation vector
 * loaded serves NR rows: a 14336-column row's prepared activations (57 KB) do not fit L1, and
 * row by row they were re-read from L2 for every row, 8x the bytes of the q4 weights (the down
 * projection ran at 0.6 of the up projection's speed). Each row still streams contiguously.
 * Rows left over (fewer than NR) take the one-row RANGE; which rows those are depends on the
 * task's row range only (chunks are multiples of 8), so results do not depend on the thread
 * count. Rows whose activations fit L1 stay one at a time: there the single contiguous stream
 * is faster (measured on Zen 4: q4 4096 columns 12.9 GB/s one row at a time, 8.0 four at a
 * time; 14336 columns 8.1 against 9.8, q8 8.5 against 13.7, one thread). */
#define DECODE_NR_MIN_COLS 6144
/* and in column blocks of at most 112 groups (28 KB of activations), equal in size, a multiple
 * of 4 groups (the SIMD blocks' plan starts at group 0); the prefetch then targets the next row
 * block's same columns (q4 4096x14336: 9.0 -> 10.8 GB/s on one thread) */
static inline int64_t decode_colblock_groups(int64_t G)
{
    if (G <= 112) return G;
    const int64_t nb = (G + 111) / 112;
    return ((G + nb - 1) / nb + 3) & ~(int64_t)3;
}
#define DECODE_PREFETCH(nr, rb, g0, g1, G) (!fm_prefetch_bytes ? 0 : (g1) - (g0) < (G) ? (nr) * (rb) : fm_prefetch_bytes)
#define DECODE_DRIVER(RANGE_NR, NR, RANGE)                                                       \
    do {                                                                                         \
        const int64_t G_ = w->cols / 64, GB_ = decode_colblock_groups(G_);                         \
        for (int64_t g0 = 0; g0 < G_; g0 += GB_) {                                               \
            const int64_t g1 = g0 + GB_ < G_ ? g0 + GB_ : G_;                                    \
            int64_t r = r0;                                                                      \
            for (; r + (NR) <= r1; r += (NR)) {                                                  \
                float part[NR];                                                                  \
                RANGE_NR(w, r, g0, g1, a, part);                                                 \
                for (int i_ = 0; i_ < (NR); i_++) {                                              \
                    float *o = out + (r + i_ - r0);                                              \
                    *o = g0 == 0 ? part[i_] : *o + part[i_];                                     \
                }                                                                                \
            }                                                                                    \
            for (; r < r1; r++) {                                                                \
                float part[FM_MAX_NT];                                                           \
                RANGE(w, r, g0, g1, a, 1, part);                                                 \
                out[r - r0] = g0 == 0 ? part[0] : out[r - r0] + part[0];                         \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* Groups [g0, g0+n) of one row: scales f16 -> float into sc[0..n) (sc holds n+16, the rest
 * zeroed), and for every token the bias term sum_g b_g * xs_t[g] into bs[t]. */
INL_AVX2 void row_prologue_avx2(const uint16_t *sr, const uint16_t *br, int64_t n, const fm_act *a, int64_t g0,
                                const int NT, float *sc, float *bs)
{
    __m256 bacc[FM_MAX_NT];
    float btail[FM_MAX_NT];
    for (int t = 0; t < NT; t++) {
        bacc[t] = _mm256_setzero_ps();
        btail[t] = 0.0f;
    }
    const float *xs = a->xs + g0;
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) {
        _mm256_storeu_ps(sc + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g))));
        if (br) {
            const __m256 B = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br + g)));
            for (int t = 0; t < NT; t++) bacc[t] = _mm256_fmadd_ps(B, _mm256_loadu_ps(xs + t * a->ldg + g), bacc[t]);
        }
    }
    for (; g < n; g++) {
        sc[g] = fm_h2f(fm_ld16(sr + g));
        if (br) {
            const float b = fm_h2f(fm_ld16(br + g));
            for (int t = 0; t < NT; t++) btail[t] += b * xs[t * a->ldg + g];
        }
    }
    for (int i = 0; i < 16; i++) sc[n + i] = 0.0f;
    for (int t = 0; t < NT; t++) bs[t] = br ? fm_hsum256(bacc[t]) + btail[t] : 0.0f;
}

/* ================================================================== AVX2 */

/* Scale-folded form: per group (or block of groups) the converted fields are multiplied once by
 * the scale vector S, w = q*s, then accumulated as w*x into C independent chains per token, so
 * that no chain waits on FMA latency (C*NT chains in flight) and the conversion and the scale
 * multiply are shared by every token of the block. */
#define CHAINS_AVX2(NT) ((NT) <= 2 ? 4 : 2)
#define MAXC 4

#define FOLD(CVT, off, c)                                                                         \
    do {                                                                                          \
        const __m256 wv = _mm256_mul_ps((CVT), S);                                                \
        for (int t = 0; t < NT; t++)                                                              \
            acc[t][(c) % C] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xg + t * ldx + (off)), acc[t][(c) % C]); \
    } while (0)
#define MASKED(v, m) _mm256_cvtepi32_ps(_mm256_and_si256(v, m))

#define ACC_INIT(ZERO)                                                                            \
    __m256 acc[FM_MAX_NT][MAXC];                                                                  \
    for (int t = 0; t < NT; t++)                                                                  \
        for (int c = 0; c < C; c++) acc[t][c] = ZERO

INL_AVX2 __m256 acc_sum_avx2(__m256 *acc, const int C)
{
    __m256 s = acc[0];
    for (int c = 1; c < C; c++) s = _mm256_add_ps(s, acc[c]);
    return s;
}

/* one q4 group (32 bytes: 8 lanes x 8 nibbles) into the chains */
#define Q4_GROUP_AVX2(qg)                                                                         \
    do {                                                                                          \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qg));                              \
        const __m256i vh = _mm256_srli_epi32(v, 16);                                              \
        FOLD(MASKED(v, m0), 0, 0);                                                                \
        FOLD(MASKED(v, m1), 8, 1);                                                                \
        FOLD(MASKED(v, m2), 16, 2);                                                               \
        FOLD(MASKED(v, m3), 24, 3);                                                               \
        FOLD(MASKED(vh, m0), 32, 4);                                                              \
        FOLD(MASKED(vh, m1), 40, 5);                                                              \
        FOLD(MASKED(vh, m2), 48, 6);                                                              \
        FOLD(MASKED(vh, m3), 56, 7);                                                              \
    } while (0)

/* one q2 pair of groups (32 bytes: lanes 0-3 the first group, 4-7 the second; 16 crumbs a lane) */
#define Q2_PAIR_AVX2(qg)                                                                          \
    do {                                                                                          \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qg));                              \
        for (int b_ = 0; b_ < 4; b_++) {                                                          \
            const __m256i vb = b_ == 0 ? v : _mm256_srli_epi32(v, 8 * b_);                        \
            FOLD(MASKED(vb, c0), (4 * b_ + 0) * 8, 4 * b_ + 0);                                   \
            FOLD(MASKED(vb, c1), (4 * b_ + 1) * 8, 4 * b_ + 1);                                   \
            FOLD(MASKED(vb, c2), (4 * b_ + 2) * 8, 4 * b_ + 2);                                   \
            FOLD(MASKED(vb, c3), (4 * b_ + 3) * 8, 4 * b_ + 3);                                   \
        }                                                                                         \
    } while (0)

INL_AVX2 void q4_range_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                            float *res)
{
    const int C = CHAINS_AVX2(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * (w->cols / 2);
    const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0);
    const __m256i m2 = _mm256_set1_epi32(0xF00), m3 = _mm256_set1_epi32(0xF000);
    float sc[MAXGB + 16], bs[FM_MAX_NT];
    row_prologue_avx2(w->s + r * G + g0, w->b + r * G + g0, g1 - g0, a, g0, NT, sc, bs);
    ACC_INIT(_mm256_setzero_ps());
    const int64_t pf = prefetch_offset(NT, w->cols / 2);
    for (int64_t g = g0; g < g1; g++) {
        const __m256 S = _mm256_broadcast_ss(sc + (g - g0));
        const float *xg = a->xp + g * 64;
        if (pf && !(g & 1)) _mm_prefetch((const char *)(qr + g * 32 + pf), _MM_HINT_T0);
        Q4_GROUP_AVX2(qr + g * 32);
    }
    for (int t = 0; t < NT; t++) res[t] = fm_hsum256(acc_sum_avx2(acc[t], C)) + bs[t];
}

INL_AVX2 void q2_range_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                            float *res)
{
    const int C = CHAINS_AVX2(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * (w->cols / 4);
    const __m256i c0 = _mm256_set1_epi32(3), c1 = _mm256_set1_epi32(0xC);
    const __m256i c2 = _mm256_set1_epi32(0x30), c3 = _mm256_set1_epi32(0xC0);
    float sc[MAXGB + 16], bs[FM_MAX_NT];
    row_prologue_avx2(w->s + r * G + g0, w->b + r * G + g0, g1 - g0, a, g0, NT, sc, bs);
    ACC_INIT(_mm256_setzero_ps());
    int64_t g = g0;
    const int64_t pf = prefetch_offset(NT, w->cols / 4);
    for (; g + 2 <= g1; g += 2) {
        const __m256 S = _mm256_set_m128(_mm_broadcast_ss(sc + (g - g0) + 1), _mm_broadcast_ss(sc + (g - g0)));
        const float *xg = a->xp + g * 64;
        if (pf && !(g & 3)) _mm_prefetch((const char *)(qr + g * 16 + pf), _MM_HINT_T0);
        Q2_PAIR_AVX2(qr + g * 16);
    }
    for (int t = 0; t < NT; t++) {
        float tail = 0.0f; /* a lone last group: natural order */
        if (g < g1) tail = sc[g - g0] * fm_q2_group_nat(qr + g * 16, a->xp + t * ldx + g * 64);
        res[t] = fm_hsum256(acc_sum_avx2(acc[t], C)) + tail + bs[t];
    }
}

#define Q8_CVT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))

INL_AVX2 void q8_range_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                            float *res)
{
    const int C = CHAINS_AVX2(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * w->cols;
    float sc[MAXGB + 16], bs[FM_MAX_NT];
    row_prologue_avx2(w->s + r * G + g0, NULL, g1 - g0, a, g0, NT, sc, bs);
    ACC_INIT(_mm256_setzero_ps());
    const int64_t pf = prefetch_offset(NT, w->cols);
    for (int64_t g = g0; g < g1; g++) {
        const __m256 S = _mm256_broadcast_ss(sc + (g - g0));
        const uint8_t *qg = qr + g * 64;
        const float *xg = a->xp + g * 64;
        if (pf) _mm_prefetch((const char *)(qg + pf), _MM_HINT_T0);
        for (int i = 0; i < 8; i++) FOLD(Q8_CVT8(qg + i * 8), i * 8, i);
    }
    for (int t = 0; t < NT; t++) res[t] = fm_hsum256(acc_sum_avx2(acc[t], C));
}

/* ---- decode, two rows at a time (see DECODE_DRIVER); one chain per field pair and row */
#define NR_AVX2 2

INL_AVX2 void q4_range2_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, float *res)
{
    const int64_t G = w->cols / 64, rb = w->cols / 2;
    const uint8_t *qr = w->q + r * rb;
    const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0);
    const __m256i m2 = _mm256_set1_epi32(0xF00), m3 = _mm256_set1_epi32(0xF000);
    float sc[NR_AVX2][MAXGB + 16], bs[NR_AVX2][FM_MAX_NT];
    for (int i = 0; i < NR_AVX2; i++)
        row_prologue_avx2(w->s + (r + i) * G + g0, w->b + (r + i) * G + g0, g1 - g0, a, g0, 1, sc[i], bs[i]);
    __m256 acc[NR_AVX2][2];
    for (int i = 0; i < NR_AVX2; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const int64_t pf = DECODE_PREFETCH(NR_AVX2, rb, g0, g1, G);
    for (int64_t g = g0; g < g1; g++) {
        const float *xg = a->xp + g * 64;
        __m256i v[NR_AVX2];
        __m256 S[NR_AVX2];
        for (int i = 0; i < NR_AVX2; i++) {
            if (pf && !(g & 1)) _mm_prefetch((const char *)(qr + i * rb + g * 32 + pf), _MM_HINT_T0);
            v[i] = _mm256_loadu_si256((const __m256i *)(qr + i * rb + g * 32));
            S[i] = _mm256_broadcast_ss(sc[i] + (g - g0));
        }
#define F2(vv, m, f)                                                                              \
    do {                                                                                          \
        const __m256 x_ = _mm256_loadu_ps(xg + 8 * (f));                                          \
        for (int i = 0; i < NR_AVX2; i++)                                                         \
            acc[i][(f) & 1] = _mm256_fmadd_ps(_mm256_mul_ps(MASKED(vv[i], m), S[i]), x_, acc[i][(f) & 1]); \
    } while (0)
        F2(v, m0, 0);
        F2(v, m1, 1);
        F2(v, m2, 2);
        F2(v, m3, 3);
        for (int i = 0; i < NR_AVX2; i++) v[i] = _mm256_srli_epi32(v[i], 16);
        F2(v, m0, 4);
        F2(v, m1, 5);
        F2(v, m2, 6);
        F2(v, m3, 7);
#undef F2
    }
    for (int i = 0; i < NR_AVX2; i++) res[i] = fm_hsum256(_mm256_add_ps(acc[i][0], acc[i][1])) + bs[i][0];
}

INL_AVX2 void q8_range2_avx2(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, float *res)
{
    const int64_t G = w->cols / 64, rb = w->cols;
    const uint8_t *qr = w->q + r * rb;
    float sc[NR_AVX2][MAXGB + 16], bs[NR_AVX2][FM_MAX_NT];
    for (int i = 0; i < NR_AVX2; i++) row_prologue_avx2(w->s + (r + i) * G + g0, NULL, g1 - g0, a, g0, 1, sc[i], bs[i]);
    __m256 acc[NR_AVX2][2];
    for (int i = 0; i < NR_AVX2; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const int64_t pf = DECODE_PREFETCH(NR_AVX2, rb, g0, g1, G);
    for (int64_t g = g0; g < g1; g++) {
        const float *xg = a->xp + g * 64;
        __m256 S[NR_AVX2];
        for (int i = 0; i < NR_AVX2; i++) {
            if (pf) _mm_prefetch((const char *)(qr + i * rb + g * 64 + pf), _MM_HINT_T0);
            S[i] = _mm256_broadcast_ss(sc[i] + (g - g0));
        }
        for (int f = 0; f < 8; f++) {
            const __m256 x_ = _mm256_loadu_ps(xg + 8 * f);
            for (int i = 0; i < NR_AVX2; i++)
                acc[i][f & 1] = _mm256_fmadd_ps(_mm256_mul_ps(Q8_CVT8(qr + i * rb + g * 64 + 8 * f), S[i]), x_, acc[i][f & 1]);
        }
    }
    for (int i = 0; i < NR_AVX2; i++) res[i] = fm_hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));
}

INL_AVX2 void q4_rows_avx2_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                             const int NT)
{
    if (NT == 1 && w->cols > DECODE_NR_MIN_COLS)
        DECODE_DRIVER(q4_range2_avx2, NR_AVX2, q4_range_avx2);
    else
        COLBLOCK_DRIVER(q4_range_avx2);
}
INL_AVX2 void q2_rows_avx2_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                             const int NT)
{
    COLBLOCK_DRIVER(q2_range_avx2);
}
INL_AVX2 void q8_rows_avx2_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                             const int NT)
{
    if (NT == 1 && w->cols > DECODE_NR_MIN_COLS)
        DECODE_DRIVER(q8_range2_avx2, NR_AVX2, q8_range_avx2);
    else
        COLBLOCK_DRIVER(q8_range_avx2);
}

INL_AVX2 __m256 load8_avx2(const uint8_t *base, int fmt)
{
    if (fmt == FM_F32) return _mm256_loadu_ps((const float *)base);
    const __m128i h = _mm_loadu_si128((const __m128i *)base);
    if (fmt == FM_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const uint8_t *base, int fmt)
{
    if (fmt == FM_F32) {
        float f;
        memcpy(&f, base, 4);
        return f;
    }
    return fmt == FM_F16 ? fm_h2f(fm_ld16((const uint16_t *)base)) : fm_bf2f(fm_ld16((const uint16_t *)base));
}

INL_AVX2 void raw_rows_avx2_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                              const int NT, const int fmt)
{
    const int64_t K = w->cols, ldx = a->ldx, es = fmt == FM_F32 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w->q + r * K * es;
        __m256 d[FM_MAX_NT], e[FM_MAX_NT];
        for (int t = 0; t < NT; t++) d[t] = e[t] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256 wa = load8_avx2(wr + k * es, fmt), wb = load8_avx2(wr + (k + 8) * es, fmt);
            for (int t = 0; t < NT; t++) {
                d[t] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(a->xp + t * ldx + k), d[t]);
                e[t] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(a->xp + t * ldx + k + 8), e[t]);
            }
        }
        for (; k + 8 <= K; k += 8) {
            const __m256 wa = load8_avx2(wr + k * es, fmt);
            for (int t = 0; t < NT; t++) d[t] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(a->xp + t * ldx + k), d[t]);
        }
        for (int t = 0; t < NT; t++) {
            float tail = 0.0f;
            for (int64_t j = k; j < K; j++) tail += load1(wr + j * es, fmt) * a->xp[t * ldx + j];
            out[t * ldo + (r - r0)] = fm_hsum256(_mm256_add_ps(d[t], e[t])) + tail;
        }
    }
}

#define DISPATCH_NT4(call)     \
    switch (a->nt) {           \
    case 1: call(1); break;    \
    case 2: call(2); break;    \
    case 3: call(3); break;    \
    default: call(4); break;   \
    }

#define C_Q4(n) q4_rows_avx2_t(w, r0, r1, a, out, ldo, n)
#define C_Q2(n) q2_rows_avx2_t(w, r0, r1, a, out, ldo, n)
#define C_Q8(n) q8_rows_avx2_t(w, r0, r1, a, out, ldo, n)
#define C_F32(n) raw_rows_avx2_t(w, r0, r1, a, out, ldo, n, FM_F32)
#define C_F16(n) raw_rows_avx2_t(w, r0, r1, a, out, ldo, n, FM_F16)
#define C_BF16(n) raw_rows_avx2_t(w, r0, r1, a, out, ldo, n, FM_BF16)

/* One ISA's entry point for one format: picks the kernel instantiation for a->nt tokens (a
 * compile-time token count keeps the accumulators in registers). */
#define ROWS_ENTRY(attr, name, dispatch, call)                                                        \
    attr static void name(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo) \
    {                                                                                                 \
        dispatch(call)                                                                                \
    }

ROWS_ENTRY(T_AVX2, rows_q4_avx2, DISPATCH_NT4, C_Q4)
ROWS_ENTRY(T_AVX2, rows_q2_avx2, DISPATCH_NT4, C_Q2)
ROWS_ENTRY(T_AVX2, rows_q8_avx2, DISPATCH_NT4, C_Q8)
ROWS_ENTRY(T_AVX2, rows_f32_avx2, DISPATCH_NT4, C_F32)
ROWS_ENTRY(T_AVX2, rows_f16_avx2, DISPATCH_NT4, C_F16)
ROWS_ENTRY(T_AVX2, rows_bf16_avx2, DISPATCH_NT4, C_BF16)

const fm_isa_impl fm_impl_avx2 = {
    "avx2",
    4,
    {rows_f32_avx2, rows_f16_avx2, rows_bf16_avx2, rows_q8_avx2, rows_q4_avx2, rows_q2_avx2},
    {{0, 0}, {0, 0}, {0, 0}, {0, 0}, {1, 0}, {2, 0}},
};

/* ================================================================== AVX-512 */

#define CHAINS_AVX512(NT) ((NT) <= 2 ? 4 : 2)

#define ZFOLD(CVT, off, c)                                                                        \
    do {                                                                                          \
        const __m512 wv = _mm512_mul_ps((CVT), S);                                                \
        for (int t = 0; t < NT; t++)                                                              \
            acc[t][(c) % C] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xg + t * ldx + (off)), acc[t][(c) % C]); \
    } while (0)
#define ZMASKED(v, m) _mm512_cvtepi32_ps(_mm512_and_si512(v, m))

INL_AVX512 void row_prologue_avx512(const uint16_t *sr, const uint16_t *br, int64_t n, const fm_act *a, int64_t g0,
                                    const int NT, float *sc, float *bs)
{
    __m512 bacc[FM_MAX_NT];
    float btail[FM_MAX_NT];
    for (int t = 0; t < NT; t++) {
        bacc[t] = _mm512_setzero_ps();
        btail[t] = 0.0f;
    }
    const float *xs = a->xs + g0;
    int64_t g = 0;
    for (; g + 16 <= n; g += 16) {
        _mm512_storeu_ps(sc + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sr + g))));
        if (br) {
            const __m512 B = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(br + g)));
            for (int t = 0; t < NT; t++) bacc[t] = _mm512_fmadd_ps(B, _mm512_loadu_ps(xs + t * a->ldg + g), bacc[t]);
        }
    }
    for (; g < n; g++) {
        sc[g] = fm_h2f(fm_ld16(sr + g));
        if (br) {
            const float b = fm_h2f(fm_ld16(br + g));
            for (int t = 0; t < NT; t++) btail[t] += b * xs[t * a->ldg + g];
        }
    }
    for (int i = 0; i < 16; i++) sc[n + i] = 0.0f;
    for (int t = 0; t < NT; t++) bs[t] = br ? _mm512_reduce_add_ps(bacc[t]) + btail[t] : 0.0f;
}

INL_AVX512 __m512 acc_sum_avx512(__m512 *acc, const int C)
{
    __m512 s = acc[0];
    for (int c = 1; c < C; c++) s = _mm512_add_ps(s, acc[c]);
    return s;
}

/* the AVX2 tail blocks inside AVX-512 kernels accumulate into their own 256-bit chains */
#define TAIL_AVX2_DECL                                                                            \
    __m256 acc[FM_MAX_NT][MAXC];                                                                  \
    for (int t = 0; t < NT; t++)                                                                  \
        for (int c = 0; c < C; c++) acc[t][c] = _mm256_setzero_ps()

/* q4: a 64-byte block is two groups (lanes 0-7: the first, 8-15: the second); a lone last group
 * of a row uses the AVX2 single-group layout */
INL_AVX512 void q4_range_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                                float *res)
{
    const int C = CHAINS_AVX512(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * (w->cols / 2);
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i m0 = _mm512_set1_epi32(0xF), m1 = _mm512_set1_epi32(0xF0);
    const __m512i m2 = _mm512_set1_epi32(0xF00), m3 = _mm512_set1_epi32(0xF000);
    float sc[MAXGB + 16], bs[FM_MAX_NT], tail[FM_MAX_NT];
    row_prologue_avx512(w->s + r * G + g0, w->b + r * G + g0, g1 - g0, a, g0, NT, sc, bs);
    __m512 acc[FM_MAX_NT][MAXC];
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < C; c++) acc[t][c] = _mm512_setzero_ps();
    int64_t g = g0;
    const int64_t pf = prefetch_offset(NT, w->cols / 2);
    for (; g + 2 <= g1; g += 2) {
        if (pf) _mm_prefetch((const char *)(qr + g * 32 + pf), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512((const void *)(qr + g * 32));
        const __m512i vh = _mm512_srli_epi32(v, 16);
        const float *xg = a->xp + g * 64;
        const __m512 S = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(_mm_loadu_ps(sc + (g - g0))));
        ZFOLD(ZMASKED(v, m0), 0, 0);
        ZFOLD(ZMASKED(v, m1), 16, 1);
        ZFOLD(ZMASKED(v, m2), 32, 2);
        ZFOLD(ZMASKED(v, m3), 48, 3);
        ZFOLD(ZMASKED(vh, m0), 64, 4);
        ZFOLD(ZMASKED(vh, m1), 80, 5);
        ZFOLD(ZMASKED(vh, m2), 96, 6);
        ZFOLD(ZMASKED(vh, m3), 112, 7);
    }
    for (int t = 0; t < NT; t++) tail[t] = 0.0f;
    if (g < g1) {
        const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0);
        const __m256i m2 = _mm256_set1_epi32(0xF00), m3 = _mm256_set1_epi32(0xF000);
        const __m256 S = _mm256_broadcast_ss(sc + (g - g0));
        const float *xg = a->xp + g * 64;
        TAIL_AVX2_DECL;
        Q4_GROUP_AVX2(qr + g * 32);
        for (int t = 0; t < NT; t++) tail[t] = fm_hsum256(acc_sum_avx2(acc[t], C));
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(acc_sum_avx512(acc[t], C)) + tail[t] + bs[t];
}

/* q2: a 64-byte block is four groups (4 lanes each); then a pair in the AVX2 layout, then a lone
 * group in natural order */
INL_AVX512 void q2_range_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                                float *res)
{
    const int C = CHAINS_AVX512(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * (w->cols / 4);
    const __m512i idx4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i c0 = _mm512_set1_epi32(3), c1 = _mm512_set1_epi32(0xC);
    const __m512i c2 = _mm512_set1_epi32(0x30), c3 = _mm512_set1_epi32(0xC0);
    float sc[MAXGB + 16], bs[FM_MAX_NT], tail[FM_MAX_NT];
    row_prologue_avx512(w->s + r * G + g0, w->b + r * G + g0, g1 - g0, a, g0, NT, sc, bs);
    __m512 acc[FM_MAX_NT][MAXC];
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < C; c++) acc[t][c] = _mm512_setzero_ps();
    int64_t g = g0;
    const int64_t pf = prefetch_offset(NT, w->cols / 4);
    for (; g + 4 <= g1; g += 4) {
        if (pf) _mm_prefetch((const char *)(qr + g * 16 + pf), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512((const void *)(qr + g * 16));
        const float *xg = a->xp + g * 64;
        const __m512 S = _mm512_permutexvar_ps(idx4, _mm512_castps128_ps512(_mm_loadu_ps(sc + (g - g0))));
        for (int b_ = 0; b_ < 4; b_++) {
            const __m512i vb = b_ == 0 ? v : _mm512_srli_epi32(v, 8 * b_);
            ZFOLD(ZMASKED(vb, c0), (4 * b_ + 0) * 16, 4 * b_ + 0);
            ZFOLD(ZMASKED(vb, c1), (4 * b_ + 1) * 16, 4 * b_ + 1);
            ZFOLD(ZMASKED(vb, c2), (4 * b_ + 2) * 16, 4 * b_ + 2);
            ZFOLD(ZMASKED(vb, c3), (4 * b_ + 3) * 16, 4 * b_ + 3);
        }
    }
    for (int t = 0; t < NT; t++) tail[t] = 0.0f;
    if (g + 2 <= g1) {
        const __m256i c0 = _mm256_set1_epi32(3), c1 = _mm256_set1_epi32(0xC);
        const __m256i c2 = _mm256_set1_epi32(0x30), c3 = _mm256_set1_epi32(0xC0);
        const __m256 S = _mm256_set_m128(_mm_broadcast_ss(sc + (g - g0) + 1), _mm_broadcast_ss(sc + (g - g0)));
        const float *xg = a->xp + g * 64;
        TAIL_AVX2_DECL;
        Q2_PAIR_AVX2(qr + g * 16);
        for (int t = 0; t < NT; t++) tail[t] = fm_hsum256(acc_sum_avx2(acc[t], C));
        g += 2;
    }
    for (int t = 0; t < NT; t++) {
        if (g < g1) tail[t] += sc[g - g0] * fm_q2_group_nat(qr + g * 16, a->xp + t * ldx + g * 64);
        res[t] = _mm512_reduce_add_ps(acc_sum_avx512(acc[t], C)) + tail[t] + bs[t];
    }
}

#define Q8_CVT16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

INL_AVX512 void q8_range_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, const int NT,
                                float *res)
{
    const int C = CHAINS_AVX512(NT);
    const int64_t G = w->cols / 64, ldx = a->ldx;
    const uint8_t *qr = w->q + r * w->cols;
    float sc[MAXGB + 16], bs[FM_MAX_NT];
    row_prologue_avx512(w->s + r * G + g0, NULL, g1 - g0, a, g0, NT, sc, bs);
    __m512 acc[FM_MAX_NT][MAXC];
    for (int t = 0; t < NT; t++)
        for (int c = 0; c < C; c++) acc[t][c] = _mm512_setzero_ps();
    const int64_t pf = prefetch_offset(NT, w->cols);
    for (int64_t g = g0; g < g1; g++) {
        const __m512 S = _mm512_set1_ps(sc[g - g0]);
        const uint8_t *qg = qr + g * 64;
        const float *xg = a->xp + g * 64;
        if (pf) _mm_prefetch((const char *)(qg + pf), _MM_HINT_T0);
        for (int i = 0; i < 4; i++) ZFOLD(Q8_CVT16(qg + i * 16), i * 16, i);
    }
    for (int t = 0; t < NT; t++) res[t] = _mm512_reduce_add_ps(acc_sum_avx512(acc[t], C));
}

/* ---- decode, four rows at a time (see DECODE_DRIVER); two chains per row */
#define NR_AVX512 4

/* the lone last group of a q4 row (AVX2 single-group layout), one token */
INL_AVX512 float q4_lone_group_avx512(const uint8_t *qg, float s, const float *xg)
{
    const int NT = 1, C = 4;
    const int64_t ldx = 0;
    const __m256i m0 = _mm256_set1_epi32(0xF), m1 = _mm256_set1_epi32(0xF0);
    const __m256i m2 = _mm256_set1_epi32(0xF00), m3 = _mm256_set1_epi32(0xF000);
    const __m256 S = _mm256_set1_ps(s);
    TAIL_AVX2_DECL;
    Q4_GROUP_AVX2(qg);
    (void)ldx;
    return fm_hsum256(acc_sum_avx2(acc[0], C));
}

INL_AVX512 void q4_range4_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, float *res)
{
    const int64_t G = w->cols / 64, rb = w->cols / 2;
    const uint8_t *qr = w->q + r * rb;
    const __m512i idx2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i m0 = _mm512_set1_epi32(0xF), m1 = _mm512_set1_epi32(0xF0);
    const __m512i m2 = _mm512_set1_epi32(0xF00), m3 = _mm512_set1_epi32(0xF000);
    float sc[NR_AVX512][MAXGB + 16], bs[NR_AVX512][FM_MAX_NT];
    for (int i = 0; i < NR_AVX512; i++)
        row_prologue_avx512(w->s + (r + i) * G + g0, w->b + (r + i) * G + g0, g1 - g0, a, g0, 1, sc[i], bs[i]);
    __m512 acc[NR_AVX512][2];
    for (int i = 0; i < NR_AVX512; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int64_t pf = DECODE_PREFETCH(NR_AVX512, rb, g0, g1, G);
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) {
        const float *xg = a->xp + g * 64;
        __m512i v[NR_AVX512];
        __m512 S[NR_AVX512];
        for (int i = 0; i < NR_AVX512; i++) {
            if (pf) _mm_prefetch((const char *)(qr + i * rb + g * 32 + pf), _MM_HINT_T0);
            v[i] = _mm512_loadu_si512((const void *)(qr + i * rb + g * 32));
            S[i] = _mm512_permutexvar_ps(idx2, _mm512_castps128_ps512(_mm_loadu_ps(sc[i] + (g - g0))));
        }
#define F4(m, f)                                                                                  \
    do {                                                                                          \
        const __m512 x_ = _mm512_loadu_ps(xg + 16 * (f));                                         \
        for (int i = 0; i < NR_AVX512; i++)                                                       \
            acc[i][(f) & 1] = _mm512_fmadd_ps(_mm512_mul_ps(ZMASKED(v[i], m), S[i]), x_, acc[i][(f) & 1]); \
    } while (0)
        F4(m0, 0);
        F4(m1, 1);
        F4(m2, 2);
        F4(m3, 3);
        for (int i = 0; i < NR_AVX512; i++) v[i] = _mm512_srli_epi32(v[i], 16);
        F4(m0, 4);
        F4(m1, 5);
        F4(m2, 6);
        F4(m3, 7);
#undef F4
    }
    for (int i = 0; i < NR_AVX512; i++) {
        const float tail = g < g1 ? q4_lone_group_avx512(qr + i * rb + g * 32, sc[i][g - g0], a->xp + g * 64) : 0.0f;
        res[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) + tail + bs[i][0];
    }
}

INL_AVX512 void q8_range4_avx512(const fm_mat *w, int64_t r, int64_t g0, int64_t g1, const fm_act *a, float *res)
{
    const int64_t G = w->cols / 64, rb = w->cols;
    const uint8_t *qr = w->q + r * rb;
    float sc[NR_AVX512][MAXGB + 16], bs[NR_AVX512][FM_MAX_NT];
    for (int i = 0; i < NR_AVX512; i++)
        row_prologue_avx512(w->s + (r + i) * G + g0, NULL, g1 - g0, a, g0, 1, sc[i], bs[i]);
    __m512 acc[NR_AVX512][2];
    for (int i = 0; i < NR_AVX512; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int64_t pf = DECODE_PREFETCH(NR_AVX512, rb, g0, g1, G);
    for (int64_t g = g0; g < g1; g++) {
        const float *xg = a->xp + g * 64;
        __m512 S[NR_AVX512];
        for (int i = 0; i < NR_AVX512; i++) {
            if (pf) _mm_prefetch((const char *)(qr + i * rb + g * 64 + pf), _MM_HINT_T0);
            S[i] = _mm512_set1_ps(sc[i][g - g0]);
        }
        for (int f = 0; f < 4; f++) {
            const __m512 x_ = _mm512_loadu_ps(xg + 16 * f);
            for (int i = 0; i < NR_AVX512; i++)
                acc[i][f & 1] = _mm512_fmadd_ps(_mm512_mul_ps(Q8_CVT16(qr + i * rb + g * 64 + 16 * f), S[i]), x_, acc[i][f & 1]);
        }
    }
    for (int i = 0; i < NR_AVX512; i++) res[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

INL_AVX512 void q4_rows_avx512_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                                 const int NT)
{
    if (NT == 1 && w->cols > DECODE_NR_MIN_COLS)
        DECODE_DRIVER(q4_range4_avx512, NR_AVX512, q4_range_avx512);
    else
        COLBLOCK_DRIVER(q4_range_avx512);
}
INL_AVX512 void q2_rows_avx512_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                                 const int NT)
{
    COLBLOCK_DRIVER(q2_range_avx512);
}
INL_AVX512 void q8_rows_avx512_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                                 const int NT)
{
    if (NT == 1 && w->cols > DECODE_NR_MIN_COLS)
        DECODE_DRIVER(q8_range4_avx512, NR_AVX512, q8_range_avx512);
    else
        COLBLOCK_DRIVER(q8_range_avx512);
}

INL_AVX512 __m512 load16_avx512(const uint8_t *base, int fmt)
{
    if (fmt == FM_F32) return _mm512_loadu_ps((const float *)base);
    const __m256i h = _mm256_loadu_si256((const __m256i *)base);
    if (fmt == FM_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INL_AVX512 void raw_rows_avx512_t(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo,
                                  const int NT, const int fmt)
{
    const int64_t K = w->cols, ldx = a->ldx, es = fmt == FM_F32 ? 4 : 2;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w->q + r * K * es;
        __m512 d[FM_MAX_NT], e[FM_MAX_NT];
        for (int t = 0; t < NT; t++) d[t] = e[t] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            const __m512 wa = load16_avx512(wr + k * es, fmt), wb = load16_avx512(wr + (k + 16) * es, fmt);
            for (int t = 0; t < NT; t++) {
                d[t] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(a->xp + t * ldx + k), d[t]);
                e[t] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(a->xp + t * ldx + k + 16), e[t]);
            }
        }
        for (; k + 16 <= K; k += 16) {
            const __m512 wa = load16_avx512(wr + k * es, fmt);
            for (int t = 0; t < NT; t++) d[t] = _mm512_fmadd_ps(wa, _mm512_loadu_ps(a->xp + t * ldx + k), d[t]);
        }
        for (int t = 0; t < NT; t++) {
            float tail = 0.0f;
            for (int64_t j = k; j < K; j++) tail += load1(wr + j * es, fmt) * a->xp[t * ldx + j];
            out[t * ldo + (r - r0)] = _mm512_reduce_add_ps(_mm512_add_ps(d[t], e[t])) + tail;
        }
    }
}

#define DISPATCH_NT8(call)     \
    switch (a->nt) {           \
    case 1: call(1); break;    \
    case 2: call(2); break;    \
    case 3: call(3); break;    \
    case 4: call(4); break;    \
    case 5: call(5); break;    \
    case 6: call(6); break;    \
    case 7: call(7); break;    \
    default: call(8); break;   \
    }

#define Z_Q4(n) q4_rows_avx512_t(w, r0, r1, a, out, ldo, n)
#define Z_Q2(n) q2_rows_avx512_t(w, r0, r1, a, out, ldo, n)
#define Z_Q8(n) q8_rows_avx512_t(w, r0, r1, a, out, ldo, n)
#define Z_F32(n) raw_rows_avx512_t(w, r0, r1, a, out, ldo, n, FM_F32)
#define Z_F16(n) raw_rows_avx512_t(w, r0, r1, a, out, ldo, n, FM_F16)
#define Z_BF16(n) raw_rows_avx512_t(w, r0, r1, a, out, ldo, n, FM_BF16)

ROWS_ENTRY(T_AVX512, rows_q4_avx512, DISPATCH_NT8, Z_Q4)
ROWS_ENTRY(T_AVX512, rows_q2_avx512, DISPATCH_NT8, Z_Q2)
ROWS_ENTRY(T_AVX512, rows_q8_avx512, DISPATCH_NT8, Z_Q8)
ROWS_ENTRY(T_AVX512, rows_f32_avx512, DISPATCH_NT8, Z_F32)
ROWS_ENTRY(T_AVX512, rows_f16_avx512, DISPATCH_NT8, Z_F16)
ROWS_ENTRY(T_AVX512, rows_bf16_avx512, DISPATCH_NT8, Z_BF16)

const fm_isa_impl fm_impl_avx512 = {
    "avx512",
    8,
    {rows_f32_avx512, rows_f16_avx512, rows_bf16_avx512, rows_q8_avx512, rows_q4_avx512, rows_q2_avx512},
    {{0, 0}, {0, 0}, {0, 0}, {0, 0}, {2, 1}, {4, 2}},
};

#endif /* FM_HAVE_X86 */
