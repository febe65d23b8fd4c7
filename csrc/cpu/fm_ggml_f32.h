/* llama.cpp's F32 numerics for the parts of a quantized GGUF's forward that stay in floats:
 * the router's matmul, RoPE, the attention's two matmuls and its softmax. Each follows the float
 * order ggml-cpu uses on x86 (built with AVX-512, as llama.cpp builds for this class of CPU), so
 * that our residual stream equals llama.cpp's bit for bit given the same inputs (issue 11):
 *
 * - mul_mat of F32 rows picks, per call, llamafile's tinyBLAS (16 lanes of FMA along the row, then
 *   _mm512_reduce_add_ps) when it takes the call: at least 2 tokens in one contiguous batch, rows
 *   % 4 == 0, length % 16 == 0; else ggml_vec_dot_f32 (4 accumulators of 16 lanes over steps of
 *   64, reduced pairwise, then the leftovers one by one in float). The attention's K.Q always takes
 *   vec_dot (Q is a permuted view), its P.V tinyBLAS for a batch and vec_dot for one token.
 * - soft_max: x * scale, masked; exp(x - max) by ggml's vectorized expf in blocks of 16 (libm expf
 *   for a tail), each block's float sum added to a double; then * (float)(1 / sum).
 * - rope (NORMAL and NEOX alike): theta = pos, then theta *= powf(base, -2/n_dims) pair by pair,
 *   cosf/sinf of libm.
 *
 * Every FMA is an explicit fmaf (one rounding, as the vector FMA) and no other product is fused,
 * so the portable loops and the AVX-512 twin give the same bits. */
#ifndef FM_GGML_F32_H
#define FM_GGML_F32_H

#include <stdint.h>

/* ggml_vec_dot_f32 (sgemm = 0) or tinyBLAS's dot (sgemm = 1: n % 16 == 0). */
float fmg_f32_dot(const float *x, const float *y, int64_t n, int sgemm);

/* y[t * ldy + r] = w[r] . x[t] for r < rows, t < T (x: T rows of n, stride ldx; w: rows of n,
 * stride ldw), in the order llama.cpp's mul_mat takes for this shape. */
void fmg_f32_matmul(const float *x, int64_t T, int64_t ldx, const float *w, int64_t rows, int64_t ldw, int64_t n,
                    float *y, int64_t ldy);

/* ggml's vectorized expf, one lane. */
float fmg_expf(float x);

/* ggml_soft_max_ext on one row in place: x * scale, entries at or past `valid` masked out (-inf). */
void fmg_softmax_row(float *x, int64_t n, int64_t valid, float scale);

/* cos/sin of RoPE's n_dims/2 pair angles at position pos, as ggml_rope_cache_init (plain RoPE). */
void fmg_rope_cache(int64_t pos, int64_t n_dims, float base, float *cos_out, float *sin_out);

/* RoPE in place on x [T][heads][d] (row stride ld per token), the pairs (i, i + d/2) of the
 * half-split layout (llama.cpp's NORMAL mode rotates the same pairs of its permuted rows), with
 * tables cos/sin [T][d/2] from fmg_rope_cache: x0*cos - x1*sin and x0*sin + x1*cos, each an fmaf
 * over the other product, as GCC contracts ggml's rotate_pairs. */
void fmg_rope_apply(float *x, int64_t T, int64_t heads, int64_t d, int64_t ld, const float *cos_t, const float *sin_t);

/* Causal attention of T queries at positions start..start+T-1 over keys/values 0..start+T-1, as
 * llama.cpp's non-flash path: q [T][H][d] (row stride ldq per token), k, v [S][Hkv][d] (strides
 * ldk, ldv per position), out [T][H][d] (stride ldo). interleaved: q and k are in the half-split
 * order while llama.cpp holds them permuted (pairs side by side: GGUF `llama` q/k rows), so the
 * K.Q sums run in that order. Returns 0, FMG_EINVAL or FMG_ENOMEM. */
int fmg_attention(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv, int64_t T,
                  int64_t start, int64_t H, int64_t Hkv, int64_t d, float scale, int interleaved, float *out,
                  int64_t ldo);

#endif
