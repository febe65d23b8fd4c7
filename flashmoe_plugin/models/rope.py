"""Rotary position embeddings: plain RoPE and YaRN (DeepSeek-V3, gpt-oss, long-context Qwen).

`frequencies(cfg)` gives the inverse frequencies of the rotary dimension (cfg.head_dim) and the
factor every cos/sin is multiplied by; it follows transformers' `_compute_yarn_parameters`."""
from __future__ import annotations

import math

import torch

from .base import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    y = cfg.rope_scaling
    if not y:
        return 1.0 / pos_freqs, 1.0
    factor = float(y["factor"])
    attention_factor = y.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = y.get("mscale"), y.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                            if mscale and mscale_all else yarn_mscale(factor))
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1
    orig = y["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention_factor)


def softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """1/sqrt(d), times DeepSeek's mscale(all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    y = cfg.rope_scaling
    if y and y.get("mscale_all_dim"):
        m = yarn_mscale(float(y["factor"]), y["mscale_all_dim"])
        scale *= m * m
    return scale
