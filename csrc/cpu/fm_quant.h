/* Error-minimising group-wise quantization (the converter's hot loop). Same algorithm, step for
 * step, as flashmoe_plugin/quant.py, which stays the reference; results agree up to float
 * summation order. */
#ifndef FM_QUANT_H
#define FM_QUANT_H
#include <stdint.h>

#define FMQ_GROUP 64

/* w: rows x cols float32 (cols % 64 == 0). bits: 8 (symmetric int8 codes, no biases), 4 or 2
 * (affine uint codes packed little-end first). q: rows x cols*bits/8 bytes; scales, biases:
 * rows x cols/64 fp16 (biases unused for 8). Returns 0, or -1 for a bad argument. */
int fmq_quantize(const float *w, int64_t rows, int64_t cols, int bits,
                 uint8_t *q, uint16_t *scales, uint16_t *biases);

/* q8 with the plain absmax scale per group (one pass, no search: the dense part's load-time
 * quantizer). w: rows x cols float32, or bfloat16 when bf16 != 0. Returns 0, or -1. */
int fmq_quantize_q8_absmax(const void *w, int bf16, int64_t rows, int64_t cols, int8_t *q, uint16_t *scales);

#endif
