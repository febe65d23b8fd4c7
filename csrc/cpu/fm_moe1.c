/* The one-pass decode of fm_moe (issue 10): one pool run over (slice, expert) tasks and one
 * reduction, in place of the two-phase path's run_prep / gate-up / prep2 / down runs with a
 * barrier after each (there, each phase ends on its slowest thread, and RAM streams nothing
 * while the threads wait and the next phase starts). fm_kernels_internal.h describes a task.
 *
 * A slice is a range of the intermediate index i in units of two groups of 64 (the integer
 * activations of q4 are prepared in pairs of groups at the AVX-512 level), so every slice's
 * preparation and w2 window stand alone. Every task streams the same bytes when the slices are
 * equal: 2 (i1 - i0) rows of w13 and the window [i0, i1) of all H rows of w2. The numerics: each
 * w2 row is a sum of per-slice dots (the two-phase path: per column block of at most 112
 * groups), in a fixed order (task order), so the result does not depend on the thread count's
 * timing; it matches the two-phase path to fp32 rounding. */
#include "fm_kernels_xi.h"

#define MOE1_ROWS 256 /* gate / up rows a step (stack scratch) */
#define MOE1_RED 256  /* outputs per reduction task */

int fm_moe1_slices(int nthreads, int tasks_per_thread, int k, int64_t I)
{
    const int64_t G = I / 64, U = (G + 1) / 2; /* units of two groups; the last may be one */
    int64_t maxs = U / 2 > 0 ? U / 2 : 1;      /* at least 2 units (256 columns) a w2 window */
    int64_t target = ((int64_t)nthreads * tasks_per_thread + k - 1) / k;
    if (target > maxs) target = maxs;
    if (target < 1) target = 1;
    /* equal slices where U has a divisor near the target (else slices differ by one unit) */
    for (int64_t d = 0; d <= target / 2; d++) {
        if (target + d <= maxs && U % (target + d) == 0) return (int)(target + d);
        if (target - d >= 1 && U % (target - d) == 0 && 2 * (target - d) >= target) return (int)(target - d);
    }
    return (int)target;
}

static void slice_groups(const fm_moe1_ctx *c, int64_t j, int64_t *ga, int64_t *gb)
{
    const int64_t G = c->I / 64, U = (G + 1) / 2;
    *ga = 2 * (j * U / c->slices);
    const int64_t b = 2 * ((j + 1) * U / c->slices);
    *gb = b < G ? b : G;
}

static void moe1_task(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const fm_moe1_ctx *c = vctx;
    const int e = (int)(task % c->k); /* the experts interleaved: both stream from the start */
    int64_t ga, gb;
    slice_groups(c, task / c->k, &ga, &gb);
    const fm_expert *E = &c->ex[e];
    const int64_t I = c->I, i0 = ga * 64, i1 = gb * 64;
    float *act = c->act + e * I;
    /* gate / up rows of the slice, SwiGLU */
    const fm_act a1 = {c->xp, c->xs, 0, 0, 1};
    float g[MOE1_ROWS], u[MOE1_ROWS];
    for (int64_t r = i0; r < i1; r += MOE1_ROWS) {
        const int64_t r1 = r + MOE1_ROWS < i1 ? r + MOE1_ROWS : i1;
        c->rows1(&E->w13, r, r1, &a1, g, MOE1_ROWS);
        c->rows1(&E->w13, I + r, I + r1, &a1, u, MOE1_ROWS);
        for (int64_t i = r; i < r1; i++) act[i] = fm_silu_mul(g[i - r], u[i - r]);
    }
    /* the slice's preparation for w2: group sums (fm_prepare's order) and integer digits */
    float *ap = c->ap + e * c->ldap, *as = c->as + e * c->ldas;
    for (int64_t gr = ga; gr < gb; gr++) {
        const float *v = act + gr * 64;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < 64; i += 8)
            for (int l = 0; l < 8; l++) s[l] += v[i + l];
        as[gr] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
    fm_xi_prepare_groups(c->xi2, E->w2.fmt, act, I, ga, gb, ap);
    /* w2's column window [i0, i1) of every row, weighted */
    const fm_act a2 = {ap, as, 0, 0, 1};
    float *part = c->part + task * c->H;
    fm_xi_window(c->xi2, E->w2.fmt)(&E->w2, 0, c->H, ga, gb, &a2, part);
    const float we = c->wts[e];
    for (int64_t h = 0; h < c->H; h++) part[h] *= we;
}

static void moe1_reduce(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const fm_moe1_ctx *c = vctx;
    const int64_t h0 = task * MOE1_RED, n = c->H - h0 < MOE1_RED ? c->H - h0 : MOE1_RED;
    const int64_t ntasks = (int64_t)c->k * c->slices;
    float acc[MOE1_RED];
    memcpy(acc, c->part + h0, (size_t)n * sizeof(float));
    for (int64_t t = 1; t < ntasks; t++) {
        const float *p = c->part + t * c->H + h0;
        for (int64_t h = 0; h < n; h++) acc[h] += p[h];
    }
    float *y = c->y + h0;
    for (int64_t h = 0; h < n; h++) y[h] += acc[h];
}

void fm_moe1_run(fm_pool *p, fm_moe1_ctx *c)
{
    fm_pool_run(p, (int64_t)c->k * c->slices, moe1_task, c);
    fm_pool_run(p, (c->H + MOE1_RED - 1) / MOE1_RED, moe1_reduce, c);
}
