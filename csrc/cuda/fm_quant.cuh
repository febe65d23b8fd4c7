// Device-side pieces of the quantized formats and of programmatic dependent launch, shared by
// the CUDA kernel files (fm_kernels.cu: the expert kernels and fmc_linear; fm_gemv.cu: the
// decode GEMV). See fm_cuda.h and fm_kernels.cu's header for the x image they work with.
#ifndef FM_QUANT_CUH
#define FM_QUANT_CUH

#include <cuda_runtime.h>

namespace {

constexpr unsigned FULL = 0xffffffffu;  // every lane of a warp

// F 0: q8, 1: q4, 2: q2: elements per 16-byte chunk, chunks per group of 64, x pieces per chunk,
// whether groups have a bias.
template <int F> struct Fmt;
template <> struct Fmt<0> { static constexpr int EPC = 16, CPG = 4, P = 2, BIAS = 0; };
template <> struct Fmt<1> { static constexpr int EPC = 32, CPG = 2, P = 4, BIAS = 1; };
template <> struct Fmt<2> { static constexpr int EPC = 64, CPG = 1, P = 8, BIAS = 1; };

// Programmatic dependent launch (sm_90): a kernel launched with it may start while the previous
// kernel on the stream still runs; pdl_wait() blocks until that kernel has finished and its
// writes are visible. Only what cannot depend on it (streaming this launch's weights from host-
// given record addresses) runs before. pdl_trigger() lets the next such launch start early.
// Both are no-ops without the launch attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// V[2m], V[2m+1]: the two int8x4 operands of a 16-byte weight chunk that meet x piece m.
template <int F> __device__ __forceinline__ void unpack(const uint4 &w, int (&V)[2 * Fmt<F>::P]);
template <> __device__ __forceinline__ void unpack<0>(const uint4 &w, int (&V)[4]) {
    V[0] = (int)w.x; V[1] = (int)w.y; V[2] = (int)w.z; V[3] = (int)w.w;
}
template <> __device__ __forceinline__ void unpack<1>(const uint4 &w, int (&V)[8]) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        V[2 * j] = (int)(ws[j] & 0x0F0F0F0Fu);
        V[2 * j + 1] = (int)((ws[j] >> 4) & 0x0F0F0F0Fu);
    }
}
template <> __device__ __forceinline__ void unpack<2>(const uint4 &w, int (&V)[16]) {
    const unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) V[4 * j + k] = (int)((ws[j] >> (2 * k)) & 0x03030303u);
    }
}

// x image values: 16-bit fixed point, two to a word.
__device__ __forceinline__ int clamp16(int v) { return v > 32767 ? 32767 : (v < -32767 ? -32767 : v); }
__device__ __forceinline__ unsigned pack16(int a, int b) { return (unsigned)(a & 0xFFFF) | ((unsigned)b << 16); }

// ---------------------------------------------------------------- dot products
// d0 += row-0 chunk · x chunk, d1 += row-1 chunk · x chunk (one limb); xp -> piece 0, pieces nch apart.
template <int F>
__device__ __forceinline__ void dot2(const int (&V0)[2 * Fmt<F>::P], const int (&V1)[2 * Fmt<F>::P],
                                     const int4 *xp, int nch, int &d0, int &d1) {
#pragma unroll
    for (int m = 0; m < Fmt<F>::P; ++m) {
        const int4 a = xp[m * nch];
        d0 = __dp2a_lo(a.x, V0[2 * m], d0);
        d0 = __dp2a_hi(a.y, V0[2 * m], d0);
        d0 = __dp2a_lo(a.z, V0[2 * m + 1], d0);
        d0 = __dp2a_hi(a.w, V0[2 * m + 1], d0);
        d1 = __dp2a_lo(a.x, V1[2 * m], d1);
        d1 = __dp2a_hi(a.y, V1[2 * m], d1);
        d1 = __dp2a_lo(a.z, V1[2 * m + 1], d1);
        d1 = __dp2a_hi(a.w, V1[2 * m + 1], d1);
    }
}

// A warp's partial sums of both rows and every token, summed over its lanes (butterfly).
template <int NT>
__device__ __forceinline__ void warp_sum(float (&acc)[2][NT]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(FULL, acc[r][t], o);
}

}  // namespace

#endif
