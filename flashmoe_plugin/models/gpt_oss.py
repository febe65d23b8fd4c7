"""gpt-oss: attention sinks, a sliding window on alternate layers, biases on every projection,
a router bias with the softmax over the chosen logits, expert biases and the clamped SwiGLU
(experts computed through Backend.expert_general), YaRN RoPE. Checkpoints keep the experts fused
and transposed ([E, H, 2I], gate and up interleaved) in bf16 or MXFP4 (convert/mxfp4.py)."""
import torch

from ..convert import mxfp4
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need


def config_from_hf(hf: dict) -> ModelConfig:
    a = "gpt_oss"
    c = common_fields(hf, a, default_theta=150000.0)
    n = c["num_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(**c, num_experts=int(need(hf, "num_local_experts", a)),
                       moe_intermediate_size=int(need(hf, "intermediate_size", a)), norm_topk_prob=False,
                       moe_layers=list(range(n)), qkv_bias=bias, o_bias=bias, attn_sinks=True,
                       sliding_layers=[i for i, t in enumerate(types) if t == "sliding_attention"],
                       router="topk_softmax", router_bias=True, expert_act="swiglu_clamped", expert_bias=True,
                       swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                       swiglu_limit=float(hf.get("swiglu_limit", 7.0)))


def fused_experts(get, names: dict, cfg: ModelConfig):
    """Ours from the checkpoint's: rows are output features, gate rows then up rows."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def weight(which, transposed_shape, shape):
        if which in names:  # transformers' layout: [E, in, out]
            t = get(names[which])
            if tuple(t.shape) != transposed_shape:
                raise ValueError(f"{names[which]}: shape {tuple(t.shape)}, expected {transposed_shape}")
            return t.transpose(1, 2)
        if which + "_blocks" in names:  # the published MXFP4 layout: [E, out, in / 32, 16]
            t = mxfp4.dequantize(get(names[which + "_blocks"]), get(names[which + "_scales"]))
            if tuple(t.shape) != shape:
                raise ValueError(f"{names[which + '_blocks']}: dequantized to {tuple(t.shape)}, expected {shape}")
            return t
        raise KeyError(f"no {which} expert tensor (gate_up_proj / down_proj, or their _blocks and _scales)")

    def bias(which, n):
        t = get(names[which + "_bias"])
        if tuple(t.shape) != (E, n):
            raise ValueError(f"{names[which + '_bias']}: shape {tuple(t.shape)}, expected {(E, n)}")
        return t

    def deinterleave(t):
        return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)
    w13 = deinterleave(weight("w13", (E, H, 2 * I), (E, 2 * I, H)))
    w2 = weight("w2", (E, I, H), (E, H, I))
    return w13, w2, deinterleave(bias("w13", 2 * I)), bias("w2", H)


ARCH = Architecture("gpt_oss", ("gpt_oss", "GptOssForCausalLM"), config_from_hf, fused_experts=fused_experts, rules=(
    (r"self_attn\.sinks$", "attn.sinks"),
    (r"MOE\.router\.(weight|bias)$", r"moe.router.\1"),
))


@hookimpl
def register_architectures(register):
    register(ARCH)
