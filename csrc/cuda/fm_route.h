/* One MoE layer's routing of one decode token in one launch (fm_route.cu): h = h_in + o,
 * x = RMSNorm(h) * norm_w, logits = round(x . router_w[e]) for E experts, softmax, top-k
 * (divided by their sum when normalize), and each chosen expert's record address
 * base[0] + entries[id] * stride. All activations in one dtype (FMC_F32/F16/BF16), contiguous.
 * workspace: FMC_ROUTE_WS_BYTES(E) bytes on the device, zeroed before its first use (the launch
 * leaves it zeroed again); one launch at a time may use it. Returns FMC_OK, FMC_EINVAL or a
 * cudaError_t. pdl: launched with programmatic dependent launch (sm_90+). */
#ifndef FM_ROUTE_H
#define FM_ROUTE_H

#include "fm_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FMC_ROUTE_MAX_E 1024
#define FMC_ROUTE_WS_BYTES(E) (256 + 4 * (E))

int fmc_route(const void *h_in, const void *o, const void *norm_w, const void *router_w, int dtype, int64_t H,
              int64_t E, int64_t k, int normalize, float eps, const int64_t *entries, const int64_t *base,
              int64_t stride, void *h_out, void *x_out, void *weights, int64_t *ids_row, int64_t *ids,
              int64_t *addrs, void *workspace, int pdl, void *stream);

#ifdef __cplusplus
}
#endif
#endif
