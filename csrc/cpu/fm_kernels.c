/* flashmoe CPU kernels: format geometry, ISA dispatch, thread pool, activation preparation,
 * the portable C kernels and the orchestration of GEMV / GEMM / fused SwiGLU experts.
 * The vectorised AVX2 / AVX-512 row kernels live in fm_kernels_x86.c. See fm_kernels.h. */
#define _GNU_SOURCE
#include "fm_kernels_internal.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FM_PAUSE() _mm_pause()
#else
#define FM_PAUSE() ((void)0)
#endif

const char *fm_strerror(int code)
{
    switch (code) {
    case FMK_OK: return "ok";
    case FMK_EINVAL: return "invalid format, shape or argument";
    case FMK_ENOMEM: return "out of memory (kernel workspace)";
    case FMK_EISA: return "instruction set not supported by this CPU or build";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------ format geometry */

static int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

static int is_quant(int fmt) { return fmt == FM_Q8 || fmt == FM_Q4 || fmt == FM_Q2; }

int fm_part_sections(int fmt, int64_t rows, int64_t cols, int64_t off[3], int64_t nb[3])
{
    if (fmt < 0 || fmt >= FM_NFORMATS || rows <= 0 || cols <= 0) return FMK_EINVAL;
    if (rows > ((int64_t)1 << 40) / cols) return FMK_EINVAL;
    for (int i = 0; i < 3; i++) off[i] = nb[i] = -1;
    if (!is_quant(fmt)) {
        off[0] = 0;
        nb[0] = rows * cols * (fmt == FM_F32 ? 4 : 2);
        return FMK_OK;
    }
    if (cols % FM_GROUP) return FMK_EINVAL;
    int per_byte = fmt == FM_Q8 ? 1 : fmt == FM_Q4 ? 2 : 4;
    int64_t G = cols / FM_GROUP;
    off[0] = 0;
    nb[0] = rows * (cols / per_byte);
    off[1] = align_up(nb[0], FM_SECTION_ALIGN);
    nb[1] = rows * G * 2;
    if (fmt != FM_Q8) {
        off[2] = align_up(off[1] + nb[1], FM_SECTION_ALIGN);
        nb[2] = rows * G * 2;
    }
    return FMK_OK;
}

int64_t fm_part_nbytes(int fmt, int64_t rows, int64_t cols)
{
    int64_t off[3], nb[3];
    int rc = fm_part_sections(fmt, rows, cols, off, nb);
    if (rc) return rc;
    int last = off[2] >= 0 ? 2 : off[1] >= 0 ? 1 : 0;
    return align_up(off[last] + nb[last], FM_SECTION_ALIGN);
}

int fm_mat_init(fm_mat *m, int fmt, int64_t rows, int64_t cols, const void *base)
{
    int64_t off[3], nb[3];
    int rc = fm_part_sections(fmt, rows, cols, off, nb);
    if (rc) return rc;
    if (cols > FM_MAX_COLS || !base) return FMK_EINVAL;
    const uint8_t *p = (const uint8_t *)base;
    m->fmt = fmt;
    m->rows = rows;
    m->cols = cols;
    m->q = p;
    m->s = off[1] >= 0 ? (const uint16_t *)(p + off[1]) : NULL;
    m->b = off[2] >= 0 ? (const uint16_t *)(p + off[2]) : NULL;
    return FMK_OK;
}

/* ------------------------------------------------------------------ ISA selection */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
int fm_prefetch_bytes = 4096;
static int g_max_isa = FM_ISA_PORTABLE;
static _Atomic int g_isa = FM_ISA_PORTABLE;
static _Atomic int g_int_act = 1;
static _Atomic int g_moe1 = 4; /* one-pass decode of fm_moe: tasks per thread, 0 = off */

static const fm_isa_impl *impl_of(int isa)
{
#ifdef FM_HAVE_X86
    if (isa == FM_ISA_AVX512) return &fm_impl_avx512;
    if (isa == FM_ISA_AVX2) return &fm_impl_avx2;
#endif
    (void)isa;
    return &fm_impl_portable;
}

const char *fm_isa_name(int isa)
{
    switch (isa) {
    case FM_ISA_PORTABLE: return "portable";
    case FM_ISA_AVX2: return "avx2";
    case FM_ISA_AVX512: return "avx512";
    default: return "?";
    }
}

static void pool_atfork_child(void);

static _Atomic long g_spin_ns = 50000; /* how long idle workers spin before they sleep */

static void global_init(void)
{
    const char *spin = getenv("FLASHMOE_CPU_SPIN_US");
    if (spin && *spin) atomic_store(&g_spin_ns, atol(spin) * 1000L);
#ifdef FM_HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        g_max_isa = FM_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f")) g_max_isa = FM_ISA_AVX512;
    }
#endif
    int isa = g_max_isa;
    const char *env = getenv("FLASHMOE_CPU_ISA");
    if (env && *env) {
        for (int i = 0; i < FM_NISA; i++)
            if (!strcmp(env, fm_isa_name(i)) && i <= g_max_isa) isa = i;
    }
    atomic_store(&g_isa, isa);
    const char *act = getenv("FLASHMOE_CPU_ACT");
    if (act && !strcmp(act, "f32")) atomic_store(&g_int_act, 0);
    const char *m1 = getenv("FLASHMOE_CPU_MOE1");
    if (m1 && *m1) atomic_store(&g_moe1, atoi(m1) < 0 ? 0 : atoi(m1) > 64 ? 64 : atoi(m1));
    const char *pf = getenv("FLASHMOE_CPU_PREFETCH");
    if (pf && *pf) {
        long v = atol(pf);
        fm_prefetch_bytes = v < 0 ? 0 : v > (1 << 16) ? (1 << 16) : (int)v;
    }
    pthread_atfork(NULL, NULL, pool_atfork_child);
}

int fm_max_isa(void)
{
    pthread_once(&g_once, global_init);
    return g_max_isa;
}

int fm_get_isa(void)
{
    pthread_once(&g_once, global_init);
    return atomic_load(&g_isa);
}

int fm_set_isa(int isa)
{
    pthread_once(&g_once, global_init);
    if (isa < 0 || isa >= FM_NISA || isa > g_max_isa) return FMK_EISA;
    atomic_store(&g_isa, isa);
    return FMK_OK;
}

int fm_get_int_act(void)
{
    pthread_once(&g_once, global_init);
    return atomic_load(&g_int_act);
}

void fm_set_int_act(int on)
{
    pthread_once(&g_once, global_init);
    atomic_store(&g_int_act, on ? 1 : 0);
}

int fm_get_moe1(void)
{
    pthread_once(&g_once, global_init);
    return atomic_load(&g_moe1);
}

void fm_set_moe1(int tasks_per_thread)
{
    pthread_once(&g_once, global_init);
    atomic_store(&g_moe1, tasks_per_thread < 0 ? 0 : tasks_per_thread > 64 ? 64 : tasks_per_thread);
}

/* The integer-activation level for a T-token product with weights of format fmt, or -1 for the
 * fp32 path (fm_kernels_xi.c covers decode of q4 and q8). */
static int xi_level_for(int isa, int fmt, int64_t T)
{
    if (T != 1 || (fmt != FM_Q4 && fmt != FM_Q8) || !atomic_load(&g_int_act)) return -1;
    return fm_xi_level(isa);
}

static fm_rows_fn rows_for(const fm_isa_impl *impl, int fmt, int xi)
{
    return xi >= 0 ? fm_xi_rows(xi, fmt) : impl->rows[fmt];
}

/* ------------------------------------------------------------------ thread pool
 * n-1 worker threads plus the calling thread. A job is fn(ctx, task, tid) for task in
 * [0, ntasks), handed out through an atomic counter. Workers spin briefly after a job (decode
 * issues many small jobs back to back), then sleep on a condition variable so that they do
 * not compete with torch's own threads between calls. */

struct fm_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t gen;
    _Atomic int64_t next;
    _Atomic int pending;  /* workers that have not finished the current job */
    int64_t ntasks;
    fm_task_fn fn;
    void *ctx;
    int stop;
};

static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER; /* serialises kernel calls */
static fm_pool *g_pool = NULL;
static int g_nthreads = 0; /* 0: not chosen yet */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void run_tasks(fm_pool *p, int tid)
{
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->ntasks) break;
        p->fn(p->ctx, t, tid);
    }
}

typedef struct {
    fm_pool *p;
    int tid;
} worker_arg;

static void *worker_main(void *argp)
{
    worker_arg a = *(worker_arg *)argp;
    free(argp);
    fm_pool *p = a.p;
    uint64_t seen = 0;
    for (;;) {
        /* wait for a new generation: spin, then sleep */
        uint64_t g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g == seen) {
            /* spin (decode issues jobs back to back), yielding the CPU to any other runnable
             * thread (torch's, the caller's) after the first few microseconds, then sleep */
            int64_t t0 = now_ns();
            int spins = 0;
            while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen) {
                if (++spins < 1024) {
                    FM_PAUSE();
                    continue;
                }
                if ((spins & 15) == 0 && now_ns() - t0 > atomic_load_explicit(&g_spin_ns, memory_order_relaxed)) break;
                sched_yield();
            }
            if (g == seen) {
                pthread_mutex_lock(&p->mu);
                while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen && !p->stop)
                    pthread_cond_wait(&p->cv, &p->mu);
                int stop = p->stop;
                pthread_mutex_unlock(&p->mu);
                if (stop) return NULL;
            }
        }
        seen = g;
        if (p->stop) return NULL;
        run_tasks(p, a.tid);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel);
    }
}

static int usable_cpus(void)
{
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int c = CPU_COUNT(&set);
        if (c > 0) return c;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void pool_destroy(fm_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n - 1; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

static fm_pool *pool_create(int n)
{
    fm_pool *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n = n;
    p->threads = calloc((size_t)(n > 1 ? n - 1 : 1), sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int i = 0; i < n - 1; i++) {
        worker_arg *a = malloc(sizeof(*a));
        if (a) {
            a->p = p;
            a->tid = i + 1;
        }
        if (!a || pthread_create(&p->threads[i], NULL, worker_main, a)) {
            free(a);
            p->n = i + 1; /* the threads started so far, plus the caller */
            break;
        }
    }
    return p;
}

/* After fork() only the forking thread exists in the child: forget the pool (its threads are
 * gone) and re-initialise the call lock, which another thread may have held. */
static void pool_atfork_child(void)
{
    g_pool = NULL;
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_call_mu, &fresh, sizeof(fresh));
}

long fm_get_spin_us(void)
{
    pthread_once(&g_once, global_init);
    return atomic_load(&g_spin_ns) / 1000L;
}

void fm_set_spin_us(long us)
{
    pthread_once(&g_once, global_init);
    atomic_store(&g_spin_ns, (us < 0 ? 0 : us) * 1000L);
}

int fm_get_num_threads(void)
{
    pthread_once(&g_once, global_init);
    pthread_mutex_lock(&g_call_mu);
    if (g_nthreads <= 0) g_nthreads = usable_cpus();
    int n = g_nthreads;
    pthread_mutex_unlock(&g_call_mu);
    return n;
}

void fm_set_num_threads(int n)
{
    pthread_once(&g_once, global_init);
    if (n <= 0) n = usable_cpus();
    if (n > 1024) n = 1024;
    pthread_mutex_lock(&g_call_mu);
    if (n != g_nthreads) {
        pool_destroy(g_pool);
        g_pool = NULL;
        g_nthreads = n;
    }
    pthread_mutex_unlock(&g_call_mu);
}

/* Caller holds g_call_mu. */
static fm_pool *pool_get(void)
{
    if (g_nthreads <= 0) g_nthreads = usable_cpus();
    if (!g_pool) g_pool = pool_create(g_nthreads); /* NULL: run on the calling thread alone */
    return g_pool;
}

static void pool_run(fm_pool *p, int64_t ntasks, fm_task_fn fn, void *ctx)
{
    if (ntasks <= 0) return;
    if (!p || p->n <= 1 || ntasks == 1) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->pending, p->n - 1, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p, 0);
    /* wait for the workers; yield once it takes a while (one may be waiting for a CPU) */
    for (int spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if (spins < 2048)
            FM_PAUSE();
        else
            sched_yield();
    }
}

void fm_pool_run(fm_pool *p, int64_t ntasks, fm_task_fn fn, void *ctx) { pool_run(p, ntasks, fn, ctx); }

/* ------------------------------------------------------------------ workspace */

static void *g_ws = NULL;
static size_t g_ws_size = 0;

static float *workspace(size_t nfloats)
{
    size_t need = nfloats * sizeof(float) + 64;
    if (need > g_ws_size) {
        free(g_ws);
        g_ws = NULL;
        g_ws_size = 0;
        size_t sz = need + need / 4;
        if (posix_memalign(&g_ws, 64, sz)) return NULL;
        g_ws_size = sz;
    }
    return (float *)g_ws;
}

/* ------------------------------------------------------------------ activation preparation */

static void prep_block(const float *x, int n, int F, int bits, float *out)
{
    const int D = 64 / F, L = n * D;
    for (int f = 0; f < F; f++) {
        /* field f sits at bit bits*f of its 32-bit lane; the kernels shift the lane right by
         * bits*4*(f/4) and mask the field in place there: it reads as q << bits*(f%4) */
        const float sc = ldexpf(1.0f, -bits * (f % 4));
        for (int j = 0; j < n; j++)
            for (int d = 0; d < D; d++) out[f * L + j * D + d] = x[j * 64 + F * d + f] * sc;
    }
}

/* Prepare one activation vector x [K] for matrices of format fmt under impl:
 * xp [K] (the permuted, field-scaled order the kernels read) and xs [K/64] group sums; with
 * xi >= 0 xp is the integer form of fm_kernels_xi.c (K + K/64 floats). */
static void fm_prepare(const fm_isa_impl *impl, int fmt, const float *x, int64_t K, float *xp, float *xs, int xi)
{
    if (!is_quant(fmt)) {
        memcpy(xp, x, (size_t)K * sizeof(float));
        return;
    }
    const int64_t G = K / FM_GROUP;
    fm_group_sums(x, 0, G, xs);
    if (xi >= 0) {
        fm_xi_prepare(xi, fmt, x, K, xp);
        return;
    }
    int64_t g = 0;
    if (fmt == FM_Q4 || fmt == FM_Q2) {
        const int F = fmt == FM_Q4 ? 8 : 16, bits = fmt == FM_Q4 ? 4 : 2;
        for (int lv = 0; lv < 2; lv++) {
            const int n = impl->blk[fmt][lv];
            if (n <= 0) continue;
            for (; G - g >= n; g += n) prep_block(x + g * 64, n, F, bits, xp + g * 64);
        }
    }
    memcpy(xp + g * 64, x + g * 64, (size_t)(K - g * 64) * sizeof(float));
}

/* ------------------------------------------------------------------ portable kernels */

static void rows_raw_portable(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    const int64_t K = w->cols;
    const int nt = a->nt;
    float wbuf[256];
    for (int64_t r = r0; r < r1; r++) {
        float acc[FM_MAX_NT][8];
        memset(acc, 0, sizeof(acc));
        for (int64_t k0 = 0; k0 < K; k0 += 256) {
            const int n = (int)(K - k0 < 256 ? K - k0 : 256);
            if (w->fmt == FM_F32) {
                memcpy(wbuf, w->q + (r * K + k0) * 4, (size_t)n * 4);
            } else {
                const uint16_t *src = (const uint16_t *)(w->q) + r * K + k0;
                if (w->fmt == FM_F16)
                    for (int i = 0; i < n; i++) wbuf[i] = fm_h2f(fm_ld16(src + i));
                else
                    for (int i = 0; i < n; i++) wbuf[i] = fm_bf2f(fm_ld16(src + i));
            }
            for (int t = 0; t < nt; t++) {
                const float *x = a->xp + t * a->ldx + k0;
                int i = 0;
                for (; i + 8 <= n; i += 8)
                    for (int l = 0; l < 8; l++) acc[t][l] += wbuf[i + l] * x[i + l];
                for (; i < n; i++) acc[t][i & 7] += wbuf[i] * x[i];
            }
        }
        for (int t = 0; t < nt; t++) {
            const float *c = acc[t];
            out[t * ldo + (r - r0)] = ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7]));
        }
    }
}

static void rows_quant_portable(const fm_mat *w, int64_t r0, int64_t r1, const fm_act *a, float *out, int64_t ldo)
{
    const int64_t K = w->cols, G = K / 64;
    const int nt = a->nt, fmt = w->fmt;
    const int64_t rb = fmt == FM_Q8 ? K : fmt == FM_Q4 ? K / 2 : K / 4;
    const int gb = (int)(rb / G);
    float wq[64];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *qr = w->q + r * rb;
        float acc[FM_MAX_NT], bacc[FM_MAX_NT];
        for (int t = 0; t < nt; t++) acc[t] = bacc[t] = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *q = qr + g * gb;
            if (fmt == FM_Q8) {
                for (int i = 0; i < 64; i++) wq[i] = (float)(int8_t)q[i];
            } else if (fmt == FM_Q4) {
                for (int j = 0; j < 32; j++) {
                    wq[2 * j] = (float)(q[j] & 15);
                    wq[2 * j + 1] = (float)(q[j] >> 4);
                }
            } else {
                for (int j = 0; j < 16; j++)
                    for (int k = 0; k < 4; k++) wq[4 * j + k] = (float)((q[j] >> (2 * k)) & 3);
            }
            const float s = fm_h2f(fm_ld16(w->s + r * G + g));
            const float b = w->b ? fm_h2f(fm_ld16(w->b + r * G + g)) : 0.0f;
            for (int t = 0; t < nt; t++) {
                const float *x = a->xp + t * a->ldx + g * 64;
                float d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int i = 0; i < 64; i += 8)
                    for (int l = 0; l < 8; l++) d[l] += wq[i + l] * x[i + l];
                const float dot = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
                acc[t] += s * dot;
                if (w->b) bacc[t] += b * a->xs[t * a->ldg + g];
            }
        }
        for (int t = 0; t < nt; t++) out[t * ldo + (r - r0)] = acc[t] + bacc[t];
    }
}

const fm_isa_impl fm_impl_portable = {
    "portable",
    4,
    {rows_raw_portable, rows_raw_portable, rows_raw_portable, rows_quant_portable, rows_quant_portable,
     rows_quant_portable},
    {{0, 0}, {0, 0}, {0, 0}, {0, 0}, {0, 0}, {0, 0}},
};

/* ------------------------------------------------------------------ orchestration */

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t row_bytes(const fm_mat *w)
{
    switch (w->fmt) {
    case FM_F32: return w->cols * 4;
    case FM_F16:
    case FM_BF16: return w->cols * 2;
    case FM_Q8: return w->cols + w->cols / 32;
    case FM_Q4: return w->cols / 2 + w->cols / 16;
    default: return w->cols / 4 + w->cols / 16;
    }
}

/* Rows per task: a multiple of 8 whose weights stay in L2 while a token block reuses them, and
 * enough tasks for every thread. */
static int64_t chunk_rows(const fm_mat *w, int64_t rows, int nthreads, int64_t T)
{
    int64_t c = (T > 1 ? (96 << 10) : (256 << 10)) / row_bytes(w);
    if (c > 256) c = 256;
    int64_t per_thread = ceil_div(rows, (int64_t)nthreads * 4);
    if (c > per_thread) c = per_thread;
    c = (c + 7) & ~(int64_t)7;
    if (c < 8) c = 8;
    return c;
}


/* --- fm_linear */

typedef struct {
    const fm_isa_impl *impl;
    fm_rows_fn rows;
    const fm_mat *w;
    const float *xp, *xs;
    int64_t ldxp, ldxs, T, chunk;
    float *y;
    int64_t ldy;
    float alpha;
    int accumulate;
} linear_ctx;

#define FM_TMP_ROWS 256

static void linear_task(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const linear_ctx *c = vctx;
    const int64_t r0 = task * c->chunk;
    const int64_t r1 = r0 + c->chunk < c->w->rows ? r0 + c->chunk : c->w->rows;
    const int mnt = c->impl->max_nt;
    float tmp[FM_MAX_NT * FM_TMP_ROWS];
    for (int64_t t0 = 0; t0 < c->T; t0 += mnt) {
        fm_act a = {c->xp + t0 * c->ldxp, c->xs + t0 * c->ldxs, c->ldxp, c->ldxs,
                    (int)(c->T - t0 < mnt ? c->T - t0 : mnt)};
        c->rows(c->w, r0, r1, &a, tmp, FM_TMP_ROWS);
        for (int t = 0; t < a.nt; t++) {
            float *yr = c->y + (t0 + t) * c->ldy;
            const float *src = tmp + t * FM_TMP_ROWS;
            if (c->accumulate)
                for (int64_t r = r0; r < r1; r++) yr[r] += c->alpha * src[r - r0];
            else
                for (int64_t r = r0; r < r1; r++) yr[r] = c->alpha * src[r - r0];
        }
    }
}

typedef struct {
    const fm_isa_impl *impl;
    int fmt;
    const float *x;
    int64_t ldx, K;
    float *xp, *xs;
    int64_t ldxp, ldxs;
    int xi;
} prep_ctx;

static void prep_task(void *vctx, int64_t t, int tid)
{
    (void)tid;
    const prep_ctx *c = vctx;
    fm_prepare(c->impl, c->fmt, c->x + t * c->ldx, c->K, c->xp + t * c->ldxp, c->xs + t * c->ldxs, c->xi);
}

static void run_prep(fm_pool *p, prep_ctx *pc, int64_t T)
{
    if (T * pc->K < (1 << 15))
        for (int64_t t = 0; t < T; t++) prep_task(pc, t, 0);
    else
        pool_run(p, T, prep_task, pc);
}

static int64_t pad16(int64_t n) { return (n + 15) & ~(int64_t)15; }
/* floats of one token's prepared activations: K (fp32), or 4K bytes + K/64 floats (integers) */
static int64_t prep_floats(int64_t K) { return pad16(K + K / 64); }

int fm_linear(const fm_mat *w, const float *x, int64_t T, int64_t ldx, float *y, int64_t ldy, float alpha,
              int accumulate)
{
    if (!w || !x || !y || T < 0 || w->fmt < 0 || w->fmt >= FM_NFORMATS) return FMK_EINVAL;
    if (T == 0) return FMK_OK;
    if (ldx < w->cols || ldy < w->rows) return FMK_EINVAL;
    pthread_once(&g_once, global_init);
    const int isa = atomic_load(&g_isa);
    const fm_isa_impl *impl = impl_of(isa);
    const int64_t K = w->cols, G = K / 64;
    const int64_t ldxp = prep_floats(K), ldxs = pad16(G + 1);
    const int xi = xi_level_for(isa, w->fmt, T);
    pthread_mutex_lock(&g_call_mu);
    fm_pool *p = pool_get();
    int rc = FMK_OK;
    /* tokens in chunks, to bound the workspace */
    int64_t Tc = (int64_t)(8 << 20) / (ldxp + ldxs);
    if (Tc < 1) Tc = 1;
    if (Tc > T) Tc = T;
    float *ws = workspace((size_t)(Tc * (ldxp + ldxs)));
    if (!ws) {
        rc = FMK_ENOMEM;
        goto out;
    }
    const int nth = p ? p->n : 1;
    for (int64_t t0 = 0; t0 < T; t0 += Tc) {
        const int64_t nt = T - t0 < Tc ? T - t0 : Tc;
        prep_ctx pc = {impl, w->fmt, x + t0 * ldx, ldx, K, ws, ws + Tc * ldxp, ldxp, ldxs, xi};
        run_prep(p, &pc, nt);
        linear_ctx c = {impl, rows_for(impl, w->fmt, xi), w, ws, ws + Tc * ldxp, ldxp, ldxs, nt, 0, y + t0 * ldy,
                        ldy, alpha, accumulate};
        c.chunk = chunk_rows(w, w->rows, nth, nt);
        if (c.chunk > FM_TMP_ROWS) c.chunk = FM_TMP_ROWS;
        pool_run(p, ceil_div(w->rows, c.chunk), linear_task, &c);
    }
out:
    pthread_mutex_unlock(&g_call_mu);
    return rc;
}

/* --- fm_moe: phase 1 (gate/up + SwiGLU per expert and row chunk), preparation of the
 * activations, phase 2 (down projection, weighted sum over experts per output-row chunk). */

typedef struct {
    const fm_isa_impl *impl;
    fm_rows_fn rows1, rows2; /* w13's and w2's row kernels */
    int xi2;                 /* integer activations for w2 (level), or -1 */
    const fm_expert *ex;
    const float *wts;
    int k;
    int64_t T, H, I;
    const float *xp, *xs; /* prepared x for w13 */
    int64_t ldxp, ldxs;
    float *act;           /* [k][T][I] natural-order SwiGLU activations */
    float *ap, *as;       /* [k][T] prepared for w2 */
    int64_t ldap, ldas;
    int64_t chunk1, nchunk1, chunk2;
    float *y;
} moe_ctx;

static void moe_phase1(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const moe_ctx *c = vctx;
    const int64_t e = task / c->nchunk1, ch = task % c->nchunk1;
    const fm_mat *w = &c->ex[e].w13;
    const int64_t i0 = ch * c->chunk1, i1 = i0 + c->chunk1 < c->I ? i0 + c->chunk1 : c->I;
    const int mnt = c->impl->max_nt;
    float g[FM_MAX_NT * FM_TMP_ROWS], u[FM_MAX_NT * FM_TMP_ROWS];
    for (int64_t t0 = 0; t0 < c->T; t0 += mnt) {
        fm_act a = {c->xp + t0 * c->ldxp, c->xs + t0 * c->ldxs, c->ldxp, c->ldxs,
                    (int)(c->T - t0 < mnt ? c->T - t0 : mnt)};
        c->rows1(w, i0, i1, &a, g, FM_TMP_ROWS);
        c->rows1(w, c->I + i0, c->I + i1, &a, u, FM_TMP_ROWS);
        for (int t = 0; t < a.nt; t++) {
            float *dst = c->act + (e * c->T + t0 + t) * c->I;
            for (int64_t i = i0; i < i1; i++)
                dst[i] = fm_silu_mul(g[t * FM_TMP_ROWS + i - i0], u[t * FM_TMP_ROWS + i - i0]);
        }
    }
}

static void moe_prep2(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const moe_ctx *c = vctx;
    fm_prepare(c->impl, c->ex[0].w2.fmt, c->act + task * c->I, c->I, c->ap + task * c->ldap, c->as + task * c->ldas,
               c->xi2);
}

static void moe_phase2(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const moe_ctx *c = vctx;
    const int64_t h0 = task * c->chunk2, h1 = h0 + c->chunk2 < c->H ? h0 + c->chunk2 : c->H;
    const int mnt = c->impl->max_nt;
    float tmp[FM_MAX_NT * FM_TMP_ROWS];
    for (int64_t t0 = 0; t0 < c->T; t0 += mnt) {
        const int nt = (int)(c->T - t0 < mnt ? c->T - t0 : mnt);
        for (int e = 0; e < c->k; e++) {
            const fm_mat *w = &c->ex[e].w2;
            fm_act a = {c->ap + (e * c->T + t0) * c->ldap, c->as + (e * c->T + t0) * c->ldas, c->ldap, c->ldas, nt};
            c->rows2(w, h0, h1, &a, tmp, FM_TMP_ROWS);
            const float we = c->wts[e];
            for (int t = 0; t < nt; t++) {
                float *yr = c->y + (t0 + t) * c->H;
                for (int64_t h = h0; h < h1; h++) yr[h] += we * tmp[t * FM_TMP_ROWS + h - h0];
            }
        }
    }
}

static int check_mat(const fm_mat *m)
{
    return m && m->fmt >= 0 && m->fmt < FM_NFORMATS && m->rows > 0 && m->cols > 0 && m->cols <= FM_MAX_COLS &&
           m->q && (!is_quant(m->fmt) || (m->cols % 64 == 0 && m->s && (m->fmt == FM_Q8 || m->b)));
}

int fm_moe(const fm_expert *ex, const float *wts, int k, const float *x, int64_t T, float *y)
{
    if (!ex || !wts || !x || !y || k <= 0 || T < 0) return FMK_EINVAL;
    if (T == 0) return FMK_OK;
    const int64_t H = ex[0].w13.cols, I = ex[0].w2.cols;
    for (int e = 0; e < k; e++) {
        const fm_expert *E = &ex[e];
        if (!check_mat(&E->w13) || !check_mat(&E->w2)) return FMK_EINVAL;
        if (E->w13.cols != H || E->w13.rows != 2 * I || E->w2.rows != H || E->w2.cols != I) return FMK_EINVAL;
        if (E->w13.fmt != ex[0].w13.fmt || E->w2.fmt != ex[0].w2.fmt) return FMK_EINVAL;
    }
    pthread_once(&g_once, global_init);
    const int isa = atomic_load(&g_isa);
    const fm_isa_impl *impl = impl_of(isa);
    const int64_t ldxp = prep_floats(H), ldxs = pad16(H / 64 + 1), ldap = prep_floats(I), ldas = pad16(I / 64 + 1);
    const int xi1 = xi_level_for(isa, ex[0].w13.fmt, T), xi2 = xi_level_for(isa, ex[0].w2.fmt, T);
    pthread_mutex_lock(&g_call_mu);
    fm_pool *p = pool_get();
    const int nth = p ? p->n : 1;
    int rc = FMK_OK;
    const int64_t per_tok = ldxp + ldxs + (int64_t)k * (I + ldap + ldas);
    const int m1 = atomic_load(&g_moe1);
    if (T == 1 && xi1 >= 0 && xi2 >= 0 && nth > 1 && m1 > 0 && k <= FM_MOE1_MAXK) {
        /* decode: one pass, no barrier between the phases (fm_moe1.c) */
        float *w1 = workspace((size_t)(per_tok + (int64_t)k * H));
        if (!w1) {
            rc = FMK_ENOMEM;
            goto out;
        }
        prep_ctx pc = {impl, ex[0].w13.fmt, x, H, H, w1, w1 + ldxp, ldxp, ldxs, xi1};
        run_prep(p, &pc, 1);
        float *act = w1 + ldxp + ldxs, *ap = act + (int64_t)k * I, *as = ap + (int64_t)k * ldap;
        fm_moe1_ctx c1 = {rows_for(impl, ex[0].w13.fmt, xi1), rows_for(impl, ex[0].w2.fmt, xi2), xi2, ex, wts, k, H, I,
                          w1, w1 + ldxp, act, ap, as, ldap, ldas, as + (int64_t)k * ldas, y, 0, 0, 0, 0};
        if (fm_moe1_plan(&c1, nth, m1)) {
            fm_moe1_run(p, &c1);
            goto out;
        }
    }
    int64_t Tc = (int64_t)(8 << 20) / per_tok;
    if (Tc < 1) Tc = 1;
    if (Tc > T) Tc = T;
    float *ws = workspace((size_t)(Tc * per_tok));
    if (!ws) {
        rc = FMK_ENOMEM;
        goto out;
    }
    moe_ctx c;
    c.impl = impl;
    c.rows1 = rows_for(impl, ex[0].w13.fmt, xi1);
    c.rows2 = rows_for(impl, ex[0].w2.fmt, xi2);
    c.xi2 = xi2;
    c.ex = ex;
    c.wts = wts;
    c.k = k;
    c.H = H;
    c.I = I;
    c.ldxp = ldxp;
    c.ldxs = ldxs;
    c.ldap = ldap;
    c.ldas = ldas;
    c.xp = ws;
    c.xs = ws + Tc * ldxp;
    c.act = ws + Tc * (ldxp + ldxs);
    c.ap = c.act + (int64_t)k * Tc * I;
    c.as = c.ap + (int64_t)k * Tc * ldap;
    for (int64_t t0 = 0; t0 < T; t0 += Tc) {
        c.T = T - t0 < Tc ? T - t0 : Tc;
        c.y = y + t0 * H;
        prep_ctx pc = {impl, ex[0].w13.fmt, x + t0 * H, H, H, (float *)c.xp, (float *)c.xs, ldxp, ldxs, xi1};
        run_prep(p, &pc, c.T);
        /* phase 1: a chunk is a range of i covering gate rows i and up rows I+i */
        int64_t ch1 = chunk_rows(&ex[0].w13, 2 * I * k, nth, c.T) / 2;
        ch1 = ch1 < 8 ? 8 : (ch1 + 7) & ~(int64_t)7;
        if (ch1 > FM_TMP_ROWS) ch1 = FM_TMP_ROWS;
        c.chunk1 = ch1;
        c.nchunk1 = ceil_div(I, ch1);
        pool_run(p, c.nchunk1 * k, moe_phase1, &c);
        if (k * c.T * I < (1 << 15))
            for (int64_t t = 0; t < k * c.T; t++) moe_prep2(&c, t, 0);
        else
            pool_run(p, k * c.T, moe_prep2, &c);
        int64_t ch2 = chunk_rows(&ex[0].w2, H, nth, c.T * k);
        if (c.T == 1) {
            /* decode: a task reads its rows of all k experts, so it is sized by the rows alone; at
             * least 16 tasks a thread (an expert cut into slices has short w2 rows, and chunk_rows
             * gave its 16 slices 4 tasks a thread on the H200's 16 cores, against 16 for 2 whole
             * Mixtral experts: the phase ended on its slowest thread) */
            int64_t cap = (ceil_div(H, (int64_t)nth * 16) + 7) & ~(int64_t)7;
            if (ch2 > cap) ch2 = cap < 8 ? 8 : cap;
        }
        if (ch2 > FM_TMP_ROWS) ch2 = FM_TMP_ROWS;
        c.chunk2 = ch2;
        pool_run(p, ceil_div(H, ch2), moe_phase2, &c);
    }
out:
    pthread_mutex_unlock(&g_call_mu);
    return rc;
}

/* --- fm_dequant */

static inline uint16_t f2bf(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16; /* nearest even; inf stays inf */
    return (uint16_t)((b & 0x7fffffffu) > 0x7f800000u ? (b >> 16) | 0x40u : rounded); /* NaN stays NaN */
}

/* one row, natural order, into w[cols] (float) */
static inline __attribute__((always_inline)) void dequant_row_body(const fm_mat *m, int64_t r, float *w)
{
    const int64_t K = m->cols, G = K / 64;
    switch (m->fmt) {
    case FM_F32: memcpy(w, m->q + r * K * 4, (size_t)K * 4); return;
    case FM_F16: {
        const uint16_t *p = (const uint16_t *)m->q + r * K;
        for (int64_t i = 0; i < K; i++) w[i] = fm_h2f(fm_ld16(p + i));
        return;
    }
    case FM_BF16: {
        const uint16_t *p = (const uint16_t *)m->q + r * K;
        for (int64_t i = 0; i < K; i++) w[i] = fm_bf2f(fm_ld16(p + i));
        return;
    }
    default: break;
    }
    for (int64_t g = 0; g < G; g++) {
        const float s = fm_h2f(fm_ld16(m->s + r * G + g));
        const float b = m->b ? fm_h2f(fm_ld16(m->b + r * G + g)) : 0.0f;
        float *o = w + g * 64;
        if (m->fmt == FM_Q8) {
            const int8_t *q = (const int8_t *)m->q + r * K + g * 64;
            for (int i = 0; i < 64; i++) o[i] = (float)q[i] * s;
        } else if (m->fmt == FM_Q4) {
            const uint8_t *q = m->q + r * (K / 2) + g * 32;
            float lo[32], hi[32];
            for (int j = 0; j < 32; j++) {
                lo[j] = (float)(q[j] & 15) * s + b;
                hi[j] = (float)(q[j] >> 4) * s + b;
            }
            for (int j = 0; j < 32; j++) {
                o[2 * j] = lo[j];
                o[2 * j + 1] = hi[j];
            }
        } else {
            const uint8_t *q = m->q + r * (K / 4) + g * 16;
            for (int j = 0; j < 16; j++)
                for (int k = 0; k < 4; k++) o[4 * j + k] = (float)((q[j] >> (2 * k)) & 3) * s + b;
        }
    }
}

static void dequant_row_portable(const fm_mat *m, int64_t r, float *w) { dequant_row_body(m, r, w); }
#ifdef FM_HAVE_X86
__attribute__((target("avx2,fma,f16c"))) static void dequant_row_avx2(const fm_mat *m, int64_t r, float *w)
{
    dequant_row_body(m, r, w);
}
#endif

typedef struct {
    const fm_mat *w;
    int64_t r0, r1, chunk, ldo;
    void *out;
    int out_fmt, isa;
} dq_ctx;

static void dequant_task(void *vctx, int64_t task, int tid)
{
    (void)tid;
    const dq_ctx *c = vctx;
    const int64_t a = c->r0 + task * c->chunk, b = a + c->chunk < c->r1 ? a + c->chunk : c->r1;
    float buf[4096];
    const int64_t K = c->w->cols;
    for (int64_t r = a; r < b; r++) {
        float *dst = c->out_fmt == FM_F32 ? (float *)c->out + (r - c->r0) * c->ldo : NULL;
        float *w = dst;
        if (!w) w = K <= 4096 ? buf : NULL;
        float *heap = NULL;
        if (!w) w = heap = malloc((size_t)K * sizeof(float));
        if (!w) continue; /* cannot happen for K <= FM_MAX_COLS in practice; row left as is */
#ifdef FM_HAVE_X86
        if (c->isa >= FM_ISA_AVX2)
            dequant_row_avx2(c->w, r, w);
        else
#endif
            dequant_row_portable(c->w, r, w);
        if (c->out_fmt == FM_BF16) {
            uint16_t *o = (uint16_t *)c->out + (r - c->r0) * c->ldo;
            for (int64_t i = 0; i < K; i++) o[i] = f2bf(w[i]);
        }
        free(heap);
    }
}

int fm_dequant(const fm_mat *w, int64_t r0, int64_t r1, void *out, int64_t ldo, int out_fmt)
{
    if (!check_mat(w) || !out || r0 < 0 || r1 > w->rows || r0 > r1 || ldo < w->cols) return FMK_EINVAL;
    if (out_fmt != FM_F32 && out_fmt != FM_BF16) return FMK_EINVAL;
    if (r0 == r1) return FMK_OK;
    pthread_once(&g_once, global_init);
    pthread_mutex_lock(&g_call_mu);
    fm_pool *p = pool_get();
    const int nth = p ? p->n : 1;
    dq_ctx c = {w, r0, r1, 0, ldo, out, out_fmt, atomic_load(&g_isa)};
    c.chunk = ceil_div(r1 - r0, (int64_t)nth * 8);
    if (c.chunk < 1) c.chunk = 1;
    pool_run(p, ceil_div(r1 - r0, c.chunk), dequant_task, &c);
    pthread_mutex_unlock(&g_call_mu);
    return FMK_OK;
}
