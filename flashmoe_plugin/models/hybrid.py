"""Hybrid stacks (Qwen3-Next, Qwen3.5-MoE): Gated DeltaNet layers (deltanet.py) interleaved with
full-attention layers whose q_proj also yields a sigmoid gate on the attention output, with
partial RoPE and per-head q/k RMSNorm; the feed-forward side is the shared MoE block.

The cache holds K/V for the attention layers only and the constant-size conv + recurrent state of
each DeltaNet layer. A recurrent state cannot be cut back like a KV cache, so `rewind(n)` (the
engine's truncate) restores the nearest snapshot at or before n and the engine replays the tokens
from there to n. Snapshots are taken at the end of every prefill chunk and every SNAPSHOT_EVERY
decode positions; the newest `snapshots` are kept (each costs `state_bytes()`)."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from . import layers
from .base import ConfigError, need
from .deltanet import conv_dim, gated_deltanet, state_shapes, ungroup_projections
from .layers import SDPA_BACKENDS, Decoder, cache_dims, embed, linear, rms_norm

LINEAR, FULL = "linear_attention", "full_attention"
SNAPSHOT_EVERY = 64


def hybrid_fields(hf: dict, arch: str, n_layers: int) -> dict:
    """The ModelConfig fields both families read the same way."""
    types = hf.get("layer_types")
    if types is None:
        every = int(hf.get("full_attention_interval", 4))
        types = [FULL if (i + 1) % every == 0 else LINEAR for i in range(n_layers)]
    if len(types) != n_layers or set(types) - {LINEAR, FULL}:
        raise ConfigError(f"config.json: layer_types must list {n_layers} entries of {LINEAR!r} or {FULL!r} "
                          f"(got {len(types)}: {sorted(set(types))})")
    rope = hf.get("rope_parameters") or {}
    return dict(layer_types=list(types), attn_output_gate=True, norm_offset=True, qk_norm="head",
                partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))),
                linear_conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)),
                linear_num_key_heads=int(need(hf, "linear_num_key_heads", arch)),
                linear_num_value_heads=int(need(hf, "linear_num_value_heads", arch)),
                linear_key_head_dim=int(need(hf, "linear_key_head_dim", arch)),
                linear_value_head_dim=int(need(hf, "linear_value_head_dim", arch)),
                shared_expert_intermediate_size=int(need(hf, "shared_expert_intermediate_size", arch)),
                shared_expert_gate=True, qkv_bias=bool(hf.get("attention_bias", False)))


def linear_names(c, i: int) -> list[str]:
    p = f"layers.{i}.linear."
    projs = ("in_proj_qkvz", "in_proj_ba") if c.linear_proj == "grouped" else \
        ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    return [p + f"{n}.weight" for n in (*projs, "out_proj", "conv1d", "norm")] + [p + "A_log", p + "dt_bias"]


def required_names(c) -> list[str]:
    """The shared decoder's names, with each DeltaNet layer's tensors in place of attention's."""
    linear = {i for i, t in enumerate(c.layer_types) if t == LINEAR}
    names = [n for n in layers.required_names(replace(c, layer_types=[]))
             if not (n.startswith("layers.") and ".attn." in n and int(n.split(".")[1]) in linear)]
    return names + [n for i in sorted(linear) for n in linear_names(c, i)]


def cache_sizes(c, dtype_bytes: int = 4) -> list[dict]:
    """Per layer: what its cache costs with activations of dtype_bytes (4: fp32, the CPU default).
    DeltaNet: conv state (that dtype) + recurrent state (fp32) bytes, constant in the context;
    attention: K and V bytes per token of context."""
    out = []
    conv, rec = state_shapes(c)
    for i, t in enumerate(c.layer_types or [FULL] * c.num_layers):
        if t == LINEAR:
            out.append({"layer": i, "type": t, "conv_state_bytes": conv[0] * conv[1] * dtype_bytes,
                        "recurrent_state_bytes": rec[0] * rec[1] * rec[2] * 4})
        else:
            k, v = cache_dims(c)  # K and V; MLA: the latent and the rotary key
            out.append({"layer": i, "type": t, "kv_bytes_per_token": (math.prod(k) + math.prod(v)) * dtype_bytes})
    return out


def describe_cache(sizes: list[dict]) -> str:
    """`flashmoe inspect`'s lines for cache_sizes()."""
    from ..sizes import format_size
    lines = []
    for kind, keys in ((FULL, ("kv_bytes_per_token",)), (LINEAR, ("conv_state_bytes", "recurrent_state_bytes"))):
        rows = [r for r in sizes if r["type"] == kind]
        if not rows:
            continue
        what = ", ".join(f"{k.replace('_bytes', '').replace('_', ' ')} {format_size(rows[0][k])} ({rows[0][k]} B)"
                         for k in keys)
        tail = " (constant)" if kind == LINEAR else ""
        lines.append(f"cache, {len(rows)} {kind.replace('_', ' ')} layers: {what} per layer{tail}")
    return "\n".join(lines) + "  [fp32 activations; the CUDA default bf16 halves K/V and conv state]"


class HybridCache:
    """K/V of the attention layers, conv + recurrent states of the DeltaNet layers, snapshots."""

    def __init__(self, cfg, n_ctx: int, dtype: torch.dtype, device, snapshots: int = 4):
        attn = [i for i, t in enumerate(cfg.layer_types) if t == FULL]
        lin = [i for i, t in enumerate(cfg.layer_types) if t == LINEAR]
        self.slot = {i: j for j, i in enumerate(attn)} | {i: j for j, i in enumerate(lin)}
        self.k = torch.zeros((len(attn), n_ctx, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        conv, rec = state_shapes(cfg)
        self.conv = torch.zeros((len(lin), *conv), dtype=dtype, device=device)
        self.rec = torch.zeros((len(lin), *rec), dtype=torch.float32, device=device)
        self.n_ctx, self.pos, self.max_snapshots = n_ctx, 0, snapshots
        self.snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def state_bytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.rec.numel() * self.rec.element_size()

    def begin(self, start: int):
        """Called before a forward over positions start..; the states must be at `start`."""
        if start == 0:
            self.conv.zero_()
            self.rec.zero_()
        elif start != self.pos:
            raise RuntimeError(f"recurrent state is at position {self.pos}, forward starts at {start}: "
                               "truncate (rewind) the cache first")
        self.snapshots = [s for s in self.snapshots if s[0] <= start]  # later ones belong to a discarded past
        self.pos = start

    def end(self, pos: int, T: int):
        self.pos = pos
        if self.max_snapshots and (T > 1 or pos % SNAPSHOT_EVERY == 0):
            keep = [s for s in self.snapshots if s[0] != pos]
            self.snapshots = keep[max(0, len(keep) - self.max_snapshots + 1):]
            self.snapshots.append((pos, self.conv.clone(), self.rec.clone()))

    def rewind(self, n: int) -> int:
        """Go back to position n or, for the recurrent states, to the nearest snapshot before it:
        returns the position reached (the engine replays the tokens from there to n)."""
        if n >= self.pos:
            return self.pos
        best = max((s for s in self.snapshots if s[0] <= n), key=lambda s: s[0], default=None)
        if best is None:
            self.conv.zero_()
            self.rec.zero_()
            self.pos = 0
        else:
            self.pos = best[0]
            self.conv.copy_(best[1])
            self.rec.copy_(best[2])
        return self.pos

    def save(self, n: int) -> dict:
        if n != self.pos:
            raise RuntimeError(f"cannot save the state at {n}: the recurrent state is at position {self.pos}")
        return {"k": self.k[:, :n].clone(), "v": self.v[:, :n].clone(), "conv": self.conv.clone(),
                "rec": self.rec.clone()}

    def load(self, state: dict, n: int):
        self.k[:, :n].copy_(state["k"])
        self.v[:, :n].copy_(state["v"])
        self.conv.copy_(state["conv"])
        self.rec.copy_(state["rec"])
        self.pos, self.snapshots = n, []


class HybridDecoder(Decoder):
    def __init__(self, cfg, weights: dict[str, torch.Tensor]):
        super().__init__(cfg, dict(weights))  # checks the names as stored
        w, c = self.w, cfg
        for i, t in enumerate(c.layer_types):
            if t == LINEAR and c.linear_proj == "grouped":
                ungroup_projections(w, f"layers.{i}.linear.", c)
        if c.norm_offset:  # RMSNorm(x) * (1 + w): fold the 1 in once (not DeltaNet's gated norm)
            for n in [n for n in w if n.endswith("norm.weight") and ".linear." not in n]:
                w[n] = w[n] + 1
        rd = int(c.head_dim * c.partial_rotary_factor)
        dev = w["embed.weight"].device
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.int64, device=dev).float() / rd))
        self.conv_dim = conv_dim(c)

    def new_cache(self, n_ctx: int, dtype: torch.dtype, device) -> HybridCache:
        return HybridCache(self.cfg, n_ctx, dtype, device)

    def attention(self, i: int, x: torch.Tensor, start: int, kv: HybridCache, at: tuple) -> torch.Tensor:
        c, w, p = self.cfg, self.w, f"layers.{i}.attn."
        T, H, D = x.shape[0], c.num_heads, c.head_dim
        q = linear(x, w[p + "q.weight"], w.get(p + "q.bias"))
        gate = None
        if c.attn_output_gate:
            q, gate = q.view(T, H, 2 * D).chunk(2, dim=-1)
            gate = gate.reshape(T, H * D)
        q = rms_norm(q.reshape(T, H, D), w[p + "q_norm.weight"], c.rms_norm_eps)
        k = rms_norm(linear(x, w[p + "k.weight"], w.get(p + "k.bias")).view(T, c.num_kv_heads, D),
                     w[p + "k_norm.weight"], c.rms_norm_eps)
        v = linear(x, w[p + "v.weight"], w.get(p + "v.bias")).view(T, c.num_kv_heads, D)
        cos, sin, mask, _ = at  # no sliding window in hybrid stacks
        rd = cos.shape[-1]
        q = torch.cat([self.rope(q[..., :rd], cos, sin), q[..., rd:]], dim=-1)
        k = torch.cat([self.rope(k[..., :rd], cos, sin), k[..., rd:]], dim=-1)
        s = kv.slot[i]
        kv.k[s, start:start + T] = k
        kv.v[s, start:start + T] = v
        keys, vals = kv.k[s, :start + T], kv.v[s, :start + T]
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys.transpose(0, 1)[None], vals.transpose(0, 1)[None],
                attn_mask=mask, enable_gqa=H != c.num_kv_heads)
        out = out[0].transpose(0, 1).reshape(T, H * D)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return linear(out, w[p + "o.weight"])

    def forward(self, tokens: torch.Tensor, start: int, kv: HybridCache, experts, last_only: bool = False,
                hidden: bool = False):
        c, w = self.cfg, self.w
        kv.begin(start)
        x = embed(tokens, w["embed.weight"])
        T = x.shape[0]
        at = self.positions(start, T, x.dtype, x.device)
        for i, t in enumerate(c.layer_types):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm.weight"], c.rms_norm_eps)
            if t == LINEAR:
                j = kv.slot[i]
                x = x + gated_deltanet(h, w, p + "linear.", c, kv.conv[j], kv.rec[j])
            else:
                x = x + self.attention(i, h, start, kv, at)
            x = x + self.ffn(i, x, experts)
        kv.end(start + T, T)
        if last_only:
            x = x[-1:]
        x = rms_norm(x, w["norm.weight"], c.rms_norm_eps)
        return x.float() if hidden else linear(x, self.lm_head).float()
