"""Small randomly initialised transformers MoE models with a real tokenizer: the oracles.

Each family is saved with save_pretrained in fp32, exactly as a user's checkpoint would look."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = (
    "Once upon a time there was a small model that streamed its experts from a disk. "
    "It read the weights it needed, kept the hot ones in memory and computed the rest. "
    "The quick brown fox jumps over the lazy dog. Hello world, hello experts, hello cache. "
) * 20

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=80,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, head_dim=32)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                   num_key_value_heads=4)),
    # MLA with a q projection of low rank (as V3), YaRN with DeepSeek's mscale, 4 groups of 2
    # experts of which 2 are eligible, a dense first layer, one shared expert
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=128, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                         routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4,
                         q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                         rope_interleave=True,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # sinks, a window of 8 on layers 0 and 2 (the 64-token tests cross it), YaRN as published
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                     sliding_window=8, attention_bias=True,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                      "original_max_position_embeddings": 4096})),
}


# Hybrid stacks (Gated DeltaNet + gated attention): their own tests (tests/test_hybrid.py).
_HYBRID_TEXT = dict(num_hidden_layers=4, head_dim=32, moe_intermediate_size=64, shared_expert_intermediate_size=80,
                    num_experts=32, num_experts_per_tok=4, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    full_attention_interval=4)  # the real pattern: 3 DeltaNet layers, then attention
HYBRID = {
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(_HYBRID_TEXT, intermediate_size=96, mlp_only_layers=[2], norm_topk_prob=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                         dict(_HYBRID_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                                             "mrope_interleaved": True})),
    # the published layout: a vision-language model, text under text_config, weights under model.language_model.
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", None),
}
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float -> (blocks [..., N/32, 16], scales [..., N/32]): per block of 32 the smallest
    power of two that fits the largest magnitude into e2m1's range, codes by nearest value."""
    from flashmoe_plugin.convert import mxfp4
    E2M1 = torch.tensor(mxfp4.E2M1[:8])
    g = w.reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -100) / 6.0)).to(torch.int32)
    mag = g.abs() / torch.exp2(exp.float())[..., None]
    code = (mag[..., None] - E2M1).abs().argmin(-1) | ((g < 0).long() << 3)
    pairs = code.reshape(*code.shape[:-1], 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def make_model(family: str, out: Path, seed: int = 0, **overrides):
    import transformers

    cfg_name, model_name, extra = {**FAMILIES, **HYBRID}[family]
    torch.manual_seed(seed)
    if extra is None:  # vision-language layout: the text model of qwen3_5_moe_text, a tiny vision tower
        text = {**COMMON, **HYBRID["qwen3_5_moe_text"][2], **overrides}
        cfg = getattr(transformers, cfg_name)(text_config=text, vision_config=VISION, tie_word_embeddings=False)
    else:
        cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_name)(cfg).float().eval()
    # Random init gives near-uniform routers and tiny weights; widen them so routing is decisive
    # and logits are not all alike (a better test of top-k selection and of the numerics).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):  # routers: decisive, as trained ones are
                p.normal_(0, 0.4)
            elif name.endswith(".sinks"):  # gpt-oss: logits of the order of the attention scores
                p.normal_(0, 1.0)
            elif "norm" not in name:
                p.normal_(0, 0.04 if p.dim() > 1 else 0.02)
            if family in HYBRID:  # DeltaNet: varied decays, a conv that matters; norms off their init
                if name.endswith("A_log"):
                    p.copy_(torch.empty_like(p).uniform_(0.05, 0.5).log())
                elif name.endswith("dt_bias"):
                    p.normal_(0, 0.5)
                elif name.endswith("conv1d.weight"):
                    p.normal_(0, 0.3)
                elif "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek: steers the choice, not the weights
                b.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok = make_tokenizer(out)
    return model, tok
