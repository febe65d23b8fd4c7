"""What an architecture plugin provides, and the normalised config every family maps onto.

A family file (mixtral.py, qwen3_moe.py, ...) says how its HF config reads into ModelConfig and
how its checkpoint tensor names map onto the canonical names of layers.py. Everything else (the
decoder itself) is shared."""
from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, fields


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    moe_layers: list[int]
    dense_intermediate_size: int = 0          # MLP of layers without experts
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert
    shared_expert_gate: bool = False          # sigmoid gate on the shared expert
    qkv_bias: bool = False
    qk_norm: str = "none"                     # none | head (Qwen3) | full (OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_scaling: dict | None = None          # YaRN parameters (models/rope.py); None: plain RoPE
    # routing: softmax over all experts, then top-k (Mixtral, Qwen, OLMoE) | "sigmoid_group":
    # DeepSeek-V3's sigmoid scores, score bias for the choice only, group-limited top-k, scaling
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # attention: "gqa" (q/k/v projections, cached K and V) | "mla" (DeepSeek's multi-head latent
    # attention: the cache holds the compressed latent and the shared rotary key; head_dim is the
    # rotary part of a query/key head)
    attention: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False             # rotary pairs (x0, x1), (x2, x3), ... (DeepSeek)
    # gpt-oss: a learned per-head logit in every softmax's denominator ("sink"), the sliding
    # window on some layers only, an output-projection bias, a router bias with the softmax over
    # the top-k logits ("topk_softmax"), expert biases and the clamped SwiGLU
    attn_sinks: bool = False
    sliding_layers: list[int] | None = None   # None: the window (if any) applies to every layer
    o_bias: bool = False
    router_bias: bool = False
    expert_act: str = "swiglu"                # swiglu | swiglu_clamped
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Grok-1: scaled embeddings and logits, q·k times attn_scale (None: 1/sqrt(head_dim)) then
    # soft-capped at attn_softcap, an RMSNorm after the attention and after the experts too
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    sandwich_norms: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"store config lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def need(hf: dict, key: str, arch: str, *alternatives: str):
    """A required HF config field, with a message naming it (and its aliases) when absent."""
    for k in (key, *alternatives):
        if k in hf and hf[k] is not None:
            return hf[k]
    names = " or ".join(repr(k) for k in (key, *alternatives))
    raise ConfigError(f"config.json: missing field {names} (required for {arch})")


def rope_theta(hf: dict, arch: str, default: float | None = None) -> float:
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", default))
    if theta is None:
        raise ConfigError(f"config.json: missing field 'rope_theta' (required for {arch})")
    return float(theta)


_YARN_KEYS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "original_max_position_embeddings", "truncate")


def rope_scaling(hf: dict, arch: str) -> dict | None:
    """None for plain RoPE, the YaRN parameters for `rope_type: yarn`; other kinds are refused."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported for {arch} yet")
    out = {k: params[k] for k in _YARN_KEYS if params.get(k) is not None}
    out.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if "factor" not in out:
        raise ConfigError(f"config.json: rope_parameters.factor missing (yarn, {arch})")
    return out


@dataclass
class Architecture:
    """One model family. `names` are the HF `model_type` and `architectures` values it accepts."""
    name: str
    names: tuple[str, ...]
    config_from_hf: object  # callable(hf: dict) -> ModelConfig
    moe_prefix: str = "mlp"                        # HF module holding router + experts
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # w1, w3, w2
    rules: tuple = ()  # the family's own (pattern, canonical) rules, tried before the shared ones
    # callable(get, names, cfg) -> (w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None)
    # for checkpoints whose fused expert tensors are not laid out as ours (gpt-oss); `names` maps
    # w13, w2, w13_bias, w13_blocks, ... to checkpoint tensor names and `get` reads one
    fused_experts: object = None
    renames: tuple = ()  # (pattern, replacement) applied to a checkpoint name before classifying it

    def classify(self, hf_name: str):
        """Map an HF tensor name to ('dense', canonical) | ('expert', layer, e, which) |
        ('fused', layer, which) | ('skip', None). `which` is w1 | w3 | w2 | w13."""
        name = hf_name
        for pat, repl in self.renames:
            name = re.sub(pat, repl, name)
        name = re.sub(r"^(model\.language_model\.|model\.)", "", name)
        m = re.match(r"layers\.(\d+)\.(.+)$", name)
        if not m:
            return ("dense", _TOP.get(name, name)) if name in _TOP else ("skip", None)
        layer, rest = int(m.group(1)), m.group(2)
        p = re.escape(self.moe_prefix)
        w1, w3, w2 = (re.escape(n) for n in self.expert_names)
        if mm := re.match(rf"{p}\.experts\.(\d+)\.({w1}|{w3}|{w2})\.weight$", rest):
            which = {self.expert_names[0]: "w1", self.expert_names[1]: "w3", self.expert_names[2]: "w2"}[mm.group(2)]
            return ("expert", layer, int(mm.group(1)), which)
        if mm := re.match(rf"(?:{p}|mlp)\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$", rest):
            return ("fused", layer, ("w13" if mm.group(1) == "gate_up_proj" else "w2") + (mm.group(2) or ""))
        for pat, canon in (*self.rules, *_LAYER_RULES):
            if mm := re.match(pat.replace("MOE", f"(?:{p}|mlp)"), rest):
                return ("dense", f"layers.{layer}." + mm.expand(canon))
        return ("skip", None)


_TOP = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
_LAYER_RULES = [
    (r"input_layernorm\.weight$", "attn_norm.weight"),
    (r"post_attention_layernorm\.weight$", "ffn_norm.weight"),
    (r"self_attn\.([qkvo])_proj\.(weight|bias)$", r"attn.\1.\2"),
    (r"self_attn\.([qk])_norm\.weight$", r"attn.\1_norm.weight"),
    (r"MOE\.gate\.weight$", "moe.router.weight"),
    (r"MOE\.shared_expert\.(gate|up|down)_proj\.weight$", r"moe.shared.\1.weight"),
    (r"MOE\.shared_expert_gate\.weight$", "moe.shared_gate.weight"),
    (r"mlp\.(gate|up|down)_proj\.weight$", r"mlp.\1.weight"),
]


def sparse_layers(hf: dict, arch: str, n_layers: int) -> list[int]:
    """Qwen-style `decoder_sparse_step` / `mlp_only_layers` selection of the MoE layers."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]


def common_fields(hf: dict, arch: str, default_theta: float | None = None) -> dict:
    hidden = int(need(hf, "hidden_size", arch))
    heads = int(need(hf, "num_attention_heads", arch))
    return dict(
        architecture=arch,
        vocab_size=int(need(hf, "vocab_size", arch)),
        hidden_size=hidden,
        num_layers=int(need(hf, "num_hidden_layers", arch)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(hf, arch, default_theta),
        rope_scaling=rope_scaling(hf, arch),
        top_k=int(need(hf, "num_experts_per_tok", arch)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        sliding_window=hf.get("sliding_window") or None if hf.get("use_sliding_window", True) else None,
    )
