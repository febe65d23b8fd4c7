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


def make_model(family: str, out: Path, seed: int = 0, **overrides):
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
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
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek: steers the choice, not the weights
                b.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    tok = make_tokenizer(out)
    return model, tok
