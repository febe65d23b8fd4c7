"""Qwen3-Next: the hybrid stack (models/hybrid.py) with fused, head-grouped DeltaNet projections
(in_proj_qkvz, in_proj_ba), a gated shared expert and optional dense-only layers."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need, sparse_layers
from .hybrid import hybrid_fields


def config_from_hf(hf: dict) -> ModelConfig:
    c = common_fields(hf, "qwen3_next", default_theta=1e7)
    return ModelConfig(**c, **hybrid_fields(hf, "qwen3_next", c["num_layers"]), linear_proj="grouped",
                       num_experts=int(need(hf, "num_experts", "qwen3_next")),
                       moe_intermediate_size=int(need(hf, "moe_intermediate_size", "qwen3_next")),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                       moe_layers=sparse_layers(hf, "qwen3_next", c["num_layers"]),
                       dense_intermediate_size=int(hf.get("intermediate_size") or 0))


ARCH = Architecture("qwen3_next", ("qwen3_next", "Qwen3NextForCausalLM"), config_from_hf)


@hookimpl
def register_architectures(register):
    register(ARCH)
