/* flashmoe: a decode token's n_cpu_moe layers in one host call (fm_handoff.h says how). */
#include "fm_handoff.h"

#include <stdatomic.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HO_PAUSE() _mm_pause()
#else
#define HO_PAUSE() ((void)0)
#endif

static int64_t ho_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* acquire / release on flags the device reads and writes over PCIe (x86: plain loads and stores
 * in program order; the fences keep the compiler from moving the row's reads or the sum's writes) */
static uint32_t load_flag(volatile uint32_t *f)
{
    uint32_t v = *f;
    atomic_thread_fence(memory_order_acquire);
    return v;
}

static void store_flag(volatile uint32_t *f, uint32_t v)
{
    atomic_thread_fence(memory_order_release);
    *f = v;
}

/* spin until *f == seq; 0 when seen, FMK_ETIMEDOUT after timeout_ns */
static int wait_flag(volatile uint32_t *f, uint32_t seq, int64_t timeout_ns)
{
    if (load_flag(f) == seq) return FMK_OK;
    const int64_t t0 = ho_now_ns();
    for (unsigned spins = 1;; spins++) {
        if (load_flag(f) == seq) return FMK_OK;
        HO_PAUSE();
        if ((spins & 1023) == 0 && ho_now_ns() - t0 > timeout_ns) return FMK_ETIMEDOUT;
    }
}

int fm_hybrid_token(const fm_hybrid_layer *layers, int n, const fm_hybrid_spec *spec, uint32_t seq,
                    int64_t timeout_ns, int64_t *t_ready, int32_t *ids_out, int *bad_layer)
{
    if (!layers || !spec || n < 0 || spec->k <= 0 || spec->k > 64 || !t_ready || !ids_out) return FMK_EINVAL;
    const int k = spec->k;
    const int64_t H = spec->H, I = spec->I;
    fm_expert ex[64];
    float wts[64];
    int rc = FMK_OK, j = 0;
    *bad_layer = -1;
    for (; j < n; j++) {
        const fm_hybrid_layer *L = &layers[j];
        rc = wait_flag(L->ready, seq, timeout_ns);
        t_ready[j] = ho_now_ns();
        if (rc != FMK_OK) break;
        for (int e = 0; e < k && rc == FMK_OK; e++) {
            const float id = L->pack[H + k + e];
            wts[e] = L->pack[H + e];
            ids_out[j * k + e] = (int32_t)id;
            if (!(id >= 0.0f && id < (float)L->n_experts) || (float)(int32_t)id != id) {
                rc = FMK_EINVAL;
                break;
            }
            const uint8_t *rec = L->records[(int)id];
            rc = fm_mat_init(&ex[e].w13, spec->w13_fmt, 2 * I, H, rec + spec->w13_off);
            if (rc == FMK_OK) rc = fm_mat_init(&ex[e].w2, spec->w2_fmt, H, I, rec + spec->w2_off);
        }
        if (rc == FMK_OK) {
            memset(L->out, 0, (size_t)H * sizeof(float));
            rc = fm_moe(ex, wts, k, L->pack, 1, L->out);
        }
        if (rc != FMK_OK) break;
        store_flag(L->done, seq);
    }
    if (rc != FMK_OK) {
        *bad_layer = j;
        for (; j < n; j++) store_flag(layers[j].done, seq); /* release the device's waits */
    }
    return rc;
}
