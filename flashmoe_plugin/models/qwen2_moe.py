"""Qwen2-MoE: qkv biases, a shared expert behind a sigmoid gate, optional dense-only layers."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need, sparse_layers


def config_from_hf(hf: dict) -> ModelConfig:
    c = common_fields(hf, "qwen2_moe", default_theta=1e6)
    return ModelConfig(**c, num_experts=int(need(hf, "num_experts", "qwen2_moe")),
                       moe_intermediate_size=int(need(hf, "moe_intermediate_size", "qwen2_moe")),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                       moe_layers=sparse_layers(hf, "qwen2_moe", c["num_layers"]),
                       dense_intermediate_size=int(hf.get("intermediate_size") or 0),
                       shared_expert_intermediate_size=int(need(hf, "shared_expert_intermediate_size", "qwen2_moe")),
                       shared_expert_gate=True, qkv_bias=bool(hf.get("qkv_bias", True)))


ARCH = Architecture("qwen2_moe", ("qwen2_moe", "Qwen2MoeForCausalLM"), config_from_hf)


@hookimpl
def register_architectures(register):
    register(ARCH)
