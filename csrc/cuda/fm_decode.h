/* flashmoe fused decode kernels: one token's small per-layer steps in three launches
 * (runtime/fused_decode.py drives them; kernels/decode_cuda.py wraps them; the torch reference of
 * each is fused_decode.py's *_ref function, the CPU twin).
 *
 *   fmd_add_norm   h_out = h + delta; x = rms_norm(h_out) * w                      (one block)
 *   fmd_attention  q/k norms, clip and RoPE of one token's qkv, its K/V written to the cache at
 *                  *pos, then GQA attention of its query heads over the keys 0..*pos (or the
 *                  window), split over keys across blocks, fp32 online softmax; the last block
 *                  of each KV head combines the splits in a fixed order (deterministic)
 *   fmd_route      h_out = h + o; x = rms_norm(h_out) * w; the router GEMV, softmax, top-k (and
 *                  their renormalisation), the ids, the weights and the experts' record
 *                  addresses base + entries[id] * stride for the fused MoE kernel
 *
 * Activations are float32, float16 or bfloat16 (one dtype per call, FMC_F32/F16/BF16 codes);
 * every intermediate the torch reference rounds to that dtype is rounded here too. Pointers are
 * device addresses (torch data_ptr()); the position is read on the device, so a captured graph
 * replays for any position. Launches are asynchronous on `stream`; on sm_90+ they use
 * programmatic dependent launch (they wait for their predecessor before reading anything, and
 * let the next launch start early). Return 0, a negative FMD_E* code, or a cudaError_t.
 */
#ifndef FM_DECODE_H
#define FM_DECODE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FMD_EINVAL (-1)
#define FMD_MAX_HEAD_DIM 256
#define FMD_MAX_EXPERTS 1024
#define FMD_MAX_TOPK 32

typedef struct {
    const void *qkv;        /* [nq + 2 nk] of one token (after the QKV GEMV and its bias) */
    const void *q_norm;     /* [head_dim] (qk_norm 1) or [nq] (qk_norm 2), else NULL */
    const void *k_norm;
    const float *inv_freq;  /* [head_dim / 2] fp32 */
    const int64_t *pos;     /* the token's position (device) */
    void *K, *V;            /* [n_ctx, kv_heads, head_dim] */
    void *out;              /* [heads * head_dim] */
    float *partial;         /* fmd_attention_workspace() floats */
    int *counters;          /* [kv_heads] int32, zero before the first call; left zero after */
    int dtype, heads, kv_heads, head_dim, n_ctx, window, qk_norm, has_clip, splits;
    float eps, scale, clip;
} fmd_attn;

typedef struct {
    const void *h, *o;      /* [n]: h_out = h + o */
    void *h_out, *x_out;    /* [n] */
    const void *norm_w;     /* [n] */
    const void *router_w;   /* [E, n] */
    float *logits;          /* [E] fp32 workspace */
    int *counter;           /* one int32, zero before the first call; left zero after */
    int64_t *ids;           /* [top_k] routed ids (the host reads them after the step) */
    void *weights;          /* [top_k], activation dtype */
    const int64_t *entries; /* [E] slot of each expert of this layer */
    const int64_t *base;    /* one address */
    int64_t *addrs;         /* [top_k] record addresses */
    int64_t stride;
    int dtype, n, experts, top_k, norm_topk;
    float eps;
} fmd_route_args;

int fmd_add_norm(int dtype, const void *h, const void *delta, void *h_out, const void *w, void *x_out, int n,
                 float eps, int device, void *stream);
int fmd_attention(const fmd_attn *a, int device, void *stream);
int fmd_route(const fmd_route_args *r, int device, void *stream);
size_t fmd_attention_workspace(int kv_heads, int heads, int head_dim, int splits);
int fmd_default_splits(int kv_heads, int n_ctx, int device);
int fmd_pdl(int value);   /* -1 reads; 0/1 sets; returns the previous value */
const char *fmd_strerror(int code);

#ifdef __cplusplus
}
#endif
#endif
