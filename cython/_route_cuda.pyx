# distutils: sources = csrc/cuda/fm_route.cu
# distutils: include_dirs = csrc/cuda
# distutils: depends = csrc/cuda/fm_cuda.h csrc/cuda/fm_route.h csrc/cuda/fm_quant.cuh
# cython: language_level=3, boundscheck=False, wraparound=False
"""flashmoe_plugin._route_cuda: one MoE layer's routing of one decode token in one launch
(csrc/cuda/fm_route.cu; runtime/decode_ops.py's moe_layer uses it inside the decode graph).

    route(h_in, o, norm_w, router_w, k, normalize, eps, entries, base, stride, ids_row, workspace,
          h_out, x_out, weights, ids, addrs, pdl=True, stream=None)
        h_out = h_in + o; x_out = RMSNorm(h_out) * norm_w; the router's top-k of softmax(x_out @
        router_w.T) into weights [k] (activation dtype) and ids [k] (int64, also into ids_row);
        addrs[k] = base[0] + entries[ids] * stride
    workspace_bytes(E) -> int   bytes of the int8 workspace (zeroed once; it is left zeroed)
    MAX_E                        most experts

Tensors are checked here (device, dtype, shape, contiguity); the launch is asynchronous on
`stream` (None: the current stream) with the GIL released.
"""
from libc.stdint cimport int64_t, uintptr_t

import torch as _torch

cdef extern from "fm_route.h" nogil:
    enum:
        FMC_F32
        FMC_F16
        FMC_BF16
        FMC_ROUTE_MAX_E
        FMC_MAX_K
    int fmc_route(const void *h_in, const void *o, const void *norm_w, const void *router_w, int dtype, int64_t H,
                  int64_t E, int64_t k, int normalize, float eps, const int64_t *entries, const int64_t *base,
                  int64_t stride, void *h_out, void *x_out, void *weights, int64_t *ids_row, int64_t *ids,
                  int64_t *addrs, void *workspace, int pdl, void *stream)

MAX_E = FMC_ROUTE_MAX_E
MAX_K = FMC_MAX_K
_DTYPES = {_torch.float32: FMC_F32, _torch.float16: FMC_F16, _torch.bfloat16: FMC_BF16}


def workspace_bytes(int64_t E):
    return 256 + 4 * E


def _on(t, name, dev, dtype, numel):
    if not isinstance(t, _torch.Tensor) or not t.is_cuda:
        raise ValueError(f"route: {name} must be a CUDA tensor")
    if dev is not None and t.device != dev:
        raise ValueError(f"route: {name} is on {t.device}, the other tensors on {dev}")
    if not t.is_contiguous():
        raise ValueError(f"route: {name} must be contiguous")
    if t.dtype != dtype:
        raise TypeError(f"route: {name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"route: {name} has {t.numel()} elements, expected {numel}")
    return t.data_ptr()


def route(h_in, o, norm_w, router_w, int64_t k, bint normalize, float eps, entries, base, int64_t stride, ids_row,
          workspace, h_out, x_out, weights, ids, addrs, bint pdl=True, stream=None):
    if h_in.dtype not in _DTYPES:
        raise TypeError(f"route: activations must be float32, bfloat16 or float16, got {h_in.dtype}")
    dt, dev = h_in.dtype, h_in.device
    if router_w.dim() != 2:
        raise ValueError(f"route: router_w must be [E, H], got {tuple(router_w.shape)}")
    cdef int64_t E = router_w.shape[0], H = router_w.shape[1]
    if not 1 <= k <= min(E, FMC_MAX_K) or E > FMC_ROUTE_MAX_E:
        raise ValueError(f"route: k={k} of E={E} experts (k <= {FMC_MAX_K}, E <= {FMC_ROUTE_MAX_E})")
    cdef uintptr_t p[15]
    p[0] = _on(h_in, "h_in", dev, dt, H)
    p[1] = _on(o, "o", dev, dt, H)
    p[2] = _on(norm_w, "norm_w", dev, dt, H)
    p[3] = _on(router_w, "router_w", dev, dt, E * H)
    p[4] = _on(entries, "entries", dev, _torch.int64, E)
    p[5] = _on(base, "base", dev, _torch.int64, 1)
    p[6] = _on(h_out, "h_out", dev, dt, H)
    p[7] = _on(x_out, "x_out", dev, dt, H)
    p[8] = _on(weights, "weights", dev, dt, k)
    p[9] = _on(ids_row, "ids_row", dev, _torch.int64, k)
    p[10] = _on(ids, "ids", dev, _torch.int64, k)
    p[11] = _on(addrs, "addrs", dev, _torch.int64, k)
    p[12] = _on(workspace, "workspace", dev, _torch.uint8, None)
    if workspace.numel() < workspace_bytes(E):
        raise ValueError(f"route: the workspace holds {workspace.numel()} bytes, {workspace_bytes(E)} needed")
    p[13] = _torch.cuda.current_stream(dev).cuda_stream if stream is None else int(stream)
    cdef int d = _DTYPES[dt], rc, norm = normalize, use_pdl = pdl
    with nogil:
        rc = fmc_route(<const void *>p[0], <const void *>p[1], <const void *>p[2], <const void *>p[3], d, H, E, k,
                       norm, eps, <const int64_t *>p[4], <const int64_t *>p[5], stride, <void *>p[6],
                       <void *>p[7], <void *>p[8], <int64_t *>p[9], <int64_t *>p[10], <int64_t *>p[11],
                       <void *>p[12], use_pdl, <void *>p[13])
    if rc != 0:  # the arguments were checked above: a CUDA error (cudaError_t) or a bad shape
        raise RuntimeError(f"route: {'invalid argument' if rc < 0 else f'CUDA error {rc}'} (H={H}, E={E}, k={k})")
