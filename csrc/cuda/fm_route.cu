// One decode token's routing after attention as one kernel (fmc_route in fm_cuda.h), for
// runtime/decode_ops.moe_layer: the residual add, the FFN norm, the router, softmax, top-k and the
// routed experts' record addresses, which torch.compile made four kernels of (~2-3 us of launch
// gap each inside a graph). One block: the router is small (Mixtral 8 x 4096) and the work is
// latency-bound. Launched with programmatic dependent launch: each warp's first router row is in
// flight before the wait for the o product; every write follows the wait.
//
// Rounded where the torch formula (decode_ops.route, models.layers.rms_norm) rounds: h2 and x are
// those values bit for bit (the fp64 sum of squares is exact for bf16); the router's fp32 sums run in this
// kernel's order (a logit may differ from the formula's by one rounding of the dtype).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "fm_cuda.h"
#include "fm_device.cuh"
#include "fm_gemv.cuh"
#include "fm_quant.cuh"

namespace {

constexpr int RT = 512, RW = RT / 32;  // threads and warps of the block
constexpr int RJ = 16;                 // 16-byte chunks per lane of a warp's first router row held in registers

struct RouteParams {
    const void *h, *o, *nw, *rw;
    const int64_t *entries, *base;
    int64_t stride;
    void *h2, *x, *wts;
    int64_t *ids, *ids_row, *addrs;
    int H, E, k, norm_topk, dt, pdl;
    float eps;
};

// acc + sum of x[i] * w[i] over a chunk's 8 values, in order (each product exact in fp32).
__device__ __forceinline__ float dot8(float acc, const float *x, const uint4 &w, int dt) {
    float v[8];
    act8(w, dt, v);
    const float4 a = ((const float4 *)x)[0], b = ((const float4 *)x)[1];
    acc += a.x * v[0];
    acc += a.y * v[1];
    acc += a.z * v[2];
    acc += a.w * v[3];
    acc += b.x * v[4];
    acc += b.y * v[5];
    acc += b.z * v[6];
    acc += b.w * v[7];
    return acc;
}

__global__ void __launch_bounds__(RT, 1) route_kernel(const RouteParams p) {
    __shared__ __align__(16) float xs[FMC_ROUTE_MAX_H];
    __shared__ float lg[FMC_ROUTE_MAX_E];
    __shared__ double part[RW];
    __shared__ float scale_s;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, H8 = p.H >> 3, dt = p.dt;
    if (p.pdl) pdl_trigger();

    // Weights first: this warp's first router row, the norm's first chunk.
    const uint4 *rw = (const uint4 *)p.rw;
    uint4 pre[RJ];
    if (warp < p.E) {
#pragma unroll
        for (int j = 0; j < RJ; ++j) {
            const int c = lane + 32 * j;
            if (c < H8) pre[j] = ld_stream(rw + (size_t)warp * H8 + c);
        }
    }
    const uint4 nw0 = tid < H8 ? __ldg((const uint4 *)p.nw + tid) : make_uint4(0, 0, 0, 0);
    if (p.pdl) pdl_wait();

    // h2 = h + o (written out, kept in xs) and its sum of squares (models.layers.rms_norm's).
    double s = 0.0;
    for (int c = tid; c < H8; c += RT) {
        float a[8], b[8];
        act8(__ldg((const uint4 *)p.h + c), dt, a);
        act8(__ldg((const uint4 *)p.o + c), dt, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a[i] = act_round(a[i] + b[i], dt);
            s += (double)(a[i] * a[i]);
            xs[8 * c + i] = a[i];
        }
        ((uint4 *)p.h2)[c] = act_pack8(a, dt);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        for (int w = 0; w < RW; ++w) t += part[w];
        const float mean = (float)(t / (double)p.H);
        scale_s = 1.0f / (float)sqrt((double)(mean + p.eps));  // torch: reciprocal of the fp32 sqrt
    }
    __syncthreads();
    const float sc = scale_s;

    // x = rms_norm(h2) * nw (each thread rewrites only the xs entries it wrote above).
    for (int c = tid; c < H8; c += RT) {
        float g[8], v[8];
        act8(c == tid ? nw0 : __ldg((const uint4 *)p.nw + c), dt, g);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = act_round(act_round(xs[8 * c + i] * sc, dt) * g[i], dt);
#pragma unroll
        for (int i = 0; i < 8; ++i) xs[8 * c + i] = v[i];
        ((uint4 *)p.x)[c] = act_pack8(v, dt);
    }
    __syncthreads();

    // The router's logits: a warp per expert row, lanes over its chunks, then a fixed-order tree.
    for (int e = warp; e < p.E; e += RW) {
        const bool first = e == warp;
        const uint4 *row = rw + (size_t)e * H8;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < RJ; ++j) {
            const int c = lane + 32 * j;
            if (c < H8) acc = dot8(acc, xs + 8 * c, first ? pre[j] : ld_stream(row + c), dt);
        }
        for (int c = lane + 32 * RJ; c < H8; c += 32) acc = dot8(acc, xs + 8 * c, ld_stream(row + c), dt);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL, acc, o);
        if (lane == 0) lg[e] = act_round(acc, dt);
    }
    __syncthreads();
    if (warp != 0) return;

    // Softmax (fp32) and the top k by rounds of "first maximum, then masked" (decode_ops.top_k_of).
    const int E = p.E;
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, lg[e]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) {
        const float v = expf(lg[e] - m);
        lg[e] = v;
        sum += v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL, sum, o);
    sum = __shfl_sync(FULL, sum, 0);  // one value for every lane (the tree's sums differ by lane)
    for (int e = lane; e < E; e += 32) lg[e] = lg[e] / sum;
    __syncwarp();
    float myv = 0.f;
    int myid = 0;
    for (int r = 0; r < p.k; ++r) {
        float bv = -INFINITY;
        int bi = E;
        for (int e = lane; e < E; e += 32) {  // ascending: a lane keeps its first maximum
            const float v = lg[e];
            if (v > bv) {
                bv = v;
                bi = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL, bv, o);
            const int oi = __shfl_xor_sync(FULL, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (bi >= E) bi = 0;  // only NaN probabilities get here
        if (lane == r) {
            myv = bv;
            myid = bi;
        }
        if (lane == (bi & 31)) lg[bi] = -INFINITY;
        __syncwarp();
    }
    float total = 0.f;  // the sum in rank order, as top_k_of adds it
    for (int r = 0; r < p.k; ++r) total += __shfl_sync(FULL, myv, r);
    if (lane < p.k) {
        const float w = p.norm_topk ? myv / total : myv;
        ((unsigned short *)p.wts)[lane] = act_bits(w, dt);
        p.ids[lane] = myid;
        p.ids_row[lane] = myid;
        p.addrs[lane] = p.base[0] + p.entries[myid] * p.stride;
    }
}

FmDevice g_rdev[FM_MAX_DEV];

}  // namespace

extern "C" int fmc_route(const void *h, const void *o, const void *nw, const void *router, int64_t H, int64_t E,
                         int k, float eps, int norm_topk, const int64_t *entries, const int64_t *base, int64_t stride,
                         void *h2, void *x, void *weights, int64_t *ids, int64_t *ids_row, int64_t *addrs, int dtype,
                         int device, void *stream) {
    if (!h || !o || !nw || !router || !entries || !base || !h2 || !x || !weights || !ids || !ids_row || !addrs)
        return FMC_EINVAL;
    if (H < 8 || H % 8 || H > FMC_ROUTE_MAX_H || E < 1 || E > FMC_ROUTE_MAX_E || k < 1 || k > 32 || k > E)
        return FMC_EINVAL;
    if (dtype != FMC_BF16 && dtype != FMC_F16) return FMC_EINVAL;
    const void *al[] = {h, o, nw, router, h2, x};
    for (const void *a : al)
        if ((uintptr_t)a % 16) return FMC_EALIGN;
    FmDevice *d;
    const int rc = fm_device(device, g_rdev, &d);
    if (rc) return rc;
    RouteParams p = {};
    p.h = h;
    p.o = o;
    p.nw = nw;
    p.rw = router;
    p.entries = entries;
    p.base = base;
    p.stride = stride;
    p.h2 = h2;
    p.x = x;
    p.wts = weights;
    p.ids = ids;
    p.ids_row = ids_row;
    p.addrs = addrs;
    p.H = (int)H;
    p.E = (int)E;
    p.k = k;
    p.norm_topk = norm_topk;
    p.dt = dtype;
    p.eps = eps;
    p.pdl = d->cc_major >= 9;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(RT);
    cfg.stream = (cudaStream_t)stream;
    const cudaError_t err = fm_launch(cfg, route_kernel, (const RouteParams)p, p.pdl);
    return err == cudaSuccess ? FMC_OK : (int)err;
}
