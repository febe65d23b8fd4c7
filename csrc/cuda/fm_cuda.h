/* flashmoe CUDA kernels: fused dequant GEMV and SwiGLU expert FFN over group-quantized weights.
 *
 * flashmoe_plugin/quant.py defines the format; every kernel is tested against its dequantize().
 * A weight "part" W [rows, cols] holds sections, each 64-byte aligned inside the part:
 *   FMC_Q8  int8 q [rows, cols], f16 scales [rows, cols/64]                    W = q*s
 *   FMC_Q4  u8 [rows, cols/2] (element 2j = low nibble of byte j), f16 scales, f16 biases
 *   FMC_Q2  u8 [rows, cols/4] (element 4j+k = bits 2k..2k+1 of byte j), f16 scales, biases
 * (format codes match the CPU kernels' fm_format: 3 = q8, 4 = q4, 5 = q2.)
 *
 * How the products are computed (FMA form, the scale folded into x):
 *   W[r]·x = sum_g s_g * (q_g · x_g) + b_g * sum(x_g)
 * Each block keeps x in shared memory as 16-bit fixed point per group of 64
 * (x_g = xs_g * xi, xi int16; for fp32 activations a second int16 limb carries the residual,
 * so x is represented to ~2^-31 of its group maximum). q_g·xi is an exact int32 dot product
 * (dp2a: int16 x int8), then fp32 accumulation over groups. The bias term uses sum(x_g) of the
 * unquantized x. Weights are read once: each warp streams its rows through a ring of cp.async
 * stages in shared memory (coalesced 16-byte copies); warp-shuffle reductions.
 *
 * The header is plain C (the stream is a void*), so Cython code includes it without the CUDA
 * headers. Every device pointer is a raw address (torch.Tensor.data_ptr()). All functions
 * return FMC_OK (0), a negative FMC_E* code, or a positive cudaError_t; fmc_strerror() says
 * which. Launches are asynchronous on the given stream.
 */
#ifndef FM_CUDA_H
#define FM_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fmc_format { FMC_Q8 = 3, FMC_Q4 = 4, FMC_Q2 = 5 };
enum fmc_dtype { FMC_F32 = 0, FMC_F16 = 1, FMC_BF16 = 2 };
enum fmc_mode { FMC_MODE_AUTO = 0, FMC_MODE_COOP = 1, FMC_MODE_TWO_LAUNCH = 2 };

#define FMC_OK 0
#define FMC_EINVAL (-1)   /* bad format, shape, dtype or argument */
#define FMC_ESMEM (-2)    /* the shape needs more shared memory than the device allows */
#define FMC_EALIGN (-3)   /* a pointer is not aligned as required (16 bytes for weights) */
#define FMC_EWORKSPACE (-4) /* workspace missing or too small */

#define FMC_MAX_K 32      /* most experts in one fused call */
#define FMC_MAX_NT 4      /* tokens per launch in the fused kernel (more are tiled) */

const char *fmc_strerror(int code);
int fmc_device_count(void);          /* < 0: -(cudaError_t) */
int fmc_version(void);

/* Section offsets (q, scales, biases; -1 where absent) and total bytes of one quantized part,
 * exactly as quant.sections / quant.part_nbytes. Returns FMC_OK or FMC_EINVAL. */
int fmc_part_sections(int fmt, int64_t rows, int64_t cols, int64_t offsets[3], int64_t *nbytes);

/* Where the two parts sit inside one expert record (store.layout.RecordLayout):
 * w13 [2*inter, hidden] (gate rows then up rows) at w13_off, w2 [hidden, inter] at w2_off,
 * both of format fmt; hidden and inter multiples of 64. */
typedef struct {
    int fmt;
    int64_t hidden, inter;
    int64_t w13_off, w2_off;
} fmc_layout;

/* Tuning knobs (process-wide) and what the last launch used. fmc_tune(key, value) sets the knob
 * when value >= 0 (the LAST_* keys are read-only) and returns the previous value.
 *   FMC_TUNE_PREFETCH   bytes of weights each block asks the L2 to prefetch (cp.async.bulk
 *                       prefetch, sm_90+) for phase B ahead of its first stages; 0 = off (default)
 *   FMC_TUNE_MAX_BLOCKS_PER_SM   cap on resident blocks per SM (0 = occupancy limit)
 *   FMC_TUNE_LAST_GRID / LAST_BPS / LAST_SMEM   grid, blocks per SM and shared bytes of the last launch
 *   FMC_TUNE_PDL        1 (default): plain (not cooperative) launches use programmatic dependent
 *                       launch on sm_90+ (the next kernel's weight loads overlap this one's tail); 0 = off
 *   FMC_TUNE_STAGES     stages per warp's weight ring: 0 (default) = 4 where a launch leaves one block
 *                       per SM and each warp streams more than 4 stages, else 3; or 3, 4 or 6 where it fits
 *   FMC_TUNE_LAST_STAGES  the ring depth of the last launch (read-only)
 *   FMC_TUNE_AUTO_MODE  what fmc_moe's FMC_MODE_AUTO runs where cooperative launch is supported:
 *                       0 (default) one cooperative launch, 1 two launches (PDL)
 *   FMC_TUNE_COOP_TRIGGER  1 (default): a cooperative launch lets the next launch (with programmatic
 *                       dependent launch, sm_90+) start once its blocks reach phase B: the next
 *                       layer's q/k/v GEMV streams its first weights under the experts' tail; 0 = off
 *   FMC_TUNE_BULK       the one-token MoE's (fmc_moe, T = 1) weight stream: 1 (default) Hopper bulk copies
 *                       (cp.async.bulk + mbarrier, sm_90+) where the cp.async ring's launch leaves one block
 *                       per SM and hidden and inter are whole multiples of 32 chunks of at least 128
 *                       (q4: multiples of 1024, at least 4096); 2 bulk wherever the shapes allow and it
 *                       fits; 0 the cp.async ring always. Same results bit for bit. */
enum fmc_tune_key {
    FMC_TUNE_PREFETCH = 0, FMC_TUNE_MAX_BLOCKS_PER_SM = 1,
    FMC_TUNE_LAST_GRID = 2, FMC_TUNE_LAST_BPS = 3, FMC_TUNE_LAST_SMEM = 4, FMC_TUNE_PDL = 5,
    FMC_TUNE_STAGES = 6, FMC_TUNE_LAST_STAGES = 7, FMC_TUNE_AUTO_MODE = 8, FMC_TUNE_COOP_TRIGGER = 9,
    FMC_TUNE_BULK = 10, FMC_TUNE_NKEYS = 11
};
int64_t fmc_tune(int key, int64_t value);

/* Workspace bytes fmc_moe needs for k experts (any T). The workspace's first 256 bytes hold a
 * grid barrier: allocate it zeroed once and reuse it on one stream at a time. */
size_t fmc_moe_workspace_bytes(int k, int64_t inter);

/* out[t] = sum_e w_e * w2_e · (silu(w1_e · x[t]) * (w3_e · x[t])) for t < T, all k experts.
 * x [T, hidden] and out [T, hidden] contiguous, dtypes x_dtype/out_dtype (FMC_F32/F16/BF16),
 * x 16-byte aligned.
 * recs: k record base addresses (16-byte aligned); recs_on_device != 0: `recs` is itself a
 * device array of k uint64 addresses, else a host array. Expert weights: w_dev, a device array
 * of k values of w_dtype, or (w_dev == NULL) w_host, k host floats, or (both NULL) all 1.
 * T = 1 with k experts is the decode step of one layer: one launch (mode COOP: gate/up +
 * SwiGLU, grid barrier, down + weighted sum) or two (mode TWO_LAUNCH). AUTO picks COOP where
 * the device supports cooperative launch. device: the CUDA device of the pointers.
 * When k experts' phase-B inputs do not fit in shared memory (fp32 activations, very large
 * inter), the experts run in groups, each accumulating into out. */
int fmc_moe(const fmc_layout *layout, int k, const uint64_t *recs, int recs_on_device,
            const void *w_dev, int w_dtype, const float *w_host,
            const void *x, int x_dtype, int64_t T, void *out, int out_dtype,
            void *workspace, size_t workspace_bytes, int mode, int device, void *stream);

/* y[t] = W · x[t] for one quantized part W [N, K] at `part` (16-byte aligned); x [T, K] (16-byte aligned),
 * y [T, N] contiguous. The GEMV (T = 1) and small batches (tiles of FMC_MAX_NT tokens). */
int fmc_linear(int fmt, const void *part, int64_t N, int64_t K, const void *x, int x_dtype,
               int64_t T, void *y, int y_dtype, int device, void *stream);

/* out [N, K] (dtype out_dtype) = the dequantized matrix, bit-identical to quant.dequantize
 * (fp32, then rounded to the output dtype). For prefill through cuBLAS. */
int fmc_dequant(int fmt, const void *part, int64_t N, int64_t K, void *out, int out_dtype,
                int device, void *stream);

/* The decode GEMV of dense matrices (csrc/cuda/fm_gemv.cu): y[t] = [W_0; W_1; ...] · x[t], up to
 * FMC_GEMV_MAX_PARTS parts of format fmt (q8 or q4), part i [rows[i], K] at parts[i] (16-byte
 * aligned, sections as fmc_part_sections), stacked along the rows where they lie: y [T, sum rows]
 * contiguous (part i's rows are columns rows[0] + .. + rows[i-1] onwards). T = 1..4 tokens, x
 * [T, K] bf16/f16 (16-byte aligned), y f32/bf16/f16. fmc_linear's arithmetic (x in 16-bit fixed
 * point per group of 64, exact int dot products, fp32 sums); a different work split (a warp per
 * row pair and K slice; a block per 8 warps' items where they fit in one wave, else a persistent
 * grid with each warp's next loads in flight over its arithmetic). FMC_EINVAL
 * for what it does not take (q2, fp32 x, T > 4): the caller uses fmc_linear then. */
#define FMC_GEMV_MAX_PARTS 4
int fmc_gemv(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *x,
             int x_dtype, int64_t T, void *y, int y_dtype, int device, void *stream);
/* fmc_gemv at one token of x = rms_norm(h + hd) * nw (h, hd, nw [K] of x_dtype, 16-byte aligned),
 * computed inside the GEMV's blocks (no kernel of its own) and rounded as models.layers.rms_norm
 * rounds: the same y as fmc_gemv on that x. h + hd is also written to hs [K] (16-byte aligned). */
int fmc_gemv_norm(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *h,
                  const void *hd, const void *nw, float eps, void *hs, int x_dtype, void *y, int y_dtype, int device,
                  void *stream);
/* One decode token's routing after attention, one block (csrc/cuda/fm_route.cu): h2 = h + o;
 * x = rms_norm(h2) * nw; logits = router [E, H] · x (fp32 sums, rounded to the dtype); softmax;
 * the top k (ties to the lower id), divided by their sum if norm_topk; ids (also into ids_row),
 * weights (dtype) and addrs = base[0] + entries[id] * stride. h, o, nw, router, h2, x of dtype
 * (bf16/f16), 16-byte aligned; H % 8 == 0, H <= FMC_ROUTE_MAX_H, E <= FMC_ROUTE_MAX_E, k <= E, k <= 32. */
#define FMC_ROUTE_MAX_H 8192
#define FMC_ROUTE_MAX_E 1024
int fmc_route(const void *h, const void *o, const void *nw, const void *router, int64_t H, int64_t E, int k,
              float eps, int norm_topk, const int64_t *entries, const int64_t *base, int64_t stride, void *h2,
              void *x, void *weights, int64_t *ids, int64_t *ids_row, int64_t *addrs, int dtype, int device,
              void *stream);

/* Knobs of fmc_gemv (as fmc_tune): SPLIT warps per row pair (0 = auto), WARPS per block (0 = auto: 8),
 * PDL (1 = programmatic dependent launch on sm_90+), KERNEL (0 = auto: 1 where its blocks fit in one
 * wave, else the persistent grid; 1 = a block per item, 2 / 3 = the persistent grid at 2 / 3 blocks
 * per SM), GRID (the persistent grid's most blocks; 0 = auto: the blocks resident at once), PERSIST
 * (the persistent variant auto takes, 2 or 3; 0 = per format and tokens); read-only: what the last
 * launch used. */
enum fmc_gemv_tune_key {
    FMC_GEMV_TUNE_SPLIT = 0, FMC_GEMV_TUNE_WARPS = 1, FMC_GEMV_TUNE_PDL = 2,
    FMC_GEMV_TUNE_LAST_SPLIT = 3, FMC_GEMV_TUNE_LAST_WARPS = 4, FMC_GEMV_TUNE_LAST_GRID = 5,
    FMC_GEMV_TUNE_KERNEL = 6, FMC_GEMV_TUNE_GRID = 7, FMC_GEMV_TUNE_LAST_KERNEL = 8, FMC_GEMV_TUNE_PERSIST = 9,
    FMC_GEMV_TUNE_NKEYS = 10
};
int64_t fmc_gemv_tune(int key, int64_t value);

#ifdef __cplusplus
}
#endif
#endif
