/* flashmoe: the device side of a decode token's n_cpu_moe layers (fm_handoff.cu). */
#ifndef FM_HANDOFF_CUDA_H
#define FM_HANDOFF_CUDA_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
int fmc_handoff(const float *pack, int n, float *host_pack, unsigned *ready, const unsigned *done, unsigned *seq,
                const float *host_out, void *delta, int dtype, int H, long long timeout_cycles, int *err,
                void *stream);
uintptr_t fmc_mapped(void *host);
const char *fmc_handoff_error(int code);
#ifdef __cplusplus
}
#endif
#endif
