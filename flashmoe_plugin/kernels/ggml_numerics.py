"""llama.cpp's float order for the float parts of a quantized GGUF's forward on the CPU: the
router's F32 matmul and softmax, RoPE's angles and rotation, the attention's K.Q, softmax and P.V
(csrc/cpu/fm_ggml_f32.c through flashmoe_plugin._gguf_kernels).

Why: llama.cpp rounds every matmul's input to 8 bits (Q8_0/Q8_K, the CPU backend's gguf_act
"q8"), so a last-bit difference anywhere in the residual stream can flip one quant of a key or
value, and attention carries it to every later position (issue 11). With these, given the same
inputs, each of those ops equals llama.cpp's node bit for bit (tests/test_gguf_numerics.py).

The engine gives its decoder one of these for a GGUF store on a backend computing with
llama.cpp's activations (`numerics_for`); the decoder uses it only for fp32 CPU tensors and
only while the backend's gguf_act is "q8", so float stores and the HF oracles keep torch's ops."""
from __future__ import annotations

import numpy as np
import torch


def _module():
    from .. import _gguf_kernels
    return _gguf_kernels


class GgmlNumerics:
    def __init__(self, backend, interleaved: bool = False):
        self.backend = backend
        self.interleaved = interleaved  # llama.cpp holds q/k rows permuted (GGUF `llama`): its K.Q order

    def active(self, dtype: torch.dtype, device) -> bool:
        return getattr(self.backend, "gguf_act", None) == "q8" and torch.device(device).type == "cpu" \
            and dtype == torch.float32

    @staticmethod
    def scale(head_dim: int) -> float:
        """llama.cpp's kq_scale, 1.0f / sqrtf(head_dim) in fp32."""
        return float(np.float32(1) / np.sqrt(np.float32(head_dim)))

    def matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _module().f32_matmul(x.contiguous(), w.float().contiguous())

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return _module().softmax(x)

    def rope_tables(self, start: int, T: int, n_dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, n_dims] (each half-angle table twice, as layers.Decoder.positions lays
        them out) with ggml's angles: theta = pos, then theta *= base^(-2/n_dims) pair by pair."""
        cos, sin = _module().rope_tables(int(start), int(T), int(n_dims), float(base))
        return torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, d] (pairs (i, i + d/2)) rotated by rope_tables' cos, sin (a new tensor)."""
        h = x.shape[-1] // 2
        return _module().rope_apply_(x.contiguous().clone(), cos[:, 0, :h].contiguous(), sin[:, 0, :h].contiguous())

    def attention(self, q, keys, vals, start: int, scale: float) -> torch.Tensor:
        """q [T, H, d], keys/vals [start + T, Hkv, d] -> [T, H * d], causal."""
        return _module().attention(q.contiguous(), keys.contiguous(), vals.contiguous(), int(start), float(scale),
                                   self.interleaved)


def numerics_for(store, backend):
    """GgmlNumerics for a GGUF store on a backend with llama.cpp's activations, else None."""
    if getattr(store, "meta", None) is None or not hasattr(backend, "gguf_act"):
        return None
    try:
        _module()
    except ImportError:
        return None
    from ..models.gguf import FAMILIES
    return GgmlNumerics(backend, bool(FAMILIES.get(store.arch_key, {}).get("permute_qk")))
