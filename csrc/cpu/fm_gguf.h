/* llama.cpp's block formats (GGUF tensor types) on the CPU: bit-exact dequantization and fused
 * dequant GEMV/GEMM + SwiGLU expert FFN over them (flashmoe_plugin/quant_gguf.py describes the
 * formats; gguf-py's gguf.quants.dequantize is the reference the tests hold us to).
 *
 * A weight W [rows, cols] of type t is rows * row_bytes(t, cols) bytes, rows back to back, as
 * a GGUF tensor lies in the file. Types (GGML ids): F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8,
 * Q4_K 12, Q5_K 13, Q6_K 14, BF16 30, MXFP4 39. Activations and results are fp32. With act = FMG_ACT_Q8
 * the products over block formats compute as llama.cpp's CPU matmuls do: the activation rows are
 * quantized to the weight type's vec_dot_type (Q8_0, Q8_1 or Q8_K) and dotted in integers
 * (fm_gguf_q8.h); FMG_ACT_F32 dots fp32 activations with the exactly dequantized rows. F32, F16,
 * BF16 weights always take fp32 activations (MXFP4 takes Q8_0 ones, as llama.cpp).
 *
 * The fused kernels dequantize one row at a time into a small buffer and dot it with every
 * token; they are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at run time
 * (GCC target_clones on x86-64 Linux). fmg_dequant is compiled without FMA contraction so that
 * it equals the reference bit for bit. */
#ifndef FM_GGUF_H
#define FM_GGUF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { FMG_F32 = 0, FMG_F16 = 1, FMG_Q4_0 = 2, FMG_Q4_1 = 3, FMG_Q5_0 = 6, FMG_Q5_1 = 7, FMG_Q8_0 = 8, FMG_Q4_K = 12, FMG_Q5_K = 13,
       FMG_Q6_K = 14, FMG_BF16 = 30, FMG_MXFP4 = 39 };

enum { FMG_ACT_F32 = 0, FMG_ACT_Q8 = 1 };

#define FMG_OK 0
#define FMG_EINVAL (-1)
#define FMG_ENOMEM (-2)

/* Bytes of one row of cols elements; -1 for an unknown type or cols not a multiple of its block. */
int64_t fmg_row_bytes(int type, int64_t cols);

typedef struct {
    int type;
    int64_t rows, cols;
    const uint8_t *data;
} fmg_mat;

/* out[r * cols + c] = W[r0 + r, c] for r0 <= r < r1, fp32. */
int fmg_dequant(const fmg_mat *w, int64_t r0, int64_t r1, float *out);

/* y[t * ldy + r] = alpha * W[r] . x[t * ldx ...] (+ y if accumulate), t < T. */
int fmg_linear(const fmg_mat *w, const float *x, int64_t T, int64_t ldx, float *y, int64_t ldy,
               float alpha, int accumulate, int act);

/* One expert: w13 [2I, H] (gate rows then up rows), w2 [H, I]. */
typedef struct {
    fmg_mat w13, w2;
} fmg_expert;

/* y[t] += sum_e weights[e] * w2_e . (silu(w1_e . x[t]) * (w3_e . x[t])), x and y [T, H]. */
int fmg_moe(const fmg_expert *ex, const float *weights, int k, const float *x, int64_t T, float *y, int act);

int fmg_get_num_threads(void);
void fmg_set_num_threads(int n);
const char *fmg_isa(void);  /* the clone the fused kernels run: "avx512", "avx2" or "portable" */

/* Runs fn(ctx, task, scratch) for task < ntasks on the pool's threads; scratch: `scratch` floats
 * per thread. FMG_OK, or FMG_ENOMEM. */
typedef void (*fmg_task_fn)(void *ctx, int64_t task, float *scratch);
int fmg_run(fmg_task_fn fn, void *ctx, int64_t ntasks, size_t scratch);

#ifdef __cplusplus
}
#endif
#endif
