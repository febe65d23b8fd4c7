"""Mixtral: softmax router over all experts, top-k always renormalised, no shared expert."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need


def config_from_hf(hf: dict) -> ModelConfig:
    c = common_fields(hf, "mixtral", default_theta=1e6)
    return ModelConfig(**c, num_experts=int(need(hf, "num_local_experts", "mixtral")),
                       moe_intermediate_size=int(need(hf, "intermediate_size", "mixtral")),
                       norm_topk_prob=True, moe_layers=list(range(c["num_layers"])))


ARCH = Architecture("mixtral", ("mixtral", "MixtralForCausalLM"), config_from_hf,
                    moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"))


@hookimpl
def register_architectures(register):
    register(ARCH)
