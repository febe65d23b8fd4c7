"""Host time and kernel launches per decode token, counted with torch.profiler over a few steps
(a separate pass after the timed decode, so the profiler's own overhead never touches tok/s).

- launches_per_token: the host's launch calls (cudaLaunchKernel / cudaLaunchKernelExC /
  cudaLaunchCooperativeKernel / cuLaunchKernel, cudaGraphLaunch counted as one, and the
  cudaMemcpyAsync / cudaMemsetAsync calls), per token;
- kernels_per_token: kernels the GPU ran (the profiler's device-side kernel records, those
  inside a replayed graph included), per token; `graph_nodes`: the captured graph's nodes by type
  (cudaGraphGetNodes) where there is one;
- moe_kernels_per_token: those kernels that are the fused expert kernel (fm_kernels.cu's
  moe_kernel): one per MoE layer when a layer's experts run in one cooperative launch, two where
  the device needs the two-launch form;
- kernel_us_by_name: the kernels' device time per token by kernel name (the 20 costliest, names
  cut to 90 characters): [name, kernels per token, microseconds per token]; kernel_us_per_token:
  all kernels' device time per token (1e6 / tok/s less this is the time the GPU is idle per token);
- host_ms_per_token: wall time of the profiled steps less the time the host sat in calls that
  wait for the GPU (stream/event/device synchronize, cudaMemcpyAsync), per token.
  The profiler adds its own per-call cost, so this is an upper bound of the host time.
"""
from __future__ import annotations

import time

import torch

LAUNCH = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
          "cuLaunchKernelEx", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")
# calls in which the host can sit waiting for the GPU (a device-to-host copy into pageable memory
# waits inside cudaMemcpyAsync)
WAIT = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def decode_launches(engine, logits: torch.Tensor, steps: int = 4) -> dict:
    """Profile `steps` greedy decode steps of `engine` from `logits` (the last token's)."""
    from torch.profiler import ProfilerActivity, profile

    if engine.device.type != "cuda":
        return {"host_ms_per_token": None, "launches_per_token": None, "kernels_per_token": None,
                "moe_kernels_per_token": None, "graph_nodes": None, "launch_count_method": "CUDA runs only"}
    tok = int(logits.argmax())
    torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(engine.forward([tok], last_only=True)[-1].argmax())
        wall = time.perf_counter() - t0
    launches = kernels = moe = 0
    wait_us = 0.0
    by_name: dict = {}
    for ev in prof.events():
        name = ev.name
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            if not name.startswith(("Memcpy", "Memset")):
                kernels += 1
                moe += "moe_kernel" in name
                n_us = by_name.setdefault(name[:90], [0, 0.0])
                n_us[0] += 1
                n_us[1] += ev.time_range.elapsed_us()
        else:
            launches += name in LAUNCH
            if name in WAIT:
                wait_us += ev.cpu_time_total
    fast = getattr(engine, "fast", None)
    return {"host_ms_per_token": max(0.0, wall - wait_us / 1e6) * 1e3 / steps,
            "launches_per_token": launches / steps, "kernels_per_token": kernels / steps,
            "moe_kernels_per_token": moe / steps,
            "graph_nodes": (fast.nodes or None) if fast is not None and fast.graph is not None else None,
            "kernel_us_per_token": round(sum(us for _, us in by_name.values()) / steps, 1),
            "kernel_us_by_name": [[n, c / steps, round(us / steps, 2)] for n, (c, us) in
                                  sorted(by_name.items(), key=lambda kv: -kv[1][1])[:20]],
            "profiled_steps": steps,
            "launch_count_method": "torch.profiler: host launch/copy API calls and device kernel records per "
                                   "token; host time = wall - time in synchronize and memcpy calls (profiler "
                                   "overhead included)"}
