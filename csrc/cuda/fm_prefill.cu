// Grouped mixed-input GEMM for prefill (fm_prefill.h): one launch computes y = x @ W_e.T for all
// of a layer's experts, with the q4/q8 weights dequantized in registers.
//
// Block tile: 256 weight rows x 64 tokens of one expert; K in steps of 64 (one quantization
// group, so one scale/bias per row per step). 8 warps, each 32 rows x 64 tokens: 2 x 8 mma.sync
// m16n8k16 tiles (bf16 in, fp32 accumulate). A 4-stage cp.async ring brings each step's packed
// weight bytes and activation tile into shared memory; a warp reads its weight rows' bytes from
// there and turns them into bf16 A fragments directly, never writing a bf16 weight.
//
// The k order inside a 16-wide mma step is permuted (any permutation works if A and B agree):
// thread t of a quad owns the 16 consecutive elements 16t..16t+15 of the 64-element step, and
// step s uses elements 16t+4s..16t+4s+3 as its logical columns {2t, 2t+1, 2t+8, 2t+9}. So a
// thread's weight bytes for all 4 steps are one 8-byte (q4) or 16-byte (q8) load per row, and
// its activations one 16-byte load per token and pair of steps (XOR-swizzled: no bank conflicts).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fm_prefill.h"

namespace {

constexpr int BM = 256, BN = 64, BK = 64, STAGES = 4, THREADS = 256;
constexpr int SO = BM + 8;  // epilogue row stride (bf16 elements): 528 bytes, 16-byte aligned

template <int F> struct Q {
    static constexpr int ROW = F == FMP_Q4 ? 32 : 64;  // packed bytes per row per step
    static constexpr int A_BYTES = BM * ROW;
    static constexpr int X_BYTES = BN * BK * 2;
    static constexpr int STAGE = A_BYTES + X_BYTES;
    static constexpr int SMEM = STAGE * STAGES + 2 * BN * 4;
    static constexpr int STAGE_ALL = STAGE * STAGES;  // + the per-token group sums (INTA)
};

struct Params {
    const uint64_t *parts;
    int64_t part_off, s_off, b_off, N, K;
    const int32_t *offsets;
    const __nv_bfloat16 *x;
    __nv_bfloat16 *y;
};

__device__ __forceinline__ unsigned smem_addr(const void *p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Exact float of a small unsigned integer v < 2^23 without the slow int-to-float conversion:
// 2^23 + v has v in its mantissa.
__device__ __forceinline__ float u2f(unsigned v) { return __int_as_float(0x4B000000u | v) - 8388608.f; }

__device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
    return *(unsigned *)&t;
}

// Two adjacent weights of one row as a bf16x2: q4 from one byte (low nibble first),
// q8 from two bytes (signed); w = q * s + b in fp32 (one rounding), then to bf16.
template <int F> __device__ __forceinline__ unsigned pair(unsigned bits, float s, float b) {
    if (F == FMP_Q4) {
        return pack(fmaf(u2f(bits & 15u), s, b), fmaf(u2f((bits >> 4) & 15u), s, b));
    } else {  // int8: (b ^ 128) - 128, exact; w = q * s as quant.dequantize
        return pack((u2f((bits & 255u) ^ 128u) - 128.f) * s, (u2f(((bits >> 8) & 255u) ^ 128u) - 128.f) * s);
    }
}

// One block per SM (~165 registers): capped at 128 for two blocks per SM, the q4 kernel spilled
// and ran 1.0-1.4x slower on the H200 (h200-p9-kernels.json, variant "auto" then).
template <int F, bool SWIGLU, bool INTA>
__global__ void __launch_bounds__(THREADS, 1) grouped_kernel(const Params p) {
    using QF = Q<F>;
    extern __shared__ __align__(16) uint8_t smem[];
    const int e = blockIdx.z;
    const int off = p.offsets[e], cnt = p.offsets[e + 1] - off;
    const int tok0 = blockIdx.x * BN;  // token tiles vary fastest: the blocks sharing a weight tile run together (L2)
    if (tok0 >= cnt) return;
    const int ntok = min(BN, cnt - tok0);
    const int N = (int)p.N, K = (int)p.K, KT = K / BK, inter = N / 2;
    const uint8_t *part = (const uint8_t *)(uintptr_t)(p.parts[e] + (uint64_t)p.part_off);
    const __half *scales = (const __half *)(part + p.s_off);
    const __half *biases = (const __half *)(part + p.b_off);
    const int64_t qrow = F == FMP_Q4 ? K / 2 : K;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;

    // tile row -> weight row (SWIGLU: 128 gate rows, then the matching 128 up rows); rows past N
    // read row N-1 (valid memory) and are never stored
    auto wrow = [&](int i) -> int {
        const int r = SWIGLU ? (i < BM / 2 ? blockIdx.y * (BM / 2) + i : inter + blockIdx.y * (BM / 2) + i - BM / 2)
                             : blockIdx.y * BM + i;
        return min(r, N - 1);
    };

    // what this thread copies each step: A chunks (16 bytes) and X chunks
    constexpr int A_CH = QF::A_BYTES / 16 / THREADS, CPR = QF::ROW / 16;
    uint32_t a_src[A_CH];  // offsets in the part (its q section is < 2 GiB: checked on the host)
    int a_dst[A_CH];
#pragma unroll
    for (int j = 0; j < A_CH; ++j) {
        const int c = tid + j * THREADS, i = c / CPR, cc = c % CPR;
        a_src[j] = (uint32_t)((int64_t)wrow(i) * qrow + cc * 16);
        a_dst[j] = i * QF::ROW + cc * 16;
    }
    constexpr int X_CH = QF::X_BYTES / 16 / THREADS;
    const uint8_t *x_src[X_CH];
    int x_dst[X_CH];
    bool x_ok[X_CH];
#pragma unroll
    for (int j = 0; j < X_CH; ++j) {
        const int c = tid + j * THREADS, n = c >> 3, cc = c & 7;
        x_ok[j] = n < ntok;
        x_src[j] = (const uint8_t *)(p.x + (int64_t)(off + tok0 + min(n, ntok - 1)) * K) + cc * 16;
        x_dst[j] = QF::A_BYTES + n * 128 + ((cc ^ (n & 7)) << 4);
    }
    auto load = [&](int slot, int kt) {
        uint8_t *st = smem + slot * QF::STAGE;
#pragma unroll
        for (int j = 0; j < A_CH; ++j) cp16(st + a_dst[j], part + a_src[j] + kt * QF::ROW, true);
#pragma unroll
        for (int j = 0; j < X_CH; ++j) cp16(st + x_dst[j], x_src[j] + kt * 128, x_ok[j]);
    };

    // this thread's 4 weight rows (2 m-tiles x rows g, g+8): scales/biases, one step ahead
    uint32_t so_[4];  // element offsets of the rows' scales (and biases)
#pragma unroll
    for (int r = 0; r < 4; ++r) so_[r] = (uint32_t)wrow(warp * 32 + (r >> 1) * 16 + (r & 1) * 8 + g) * (uint32_t)(K / 64);
    __half s_next[4], b_next[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        s_next[r] = scales[so_[r]];
        b_next[r] = F == FMP_Q4 ? biases[so_[r]] : __half(0.f);
    }

    float acc[2][8][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[m][n][v] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load(s, s);
        cp_commit();
    }

    // INTA: each token's sum of x over a 64-group (fp32), a 2-slot ring behind the stages
    float *sxs = (float *)(smem + QF::STAGE_ALL);
    auto xsum = [&](int stage_slot, int dst) {
        const uint8_t *sx = smem + stage_slot * QF::STAGE + QF::A_BYTES;
        const int n = tid >> 2, q = tid & 3;
        float v = 0.f;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const uint4 u = *(const uint4 *)(sx + n * 128 + (((2 * q + c) ^ (n & 7)) << 4));
            const __nv_bfloat162 *h2 = (const __nv_bfloat162 *)&u;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __bfloat1622float2(h2[j]);
                v += f.x + f.y;
            }
        }
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (q == 0) sxs[dst * BN + n] = v;
    };
    if (INTA) {
        cp_wait<STAGES - 2>();
        __syncthreads();
        xsum(0, 0);
    }

    for (int kt = 0; kt < KT; ++kt) {
        float sc[4], bi[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            sc[r] = __half2float(s_next[r]);
            bi[r] = __half2float(b_next[r]);
            // INTA computes (128 + q) . x: w.x = s (128 + q).x + (b - 128 s) sum(x)
            if (INTA) bi[r] = fmaf(-128.f, sc[r], bi[r]);
        }
        if (kt + 1 < KT) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                s_next[r] = scales[so_[r] + kt + 1];
                if (F == FMP_Q4) b_next[r] = biases[so_[r] + kt + 1];
            }
        }
        if (INTA)
            cp_wait<STAGES - 3>();  // this step's and the next one's tiles (the next one's sums)
        else
            cp_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load(nk % STAGES, nk);
            cp_commit();
        }
        if (INTA && kt + 1 < KT) xsum((kt + 1) % STAGES, (kt + 1) & 1);
        const uint8_t *st = smem + (kt % STAGES) * QF::STAGE;
        const uint8_t *sx = st + QF::A_BYTES;
        // packed bytes of this thread's rows: [m-tile][row g / g+8]
        unsigned araw[2][2][F == FMP_Q4 ? 2 : 4];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint8_t *src = st + (warp * 32 + m * 16 + h * 8 + g) * QF::ROW;
                if (F == FMP_Q4) {
                    const uint2 v = *(const uint2 *)(src + 8 * t);
                    araw[m][h][0] = v.x;
                    araw[m][h][1] = v.y;
                } else {
                    const uint4 v = *(const uint4 *)(src + 16 * t);
                    araw[m][h][0] = v.x;
                    araw[m][h][1] = v.y;
                    araw[m][h][2] = v.z;
                    araw[m][h][3] = v.w;
                }
            }
        if constexpr (INTA) {
            // bf16 (128 + q) pairs straight from the nibbles: (word >> 4i) & 0x000F000F holds
            // elements i and i+4 of the word; step s takes i = 2(s&1) and 2(s&1)+1 of word s>>1,
            // x is stored with each 8 elements in the order 0,4,1,5,2,6,3,7 to match
            unsigned af[2][4][4];
#pragma unroll
            for (int m = 0; m < 2; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int s = 0; s < 4; ++s) {
                        const unsigned w = araw[m][h][s >> 1];
                        const int i0 = 2 * (s & 1);
                        af[m][s][h] = ((w >> (4 * i0)) & 0x000F000Fu) | 0x43004300u;
                        af[m][s][2 + h] = ((w >> (4 * i0 + 4)) & 0x000F000Fu) | 0x43004300u;
                    }
            const float *xs = sxs + (kt & 1) * BN;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                if (n * 8 >= ntok) break;
                const uint8_t *row = sx + (n * 8 + g) * 128;
                const uint4 b0 = *(const uint4 *)(row + (((2 * t) ^ g) << 4));
                const uint4 b1 = *(const uint4 *)(row + (((2 * t + 1) ^ g) << 4));
                const float2 xv = *(const float2 *)(xs + n * 8 + 2 * t);
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    float tmp[4] = {0.f, 0.f, 0.f, 0.f};
                    mma(tmp, af[m][0], b0.x, b0.y);
                    mma(tmp, af[m][1], b0.z, b0.w);
                    mma(tmp, af[m][2], b1.x, b1.y);
                    mma(tmp, af[m][3], b1.z, b1.w);
                    float *c = acc[m][n];
                    c[0] = fmaf(sc[2 * m], tmp[0], fmaf(bi[2 * m], xv.x, c[0]));
                    c[1] = fmaf(sc[2 * m], tmp[1], fmaf(bi[2 * m], xv.y, c[1]));
                    c[2] = fmaf(sc[2 * m + 1], tmp[2], fmaf(bi[2 * m + 1], xv.x, c[2]));
                    c[3] = fmaf(sc[2 * m + 1], tmp[3], fmaf(bi[2 * m + 1], xv.y, c[3]));
                }
            }
        } else {
#pragma unroll
        for (int sp2 = 0; sp2 < 2; ++sp2) {
            uint4 braw[8];
#pragma unroll
            for (int n = 0; n < 8; ++n)  // token n*8 + g: (n*8 + g) & 7 == g
                if (n * 8 < ntok) braw[n] = *(const uint4 *)(sx + (n * 8 + g) * 128 + (((2 * t + sp2) ^ g) << 4));
#pragma unroll
            for (int ss = 0; ss < 2; ++ss) {
                const int s = 2 * sp2 + ss;
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    unsigned a[4];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = m * 2 + h;
                        unsigned lo, hi;  // the bits of logical columns (2t, 2t+1) and (2t+8, 2t+9)
                        if (F == FMP_Q4) {
                            const unsigned w = araw[m][h][s >> 1] >> (16 * (s & 1));
                            lo = w & 255u;
                            hi = (w >> 8) & 255u;
                        } else {
                            const unsigned w = araw[m][h][s];
                            lo = w & 0xFFFFu;
                            hi = w >> 16;
                        }
                        a[h] = pair<F>(lo, sc[r], bi[r]);
                        a[2 + h] = pair<F>(hi, sc[r], bi[r]);
                    }
#pragma unroll
                    for (int n = 0; n < 8; ++n) {
                        if (n * 8 >= ntok) break;
                        const unsigned b0 = ss ? braw[n].z : braw[n].x, b1 = ss ? braw[n].w : braw[n].y;
                        mma(acc[m][n], a, b0, b1);
                    }
                }
            }
        }
        }
    }
    cp_wait<0>();
    __syncthreads();

    // epilogue: the tile to shared memory as bf16 [token][row], then coalesced 16-byte stores
    __nv_bfloat16 *so = (__nv_bfloat16 *)smem;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const int i = warp * 32 + m * 16 + g, tk = n * 8 + 2 * t;
            so[tk * SO + i] = __float2bfloat16_rn(acc[m][n][0]);
            so[(tk + 1) * SO + i] = __float2bfloat16_rn(acc[m][n][1]);
            so[tk * SO + i + 8] = __float2bfloat16_rn(acc[m][n][2]);
            so[(tk + 1) * SO + i + 8] = __float2bfloat16_rn(acc[m][n][3]);
        }
    __syncthreads();
    if (SWIGLU) {
        // 64 tokens x 128 outputs = 1024 chunks of 8
        const int col0 = blockIdx.y * (BM / 2);
#pragma unroll
        for (int j = 0; j < 1024 / THREADS; ++j) {
            const int c = tid + j * THREADS, n = c >> 4, cc = c & 15;
            if (n >= ntok) continue;
            const uint4 gv = *(const uint4 *)(so + n * SO + cc * 8);
            const uint4 uv = *(const uint4 *)(so + n * SO + BM / 2 + cc * 8);
            const __nv_bfloat16 *gh = (const __nv_bfloat16 *)&gv, *uh = (const __nv_bfloat16 *)&uv;
            float r8[8];
#pragma unroll
            for (int v = 0; v < 8; ++v) {
                const float gf = __bfloat162float(gh[v]);
                const float act = __bfloat162float(__float2bfloat16_rn(gf / (1.f + expf(-gf))));
                r8[v] = act * __bfloat162float(uh[v]);
            }
            unsigned o[4];
#pragma unroll
            for (int v = 0; v < 4; ++v)  // INTA: written in the order the next (INTA) product reads
                o[v] = INTA ? pack(r8[v], r8[v + 4]) : pack(r8[2 * v], r8[2 * v + 1]);
            *(uint4 *)(p.y + (int64_t)(off + tok0 + n) * inter + col0 + cc * 8) = make_uint4(o[0], o[1], o[2], o[3]);
        }
    } else {
        const int row0 = blockIdx.y * BM;
#pragma unroll
        for (int j = 0; j < BN * BM / 8 / THREADS; ++j) {
            const int c = tid + j * THREADS, n = c >> 5, cc = c & 31;
            if (n >= ntok || row0 + cc * 8 >= N) continue;
            *(uint4 *)(p.y + (int64_t)(off + tok0 + n) * N + row0 + cc * 8) = *(const uint4 *)(so + n * SO + cc * 8);
        }
    }
}

typedef void (*Kern)(const Params);

template <int F, bool SW, bool IA>
int launch(const Params &p, int64_t max_count, int E, int device, cudaStream_t st) {
    Kern k = grouped_kernel<F, SW, IA>;
    const int smem = Q<F>::SMEM > BN * SO * 2 ? Q<F>::SMEM : BN * SO * 2;
    int optin = 0;
    cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return (int)err;
    if (smem > optin) return -2;
    err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return (int)err;
    const int64_t rows = SW ? p.N / 2 : p.N, per = SW ? BM / 2 : BM;
    dim3 grid((unsigned)((max_count + BN - 1) / BN), (unsigned)((rows + per - 1) / per), (unsigned)E);
    k<<<grid, THREADS, smem, st>>>(p);
    err = cudaGetLastError();
    return err == cudaSuccess ? 0 : (int)err;
}

}  // namespace

extern "C" int fmp_grouped_gemm(int fmt, const uint64_t *parts, int64_t part_off, int64_t s_off, int64_t b_off,
                                int64_t N, int64_t K, int swiglu, int variant, const int32_t *offsets, int E,
                                int64_t max_count, const void *x, void *y, int device, void *stream) {
    if ((fmt != FMP_Q4 && fmt != FMP_Q8) || (variant != FMP_AUTO && variant != FMP_DEQUANT) || !parts || !offsets || !x || !y || E <= 0 || N <= 0 || K <= 0)
        return -1;
    if (K % 64 || N % 64 || (swiglu && (N / 2) % (BM / 2)) || ((uintptr_t)x | (uintptr_t)y) % 16) return -1;
    if (((part_off | s_off | b_off) % 16) || N > (1 << 30) || K > (1 << 30)) return -1;
    if (N * (fmt == FMP_Q4 ? K / 2 : K) >= ((int64_t)1 << 31)) return -1;  // 32-bit offsets in the kernel
    if (max_count <= 0) return 0;
    if (max_count > (int64_t)INT32_MAX || N > (int64_t)65535 * (BM / 2)) return -1;  // grid.x, grid.y
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return (int)err;
    Params p{parts, part_off, s_off, b_off, N, K, offsets, (const __nv_bfloat16 *)x, (__nv_bfloat16 *)y};
    cudaStream_t st = (cudaStream_t)stream;
    if (fmt == FMP_Q4 && variant == FMP_AUTO)
        return swiglu ? launch<FMP_Q4, true, true>(p, max_count, E, device, st)
                      : launch<FMP_Q4, false, true>(p, max_count, E, device, st);
    if (fmt == FMP_Q4)
        return swiglu ? launch<FMP_Q4, true, false>(p, max_count, E, device, st)
                      : launch<FMP_Q4, false, false>(p, max_count, E, device, st);
    return swiglu ? launch<FMP_Q8, true, false>(p, max_count, E, device, st)
                  : launch<FMP_Q8, false, false>(p, max_count, E, device, st);
}

extern "C" int fmp_device_count(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
