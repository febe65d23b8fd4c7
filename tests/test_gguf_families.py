"""The GGUF name table's family rows (models/gguf.py) on metadata alone: DeepSeek-V3's kv_b
rejoined from the converter's k_b/v_b split, gpt-oss's sliding-window pattern, and the errors
for what we do not compute. (The whole families run against llama.cpp in test_gguf_oracles.py.)"""
import pytest
import torch

from flashmoe_plugin.models import gguf as names
from flashmoe_plugin.models.base import ConfigError


def deepseek_meta(**over):
    a = "deepseek2."
    meta = {"general.architecture": "deepseek2", a + "embedding_length": 64, a + "block_count": 2,
            a + "attention.head_count": 4, a + "attention.head_count_kv": 1, a + "expert_count": 8,
            a + "expert_used_count": 2, a + "expert_gating_func": 2, a + "rope.dimension_count": 8,
            a + "attention.kv_lora_rank": 32, a + "attention.key_length_mla": 24,
            a + "attention.value_length_mla": 16, a + "attention.key_length": 40, a + "expert_group_count": 4,
            a + "expert_group_used_count": 2, a + "expert_weights_scale": 2.5}
    meta.update({a + k: v for k, v in over.items()})
    return meta


SHAPES = {"token_embd.weight": (100, 64), "blk.1.ffn_gate_inp.weight": (8, 64),
          "blk.1.ffn_gate_exps.weight": (8, 32, 64)}


def test_deepseek2_config():
    c = names.config_from_gguf(deepseek_meta(), SHAPES, "x.gguf")
    assert (c.architecture, c.attention, c.router, c.moe_layers) == ("deepseek_v3", "mla", "sigmoid_group", [1])
    assert (c.num_kv_heads, c.head_dim, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank) == (4, 8, 16, 16, 32)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.q_lora_rank) == (4, 2, 2.5, None)


def test_deepseek2_softmax_router_is_refused():
    with pytest.raises(ConfigError, match=r"x\.gguf: deepseek2\.expert_gating_func .*scoring_func: sigmoid"):
        names.config_from_gguf(deepseek_meta(expert_gating_func=1), SHAPES, "x.gguf")


def test_kv_b_rejoined_from_the_converters_split():
    """convert_hf_to_gguf.py's DeepseekV2Model: kv_b [n*(dn+dv), r] -> k_b [n, r, dn] (transposed)
    and v_b [n, dv, r]; merge_dense undoes it exactly."""
    c = names.config_from_gguf(deepseek_meta(), SHAPES, "x.gguf")
    n, dn, dv, r = 4, 16, 16, 32
    kv_b = torch.randn(n * (dn + dv), r)
    k_b, v_b = torch.split(kv_b.view(n, dn + dv, r), [dn, dv], dim=1)
    out = {"layers.0.attn.k_b.weight": k_b.transpose(1, 2).contiguous(), "layers.0.attn.v_b.weight": v_b.contiguous()}
    names.merge_dense(out, c)
    assert list(out) == ["layers.0.attn.kv_b.weight"] and torch.equal(out["layers.0.attn.kv_b.weight"], kv_b)


@pytest.mark.parametrize("pattern,want", [(None, [0, 2]), (3, [0, 1, 3]), ([True, False, False, True], [0, 3])])
def test_gpt_oss_sliding_layers(pattern, want):
    """llama.cpp's set_swa_pattern (default 2 for gpt-oss: even layers) or an explicit per-layer array."""
    a = "gpt-oss."
    meta = {"general.architecture": "gpt-oss", a + "embedding_length": 64, a + "block_count": 4,
            a + "attention.head_count": 4, a + "expert_count": 8, a + "expert_used_count": 2,
            a + "attention.sliding_window": 128}
    if pattern is not None:
        meta[a + "attention.sliding_window_pattern"] = pattern
    shapes = {"token_embd.weight": (100, 64), "blk.0.attn_output.bias": (64,),
              **{f"blk.{i}.ffn_gate_inp.weight": (8, 64) for i in range(4)}, "blk.0.ffn_gate_exps.weight": (8, 32, 64)}
    c = names.config_from_gguf(meta, shapes, "x.gguf")
    assert c.sliding_layers == want and c.sliding_window == 128 and c.attn_sinks and c.o_bias and c.expert_bias
    assert names.classify("blk.3.post_attention_norm.weight", "gpt-oss") == ("dense", "layers.3.ffn_norm.weight")
    assert names.classify("blk.3.post_attention_norm.weight", "qwen3moe")[0] == "unknown"
