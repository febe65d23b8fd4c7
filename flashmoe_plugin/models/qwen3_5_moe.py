"""Qwen3.5-MoE: the hybrid stack (models/hybrid.py) with split DeltaNet projections, every layer
MoE with a gated shared expert, top-k always renormalised. The published checkpoint is a
vision-language model: the text model's config sits under `text_config` and its weights under
`model.language_model.` (the vision tower is ignored); a text-only `qwen3_5_moe_text` checkpoint
reads the same. Its M-RoPE equals plain RoPE for text (all three position streams agree)."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need
from .hybrid import hybrid_fields


def text_config(hf: dict) -> dict:
    """The text model's fields; top-level ones (token ids, tying) fill what text_config lacks."""
    return {**{k: v for k, v in hf.items() if k != "text_config"}, **(hf.get("text_config") or {})}


def config_from_hf(hf: dict) -> ModelConfig:
    t = text_config(hf)
    c = common_fields(t, "qwen3_5_moe", default_theta=1e7)
    return ModelConfig(**c, **hybrid_fields(t, "qwen3_5_moe", c["num_layers"]),
                       num_experts=int(need(t, "num_experts", "qwen3_5_moe")),
                       moe_intermediate_size=int(need(t, "moe_intermediate_size", "qwen3_5_moe")),
                       norm_topk_prob=True, moe_layers=list(range(c["num_layers"])))


ARCH = Architecture("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text", "Qwen3_5MoeForConditionalGeneration",
                                    "Qwen3_5MoeForCausalLM"), config_from_hf)


@hookimpl
def register_architectures(register):
    register(ARCH)
