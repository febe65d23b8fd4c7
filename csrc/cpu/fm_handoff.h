/* flashmoe: a decode token's n_cpu_moe layers in one host call (runtime/hybrid_token.py).
 *
 * The device runs the whole token as one captured graph; at each CPU layer it writes the layer's
 * packed row (x [H], weights [k], ids [k], fp32) into host memory, sets that layer's `ready` flag
 * to the token's sequence number and waits for `done`. This call, on the host with the GIL
 * released, walks the CPU layers in order: wait for ready == seq, run the chosen experts on the C
 * pool (fm_moe, its threads kept spinning between layers), write the fp32 sum into the layer's
 * `out`, set done = seq. No Python, no launch and no event wait between two CPU layers. */
#ifndef FM_HANDOFF_H
#define FM_HANDOFF_H
#include <stdint.h>
#include "fm_kernels.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    volatile uint32_t *ready;       /* the device writes seq here once `pack` holds the layer's row */
    volatile uint32_t *done;        /* the host writes seq here once `out` holds the experts' sum */
    const float *pack;              /* [H + 2k]: x, routing weights, expert ids (as floats) */
    float *out;                     /* [H] */
    const uint8_t *const *records;  /* [n_experts] record base addresses */
    int n_experts;
} fm_hybrid_layer;

typedef struct {
    int w13_fmt, w2_fmt;
    int64_t w13_off, w2_off, H, I;
    int k;
} fm_hybrid_spec;

/* Layers 0..n-1 of one token with sequence number seq. t_ready[j]: CLOCK_MONOTONIC ns when layer
 * j's row was seen; ids_out[j*k..]: its experts. A flag not seen within timeout_ns, a bad id or a
 * kernel error: every remaining layer's done is still set (the device must not wait forever) and
 * the first error is returned (FMK_EINVAL, or FMK_ETIMEDOUT, below) with *bad_layer = j. */
#define FMK_ETIMEDOUT (-4)
int fm_hybrid_token(const fm_hybrid_layer *layers, int n, const fm_hybrid_spec *spec, uint32_t seq,
                    int64_t timeout_ns, int64_t *t_ready, int32_t *ids_out, int *bad_layer);

#ifdef __cplusplus
}
#endif
#endif
