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
/* How the weights reach the tensor cores:
 *   FMP_AUTO     q4: the integer codes themselves (bf16 128 + q, made from the nibbles by bit
 *                operations), the group's scale and bias applied to the fp32 sums after each
 *                64-wide step (w.x = s (128+q).x + (b - 128 s) sum(x)); x is then expected with
 *                each 8 elements in the order 0,4,1,5,2,6,3,7 (and the SwiGLU output is written
 *                so); q8: as FMP_DEQUANT
 *   FMP_DEQUANT  each weight dequantized in fp32 (q s + b, one rounding), rounded to bf16
 *                (measured 1.2x slower for q4 on the H200; kept for comparisons) */
enum fmp_variant { FMP_AUTO = 0, FMP_DEQUANT = 1 };

/* y = x @ W_e.T per expert e < E, all of them in one launch:
 *   parts: device array of E uint64 addresses; W_e = the part at parts[e] + part_off (format fmt,
 *          [N, K], sections at 0 (q), s_off (scales) and b_off (biases; q4 only), as
 *          quant.sections), 16-byte aligned;
 *   offsets: device array of E+1 int32 (token offsets, offsets[0] = 0);
 *   x: bf16 [offsets[E], K], y: bf16 [offsets[E], N] (swiglu = 0) or [offsets[E], N/2]
 *      (swiglu = 1: W holds gate rows then up rows, y = silu(x W_gate.T) * (x W_up.T), each
 *      product rounded to bf16 first, as the torch reference computes it);
 *   max_count: the largest offsets[e+1] - offsets[e] (sizes the grid; larger counts are cut);
 *   variant: fmp_variant (for q4 with FMP_AUTO, x's element order is permuted as said there).
 * K % 64 == 0, N % 64 == 0 (swiglu: N/2 % 128 == 0), x and y 16-byte aligned.
 * Returns 0, -1 (bad argument), -2 (not enough shared memory) or a positive cudaError_t. */
int fmp_grouped_gemm(int fmt, const uint64_t *parts, int64_t part_off, int64_t s_off, int64_t b_off,
                     int64_t N, int64_t K, int swiglu, int variant, const int32_t *offsets, int E,
                     int64_t max_count, const void *x, void *y, int device, void *stream);

int fmp_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
