/* One decode token's attention block in one launch (csrc/cuda/fm_attn.cu): RoPE of q and k, the
 * K/V cache writes at the position, GQA attention over positions 0..pos (the window's last
 * `window` positions when window > 0), the heads' outputs in the activation dtype.
 *
 * The position is read from device memory (`pos`, one int64), so a captured CUDA graph replays
 * the launch at every position. Plain C (the stream is a void*), as fm_cuda.h; returns FMC_OK
 * (0), a negative FMC_E* code of fm_cuda.h, or a positive cudaError_t.
 *
 * Tensors (dtype: FMC_F32/F16/BF16 for all of them, each 16-byte aligned, contiguous):
 *   q [heads * D], k [kv_heads * D], v [kv_heads * D]: this token's projections (after any bias,
 *     clip or q/k norm), not yet rotated;
 *   cos, sin [D]: the position's RoPE tables (runtime/decode_ops.rope_tables);
 *   K, V [n_ctx, kv_heads, D]: the layer's caches, written at pos;
 *   out [heads * D]: query head kvh * (heads / kv_heads) + j attends kv head kvh.
 * head_dim D in {16, 32, 64, 128, 256}; heads a multiple of kv_heads. A position outside
 * 0..n_ctx-1 writes nothing and gives NaN outputs (the host checks n_ctx before a step).
 * workspace: fmc_attn_workspace_bytes(...) bytes, zeroed once, reused by one stream at a time
 * (its first bytes are per-head counters the launch leaves at zero). */
#ifndef FM_ATTN_H
#define FM_ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *fmc_attn_strerror(int code);

size_t fmc_attn_workspace_bytes(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx, int device);

int fmc_decode_attention(int dtype, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx,
                         const void *q, const void *k, const void *v, const void *cos, const void *sin,
                         void *K, void *V, const int64_t *pos, int64_t window, float scale, void *out,
                         void *workspace, size_t workspace_bytes, int device, void *stream);

/* Knobs (process-wide, as fmc_tune): SPLITS position chunks per head group (0 = auto: enough
 * chunks of one tile for n_ctx, at most the blocks resident at once, at most 128; with clusters at
 * most the cluster size), PDL (1 = programmatic dependent launch on sm_90+; 2: the next launch let
 * start only after the wait, 3: also the loads only after it: measurements), MIN_CHUNK (fewest
 * positions per chunk, default 16), CLUSTER_CTX (sm_90: up to this n_ctx a head group's chunks
 * are one cluster of up to 16 blocks, merged in distributed shared memory; 0 = never); read-only:
 * the last launch's splits, grid and cluster size (0 = none).
 *
 * With PDL the kernel reads the position, cos/sin and the cache rows other than the position's
 * before it waits for the previous kernel: those must come from a kernel that ended before the
 * previous one started (in a decode step: the position and tables at the step's start, the rows
 * from earlier tokens; q, k and v are read after the wait). */
enum fmc_attn_tune_key {
    FMC_ATTN_TUNE_SPLITS = 0, FMC_ATTN_TUNE_PDL = 1, FMC_ATTN_TUNE_MIN_CHUNK = 2,
    FMC_ATTN_TUNE_LAST_SPLITS = 3, FMC_ATTN_TUNE_LAST_GRID = 4, FMC_ATTN_TUNE_CLUSTER_CTX = 5,
    FMC_ATTN_TUNE_LAST_CLUSTER = 6, FMC_ATTN_TUNE_NKEYS = 7
};
int64_t fmc_attn_tune(int key, int64_t value);

#ifdef __cplusplus
}
#endif
#endif
