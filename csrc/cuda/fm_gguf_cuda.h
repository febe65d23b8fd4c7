/* llama.cpp block formats on NVIDIA GPUs (csrc/cuda/fm_gguf.cu): bit-exact dequantization, the
 * twin of csrc/cpu/fm_gguf.c. Type ids are GGML's (as fm_gguf.h). */
#ifndef FM_GGUF_CUDA_H
#define FM_GGUF_CUDA_H

#include <stdint.h>

enum { FMG_CUDA_F32 = 0, FMG_CUDA_F16 = 1, FMG_CUDA_Q4_0 = 2, FMG_CUDA_Q4_1 = 3, FMG_CUDA_Q5_0 = 6,
       FMG_CUDA_Q5_1 = 7, FMG_CUDA_Q8_0 = 8, FMG_CUDA_Q4_K = 12, FMG_CUDA_Q5_K = 13, FMG_CUDA_Q6_K = 14,
       FMG_CUDA_BF16 = 30, FMG_CUDA_MXFP4 = 39 };

#ifdef __cplusplus
extern "C" {
#endif
int64_t fmg_cuda_row_bytes(int type, int64_t cols);
/* out[rows, cols] (fp32, device memory) = the matrix of `rows` rows of `type` at src (device or
 * mapped memory), asynchronously on stream. 0 ok, -1 bad arguments, -2 CUDA error. */
int fmg_cuda_dequant(int type, const void *src, int64_t rows, int64_t cols, float *out, int device, void *stream);
int fmg_cuda_device_count(void);
#ifdef __cplusplus
}
#endif
#endif
