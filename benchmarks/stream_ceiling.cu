// The expert kernel's weight stream without its arithmetic (issue 9, e14): what rate does each
// access pattern reach on the GPU, before any dot product? A standalone program (no torch):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o stream_ceiling stream_ceiling.cu
//   ./stream_ceiling [--json FILE]
// The layer is Mixtral-8x7B's decode MoE layer, q4: 2 experts, w13 = 2 x 14336 rows of 2048 B of
// nibbles (+ 128 B of fp16 scales and of biases per row), w2 = 4096 rows of 7168 B (+ 448 B + 448 B),
// 198 MB in all. Every launch reads another copy of it (8 copies, 1.6 GB: none in the 50 MB L2).
// Grid and split as moe_kernel's: 132 blocks of 16 warps (one per SM), block_range over the items,
// the block's warps round-robin; an item is two rows (phase A: gate row i and up row I+i of one
// expert; phase B: rows r and r+1 of both experts' w2, the experts one after the other).
// Patterns:
//   flat      every warp reads a contiguous share with 16-byte loads, 4 in flight per lane (no smem)
//   cp16 pdN  the kernel's ring: per stage, lane l copies chunk l of both rows (cp.async 16 B) and the
//             4-byte words with its group's scale and bias (cp.async 4 B), N stages per warp
//   bulk pdN uU  Hopper bulk copies (cp.async.bulk, completion on an mbarrier per stage): per stage,
//             U x 512 B of each row and the matching scales and biases, 6 copies, lanes 0-5 issue them
// Each stage is then "consumed" (every lane reads its chunks back from shared memory and XORs them)
// so that the ring's reuse order is the kernel's. Reported: us per layer (median of 7 rounds of 8
// launches) and GB/s over the layer's bytes; a plain device-to-device copy beside for the ceiling.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <string>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

constexpr int WARPS = 16, THREADS = WARPS * 32;
constexpr int H = 4096, I = 14336, KEXP = 2;
// One expert's record: w13 q | w13 scales | w13 biases | w2 q | w2 scales | w2 biases (64-aligned).
constexpr int64_t A_ROWB = H / 2, A_NG = H / 64, B_ROWB = I / 2, B_NG = I / 64;
constexpr int64_t A_Q = 0, A_S = A_Q + 2LL * I * A_ROWB, A_B = A_S + 2LL * I * A_NG * 2;
constexpr int64_t B_Q = A_B + 2LL * I * A_NG * 2, B_S = B_Q + (int64_t)H * B_ROWB, B_B = B_S + (int64_t)H * B_NG * 2;
constexpr int64_t REC = B_B + (int64_t)H * B_NG * 2;
constexpr int64_t LAYER = KEXP * REC;

struct Args { const uint8_t *base; unsigned long long *sink; int phase; };

__device__ __forceinline__ void block_range(int64_t n, int64_t &ib, int64_t &ie) {
    ib = n * blockIdx.x / gridDim.x;
    ie = n * (blockIdx.x + 1) / gridDim.x;
}

// ------------------------------------------------------------------ flat: plain loads
__global__ void __launch_bounds__(THREADS) flat_kernel(Args a) {
    const int64_t n16 = LAYER / 16, per = (n16 + gridDim.x - 1) / gridDim.x;
    const int64_t b0 = per * blockIdx.x, b1 = b0 + per < n16 ? b0 + per : n16;
    const uint4 *p = (const uint4 *)a.base;
    unsigned acc = 0;
    for (int64_t i = b0 + threadIdx.x; i < b1; i += 4 * THREADS) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int64_t j = i + u * THREADS;
            v[u] = j < b1 ? __ldcs(p + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x12345678u) a.sink[0] = acc;
}

// ------------------------------------------------------------------ the item geometry
// Item it of the phase: rows (r0, r1) of segment e, row bytes, scale/bias row stride.
struct Geo {
    bool pa;
    int64_t nitems, rowb, ng;
    int nch, total;  // chunks per row, chunks per item (all segments)
    __device__ Geo(int phase) {
        pa = phase == 0;
        nitems = pa ? (int64_t)KEXP * I : H / 2;
        rowb = pa ? A_ROWB : B_ROWB;
        ng = pa ? A_NG : B_NG;
        nch = (int)(rowb / 16);
        total = pa ? nch : KEXP * nch;
    }
    // Base pointers of chunk f of item it (row 0 and row 1 q; scale and bias word of row 0 and 1).
    __device__ __forceinline__ void at(const uint8_t *base, int64_t it, int f, const uint8_t *&q0, const uint8_t *&q1,
                                       const uint8_t *&s0, const uint8_t *&s1, const uint8_t *&b0,
                                       const uint8_t *&b1) const {
        int64_t e, r0, r1;
        int c;
        if (pa) { e = it / I; r0 = it - e * I; r1 = I + r0; c = f; }
        else { e = f / nch; c = f - (int)e * nch; r0 = 2 * it; r1 = r0 + 1; }
        const uint8_t *rb = base + e * REC;
        const int64_t qo = pa ? A_Q : B_Q, so = pa ? A_S : B_S, bo = pa ? A_B : B_B;
        q0 = rb + qo + r0 * rowb + c * 16;
        q1 = rb + qo + r1 * rowb + c * 16;
        const int64_t g = c / 2;  // q4: 2 chunks per group
        s0 = rb + so + (r0 * ng + g) * 2;
        s1 = rb + so + (r1 * ng + g) * 2;
        b0 = rb + bo + (r0 * ng + g) * 2;
        b1 = rb + bo + (r1 * ng + g) * 2;
    }
};

__device__ __forceinline__ void cp16(uint32_t d, const void *s) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(s) : "memory");
}
__device__ __forceinline__ void cp4(uint32_t d, const void *s) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"((const void *)((uintptr_t)s & ~(uintptr_t)3)) : "memory");
}
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ------------------------------------------------------------------ cp16: the kernel's ring
constexpr int USLOT = 1536;
template <int PD>
__global__ void __launch_bounds__(THREADS) cp16_kernel(Args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    Geo g(a.phase);
    int64_t ib, ie;
    block_range(g.nitems, ib, ie);
    const int64_t first = ib + warp;
    const int nj = first < ie ? (int)((ie - first + WARPS - 1) / WARPS) : 0;
    const int spi = (g.total + 31) / 32, n = nj * spi;
    unsigned char *ring = smem + warp * PD * USLOT;
    const uint32_t rs = (uint32_t)__cvta_generic_to_shared(ring);
    int is = 0;  // stages issued
    auto issue = [&]() {
        if (is < n) {
            const int j = is / spi, s = is - j * spi, f = s * 32 + lane;
            if (f < g.total) {
                const uint8_t *q0, *q1, *s0, *s1, *b0, *b1;
                g.at(a.base, first + (int64_t)j * WARPS, f, q0, q1, s0, s1, b0, b1);
                const uint32_t d = rs + (is % PD) * USLOT;
                cp16(d + lane * 16, q0);
                cp16(d + 512 + lane * 16, q1);
                cp4(d + 1024 + lane * 4, s0);
                cp4(d + 1152 + lane * 4, s1);
                cp4(d + 1280 + lane * 4, b0);
                cp4(d + 1408 + lane * 4, b1);
            }
            ++is;
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    for (int d = 0; d < PD - 1; ++d) issue();
    unsigned acc = 0;
    for (int c = 0; c < n; ++c) {
        issue();
        cp_wait<PD - 2>();
        const unsigned char *st = ring + (c % PD) * USLOT;
        const uint4 w0 = *(const uint4 *)(st + lane * 16), w1 = *(const uint4 *)(st + 512 + lane * 16);
        acc ^= w0.x ^ w1.y ^ *(const unsigned *)(st + 1024 + lane * 4) ^ *(const unsigned *)(st + 1280 + lane * 4);
    }
    cp_wait<0>();
    if (acc == 0x12345678u) a.sink[0] = acc;
}

// ------------------------------------------------------------------ bulk: cp.async.bulk + mbarrier
__device__ __forceinline__ void mbar_init(uint32_t b, int n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(b), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t b, uint32_t parity) {
    asm volatile(
        "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(b),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void bulk(uint32_t d, const void *s, uint32_t bytes, uint32_t b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d),
                 "l"(s), "r"(bytes), "r"(b)
                 : "memory");
}

// A stage: U x 512 B of row 0 | of row 1 | U x 32 B scales row 0 | row 1 | biases row 0 | row 1 | mbarrier.
template <int U> struct BulkStage {
    static constexpr int Q = U * 512, S = U * 32, BYTES = 2 * Q + 4 * S;
    static constexpr int SLOT = (BYTES + 8 + 127) / 128 * 128, MBAR = SLOT - 8;
};

template <int PD, int U>
__global__ void __launch_bounds__(THREADS) bulk_kernel(Args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    using S = BulkStage<U>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    Geo g(a.phase);
    int64_t ib, ie;
    block_range(g.nitems, ib, ie);
    const int64_t first = ib + warp;
    const int nj = first < ie ? (int)((ie - first + WARPS - 1) / WARPS) : 0;
    const int spi = (g.total + 32 * U - 1) / (32 * U), n = nj * spi;  // (every stage full here)
    unsigned char *ring = smem + warp * PD * S::SLOT;
    const uint32_t rs = (uint32_t)__cvta_generic_to_shared(ring);
    if (lane < PD) mbar_init(rs + lane * S::SLOT + S::MBAR, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
    int is = 0;
    auto issue = [&]() {
        if (is < n) {
            __syncwarp();  // every lane has read the stage this overwrites
            const int j = is / spi, s = is - j * spi, f = s * 32 * U;
            const uint32_t d = rs + (is % PD) * S::SLOT, mb = d + S::MBAR;
            if (lane == 0) mbar_expect(mb, S::BYTES);
            __syncwarp();
            if (lane < 6) {
                const uint8_t *q0, *q1, *s0, *s1, *b0, *b1;
                g.at(a.base, first + (int64_t)j * WARPS, f, q0, q1, s0, s1, b0, b1);
                const uint8_t *src = lane == 0 ? q0 : lane == 1 ? q1 : lane == 2 ? s0 : lane == 3 ? s1 : lane == 4 ? b0 : b1;
                const uint32_t off = lane < 2 ? lane * S::Q : 2 * S::Q + (lane - 2) * S::S;
                bulk(d + off, src, lane < 2 ? S::Q : S::S, mb);
            }
            ++is;
        }
    };
    for (int d = 0; d < PD - 1; ++d) issue();
    unsigned acc = 0, ph = 0;
    for (int c = 0; c < n; ++c) {
        issue();
        const int st = c % PD;
        mbar_wait(rs + st * S::SLOT + S::MBAR, (ph >> st) & 1);
        ph ^= 1u << st;
        const unsigned char *sp = ring + st * S::SLOT;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint4 w0 = *(const uint4 *)(sp + u * 512 + lane * 16), w1 = *(const uint4 *)(sp + S::Q + u * 512 + lane * 16);
            acc ^= w0.x ^ w1.y;
        }
        acc ^= *(const unsigned *)(sp + 2 * S::Q + (lane & 7) * 4);
    }
    if (acc == 0x12345678u) a.sink[0] = acc;
}

// ------------------------------------------------------------------ host
typedef void (*Kern)(Args);
struct Case { std::string name; Kern k; size_t smem; int phase; };

int main(int argc, char **argv) {
    const char *json = nullptr;
    for (int i = 1; i < argc; ++i)
        if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int COPIES = 8;
    uint8_t *buf;
    CK(cudaMalloc(&buf, LAYER * COPIES));
    // Random-ish bytes (never zeros): a cheap hash per 8 bytes.
    {
        std::vector<uint64_t> h(1 << 20);
        for (size_t i = 0; i < h.size(); ++i) h[i] = (i + 1) * 0x9E3779B97F4A7C15ull ^ (i << 17);
        const size_t chunk = h.size() * 8;
        for (size_t o = 0; o < (size_t)LAYER * COPIES; o += chunk)
            CK(cudaMemcpy(buf + o, h.data(), std::min(chunk, (size_t)LAYER * COPIES - o), cudaMemcpyHostToDevice));
    }
    unsigned long long *sink;
    CK(cudaMalloc(&sink, 64));
    uint8_t *cpy;
    CK(cudaMalloc(&cpy, LAYER));
    std::vector<Case> cases = {
        {"flat", flat_kernel, 0, 0},
        {"A cp16 pd3", cp16_kernel<3>, 3 * USLOT * WARPS, 0},
        {"A cp16 pd4", cp16_kernel<4>, 4 * USLOT * WARPS, 0},
        {"A cp16 pd6", cp16_kernel<6>, 6 * USLOT * WARPS, 0},
        {"A bulk pd4 u1", bulk_kernel<4, 1>, 4 * BulkStage<1>::SLOT * WARPS, 0},
        {"A bulk pd6 u1", bulk_kernel<6, 1>, 6 * BulkStage<1>::SLOT * WARPS, 0},
        {"A bulk pd3 u2", bulk_kernel<3, 2>, 3 * BulkStage<2>::SLOT * WARPS, 0},
        {"A bulk pd4 u2", bulk_kernel<4, 2>, 4 * BulkStage<2>::SLOT * WARPS, 0},
        {"A bulk pd2 u4", bulk_kernel<2, 4>, 2 * BulkStage<4>::SLOT * WARPS, 0},
        {"B cp16 pd3", cp16_kernel<3>, 3 * USLOT * WARPS, 1},
        {"B cp16 pd4", cp16_kernel<4>, 4 * USLOT * WARPS, 1},
        {"B cp16 pd6", cp16_kernel<6>, 6 * USLOT * WARPS, 1},
        {"B bulk pd4 u1", bulk_kernel<4, 1>, 4 * BulkStage<1>::SLOT * WARPS, 1},
        {"B bulk pd6 u1", bulk_kernel<6, 1>, 6 * BulkStage<1>::SLOT * WARPS, 1},
        {"B bulk pd3 u2", bulk_kernel<3, 2>, 3 * BulkStage<2>::SLOT * WARPS, 1},
        {"B bulk pd4 u2", bulk_kernel<4, 2>, 4 * BulkStage<2>::SLOT * WARPS, 1},
        {"B bulk pd2 u4", bulk_kernel<2, 4>, 2 * BulkStage<4>::SLOT * WARPS, 1},
    };
    // Bytes each phase reads (phase A: w13 of both experts; B: w2 of both; flat: the whole layer).
    const double bytes_a = KEXP * (double)(B_Q - A_Q), bytes_b = KEXP * (double)(REC - B_Q);
    for (auto &c : cases)
        if (c.smem) CK(cudaFuncSetAttribute((const void *)c.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)c.smem));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int ROUNDS = 7;
    std::vector<std::vector<float>> us(cases.size() + 1);
    for (int r = 0; r < ROUNDS + 1; ++r) {  // round 0: warm-up
        for (size_t ci = 0; ci <= cases.size(); ++ci) {
            CK(cudaEventRecord(e0));
            for (int l = 0; l < COPIES; ++l) {
                if (ci == cases.size()) {
                    CK(cudaMemcpyAsync(cpy, buf + (size_t)l * LAYER, LAYER, cudaMemcpyDeviceToDevice));
                    continue;
                }
                Args a = {buf + (size_t)l * LAYER, sink, cases[ci].phase};
                cases[ci].k<<<sms, THREADS, cases[ci].smem>>>(a);
            }
            CK(cudaGetLastError());
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms = 0;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (r) us[ci].push_back(ms * 1e3f / COPIES);
        }
    }
    FILE *jf = json ? fopen(json, "w") : nullptr;
    if (jf) fprintf(jf, "{\"layer_bytes\": %lld, \"sms\": %d, \"cases\": {", (long long)LAYER, sms);
    printf("%-16s %9s %9s  (bytes: flat %.1f MB, A %.1f MB, B %.1f MB)\n", "pattern", "us", "GB/s", LAYER / 1e6,
           bytes_a / 1e6, bytes_b / 1e6);
    for (size_t ci = 0; ci <= cases.size(); ++ci) {
        std::vector<float> v = us[ci];
        std::sort(v.begin(), v.end());
        const float med = v[v.size() / 2];
        const bool cp = ci == cases.size();
        const std::string name = cp ? "copy (r+w)" : cases[ci].name;
        const double by = cp ? 2.0 * LAYER : (ci == 0 ? (double)LAYER : (cases[ci].phase ? bytes_b : bytes_a));
        const double gbps = by / (med * 1e-6) / 1e9;
        printf("%-16s %9.2f %9.0f  (rounds %.2f..%.2f)\n", name.c_str(), med, gbps, v.front(), v.back());
        if (jf)
            fprintf(jf, "%s\"%s\": {\"us\": %.3f, \"gbps\": %.1f, \"us_min\": %.3f, \"us_max\": %.3f}", ci ? ", " : "",
                    name.c_str(), med, gbps, v.front(), v.back());
    }
    if (jf) { fprintf(jf, "}}\n"); fclose(jf); }
    return 0;
}
