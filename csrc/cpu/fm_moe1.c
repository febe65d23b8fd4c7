/* The one-pass decode of fm_moe (issue 10): one pool run, in place of the two-phase path's
 * gate/up run, a preparation on one thread and the down run, each ended by a barrier on its
 * slowest thread while RAM streams nothing (16 H200 threads: ~107 GB/s of 127-137).
 *
 * Tasks, in the order the pool hands them out: expert 0's gate/up chunks, expert 1's, ..., then
 * expert 0's down-projection row blocks, expert 1's, ... A gate/up chunk (a range of i, in pairs
 * of groups of 64: the AVX-512 preparation's blocks) computes its gate and up rows, their SwiGLU
 * and the chunk's integer preparation for w2 (per group: chunks stand alone), then counts itself
 * done. A down task of expert e first waits for e's chunks, which were all handed out before it:
 * while the last chunks of expert e run, the other threads stream later experts' w13, and a
 * down task rarely waits at all. Down tasks read whole w2 rows (contiguous; column windows of
 * w2, tried first, ran at 0.6x on 4 KB pages). One join at the end, then y += w_e * part_e in
 * expert order: the same kernels, the same order, so the same bits as the two-phase path. */
#include "fm_kernels_xi.h"

#include <sched.h>
#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define M1_PAUSE() _mm_pause()
#else
#define M1_PAUSE() ((void)0)
#endif

#define MOE1_ROWS 256 /* gate / up rows a step (stack scratch) */

typedef struct {
    const fm_moe1_ctx *c;
    _Atomic int64_t done1[FM_MOE1_MAXK]; /* gate/up chunks finished, per expert */
} moe1_run_ctx;

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int fm_moe1_plan(fm_moe1_ctx *c, int nthreads, int tasks_per_thread)
{
    if (c->k > FM_MOE1_MAXK || c->k <= 0) return 0;
    const int64_t want = cdiv((int64_t)nthreads * tasks_per_thread, c->k); /* tasks per expert, per phase */
    int64_t ch1 = cdiv(c->I, want);
    ch1 = (ch1 + 127) & ~(int64_t)127; /* pairs of groups */
    c->chunk1 = ch1 < c->I ? ch1 : c->I;
    c->n1 = cdiv(c->I, c->chunk1);
    int64_t ch2 = (cdiv(c->H, want) + 7) & ~(int64_t)7;
    c->chunk2 = ch2 < c->H ? ch2 : c->H;
    c->n2 = cdiv(c->H, c->chunk2);
    return 1;
}

static void gate_up(const fm_moe1_ctx *c, int e, int64_t j)
{
    const fm_expert *E = &c->ex[e];
    const int64_t I = c->I, i0 = j * c->chunk1, i1 = i0 + c->chunk1 < I ? i0 + c->chunk1 : I;
    float *act = c->act + e * I;
    const fm_act a1 = {c->xp, c->xs, 0, 0, 1};
    float g[MOE1_ROWS], u[MOE1_ROWS];
    for (int64_t r = i0; r < i1; r += MOE1_ROWS) {
        const int64_t r1 = r + MOE1_ROWS < i1 ? r + MOE1_ROWS : i1;
        c->rows1(&E->w13, r, r1, &a1, g, MOE1_ROWS);
        c->rows1(&E->w13, I + r, I + r1, &a1, u, MOE1_ROWS);
        for (int64_t i = r; i < r1; i++) act[i] = fm_silu_mul(g[i - r], u[i - r]);
    }
    /* the chunk's preparation for w2: group sums and integer digits, as fm_prepare makes them */
    float *ap = c->ap + e * c->ldap, *as = c->as + e * c->ldas;
    fm_group_sums(act, i0 / 64, i1 / 64, as);
    fm_xi_prepare_groups(c->xi2, E->w2.fmt, act, I, i0 / 64, i1 / 64, ap);
}

static void down(const fm_moe1_ctx *c, int e, int64_t b)
{
    const int64_t h0 = b * c->chunk2, h1 = h0 + c->chunk2 < c->H ? h0 + c->chunk2 : c->H;
    const fm_act a2 = {c->ap + e * c->ldap, c->as + e * c->ldas, 0, 0, 1};
    c->rows2(&c->ex[e].w2, h0, h1, &a2, c->part + e * c->H + h0, c->H);
}

static void moe1_task(void *vctx, int64_t t, int tid)
{
    (void)tid;
    moe1_run_ctx *r = vctx;
    const fm_moe1_ctx *c = r->c;
    const int64_t t1 = (int64_t)c->k * c->n1;
    if (t < t1) {
        gate_up(c, (int)(t / c->n1), t % c->n1);
        atomic_fetch_add_explicit(&r->done1[t / c->n1], 1, memory_order_release);
        return;
    }
    const int e = (int)((t - t1) / c->n2);
    /* expert e's chunks were handed out before this task: wait for the last ones to finish */
    for (int spins = 0; atomic_load_explicit(&r->done1[e], memory_order_acquire) < c->n1; spins++) {
        if (spins < 4096)
            M1_PAUSE();
        else
            sched_yield();
    }
    down(c, e, (t - t1) % c->n2);
}

static _Atomic int64_t g_count = 0;

int64_t fm_moe1_count(void) { return atomic_load(&g_count); }

void fm_moe1_run(fm_pool *p, fm_moe1_ctx *c)
{
    atomic_fetch_add(&g_count, 1);
    moe1_run_ctx r;
    r.c = c;
    for (int e = 0; e < c->k; e++) atomic_init(&r.done1[e], 0);
    fm_pool_run(p, (int64_t)c->k * (c->n1 + c->n2), moe1_task, &r);
    for (int e = 0; e < c->k; e++) {
        const float we = c->wts[e], *pe = c->part + e * c->H;
        for (int64_t h = 0; h < c->H; h++) c->y[h] += we * pe[h];
    }
}
