"""MXFP4 (OCP microscaling, as in gpt-oss checkpoints): blocks of 32 e2m1 values sharing one e8m0
scale. `*_blocks` uint8 [..., G, 16] holds two 4-bit codes per byte (low nibble first);
`*_scales` uint8 [..., G] the exponents, biased by 127. Dequantized exactly (every value is a
small float times a power of two)."""
from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] codes and [..., G] exponents -> float32 [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(E2M1, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()      # [..., G, 16, 2]
    vals = lut[codes].flatten(-3)                                         # [..., G * 32]
    exps = (scales.to(torch.int32) - 127).repeat_interleave(32, dim=-1)
    return torch.ldexp(vals, exps)
