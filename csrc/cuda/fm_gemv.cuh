// The decode GEMV's launch parameters and the device pieces its two kernels share (fm_gemv.cu):
// the weight stream's loads, x's image (16-bit fixed point, fm_kernels.cu's layout), the
// arithmetic of one 16-byte chunk of two rows, the output of a row pair. Both kernels run the same
// operations in the same order through these, so their results are bit-identical at one split.
#ifndef FM_GEMV_CUH
#define FM_GEMV_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "fm_cuda.h"
#include "fm_quant.cuh"

namespace {

constexpr int NP = FMC_GEMV_MAX_PARTS;

struct GemvParams {
    const uint8_t *q[NP];
    const unsigned short *s[NP], *b[NP];   // fp16 scales / biases per (row, group of 64)
    int pair_end[NP];                      // cumulative row pairs (pairs never straddle parts)
    int rows[NP], col0[NP];                // each part's rows and its first output column
    int nparts, N, K, T, split, pairs_per_block, total_pairs, pdl;
    const void *x;
    int x_dtype, y_dtype;
    void *y;
    // fmc_gemv_norm (norm = 1, one token): x = rms_norm(h + hd) * nw computed by every block, the
    // sum h + hd written to hs by block 0 (x is then unused)
    const void *nh, *nd, *nw;
    void *hs;
    float eps;
    int norm;
};

__device__ __forceinline__ uint4 ld_stream(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float ld_half(const unsigned short *p) { return __half2float(__ushort_as_half(__ldg(p))); }


// One lane's 8 consecutive x values (t, 8*e8 ..) into the x image: piece (e8 % TPC) of chunk
// e8 / TPC, and the chunk's {xs, sum(x)} from the first lane of the chunk. The whole warp runs
// this (shuffles over the 8 lanes of a group of 64); `valid` guards the stores.
template <int F>
__device__ __forceinline__ void prep8(bool valid, int t, int e8, const float (&v)[8], int nch, int4 *img,
                                      float2 *meta, int lane) {
    constexpr int P = Fmt<F>::P, TPC = Fmt<F>::EPC / 8;
    float m = 0.f, sum = 0.f;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        m = fmaxf(m, fabsf(v[i]));
        sum += v[i];
        bad |= !isfinite(v[i]);
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
#pragma unroll
    for (int o = 1; o < TPC; o <<= 1) sum += __shfl_xor_sync(FULL, sum, o);
    const unsigned ballot = __ballot_sync(FULL, bad);
    float xs = m * (1.f / 32767.f);
    const float inv = m > 0.f ? __fdividef(32767.f, m) : 0.f;
    if ((ballot >> (lane & ~7)) & 0xFFu) xs = __int_as_float(0x7fc00000);  // NaN/inf in x -> NaN out
    if (!valid) return;
    int z[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) z[i] = clamp16(__float2int_rn(v[i] * inv));
    const int c = e8 / TPC, sub = e8 - c * TPC;
    int4 *dst = img + (size_t)t * P * nch + (size_t)sub * nch + c;
    if (F == 0)
        *dst = make_int4(pack16(z[0], z[1]), pack16(z[2], z[3]), pack16(z[4], z[5]), pack16(z[6], z[7]));
    else
        *dst = make_int4(pack16(z[0], z[2]), pack16(z[4], z[6]), pack16(z[1], z[3]), pack16(z[5], z[7]));
    if (sub == 0) meta[(size_t)t * nch + c] = make_float2(xs, sum);
}

// 8 consecutive 16-bit activations (bf16 or f16) of a 16-byte chunk as floats.
__device__ __forceinline__ void act8(const uint4 &u4, int dtype, float (&v)[8]) {
    const unsigned wv[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (dtype == FMC_BF16) {
            v[2 * i] = __uint_as_float(wv[i] << 16);
            v[2 * i + 1] = __uint_as_float(wv[i] & 0xFFFF0000u);
        } else {
            v[2 * i] = __half2float(__ushort_as_half((unsigned short)(wv[i] & 0xFFFFu)));
            v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(wv[i] >> 16)));
        }
    }
}

// v rounded to the activation dtype (as torch rounds every bf16/f16 op's fp32 result).
__device__ __forceinline__ float act_round(float v, int dtype) {
    return dtype == FMC_BF16 ? __bfloat162float(__float2bfloat16(v)) : __half2float(__float2half(v));
}

__device__ __forceinline__ unsigned short act_bits(float v, int dtype) {
    return dtype == FMC_BF16 ? __bfloat16_as_ushort(__float2bfloat16(v)) : __half_as_ushort(__float2half(v));
}

// 8 floats (already rounded to dtype) as one 16-byte chunk of dtype.
__device__ __forceinline__ uint4 act_pack8(const float (&v)[8], int dtype) {
    unsigned u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) u[i] = (unsigned)act_bits(v[2 * i], dtype) | ((unsigned)act_bits(v[2 * i + 1], dtype) << 16);
    return make_uint4(u[0], u[1], u[2], u[3]);
}

// x's image (every token's), built by the whole block (then a __syncthreads by the caller).
// With p.norm, x = rms_norm(h + hd) * nw from the block's scale `nsc` (norm_scale, fm_gemv.cu),
// rounded where models.layers.rms_norm rounds: the values the unfused path feeds this kernel.
template <int F, int NT>
__device__ __forceinline__ void build_image(const GemvParams &p, int nch, int4 *img, float2 *meta, int warp, int lane,
                                            int nw, float nsc) {
    const int K = p.K;
    const int per = K >> 3, total = NT * per;
    for (int base = warp * 32; base < total; base += nw * 32) {  // warp-uniform
        const int task = base + lane;
        const bool valid = task < total;
        const int t = valid ? task / per : 0, e8 = valid ? task - t * per : 0;
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
        if (valid && p.norm) {
            float a[8], b[8], g[8];
            act8(__ldg((const uint4 *)p.nh + e8), p.x_dtype, a);
            act8(__ldg((const uint4 *)p.nd + e8), p.x_dtype, b);
            act8(__ldg((const uint4 *)p.nw + e8), p.x_dtype, g);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                v[i] = act_round(act_round(act_round(a[i] + b[i], p.x_dtype) * nsc, p.x_dtype) * g[i], p.x_dtype);
        } else if (valid) {
            act8(__ldg((const uint4 *)((const uint16_t *)p.x + (size_t)t * K + 8 * (size_t)e8)), p.x_dtype, v);
        }
        prep8<F>(valid, t, e8, v, nch, img, meta, lane);
    }
}

// One 16-byte chunk c of both rows against every token's x image, into acc (the same operations
// in the same order in both kernels: their results are bit-identical at the same split).
template <int F, int NT>
__device__ __forceinline__ void chunk_dot(const uint4 &w0, const uint4 &w1, float sc0, float sc1, float bi0, float bi1,
                                          const int4 *img, const float2 *meta, int nch, int c, float (&acc)[2][NT]) {
    constexpr int P = Fmt<F>::P;
    int V0[2 * P], V1[2 * P];
    unpack<F>(w0, V0);
    unpack<F>(w1, V1);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const int4 *xp = img + (size_t)t * P * nch + c;
        int d0 = 0, d1 = 0;
        dot2<F>(V0, V1, xp, nch, d0, d1);
        const float2 mt = meta[(size_t)t * nch + c];
        acc[0][t] = fmaf(sc0, mt.x * (float)d0, acc[0][t]);
        acc[1][t] = fmaf(sc1, mt.x * (float)d1, acc[1][t]);
        if (Fmt<F>::BIAS) {
            acc[0][t] = fmaf(bi0, mt.y, acc[0][t]);
            acc[1][t] = fmaf(bi1, mt.y, acc[1][t]);
        }
    }
}

// Row r0 (and r0 + 1 if two) of part `part`: lane t < NT writes token t's sums.
template <int NT>
__device__ __forceinline__ void store_rows(const GemvParams &p, int part, int r0, bool two, int lane,
                                           const float (&acc)[2][NT]) {
    if (lane >= NT) return;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t != lane) continue;
        const size_t o = (size_t)t * p.N + p.col0[part] + r0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (r == 1 && !two) break;
            const float v = acc[r][t];
            if (p.y_dtype == FMC_F32) ((float *)p.y)[o + r] = v;
            else if (p.y_dtype == FMC_BF16) ((__nv_bfloat16 *)p.y)[o + r] = __float2bfloat16(v);
            else ((__half *)p.y)[o + r] = __float2half(v);
        }
    }
}

}  // namespace

#endif
