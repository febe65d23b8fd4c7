"""Grok-1 (xAI), after llama.cpp's `grok` graph: embeddings times embedding_multiplier_scale,
q·k times attn_output_multiplier then soft-capped at 30 (no 1/sqrt(d)), an RMSNorm after the
attention output and after the experts (four per layer), softmax top-2 renormalised, GeGLU
experts (gelu of `linear`, times `linear_v`, then `linear_1`), logits times
output_multiplier_scale, embeddings tied to the output. Checkpoints in the original layout
(`transformer.decoder_layer.N.multi_head_attention.query`, `moe.E.linear`, `rms_norm_1..3`)."""
from ..hookspecs import hookimpl
from .base import Architecture, ModelConfig, common_fields, need


def config_from_hf(hf: dict) -> ModelConfig:
    a = "grok"
    c = common_fields(hf, a, default_theta=10000.0)
    c.update(tie_word_embeddings=True)
    n = c["num_layers"]
    return ModelConfig(**c, num_experts=int(need(hf, "num_local_experts", a, "num_experts")),
                       moe_intermediate_size=int(hf.get("moe_intermediate_size") or need(hf, "intermediate_size", a)),
                       norm_topk_prob=True, moe_layers=list(range(n)), expert_act="geglu",
                       embed_scale=float(hf.get("embedding_multiplier_scale", 78.38367176906169)),
                       logit_scale=float(hf.get("output_multiplier_scale", 0.5773502691896257)),
                       attn_scale=float(hf.get("attn_output_multiplier", c["head_dim"] ** -0.5)),
                       attn_softcap=float(hf.get("attn_logit_softcapping") or hf.get("max_attn_value") or 30.0),
                       sandwich_norms=True)


ARCH = Architecture(
    "grok", ("grok", "grok-1", "Grok1ForCausalLM", "GrokForCausalLM", "Grok1ModelForCausalLM"), config_from_hf,
    moe_prefix="moe", expert_names=("linear", "linear_v", "linear_1"),
    renames=((r"^transformer\.decoder_layer\.", "layers."), (r"^transformer\.in_out_embed\.", "embed_tokens."),
             (r"^transformer\.rms_norm\.", "norm."), (r"\.moe\.(\d+)\.", r".moe.experts.\1.")),
    rules=((r"rms_norm\.weight$", "attn_norm.weight"), (r"rms_norm_1\.weight$", "attn_post_norm.weight"),
           (r"rms_norm_2\.weight$", "ffn_norm.weight"), (r"rms_norm_3\.weight$", "ffn_post_norm.weight"),
           (r"multi_head_attention\.query\.weight$", "attn.q.weight"),
           (r"multi_head_attention\.key\.weight$", "attn.k.weight"),
           (r"multi_head_attention\.value\.weight$", "attn.v.weight"),
           (r"multi_head_attention\.linear\.weight$", "attn.o.weight"),
           (r"router\.weight$", "moe.router.weight")))


@hookimpl
def register_architectures(register):
    register(ARCH)
