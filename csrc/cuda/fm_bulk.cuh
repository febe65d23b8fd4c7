// Hopper bulk copies (cp.async.bulk, the TMA unit's 1-D form) into shared memory, completed on an
// mbarrier: the expert kernel's weight ring in its bulk form (fm_kernels.cu, FMC_TUNE_BULK). One
// instruction moves a whole 16-byte-aligned run of bytes (a stage's 512 B of a row, its scales), where
// the cp.async ring issues one 16-byte copy per lane and chunk. sm_90+ only: elsewhere these compile to
// nothing and the host never picks the bulk kernels (fm_kernels.cu's use_bulk).
#ifndef FM_BULK_CUH
#define FM_BULK_CUH

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#else
    (void)bar; (void)count;
#endif
}

// The inits visible to the async proxy (the bulk copies' complete_tx) before any copy is issued.
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One arrival (the barrier's count is 1) that also expects `bytes` of transfers in this phase.
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#else
    (void)bar; (void)bytes;
#endif
}

// Wait until the phase of parity `parity` has completed (every byte expected has landed).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n\t.reg .pred p;\n"
        "FM_MBAR_WAIT_%=:\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
        "@!p bra FM_MBAR_WAIT_%=;\n}" ::"r"(bar),
        "r"(parity)
        : "memory");
#else
    (void)bar; (void)parity;
#endif
}

// bytes (a multiple of 16) from global src (16-byte aligned) to shared dst (16-byte aligned); the
// transfer counts against bar's expected bytes. A block launched without clusters is its own cluster.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
#else
    (void)dst; (void)src; (void)bytes; (void)bar;
#endif
}

}  // namespace

#endif
