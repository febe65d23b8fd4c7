// Eight activation values at a time for the decode-attention kernel (fm_attn.cu): raw 16-byte
// words of fp32/fp16/bf16 to floats and back, the dtype's rounding of an intermediate (as eager
// torch rounds), loads of this token's inputs and of the caches, and RoPE of 8 values.
#ifndef FM_ATTN_CUH
#define FM_ATTN_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

template <typename T> struct Elt;
template <> struct Elt<float> { static constexpr int W = 2; };           // uint4 per 8 values
template <> struct Elt<__half> { static constexpr int W = 1; };
template <> struct Elt<__nv_bfloat16> { static constexpr int W = 1; };

// x rounded to T and back (the dtype's rounding of an intermediate, as eager torch does)
template <typename T> __device__ __forceinline__ float rnd(float x);
template <> __device__ __forceinline__ float rnd<float>(float x) { return x; }
template <> __device__ __forceinline__ float rnd<__half>(float x) { return __half2float(__float2half_rn(x)); }
template <> __device__ __forceinline__ float rnd<__nv_bfloat16>(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
}

// 8 values from raw 16-byte words
template <typename T> __device__ __forceinline__ void cvt8(const uint4 (&u)[Elt<T>::W], float (&f)[8]);
template <> __device__ __forceinline__ void cvt8<float>(const uint4 (&u)[2], float (&f)[8]) {
    const unsigned w[8] = {u[0].x, u[0].y, u[0].z, u[0].w, u[1].x, u[1].y, u[1].z, u[1].w};
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = __uint_as_float(w[i]);
}
template <> __device__ __forceinline__ void cvt8<__nv_bfloat16>(const uint4 (&u)[1], float (&f)[8]) {
    const unsigned w[4] = {u[0].x, u[0].y, u[0].z, u[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}
template <> __device__ __forceinline__ void cvt8<__half>(const uint4 (&u)[1], float (&f)[8]) {
    const unsigned w[4] = {u[0].x, u[0].y, u[0].z, u[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xFFFFu)));
        f[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
    }
}

// Loads of 8 values: ld8 for this token's inputs (read-only in the launch), ldcg for the caches
// (written in the launch: through L2, never a stale L1 line).
template <typename T> __device__ __forceinline__ void ld8(const T *p, float (&f)[8]) {
    uint4 u[Elt<T>::W];
#pragma unroll
    for (int i = 0; i < Elt<T>::W; ++i) u[i] = __ldg((const uint4 *)p + i);
    cvt8<T>(u, f);
}
template <typename T> __device__ __forceinline__ void ldcg_raw(const T *p, uint4 (&u)[Elt<T>::W]) {
#pragma unroll
    for (int i = 0; i < Elt<T>::W; ++i) u[i] = __ldcg((const uint4 *)p + i);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// RoPE of 8 values at dims d0.. of a head x (rotate_half's partner dims from global memory).
template <typename T, int D>
__device__ __forceinline__ void rope8(const T *x, int d0, const float (&c)[8], const float (&s)[8], float (&r)[8]) {
    float a[8], b[8];
    const bool low = d0 < D / 2;
    ld8<T>(x + d0, a);
    ld8<T>(x + (low ? d0 + D / 2 : d0 - D / 2), b);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float rh = low ? -b[e] : b[e];
        r[e] = rnd<T>(__fadd_rn(rnd<T>(__fmul_rn(a[e], c[e])), rnd<T>(__fmul_rn(rh, s[e]))));
    }
}

// 8 values (exactly representable in T) as raw 16-byte words
template <typename T> __device__ __forceinline__ void pack8(const float (&f)[8], uint4 (&u)[Elt<T>::W]);
template <> __device__ __forceinline__ void pack8<float>(const float (&f)[8], uint4 (&u)[2]) {
    u[0] = make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    u[1] = make_uint4(__float_as_uint(f[4]), __float_as_uint(f[5]), __float_as_uint(f[6]), __float_as_uint(f[7]));
}
template <> __device__ __forceinline__ void pack8<__nv_bfloat16>(const float (&f)[8], uint4 (&u)[1]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w[i] = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i])) |
               ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * i + 1])) << 16);
    u[0] = make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __device__ __forceinline__ void pack8<__half>(const float (&f)[8], uint4 (&u)[1]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
        w[i] = (unsigned)__half_as_ushort(__float2half_rn(f[2 * i])) |
               ((unsigned)__half_as_ushort(__float2half_rn(f[2 * i + 1])) << 16);
    u[0] = make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace

#endif
