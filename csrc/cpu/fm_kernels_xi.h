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
 * 4 * 255 * 2^20 (q8) < 2^31; vpmaddubsw pairs <= 2 * 255 * 64 < 2^15 (no saturation).
 * Shared by fm_kernels_xi.c (preparation, portable kernel, dispatch) and fm_kernels_xi_x86.c
 * (AVX2 / AVX-512 kernels). */
#ifndef FM_KERNELS_XI_H
#define FM_KERNELS_XI_H

#include "fm_kernels_internal.h"

#define FM_XI_MAX 1040319 /* 63 * (2^14 + 2^7 + 1): every X in [-FM_XI_MAX, FM_XI_MAX] has 3 digits */
#define XI_GROUP_BYTES 192
#define XI_TINY 1e-30f /* groups whose max |x| is below: the step is computed in double */

/* quantize one group of 64 (X and its step d; zeros, NaN / inf and tiny groups handled) */
void fm_xi_quantize_group(const float *v, int32_t *X, float *step);

/* Prepare groups [ga, gb) of x [K] into xp's whole-vector layout (fm_xi_prepare: all groups):
 * ga and gb on the preparation's block boundaries (even for q4 at the AVX-512 level, or gb the
 * last group). fm_moe1.c prepares each gate/up chunk's groups on its own. */
void fm_xi_prepare_groups(int level, int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp);
#ifdef FM_HAVE_X86
fm_rows_fn fm_xi_rows_x86(int level, int fmt);
void fm_xi_prepare_avx512(int fmt, const float *x, int64_t K, int64_t ga, int64_t gb, float *xp);
#endif

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

#endif
