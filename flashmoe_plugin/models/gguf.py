"""GGUF metadata and tensor names -> ModelConfig and the canonical names of layers.py.

llama.cpp names tensors the same way in every family (`blk.N.attn_q.weight`, ...), so one name
table serves all; what differs per family is one row of FAMILIES: our architecture, llama.cpp's
hard-coded top-k renormalisation, the attention variant, and whether the converter permuted q/k
for llama.cpp's interleaved RoPE (the `llama` arch) so that we must undo it. A new family adds a
row (and, if its tensors are new, names to LAYER_NAMES). Pure data: no I/O here.
"""
from __future__ import annotations

import re

from .base import ConfigError, ModelConfig

# general.architecture -> how it maps onto our families
FAMILIES = {
    # Mixtral is written as arch `llama` with experts; llama.cpp renormalises the top-k weights.
    "llama": dict(arch="mixtral", norm_topk=True, permute_qk=True, qk_norm="none", theta=10000.0),
    "qwen2moe": dict(arch="qwen2_moe", norm_topk=False, qk_norm="none", theta=10000.0),
    "qwen3moe": dict(arch="qwen3_moe", norm_topk=True, qk_norm="head", theta=10000.0),
    "olmoe": dict(arch="olmoe", norm_topk=False, qk_norm="full", theta=10000.0),
}

TOP_NAMES = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attn.q.weight", "attn_k.weight": "attn.k.weight", "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "attn_q.bias": "attn.q.bias", "attn_k.bias": "attn.k.bias", "attn_v.bias": "attn.v.bias",
    "attn_q_norm.weight": "attn.q_norm.weight", "attn_k_norm.weight": "attn.k_norm.weight",
    "ffn_gate_inp.weight": "moe.router.weight",
    "ffn_gate_shexp.weight": "moe.shared.gate.weight", "ffn_up_shexp.weight": "moe.shared.up.weight",
    "ffn_down_shexp.weight": "moe.shared.down.weight", "ffn_gate_inp_shexp.weight": "moe.shared_gate.weight",
    "ffn_gate.weight": "mlp.gate.weight", "ffn_up.weight": "mlp.up.weight", "ffn_down.weight": "mlp.down.weight",
}
EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}
SKIP = {"rope_freqs.weight"}


def classify(name: str):
    """('dense', canonical) | ('experts', layer, w1|w3|w2) | ('skip', None) | ('unknown', None)."""
    if name in TOP_NAMES:
        return "dense", TOP_NAMES[name]
    if name in SKIP:
        return "skip", None
    m = re.match(r"blk\.(\d+)\.(.+)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest in EXPERT_NAMES:
            return "experts", layer, EXPERT_NAMES[rest]
        if rest in LAYER_NAMES:
            return "dense", f"layers.{layer}.{LAYER_NAMES[rest]}"
    return "unknown", None


def family(meta: dict, where: str) -> tuple[str, dict]:
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{where}: metadata key 'general.architecture' is missing")
    if arch not in FAMILIES:
        raise ConfigError(f"{where}: general.architecture {arch!r} is not supported; supported: "
                          f"{', '.join(sorted(FAMILIES))}")
    return arch, FAMILIES[arch]


def config_from_gguf(meta: dict, shapes: dict[str, tuple], where: str) -> ModelConfig:
    """meta: GGUF key -> value; shapes: tensor name -> numpy-order shape (rows first)."""
    arch, row = family(meta, where)

    def key(k, default=None, required=True):
        v = meta.get(f"{arch}.{k}", default)
        if v is None and required:
            raise ConfigError(f"{where}: metadata key '{arch}.{k}' is missing")
        return v

    hidden, n_layers = int(key("embedding_length")), int(key("block_count"))
    heads = int(key("attention.head_count"))
    kv = key("attention.head_count_kv", heads)
    kv = int(kv[0] if isinstance(kv, list) else kv)
    n_exp, top_k = int(key("expert_count")), int(key("expert_used_count"))
    if n_exp <= 1:
        raise ConfigError(f"{where}: {arch}.expert_count is {n_exp}: not a mixture-of-experts model")
    moe_layers = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    if not moe_layers:
        raise ConfigError(f"{where}: no tensor blk.N.ffn_gate_inp.weight: no routed experts found")
    gate = shapes.get(f"blk.{moe_layers[0]}.ffn_gate_exps.weight")
    if gate is None:
        raise ConfigError(f"{where}: tensor blk.{moe_layers[0]}.ffn_gate_exps.weight is missing")
    vocab = shapes.get("token_embd.weight")
    if vocab is None:
        raise ConfigError(f"{where}: tensor token_embd.weight is missing")
    shexp = shapes.get(f"blk.{moe_layers[0]}.ffn_gate_shexp.weight")
    norm = meta.get(f"{arch}.expert_weights_norm")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=row["arch"], vocab_size=int(vocab[0]), hidden_size=hidden, num_layers=n_layers,
        num_heads=heads, num_kv_heads=kv,
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", row["theta"])),
        num_experts=n_exp, top_k=top_k, moe_intermediate_size=int(gate[1]),
        norm_topk_prob=bool(row["norm_topk"] if norm is None else norm), moe_layers=moe_layers,
        dense_intermediate_size=int(key("feed_forward_length", 0, required=False) or 0),
        shared_expert_intermediate_size=int(shexp[0]) if shexp is not None else 0,
        shared_expert_gate=f"blk.{moe_layers[0]}.ffn_gate_inp_shexp.weight" in shapes,
        qkv_bias="blk.0.attn_q.bias" in shapes, qk_norm=row["qk_norm"],
        tie_word_embeddings="output.weight" not in shapes,
        max_position_embeddings=int(key("context_length", 4096, required=False)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos)


def unpermute_qk(w, n_head: int):
    """Undo convert_hf_to_gguf's q/k row permutation for llama.cpp's interleaved RoPE (arch
    `llama`): back to the half-split order our rotate_half expects. w: [n_head*head_dim, ...]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fix_dense(canon: str, w, cfg: ModelConfig, arch: str):
    """A dense tensor as layers.py wants it (torch tensor in, torch tensor out)."""
    if FAMILIES[arch].get("permute_qk"):
        if canon.endswith("attn.q.weight"):
            return unpermute_qk(w, cfg.num_heads)
        if canon.endswith("attn.k.weight"):
            return unpermute_qk(w, cfg.num_kv_heads)
    if canon.endswith("moe.shared_gate.weight") and w.dim() == 1:
        return w[None, :]
    return w
