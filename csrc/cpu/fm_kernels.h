/* flashmoe CPU kernels: fused dequant GEMV / GEMM and SwiGLU expert FFN over group-quantized
 * weights (flashmoe_plugin/quant.py is the format definition; every kernel is tested against it).
 *
 * Formats of one weight "part" W [rows, cols] (sections 64-byte aligned inside the part):
 *   FM_F32 / FM_F16 / FM_BF16  the raw matrix
 *   FM_Q8  int8 q [rows, cols], f16 scales [rows, cols/64]                 W = q*s
 *   FM_Q4  u8 [rows, cols/2] (element 2j = low nibble of byte j), f16 scales, f16 biases
 *   FM_Q2  u8 [rows, cols/4] (element 4j+k = bits 2k..2k+1 of byte j), f16 scales, biases
 * Quantized formats use groups of 64 along cols: W = q*s_g + b_g, computed in FMA form
 *   W[r]·x = sum_g s_g*(q_g·x_g) + b_g*sum(x_g),  fp32 accumulation.
 *
 * Activations are fp32 (decode of q4 / q8 quantizes them to 21-bit integers per group of 64 on the
 * way in: fm_set_int_act, fm_kernels_xi.c). All entry points are thread-safe (calls are serialised) and run on an
 * own pthread pool (no OpenMP). No function reads outside the ranges described by its
 * arguments; the caller (cython/_cpu_kernels.pyx) validates buffer sizes with fm_part_nbytes.
 */
#ifndef FM_KERNELS_H
#define FM_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fm_format { FM_F32 = 0, FM_F16 = 1, FM_BF16 = 2, FM_Q8 = 3, FM_Q4 = 4, FM_Q2 = 5, FM_NFORMATS = 6 };
enum fm_isa { FM_ISA_PORTABLE = 0, FM_ISA_AVX2 = 1, FM_ISA_AVX512 = 2, FM_NISA = 3 };

#define FM_GROUP 64
#define FM_SECTION_ALIGN 64

/* error codes (negative); fm_strerror gives text */
#define FMK_OK 0
#define FMK_EINVAL (-1)   /* bad format / shape / argument */
#define FMK_ENOMEM (-2)   /* workspace allocation failed */
#define FMK_EISA (-3)     /* ISA level not supported by this CPU or build */

const char *fm_strerror(int code);

/* ---- format geometry (mirrors quant.sections) ------------------------------------------ */
/* Section offsets inside a part: q (or raw w), scales, biases; -1 where absent. */
int fm_part_sections(int fmt, int64_t rows, int64_t cols, int64_t offsets[3], int64_t nbytes[3]);
/* Total bytes of a part (rounded up to the section alignment); <0 on error. */
int64_t fm_part_nbytes(int fmt, int64_t rows, int64_t cols);

/* ---- a weight part, resolved to raw pointers --------------------------------------------- */
typedef struct {
    int fmt;
    int64_t rows, cols;
    const uint8_t *q;   /* packed weights (or raw matrix) */
    const uint16_t *s;  /* f16 scales [rows, cols/64], NULL for raw */
    const uint16_t *b;  /* f16 biases [rows, cols/64], NULL for raw and q8 */
} fm_mat;

/* Fill *m from the start of a part (base) of the given format and shape. */
int fm_mat_init(fm_mat *m, int fmt, int64_t rows, int64_t cols, const void *base);

/* One expert: w13 [2I, H] (gate rows, then up rows) and w2 [H, I]. */
typedef struct {
    fm_mat w13, w2;
} fm_expert;

/* ---- runtime configuration --------------------------------------------------------------- */
int fm_max_isa(void);            /* best ISA this CPU + build supports */
int fm_get_isa(void);
int fm_set_isa(int isa);         /* FMK_EISA if above fm_max_isa(); env FLASHMOE_CPU_ISA sets the start value */
const char *fm_isa_name(int isa);
int fm_get_num_threads(void);
void fm_set_num_threads(int n);  /* n <= 0: number of CPUs usable by this process */
long fm_get_spin_us(void);       /* how long idle pool workers spin for the next job before they sleep */
void fm_set_spin_us(long us);    /* (default 50, or FLASHMOE_CPU_SPIN_US): a caller whose jobs come
                                    further apart than that pays the workers' wake-up in each job */

/* Decode (one token) of q4 / q8 weights with the activations as 21-bit integers per group of 64
 * and integer dot products (fm_kernels_xi.c; error ~ fp32 rounding), on by default; off: fp32
 * activations. Env FLASHMOE_CPU_ACT=int|f32 sets the start value. */
int fm_get_int_act(void);
void fm_set_int_act(int on);

/* fm_moe's decode (T = 1, integer activations in both phases, 2+ threads) in one pass over the
 * experts without a barrier between gate/up and down (fm_moe1.c), in about tasks_per_thread
 * slices a thread; 0: the two-phase path (prefill's). Env FLASHMOE_CPU_MOE1=N sets the start value
 * (default 4). */
int fm_get_moe1(void);
void fm_set_moe1(int tasks_per_thread);

/* ---- kernels -------------------------------------------------------------------------------- */
/* Y[t, r] = alpha * W[r]·X[t] (+ Y[t, r] if accumulate), t < T; X rows stride ldx, Y rows ldy.
 * T = 1 is the decode GEMV; T > 1 reuses each dequantized register tile for a block of tokens. */
int fm_linear(const fm_mat *w, const float *x, int64_t T, int64_t ldx,
              float *y, int64_t ldy, float alpha, int accumulate);

/* SwiGLU experts, fused: for every token t < T (rows of x / y, stride H),
 *   y[t] += sum_e weights[e] * w2_e · (silu(w1_e·x[t]) * (w3_e·x[t])).
 * k = 1, T > 1: prefill of one expert; k > 1, T = 1: one decode step through a layer's
 * selected experts in one call (two parallel phases). All experts must share H and I. */
int fm_moe(const fm_expert *experts, const float *weights, int k,
           const float *x, int64_t T, float *y);

/* The float matrix a part encodes, rows [r0, r1) into out (row-major, ldo elements a row):
 * out_fmt FM_F32 (float) or FM_BF16 (uint16, round to nearest even). Multi-threaded. For
 * prefill with many tokens, dequantize once + a BLAS GEMM can beat the fused kernels. */
int fm_dequant(const fm_mat *w, int64_t r0, int64_t r1, void *out, int64_t ldo, int out_fmt);

#ifdef __cplusplus
}
#endif
#endif
