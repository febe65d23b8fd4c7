"""GGUF metadata and tensor names -> ModelConfig and the canonical names of layers.py.

llama.cpp names tensors the same way in every family (`blk.N.attn_q.weight`, ...), so one name
table serves all; what differs per family is one row of FAMILIES: our architecture, llama.cpp's
hard-coded top-k renormalisation, the attention variant, and whether the converter permuted q/k
for llama.cpp's interleaved RoPE (the `llama` arch) so that we must undo it. A new family adds a
row (and, if its tensors are new, names to LAYER_NAMES); a row's `extra` reads the family's own
metadata keys, its `names` override a shared name where the family gives it another meaning.
Pure data: no I/O here.

DeepSeek-V3 (`deepseek2`): the converter splits MLA's kv_b into k_b (transposed) and v_b for
llama.cpp's absorbed graph; `merge_dense` puts kv_b back together. gpt-oss (`gpt-oss`): experts
in MXFP4 blocks, expert biases as `ffn_*_exps.bias` (record parts b13/b2), sinks, a sliding
window on even layers (llama.cpp's swa pattern 2), and YaRN as transformers computes it with
`truncate: true` (which is what llama.cpp computes).
"""
from __future__ import annotations

import re

import torch

from .base import ConfigError, ModelConfig

# general.architecture -> how it maps onto our families
# the norm before the experts, which these families' converters name after attention
POST_NORM = {"post_attention_norm.weight": "ffn_norm.weight"}
FAMILIES = {
    # Mixtral is written as arch `llama` with experts; llama.cpp renormalises the top-k weights.
    "llama": dict(arch="mixtral", norm_topk=True, permute_qk=True, qk_norm="none", theta=10000.0),
    "qwen2moe": dict(arch="qwen2_moe", norm_topk=False, qk_norm="none", theta=10000.0),
    "qwen3moe": dict(arch="qwen3_moe", norm_topk=True, qk_norm="head", theta=10000.0),
    "olmoe": dict(arch="olmoe", norm_topk=False, qk_norm="full", theta=10000.0),
    "deepseek2": dict(arch="deepseek_v3", norm_topk=False, qk_norm="none", theta=10000.0,
                      extra=lambda *a: _deepseek2(*a)),
    "gpt-oss": dict(arch="gpt_oss", norm_topk=False, qk_norm="none", theta=150000.0,
                    extra=lambda *a: _gpt_oss(*a), names=POST_NORM),
    # Hybrid stacks (Gated DeltaNet + gated attention). llama.cpp's converter folds the 1 of the
    # (1 + w) norms into the weights (so norm_offset is off here), splits Qwen3-Next's grouped
    # in_proj_qkvz into attn_qkv/attn_gate (the split form of Qwen3.5) but keeps in_proj_ba grouped
    # (ssm_ba), stores -exp(A_log) as ssm_a, and for Qwen3.5 reorders the value heads from grouped
    # by key head to tiled (v_tiled), which fix_dense undoes.
    "qwen3next": dict(arch="qwen3_next", norm_topk=True, qk_norm="head", theta=1e7, hybrid=True, names=POST_NORM),
    "qwen35moe": dict(arch="qwen3_5_moe", norm_topk=True, qk_norm="head", theta=1e7, hybrid=True, v_tiled=True,
                      names=POST_NORM),
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
    "attn_output.bias": "attn.o.bias", "attn_sinks.weight": "attn.sinks", "ffn_gate_inp.bias": "moe.router.bias",
    "attn_q_a.weight": "attn.q_a.weight", "attn_q_a_norm.weight": "attn.q_a_norm.weight",
    "attn_q_b.weight": "attn.q_b.weight", "attn_kv_a_mqa.weight": "attn.kv_a.weight",
    "attn_kv_a_norm.weight": "attn.kv_a_norm.weight", "exp_probs_b.bias": "moe.router.score_bias",
    "attn_k_b.weight": "attn.k_b.weight", "attn_v_b.weight": "attn.v_b.weight",  # merged into kv_b
    # hybrid stacks: the Gated DeltaNet layers
    "attn_qkv.weight": "linear.in_proj_qkv.weight", "attn_gate.weight": "linear.in_proj_z.weight",
    "ssm_ba.weight": "linear.in_proj_ba.weight", "ssm_beta.weight": "linear.in_proj_b.weight",
    "ssm_alpha.weight": "linear.in_proj_a.weight", "ssm_conv1d.weight": "linear.conv1d.weight",
    "ssm_a": "linear.A_log", "ssm_dt.bias": "linear.dt_bias", "ssm_norm.weight": "linear.norm.weight",
    "ssm_out.weight": "linear.out_proj.weight",
}
EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2",
                "ffn_gate_exps.bias": "b1", "ffn_up_exps.bias": "b3", "ffn_down_exps.bias": "b2"}
SKIP = {"rope_freqs.weight"}


def classify(name: str, arch: str | None = None):
    """('dense', canonical) | ('experts', layer, w1|w3|w2|b1|b3|b2) | ('skip', None) | ('unknown', None).
    arch: general.architecture, for the names a family maps its own way."""
    if name in TOP_NAMES:
        return "dense", TOP_NAMES[name]
    if name in SKIP:
        return "skip", None
    m = re.match(r"blk\.(\d+)\.(.+)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest in EXPERT_NAMES:
            return "experts", layer, EXPERT_NAMES[rest]
        own = FAMILIES.get(arch, {}).get("names", {})
        if rest in own or rest in LAYER_NAMES:
            return "dense", f"layers.{layer}.{own.get(rest) or LAYER_NAMES[rest]}"
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
    hybrid = _hybrid_fields(meta, arch, n_layers, int(key("attention.key_length", hidden // heads)), where) \
        if row.get("hybrid") else {}
    norm = meta.get(f"{arch}.expert_weights_norm")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    fields = dict(
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
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos, **hybrid)
    if "extra" in row:
        fields.update(row["extra"](key, shapes, n_layers, where))
    return ModelConfig(**fields)


def _yarn(key, where, **more) -> dict | None:
    """llama.cpp's YaRN keys as transformers' rope parameters (None: plain RoPE)."""
    kind = key("rope.scaling.type", "none", required=False)
    if kind == "none":
        return None
    if kind != "yarn":
        raise ConfigError(f"{where}: rope.scaling.type {kind!r} is not supported for this family")
    return {"factor": float(key("rope.scaling.factor")),
            "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            "beta_fast": float(key("rope.scaling.yarn_beta_fast", 32.0, required=False)),
            "beta_slow": float(key("rope.scaling.yarn_beta_slow", 1.0, required=False)), **more}


def _deepseek2(key, shapes, n_layers, where) -> dict:
    if int(key("expert_gating_func", 1, required=False)) != 2:
        raise ConfigError(f"{where}: deepseek2.expert_gating_func is not 2 (sigmoid): only DeepSeek-V3's "
                          f"sigmoid router is supported (convert with `scoring_func: sigmoid` in config.json)")
    rope = int(key("rope.dimension_count"))
    log_mul = key("rope.scaling.yarn_log_multiplier", None, required=False)
    # the converter stores 0.1 * mscale_all_dim; V3's mscale equals mscale_all_dim (1.0)
    m = {} if log_mul is None else {"mscale": float(log_mul) / 0.1, "mscale_all_dim": float(log_mul) / 0.1}
    q_lora = key("attention.q_lora_rank", None, required=False)
    return dict(num_kv_heads=int(key("attention.head_count")), head_dim=rope, attention="mla",
                q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=int(key("attention.kv_lora_rank")),
                qk_nope_head_dim=int(key("attention.key_length_mla")) - rope,
                v_head_dim=int(key("attention.value_length_mla")), rope_interleave=True,
                router="sigmoid_group", n_group=max(1, int(key("expert_group_count", 1, required=False))),
                topk_group=max(1, int(key("expert_group_used_count", 1, required=False))),
                routed_scaling_factor=float(key("expert_weights_scale", 1.0, required=False)),
                rope_scaling=_yarn(key, where, **m))


def _gpt_oss(key, shapes, n_layers, where) -> dict:
    pattern = key("attention.sliding_window_pattern", 2, required=False)
    if isinstance(pattern, list):
        swa = [i for i, on in enumerate(pattern[:n_layers]) if on]
    else:  # llama_hparams::set_swa_pattern
        n = int(pattern)
        swa = [i for i in range(n_layers) if n == 0 or i % n < n - 1]
    bias = "blk.0.attn_output.bias" in shapes
    return dict(sliding_window=int(key("attention.sliding_window")), sliding_layers=swa, attn_sinks=True,
                o_bias=bias, router="topk_softmax", router_bias=True, expert_act="swiglu_clamped",
                expert_bias=True, rope_scaling=_yarn(key, where, truncate=True))


def rows_only(canon: str) -> bool:
    """Whether fix_dense and finish_dense move only whole rows of this tensor, so that its blocks
    can be kept as they lie in the file; the Gated DeltaNet projections and MLA's split kv_b are
    reshaped across columns."""
    return ".linear." not in canon and not canon.endswith(("attn.k_b.weight", "attn.v_b.weight"))


def merge_dense(out: dict, cfg: ModelConfig):
    """In place: k_b [n, r, dn] and v_b [n, dv, r] (the converter's split) back into MLA's kv_b
    [n * (dn + dv), r]."""
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        if p + "k_b.weight" in out:
            k_b, v_b = out.pop(p + "k_b.weight"), out.pop(p + "v_b.weight")
            out[p + "kv_b.weight"] = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1])


def _hybrid_fields(meta: dict, arch: str, n_layers: int, head_dim: int, where: str) -> dict:
    """The hybrid stack's ModelConfig fields from llama.cpp's ssm.* keys."""
    def key(k):
        v = meta.get(f"{arch}.{k}")
        if v is None:
            raise ConfigError(f"{where}: metadata key '{arch}.{k}' is missing")
        return v
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if recurrent is None:
        every = int(meta.get(f"{arch}.full_attention_interval", 4))
        recurrent = [(i + 1) % every != 0 for i in range(n_layers)]
    if len(recurrent) < n_layers:
        raise ConfigError(f"{where}: {arch}.attention.recurrent_layers lists {len(recurrent)} of {n_layers} layers")
    nv = int(key("ssm.time_step_rank"))
    return dict(layer_types=["linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layers]],
                attn_output_gate=True, norm_offset=False, linear_proj="split",
                partial_rotary_factor=int(key("rope.dimension_count")) / head_dim,
                linear_conv_kernel=int(key("ssm.conv_kernel")), linear_key_head_dim=int(key("ssm.state_size")),
                linear_num_key_heads=int(key("ssm.group_count")), linear_num_value_heads=nv,
                linear_value_head_dim=int(key("ssm.inner_size")) // nv)


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
    if ".linear." in canon:
        if canon.endswith("A_log"):
            w = (-w).log()  # the converter wrote -exp(A_log)
        elif canon.endswith("conv1d.weight"):
            w = w[:, None, :]  # squeezed to [channels, kernel] by the converter
        if FAMILIES[arch].get("v_tiled") and cfg.linear_num_value_heads != cfg.linear_num_key_heads:
            w = _untile_v_heads(canon, w, cfg)
    return w


def _untile(w, dim: int, nk: int, head: int):
    """Value heads along `dim` from llama.cpp's tiled order [v0 of every key head, v1 of every...]
    back to grouped by key head [all v of key head 0, ...] (transformers' order)."""
    shape = list(w.shape)
    r = shape[dim] // (nk * head)
    w = w.reshape(*shape[:dim], r, nk, head, *shape[dim + 1:]).transpose(dim, dim + 1)
    return w.reshape(shape).contiguous()


def _untile_v_heads(canon: str, w, cfg: ModelConfig):
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    leaf = canon.rsplit(".linear.", 1)[1]
    if leaf in ("in_proj_qkv.weight", "conv1d.weight"):  # q and k rows stay, v rows reorder
        qk = 2 * nk * dk
        return torch.cat([w[:qk], _untile(w[qk:], 0, nk, dv)])
    if leaf == "in_proj_z.weight":
        return _untile(w, 0, nk, dv)
    if leaf in ("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias"):
        return _untile(w, 0, nk, 1)
    if leaf == "out_proj.weight":
        return _untile(w, 1, nk, dv)
    return w


def finish_dense(w: dict, cfg: ModelConfig) -> dict:
    """After fix_dense, the tensors the converter split or joined: MLA's kv_b joined back
    (merge_dense); Qwen3-Next's grouped ssm_ba (per key head: r rows of b, then r of a) split
    into the in_proj_b / in_proj_a the split form reads."""
    merge_dense(w, cfg)
    for name in [n for n in w if n.endswith(".linear.in_proj_ba.weight")]:
        ba = w.pop(name)
        r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
        b, a = ba.reshape(cfg.linear_num_key_heads, 2 * r, -1).split([r, r], dim=1)
        p = name[:-len("in_proj_ba.weight")]
        w[p + "in_proj_b.weight"], w[p + "in_proj_a.weight"] = b.reshape(-1, ba.shape[-1]), a.reshape(-1, ba.shape[-1])
    return w
