/* x86 pieces shared by the CPU kernels' AVX2/AVX-512 files (include after <immintrin.h>). */
#ifndef FM_X86_H
#define FM_X86_H

/* the sum of a vector's 8 lanes */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) float fm_hsum256(__m256 v)
{
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

#endif
