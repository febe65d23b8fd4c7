/* llama.cpp's quantized matmul numerics (internal to fm_gguf.c): the activation row is quantized
 * to the weight type's `vec_dot_type` as ggml-cpu does on x86 (Q8_0 for Q4_0/Q5_0/Q8_0/MXFP4, Q8_1 for
 * Q4_1/Q5_1, Q8_K for Q4_K/Q5_K/Q6_K), then each weight row is dotted with it in integers; the
 * per-block integer sums are combined with the block scales in float, in block order.
 *
 * Integer sums are exact (an AVX2 twin and a portable loop), and the float combination is the same
 * scalar sequence either way (no FMA contraction in this file), so results agree bit for bit. */
#ifndef FM_GGUF_Q8_H
#define FM_GGUF_Q8_H

#include <stdint.h>

/* Activation rows quantized for one weight type: T rows of n elements. q: int8 [T][n]; d: the
 * block scales as floats [T][n/32] (Q8_0/Q8_1: fp16-rounded, one per 32; Q8_K: fp32, one per 256
 * in the first n/256 slots); s: Q8_1's fp16-rounded d * sum(q) [T][n/32]; bsum: Q8_K's sums of 16
 * quants [T][n/16]. */
typedef struct {
    int64_t n, T;
    int8_t *q;
    float *d, *s;
    int32_t *bsum;
    int mmid;  /* 1: rows of one expert (llama.cpp's mul_mat_id), which orders K-quant sums otherwise */
} fmg_qact;

/* silu(x) as ggml-cpu computes it (its own vectorized expf), for the SwiGLU between the quantized
 * matmuls: the down projection's activation quantization sees the same values. */
float fmg_q8_silu(float x);

/* 1 if weights of this type take quantized activations (llama.cpp's block formats), else 0. */
int fmg_q8_supported(int type);

/* Allocates and fills a->* for T rows of x (row stride ldx); FMG_ENOMEM on failure. */
int fmg_q8_quantize(int type, const float *x, int64_t T, int64_t ldx, int64_t n, fmg_qact *a);
void fmg_q8_free(fmg_qact *a);

/* Scratch bytes rows_dot_q8 needs per thread for rows of n elements and T tokens. */
int64_t fmg_q8_scratch_bytes(int64_t n);

/* out[t * ldo + r - r0] = W[r] . a[t] for r0 <= r < r1 and every token t of a. */
void fmg_q8_rows_dot(int type, const uint8_t *data, int64_t row_bytes, int64_t r0, int64_t r1, const fmg_qact *a,
                     float *out, int64_t ldo, void *scratch);

/* The integer dot in use: "avx2" (where the CPU has it) or "portable"; set_isa(NULL) picks the
 * best, set_isa("portable"|"avx2") forces one (-1 if not available here). For the twin tests. */
int fmg_q8_set_isa(const char *isa);
const char *fmg_q8_isa(void);

#endif
