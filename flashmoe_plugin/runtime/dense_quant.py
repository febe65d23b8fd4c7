"""The dense part (attention projections, dense and shared MLPs, output head, embedding) held
packed at run time (`Engine(dense_quant=...)`, `--dense-quant`), computed by Backend.linear
through kernels/packed.py instead of being dequantized to floats at load.

    none   every dense matrix as a float tensor in the activation dtype (fp32 on CPU, bf16 on
           GPUs): exact against the oracles; a Q4_0 GGUF's 0.9 GB of dense blocks become 6.4 GB
           of fp32 for Mixtral
    q8/q4  our group formats, quantized at load (held-out perplexity of the demo model +0.1% /
           +1.6%, benchmarks/results/devbox-dense-quant-ppl.json); q8 by the one-pass absmax
           quantizer (quant.quantize_q8_absmax: seconds for Mixtral's dense part, where the
           searched fit of the converter takes minutes on 2 cores)
    keep   a GGUF's blocks (q4_0, q8_0, q4_k, q6_k, ...) kept as they lie in the file, or a
           store's dense matrices in their stored dtype (bf16: half of fp32's RAM on CPU)
    auto   (the default) on CPU, keep for a GGUF whose dense matrices are in block formats
           (what llama.cpp computes too); q8 when RAM is tight (the experts and the stored dense
           part exceed the free RAM: Mixtral's 3.2 GB of bf16 becomes 1.7 GB, ~15 more expert
           records, and its GEMVs read half the bytes); none otherwise (the float oracles stay
           exact). On GPUs q8 for a store whose experts are quantized, with 16-bit activations:
           the dense part is a third of a q4 token's bytes there, and q8 decodes Mixtral 1.2x
           faster than bf16 (H200: 291 against 241 tok/s) for +0.12% held-out perplexity;
           none (exact) for float stores, fp32 activations (the oracle runs) and GGUFs (CUDA
           has no fused GEMV for llama.cpp's blocks yet; requantizing them would add a second
           rounding)

Only the matrices the decoder multiplies through models.layers.linear/embed are packed (PACKED
below); routers (whose choice decides what is read), norms and the MLA kv_b matrix (used in
pieces) stay float tensors. A matrix a format cannot hold (q8/q4 need in % 64 == 0) stays float.
"""
from __future__ import annotations

import torch

from .. import quant
from ..kernels.packed import PackedWeight

MODES = ("auto", "none", "q8", "q4", "keep")
# canonical-name suffixes of the weights the models compute through layers.linear / layers.embed
PACKED = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "attn.q_a.weight",
          "attn.q_b.weight", "attn.kv_a.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight",
          "moe.shared.gate.weight", "moe.shared.up.weight", "moe.shared.down.weight",
          "linear.in_proj_qkv.weight", "linear.in_proj_z.weight", "linear.out_proj.weight")
TOP = ("embed.weight", "lm_head.weight")


def packable(name: str) -> bool:
    return name in TOP or name.endswith(PACKED)


def resolve(mode: str | None, store, device="cpu", free: int | None = None, dtype: torch.dtype | None = None) -> str:
    """The mode a store runs with (auto as the module's docstring says): `free` is the free RAM,
    `dtype` the activations' dtype."""
    mode = "auto" if mode is None else str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"dense_quant must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    if torch.device(device).type != "cpu":
        quantized = getattr(store, "meta", None) is None and getattr(store, "quant", None) in quant.QUANT_BITS
        return "q8" if quantized and dtype in (torch.bfloat16, torch.float16) else "none"
    if _gguf_blocks(store):
        return "keep"
    if free is not None and getattr(store, "meta", None) is None and store.expert_bytes + stored_bytes(store) > free:
        return "q8"
    return "none"


def stored_bytes(store) -> int:
    """Bytes of the dense part as stored (a store's dense.safetensors, a GGUF's dense tensors)."""
    return getattr(store, "dense_bytes", None) or (store.path / "dense.safetensors").stat().st_size


def _gguf_blocks(store) -> bool:
    from ..quant_gguf import format_of_type, is_block_format
    tensors = getattr(store, "tensors", None)
    if getattr(store, "meta", None) is None or not tensors:
        return False
    from ..models import gguf as names
    return any(names.classify(n)[0] == "dense" and len(t.shape) == 2 and is_block_format(format_of_type(t.type) or "")
               for n, t in tensors.items())


def load(store, mode: str, device: torch.device, dtype: torch.dtype, backend) -> dict:
    """The decoder's weight dict: float tensors on device in dtype, and PackedWeights where the
    mode packs. Converted one tensor at a time (the float copy of the whole dense part never
    exists at once)."""
    mode = resolve(mode, store, device)
    if mode == "none":
        return store.load_dense(device, dtype)
    gguf = getattr(store, "meta", None) is not None
    raw = store.load_dense("cpu", None, keep=True) if gguf and mode == "keep" else store.load_dense("cpu", None)
    out = {}
    for name in list(raw):
        w = raw.pop(name)
        t = out[name] = _one(name, w, "keep_blocks" if gguf and mode == "keep" else mode, device, dtype, backend)
        if mode in ("q8", "q4") and isinstance(t, torch.Tensor) and t.data_ptr() == w.data_ptr():
            out[name] = t.clone()  # a norm or router still in the mapped file would keep all of it mapped
    return out


def _one(name: str, w, mode: str, device, dtype, backend):
    if isinstance(w, quant.Packed):  # a GGUF's blocks
        if packable(name):
            return PackedWeight(w.data.to(device), w.fmt, w.shape, backend, dtype)
        return quant.dequantize(w.data, w.fmt, w.shape, dtype).to(device)
    if not packable(name) or w.dim() != 2 or mode == "keep_blocks":  # a GGUF's float tensors stay floats
        return w.to(device=device, dtype=dtype)
    if mode == "keep":  # a store's float matrix in its stored dtype (bf16/f16/f32), as a raw part
        fmt = quant.DTYPE_FORMATS.get(w.dtype)
        if fmt is None:
            return w.to(device=device, dtype=dtype)
        data = w.contiguous().view(-1).view(torch.uint8)
        return PackedWeight(data.to(device), fmt, w.shape, backend, dtype)
    if w.shape[1] % quant.GROUP:
        return w.to(device=device, dtype=dtype)
    return PackedWeight.quantize(w, mode, backend, dtype, device, fit="absmax" if mode == "q8" else "search")


def dense_bytes(weights: dict) -> int:
    """Bytes the dense part holds (packed and float, tied weights counted once)."""
    seen, n = set(), 0
    for w in weights.values():
        t = w.data if isinstance(w, PackedWeight) else w
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n
