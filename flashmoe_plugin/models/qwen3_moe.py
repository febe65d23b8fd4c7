"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert, optional dense-only layers."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need, sparse_layers


def config_from_hf(hf: dict) -> ModelConfig:
    c = common_fields(hf, "qwen3_moe", default_theta=1e6)
    return ModelConfig(**c, num_experts=int(need(hf, "num_experts", "qwen3_moe", "num_local_experts")),
                       moe_intermediate_size=int(need(hf, "moe_intermediate_size", "qwen3_moe")),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                       moe_layers=sparse_layers(hf, "qwen3_moe", c["num_layers"]),
                       dense_intermediate_size=int(hf.get("intermediate_size") or 0),
                       qkv_bias=bool(hf.get("attention_bias", False)), qk_norm="head")


ARCH = Architecture("qwen3_moe", ("qwen3_moe", "Qwen3MoeForCausalLM"), config_from_hf)


@hookimpl
def register_architectures(register):
    register(ARCH)
