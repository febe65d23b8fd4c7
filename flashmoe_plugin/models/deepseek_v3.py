"""DeepSeek-V3 (and V2-style checkpoints saved as deepseek_v3): multi-head latent attention
(models/mla.py), sigmoid router scores with a bias used only for the choice, group-limited
top-k, routed_scaling_factor, always-on shared experts, dense first layers."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need


def config_from_hf(hf: dict) -> ModelConfig:
    a = "deepseek_v3"
    c = common_fields(hf, a, default_theta=10000.0)
    n = c["num_layers"]
    first_dense, freq = int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1)
    moe_inter = int(need(hf, "moe_intermediate_size", a))
    c.update(num_kv_heads=c["num_heads"], head_dim=int(need(hf, "qk_rope_head_dim", a)))
    return ModelConfig(**c, num_experts=int(need(hf, "n_routed_experts", a)), moe_intermediate_size=moe_inter,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                       moe_layers=[i for i in range(first_dense, n) if i % freq == 0],
                       dense_intermediate_size=int(hf.get("intermediate_size") or 0),
                       shared_expert_intermediate_size=moe_inter * int(hf.get("n_shared_experts") or 0),
                       router="sigmoid_group", n_group=int(hf.get("n_group") or 1),
                       topk_group=int(hf.get("topk_group") or 1),
                       routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
                       attention="mla", q_lora_rank=hf.get("q_lora_rank"),
                       kv_lora_rank=int(need(hf, "kv_lora_rank", a)),
                       qk_nope_head_dim=int(need(hf, "qk_nope_head_dim", a)),
                       v_head_dim=int(need(hf, "v_head_dim", a)),
                       rope_interleave=bool(hf.get("rope_interleave", True)))


ARCH = Architecture("deepseek_v3", ("deepseek_v3", "DeepseekV3ForCausalLM"), config_from_hf, rules=(
    (r"self_attn\.(q_a|q_b|kv_b)_proj\.(weight|bias)$", r"attn.\1.\2"),
    (r"self_attn\.kv_a_proj_with_mqa\.(weight|bias)$", r"attn.kv_a.\1"),
    (r"self_attn\.(q_a|kv_a)_layernorm\.weight$", r"attn.\1_norm.weight"),
    (r"MOE\.gate\.e_score_correction_bias$", "moe.router.score_bias"),
    (r"MOE\.shared_experts\.(gate|up|down)_proj\.weight$", r"moe.shared.\1.weight"),
))


@hookimpl
def register_architectures(register):
    register(ARCH)
