// One decode token's attention block in one launch (fm_attn.h): RoPE, the K/V writes at the
// position, and flash-decoding over the cache's positions 0..pos.
//
// Why one kernel: the torch formula (runtime/decode_ops.attention) took 5 kernels per layer on
// the H200 (RoPE with the cache writes, scores, softmax, p @ V), ~12 us of launch ramps and tails
// for ~2 MB of reads; and it read the whole n_ctx under a mask.
//
// Work split: grid (splits, head groups, kv heads). A block takes one kv head, up to 8 of its
// query heads (a head group) and one chunk of the positions; the chunk size follows the position
// on the device (ceil(len / splits), at least MIN_CHUNK), so short contexts run few blocks.
// In a block, NW warps; a position's D values are spread over LPP = D / 8 lanes (8 each, one
// 16-byte load of a 16-bit cache row piece), a warp takes 32 / LPP positions at a time and R of
// those rounds per tile, every load of a tile issued before its arithmetic and the next tile's
// loads over this one's arithmetic. Latency, not bytes, is what a decode token's attention costs
// (~2 MB per Mixtral layer at 552 positions), so the block loads everything that does not depend
// on the position together with it, and the chunk holding the position takes its k and v from
// shared memory instead of reading back its own write. With PDL the first tile's K/V loads are
// issued before the wait for the previous kernel (they do not depend on it: fm_attn.h), and the
// next launch is let start at once. Each warp keeps its own running max / sum / output (online
// softmax), merged across warps in shared memory, then across the chunks:
// - sm_90, n_ctx up to CLUSTER_CTX: the head group's chunks are one cluster (at most 16 blocks);
//   each block takes a slice of the outputs and reads every chunk's max, sum and output sum from
//   the other blocks' shared memory (DSMEM) after one cluster barrier: no global round trips;
// - else the last block of the head group (an atomic ticket after a threadfence) loads every
//   chunk's max and sum at once, a warp per head turns them into weights, and the outputs are
//   weighted sums, up to 16 chunks' loads in flight; it resets the ticket for the next launch.
// Both merge in chunk order (deterministic: the same bits every replay).
//
// Numerics as the torch formula: RoPE q * cos + rotate_half(q) * sin with each product and the
// sum rounded to the activation dtype (so K holds the same bits), the score q.K in fp32 rounded to
// the dtype, then times the scale; softmax and p @ V in fp32 (torch rounds p to the dtype first).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <stdint.h>

#include "fm_attn.h"
#include "fm_attn.cuh"
#include "fm_cuda.h"
#include "fm_device.cuh"
#include "fm_quant.cuh"

namespace {

constexpr int NW = 4;            // warps per block
constexpr int NTH = NW * 32;
constexpr int MAXG = 8;          // most query heads per block (a head group)
constexpr int MAXSPLIT = 128;    // most position chunks per head group
constexpr int MAXCL = 16;        // most blocks of a cluster (sm_90's non-portable limit)

struct AttnParams {
    const void *q, *k, *v, *cos, *sin;
    void *K, *V, *out;
    const int64_t *pos;
    float *part;                 // [kv heads][head groups][splits][G * D + 2 * G]
    unsigned *ticket;            // [kv heads * head groups]
    int g, gb, hg, nsplit, n_ctx, window, min_chunk, pdl;
    int ncl;                     // > 1: the chunks of a head group are a cluster (sm_90), merged in DSMEM
    float scale;
};

// sm_90 clusters: every thread of the cluster's blocks arrives, then waits (release/acquire: the
// shared-memory writes before it are visible to the cluster after it); a float of block `rank`'s
// shared memory at this block's address of it.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ float ld_dsmem(const float *ptr, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned a = (unsigned)__cvta_generic_to_shared(ptr), r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
#else
    return 0.f;
#endif
}

// Head h's output element d merged over the block's warps, each with its running max: the
// block's max M, sum L and output sum o (relative to M).
template <int G, int D>
__device__ __forceinline__ void merge_warps(const float (&s_m)[NW][G], const float (&s_l)[NW][G],
                                            const float (&s_acc)[NW][G][D], int h, int d, float &M, float &L,
                                            float &o) {
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w][h]);
#pragma unroll
    for (int w = 0; w < NW; ++w) {
        const float a = s_m[w][h] == -CUDART_INF_F ? 0.f : __expf(s_m[w][h] - M);
        L = fmaf(a, s_l[w][h], L);
        o = fmaf(a, s_acc[w][h][d], o);
    }
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(NTH) attn_kernel(const AttnParams p) {
    constexpr int LPP = D / 8, PPW = 32 / LPP;  // lanes per position, positions per warp round
    constexpr int R = G >= 8 ? 2 : 4;           // rounds per tile (registers: two tiles of K and V)
    constexpr int TILE = NW * PPW * R;
    constexpr int WU = Elt<T>::W;
    __shared__ float s_m[NW][G], s_l[NW][G], s_bm[G], s_bl[G];
    __shared__ __align__(16) float s_acc[NW][G][D];
    __shared__ __align__(16) uint4 s_new[2][LPP * WU];  // this position's k and v (raw)
    __shared__ float s_pm[MAXSPLIT][G], s_pl[MAXSPLIT][G];
    __shared__ int s_last;

    // The next launch may start now (it waits for this one's end before it reads what this one
    // writes). Before this kernel's own wait: only what the previous kernel does not write (the
    // position, the RoPE tables and the cache rows of earlier positions; fm_attn.h). pdl 2 and 3
    // are the knob's measurements: trigger after the wait; wait first (nothing over the wait).
    if (p.pdl == 3) pdl_wait();
    if (p.pdl == 1 || p.pdl == 3) pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = lane % LPP, pg = lane / LPP;
    const int split = blockIdx.x, hgi = blockIdx.y, kvh = blockIdx.z, KVH = gridDim.z;
    const int h0 = hgi * p.gb, nh = min(p.gb, p.g - h0);
    const int d0 = sub * 8;
    const size_t row = (size_t)KVH * D;
    const size_t head = (size_t)kvh * p.g + h0;  // this block's first query head
    const int64_t pos = *p.pos;
    float c8[8], s8[8], qr[G][8], kr[8], vv[8];
    ld8<T>((const T *)p.cos + d0, c8);
    ld8<T>((const T *)p.sin + d0, s8);
    const bool valid = pos >= 0 && pos < p.n_ctx;
    const int n = valid ? (int)pos + 1 : 0;
    const int lo = valid && p.window > 0 && n > p.window ? n - p.window : 0;
    const int len = n - lo;
    const int chunk = max(p.min_chunk, (len + p.nsplit - 1) / p.nsplit);
    const int active = (len + chunk - 1) / chunk;  // 0 for an invalid position: the output is NaN
    const int start = lo + split * chunk, end = min(start + chunk, n);
    const T *K = (const T *)p.K + (size_t)kvh * D + d0, *V = (const T *)p.V + (size_t)kvh * D + d0;

    // a tile's K and V rows of this lane (the position's own from s_new once written)
    auto load = [&](int t0, uint4 (&kw)[R][WU], uint4 (&vw)[R][WU], bool (&okw)[R], bool own) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int j = t0 + (r * NW + warp) * PPW + pg;
            okw[r] = j < end;
            if (!okw[r]) continue;
            if (j != pos) {
                ldcg_raw<T>(K + (size_t)j * row, kw[r]);
                ldcg_raw<T>(V + (size_t)j * row, vw[r]);
            } else if (own) {
#pragma unroll
                for (int i = 0; i < WU; ++i) {
                    kw[r][i] = s_new[0][sub * WU + i];
                    vw[r][i] = s_new[1][sub * WU + i];
                }
            }
        }
    };
    uint4 kraw[R][WU], vraw[R][WU];
    bool ok[R];
    if (split < active) load(start, kraw, vraw, ok, false);  // the first tile over the wait
    if (p.pdl == 1 || p.pdl == 2) pdl_wait();  // q, k and v are the previous kernel's output
    if (p.pdl == 2) pdl_trigger();
    // the rotated q of the block's heads and (warp 0) the rotated k and v, all loads at once
#pragma unroll
    for (int h = 0; h < G; ++h) {
        if (h < nh) rope8<T, D>((const T *)p.q + (head + h) * D, d0, c8, s8, qr[h]);
        else
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[h][e] = 0.f;
    }
    if (threadIdx.x < LPP) {
        rope8<T, D>((const T *)p.k + (size_t)kvh * D, d0, c8, s8, kr);
        ld8<T>((const T *)p.v + (size_t)kvh * D + d0, vv);
    }

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = -CUDART_INF_F;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    }
    if (split < active) {
        if (start <= pos && pos < end) {  // this chunk holds the position: write its k and v
            if (threadIdx.x < LPP) {        // (every head group's block writes the same bits)
                uint4 ku[WU], vu[WU];
                pack8<T>(kr, ku);
                pack8<T>(vv, vu);
#pragma unroll
                for (int i = 0; i < WU; ++i) {
                    ((uint4 *)((T *)p.K + (size_t)pos * row + (size_t)kvh * D + d0))[i] = ku[i];
                    ((uint4 *)((T *)p.V + (size_t)pos * row + (size_t)kvh * D + d0))[i] = vu[i];
                    s_new[0][sub * WU + i] = ku[i];
                    s_new[1][sub * WU + i] = vu[i];
                }
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int j = start + (r * NW + warp) * PPW + pg;
                if (ok[r] && j == pos)
#pragma unroll
                    for (int i = 0; i < WU; ++i) {
                        kraw[r][i] = s_new[0][sub * WU + i];
                        vraw[r][i] = s_new[1][sub * WU + i];
                    }
            }
        }
        for (int t0 = start; t0 < end; t0 += TILE) {
            uint4 kn[R][WU], vn[R][WU];
            bool okn[R];
            const bool more = t0 + TILE < end;
            if (more) load(t0 + TILE, kn, vn, okn, true);  // the next tile's loads over this one's arithmetic
            float sc[R][G];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float kf[8];
                if (ok[r]) cvt8<T>(kraw[r], kf);
                else
#pragma unroll
                    for (int e = 0; e < 8; ++e) kf[e] = 0.f;
#pragma unroll
                for (int h = 0; h < G; ++h) {
                    float d = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) d = fmaf(qr[h][e], kf[e], d);
#pragma unroll
                    for (int o = 1; o < LPP; o <<= 1) d += __shfl_xor_sync(FULL, d, o);
                    sc[r][h] = ok[r] ? rnd<T>(d) * p.scale : -CUDART_INF_F;
                }
            }
#pragma unroll
            for (int h = 0; h < G; ++h) {
                float tm = sc[0][h];
#pragma unroll
                for (int r = 1; r < R; ++r) tm = fmaxf(tm, sc[r][h]);
#pragma unroll
                for (int o = LPP; o < 32; o <<= 1) tm = fmaxf(tm, __shfl_xor_sync(FULL, tm, o));
                const float mn = fmaxf(m[h], tm);
                if (mn == -CUDART_INF_F) continue;  // nothing of this warp's yet (warp-uniform)
                const float alpha = __expf(m[h] - mn);
                l[h] *= alpha;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[h][e] *= alpha;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float pr = __expf(sc[r][h] - mn);
                    if (!ok[r]) continue;
                    float vf[8];
                    cvt8<T>(vraw[r], vf);
                    l[h] += pr;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(pr, vf[e], acc[h][e]);
                }
                m[h] = mn;
            }
            if (more) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    ok[r] = okn[r];
#pragma unroll
                    for (int i = 0; i < WU; ++i) {
                        kraw[r][i] = kn[r][i];
                        vraw[r][i] = vn[r][i];
                    }
                }
            }
        }
        // this warp's sums over its position groups (lanes LPP apart)
#pragma unroll
        for (int h = 0; h < G; ++h) {
#pragma unroll
            for (int o = LPP; o < 32; o <<= 1) {
                l[h] += __shfl_xor_sync(FULL, l[h], o);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[h][e] += __shfl_xor_sync(FULL, acc[h][e], o);
            }
        }
        if (lane < LPP)
#pragma unroll
            for (int h = 0; h < G; ++h)
#pragma unroll
                for (int e = 0; e < 8; ++e) s_acc[warp][h][d0 + e] = acc[h][e];
        if (lane == 0)
#pragma unroll
            for (int h = 0; h < G; ++h) {
                s_m[warp][h] = m[h];
                s_l[warp][h] = l[h];
            }
    }
    __syncthreads();
    const bool cl = p.ncl > 1 && active > 1;  // the cluster's merge: every block takes part
    if (split >= active && !(active == 0 && split == 0) && !cl) return;

    T *out = (T *)p.out + head * D;
    if (active <= 1) {  // one chunk (or none): this block's result is the output
        for (int i = threadIdx.x; i < nh * D; i += NTH) {
            const int h = i / D, d = i - h * D;
            float M = -CUDART_INF_F, L = 0.f, o = 0.f;
            if (active) merge_warps(s_m, s_l, s_acc, h, d, M, L, o);
            out[i] = from_float<T>(o / L);
        }
        return;
    }
    if (cl) {
        // sm_90: the head group's chunks are one cluster. Each block merges its warps (in place:
        // element (h, d) is one thread's), then takes a slice of the outputs, reading every
        // block's max, sum and output sum from its shared memory (DSMEM) in chunk order.
        for (int i = threadIdx.x; i < nh * D; i += NTH) {
            const int h = i / D, d = i - h * D;
            float M = -CUDART_INF_F, L = 0.f, o = 0.f;
            if (split < active) merge_warps(s_m, s_l, s_acc, h, d, M, L, o);
            s_acc[0][h][d] = o;
            if (d == 0) {
                s_bm[h] = M;
                s_bl[h] = L;
            }
        }
        cluster_sync();
        const int nout = nh * D, per = (nout + p.ncl - 1) / p.ncl, iend = min(nout, (split + 1) * per);
        for (int i = split * per + threadIdx.x; i < iend; i += NTH) {
            const int h = i / D, d = i - h * D;
            float mb[MAXCL], lb[MAXCL], ob[MAXCL];
#pragma unroll
            for (int b = 0; b < MAXCL; ++b)
                if (b < p.ncl) {
                    mb[b] = ld_dsmem(&s_bm[h], b);
                    lb[b] = ld_dsmem(&s_bl[h], b);
                    ob[b] = ld_dsmem(&s_acc[0][h][d], b);
                }
            float M = -CUDART_INF_F, L = 0.f, o = 0.f;
#pragma unroll
            for (int b = 0; b < MAXCL; ++b)
                if (b < p.ncl) M = fmaxf(M, mb[b]);
#pragma unroll
            for (int b = 0; b < MAXCL; ++b)
                if (b < p.ncl && mb[b] != -CUDART_INF_F) {
                    const float a = __expf(mb[b] - M);
                    L = fmaf(a, lb[b], L);
                    o = fmaf(a, ob[b], o);
                }
            out[i] = from_float<T>(o / L);
        }
        cluster_sync();  // no block leaves while another reads its shared memory
        return;
    }
    // this chunk's partial: output sums, max and sum per head (relative to the block's max)
    constexpr int PS = G * D + 2 * G;
    const size_t grp = (size_t)kvh * p.hg + hgi;
    float *part = p.part + (grp * p.nsplit + split) * PS;
    for (int i = threadIdx.x; i < nh * D; i += NTH) {
        const int h = i / D, d = i - h * D;
        float M = -CUDART_INF_F, L = 0.f, o = 0.f;
        merge_warps(s_m, s_l, s_acc, h, d, M, L, o);
        part[h * D + d] = o;
        if (d == 0) {
            part[G * D + 2 * h] = M;
            part[G * D + 2 * h + 1] = L;
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(p.ticket + grp, 1u) == (unsigned)(active - 1);
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // the last block: every chunk's max and sum at once, then per head (a warp each) the chunks'
    // weights exp(m_c - M) / L, then the outputs as weighted sums in chunk order, the loads of CB
    // chunks for all of a thread's EPT outputs in flight together
    const float *parts = p.part + grp * p.nsplit * PS;
    for (int i = threadIdx.x; i < active * G; i += NTH) {
        const int c = i / G, h = i - c * G;
        if (h < nh) {
            s_pm[c][h] = __ldcg(parts + (size_t)c * PS + G * D + 2 * h);
            s_pl[c][h] = __ldcg(parts + (size_t)c * PS + G * D + 2 * h + 1);
        }
    }
    __syncthreads();
    for (int h = warp; h < nh; h += NW) {
        float M = -CUDART_INF_F, L = 0.f;
        for (int c = lane; c < active; c += 32) M = fmaxf(M, s_pm[c][h]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(FULL, M, o));
        for (int c = lane; c < active; c += 32) L = fmaf(__expf(s_pm[c][h] - M), s_pl[c][h], L);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(FULL, L, o);
        for (int c = lane; c < active; c += 32) s_pm[c][h] = __expf(s_pm[c][h] - M) / L;
    }
    __syncthreads();
    constexpr int EPT = (G * D + NTH - 1) / NTH;                // outputs per thread
    constexpr int CB = EPT >= 16 ? 4 : (EPT >= 8 ? 8 : 16);     // chunks per batch of loads
    const int nout = nh * D;
    float o[EPT];
#pragma unroll
    for (int e = 0; e < EPT; ++e) o[e] = 0.f;
    for (int c0 = 0; c0 < active; c0 += CB) {
        float v[CB][EPT];
#pragma unroll
        for (int u = 0; u < CB; ++u)
#pragma unroll
            for (int e = 0; e < EPT; ++e) {
                const int i = threadIdx.x + e * NTH;
                v[u][e] = c0 + u < active && i < nout ? __ldcg(parts + (size_t)(c0 + u) * PS + i) : 0.f;
            }
#pragma unroll
        for (int u = 0; u < CB; ++u)
#pragma unroll
            for (int e = 0; e < EPT; ++e) {
                const int i = threadIdx.x + e * NTH;
                if (c0 + u < active && i < nout) o[e] = fmaf(s_pm[c0 + u][i / D], v[u][e], o[e]);
            }
    }
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
        const int i = threadIdx.x + e * NTH;
        if (i < nout) out[i] = from_float<T>(o[e]);
    }
    if (threadIdx.x == 0) atomicExch(p.ticket + grp, 0u);  // ready for the next launch
}

using AttnFn = void (*)(AttnParams);

template <typename T, int D>
AttnFn pick_g(int G) {
    return G == 1 ? attn_kernel<T, D, 1> : (G == 4 ? attn_kernel<T, D, 4> : attn_kernel<T, D, 8>);
}

template <typename T>
AttnFn pick(int D, int G) {
    switch (D) {
        case 16: return pick_g<T, 16>(G);
        case 32: return pick_g<T, 32>(G);
        case 64: return pick_g<T, 64>(G);
        case 128: return pick_g<T, 128>(G);
        case 256: return pick_g<T, 256>(G);
        default: return nullptr;
    }
}

FmDevice g_adev[FM_MAX_DEV];
int64_t g_atune[FMC_ATTN_TUNE_NKEYS] = {0, 1, 16, 0, 0, 1024, 0};

struct Shape {
    int g, gb, G, hg;
};

// The launch's shape, or FMC_EINVAL.
int attn_shape(int64_t heads, int64_t kv_heads, int64_t D, int64_t n_ctx, int device, Shape *s, FmDevice **dev) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || n_ctx < 1 || n_ctx > (1 << 30) || kv_heads > 65535)
        return FMC_EINVAL;
    if (D != 16 && D != 32 && D != 64 && D != 128 && D != 256) return FMC_EINVAL;
    const int rc = fm_device(device, g_adev, dev);
    if (rc) return rc;
    s->g = (int)(heads / kv_heads);
    s->gb = s->g < MAXG ? s->g : MAXG;
    s->G = s->gb == 1 ? 1 : (s->gb <= 4 ? 4 : 8);
    s->hg = (s->g + s->gb - 1) / s->gb;
    if (s->hg > 65535) return FMC_EINVAL;
    return FMC_OK;
}

// The most blocks of one cluster the device schedules for fn (16 or 8; 0: none), queried once
// per device and kernel; 16 needs the non-portable cluster size allowed.
int attn_max_cluster(int dtype, int ld, int gi, AttnFn fn, FmDevice *dev) {
    static int cl_of[FM_MAX_DEV][3][5][3];  // + 1, 0 = not queried yet
    int &c = cl_of[dev - g_adev][dtype][ld][gi];
    if (!c) {
        int best = 0;
        for (int want = MAXCL; want >= 8 && !best; want /= 2) {
            if (want > 8 && cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
                continue;
            cudaLaunchConfig_t cfg = {};
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeClusterDimension;
            attr[0].val.clusterDim.x = want;
            attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
            cfg.gridDim = dim3(want);
            cfg.blockDim = dim3(NTH);
            cfg.attrs = attr;
            cfg.numAttrs = 1;
            int n = 0;
            if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) == cudaSuccess && n > 0) best = want;
        }
        (void)cudaGetLastError();  // a refused query leaves no error behind
        c = best + 1;
    }
    return c - 1;
}

// Position chunks per head group: the SPLITS knob, else chunks of one tile for n_ctx, at most the
// blocks resident at once (the kernel's occupancy, queried once per device and kernel). On sm_90
// up to CLUSTER_CTX positions the chunks of a head group are one cluster (*ncl = their count,
// at most the cluster size the device schedules): the merge in DSMEM, no second pass.
int attn_splits(const Shape &s, int dtype, AttnFn fn, FmDevice *dev, int64_t D, int64_t kv_heads, int64_t n_ctx,
                int *nsplit, int *ncl) {
    static int occ_of[FM_MAX_DEV][3][5][3];  // [device][dtype][log2(D) - 4][G 1/4/8]
    int64_t want = g_atune[FMC_ATTN_TUNE_SPLITS];
    int ld = 0;
    while ((16 << ld) < D) ++ld;
    const int gi = s.G == 1 ? 0 : (s.G == 4 ? 1 : 2);
    const int maxcl = dev->cc_major >= 9 && n_ctx <= g_atune[FMC_ATTN_TUNE_CLUSTER_CTX]
                    ? attn_max_cluster(dtype, ld, gi, fn, dev) : 0;
    const int tile = NW * (256 / (int)D) * (s.G >= 8 ? 2 : 4);  // one tile's positions (attn_kernel)
    if (want <= 0 && maxcl) {
        want = (n_ctx + tile - 1) / tile;
        if (want > maxcl) want = maxcl;
    } else if (want <= 0) {
        int &occ = occ_of[dev - g_adev][dtype][ld][gi];
        if (!occ) {
            const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, NTH, 0);
            if (err != cudaSuccess) return (int)err;
            if (occ < 1) occ = 1;
        }
        want = (n_ctx + tile - 1) / tile;
        const int64_t cap = (int64_t)occ * dev->sms / (kv_heads * s.hg);
        if (want > cap) want = cap;
    }
    *nsplit = (int)(want < 1 ? 1 : (want > MAXSPLIT ? MAXSPLIT : want));
    *ncl = *nsplit > 1 && *nsplit <= maxcl ? *nsplit : 0;
    return FMC_OK;
}

size_t ticket_bytes(int64_t groups) { return ((size_t)groups * 4 + 255) / 256 * 256; }

}  // namespace

extern "C" {

const char *fmc_attn_strerror(int code) {
    switch (code) {
        case FMC_OK: return "ok";
        case FMC_EINVAL: return "unsupported shape, dtype or argument (head_dim 16/32/64/128/256, heads a multiple of kv_heads)";
        case FMC_EALIGN: return "a tensor is not 16-byte aligned (the workspace: 256 bytes)";
        case FMC_EWORKSPACE: return "workspace missing or smaller than fmc_attn_workspace_bytes";
        default: return code > 0 ? cudaGetErrorString((cudaError_t)code) : "unknown error";
    }
}

int64_t fmc_attn_tune(int key, int64_t value) {
    if (key < 0 || key >= FMC_ATTN_TUNE_NKEYS) return -1;
    const int64_t old = g_atune[key];
    const bool settable = key <= FMC_ATTN_TUNE_MIN_CHUNK || key == FMC_ATTN_TUNE_CLUSTER_CTX;
    if (value >= 0 && settable && !(key == FMC_ATTN_TUNE_MIN_CHUNK && value < 1))
        g_atune[key] = value;
    return old;
}

size_t fmc_attn_workspace_bytes(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx, int device) {
    Shape s;
    FmDevice *dev;
    if (attn_shape(heads, kv_heads, head_dim, n_ctx, device, &s, &dev)) return 0;
    const size_t groups = (size_t)kv_heads * s.hg;
    return ticket_bytes(groups) + groups * MAXSPLIT * (size_t)(s.G * head_dim + 2 * s.G) * sizeof(float);
}

int fmc_decode_attention(int dtype, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n_ctx,
                         const void *q, const void *k, const void *v, const void *cos, const void *sin,
                         void *K, void *V, const int64_t *pos, int64_t window, float scale, void *out,
                         void *workspace, size_t workspace_bytes, int device, void *stream) {
    if (dtype != FMC_F32 && dtype != FMC_F16 && dtype != FMC_BF16) return FMC_EINVAL;
    if (!q || !k || !v || !cos || !sin || !K || !V || !pos || !out || window < 0) return FMC_EINVAL;
    const void *ptrs[] = {q, k, v, cos, sin, K, V, out};
    for (const void *ptr : ptrs)
        if ((uintptr_t)ptr % 16) return FMC_EALIGN;
    if ((uintptr_t)pos % 8 || (uintptr_t)workspace % 256) return FMC_EALIGN;
    Shape s;
    FmDevice *dev;
    int rc = attn_shape(heads, kv_heads, head_dim, n_ctx, device, &s, &dev);
    if (rc) return rc;
    const size_t groups = (size_t)kv_heads * s.hg;
    if (!workspace || workspace_bytes < fmc_attn_workspace_bytes(heads, kv_heads, head_dim, n_ctx, device))
        return FMC_EWORKSPACE;
    AttnFn fn = dtype == FMC_F32 ? pick<float>((int)head_dim, s.G)
              : dtype == FMC_F16 ? pick<__half>((int)head_dim, s.G) : pick<__nv_bfloat16>((int)head_dim, s.G);
    if (!fn) return FMC_EINVAL;
    int nsplit, ncl;
    if ((rc = attn_splits(s, dtype, fn, dev, head_dim, kv_heads, n_ctx, &nsplit, &ncl))) return rc;
    AttnParams p = {};
    p.q = q; p.k = k; p.v = v; p.cos = cos; p.sin = sin;
    p.K = K; p.V = V; p.out = out; p.pos = pos;
    p.ticket = (unsigned *)workspace;
    p.part = (float *)((char *)workspace + ticket_bytes(groups));
    p.g = s.g; p.gb = s.gb; p.hg = s.hg; p.nsplit = nsplit;
    p.n_ctx = (int)n_ctx;
    p.window = window > (1 << 30) ? 0 : (int)window;
    p.min_chunk = (int)g_atune[FMC_ATTN_TUNE_MIN_CHUNK];
    p.scale = scale;
    p.pdl = dev->cc_major >= 9 && g_atune[FMC_ATTN_TUNE_PDL] <= 3 ? (int)g_atune[FMC_ATTN_TUNE_PDL] : 0;
    p.ncl = ncl;
    g_atune[FMC_ATTN_TUNE_LAST_SPLITS] = nsplit;
    g_atune[FMC_ATTN_TUNE_LAST_CLUSTER] = ncl;
    g_atune[FMC_ATTN_TUNE_LAST_GRID] = (int64_t)nsplit * s.hg * kv_heads;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)nsplit, (unsigned)s.hg, (unsigned)kv_heads);
    cfg.blockDim = dim3(NTH);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = (cudaStream_t)stream;
    cudaLaunchAttribute attr[2];
    int na = 0;
    if (p.pdl) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (ncl) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = (unsigned)ncl;
        attr[na].val.clusterDim.y = attr[na].val.clusterDim.z = 1;
        ++na;
    }
    cfg.attrs = attr;
    cfg.numAttrs = na;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, fn, (const AttnParams)p);
    return err == cudaSuccess ? FMC_OK : (int)err;
}

}  // extern "C"
