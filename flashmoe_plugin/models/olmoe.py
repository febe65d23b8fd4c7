"""OLMoE: RMSNorm over the whole q and k projections (not per head), optional qkv clipping."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need


def config_from_hf(hf: dict) -> ModelConfig:
    c = common_fields(hf, "olmoe", default_theta=10000.0)
    return ModelConfig(**c, num_experts=int(need(hf, "num_experts", "olmoe", "num_local_experts")),
                       moe_intermediate_size=int(need(hf, "intermediate_size", "olmoe")),
                       norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                       moe_layers=list(range(c["num_layers"])),
                       qkv_bias=bool(hf.get("attention_bias", False)), qk_norm="full",
                       clip_qkv=hf.get("clip_qkv"))


ARCH = Architecture("olmoe", ("olmoe", "OlmoeForCausalLM"), config_from_hf)


@hookimpl
def register_architectures(register):
    register(ARCH)
