/* flashmoe fused decode kernels (see fm_decode.h): the per-layer small steps of one decode token
 * in three launches, so that a captured step holds ~6 kernels per MoE layer instead of ~20. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "fm_cuda.h"
#include "fm_decode.h"

namespace {

constexpr int THREADS = 256;     // attention and routing blocks: 8 warps
constexpr int NORM_THREADS = 1024;
constexpr int NW = THREADS / 32;
constexpr int TILE = 4;          // query heads per pass over a block's keys (registers per lane)
constexpr int KEYS = 4;          // keys per warp whose K/V loads are in flight together

int g_pdl = 1;

// ---------------------------------------------------------------- activation dtypes
template <typename T> struct Act;
template <> struct Act<float> {
    __device__ static float ld(const void *p, int64_t i) { return ((const float *)p)[i]; }
    __device__ static void st(void *p, int64_t i, float v) { ((float *)p)[i] = v; }
    __device__ static float rnd(float v) { return v; }
};
template <> struct Act<__nv_bfloat16> {
    __device__ static float ld(const void *p, int64_t i) { return __bfloat162float(((const __nv_bfloat16 *)p)[i]); }
    __device__ static void st(void *p, int64_t i, float v) { ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); }
    __device__ static float rnd(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};
template <> struct Act<__half> {
    __device__ static float ld(const void *p, int64_t i) { return __half2float(((const __half *)p)[i]); }
    __device__ static void st(void *p, int64_t i, float v) { ((__half *)p)[i] = __float2half_rn(v); }
    __device__ static float rnd(float v) { return __half2float(__float2half_rn(v)); }
};

// Programmatic dependent launch (sm_90+; no-ops without the launch attribute): wait for the
// previous kernel, whose outputs are this one's inputs, then let the next launch start (it
// streams its weights while this one runs, and waits for this grid before it reads what this
// one writes). Triggering only after the wait keeps the early start one kernel deep: a chain of
// waiting grids would hold SM resources the running kernel may need.
__device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block, the same value in every thread, in a fixed order (deterministic).
__device__ float block_sum(float v, float *red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; i++) t += red[i];
    return t;
}

// ---------------------------------------------------------------- residual add + RMSNorm
// v = h + delta (rounded) into sv and h_out, w into sw, and the sum of squares; UNROLL elements
// of a thread loaded before any is used (a few round trips to memory instead of n / threads).
template <typename T>
__device__ float add_into(const void *h, const void *delta, const void *w, void *h_out, float *sv, float *sw, int n) {
    using A = Act<T>;
    constexpr int UNROLL = 8;
    float ss = 0.f;
    for (int i0 = threadIdx.x; i0 < n; i0 += UNROLL * blockDim.x) {
        float a[UNROLL], b[UNROLL], c[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < n) { a[u] = A::ld(h, i); b[u] = A::ld(delta, i); c[u] = A::ld(w, i); }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < n) {
                const float v = A::rnd(a[u] + b[u]);
                if (h_out) A::st(h_out, i, v);
                sv[i] = v;
                sw[i] = c[u];
                ss += v * v;
            }
        }
    }
    return ss;
}

template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
add_norm_kernel(const void *h, const void *delta, void *h_out, const void *w, void *x_out, int n, float eps) {
    using A = Act<T>;
    extern __shared__ __align__(16) float sv[];  // [2n]: h + delta, then w
    __shared__ float red[32];
    pdl_enter();
    const float r = rsqrtf(block_sum(add_into<T>(h, delta, w, h_out, sv, sv + n, n), red) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)  // sv[i] was written by this thread
        A::st(x_out, i, A::rnd(A::rnd(sv[i] * r) * sv[n + i]));
}

// ---------------------------------------------------------------- attention of one token
// Block (kv head, split): its query heads' and its K/V head's values are normed, clipped and
// rotated in shared memory (every block of the head does this; it is a few hundred values), the
// split-0 block writes K/V at pos, then each warp runs an online softmax over batches of KEYS keys of
// the block's share of 0..pos (the key at pos from shared memory, the others from the cache),
// warps combine in shared memory, blocks through `partial`; the last block of the head to finish
// combines the splits in split order and writes the output.
template <typename T, int EPL>  // EPL: head-dim elements per lane (lane l holds l*EPL .. l*EPL+EPL-1)
__global__ void __launch_bounds__(THREADS) attention_kernel(const fmd_attn a) {
    using A = Act<T>;
    extern __shared__ __align__(16) float sm[];
    __shared__ float red[32];
    __shared__ int last;
    const int d = a.head_dim, g = a.heads / a.kv_heads, half = d / 2;
    const int kvh = blockIdx.x, s = blockIdx.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int64_t nq = (int64_t)a.heads * d, nk = (int64_t)a.kv_heads * d;
    float *qs = sm;                    // [g][d] rotated queries
    float *ks = qs + g * d;            // [d] rotated key
    float *vs = ks + d;                // [d]
    float *raw = vs + d;               // [g + 2][d] before RoPE
    float *wst = raw + (g + 2) * d;    // [NW][TILE][d + 2] per-warp softmax states
    pdl_enter();
    const int64_t pos = *a.pos;

    float rq = 1.f, rk = 1.f;  // qk_norm 2 ("full"): one RMS over all heads' q, one over all k
    if (a.qk_norm == 2) {
        float sq = 0.f, sk = 0.f;
        for (int64_t i = tid; i < nq; i += THREADS) { const float v = A::ld(a.qkv, i); sq += v * v; }
        for (int64_t i = tid; i < nk; i += THREADS) { const float v = A::ld(a.qkv, nq + i); sk += v * v; }
        rq = rsqrtf(block_sum(sq, red) / (float)nq + a.eps);
        rk = rsqrtf(block_sum(sk, red) / (float)nk + a.eps);
    }
    constexpr int PRE = 4;  // values per thread loaded together
    for (int i0 = tid; i0 < (g + 2) * d; i0 += PRE * THREADS) {
        float v[PRE];
#pragma unroll
        for (int u = 0; u < PRE; u++) {
            const int idx = i0 + u * THREADS, which = idx / d, e = idx - which * d;
            const int64_t gi = which < g ? (int64_t)(kvh * g + which) * d + e  // index into qkv
                             : which == g ? nq + (int64_t)kvh * d + e : nq + nk + (int64_t)kvh * d + e;
            v[u] = idx < (g + 2) * d ? A::ld(a.qkv, gi) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < PRE; u++) {
            const int idx = i0 + u * THREADS, which = idx / d, e = idx - which * d;
            if (idx >= (g + 2) * d) break;
            float x = v[u];
            if (a.qk_norm == 2 && which <= g)  // the full-norm weight's index: the value's in q or in k
                x = A::rnd(A::rnd(x * (which < g ? rq : rk)) *
                           A::ld(which < g ? a.q_norm : a.k_norm, which < g ? (int64_t)(kvh * g + which) * d + e
                                                                            : (int64_t)kvh * d + e));
            if (a.has_clip) x = A::rnd(fminf(fmaxf(x, -a.clip), a.clip));
            raw[idx] = x;
        }
    }
    __syncthreads();
    if (a.qk_norm == 1) {  // "head": RMSNorm of each head over head_dim
        for (int hh = warp; hh <= g; hh += NW) {
            float sq = 0.f;
            for (int e = lane; e < d; e += 32) sq += raw[hh * d + e] * raw[hh * d + e];
            const float r = rsqrtf(warp_sum(sq) / (float)d + a.eps);
            const void *nw = hh < g ? a.q_norm : a.k_norm;
            for (int e = lane; e < d; e += 32) raw[hh * d + e] = A::rnd(A::rnd(raw[hh * d + e] * r) * A::ld(nw, e));
        }
        __syncthreads();
    }
    for (int idx = tid; idx < (g + 1) * d; idx += THREADS) {  // RoPE as rotate_half: q*cos + rot(q)*sin
        const int hh = idx / d, e = idx - hh * d, j = e < half ? e : e - half;
        const float ang = (float)pos * a.inv_freq[j];
        const float c = A::rnd(cosf(ang)), sn = A::rnd(sinf(ang));
        const float partner = e < half ? -raw[idx + half] : raw[idx - half];
        const float y = A::rnd(A::rnd(raw[idx] * c) + A::rnd(partner * sn));
        if (hh < g) qs[idx] = y; else ks[e] = y;
    }
    for (int e = tid; e < d; e += THREADS) vs[e] = raw[(g + 1) * d + e];
    __syncthreads();
    if (s == 0)
        for (int e = tid; e < d; e += THREADS) {
            const int64_t at = (pos * a.kv_heads + kvh) * d + e;
            A::st(a.K, at, ks[e]);
            A::st(a.V, at, vs[e]);
        }

    const int64_t lo = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
    const int64_t cnt = pos + 1 - lo, chunk = (cnt + a.splits - 1) / a.splits;
    const int64_t kb = lo + s * chunk, ke = kb + chunk < pos + 1 ? kb + chunk : pos + 1;
    const int64_t rowst = (int64_t)a.kv_heads * d;
    float *part = a.partial + ((int64_t)kvh * a.splits + s) * g * (d + 2);

    for (int i0 = 0; i0 < g; i0 += TILE) {
        const int gt = g - i0 < TILE ? g - i0 : TILE;
        float m[TILE], l[TILE], acc[TILE][EPL];
#pragma unroll
        for (int t = 0; t < TILE; t++) {
            m[t] = -INFINITY; l[t] = 0.f;
#pragma unroll
            for (int e = 0; e < EPL; e++) acc[t][e] = 0.f;
        }
        for (int64_t j0 = kb + warp * KEYS; j0 < ke; j0 += NW * KEYS) {
            float kv[KEYS][EPL], vv[KEYS][EPL];
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                const int64_t j = j0 + u, base = j * rowst + (int64_t)kvh * d;
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    const int idx = lane * EPL + e;
                    kv[u][e] = vv[u][e] = 0.f;
                    if (j < ke && idx < d) {
                        kv[u][e] = j == pos ? ks[idx] : A::ld(a.K, base + idx);
                        vv[u][e] = j == pos ? vs[idx] : A::ld(a.V, base + idx);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < KEYS; u++) {
                float dot[TILE];  // every head of the tile at once: independent shuffle chains
#pragma unroll
                for (int t = 0; t < TILE; t++) {
                    dot[t] = 0.f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) {
                        const int idx = lane * EPL + e;
                        if (idx < d && t < gt) dot[t] += qs[(i0 + t) * d + idx] * kv[u][e];
                    }
                }
#pragma unroll
                for (int o = 16; o; o >>= 1)
#pragma unroll
                    for (int t = 0; t < TILE; t++) dot[t] += __shfl_xor_sync(0xffffffffu, dot[t], o);
                if (j0 + u < ke) {
#pragma unroll
                    for (int t = 0; t < TILE; t++) {
                        const float sc = A::rnd(dot[t]) * a.scale;
                        const float mn = fmaxf(m[t], sc);
                        const float corr = expf(m[t] - mn), p = expf(sc - mn);
                        l[t] = l[t] * corr + p;
#pragma unroll
                        for (int e = 0; e < EPL; e++) acc[t][e] = acc[t][e] * corr + p * vv[u][e];
                        m[t] = mn;
                    }
                }
            }
        }
        for (int t = 0; t < gt; t++) {
            float *w = wst + (warp * TILE + t) * (d + 2);
            if (lane == 0) { w[0] = m[t]; w[1] = l[t]; }
#pragma unroll
            for (int e = 0; e < EPL; e++)
                if (lane * EPL + e < d) w[2 + lane * EPL + e] = acc[t][e];
        }
        __syncthreads();
        for (int idx = tid; idx < gt * d; idx += THREADS) {  // the warps' states, in warp order
            const int t = idx / d, e = idx - t * d;
            float M = -INFINITY;
            for (int w = 0; w < NW; w++) M = fmaxf(M, wst[(w * TILE + t) * (d + 2)]);
            float L = 0.f, S = 0.f;
            if (M != -INFINITY)
                for (int w = 0; w < NW; w++) {
                    const float *st = wst + (w * TILE + t) * (d + 2);
                    if (st[0] == -INFINITY) continue;
                    const float f = expf(st[0] - M);
                    L += f * st[1];
                    S += f * st[2 + e];
                }
            float *pp = part + (i0 + t) * (d + 2);
            if (e == 0) { pp[0] = M; pp[1] = L; }
            pp[2 + e] = S;
        }
        __syncthreads();
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(a.counters + kvh, 1) == a.splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the splits' states, in split order: (m, l) of each (split, head) into shared memory, then
    // per head the scale exp(m - M) of each split and 1 / sum(l * scale), then the outputs
    const float *p0 = a.partial + (int64_t)kvh * a.splits * g * (d + 2);
    float *f = wst, *inv = wst + 2 * a.splits * g;  // f[(q * g + t) * 2 + {0, 1}]: m then scale, l
    for (int i = tid; i < a.splits * g; i += THREADS) {
        f[2 * i] = __ldcg(p0 + (int64_t)i * (d + 2));
        f[2 * i + 1] = __ldcg(p0 + (int64_t)i * (d + 2) + 1);
    }
    __syncthreads();
    for (int t = tid; t < g; t += THREADS) {
        float M = -INFINITY, L = 0.f;
        for (int q = 0; q < a.splits; q++) M = fmaxf(M, f[2 * (q * g + t)]);
        for (int q = 0; q < a.splits; q++) {
            const float mq = f[2 * (q * g + t)], sc = mq == -INFINITY ? 0.f : expf(mq - M);
            f[2 * (q * g + t)] = sc;
            L += sc * f[2 * (q * g + t) + 1];
        }
        inv[t] = 1.f / L;
    }
    __syncthreads();
    for (int idx = tid; idx < g * d; idx += THREADS) {
        const int t = idx / d, e = idx - t * d;
        float S = 0.f;
#pragma unroll 8
        for (int q = 0; q < a.splits; q++) {
            const float sc = f[2 * (q * g + t)];
            const float v = __ldcg(p0 + ((int64_t)q * g + t) * (d + 2) + 2 + e);
            S += sc == 0.f ? 0.f : sc * v;
        }
        A::st(a.out, (int64_t)(kvh * g + t) * d + e, S * inv[t]);
    }
    if (tid == 0) a.counters[kvh] = 0;
}

// ---------------------------------------------------------------- routing
// Block e computes h + o and the FFN norm (n values, cheap; block 0 writes them) and router row
// e with all its threads; the last block to finish runs softmax, top-k and the slot lookup in
// one warp.
template <typename T>
__global__ void __launch_bounds__(THREADS) route_kernel(const fmd_route_args r) {
    using A = Act<T>;
    constexpr int UNROLL = 8;
    extern __shared__ __align__(16) float xs[];  // [2n]: h + o, then the norm weight
    __shared__ float red[32];
    __shared__ float pr[FMD_MAX_EXPERTS];
    __shared__ int64_t slot[FMD_MAX_EXPERTS + 1];  // the layer's table row, then the base address
    __shared__ int last;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, n = r.n;
    const bool first = blockIdx.x == 0;
    pdl_enter();
    for (int i = tid; i <= r.experts; i += THREADS)  // in flight with the loads below
        slot[i] = i < r.experts ? r.entries[i] : *r.base;
    const float rs = rsqrtf(block_sum(add_into<T>(r.h, r.o, r.norm_w, first ? r.h_out : nullptr, xs, xs + n, n), red) /
                            (float)n + r.eps);
    for (int i = tid; i < n; i += THREADS) {  // xs[i] was written by this thread
        const float x = A::rnd(A::rnd(xs[i] * rs) * xs[n + i]);
        xs[i] = x;
        if (first) A::st(r.x_out, i, x);
    }
    __syncthreads();
    const int64_t row = (int64_t)blockIdx.x * n;
    float acc = 0.f;
    for (int c0 = tid; c0 < n; c0 += UNROLL * THREADS) {
        float wv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = c0 + u * THREADS;
            wv[u] = c < n ? A::ld(r.router_w, row + c) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int c = c0 + u * THREADS;
            if (c < n) acc += xs[c] * wv[u];
        }
    }
    const float dot = block_sum(acc, red);
    if (tid == 0) r.logits[blockIdx.x] = A::rnd(dot);
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(r.counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int E = r.experts;
    for (int i = tid; i < E; i += THREADS) pr[i] = __ldcg(r.logits + i);
    __syncthreads();
    if (warp != 0) return;
    float mx = -INFINITY;
    for (int i = lane; i < E; i += 32) mx = fmaxf(mx, pr[i]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int i = lane; i < E; i += 32) sum += expf(pr[i] - mx);
    sum = warp_sum(sum);
    for (int i = lane; i < E; i += 32) pr[i] = expf(pr[i] - mx) / sum;
    __syncwarp();
    float wv[FMD_MAX_TOPK];
    int wid[FMD_MAX_TOPK];
    float tot = 0.f;
    for (int k = 0; k < r.top_k; k++) {  // the largest probability, the lowest id on a tie
        float bv = -INFINITY;
        int bi = E;
        for (int i = lane; i < E; i += 32)
            if (pr[i] > bv) { bv = pr[i]; bi = i; }
        for (int o = 16; o; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (bi >= E) bi = 0;  // NaN logits: never index past the table
        wv[k] = bv;
        wid[k] = bi;
        tot += bv;
        __syncwarp();
        if (lane == 0) pr[bi] = -INFINITY;
        __syncwarp();
    }
    if (lane == 0) {
        for (int k = 0; k < r.top_k; k++) {
            r.ids[k] = wid[k];
            A::st(r.weights, k, r.norm_topk ? wv[k] / tot : wv[k]);
            r.addrs[k] = slot[E] + slot[wid[k]] * r.stride;
        }
        *r.counter = 0;
    }
}

// ---------------------------------------------------------------- launches
struct Dev { int sms = 0, cc_major = 0, smem_optin = 0; };
Dev g_dev[64];

const Dev *dev_info(int device) {
    if (device < 0 || device >= 64) return nullptr;
    Dev &d = g_dev[device];
    if (!d.sms) {
        cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    }
    return &d;
}

template <typename Fn, typename... Args>
int launch(Fn fn, dim3 grid, int threads, size_t smem, int device, void *stream, Args... args) {
    const Dev *d = dev_info(device);
    if (!d || !d->sms) return FMD_EINVAL;
    if (smem > 32 * 1024) {  // with the kernels' static shared memory (up to 12 KiB) past the default 48
        if ((int)smem + 12 * 1024 > d->smem_optin) return FMD_EINVAL;
        cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = (cudaStream_t)stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = g_pdl && d->cc_major >= 9 ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, fn, args...);
    return e == cudaSuccess ? 0 : (int)e;
}

size_t attn_smem(int g, int d, int splits) {
    size_t states = (size_t)NW * TILE * (d + 2), combine = (size_t)2 * splits * g + g;
    return sizeof(float) * ((size_t)g * d + 2 * d + (size_t)(g + 2) * d + (states > combine ? states : combine));
}

template <typename T, int EPL>
int attention_launch(const fmd_attn *a, int device, void *stream) {
    const size_t smem = attn_smem(a->heads / a->kv_heads, a->head_dim, a->splits);
    return launch(attention_kernel<T, EPL>, dim3(a->kv_heads, a->splits), THREADS, smem, device, stream, *a);
}

}  // namespace

extern "C" {

const char *fmd_strerror(int code) {
    if (code == 0) return "ok";
    if (code == FMD_EINVAL) return "invalid argument (shape, dtype, or more shared memory than the device allows)";
    return cudaGetErrorString((cudaError_t)code);
}

int fmd_pdl(int value) {
    const int old = g_pdl;
    if (value >= 0) g_pdl = value ? 1 : 0;
    return old;
}

size_t fmd_attention_workspace(int kv_heads, int heads, int head_dim, int splits) {
    if (kv_heads <= 0 || heads % kv_heads) return 0;
    return (size_t)kv_heads * splits * (heads / kv_heads) * (head_dim + 2);
}

int fmd_default_splits(int kv_heads, int n_ctx, int device) {
    const Dev *d = dev_info(device);
    const int sms = d && d->sms ? d->sms : 132;
    int s = sms / (kv_heads > 0 ? kv_heads : 1);
    const int by_ctx = (n_ctx + 63) / 64;  // at least ~64 keys per block at a full context
    if (s > by_ctx) s = by_ctx;
    if (s > 64) s = 64;
    return s < 1 ? 1 : s;
}

int fmd_add_norm(int dtype, const void *h, const void *delta, void *h_out, const void *w, void *x_out, int n,
                 float eps, int device, void *stream) {
    if (n <= 0) return FMD_EINVAL;
    const int th = n < NORM_THREADS ? ((n + 31) / 32) * 32 : NORM_THREADS;
    const size_t sm = sizeof(float) * 2 * (size_t)n;
    switch (dtype) {
    case FMC_F32: return launch(add_norm_kernel<float>, dim3(1), th, sm, device, stream, h, delta, h_out, w, x_out, n, eps);
    case FMC_BF16: return launch(add_norm_kernel<__nv_bfloat16>, dim3(1), th, sm, device, stream, h, delta, h_out, w, x_out, n, eps);
    case FMC_F16: return launch(add_norm_kernel<__half>, dim3(1), th, sm, device, stream, h, delta, h_out, w, x_out, n, eps);
    }
    return FMD_EINVAL;
}

int fmd_attention(const fmd_attn *a, int device, void *stream) {
    if (a->kv_heads <= 0 || a->heads % a->kv_heads || a->head_dim <= 0 || a->head_dim > FMD_MAX_HEAD_DIM ||
        a->head_dim % 2 || a->splits < 1 || a->qk_norm < 0 || a->qk_norm > 2)
        return FMD_EINVAL;
    const int epl = a->head_dim <= 32 ? 1 : a->head_dim <= 64 ? 2 : a->head_dim <= 128 ? 4 : 8;
    switch (a->dtype * 16 + epl) {
#define FMD_ATT(code, T, E) case code * 16 + E: return attention_launch<T, E>(a, device, stream);
    FMD_ATT(FMC_F32, float, 1) FMD_ATT(FMC_F32, float, 2) FMD_ATT(FMC_F32, float, 4) FMD_ATT(FMC_F32, float, 8)
    FMD_ATT(FMC_BF16, __nv_bfloat16, 1) FMD_ATT(FMC_BF16, __nv_bfloat16, 2) FMD_ATT(FMC_BF16, __nv_bfloat16, 4)
    FMD_ATT(FMC_BF16, __nv_bfloat16, 8) FMD_ATT(FMC_F16, __half, 1) FMD_ATT(FMC_F16, __half, 2)
    FMD_ATT(FMC_F16, __half, 4) FMD_ATT(FMC_F16, __half, 8)
#undef FMD_ATT
    }
    return FMD_EINVAL;
}

int fmd_route(const fmd_route_args *r, int device, void *stream) {
    if (r->n <= 0 || r->experts <= 0 || r->experts > FMD_MAX_EXPERTS || r->top_k < 1 || r->top_k > FMD_MAX_TOPK ||
        r->top_k > r->experts)
        return FMD_EINVAL;
    const size_t smem = sizeof(float) * 2 * (size_t)r->n;
    const dim3 grid(r->experts);
    switch (r->dtype) {
    case FMC_F32: return launch(route_kernel<float>, grid, THREADS, smem, device, stream, *r);
    case FMC_BF16: return launch(route_kernel<__nv_bfloat16>, grid, THREADS, smem, device, stream, *r);
    case FMC_F16: return launch(route_kernel<__half>, grid, THREADS, smem, device, stream, *r);
    }
    return FMD_EINVAL;
}

}  // extern "C"
