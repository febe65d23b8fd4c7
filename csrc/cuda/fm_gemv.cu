// The decode GEMV for dense matrices (fmc_gemv in fm_cuda.h): y[t] = W x[t] for T = 1..4 tokens,
// W one q8/q4 part or up to FMC_GEMV_MAX_PARTS parts stacked along the rows (q, k and v in one
// launch, each part where it lies: nothing is copied).
//
// The arithmetic is fmc_linear's (fm_kernels.cu's header): x as 16-bit fixed point per group of
// 64 in shared memory, exact int32 dp2a dot products per 16-byte chunk of weights, fp32 sums
// over chunks; the chunk layout of x (q8 natural order, q4 [0,2,4,6,1,3,5,7] per 8) is the same.
// What differs is how the weights stream:
//   - a block is `warps` warps; an item is `warps / S` row pairs, warp w taking row pair
//     item * (warps / S) + w / S and K-slice w % S of it (split-K over S warps of one block,
//     partial sums added in slice order through shared memory: deterministic);
//   - each lane holds 16-byte chunks of both rows (plus their scales/biases) in registers, read
//     past L1 (ld.global.nc.L1::no_allocate);
//   - the first batch is issued before the block builds x's image (and before the programmatic-
//     dependent-launch wait), so the prologue hides under the weight loads;
//   - two kernels: gemv_kernel, a block per item (U = 4 chunks per lane and row issued together,
//     then the arithmetic), and gemv_persist, a grid of at most the resident blocks, each building
//     x's image once and looping over items with the next batch's loads in flight over the current
//     batch's arithmetic. Both sum in the same order: bit-identical at the same split. fmc_gemv
//     takes the first where its blocks fit in one wave, the second past it (gemv_kernel_choice).
//     Large single matrices stay on fmc_linear (CudaBackend, cuda_backend.py).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "fm_cuda.h"
#include "fm_device.cuh"
#include "fm_gemv.cuh"
#include "fm_quant.cuh"

namespace {

constexpr int U = 4;          // gemv_kernel's chunks per lane per row per batch
constexpr int MAXW = 8;       // most warps per block

// fmc_gemv_norm's 1 / sqrt(mean((h + hd)^2) + eps), as models.layers.rms_norm computes it: fp32
// squares (exact: 16-bit values) summed in fp64 (for bf16 exact at any spread of magnitudes a
// residual has, so the order of the sum does not matter), the mean rounded to fp32, eps added in fp32, a
// correctly rounded fp64 sqrt rounded to fp32, its fp32 reciprocal (torch computes 1.0 / t as
// t.reciprocal()). Block 0 also writes h + hd to hs.
// Every thread of the block calls it (it synchronises the block).
__device__ __forceinline__ float norm_scale(const uint4 *h, const uint4 *hd, uint4 *hs, int K, int dt, float eps) {
    __shared__ double part[MAXW];
    __shared__ float scale;
    const int n8 = K >> 3, nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    double s = 0.0;
    for (int c = threadIdx.x; c < n8; c += blockDim.x) {
        float a[8], b[8];
        act8(__ldg(h + c), dt, a);
        act8(__ldg(hd + c), dt, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a[i] = act_round(a[i] + b[i], dt);
            s += (double)(a[i] * a[i]);
        }
        if (blockIdx.x == 0) hs[c] = act_pack8(a, dt);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    if (lane == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < nw; ++w) t += part[w];
        const float mean = (float)(t / (double)K);
        scale = 1.0f / (float)sqrt((double)(mean + eps));  // torch: 1.0 / sqrt(..).float() = reciprocal in fp32
    }
    __syncthreads();
    return scale;
}

// A lane's chunks base + 32u (u < N) below c_end of the row pair (q0, s0, b0) / (q1, s1, b1):
// the weights, their groups' scales and (FM::BIAS) biases, into the arrays given.
template <class FM, int N>
__device__ __forceinline__ void load_pair(const uint8_t *q0, const uint8_t *q1, const unsigned short *s0,
                                          const unsigned short *s1, const unsigned short *b0,
                                          const unsigned short *b1, int base, int lane, int c_end, uint4 (&w0)[N],
                                          uint4 (&w1)[N], float (&sc0)[N], float (&sc1)[N], float (&bi0)[N],
                                          float (&bi1)[N]) {
#pragma unroll
    for (int u = 0; u < N; ++u) {
        const int c = base + 32 * u + lane;
        if (c < c_end) {
            w0[u] = ld_stream(q0 + (size_t)c * 16);
            w1[u] = ld_stream(q1 + (size_t)c * 16);
            const int g = c / FM::CPG;
            sc0[u] = ld_half(s0 + g);
            sc1[u] = ld_half(s1 + g);
            if (FM::BIAS) {
                bi0[u] = ld_half(b0 + g);
                bi1[u] = ld_half(b1 + g);
            }
        }
    }
}

template <int F, int NT>
__global__ void __launch_bounds__(MAXW * 32, 2) gemv_kernel(const GemvParams p) {
    using FM = Fmt<F>;
    constexpr int P = FM::P;
    extern __shared__ __align__(16) unsigned char smem[];
    const int K = p.K, nch = K / FM::EPC, ngroups = K >> 6;
    int4 *img = (int4 *)smem;                                  // NT images of P * nch pieces
    float2 *meta = (float2 *)(img + (size_t)NT * P * nch);     // NT x nch {xs, chunk sum}
    float *red = (float *)(meta + (size_t)NT * nch);           // warps x 2 x NT partial sums
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (p.pdl) pdl_trigger();

    // This warp's row pair (r0, r1 = r0 + 1 unless the part has an odd row count) and K slice.
    const int S = p.split;
    const int pair = blockIdx.x * p.pairs_per_block + warp / S, sl = warp - (warp / S) * S;
    const bool active = pair < p.total_pairs;
    int part = 0;
    if (active)
        while (part + 1 < p.nparts && pair >= p.pair_end[part]) ++part;
    const int r0 = active ? 2 * (pair - (part ? p.pair_end[part - 1] : 0)) : 0;
    const bool two = active && r0 + 1 < p.rows[part];
    const int r1 = two ? r0 + 1 : r0;
    const int cs = (nch + S - 1) / S, c_end = min(nch, (sl + 1) * cs);
    int cb = sl * cs;
    const uint8_t *q0 = p.q[part] + (size_t)r0 * nch * 16, *q1 = p.q[part] + (size_t)r1 * nch * 16;
    const unsigned short *s0 = p.s[part] + (size_t)r0 * ngroups, *s1 = p.s[part] + (size_t)r1 * ngroups;
    const unsigned short *b0 = FM::BIAS ? p.b[part] + (size_t)r0 * ngroups : nullptr;
    const unsigned short *b1 = FM::BIAS ? p.b[part] + (size_t)r1 * ngroups : nullptr;

    uint4 w0[U], w1[U];
    float sc0[U], sc1[U], bi0[U], bi1[U];
    auto load = [&](int base) { load_pair<FM>(q0, q1, s0, s1, b0, b1, base, lane, c_end, w0, w1, sc0, sc1, bi0, bi1); };
    const bool work = active && cb < c_end;
    if (work) load(cb);  // weights never depend on the previous kernel: stream them first
    if (p.pdl) pdl_wait();

    // x's image, built by the whole block while the first batch is in flight.
    const float nsc = p.norm ? norm_scale((const uint4 *)p.nh, (const uint4 *)p.nd, (uint4 *)p.hs, p.K, p.x_dtype, p.eps) : 0.f;
    build_image<F, NT>(p, nch, img, meta, warp, lane, nw, nsc);
    __syncthreads();

    float acc[2][NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = 0.f;
    if (work) {
        for (;;) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = cb + 32 * u + lane;
                if (c < c_end) chunk_dot<F, NT>(w0[u], w1[u], sc0[u], sc1[u], bi0[u], bi1[u], img, meta, nch, c, acc);
            }
            cb += 32 * U;
            if (cb >= c_end) break;
            load(cb);
        }
    }
    warp_sum<NT>(acc);

    if (S > 1) {  // the slices' partial sums, added in slice order by the pair's first warp
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t) red[(warp * 2 + r) * NT + t] = acc[r][t];
        __syncthreads();
        if (sl != 0) return;
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                float v = red[(warp * 2 + r) * NT + t];
                for (int j = 1; j < S; ++j) v += red[((warp + j) * 2 + r) * NT + t];
                acc[r][t] = v;
            }
    }
    if (active) store_rows<NT>(p, part, r0, two, lane, acc);
}

// The persistent form (auto's past one wave): a grid of at most the resident blocks
// (SMs x blocks per SM); each block builds x's image once and takes items blockIdx, blockIdx +
// grid, ... (an item: pairs_per_block row pairs x S slices, as one block of gemv_kernel). Each
// warp streams batches of UU chunks per row and issues the next batch's loads (at an item's last
// batch: the next item's first) before the current batch's arithmetic, so a warp always has a
// batch in flight and no block pays x's image twice. Per lane the chunks and the sums run in
// gemv_kernel's order: at the same split the results are bit-identical to it.
template <int F, int NT, int UU, int MINB>
__global__ void __launch_bounds__(MAXW * 32, MINB) gemv_persist(const GemvParams p) {
    using FM = Fmt<F>;
    constexpr int P = FM::P;
    extern __shared__ __align__(16) unsigned char smem[];
    const int nch = p.K / FM::EPC, ngroups = p.K >> 6;
    int4 *img = (int4 *)smem;                                  // NT images of P * nch pieces
    float2 *meta = (float2 *)(img + (size_t)NT * P * nch);     // NT x nch {xs, chunk sum}
    float *red = (float *)(meta + (size_t)NT * nch);           // 2 (item parity) x warps x 2 x NT
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (p.pdl) pdl_trigger();

    const int S = p.split, sl = warp - (warp / S) * S, ppb = p.pairs_per_block;
    const int nitems = (p.total_pairs + ppb - 1) / ppb, stride = (int)gridDim.x * ppb;
    const int cs = (nch + S - 1) / S, c_begin = sl * cs, c_end = min(nch, c_begin + cs);

    // The row pair `pair` of the stack: its part, first row, whether it has two rows.
    auto locate = [&](int pair, int &part, int &r0, bool &two) {
        part = 0;
        while (part + 1 < p.nparts && pair >= p.pair_end[part]) ++part;
        r0 = 2 * (pair - (part ? p.pair_end[part - 1] : 0));
        two = r0 + 1 < p.rows[part];
    };
    // The load cursor's rows (one batch ahead of the arithmetic).
    const uint8_t *q0, *q1;
    const unsigned short *s0, *s1, *b0 = nullptr, *b1 = nullptr;
    auto aim = [&](int pair) {
        int part, r0;
        bool two;
        locate(pair, part, r0, two);
        const int r1 = two ? r0 + 1 : r0;
        q0 = p.q[part] + (size_t)r0 * nch * 16;
        q1 = p.q[part] + (size_t)r1 * nch * 16;
        s0 = p.s[part] + (size_t)r0 * ngroups;
        s1 = p.s[part] + (size_t)r1 * ngroups;
        if (FM::BIAS) {
            b0 = p.b[part] + (size_t)r0 * ngroups;
            b1 = p.b[part] + (size_t)r1 * ngroups;
        }
    };
    uint4 w0[UU], w1[UU], n0[UU], n1[UU];
    float sc0[UU], sc1[UU], bi0[UU], bi1[UU], ns0[UU], ns1[UU], nb0[UU], nb1[UU];
    auto load = [&](int base) {  // into the n* registers
        load_pair<FM>(q0, q1, s0, s1, b0, b1, base, lane, c_end, n0, n1, ns0, ns1, nb0, nb1);
    };
    auto take = [&]() {
#pragma unroll
        for (int u = 0; u < UU; ++u) {
            w0[u] = n0[u];
            w1[u] = n1[u];
            sc0[u] = ns0[u];
            sc1[u] = ns1[u];
            bi0[u] = FM::BIAS ? nb0[u] : 0.f;
            bi1[u] = FM::BIAS ? nb1[u] : 0.f;
        }
    };

    int item = blockIdx.x, pair = item * ppb + warp / S;
    if (item < nitems && pair < p.total_pairs && c_begin < c_end) {  // weights first, as gemv_kernel
        aim(pair);
        load(c_begin);
    }
    if (p.pdl) pdl_wait();
    const float nsc = p.norm ? norm_scale((const uint4 *)p.nh, (const uint4 *)p.nd, (uint4 *)p.hs, p.K, p.x_dtype, p.eps) : 0.f;
    build_image<F, NT>(p, nch, img, meta, warp, lane, nw, nsc);
    __syncthreads();

    for (int parity = 0; item < nitems; item += gridDim.x, pair += stride, parity ^= 1) {  // block-uniform
        const bool active = pair < p.total_pairs;
        float acc[2][NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = 0.f;
        if (active) {
            for (int cb = c_begin; cb < c_end; cb += 32 * UU) {
                take();
                if (cb + 32 * UU < c_end) {
                    load(cb + 32 * UU);
                } else if (item + (int)gridDim.x < nitems && pair + stride < p.total_pairs) {
                    aim(pair + stride);
                    load(c_begin);
                }
#pragma unroll
                for (int u = 0; u < UU; ++u) {
                    const int c = cb + 32 * u + lane;
                    if (c < c_end)
                        chunk_dot<F, NT>(w0[u], w1[u], sc0[u], sc1[u], bi0[u], bi1[u], img, meta, nch, c, acc);
                }
            }
        }
        warp_sum<NT>(acc);
        if (S > 1) {  // the slices' partial sums, added in slice order (gemv_kernel's) by slice 0
            float *rd = red + (size_t)parity * nw * 2 * NT;
            if (lane == 0)
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int t = 0; t < NT; ++t) rd[(warp * 2 + r) * NT + t] = acc[r][t];
            __syncthreads();  // one per item for every warp; the parity keeps item i+1's writes off i's
            if (sl == 0)
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        float v = rd[(warp * 2 + r) * NT + t];
                        for (int j = 1; j < S; ++j) v += rd[((warp + j) * 2 + r) * NT + t];
                        acc[r][t] = v;
                    }
        }
        if (active && sl == 0) {
            int part, r0;
            bool two;
            locate(pair, part, r0, two);
            store_rows<NT>(p, part, r0, two, lane, acc);
        }
    }
}

typedef void (*GemvFn)(const GemvParams);
// [kernel][format][tokens - 1]; kernel 0: gemv_kernel; 1, 2: gemv_persist with 2 chunks per batch
// and registers for 2 / 3 blocks of 8 warps per SM. (Also measured on the H200, and dropped: 4
// chunks per batch, which spills at q4, and 1 chunk at 4 blocks per SM: no faster on q/k/v, slower
// on o and k/v; benchmarks/results/h200-k9c-call2.json.)
#define FM_GEMV_ROW(K, ...)                                                                  \
    {K<0, 1, ##__VA_ARGS__>, K<0, 2, ##__VA_ARGS__>, K<0, 3, ##__VA_ARGS__>, K<0, 4, ##__VA_ARGS__>}, \
    {K<1, 1, ##__VA_ARGS__>, K<1, 2, ##__VA_ARGS__>, K<1, 3, ##__VA_ARGS__>, K<1, 4, ##__VA_ARGS__>}
constexpr int NKERNELS = 3;
const GemvFn kGemv[NKERNELS][2][4] = {
    {FM_GEMV_ROW(gemv_kernel)}, {FM_GEMV_ROW(gemv_persist, 2, 2)}, {FM_GEMV_ROW(gemv_persist, 2, 3)}};
#undef FM_GEMV_ROW

struct GemvDev : FmDevice {
    int smem_set[NKERNELS][2][4];  // dynamic shared memory limit raised so far, per kernel
    int occ_key[NKERNELS][2][4];   // blocks per SM at (warps, smem) = occ_key, per kernel (cudaOccupancy...)
    int occ[NKERNELS][2][4];
};
GemvDev g_gdev[FM_MAX_DEV];
// FMC_GEMV_TUNE_*: split (0 auto), warps per block (0 auto), pdl (1 on), last split/warps/grid,
// kernel (0 auto, 1 gemv_kernel, 2 / 3 gemv_persist's variants, see kGemv), grid cap (0 auto:
// the resident blocks), last kernel, the persistent variant of auto (0: per format and tokens).
int64_t g_gtune[FMC_GEMV_TUNE_NKEYS] = {0, 0, 1, 0, 0, 0, 0, 0, 0, 0};

int gemv_device(int device, GemvDev **info) { return fm_device(device, g_gdev, info); }

// The split S (warps per row pair) and warps per block W = 8. Measured on the H200
// (benchmarks/results/h200-g9-dense-gemv.json): every block pays ~2 us of prologue (x's image)
// that only other blocks' streams hide, so time grows with the block count (q8 4096x4096 at one
// token: 7.0 / 8.2 / 11.7 / 21.2 us at S = 1 / 2 / 4 / 8). At one token S stays 1 unless the
// grid would leave SMs without a block (k/v 1024x4096: 64 blocks; S = 2 took q8 from 5.1 to
// 2.9 us); at 2..4 tokens S is the smallest giving 4 blocks per SM (q/k/v stacked at 4 tokens:
// 26 us at S = 2, three fmc_linear launches + cat 38 us). Each slice keeps >= 64 chunks.
void gemv_shape(int64_t pairs, int nch, int sms, int T, int *split, int *warps) {
    int W = g_gtune[FMC_GEMV_TUNE_WARPS] > 0 ? (int)g_gtune[FMC_GEMV_TUNE_WARPS] : 8;
    int S = (int)g_gtune[FMC_GEMV_TUNE_SPLIT];
    if (S <= 0) {
        const int64_t want = T == 1 ? (9LL * sms + 9) / 10 : 4LL * sms;
        S = 1;
        while (S < W && S < 8 && (pairs * S + W - 1) / W < want && nch / (2 * S) >= 64) S *= 2;
    }
    *split = S;
    *warps = W;
}

// Dynamic shared memory of kernel kn: x's image, its meta, the slices' partial sums (doubled in
// the persistent kernels: by item parity).
size_t gemv_smem(int kn, int T, int P, int nch, int W) {
    return (size_t)T * P * nch * 16 + (size_t)T * nch * 8 + (size_t)(kn ? 2 : 1) * W * 2 * T * 4;
}

// Blocks of kernel kn resident per SM at W warps and smem bytes (queried once per shape).
int gemv_occupancy(GemvDev *d, int kn, int f, int T, int W, size_t smem, int *occ) {
    const int key = (int)smem * 16 + W;
    int *o = &d->occ[kn][f][T - 1];
    if (d->occ_key[kn][f][T - 1] != key) {
        cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(o, kGemv[kn][f][T - 1], W * 32, smem);
        if (err != cudaSuccess) return (int)err;
        d->occ_key[kn][f][T - 1] = key;
    }
    *occ = *o > 0 ? *o : 1;
    return FMC_OK;
}

// Which kernel runs (index into kGemv): the KERNEL knob, else (auto) gemv_kernel where its blocks
// all fit on the device at once, the persistent grid where they do not. Measured on the H200
// (h200-k9c-call1/2.json, us at one token, bf16 x; gemv_kernel / persistent at 2 / 3 blocks per SM):
//   q/k/v stacked 6144x4096, 384 blocks: q4 8.1-8.3 / 8.1-8.3 / 7.2; q8 12.6 / 8.8 (q8 holds 3
//     blocks per SM in either persistent variant: 80 registers);
//   o 4096x4096, 256 blocks (one wave at 2 per SM): q4 4.9-5.1 / 5.3-5.4 / 6.0; q8 7.1 / 7.5;
//   k/v 1024x4096, 128 blocks: q4 2.9 / 3.1 / 3.9; q8 3.0 / 4.1;
//   at 4 tokens (split 2..4: 512-768 blocks) the persistent grid: q/k/v q4 26.0 -> 16.4.
// So: one wave -> gemv_kernel; past it the persistent grid, at 3 blocks per SM for q4 at one token
// (its 80-register cap spills at 2..4 tokens: 2 blocks there), the PERSIST knob overriding.
int gemv_kernel_choice(GemvDev *d, int f, int T, int P, int nch, int W, int64_t items, int *kn) {
    const int64_t k = g_gtune[FMC_GEMV_TUNE_KERNEL];
    if (k >= 1 && k <= NKERNELS) {
        *kn = (int)k - 1;
        return FMC_OK;
    }
    int occ;
    const int rc = gemv_occupancy(d, 0, f, T, W, gemv_smem(0, T, P, nch, W), &occ);
    if (rc) return rc;
    const int64_t pv = g_gtune[FMC_GEMV_TUNE_PERSIST];
    if (items <= (int64_t)d->sms * occ) *kn = 0;
    else if (pv >= 2 && pv <= NKERNELS) *kn = (int)pv - 1;
    else *kn = f == 1 && T == 1 ? 2 : 1;
    return FMC_OK;
}

}  // namespace

extern "C" {

int64_t fmc_gemv_tune(int key, int64_t value) {
    if (key < 0 || key >= FMC_GEMV_TUNE_NKEYS) return -1;
    const int64_t old = g_gtune[key];
    const bool writable = key <= FMC_GEMV_TUNE_PDL || key == FMC_GEMV_TUNE_KERNEL || key == FMC_GEMV_TUNE_GRID ||
                          key == FMC_GEMV_TUNE_PERSIST;
    if (value >= 0 && writable) g_gtune[key] = value;
    return old;
}

}  // extern "C"

// fmc_gemv and fmc_gemv_norm: p holds x (or the norm's inputs) on entry.
static int gemv_run(GemvParams &p, int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K,
                    int x_dtype, int64_t T, void *y, int y_dtype, int device, void *stream) {
    const int f = fmt == FMC_Q8 ? 0 : (fmt == FMC_Q4 ? 1 : -1);
    if (f < 0 || nparts < 1 || nparts > NP || !parts || !rows || !y || T < 1 || T > 4) return FMC_EINVAL;
    if (K < 64 || K % 64 || K > (1 << 20)) return FMC_EINVAL;
    if (x_dtype != FMC_BF16 && x_dtype != FMC_F16) return FMC_EINVAL;
    if (y_dtype != FMC_F32 && y_dtype != FMC_BF16 && y_dtype != FMC_F16) return FMC_EINVAL;
    if ((uintptr_t)y % 4) return FMC_EALIGN;
    int64_t pairs = 0, n = 0;
    for (int i = 0; i < nparts; ++i) {
        int64_t off[3], nb;
        if (!parts[i] || rows[i] < 1 || fmc_part_sections(fmt, rows[i], K, off, &nb)) return FMC_EINVAL;
        if ((uintptr_t)parts[i] % 16) return FMC_EALIGN;
        const uint8_t *b = (const uint8_t *)parts[i];
        p.q[i] = b + off[0];
        p.s[i] = (const unsigned short *)(b + off[1]);
        p.b[i] = f ? (const unsigned short *)(b + off[2]) : nullptr;
        p.rows[i] = (int)rows[i];
        p.col0[i] = (int)n;
        n += rows[i];
        pairs += (rows[i] + 1) / 2;
        p.pair_end[i] = (int)pairs;
    }
    if (n > (1 << 30)) return FMC_EINVAL;
    GemvDev *d;
    int rc = gemv_device(device, &d);
    if (rc) return rc;
    const int nch = (int)(K / (f ? 32 : 16)), P = f ? 4 : 2;
    int S, W;
    gemv_shape(pairs, nch, d->sms, (int)T, &S, &W);
    if (W < 1 || W > MAXW || S < 1 || W % S) return FMC_EINVAL;
    const int64_t items = (pairs + W / S - 1) / (W / S);
    int kn;
    if ((rc = gemv_kernel_choice(d, f, (int)T, P, nch, W, items, &kn))) return rc;
    const size_t smem = gemv_smem(kn, (int)T, P, nch, W);
    if (smem > (size_t)d->smem_optin) return FMC_ESMEM;
    GemvFn fn = kGemv[kn][f][T - 1];
    cudaError_t err;
    if ((int)smem > 48 * 1024 && (int)smem > d->smem_set[kn][f][T - 1]) {
        if ((err = cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) !=
            cudaSuccess)
            return (int)err;
        d->smem_set[kn][f][T - 1] = (int)smem;
    }
    p.nparts = nparts;
    p.N = (int)n;
    p.K = (int)K;
    p.T = (int)T;
    p.split = S;
    p.pairs_per_block = W / S;
    p.total_pairs = (int)pairs;
    p.x_dtype = x_dtype;
    p.y = y;
    p.y_dtype = y_dtype;
    int64_t grid = items;
    if (kn) {  // the persistent grid: at most the blocks resident at once (or the GRID knob)
        int occ;
        if ((rc = gemv_occupancy(d, kn, f, (int)T, W, smem, &occ))) return rc;
        const int64_t cap = g_gtune[FMC_GEMV_TUNE_GRID] > 0 ? g_gtune[FMC_GEMV_TUNE_GRID] : (int64_t)d->sms * occ;
        if (grid > cap) grid = cap;
    }
    g_gtune[FMC_GEMV_TUNE_LAST_KERNEL] = kn + 1;
    g_gtune[FMC_GEMV_TUNE_LAST_SPLIT] = S;
    g_gtune[FMC_GEMV_TUNE_LAST_WARPS] = W;
    g_gtune[FMC_GEMV_TUNE_LAST_GRID] = grid;
    p.pdl = g_gtune[FMC_GEMV_TUNE_PDL] && d->cc_major >= 9;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)grid);
    cfg.blockDim = dim3(W * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = (cudaStream_t)stream;
    err = fm_launch(cfg, fn, (const GemvParams)p, p.pdl);
    return err == cudaSuccess ? FMC_OK : (int)err;
}

extern "C" {

int fmc_gemv(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *x,
             int x_dtype, int64_t T, void *y, int y_dtype, int device, void *stream) {
    if (!x) return FMC_EINVAL;
    if ((uintptr_t)x % 16) return FMC_EALIGN;
    GemvParams p = {};
    p.x = x;
    return gemv_run(p, fmt, nparts, parts, rows, K, x_dtype, T, y, y_dtype, device, stream);
}

int fmc_gemv_norm(int fmt, int nparts, const void *const *parts, const int64_t *rows, int64_t K, const void *h,
                  const void *hd, const void *nw, float eps, void *hs, int x_dtype, void *y, int y_dtype, int device,
                  void *stream) {
    if (!h || !hd || !nw || !hs) return FMC_EINVAL;
    if ((uintptr_t)h % 16 || (uintptr_t)hd % 16 || (uintptr_t)nw % 16 || (uintptr_t)hs % 16) return FMC_EALIGN;
    GemvParams p = {};
    p.nh = h;
    p.nd = hd;
    p.nw = nw;
    p.hs = hs;
    p.eps = eps;
    p.norm = 1;
    return gemv_run(p, fmt, nparts, parts, rows, K, x_dtype, 1, y, y_dtype, device, stream);
}

}  // extern "C"
