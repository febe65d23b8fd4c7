// llama.cpp's block formats on NVIDIA GPUs: dequantization bit-exact with gguf-py (the CUDA twin
// of csrc/cpu/fm_gguf.c). Explicit _rn intrinsics keep nvcc from contracting to FMA, so every
// value is the same float operation sequence as gguf-py's. One thread per block of the format.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fm_gguf_cuda.h"

static __device__ __forceinline__ float h2f(const uint8_t *p)
{
    __half_raw r;
    r.x = (unsigned short)(p[0] | (p[1] << 8));
    return __half2float(__half(r));
}

static __device__ __forceinline__ void scale_min_k4(const uint8_t *s, int j, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

static __global__ void dequant_kernel(int type, const uint8_t *src, int64_t nblocks, int bsize, float *y)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nblocks) return;
    const uint8_t *b = src + i * bsize;
    switch (type) {
    case FMG_CUDA_F32: y[i] = __int_as_float(b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24); break;
    case FMG_CUDA_F16: y[i] = h2f(b); break;
    case FMG_CUDA_BF16: y[i] = __int_as_float((b[0] | b[1] << 8) << 16); break;
    case FMG_CUDA_Q8_0: {
        float d = h2f(b);
        for (int j = 0; j < 32; j++) y[i * 32 + j] = __fmul_rn(d, (float)(int8_t)b[2 + j]);
        break;
    }
    case FMG_CUDA_Q4_0: {
        float d = h2f(b);
        for (int j = 0; j < 16; j++) {
            y[i * 32 + j] = __fmul_rn(d, (float)((b[2 + j] & 15) - 8));
            y[i * 32 + j + 16] = __fmul_rn(d, (float)((b[2 + j] >> 4) - 8));
        }
        break;
    }
    case FMG_CUDA_Q4_1: {
        float d = h2f(b), m = h2f(b + 2);
        for (int j = 0; j < 16; j++) {
            y[i * 32 + j] = __fadd_rn(__fmul_rn(d, (float)(b[4 + j] & 15)), m);
            y[i * 32 + j + 16] = __fadd_rn(__fmul_rn(d, (float)(b[4 + j] >> 4)), m);
        }
        break;
    }
    case FMG_CUDA_Q5_0:
    case FMG_CUDA_Q5_1: {
        const bool q51 = type == FMG_CUDA_Q5_1;
        float d = h2f(b), m = q51 ? h2f(b + 2) : 0.0f;
        const uint8_t *qh8 = b + (q51 ? 4 : 2), *qs = qh8 + 4;
        uint32_t qh = qh8[0] | qh8[1] << 8 | qh8[2] << 16 | (uint32_t)qh8[3] << 24;
        for (int j = 0; j < 32; j++) {
            int v = ((j < 16 ? qs[j] : qs[j - 16] >> 4) & 15) | (int)((qh >> j) & 1) << 4;
            y[i * 32 + j] = q51 ? __fadd_rn(__fmul_rn(d, (float)v), m) : __fmul_rn(d, (float)(v - 16));
        }
        break;
    }
    case FMG_CUDA_Q4_K:
    case FMG_CUDA_Q5_K: {
        const bool q5 = type == FMG_CUDA_Q5_K;
        float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + 16 + (q5 ? 32 : 0);
        for (int s = 0; s < 8; s++) {
            int a, m;
            scale_min_k4(sc, s, &a, &m);
            float dl = __fmul_rn(d, (float)a), ml = __fmul_rn(dmin, (float)m);
            const uint8_t *q = qs + 32 * (s / 2);
            for (int l = 0; l < 32; l++) {
                int v = (q[l] >> (4 * (s & 1))) & 15;
                if (q5) v |= ((qh[l] >> s) & 1) << 4;
                y[i * 256 + 32 * s + l] = __fsub_rn(__fmul_rn(dl, (float)v), ml);
            }
        }
        break;
    }
    case FMG_CUDA_MXFP4: {  // e8m0 scale (half of it, as ggml_e8m0_to_fp32_half) times doubled e2m1 codes
        const float kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        const float d = __uint_as_float(b[0] < 2 ? 0x00200000u << b[0] : (uint32_t)(b[0] - 1) << 23);
        for (int j = 0; j < 16; j++) {
            y[i * 32 + j] = __fmul_rn(d, kv[b[1 + j] & 15]);
            y[i * 32 + j + 16] = __fmul_rn(d, kv[b[1 + j] >> 4]);
        }
        break;
    }
    case FMG_CUDA_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(b + 208);
        for (int g = 0; g < 8; g++) {
            const int h = g / 4, s = (g / 2) & 1, c = g & 1, sh = 2 * (g & 3);
            for (int l = 0; l < 32; l++) {
                int e = 32 * g + l;
                int v = ((ql[64 * h + 32 * c + l] >> (4 * s)) & 15) | (((qh[32 * h + l] >> sh) & 3) << 4);
                y[i * 256 + e] = __fmul_rn(__fmul_rn(d, (float)sc[e / 16]), (float)(int8_t)(v - 32));
            }
        }
        break;
    }
    }
}

static int block_geometry(int type, int *elems, int *bytes)
{
    switch (type) {
    case FMG_CUDA_F32: *elems = 1; *bytes = 4; return 0;
    case FMG_CUDA_F16: case FMG_CUDA_BF16: *elems = 1; *bytes = 2; return 0;
    case FMG_CUDA_Q4_0: *elems = 32; *bytes = 18; return 0;
    case FMG_CUDA_Q4_1: *elems = 32; *bytes = 20; return 0;
    case FMG_CUDA_Q5_0: *elems = 32; *bytes = 22; return 0;
    case FMG_CUDA_Q5_1: *elems = 32; *bytes = 24; return 0;
    case FMG_CUDA_Q8_0: *elems = 32; *bytes = 34; return 0;
    case FMG_CUDA_Q4_K: *elems = 256; *bytes = 144; return 0;
    case FMG_CUDA_Q5_K: *elems = 256; *bytes = 176; return 0;
    case FMG_CUDA_Q6_K: *elems = 256; *bytes = 210; return 0;
    case FMG_CUDA_MXFP4: *elems = 32; *bytes = 17; return 0;
    default: return -1;
    }
}

extern "C" int64_t fmg_cuda_row_bytes(int type, int64_t cols)
{
    int e, b;
    if (block_geometry(type, &e, &b) || cols <= 0 || cols % e) return -1;
    return cols / e * b;
}

extern "C" int fmg_cuda_dequant(int type, const void *src, int64_t rows, int64_t cols, float *out, int device,
                                void *stream)
{
    int e, b;
    if (block_geometry(type, &e, &b) || rows <= 0 || cols <= 0 || cols % e) return -1;
    if (cudaSetDevice(device) != cudaSuccess) return -2;
    int64_t n = rows * (cols / e);
    int threads = 128;
    dequant_kernel<<<(unsigned)((n + threads - 1) / threads), threads, 0, (cudaStream_t)stream>>>(
        type, (const uint8_t *)src, n, b, out);
    return cudaGetLastError() == cudaSuccess ? 0 : -2;
}

extern "C" int fmg_cuda_device_count(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
