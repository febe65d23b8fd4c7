// The device a launch runs on and the attributes its launch geometry needs, shared by the CUDA
// kernel files; each keeps its own per-device table (D derives from FmDevice) of what it has
// tuned or raised beside them.
#ifndef FM_DEVICE_CUH
#define FM_DEVICE_CUH

#include <cuda_runtime.h>

#include "fm_cuda.h"

constexpr int FM_MAX_DEV = 64;

struct FmDevice {
    int init, sms, smem_optin, coop, cc_major;
};

// device < 0: the current device, else `device` is made current; *info = &table[device], its
// attributes queried on first use.
template <class D>
static int fm_device(int device, D *table, D **info) {
    cudaError_t err;
    if (device < 0) {
        if ((err = cudaGetDevice(&device)) != cudaSuccess) return (int)err;
    } else {
        int cur = -1;
        if ((err = cudaGetDevice(&cur)) != cudaSuccess) return (int)err;
        if (cur != device && (err = cudaSetDevice(device)) != cudaSuccess) return (int)err;
    }
    if (device >= FM_MAX_DEV) return FMC_EINVAL;
    D *d = &table[device];
    if (!d->init) {
        if ((err = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return (int)err;
        if ((err = cudaDeviceGetAttribute(&d->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess)
            return (int)err;
        if ((err = cudaDeviceGetAttribute(&d->coop, cudaDevAttrCooperativeLaunch, device)) != cudaSuccess) return (int)err;
        if ((err = cudaDeviceGetAttribute(&d->cc_major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess)
            return (int)err;
        d->init = 1;
    }
    *info = d;
    return FMC_OK;
}

// fn<<<cfg>>>(p), with programmatic dependent launch (sm_90+: fm_quant.cuh's pdl_wait) when pdl.
template <class P>
static cudaError_t fm_launch(cudaLaunchConfig_t cfg, void (*fn)(P), const P &p, bool pdl) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, fn, p);
}

#endif
