// flashmoe CUDA kernels (see fm_cuda.h for the contract and the arithmetic).
//
// One kernel template does all the quantized matrix work: moe_kernel<FMT, LIMBS, NT, BULK>.
//   phase A: for each (expert e, intermediate row i): gate row i and up row I+i of w13_e against
//            x (NT tokens), h[e][t][i] = silu(gate) * up  -> fp32 workspace
//   phase B: for each pair of output rows (r, r+1): the dot product over the concatenation of
//            all k experts' w2_e rows against the images of h_e (each scaled by the expert's
//            routing weight), i.e. sum_e w_e * w2_e[r] · h_e  -> out
// A decode step runs both phases in one cooperative launch with a grid barrier between them
// (blocks prefetch their phase-B weights into L2 before waiting at the barrier), or as two
// launches. The plain GEMV (fmc_linear) is phase B alone with one "expert" and x as its input.
//
// Work split: a persistent grid; each block takes a contiguous range of items, its 8 warps take
// the block's items round-robin; an item is two weight rows, streamed by the warp through a
// cp.async ring in shared memory (coalesced 16-byte copies: lane l takes chunks l, l+32, ...), or, in
// the one-token decode on long rows (BULK = 1, FMC_TUNE_BULK), through 2 stages of Hopper bulk copies
// of 128 chunks (the same chunks reach each lane in the same order: bit-identical results).
//
// x in shared memory: per image (one token's input vector, K values) K int16 values per limb,
// arranged so that lane l's 16-byte weight chunk meets its x values as 16-byte pieces at
// consecutive addresses across lanes (no bank conflicts), in the order dp2a wants them:
//   q8  chunk = 16 int8  : piece m = x[8m .. 8m+7]
//   q4  chunk = 32 nibbles: piece m (word m) = x[8m + {0,2,4,6,1,3,5,7}]
//   q2  chunk = 64 crumbs : piece 2j+h (word j) = x[16j + 4*p + k], slot 4*(k&1)+p, k in {2h, 2h+1}
// plus per chunk a float2 {xs * w, sum(x over the chunk) * w}.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

#include "fm_cuda.h"
#include "fm_device.cuh"
#include "fm_quant.cuh"
#include "fm_bulk.cuh"

#define FMC_VERSION_NUMBER 1

namespace {

constexpr int WARPS = 16;
constexpr int THREADS = WARPS * 32;
constexpr int HDR_BYTES = 512;            // record pointers (32 x 8) + expert weights (32 x 4)
// Default phase-B L2 prefetch window per block (bytes; fmc_tune(FMC_TUNE_PREFETCH) changes it).
// Off: on the H200 it cost 1-2 us per call (q4 14336x4096 GEMV 13.0 us without, 14.6 with
// 64 KiB; the Qwen3.5 layer 16.1 against 16.7 us), the cp.async rings already keep HBM busy.
constexpr int64_t DEFAULT_PREFETCH = 0;
// Default of FMC_TUNE_BULK (the one-token MoE's weight ring in bulk copies where shapes allow).
#ifndef FMC_BULK_DEFAULT
#define FMC_BULK_DEFAULT 1
#endif
constexpr int64_t DEFAULT_BULK = FMC_BULK_DEFAULT;

struct Params {
    const uint8_t *rec[FMC_MAX_K];
    float wv[FMC_MAX_K];
    const uint64_t *rec_dev;
    const void *w_dev;
    int w_dtype, has_w;                 // has_w: 0 all ones, 1 wv (host values), 2 w_dev
    int k, H, I;                        // phase A: rows 2I, K = H; phase B: rows H, K = I
    int64_t a_q, a_s, a_b, b_q, b_s, b_b;  // section offsets from a record's base
    const void *x;
    int x_dtype, t0, nt;
    float *h;
    unsigned *bar;
    void *out;
    int out_dtype, phase, b_from_x, accumulate;
    int64_t pf_ahead;                   // L2 prefetch window per block, bytes (0: off)
    int pd;                             // stages per warp's ring (see launch_shape)
    int pdl;                            // launched with programmatic dependent launch (see pdl_wait)
    int trig;                           // cooperative launch: let the next (PDL) launch start at phase B
};

__device__ __forceinline__ float load_elem(const void *p, int dtype, size_t i) {
    if (dtype == FMC_F32) return ((const float *)p)[i];
    if (dtype == FMC_BF16) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return __half2float(((const __half *)p)[i]);
}

// Two consecutive elements (i even), from x (read-only path) or from the h workspace (L2 only:
// written by other blocks in the same launch).
__device__ __forceinline__ void load2(const void *p, int dtype, size_t i, bool l2only, float &a, float &b) {
    if (dtype == FMC_F32) {
        const float2 *q = (const float2 *)((const float *)p + i);
        float2 v = l2only ? __ldcg(q) : __ldg(q);
        a = v.x; b = v.y;
    } else if (dtype == FMC_BF16) {
        __nv_bfloat162 v = __ldg((const __nv_bfloat162 *)((const __nv_bfloat16 *)p + i));
        a = __low2float(v); b = __high2float(v);
    } else {
        __half2 v = __ldg((const __half2 *)((const __half *)p + i));
        a = __low2float(v); b = __high2float(v);
    }
}

__device__ __forceinline__ void store_elem(void *p, int dtype, size_t i, float v) {
    if (dtype == FMC_F32) ((float *)p)[i] = v;
    else if (dtype == FMC_BF16) ((__nv_bfloat16 *)p)[i] = __float2bfloat16(v);
    else ((__half *)p)[i] = __float2half(v);
}

// ---------------------------------------------------------------- L2 prefetch (sm_90 bulk)
__device__ __forceinline__ void l2_prefetch(const void *p, size_t n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Sections are 64-byte aligned and padded inside 16-byte aligned records, so rounding the
    // range out to 16 bytes stays inside the section.
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)15;
    const uintptr_t e = ((uintptr_t)p + n + 15) & ~(uintptr_t)15;
    while (a < e) {
        const uint32_t sz = (uint32_t)((e - a) > (1u << 20) ? (1u << 20) : (e - a));
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"(sz) : "memory");
        a += sz;
    }
#else
    (void)p; (void)n;
#endif
}

// Rows [r0, r1) of one part: packed weights, scales, biases.
template <int F>
__device__ __forceinline__ void prefetch_rows(const uint8_t *rb, int64_t q_off, int64_t s_off, int64_t b_off,
                                              int64_t r0, int64_t r1, int nch, int ngroups) {
    if (r1 <= r0) return;
    l2_prefetch(rb + q_off + r0 * nch * 16, (size_t)(r1 - r0) * nch * 16);
    l2_prefetch(rb + s_off + r0 * ngroups * 2, (size_t)(r1 - r0) * ngroups * 2);
    if (Fmt<F>::BIAS) l2_prefetch(rb + b_off + r0 * ngroups * 2, (size_t)(r1 - r0) * ngroups * 2);
}

// Bytes of one item's weights: 2 rows (x nseg experts) of packed weights + scales (+ biases).
template <int F>
__device__ __forceinline__ int64_t row_bytes(int nch, int ngroups) {
    return (int64_t)nch * 16 + (int64_t)ngroups * 2 * (Fmt<F>::BIAS ? 2 : 1);
}

// Phase B items [a, b): rows 2a .. 2b-1 of every expert's w2.
template <int F>
__device__ void prefetch_items_b(const Params &p, const uint8_t *const *srec, int nseg, int64_t a, int64_t b, int nch,
                                 int ngroups) {
    if (b <= a) return;
    const int64_t r0 = 2 * a, r1 = 2 * b < p.H ? 2 * b : p.H;
    for (int e = 0; e < nseg; ++e) prefetch_rows<F>(srec[e], p.b_q, p.b_s, p.b_b, r0, r1, nch, ngroups);
}

// ---------------------------------------------------------------- grid barrier (cooperative launch only)
// One atomic per block on one counter (bar[0]), as cooperative groups' grid sync does: block 0 adds
// 2^31 - (grid - 1), the others 1, so the counter's top bit flips exactly when the last block
// arrives and its low bits are back where they were (0: the workspace is zeroed at birth), whatever
// the grid of the launches before. A waiting block polls for the flip; the last to arrive does no
// more round trips (a count-and-generation barrier resets the count and bumps the generation behind
// a fence: two more). Split in arrive and wait so that a block may issue work that does not depend
// on the others between the two.
__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every thread of the block has written what other blocks read after the barrier (__syncthreads,
// then thread 0's fence); thread 0 arrives and returns the counter before its arrival.
__device__ __forceinline__ unsigned grid_arrive(unsigned *bar) {
    __syncthreads();
    unsigned old = 0;
    if (threadIdx.x == 0) {
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        old = atomicAdd(bar, add);
    }
    return old;
}

__device__ __forceinline__ void grid_wait(const unsigned *bar, unsigned old) {
    if (threadIdx.x == 0)
        while (((ld_acquire(bar) ^ old) & 0x80000000u) == 0) __nanosleep(32);
    __syncthreads();
}

__device__ void grid_barrier(unsigned *bar) { grid_wait(bar, grid_arrive(bar)); }

// ---------------------------------------------------------------- dot products: dot2 (fm_quant.cuh)

// Position (piece, slot) of element i (0 <= i < EPC) of a chunk in its x image.
template <int F> __device__ __forceinline__ void slot_of(int i, int &m, int &s);
template <> __device__ __forceinline__ void slot_of<0>(int i, int &m, int &s) { m = i >> 3; s = i & 7; }
template <> __device__ __forceinline__ void slot_of<1>(int i, int &m, int &s) {
    m = i >> 3;
    const int r = i & 7;
    s = (r & 1) ? 4 + (r >> 1) : (r >> 1);
}
template <> __device__ __forceinline__ void slot_of<2>(int i, int &m, int &s) {
    const int j = i >> 4, r = i & 15, p = r >> 2, k = r & 3;
    m = 2 * j + (k >> 1);
    s = 4 * (k & 1) + p;
}

// Build nimg x images of K values in shared memory. Image j: token t = j % NT of
// from_x ? x row (t0 + j) : h row j (workspace [k][NT][K]), scaled by weight swt[j / NT] (h only).
// Images of tokens t >= nt are zero. A lane takes 8 consecutive values (one 16-byte piece of
// the image for q8/q4); the 8 lanes of a group of 64 reduce its maximum and chunk sums with
// shuffles. Q tasks per lane (2; 4 for the one-token decode's h) are loaded before any is processed.
__device__ __forceinline__ void load8(const void *src, int dtype, size_t i, bool l2only, float (&v)[8]) {
    if (dtype == FMC_F32) {
        const float4 *q = (const float4 *)((const float *)src + i);
        const float4 a = l2only ? __ldcg(q) : __ldg(q), b = l2only ? __ldcg(q + 1) : __ldg(q + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        const uint4 u = __ldg((const uint4 *)((const uint16_t *)src + i));
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (dtype == FMC_BF16) {
                v[2 * q] = __uint_as_float(w[q] << 16);
                v[2 * q + 1] = __uint_as_float(w[q] & 0xFFFF0000u);
            } else {
                v[2 * q] = __half2float(__ushort_as_half((unsigned short)(w[q] & 0xFFFFu)));
                v[2 * q + 1] = __half2float(__ushort_as_half((unsigned short)(w[q] >> 16)));
            }
        }
    }
}

template <int F, int LIMBS>
__device__ __forceinline__ void prep_task(bool valid, int j, int e8, const float (&v)[8], float wt, int nch,
                                          int4 *xdata, float2 *meta, int lane) {
    // The whole warp executes this (shuffles); `valid` guards the stores. Lanes 8g..8g+7 hold one
    // group of 64 values (tasks are aligned to groups).
    constexpr int EPC = Fmt<F>::EPC, P = Fmt<F>::P, TPC = EPC / 8;  // tasks per chunk
    float m = 0.f, sum = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        m = fmaxf(m, fabsf(v[q]));
        sum += v[q];
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
#pragma unroll
    for (int o = 1; o < TPC; o <<= 1) sum += __shfl_xor_sync(FULL, sum, o);
    bool bad = false;
#pragma unroll
    for (int q = 0; q < 8; ++q) bad |= !isfinite(v[q]);
    const unsigned ballot = __ballot_sync(FULL, bad);
    float xs = m * (1.f / 32767.f);
    const float inv = m > 0.f ? __fdividef(32767.f, m) : 0.f;
    if ((ballot >> (lane & ~7)) & 0xFFu) xs = __int_as_float(0x7fc00000);  // NaN/inf in x -> NaN out
    if (!valid) return;
    int h[8], l[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        h[q] = clamp16(__float2int_rn(v[q] * inv));
        if (LIMBS == 2) l[q] = clamp16(__float2int_rn(fmaf(-(float)h[q], xs, v[q]) * inv * 65536.f));
    }
    const int c = e8 / TPC, sub = e8 - c * TPC;  // chunk, and which 8 values of it
    const size_t img_int4 = (size_t)LIMBS * P * nch;
    int4 *img = xdata + (size_t)j * img_int4;
#pragma unroll
    for (int L = 0; L < LIMBS; ++L) {
        const int(&z)[8] = L ? l : h;
        if (F == 0) {  // piece sub: natural order
            img[(size_t)(L * P + sub) * nch + c] =
                make_int4(pack16(z[0], z[1]), pack16(z[2], z[3]), pack16(z[4], z[5]), pack16(z[6], z[7]));
        } else if (F == 1) {  // piece sub: [0,2,4,6,1,3,5,7]
            img[(size_t)(L * P + sub) * nch + c] =
                make_int4(pack16(z[0], z[2]), pack16(z[4], z[6]), pack16(z[1], z[3]), pack16(z[5], z[7]));
        } else {  // q2: values 8*sub + r -> word sub/2, byte b = 2*(sub&1) + r/4, k = r%4
            short *si = (short *)img;
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int jw = sub >> 1, bb = 2 * (sub & 1) + (r >> 2), k = r & 3;
                const int pm = 2 * jw + (k >> 1), sl = 4 * (k & 1) + bb;
                si[((size_t)(L * P + pm) * nch + c) * 8 + sl] = (short)z[r];
            }
        }
    }
    if (sub == 0) meta[(size_t)j * nch + c] = make_float2(xs * wt, sum * wt);
}

template <int F, int LIMBS, int Q = 2>
__device__ void prep_images(int nimg, int NT, int nt, int K, const void *src, int src_dtype, bool from_x, int t0,
                            const float *swt, int4 *xdata, float2 *meta, int warp, int lane) {
    const int nch = K / Fmt<F>::EPC, per_img = K / 8, total = nimg * per_img;
    for (int base = warp * 32; base < total; base += Q * WARPS * 32) {
        float v[Q][8];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const int task = base + q * WARPS * 32 + lane;
#pragma unroll
            for (int r = 0; r < 8; ++r) v[q][r] = 0.f;
            if (task < total) {
                const int j = task / per_img, e8 = task - j * per_img;
                if (j % NT < nt) {
                    const size_t row = from_x ? (size_t)(t0 + j) : (size_t)j;
                    load8(src, src_dtype, row * K + 8 * (size_t)e8, !from_x, v[q]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const int b = base + q * WARPS * 32;
            if (b < total) {  // warp-uniform
                const int task = b + lane;
                const bool valid = task < total;
                const int j = valid ? task / per_img : 0, e8 = valid ? task - j * per_img : 0;
                prep_task<F, LIMBS>(valid, j, e8, v[q], (from_x || !valid) ? 1.f : swt[j / NT], nch, xdata, meta,
                                    lane);
            }
        }
    }
}

__device__ __forceinline__ size_t image_int4(int F, int LIMBS, int K) {
    const int EPC = F == 0 ? 16 : (F == 1 ? 32 : 64);
    return (size_t)LIMBS * (EPC / 8) * (K / EPC);
}

__device__ __forceinline__ void block_range(int64_t nitems, int64_t &ib, int64_t &ie) {
    ib = nitems * blockIdx.x / gridDim.x;
    ie = nitems * (blockIdx.x + 1) / gridDim.x;
}

// Phase B's first L2 prefetch window (thread 0, before the grid barrier).
template <int F>
__device__ void prefetch_b_first(const Params &p, const uint8_t *const *srec) {
    constexpr int EPC = Fmt<F>::EPC;
    const int K = p.I, nch = K / EPC, ngroups = K / 64;
    const int nseg = p.b_from_x ? 1 : p.k;
    int64_t ib, ie;
    block_range((int64_t)(p.H + 1) / 2, ib, ie);
    const int64_t ahead = p.pf_ahead / (2 * nseg * row_bytes<F>(nch, ngroups));
    const int64_t end = ib + ahead < ie ? ib + ahead : ie;
    if (ahead > 0) prefetch_items_b<F>(p, srec, nseg, ib, end, nch, ngroups);
}

// ---------------------------------------------------------------- the weight stream (cp.async rings)
// Each warp streams its items' weights through a private ring of pd stages in shared memory
// with cp.async (16-byte copies of the packed weights, 4-byte copies of the words holding the
// scales/biases): pd-1 stages are in flight while the warp computes one, so memory latency is
// hidden without holding the loads in registers. The first stages are issued before the
// prologue that builds the x images (and, in the cooperative decode, phase B's before the grid
// barrier), so the weight loads overlap it. A lane only reads back what it copied itself, so
// cp.async.wait_group is the only synchronisation the ring needs.
// An item is two rows (phase A: gate row i and up row I+i of one expert; phase B: rows r, r+1
// of every expert's w2, concatenated); lane l takes chunks l, l+32, ... of the item, PU per stage.
// The ring depth pd is chosen per launch (launch_shape on the host): 4 stages where a launch
// leaves one block (16 warps) per SM, whose 2 copies in flight per warp do not cover the memory
// latency, else 3 (measured on the H200: at 32 warps per SM deeper rings were slower).
constexpr int PD = 3;                      // the shallowest ring (sizes the expert grouping)
constexpr int PU = 1;                      // chunks per lane per row per stage
constexpr int USLOT = 1536;                // per u: 2 rows x 32 lanes x 16 B + 4 words x 32 lanes x 4 B
constexpr int STAGE_BYTES = PU * USLOT;
__host__ __device__ constexpr int ring_bytes(int pd) { return WARPS * pd * STAGE_BYTES; }
constexpr int RING_BYTES = ring_bytes(PD);
// The bulk ring (BULK = 1, FMC_TUNE_BULK; only where rows are whole multiples of 32 chunks): a stage
// is BW = 128 chunks of the item (2 KB of each row where the item is one segment), 2 stages per warp
// (one in flight while the warp computes the other). Its bulk copies are issued by up to 6 x BU lanes:
// lane = kind * BU + run, kind 0/1 the two rows' packed weights, 2/3 their scales, 4/5 their biases,
// run the piece of the stage in one segment (a stage may cross from one expert's w2 rows into the
// next's; runs are whole multiples of 32 chunks, so every copy is 16-byte aligned). Slot: row 0's
// chunks at 16 p (p the chunk's place in the stage), row 1's at 16 (BW + p), then the rows' fp16
// scales and biases by group (p / CPG), then the stage's mbarrier in the slot's last 8 bytes.
// Measured in the stream's microbenchmark (stream_ceiling.cu): per warp 512-byte bulk copies (one
// ring stage) streamed far below the cp.async ring (2.6 against 3.8 TB/s), 2 KB ones above it.
constexpr int BU = 4, BW = 32 * BU, BPD = 2;
__host__ __device__ constexpr int bulk_sbytes(int cpg, int bias) { return 2 * BW / cpg * (bias ? 4 : 2); }
__host__ __device__ constexpr int bulk_slot(int cpg, int bias) { return (32 * BW + bulk_sbytes(cpg, bias) + 8 + 127) / 128 * 128; }
__host__ __device__ constexpr int bulk_ring_bytes(int cpg, int bias) { return WARPS * BPD * bulk_slot(cpg, bias); }

__device__ __forceinline__ void cp16(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp4(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
// All but the newest pd-2 groups complete (the stage to compute has landed); pd is 3, 4 or 6
// (anything else waits for all: slower, still right).
__device__ __forceinline__ void cp_wait_ring(int pd) {
    if (pd == 3) cp_wait<2>();
    else if (pd == 4) cp_wait<3>();
    else if (pd == 6) cp_wait<5>();
    else cp_wait<0>();
}

__device__ __forceinline__ float half_of(unsigned w, unsigned odd) {
    return __half2float(__ushort_as_half((unsigned short)(odd ? (w >> 16) : (w & 0xFFFFu))));
}

// Which rows an item covers; advanced item by item without divisions.
struct ItemCursor {
    int it;          // item index (phase B: row pair it; phase A: e * I + i)
    int e, i;        // phase A: expert and intermediate row
    __device__ __forceinline__ void init(bool pa, int item, int I) {
        it = item;
        if (pa) {
            e = item / I;
            i = item - e * I;
        }
    }
    __device__ __forceinline__ void next(bool pa, int I) {
        it += WARPS;
        if (pa) {
            i += WARPS;
            if (i >= I) { i -= I; ++e; }
        }
    }
    __device__ __forceinline__ void rows(bool pa, int I, int N, unsigned &r0, unsigned &r1, int &seg0) const {
        if (pa) {
            r0 = (unsigned)i;
            r1 = (unsigned)(I + i);
            seg0 = e;
        } else {
            r0 = 2u * (unsigned)it;
            r1 = (int)r0 + 1 < N ? r0 + 1 : r0;
            seg0 = 0;
        }
    }
};

template <int F, int LIMBS, int NT, int BULK>
struct Pipe {
    static constexpr int SLOT = BULK ? bulk_slot(Fmt<F>::CPG, Fmt<F>::BIAS) : STAGE_BYTES;
    static constexpr int W = BULK ? BW : 32 * PU;  // chunks per stage
    static constexpr int MBAR = SLOT - 8;
    const Params &p;
    const uint8_t *const *srec;
    bool pa;                    // phase A (w13 row pairs) or B (w2 row pairs over all experts)
    int nch, ngroups, nseg, total, img_stride, warp, lane, nj, spi, pd;
    float inv_nch;
    int64_t q_off, s_off, b_off;
    unsigned qrow;
    unsigned char *ring;
    uint32_t ring_s;
    ItemCursor ic;              // issue cursor
    int i_base, i_st, i_left;
    unsigned ph;                // bulk: the parity each stage's mbarrier completes next (bit per stage)

    __device__ Pipe(const Params &p_, const uint8_t *const *srec_, bool pa_, int64_t ib, int64_t ie, int K,
                    unsigned char *ring_all, int warp_, int lane_)
        : p(p_), srec(srec_), pa(pa_), warp(warp_), lane(lane_) {
        nch = K / Fmt<F>::EPC;
        ngroups = K / 64;
        nseg = pa ? 1 : (p.b_from_x ? 1 : p.k);
        img_stride = pa ? 0 : (p.b_from_x ? 0 : NT);
        total = nseg * nch;
        inv_nch = 1.f / (float)nch;
        q_off = pa ? p.a_q : p.b_q;
        s_off = pa ? p.a_s : p.b_s;
        b_off = pa ? p.a_b : p.b_b;
        qrow = (unsigned)nch * 16u;
        const int64_t first = ib + warp;
        nj = first < ie ? (int)((ie - first + WARPS - 1) / WARPS) : 0;
        spi = (total + W - 1) / W;
        ic.init(pa, (int)first, p.I);
        i_base = 0;
        i_st = 0;
        i_left = nj * spi;
        pd = p.pd;
        ring = ring_all + (size_t)warp * pd * SLOT;
        ring_s = (uint32_t)__cvta_generic_to_shared(ring);
    }

    __device__ __forceinline__ void split(int f, int &seg, int &c) const {
        seg = (int)((float)f * inv_nch);
        c = f - seg * nch;
        if (c < 0) { --seg; c += nch; }
        else if (c >= nch) { ++seg; c -= nch; }
    }

    // Bulk: one stage (chunks i_base .. i_base + BW of the item) in bulk copies, lane = kind * BU + run;
    // the warp's lanes have all read the slot's last use (__syncwarp) before it is overwritten.
    __device__ __forceinline__ void issue_bulk() {
        if (i_left > 0) {
            using FM = Fmt<F>;
            constexpr int GB = 2 * BW / FM::CPG;  // bytes of one row's scales in a full stage
            const uint32_t st = ring_s + (uint32_t)i_st * SLOT, mb = st + MBAR;
            unsigned r0, r1;
            int seg0;
            ic.rows(pa, p.I, p.H, r0, r1, seg0);
            const int nst = total - i_base < BW ? total - i_base : BW;  // chunks in this stage
            __syncwarp();
            if (lane == 0) mbar_expect(mb, (uint32_t)nst * (32u + (FM::BIAS ? 8u : 4u) / FM::CPG));
            __syncwarp();
            const int kind = lane / BU, run = lane - kind * BU;
            if (kind < (FM::BIAS ? 6 : 4)) {
                int seg = 0, c = i_base;
                if (nseg > 1) split(i_base, seg, c);
                int pos = 0;
                for (int t = 0; t < run && pos < nst; ++t) {
                    pos += nch - c < nst - pos ? nch - c : nst - pos;
                    ++seg;
                    c = 0;
                }
                if (pos < nst) {
                    const int len = nch - c < nst - pos ? nch - c : nst - pos;
                    const uint8_t *rb = srec[seg0 + seg];
                    const unsigned r = (kind & 1) ? r1 : r0;
                    const uint8_t *src;
                    uint32_t dst, n;
                    if (kind < 2) {
                        src = rb + q_off + (size_t)r * qrow + (unsigned)c * 16u;
                        dst = st + (kind * BW + pos) * 16;
                        n = 16u * len;
                    } else {
                        src = rb + (kind < 4 ? s_off : b_off) + 2 * ((size_t)r * ngroups + (unsigned)c / FM::CPG);
                        dst = st + 32 * BW + (kind - 2) * GB + 2 * (pos / FM::CPG);
                        n = 2u * len / FM::CPG;
                    }
                    bulk_copy(dst, src, n, mb);
                }
            }
            i_base += BW;
            if (i_base >= total) {
                i_base = 0;
                ic.next(pa, p.I);
            }
            i_st = i_st + 1 == pd ? 0 : i_st + 1;
            --i_left;
        }
    }

    __device__ __forceinline__ void issue() {
        if (BULK) {
            issue_bulk();
            return;
        }
        if (i_left > 0) {
            const uint32_t st = ring_s + (uint32_t)i_st * STAGE_BYTES;
            unsigned r0, r1;
            int seg0;
            ic.rows(pa, p.I, p.H, r0, r1, seg0);
#pragma unroll
            for (int u = 0; u < PU; ++u) {
                const int f = i_base + 32 * u + lane;
                if (f < total) {
                    int seg = 0, c = f;
                    if (nseg > 1) split(f, seg, c);
                    const uint8_t *rb = srec[seg0 + seg];
                    const uint8_t *q = rb + q_off + (unsigned)c * 16u;
                    const uint32_t d = st + u * USLOT + lane * 16;
                    cp16(d, q + (size_t)r0 * qrow);
                    cp16(d + 512, q + (size_t)r1 * qrow);
                    const unsigned g = (unsigned)c / Fmt<F>::CPG;
                    const uintptr_t sp = (uintptr_t)(rb + s_off) + 2 * (size_t)g;
                    const uint32_t ds = st + u * USLOT + 1024 + lane * 4;
                    cp4(ds, (const void *)((sp + 2 * ((size_t)r0 * ngroups)) & ~(uintptr_t)3));
                    cp4(ds + 128, (const void *)((sp + 2 * ((size_t)r1 * ngroups)) & ~(uintptr_t)3));
                    if (Fmt<F>::BIAS) {
                        const uintptr_t bp = (uintptr_t)(rb + b_off) + 2 * (size_t)g;
                        cp4(ds + 256, (const void *)((bp + 2 * ((size_t)r0 * ngroups)) & ~(uintptr_t)3));
                        cp4(ds + 384, (const void *)((bp + 2 * ((size_t)r1 * ngroups)) & ~(uintptr_t)3));
                    }
                }
            }
            i_base += 32 * PU;
            if (i_base >= total) {
                i_base = 0;
                ic.next(pa, p.I);
            }
            i_st = i_st + 1 == pd ? 0 : i_st + 1;
            --i_left;
        }
        cp_commit();
    }

    // One stage of the item with rows r0/r1: chunks base + 32u + lane (u < W / 32), in that order
    // for both rings, so that each lane accumulates its chunks in the same order.
    __device__ __forceinline__ void compute(int base, int st_idx, unsigned r0, unsigned r1, const int4 *xdata,
                                            const float2 *meta, float (&acc)[2][NT]) const {
        using FM = Fmt<F>;
        constexpr int P = FM::P, GB = 2 * BW / FM::CPG;
        const unsigned char *st = ring + st_idx * SLOT;
        const size_t img_int4 = (size_t)LIMBS * P * nch;
#pragma unroll
        for (int u = 0; u < W / 32; ++u) {
            const int f = base + 32 * u + lane;
            if (f < total) {
                int seg = 0, c = f;
                if (nseg > 1) split(f, seg, c);
                uint4 w0, w1;
                float sc0, sc1, bi0 = 0.f, bi1 = 0.f;
                if (BULK) {
                    const int pos = 32 * u + lane;
                    w0 = *(const uint4 *)(st + pos * 16);
                    w1 = *(const uint4 *)(st + (BW + pos) * 16);
                    const __half *sh = (const __half *)(st + 32 * BW) + pos / FM::CPG;
                    sc0 = __half2float(sh[0]);
                    sc1 = __half2float(sh[GB / 2]);
                    if (FM::BIAS) {
                        bi0 = __half2float(sh[GB]);
                        bi1 = __half2float(sh[3 * GB / 2]);
                    }
                } else {
                    const unsigned char *d = st + u * USLOT;
                    w0 = *(const uint4 *)(d + lane * 16);
                    w1 = *(const uint4 *)(d + 512 + lane * 16);
                    const unsigned g = (unsigned)c / FM::CPG;
                    const unsigned odd0 = (r0 * (unsigned)ngroups + g) & 1u, odd1 = (r1 * (unsigned)ngroups + g) & 1u;
                    sc0 = half_of(*(const unsigned *)(d + 1024 + lane * 4), odd0);
                    sc1 = half_of(*(const unsigned *)(d + 1152 + lane * 4), odd1);
                    if (FM::BIAS) {
                        bi0 = half_of(*(const unsigned *)(d + 1280 + lane * 4), odd0);
                        bi1 = half_of(*(const unsigned *)(d + 1408 + lane * 4), odd1);
                    }
                }
                int V0[2 * P], V1[2 * P];
                unpack<F>(w0, V0);
                unpack<F>(w1, V1);
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int j = seg * img_stride + t;
                    const int4 *xp = xdata + (size_t)j * img_int4 + c;
                    int d0 = 0, d1 = 0;
                    dot2<F>(V0, V1, xp, nch, d0, d1);
                    float f0 = (float)d0, f1 = (float)d1;
                    if (LIMBS == 2) {
                        int e0 = 0, e1 = 0;
                        dot2<F>(V0, V1, xp + (size_t)P * nch, nch, e0, e1);
                        f0 = fmaf((float)e0, 1.f / 65536.f, f0);
                        f1 = fmaf((float)e1, 1.f / 65536.f, f1);
                    }
                    const float2 mt = meta[(size_t)j * nch + c];
                    acc[0][t] = fmaf(sc0, mt.x * f0, acc[0][t]);
                    acc[1][t] = fmaf(sc1, mt.x * f1, acc[1][t]);
                    if (FM::BIAS) {
                        acc[0][t] = fmaf(bi0, mt.y, acc[0][t]);
                        acc[1][t] = fmaf(bi1, mt.y, acc[1][t]);
                    }
                }
            }
        }
    }

    __device__ void prime() {
        for (int d = 0; d < pd - 1; ++d) issue();
    }

    // The main loop (after prime() and the prologue): every item of this warp, stage by stage.
    __device__ void run(const int4 *xdata, const float2 *meta) {
        ItemCursor cc = first_cursor();
        int c_st = 0;
        for (int j = 0; j < nj; ++j) {
            unsigned r0, r1;
            int seg0;
            cc.rows(pa, p.I, p.H, r0, r1, seg0);
            float acc[2][NT];
#pragma unroll
            for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = 0.f;
            for (int base = 0; base < total; base += W) {
                issue();
                if (BULK) {
                    mbar_wait(ring_s + (uint32_t)c_st * SLOT + MBAR, (ph >> c_st) & 1u);
                    ph ^= 1u << c_st;
                } else {
                    cp_wait_ring(pd);
                }
                compute(base, c_st, r0, r1, xdata, meta, acc);
                c_st = c_st + 1 == pd ? 0 : c_st + 1;
            }
            warp_sum<NT>(acc);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (lane == t && t < p.nt) {
                    if (pa) {
                        const float g = acc[0][t], u = acc[1][t];
                        p.h[((size_t)seg0 * NT + t) * p.I + r0] = __fdividef(g, 1.f + __expf(-g)) * u;
                    } else {
                        const unsigned N = (unsigned)p.H;
                        const size_t o = (size_t)(p.t0 + t) * N;
                        float v0 = acc[0][t], v1 = acc[1][t];
                        if (p.accumulate) {
                            v0 += load_elem(p.out, p.out_dtype, o + r0);
                            if (r0 + 1 < N) v1 += load_elem(p.out, p.out_dtype, o + r0 + 1);
                        }
                        store_elem(p.out, p.out_dtype, o + r0, v0);
                        if (r0 + 1 < N) store_elem(p.out, p.out_dtype, o + r0 + 1, v1);
                    }
                }
            }
            cc.next(pa, p.I);
        }
        if (!BULK) cp_wait<0>();  // (bulk: every stage issued was waited for above)
    }

    int first_item;
    __device__ __forceinline__ ItemCursor first_cursor() const {
        ItemCursor c;
        c.init(pa, first_item, p.I);
        return c;
    }
};

// Returns the bulk ring's stage parities after phase A (phase B's ring continues them).
template <int F, int LIMBS, int NT, int BULK>
__device__ unsigned phase_a(const Params &p, const uint8_t *const *srec, const float *swt, unsigned char *ring,
                            int4 *xdata, int warp, int lane) {
    const int K = p.H;
    int64_t ib, ie;
    block_range((int64_t)p.k * p.I, ib, ie);
    if (ib >= ie) return 0;
    Pipe<F, LIMBS, NT, BULK> pp(p, srec, true, ib, ie, K, ring, warp, lane);
    pp.first_item = (int)(ib + warp);
    pp.ph = 0;
    pp.prime();
    if (p.pdl) pdl_wait();  // x is the previous kernel's output
    float2 *meta = (float2 *)(xdata + NT * image_int4(F, LIMBS, K));
    prep_images<F, LIMBS>(NT, NT, p.nt, K, p.x, p.x_dtype, true, p.t0, swt, xdata, meta, warp, lane);
    __syncthreads();
    pp.run(xdata, meta);
    return pp.ph;
}

template <int F, int LIMBS, int NT, int BULK>
__device__ void phase_b(const Params &p, const uint8_t *const *srec, const float *swt, unsigned char *ring,
                        int4 *xdata, int warp, int lane, bool barrier, unsigned ph) {
    const int K = p.I;
    int64_t ib, ie;
    block_range((int64_t)(p.H + 1) / 2, ib, ie);
    Pipe<F, LIMBS, NT, BULK> pp(p, srec, false, ib, ie, K, ring, warp, lane);
    pp.first_item = (int)(ib + warp);
    pp.ph = ph;
    if (ib < ie) {
        if (threadIdx.x == 0) prefetch_b_first<F>(p, srec);  // L2 window beyond the ring's stages
        pp.prime();  // phase-B weights do not depend on phase A: load them during the barrier
    }
    if (p.trig) pdl_trigger();  // the next layer's GEMV may start streaming its weights (FMC_TUNE_COOP_TRIGGER)
    if (barrier) grid_barrier(p.bar);
    if (p.pdl) pdl_wait();  // x (or h: phase A's launch) is the previous kernel's output
    if (ib >= ie) return;
    const int nimg = p.b_from_x ? NT : p.k * NT;
    float2 *meta = (float2 *)(xdata + nimg * image_int4(F, LIMBS, K));
    if (p.b_from_x)
        prep_images<F, LIMBS>(nimg, NT, p.nt, K, p.x, p.x_dtype, true, p.t0, swt, xdata, meta, warp, lane);
    else
        // The one-token decode's h (Mixtral: 7 tasks per lane) with 4 tasks' loads in flight: 2 L2 round
        // trips instead of 4 (the 4-token and fp32 kernels keep 2: their registers).
        prep_images<F, LIMBS, (NT == 1 && LIMBS == 1) ? 4 : 2>(nimg, NT, p.nt, K, p.h, FMC_F32, false, 0, swt, xdata,
                                                              meta, warp, lane);
    __syncthreads();
    pp.run(xdata, meta);
}

template <int F, int LIMBS, int NT, int BULK>
__global__ void __launch_bounds__(THREADS) moe_kernel(const Params p) {
    extern __shared__ __align__(16) unsigned char smem[];
    const uint8_t **srec = (const uint8_t **)smem;
    float *swt = (float *)(smem + FMC_MAX_K * 8);
    unsigned char *ring = smem + HDR_BYTES;
    int4 *xdata = (int4 *)(smem + HDR_BYTES + (BULK ? bulk_ring_bytes(Fmt<F>::CPG, Fmt<F>::BIAS) : ring_bytes(p.pd)));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (p.pdl) {
        pdl_trigger();
        if (p.rec_dev || p.has_w == 2) pdl_wait();  // addresses/weights written by earlier kernels
    }
    if (tid < p.k) {
        srec[tid] = p.rec_dev ? (const uint8_t *)p.rec_dev[tid] : p.rec[tid];
        float w = 1.f;
        if (p.has_w == 1) w = p.wv[tid];
        else if (p.has_w == 2) w = load_elem(p.w_dev, p.w_dtype, tid);
        swt[tid] = w;
    }
    unsigned ph = 0;  // bulk: every stage's mbarrier starts in phase 0
    if (BULK) {
        if (lane < BPD)
            mbar_init((uint32_t)__cvta_generic_to_shared(ring + ((size_t)warp * BPD + lane + 1) *
                                                                    Pipe<F, LIMBS, NT, 1>::SLOT - 8), 1);
        mbar_init_fence();
    }
    __syncthreads();
    if (p.phase != 1) ph = phase_a<F, LIMBS, NT, BULK>(p, srec, swt, ring, xdata, warp, lane);
    if (p.phase != 0) phase_b<F, LIMBS, NT, BULK>(p, srec, swt, ring, xdata, warp, lane, p.phase == 2, ph);
}

// ---------------------------------------------------------------- dequantize (prefill via cuBLAS)
// One thread per 8 consecutive elements of a row (K is a multiple of 64, so 8 never straddle a
// group): a warp reads 32 consecutive 1-, 2- or 4-byte words of packed weights and writes 32
// consecutive 16-byte pieces (bf16/f16) or 32-byte pieces (f32): both sides coalesced, one index
// division per thread (32-bit where the part allows), so the kernel runs at memory speed.
template <int F> __device__ __forceinline__ void load8(const uint8_t *q, size_t e0, float (&v)[8]) {
    if (F == 0) {
        const uint2 w = __ldg((const uint2 *)(q + e0));
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (float)(signed char)(((e < 4 ? w.x : w.y) >> (8 * (e & 3))) & 0xFF);
    } else if (F == 1) {
        const unsigned w = __ldg((const unsigned *)(q + e0 / 2));
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (float)((w >> (4 * e)) & 0xF);
    } else {
        const unsigned w = __ldg((const unsigned short *)(q + e0 / 4));
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (float)((w >> (2 * e)) & 0x3);
    }
}

template <int F, int OD, typename IT>
__global__ void __launch_bounds__(256) dequant_kernel(const uint8_t *part, int64_t s_off, int64_t b_off, int64_t N,
                                                      int64_t K, void *out) {
    using FM = Fmt<F>;
    const IT k8 = (IT)(K / 8), total = (IT)N * k8;
    const IT i = (IT)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const IT row = i / k8, c8 = i - row * k8;
    const size_t e0 = (size_t)i * 8;
    const size_t sg = (size_t)row * (size_t)(K / 64) + c8 / 8;
    const float s = __half2float(((const __half *)(part + s_off))[sg]);
    const float b = FM::BIAS ? __half2float(((const __half *)(part + b_off))[sg]) : 0.f;
    float v[8];
    load8<F>(part, e0, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = FM::BIAS ? __fadd_rn(__fmul_rn(v[e], s), b) : __fmul_rn(v[e], s);
    if (OD == FMC_F32) {
        float4 *dst = (float4 *)((float *)out + e0);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        unsigned pk[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            if (OD == FMC_BF16) {
                __nv_bfloat162 t = __floats2bfloat162_rn(v[2 * h], v[2 * h + 1]);
                pk[h] = *(unsigned *)&t;
            } else {
                __half2 t = __floats2half2_rn(v[2 * h], v[2 * h + 1]);
                pk[h] = *(unsigned *)&t;
            }
        }
        *(uint4 *)((uint16_t *)out + e0) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
    }
}

// ---------------------------------------------------------------- host side
typedef void (*MoeFn)(const Params);

// [format][limbs - 1][n]: n 0 one token, 1 four tokens, 2 one token with the bulk ring (NB: kernels
// per (f, l); the one-token decode alone has a bulk form).
constexpr int NB = 3;
const MoeFn kMoe[3][2][NB] = {
    {{moe_kernel<0, 1, 1, 0>, moe_kernel<0, 1, 4, 0>, moe_kernel<0, 1, 1, 1>},
     {moe_kernel<0, 2, 1, 0>, moe_kernel<0, 2, 4, 0>, moe_kernel<0, 2, 1, 1>}},
    {{moe_kernel<1, 1, 1, 0>, moe_kernel<1, 1, 4, 0>, moe_kernel<1, 1, 1, 1>},
     {moe_kernel<1, 2, 1, 0>, moe_kernel<1, 2, 4, 0>, moe_kernel<1, 2, 1, 1>}},
    {{moe_kernel<2, 1, 1, 0>, moe_kernel<2, 1, 4, 0>, moe_kernel<2, 1, 1, 1>},
     {moe_kernel<2, 2, 1, 0>, moe_kernel<2, 2, 4, 0>, moe_kernel<2, 2, 1, 1>}},
};

typedef void (*DqFn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, void *);
#define FMC_DQ_ROW(F, IT) {dequant_kernel<F, FMC_F32, IT>, dequant_kernel<F, FMC_F16, IT>, dequant_kernel<F, FMC_BF16, IT>}
const DqFn kDq[2][3][3] = {  // [64-bit index][format][output dtype]
    {FMC_DQ_ROW(0, uint32_t), FMC_DQ_ROW(1, uint32_t), FMC_DQ_ROW(2, uint32_t)},
    {FMC_DQ_ROW(0, int64_t), FMC_DQ_ROW(1, int64_t), FMC_DQ_ROW(2, int64_t)},
};
#undef FMC_DQ_ROW

// One launch_shape decision: for (smem with PD stages, items, stages per item, the stages and
// blocks-per-SM knobs) the depth, shared bytes and blocks per SM.
struct LaunchShape { int smem3, items, spi, tune, mbps, pd, smem, bps; };
constexpr int NSHAPES = 8;
struct DevInfo : FmDevice {
    LaunchShape shapes[3][2][NB][NSHAPES];         // launch_shape's last decisions per kernel
    int shape_next[3][2][NB];
    int smem_set[3][2][NB];                        // dynamic smem limit raised so far per kernel
    int occ_smem[3][2][NB], occ_blocks[3][2][NB];  // last occupancy query per kernel
};
DevInfo g_dev[FM_MAX_DEV];
// Tuning knobs (fmc_tune) and what the last launch used.
int64_t g_tune[FMC_TUNE_NKEYS] = {DEFAULT_PREFETCH, 0, 0, 0, 0, 1, 0, 0, 0, 1, DEFAULT_BULK};

int epc_of(int f) { return f == 0 ? 16 : (f == 1 ? 32 : 64); }
int fidx(int fmt) { return fmt == FMC_Q8 ? 0 : (fmt == FMC_Q4 ? 1 : (fmt == FMC_Q2 ? 2 : -1)); }
bool dtype_ok(int d) { return d == FMC_F32 || d == FMC_F16 || d == FMC_BF16; }
size_t img_bytes(int f, int limbs, int64_t K) { return (size_t)limbs * K * 2 + (size_t)(K / epc_of(f)) * 8; }
int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

int set_device(int device, DevInfo **info) { return fm_device(device, g_dev, info); }

// Raise the kernel's dynamic shared memory limit if needed; blocks per SM at this smem size.
int prepare(DevInfo *d, int f, int l, int n, size_t smem, int *blocks_per_sm) {
    if (smem > (size_t)d->smem_optin) return FMC_ESMEM;
    MoeFn fn = kMoe[f][l][n];
    cudaError_t err;
    if ((int)smem > d->smem_set[f][l][n]) {
        if ((err = cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) !=
            cudaSuccess)
            return (int)err;
        d->smem_set[f][l][n] = (int)smem;
    }
    if (d->occ_smem[f][l][n] != (int)smem || d->occ_blocks[f][l][n] <= 0) {
        int nb = 0;
        if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fn, THREADS, smem)) != cudaSuccess) return (int)err;
        d->occ_smem[f][l][n] = (int)smem;
        d->occ_blocks[f][l][n] = nb;
    }
    int nb = d->occ_blocks[f][l][n];
    if (g_tune[FMC_TUNE_MAX_BLOCKS_PER_SM] > 0 && nb > g_tune[FMC_TUNE_MAX_BLOCKS_PER_SM])
        nb = (int)g_tune[FMC_TUNE_MAX_BLOCKS_PER_SM];
    *blocks_per_sm = nb;
    g_tune[FMC_TUNE_LAST_BPS] = nb;
    g_tune[FMC_TUNE_LAST_SMEM] = (int64_t)smem;
    return nb > 0 ? FMC_OK : FMC_ESMEM;
}


int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The bulk ring (FMC_TUNE_BULK, sm_90+) for rows of K values: chunks per row a multiple of 32, so that
// every bulk copy is whole groups of 32 chunks, 16-byte aligned at both ends.
constexpr int CPG_OF[3] = {Fmt<0>::CPG, Fmt<1>::CPG, Fmt<2>::CPG};
bool use_bulk(const DevInfo *d, int f, int64_t K) {
    return g_tune[FMC_TUNE_BULK] && d->cc_major >= 9 && (K / epc_of(f)) % 32 == 0;
}

// The ring depth, shared bytes and blocks per SM of a launch of kernel (f, l, n) that needs smem3
// bytes of shared memory with PD stages for `items` items of `spi` stages each: with
// FMC_TUNE_STAGES 0, 4 stages where the grid leaves one block (16 warps) per SM and each warp
// streams more than 4 stages (and 4 fit), else PD; with the knob set, its depth where that fits.
// Decisions are cached (the last NSHAPES per kernel). FMC_OK or an error.
int launch_shape(DevInfo *d, int f, int l, int n, size_t smem3, int64_t items, int spi, int *pd, size_t *smem,
                 int *bps) {
    const int tune = (int)g_tune[FMC_TUNE_STAGES], mbps = (int)g_tune[FMC_TUNE_MAX_BLOCKS_PER_SM];
    const int it = items > (1 << 30) ? (1 << 30) : (int)items;
    LaunchShape *c = d->shapes[f][l][n];
    int i = 0;
    while (i < NSHAPES && !(c[i].pd > 0 && c[i].smem3 == (int)smem3 && c[i].items == it && c[i].spi == spi &&
                            c[i].tune == tune && c[i].mbps == mbps))
        ++i;
    if (i == NSHAPES) {
        int rc, b = 0;
        if ((rc = prepare(d, f, l, n, smem3, &b))) return rc;
        int cand = tune;
        if (tune == 0) {
            const int64_t want = ceil_div(items, WARPS), grid = want < (int64_t)b * d->sms ? want : (int64_t)b * d->sms;
            const int64_t chain = ceil_div(items, grid * WARPS) * spi;  // stages per warp
            cand = ceil_div(grid, d->sms) <= 1 && chain > 4 ? 4 : PD;
            // e12's rule: where 4 stages leave one block per SM anyway and each warp of such a grid
            // streams more than 8 stages, one block per SM at 4 stages (measured on the H200: one
            // Mixtral expert 37.8 -> 35.7 us, 8 Qwen3.5 experts 25.3 -> 24.4, through the knob).
            const size_t s4 = smem3 + (size_t)ring_bytes(4) - (size_t)RING_BYTES;
            int b4 = 0;
            if (cand == PD && b > 1 && s4 <= (size_t)d->smem_optin && prepare(d, f, l, n, s4, &b4) == FMC_OK &&
                b4 == 1 && ceil_div(items, (int64_t)d->sms * WARPS) * spi > 8)
                cand = 4;
        }
        LaunchShape r = {(int)smem3, it, spi, tune, mbps, PD, (int)smem3, b};
        if (cand != PD && cand > 0) {
            const size_t sc = smem3 + (size_t)ring_bytes(cand) - (size_t)RING_BYTES;
            int bc = 0;
            if (sc <= (size_t)d->smem_optin && prepare(d, f, l, n, sc, &bc) == FMC_OK) {
                r.pd = cand;
                r.smem = (int)sc;
                r.bps = bc;
            }
        }
        i = d->shape_next[f][l][n];
        d->shape_next[f][l][n] = (i + 1) % NSHAPES;
        c[i] = r;
    }
    *pd = c[i].pd;
    *smem = (size_t)c[i].smem;
    *bps = c[i].bps;
    g_tune[FMC_TUNE_LAST_BPS] = *bps;
    g_tune[FMC_TUNE_LAST_SMEM] = (int64_t)*smem;
    g_tune[FMC_TUNE_LAST_STAGES] = *pd;
    return FMC_OK;
}

// A plain (not cooperative) launch, with programmatic dependent launch where FMC_TUNE_PDL is on
// and the device is sm_90+ (the kernel then waits for its predecessor inside, see pdl_wait).
cudaError_t launch(MoeFn fn, int grid, size_t smem, cudaStream_t st, Params &p, const DevInfo *d) {
    p.pdl = g_tune[FMC_TUNE_PDL] && d->cc_major >= 9;
    if (!p.pdl) {
        fn<<<grid, THREADS, smem, st>>>(p);
        return cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(THREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    return fm_launch(cfg, fn, (const Params)p, true);
}

}  // namespace

extern "C" {

const char *fmc_strerror(int code) {
    switch (code) {
    case FMC_OK: return "ok";
    case FMC_EINVAL: return "invalid argument (format, shape, dtype or count)";
    case FMC_ESMEM: return "the shape needs more shared memory than this device allows";
    case FMC_EALIGN: return "a pointer is not aligned (weights, records and x need 16 bytes)";
    case FMC_EWORKSPACE: return "workspace missing or too small";
    default: break;
    }
    if (code > 0) return cudaGetErrorString((cudaError_t)code);
    return "unknown error";
}

int fmc_version(void) { return FMC_VERSION_NUMBER; }

int fmc_device_count(void) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return -(int)err;
    }
    return n;
}

int fmc_part_sections(int fmt, int64_t rows, int64_t cols, int64_t offsets[3], int64_t *nbytes) {
    const int f = fidx(fmt);
    if (f < 0 || rows <= 0 || cols <= 0 || cols % 64) return FMC_EINVAL;
    if (rows > ((int64_t)1 << 40) / cols) return FMC_EINVAL;  // as the C twin: sizes must not overflow
    const int bits = f == 0 ? 8 : (f == 1 ? 4 : 2);
    const int64_t qb = rows * cols * bits / 8, sb = rows * (cols / 64) * 2;
    offsets[0] = 0;
    offsets[1] = align64(qb);
    offsets[2] = f == 0 ? -1 : align64(offsets[1] + sb);
    *nbytes = align64((f == 0 ? offsets[1] : offsets[2]) + sb);
    return FMC_OK;
}

size_t fmc_moe_workspace_bytes(int k, int64_t inter) {
    return 256 + (size_t)(k > 0 ? k : 0) * FMC_MAX_NT * (size_t)(inter > 0 ? inter : 0) * sizeof(float);
}

int64_t fmc_tune(int key, int64_t value) {
    if (key < 0 || key >= FMC_TUNE_NKEYS) return -1;
    const int64_t old = g_tune[key];
    const bool writable = key < FMC_TUNE_LAST_GRID || key == FMC_TUNE_PDL || key == FMC_TUNE_STAGES ||
                          key == FMC_TUNE_AUTO_MODE || key == FMC_TUNE_COOP_TRIGGER || key == FMC_TUNE_BULK;
    if (value >= 0 && writable) g_tune[key] = value;
    return old;
}

int fmc_moe(const fmc_layout *L, int k, const uint64_t *recs, int recs_on_device, const void *w_dev, int w_dtype,
            const float *w_host, const void *x, int x_dtype, int64_t T, void *out, int out_dtype, void *workspace,
            size_t workspace_bytes, int mode, int device, void *stream) {
    if (!L) return FMC_EINVAL;
    const int f = fidx(L->fmt);
    if (f < 0 || k < 1 || k > FMC_MAX_K || T < 1 || !recs || !x || !out) return FMC_EINVAL;
    if (L->hidden <= 0 || L->inter <= 0 || L->hidden % 64 || L->inter % 64 || L->hidden > (1 << 30) ||
        L->inter > (1 << 30))
        return FMC_EINVAL;
    if (!dtype_ok(x_dtype) || !dtype_ok(out_dtype) || (w_dev && !dtype_ok(w_dtype))) return FMC_EINVAL;
    if ((int64_t)k * L->inter > INT32_MAX / 2) return FMC_EINVAL;
    if (mode < FMC_MODE_AUTO || mode > FMC_MODE_TWO_LAUNCH) return FMC_EINVAL;
    if ((uintptr_t)x % 16 || (uintptr_t)out % 4) return FMC_EALIGN;
    if (!workspace || workspace_bytes < fmc_moe_workspace_bytes(k, L->inter)) return FMC_EWORKSPACE;
    if ((uintptr_t)workspace % 16) return FMC_EALIGN;
    int64_t o13[3], o2[3], n13, n2;
    if (fmc_part_sections(L->fmt, 2 * L->inter, L->hidden, o13, &n13) ||
        fmc_part_sections(L->fmt, L->hidden, L->inter, o2, &n2))
        return FMC_EINVAL;
    if (L->w13_off < 0 || L->w2_off < 0 || L->w13_off % 16 || L->w2_off % 16) return FMC_EALIGN;
    if (!recs_on_device)
        for (int e = 0; e < k; ++e)
            if (recs[e] % 16) return FMC_EALIGN;

    DevInfo *d;
    int rc = set_device(device, &d);
    if (rc) return rc;
    const int l = x_dtype == FMC_F32 ? 1 : 0;
    const int limbs = l + 1;
    const size_t hdr = HDR_BYTES + RING_BYTES;
    // Tokens per launch (4 when T > 1 and shared memory allows, else 1) and experts per launch
    // (all k unless their phase-B x images overflow shared memory: then groups, accumulated).
    int n = -1, kg = 0;
    size_t smem = 0;
    for (int cand = T > 1 ? 1 : 0; cand >= 0; --cand) {
        const int NT = cand ? 4 : 1;
        const size_t sa = hdr + NT * img_bytes(f, limbs, L->hidden);
        int g = k;
        while (g > 0 && hdr + (size_t)g * NT * img_bytes(f, limbs, L->inter) > (size_t)d->smem_optin) --g;
        if (sa <= (size_t)d->smem_optin && g >= 1) {
            const size_t sb = hdr + (size_t)g * NT * img_bytes(f, limbs, L->inter);
            n = cand;
            kg = g;
            smem = sa > sb ? sa : sb;
            break;
        }
    }
    if (n < 0) return FMC_ESMEM;
    // AUTO stays cooperative: two PDL launches ran the Mixtral layer 5-9% faster on the H200 but
    // the q8 Qwen3.5 layer 6% slower, an 8-layer decode 703 -> 668 tok/s (one run each), and in
    // the 32-layer q4 decode (FMC_TUNE_AUTO_MODE 1) the expert kernels took 2169 us per token
    // against 2096 cooperative (h200-k9c-call2.json). FMC_TUNE_AUTO_MODE switches it for measuring.
    const bool coop = mode == FMC_MODE_COOP || (mode == FMC_MODE_AUTO && d->coop && !g_tune[FMC_TUNE_AUTO_MODE]);
    if (mode == FMC_MODE_COOP && !d->coop) return (int)cudaErrorNotSupported;
    // The ring depth by phase A (gate/up: two thirds of the bytes). Sizing each of the two launches
    // apart (phase A then 2 blocks per SM on Mixtral) was measured no faster on the H200.
    int pd = PD, bps = 0;
    if ((rc = launch_shape(d, f, l, n, smem, (int64_t)kg * L->inter, (int)ceil_div(L->hidden / epc_of(f), 32), &pd,
                           &smem, &bps)))
        return rc;
    // The bulk stream in place of the cp.async ring (FMC_TUNE_BULK). 1: where the ring's launch leaves
    // one block per SM anyway (the bulk ring's shared memory leaves one) and both parts' rows fill a
    // bulk stage (q4: 4096 values), so copies are 2 KB. Measured on the H200 (e14): the Mixtral layer
    // 64.5 -> 63.0 us, one Mixtral expert 35.9 -> 34.5; with 8 Qwen3.5 experts (rows of 1024: 512-byte
    // copies) 24.7 -> 26.2, and everywhere with 512-byte stages 17-26% slower. 2: wherever it fits.
    const int64_t bvals = (int64_t)BW * epc_of(f);  // values of a row in one bulk stage
    const bool whole = L->hidden >= bvals && L->inter >= bvals;
    if (n == 0 && use_bulk(d, f, L->hidden) && use_bulk(d, f, L->inter) &&
        (g_tune[FMC_TUNE_BULK] == 2 || (bps == 1 && whole))) {
        const size_t sb = smem - (size_t)ring_bytes(pd) + (size_t)bulk_ring_bytes(CPG_OF[f], f != 0);
        int bb = 0;
        if (sb <= (size_t)d->smem_optin && prepare(d, f, l, 2, sb, &bb) == FMC_OK) {
            n = 2;
            pd = BPD;
            smem = sb;
            bps = bb;
            g_tune[FMC_TUNE_LAST_STAGES] = pd;
        }
    }
    const int NT = n == 1 ? 4 : 1;
    const int64_t cap = (int64_t)bps * d->sms;
    cudaStream_t st = (cudaStream_t)stream;
    MoeFn fn = kMoe[f][l][n];
    const size_t wsize = w_dtype == FMC_F32 ? 4 : 2;

    Params p;
    memset(&p, 0, sizeof p);
    p.H = (int)L->hidden;
    p.I = (int)L->inter;
    p.a_q = L->w13_off + o13[0];
    p.a_s = L->w13_off + o13[1];
    p.a_b = L->w13_off + (f == 0 ? 0 : o13[2]);
    p.b_q = L->w2_off + o2[0];
    p.b_s = L->w2_off + o2[1];
    p.b_b = L->w2_off + (f == 0 ? 0 : o2[2]);
    p.x = x;
    p.x_dtype = x_dtype;
    p.h = (float *)((char *)workspace + 256);
    p.bar = (unsigned *)workspace;
    p.out = out;
    p.out_dtype = out_dtype;
    p.pf_ahead = g_tune[FMC_TUNE_PREFETCH];
    p.pd = pd;
    for (int g0 = 0; g0 < k; g0 += kg) {
        const int kk = k - g0 < kg ? k - g0 : kg;
        p.k = kk;
        p.accumulate = g0 > 0;
        if (recs_on_device) {
            p.rec_dev = recs + g0;
        } else {
            for (int e = 0; e < kk; ++e) p.rec[e] = (const uint8_t *)(uintptr_t)recs[g0 + e];
        }
        if (w_dev) {
            p.w_dev = (const char *)w_dev + g0 * wsize;
            p.w_dtype = w_dtype;
            p.has_w = 2;
        } else if (w_host) {
            for (int e = 0; e < kk; ++e) p.wv[e] = w_host[g0 + e];
            p.has_w = 1;
        }
        const int64_t items_a = (int64_t)kk * L->inter, items_b = (L->hidden + 1) / 2;
        const int64_t ga = ceil_div(items_a, WARPS) < cap ? ceil_div(items_a, WARPS) : cap;
        const int64_t gb = ceil_div(items_b, WARPS) < cap ? ceil_div(items_b, WARPS) : cap;
        for (int64_t t0 = 0; t0 < T; t0 += NT) {
            p.t0 = (int)t0;
            p.nt = (int)(T - t0 < NT ? T - t0 : NT);
            cudaError_t err;
            if (coop) {
                p.phase = 2;
                p.pdl = 0;
                p.trig = g_tune[FMC_TUNE_COOP_TRIGGER] && d->cc_major >= 9;
                const int grid = (int)(ga > gb ? ga : gb);
                g_tune[FMC_TUNE_LAST_GRID] = grid;
                void *args[] = {(void *)&p};
                err = cudaLaunchCooperativeKernel((const void *)fn, dim3(grid), dim3(THREADS), args, smem, st);
            } else {
                p.phase = 0;
                g_tune[FMC_TUNE_LAST_GRID] = ga;
                err = launch(fn, (int)ga, smem, st, p, d);
                if (err == cudaSuccess) {
                    p.phase = 1;
                    err = launch(fn, (int)gb, smem, st, p, d);
                }
            }
            if (err != cudaSuccess) return (int)err;
        }
    }
    return FMC_OK;
}

int fmc_linear(int fmt, const void *part, int64_t N, int64_t K, const void *x, int x_dtype, int64_t T, void *y,
               int y_dtype, int device, void *stream) {
    const int f = fidx(fmt);
    if (f < 0 || !part || !x || !y || T < 1 || N < 1 || N > (1 << 30) || K > (1 << 30)) return FMC_EINVAL;
    if (!dtype_ok(x_dtype) || !dtype_ok(y_dtype)) return FMC_EINVAL;
    int64_t off[3], nb;
    if (fmc_part_sections(fmt, N, K, off, &nb)) return FMC_EINVAL;
    if ((uintptr_t)part % 16 || (uintptr_t)x % 16 || (uintptr_t)y % 4) return FMC_EALIGN;
    Params p;
    memset(&p, 0, sizeof p);
    p.rec[0] = (const uint8_t *)part;
    p.k = 1;
    p.H = (int)N;
    p.I = (int)K;
    p.b_q = off[0];
    p.b_s = off[1];
    p.b_b = f == 0 ? 0 : off[2];
    p.x = x;
    p.x_dtype = x_dtype;
    p.out = y;
    p.out_dtype = y_dtype;
    p.phase = 1;
    p.b_from_x = 1;
    p.pf_ahead = g_tune[FMC_TUNE_PREFETCH];
    DevInfo *d;
    int rc = set_device(device, &d);
    if (rc) return rc;
    const int l = x_dtype == FMC_F32 ? 1 : 0;
    const size_t hdr = HDR_BYTES + RING_BYTES;
    int n = T > 1 ? 1 : 0;
    size_t smem = hdr + (n ? 4 : 1) * img_bytes(f, l + 1, K);
    if (n && smem > (size_t)d->smem_optin) {
        n = 0;
        smem = hdr + img_bytes(f, l + 1, K);
    }
    const int64_t items = (N + 1) / 2;
    int bps = 0, pd = PD;
    if ((rc = launch_shape(d, f, l, n, smem, items, (int)ceil_div(K / epc_of(f), 32), &pd, &smem, &bps))) return rc;
    p.pd = pd;
    const int NT = n ? 4 : 1;
    const int64_t cap = (int64_t)bps * d->sms;
    const int grid = (int)(ceil_div(items, WARPS) < cap ? ceil_div(items, WARPS) : cap);
    MoeFn fn = kMoe[f][l][n];
    g_tune[FMC_TUNE_LAST_GRID] = grid;
    for (int64_t t0 = 0; t0 < T; t0 += NT) {
        p.t0 = (int)t0;
        p.nt = (int)(T - t0 < NT ? T - t0 : NT);
        cudaError_t err = launch(fn, grid, smem, (cudaStream_t)stream, p, d);
        if (err != cudaSuccess) return (int)err;
    }
    return FMC_OK;
}

int fmc_dequant(int fmt, const void *part, int64_t N, int64_t K, void *out, int out_dtype, int device, void *stream) {
    const int f = fidx(fmt);
    if (f < 0 || !part || !out || !dtype_ok(out_dtype)) return FMC_EINVAL;
    int64_t off[3], nb;
    if (fmc_part_sections(fmt, N, K, off, &nb)) return FMC_EINVAL;
    if ((uintptr_t)part % 16 || (uintptr_t)out % 16) return FMC_EALIGN;
    DevInfo *d;
    int rc = set_device(device, &d);
    if (rc) return rc;
    const int64_t total = N * (K / 8);
    const int wide = total >= ((int64_t)1 << 31);
    kDq[wide][f][out_dtype]<<<(unsigned)ceil_div(total, 256), 256, 0, (cudaStream_t)stream>>>(
        (const uint8_t *)part, off[1], f == 0 ? 0 : off[2], N, K, out);
    (void)d;
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? FMC_OK : (int)err;
}

}  // extern "C"
