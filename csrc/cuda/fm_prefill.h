/* Prefill on tensor cores (csrc/cuda/fm_prefill.cu): a grouped mixed-input GEMM over the
 * group-quantized parts of flashmoe_plugin/quant.py (q8, q4), for all of a layer's experts in
 * one launch. Tokens arrive grouped per expert (sorted by expert: rows offsets[e] ..
 * offsets[e+1]-1 of x go through expert e); the weights are dequantized tile by tile in
 * registers, straight from shared memory into the mma.sync m16n8k16 bf16 fragments (sm_80+),
 * and never written out as bf16 matrices. Plain C header (the stream is a void*). */
#ifndef FM_PREFILL_H
#define FM_PREFILL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fmp_format { FMP_Q8 = 3, FMP_Q4 = 4 };  /* as fm_cuda.h's FMC_Q8/FMC_Q4 */

/* y = x @ W_e.T per expert e < E, all of them in one launch:
 *   parts: device array of E uint64 addresses; W_e = the part at parts[e] + part_off (format fmt,
 *          [N, K], sections at 0 (q), s_off (scales) and b_off (biases; q4 only), as
 *          quant.sections), 16-byte aligned;
 *   offsets: device array of E+1 int32 (token offsets, offsets[0] = 0);
 *   x: bf16 [offsets[E], K], y: bf16 [offsets[E], N] (swiglu = 0) or [offsets[E], N/2]
 *      (swiglu = 1: W holds gate rows then up rows, y = silu(x W_gate.T) * (x W_up.T), each
 *      product rounded to bf16 first, as the torch reference computes it);
 *   max_count: the largest offsets[e+1] - offsets[e] (sizes the grid; larger counts are cut).
 * K % 64 == 0, N % 64 == 0 (swiglu: N/2 % 128 == 0), x and y 16-byte aligned.
 * Returns 0, -1 (bad argument), -2 (not enough shared memory) or a positive cudaError_t. */
int fmp_grouped_gemm(int fmt, const uint64_t *parts, int64_t part_off, int64_t s_off, int64_t b_off,
                     int64_t N, int64_t K, int swiglu, const int32_t *offsets, int E, int64_t max_count,
                     const void *x, void *y, int device, void *stream);

int fmp_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
