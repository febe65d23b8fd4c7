/* Private to csrc/cpu: the per-ISA kernel table and helpers shared by the portable and the
 * x86 (AVX2 / AVX-512) implementations. */
#ifndef FM_KERNELS_INTERNAL_H
#define FM_KERNELS_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fm_kernels.h"

/* A block of nt prepared activation vectors (see fm_prepare in fm_kernels.c). */
typedef struct {
    const float *xp;  /* prepared activations: token t at xp + t*ldx */
    const float *xs;  /* per-group sums of the unprepared activations: token t at xs + t*ldg */
    int64_t ldx, ldg;
    int nt;           /* 1 .. impl->max_nt */
} fm_act;

/* out[t*ldo + (r - r0)] = W[r] · x_t  for r in [r0, r1), t < a->nt. */
typedef void (*fm_rows_fn)(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo);

#define FM_MAX_NT 8

typedef struct {
    const char *name;
    int max_nt;
    fm_rows_fn rows[FM_NFORMATS];
    /* For q4 / q2: how many groups one SIMD block covers (blk[f][0]), then a secondary block
     * size used for the remaining groups (blk[f][1], 0 = none); groups left after both are in
     * natural order and computed by fm_q4_group_nat / fm_q2_group_nat. The preparation of the
     * activations (fm_prepare) follows the same plan, so that a kernel reads, for field f of
     * 32-bit lane d of group j of a block of n groups, the activation
     *     xp[block + f*(n*D) + j*D + d] = x[j*64 + F*d + f] * 2^-(bits*(f%4))
     * with F fields per 32-bit word (q4: 8, q2: 16) and D = 64/F words per group. The power of
     * two undoes the field's position: kernels shift a lane right by 4*bits*(f/4), mask field f
     * in place (q << bits*(f%4): four masks serve every field) and convert it exactly. The
     * scaling is exact (powers of two) unless |x| is below ~1e-34. */
    int blk[FM_NFORMATS][2];
} fm_isa_impl;

extern const fm_isa_impl fm_impl_portable;
#if defined(__x86_64__) || defined(_M_X64)
#define FM_HAVE_X86 1
extern const fm_isa_impl fm_impl_avx2;
extern const fm_isa_impl fm_impl_avx512;
#endif

/* Integer activations for decode of q4 / q8 (fm_kernels_xi.c): the level whose kernels run
 * under ISA level isa (AVX-512 needs VNNI, else AVX2's), the preparation of one token's
 * activations x [K] into xp (fm_xi_prep_floats(K) floats) and the row kernels (one token). */
int fm_xi_level(int isa);
void fm_xi_prepare(int level, int fmt, const float *x, int64_t K, float *xp);
fm_rows_fn fm_xi_rows(int level, int fmt);

/* Software prefetch distance in bytes for the packed-weight stream (default 4096; 0: rely on
 * the hardware prefetchers alone); env FLASHMOE_CPU_PREFETCH sets it at first use. */
extern int fm_prefetch_bytes;

/* The thread pool (fm_kernels.c): fn(ctx, task, tid) for every task in [0, ntasks), on the pool's
 * threads and the caller; returns when all are done. p may be NULL (the caller alone). */
typedef void (*fm_task_fn)(void *ctx, int64_t task, int tid);
typedef struct fm_pool fm_pool;
void fm_pool_run(fm_pool *p, int64_t ntasks, fm_task_fn fn, void *ctx);

/* The one-pass decode of fm_moe (fm_moe1.c): one token, integer activations in both phases, one
 * pool run whose task list is every expert's gate/up chunks (SwiGLU and the chunk's preparation
 * for w2 included), then every expert's down-projection row blocks; a down task of expert e waits
 * only for e's gate/up chunks (handed out before it), so RAM streams w2 while other experts'
 * w13 still runs: no barrier between the phases, one join at the end. */
#define FM_MOE1_MAXK 256
typedef struct {
    fm_rows_fn rows1, rows2; /* w13's and w2's row kernels (integer activations) */
    int xi2;                 /* w2's integer-activation level */
    const fm_expert *ex;
    const float *wts;
    int k;
    int64_t H, I;
    const float *xp, *xs;    /* x prepared for w13 */
    float *act;              /* [k][I] SwiGLU activations */
    float *ap, *as;          /* [k] w2's prepared activations (ldap, ldas floats apart) */
    int64_t ldap, ldas;
    float *part;             /* [k][H] each expert's down projection */
    float *y;                /* [H], added to */
    int64_t chunk1, n1, chunk2, n2; /* per expert: gate/up chunks of i, down blocks of rows */
} fm_moe1_ctx;
/* Chunk the work for nthreads threads at ~tasks_per_thread tasks each (both phases); 0 when k is
 * above FM_MOE1_MAXK (the two-phase path then). */
int fm_moe1_plan(fm_moe1_ctx *c, int nthreads, int tasks_per_thread);
void fm_moe1_run(fm_pool *p, fm_moe1_ctx *c);
int64_t fm_moe1_count(void); /* calls that took the one-pass path (tests see that it ran) */

static inline float fm_silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* xs[g] = the sum of x's group g of 64 values, for g in [ga, gb), in the order every kernel's
 * preparation uses (eight lanes, then a fixed tree): fm_prepare and fm_moe1's chunks agree bit for bit. */
static inline void fm_group_sums(const float *x, int64_t ga, int64_t gb, float *xs)
{
    for (int64_t g = ga; g < gb; g++) {
        const float *v = x + g * 64;
        float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < 64; i += 8)
            for (int l = 0; l < 8; l++) a[l] += v[i + l];
        xs[g] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
}

/* Largest column count a kernel accepts (keeps per-row stack scratch bounded). */
#define FM_MAX_COLS (1 << 18)

static inline float fm_h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-08f; /* 2^-24: subnormal or zero */
        return sign ? -f : f;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float fm_bf2f(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t fm_ld16(const uint16_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Natural-order group dots (64 elements) used for leftover groups by every ISA. */
static inline float fm_q4_group_nat(const uint8_t *q, const float *x)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < 32; j += 4)
        for (int l = 0; l < 4; l++) {
            acc[2 * l] += (float)(q[j + l] & 15) * x[2 * (j + l)];
            acc[2 * l + 1] += (float)(q[j + l] >> 4) * x[2 * (j + l) + 1];
        }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static inline float fm_q2_group_nat(const uint8_t *q, const float *x)
{
    float acc[4] = {0, 0, 0, 0};
    for (int j = 0; j < 16; j++)
        for (int k = 0; k < 4; k++) acc[k] += (float)((q[j] >> (2 * k)) & 3) * x[4 * j + k];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

#endif
