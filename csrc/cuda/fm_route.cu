// One MoE layer's routing of one decode token in one launch (runtime/decode_ops.py's route and
// addresses, with the residual add before them): h = h_in + o, x = RMSNorm(h) * w, the router's
// logits, softmax, top-k (normalised if asked), the experts' weights and ids, and their records'
// addresses from the device-side slot table. In the decode graph these were four kernels of
// 1.3-2.8 us each (the add with the norm, the router, softmax with top-k, the address lookup),
// time spent launching and draining rather than moving bytes (~90 KB for Mixtral).
//
// Every block computes the norm (h and the norm's weights are a few KB, read from L2) and the
// logits of its share of the experts (8 per block, every thread a stride of H for all of them in
// 16-byte loads); its router rows are asked of the L2 before it waits for the previous kernel
// (programmatic dependent launch). The last block to finish (an atomic
// ticket) does softmax and top-k over all of them and resets the ticket for the next launch.
// Values are rounded where the torch code rounds them (h, x*scale, x, the logits to the
// activation dtype; the squares' sum in fp64 and the scale as models.layers.rms_norm), so the
// results are that code's up to the order of the sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "fm_quant.cuh"
#include "fm_route.h"

namespace {

constexpr int ROUTE_WARPS = 8;  // the block's warps, and the experts each block computes

struct RouteParams {
    const void *h_in, *o, *norm_w, *router_w;  // activation dtype: [H], [H], [H], [E, H]
    const int64_t *entries;                      // the slot table's row: [E] slot per expert
    const int64_t *base;                         // tier 0's base address (one int64 on the device)
    int64_t stride;                              // bytes per slot
    void *h_out, *x_out, *weights;               // [H], [H], [k]
    int64_t *ids_row, *ids, *addrs;              // [k] each
    float *logits;                               // workspace: [E]
    unsigned *ticket;                            // workspace: one counter, zero between launches
    int H, E, k, normalize;
    float eps;
};

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(float v) { return v; }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f(float v) { return v; }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f<T>(from_f<T>(v)); }

// V elements of T in one 16-byte load, as floats (H is a multiple of 16 / sizeof(T))
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };
template <typename T> __device__ __forceinline__ void load(const T *at, float (&f)[Vec<T>::N]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4 *>(at));
    const T *t = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int j = 0; j < Vec<T>::N; ++j) f[j] = to_f(t[j]);
}
template <typename T> __device__ __forceinline__ void store(T *at, const float (&f)[Vec<T>::N]) {
    uint4 u;
    T *t = reinterpret_cast<T *>(&u);
#pragma unroll
    for (int j = 0; j < Vec<T>::N; ++j) t[j] = from_f<T>(f[j]);
    *reinterpret_cast<uint4 *>(at) = u;
}
__device__ __forceinline__ void prefetch_l2(const void *at) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
}

template <typename T>
__global__ void __launch_bounds__(ROUTE_WARPS * 32) route_kernel(RouteParams p) {
    constexpr int V = Vec<T>::N;
    extern __shared__ float xs[];  // [H] x, then [E] probabilities in the last block
    __shared__ double red[ROUTE_WARPS];
    __shared__ float part[ROUTE_WARPS][ROUTE_WARPS];
    __shared__ float scale_s;
    __shared__ int last_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, H = p.H, nv = H / V;
    const int e0 = blockIdx.x * ROUTE_WARPS, ne = min(ROUTE_WARPS, p.E - e0);
    const T *h_in = (const T *)p.h_in, *o = (const T *)p.o, *nw = (const T *)p.norm_w;
    const T *rw = (const T *)p.router_w + (int64_t)e0 * H;
    // what does not depend on the previous kernel: this block's router rows and the norm's
    // weights asked of the L2 while that kernel finishes (programmatic dependent launch)
    for (int i = tid; i < ne * H / 64; i += blockDim.x) prefetch_l2(rw + (int64_t)i * 64);
    for (int i = tid; i < H / 64; i += blockDim.x) prefetch_l2(nw + i * 64);
    pdl_wait();  // o is the previous kernel's output
    double ss = 0.0;
#pragma unroll 2
    for (int i = tid; i < nv; i += blockDim.x) {
        float a[V], b[V];
        load(h_in + i * V, a);
        load(o + i * V, b);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float v = round_to<T>(a[j] + b[j]);
            xs[i * V + j] = v;
            ss += (double)__fmul_rn(v, v);  // fp32 squares, summed in fp64 (rms_norm)
        }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) ss += __shfl_xor_sync(FULL, ss, s);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        for (int w = 0; w < ROUTE_WARPS; ++w) t += red[w];
        const float mean = (float)(t / (double)H);
        scale_s = (float)(1.0 / sqrt((double)__fadd_rn(mean, p.eps)));
    }
    __syncthreads();
    const float scale = scale_s;
    const bool first = blockIdx.x == 0;
    for (int i = tid; i < nv; i += blockDim.x) {
        float v[V], w[V], x[V];
        load(nw + i * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            v[j] = xs[i * V + j];
            x[j] = round_to<T>(__fmul_rn(round_to<T>(__fmul_rn(v[j], scale)), w[j]));
            xs[i * V + j] = x[j];
        }
        if (first) {
            store((T *)p.h_out + i * V, v);
            store((T *)p.x_out + i * V, x);
        }
    }
    __syncthreads();
    // the logits of this block's experts: every thread a stride of H for each of them, all
    // their loads in flight together, then one sum per expert over the block
    float acc[ROUTE_WARPS];
#pragma unroll
    for (int e = 0; e < ROUTE_WARPS; ++e) acc[e] = 0.f;
#pragma unroll 2
    for (int i = tid; i < nv; i += blockDim.x) {
        uint4 wv[ROUTE_WARPS];  // the loads first, so that they are in flight together
#pragma unroll
        for (int e = 0; e < ROUTE_WARPS; ++e)
            if (e < ne) wv[e] = __ldg(reinterpret_cast<const uint4 *>(rw + (int64_t)e * H + i * V));
        float x[V];
#pragma unroll
        for (int j = 0; j < V; ++j) x[j] = xs[i * V + j];
#pragma unroll
        for (int e = 0; e < ROUTE_WARPS; ++e) {
            if (e < ne) {
                const T *t = reinterpret_cast<const T *>(&wv[e]);
#pragma unroll
                for (int j = 0; j < V; ++j) acc[e] = fmaf(x[j], to_f(t[j]), acc[e]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < ROUTE_WARPS; ++e) {
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc[e] += __shfl_xor_sync(FULL, acc[e], s);
        if (lane == 0) part[warp][e] = acc[e];
    }
    __syncthreads();
    if (tid < ne) {
        float t = 0.f;
        for (int w = 0; w < ROUTE_WARPS; ++w) t += part[w][tid];
        p.logits[e0 + tid] = round_to<T>(t);
    }
    // the last block to finish does softmax and top-k over every expert
    __threadfence();
    __syncthreads();
    if (tid == 0) last_s = atomicAdd(p.ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last_s) return;
    __threadfence();
    float *pr = xs + H;
    const int E = p.E;
    if (warp != 0) return;  // one warp: each lane a stride of the experts
    float m = -INFINITY;
    for (int j = lane; j < E; j += 32) m = fmaxf(m, __ldcg(p.logits + j));
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, s));
    float sum = 0.f;
    for (int j = lane; j < E; j += 32) {
        pr[j] = expf(__ldcg(p.logits + j) - m);
        sum += pr[j];
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(FULL, sum, s);
    for (int j = lane; j < E; j += 32) pr[j] = pr[j] / sum;
    __syncwarp();
    // k rounds of max: ties to the lower id, as decode_ops.top_k_of
    float vals[FMC_MAX_K];
    int ids[FMC_MAX_K];
    for (int r = 0; r < p.k; ++r) {
        float bv = -INFINITY;
        int best = E;
        for (int j = lane; j < E; j += 32)
            if (pr[j] > bv || (best == E && pr[j] == bv)) { bv = pr[j]; best = j; }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            const float ov = __shfl_xor_sync(FULL, bv, s);
            const int oi = __shfl_xor_sync(FULL, best, s);
            if (ov > bv || (ov == bv && oi < best)) { bv = ov; best = oi; }
        }
        vals[r] = bv;
        ids[r] = best;
        if (lane == 0) pr[best] = -INFINITY;
        __syncwarp();
    }
    if (lane == 0) {
        float total = vals[0];
        for (int r = 1; r < p.k; ++r) total += vals[r];
        const int64_t base = *p.base;
        for (int r = 0; r < p.k; ++r) {
            const float v = p.normalize ? vals[r] / total : vals[r];
            ((T *)p.weights)[r] = from_f<T>(v);
            p.ids_row[r] = p.ids[r] = ids[r];
            p.addrs[r] = base + p.entries[ids[r]] * p.stride;
        }
        *p.ticket = 0u;
    }
}

}  // namespace

extern "C" {

int fmc_route(const void *h_in, const void *o, const void *norm_w, const void *router_w, int dtype, int64_t H,
              int64_t E, int64_t k, int normalize, float eps, const int64_t *entries, const int64_t *base,
              int64_t stride, void *h_out, void *x_out, void *weights, int64_t *ids_row, int64_t *ids,
              int64_t *addrs, void *workspace, int pdl, void *stream) {
    if (H <= 0 || H % 64 || E <= 0 || k <= 0 || k > FMC_MAX_K || k > E || E > FMC_ROUTE_MAX_E) return FMC_EINVAL;
    RouteParams p{h_in, o, norm_w, router_w, entries, base, stride, h_out, x_out, weights, ids_row, ids, addrs,
                  (float *)((char *)workspace + 256), (unsigned *)workspace, (int)H, (int)E, (int)k, normalize, eps};
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)((E + ROUTE_WARPS - 1) / ROUTE_WARPS));
    cfg.blockDim = dim3(ROUTE_WARPS * 32);
    cfg.dynamicSmemBytes = (size_t)(H + E) * sizeof(float);
    cfg.stream = (cudaStream_t)stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    void (*fn)(RouteParams);
    switch (dtype) {
        case FMC_F32: fn = route_kernel<float>; break;
        case FMC_F16: fn = route_kernel<__half>; break;
        case FMC_BF16: fn = route_kernel<__nv_bfloat16>; break;
        default: return FMC_EINVAL;
    }
    if (cfg.dynamicSmemBytes > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)cfg.dynamicSmemBytes);
        if (err != cudaSuccess) return (int)err;
    }
    cudaError_t err = cudaLaunchKernelEx(&cfg, fn, p);
    return err == cudaSuccess ? FMC_OK : (int)err;
}

}  // extern "C"
