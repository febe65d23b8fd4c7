// flashmoe: the device side of a decode token's n_cpu_moe layers handed to the host inside one
// captured graph (csrc/cpu/fm_handoff.h is the host side; runtime/hybrid_token.py drives both).
//
// One kernel per CPU layer, one block of 1024 threads: copy the layer's packed row (x, routing weights, ids;
// fp32) into mapped host memory, make it visible to the host (__threadfence_system), bump the
// layer's device-side sequence number and write it to the host's `ready` flag, spin on the host's
// `done` flag (system-scope acquire loads), then convert the host's fp32 sum into `delta` (the
// next segment adds it to the residual). A device counter gives each replay its number, so the
// captured graph needs no host-written argument. A wait past `timeout` cycles sets *err and
// lets the graph go on (its results are then void; the host raises).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fm_handoff.h"

namespace {

__device__ __forceinline__ unsigned load_acquire_sys(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void store_release_sys(unsigned *p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void handoff_kernel(const float *__restrict__ pack, int n, float *host_pack, unsigned *ready,
                               const unsigned *done, unsigned *seq, const float *host_out, T *delta, int H,
                               long long timeout, int *err) {
    __shared__ unsigned s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) host_pack[i] = pack[i];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        s = *seq + 1;
        *seq = s;
        store_release_sys(ready, s);
        const long long t0 = clock64();
        while (load_acquire_sys(done) != s) {
            if (clock64() - t0 > timeout) {
                atomicExch(err, 1);
                break;
            }
            __nanosleep(100);
        }
    }
    __syncthreads();
    __threadfence_system();
    // the sum over PCIe: one 16-byte volatile load a thread where aligned (one round trip for
    // H <= 4 x 1024), then the tail
    int done4 = 0;
    if (((uintptr_t)host_out & 15) == 0) {
        done4 = H / 4;
        for (int i = threadIdx.x; i < done4; i += blockDim.x) {
            float a, b, c, d;
            asm volatile("ld.volatile.global.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(a), "=f"(b), "=f"(c), "=f"(d)
                         : "l"(host_out + 4 * i));
            delta[4 * i] = from_f32<T>(a);
            delta[4 * i + 1] = from_f32<T>(b);
            delta[4 * i + 2] = from_f32<T>(c);
            delta[4 * i + 3] = from_f32<T>(d);
        }
    }
    const volatile float *src = host_out;
    for (int i = 4 * done4 + threadIdx.x; i < H; i += blockDim.x) delta[i] = from_f32<T>(src[i]);
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. host_pack, ready, done, host_out, err: device
// addresses of mapped host memory. Returns a cudaError_t (0: launched).
extern "C" int fmc_handoff(const float *pack, int n, float *host_pack, unsigned *ready, const unsigned *done,
                           unsigned *seq, const float *host_out, void *delta, int dtype, int H,
                           long long timeout_cycles, int *err, void *stream) {
    const dim3 grid(1), block(1024);
    cudaStream_t st = (cudaStream_t)stream;
    switch (dtype) {
    case 0:
        handoff_kernel<float><<<grid, block, 0, st>>>(pack, n, host_pack, ready, done, seq, host_out,
                                                      (float *)delta, H, timeout_cycles, err);
        break;
    case 1:
        handoff_kernel<__half><<<grid, block, 0, st>>>(pack, n, host_pack, ready, done, seq, host_out,
                                                       (__half *)delta, H, timeout_cycles, err);
        break;
    case 2:
        handoff_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(pack, n, host_pack, ready, done, seq, host_out,
                                                              (__nv_bfloat16 *)delta, H, timeout_cycles, err);
        break;
    default:
        return (int)cudaErrorInvalidValue;
    }
    return (int)cudaGetLastError();
}

// The device address of mapped (pinned) host memory; 0 when the runtime has none for it.
extern "C" uintptr_t fmc_mapped(void *host) {
    void *dev = nullptr;
    if (cudaHostGetDevicePointer(&dev, host, 0) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return (uintptr_t)dev;
}

extern "C" const char *fmc_handoff_error(int code) { return cudaGetErrorString((cudaError_t)code); }
