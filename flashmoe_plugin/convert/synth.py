"""`flashmoe synth --like MODEL`: a store with a real model's exact expert and dense shapes and
random weights, written straight to disk so a machine can be measured without the download.

Fast by construction: no per-element Python and no quantization search. One pool of random
64-bit words is drawn once (seeded); each record is a rotation of it XORed with a per-record
random key (numpy, in place, several GB/s), then its scale sections are turned into plausible
fp16 scales (a fixed exponent, random mantissa: the magnitude a ~0.02-std weight would get) and
its bias sections into -levels/2 x scale. Raw formats (bf16/f16/f32) get random signs and
mantissas with a fixed exponent. Magnitudes follow the fan-in (weight std ~ 0.5/sqrt(in), so
activations neither vanish nor explode through the layers), routers are decisive (logit std
~ 2) and embeddings large (|e| in [1, 2)) so that each token, not the attention output shared by
all positions, decides its routing. Records are checksummed (crc32c) and
written through StoreWriter (atomic). Routing is whatever random routers give: near-uniform and
temporally uncorrelated (a cache's worst case; a profiled real model is kinder).

Where our architectures do not cover a model exactly, the dense part uses the closest supported
one with the real expert shapes; the manifest's `source.approximations` says what differs.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import quant as Q
from ..models.base import ModelConfig
from ..models import mla
from ..models.layers import required_names
from ..store.layout import RecordLayout
from ..store.writer import StoreWriter
from .errors import ConvertError

_COMMON = dict(rms_norm_eps=1e-6, norm_topk_prob=True, bos_token_id=256, eos_token_id=258)
# the published gpt-oss configs: 2880 wide, 64 query and 8 KV heads of 64, window 128 on even
# layers, sinks, biases, top-4 of the experts, YaRN x32
_GPT_OSS = dict(architecture="gpt_oss", vocab_size=201088, hidden_size=2880, num_heads=64, num_kv_heads=8,
                head_dim=64, rope_theta=150000.0, top_k=4, moe_intermediate_size=2880, norm_topk_prob=False,
                max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=128, qkv_bias=True, o_bias=True,
                attn_sinks=True, router="topk_softmax", router_bias=True, expert_act="swiglu_clamped",
                expert_bias=True, rope_scaling={"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 4096})
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(architecture="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, rope_theta=1e6, num_experts=8, top_k=2,
                         moe_intermediate_size=14336, max_position_embeddings=32768, rms_norm_eps=1e-5),
    "mixtral-8x22b": dict(architecture="mixtral", vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48,
                          num_kv_heads=8, head_dim=128, rope_theta=1e6, num_experts=8, top_k=2,
                          moe_intermediate_size=16384, max_position_embeddings=65536, rms_norm_eps=1e-5),
    "qwen3-30b-a3b": dict(architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, rope_theta=1e6, num_experts=128, top_k=8,
                          moe_intermediate_size=768, qk_norm="head", max_position_embeddings=40960),
    "qwen3.5-397b-a17b": dict(architecture="qwen3_moe", vocab_size=248320, hidden_size=4096, num_layers=60,
                              num_heads=32, num_kv_heads=2, head_dim=256, rope_theta=1e7, num_experts=512, top_k=10,
                              moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                              shared_expert_gate=True, qk_norm="head", max_position_embeddings=262144),
    "deepseek-v3": dict(architecture="deepseek_v3", vocab_size=129280, hidden_size=7168, num_layers=61,
                        num_heads=128, num_kv_heads=128, head_dim=64, rope_theta=1e4, num_experts=256, top_k=8,
                        moe_intermediate_size=2048, shared_expert_intermediate_size=2048,
                        dense_intermediate_size=18432, max_position_embeddings=163840, router="sigmoid_group",
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, attention="mla", q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128, rope_interleave=True,
                        rope_scaling={"factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}),
    "gpt-oss-120b": dict(_GPT_OSS, num_layers=36, num_experts=128, sliding_layers=list(range(0, 36, 2))),
    "gpt-oss-20b": dict(_GPT_OSS, num_layers=24, num_experts=32, sliding_layers=list(range(0, 24, 2))),
    "grok-1": dict(architecture="grok", vocab_size=131072, hidden_size=6144, num_layers=64, num_heads=48,
                   num_kv_heads=8, head_dim=128, rope_theta=1e4, num_experts=8, top_k=2, moe_intermediate_size=32768,
                   max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, expert_act="geglu",
                   embed_scale=78.38367176906169, logit_scale=0.5773502691896257,
                   attn_scale=0.08838834764831845, attn_softcap=30.0, sandwich_norms=True),
    # not a real model: a few MB, for tests and smoke runs
    "tiny": dict(architecture="mixtral", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, rope_theta=1e4, num_experts=8, top_k=2, moe_intermediate_size=256,
                 max_position_embeddings=4096),
}
LIKE_CHOICES = tuple(PRESETS)
FIRST_DENSE = {"deepseek-v3": 3}
APPROXIMATIONS = {
    "qwen3.5-397b-a17b": [
        "attention: every layer is full GQA attention (32 heads, 2 KV heads, head_dim 256, the shape of the "
        "model's full-attention layers); the real model has 45 Gated DeltaNet + 15 full-attention layers",
        "router: softmax top-k with renormalisation (qwen3_moe); K=10 is the model default (Flash-MoE ran K=4)",
        "vocabulary: 248320 ids for the embedding shape; the tokenizer is a byte-level stand-in"],
    "deepseek-v3": [
        "the multi-token-prediction layer is left out; first 3 layers dense (fewer when --layers is small)"],
}
SEED_POOL_WORDS = 1 << 23  # 64 MiB of random words, rotated and XORed into every record
_Q_STD = {"q8": 73.6, "q4": 4.61, "q2": 1.12}  # std of uniformly random codes


def _log2_floor(x: float) -> int:
    return math.floor(math.log2(x))


def weight_std(fan_in: int) -> float:
    return 0.5 / math.sqrt(fan_in)


def config_for(like: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig a synth store of `like` gets (first `layers` layers of the model)."""
    if like not in PRESETS:
        raise ConvertError(f"unknown --like {like!r}; choose one of {', '.join(LIKE_CHOICES)}")
    d = {**_COMMON, **PRESETS[like]}
    n = int(layers or d["num_layers"])
    if n < 1:
        raise ConvertError("--layers must be at least 1")
    first_dense = min(FIRST_DENSE.get(like, 0), n - 1)
    d.update(num_layers=n, moe_layers=list(range(first_dense, n)))
    if d.get("sliding_layers") is not None:
        d["sliding_layers"] = [i for i in d["sliding_layers"] if i < n]
    return ModelConfig(**d)


def store_bytes(cfg: ModelConfig, quant: str) -> tuple[int, int]:
    """(expert bytes, dense bytes) a synth store of this config takes."""
    layout = RecordLayout.build(quant, cfg.hidden_size, cfg.moe_intermediate_size, cfg.expert_bias)
    dense = sum(int(np.prod(s)) * 2 for s in _dense_shapes(cfg).values())
    return len(cfg.moe_layers) * cfg.num_experts * layout.size, dense


def _dense_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, hd = c.hidden_size, c.head_dim
    shapes = {}
    for name in required_names(c):
        leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
        shapes[name] = {
            "embed.weight": (c.vocab_size, H), "lm_head.weight": (c.vocab_size, H), "norm.weight": (H,),
            "attn_norm.weight": (H,), "ffn_norm.weight": (H,), "attn_post_norm.weight": (H,),
            "ffn_post_norm.weight": (H,),
            "attn.q.weight": (c.num_heads * hd, H), "attn.k.weight": (c.num_kv_heads * hd, H),
            "attn.v.weight": (c.num_kv_heads * hd, H), "attn.o.weight": (H, c.num_heads * hd),
            "attn.q.bias": (c.num_heads * hd,), "attn.k.bias": (c.num_kv_heads * hd,),
            "attn.v.bias": (c.num_kv_heads * hd,),
            "attn.q_norm.weight": (hd,) if c.qk_norm == "head" else (c.num_heads * hd,),
            "attn.k_norm.weight": (hd,) if c.qk_norm == "head" else (c.num_kv_heads * hd,),
            "moe.router.weight": (c.num_experts, H), "moe.router.score_bias": (c.num_experts,),
            "moe.router.bias": (c.num_experts,), "attn.sinks": (c.num_heads,), "attn.o.bias": (H,),
            "moe.shared.gate.weight": (c.shared_expert_intermediate_size, H),
            "moe.shared.up.weight": (c.shared_expert_intermediate_size, H),
            "moe.shared.down.weight": (H, c.shared_expert_intermediate_size),
            "moe.shared_gate.weight": (1, H),
            "mlp.gate.weight": (c.dense_intermediate_size, H), "mlp.up.weight": (c.dense_intermediate_size, H),
            "mlp.down.weight": (H, c.dense_intermediate_size),
            **(mla.dense_shapes(c) if c.attention == "mla" else {}),
        }[leaf]
    return shapes


class _Random:
    """Random bytes at memory speed: a seeded pool of words, rotated and XORed per use."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.bit_generator.random_raw(SEED_POOL_WORDS)  # all 64 bits random

    def fill(self, out: np.ndarray):
        """Fill a C-contiguous array (any dtype, nbytes a multiple of 8) with random bits."""
        w = out.reshape(-1).view(np.uint64)
        P, off = len(self.pool), int(self.rng.integers(0, len(self.pool)))
        key = np.uint64(self.rng.bit_generator.random_raw())
        i = 0
        while i < len(w):
            n = min(len(w) - i, P - off)
            np.bitwise_xor(self.pool[off:off + n], key, out=w[i:i + n])
            i, off = i + n, 0
        return out


def _fixed_exponent(v: np.ndarray, keep_mask: int, exp_bits: int):
    np.bitwise_and(v, keep_mask, out=v)
    np.bitwise_or(v, exp_bits, out=v)


def _fill_records(rnd: _Random, out: np.ndarray, layout: RecordLayout):
    """out: [B, layout.size] uint8, filled with random plausible records."""
    rnd.fill(out)
    end = 0
    for part in layout.parts:
        fmt = part.format
        secs = {s.name: s for s in Q.sections(fmt, part.shape)}
        def view(name):
            s = secs[name]
            a = part.offset + s.offset
            return out[:, a:a + s.nbytes].view(np.uint16)
        e2 = _log2_floor(weight_std(part.shape[1]) / _Q_STD.get(fmt, 1.0))  # |scale| or |w| in [2^e2, 2^(e2+1))
        if fmt in Q.QUANT_BITS:
            sc = view("scales")
            _fixed_exponent(sc, 0x03FF, max(1, e2 + 15) << 10)
            if "biases" in secs:
                levels = (1 << Q.QUANT_BITS[fmt]) - 1
                view("biases")[:] = (sc.view(np.float16).astype(np.float32) * (-levels / 2)).astype(np.float16).view(np.uint16)
        elif fmt == "bf16":
            _fixed_exponent(view("w"), 0x807F, (e2 + 127) << 7)
        elif fmt == "f16":
            _fixed_exponent(view("w"), 0x83FF, max(1, e2 + 15) << 10)
        elif fmt == "f32":
            s = secs["w"]
            w = out[:, part.offset:part.offset + s.nbytes].view(np.uint32)
            _fixed_exponent(w, 0x807FFFFF, (e2 + 127) << 23)
        end = part.offset + part.nbytes
    out[:, end:] = 0


def _dense_tensor(rnd: _Random, name: str, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    bits = np.empty(n + (-n % 4), dtype=np.uint16)
    rnd.fill(bits)
    if name == "embed.weight":
        e2 = 0
    elif name.endswith("bias") or len(shape) == 1:
        e2 = -7
    elif name.endswith("router.weight"):
        e2 = _log2_floor(2.0 / math.sqrt(shape[1]))
    else:
        e2 = _log2_floor(weight_std(shape[1]))
    _fixed_exponent(bits, 0x807F, (e2 + 127) << 7)
    return torch.from_numpy(bits[:n]).view(torch.bfloat16).reshape(shape)


def write_tokenizer(folder: Path, cfg: ModelConfig):
    """A byte-level tokenizer (no merges): byte b is id b, then <|endoftext|> 256, <|im_start|>
    257, <|im_end|> 258. Ids fit any vocabulary of >= 259 entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ..runtime.tokenizer import _byte_decoder
    vocab = {ch: b for ch, b in _byte_decoder().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": template, "model_max_length": cfg.max_position_embeddings}, indent=1))


def synth(dst, like: str, layers: int | None = None, quant: str = "q4", force: bool = False, seed: int = 0,
          progress=None) -> Path:
    """Write the store; progress(done_bytes, total_bytes) is called as records are written."""
    import tempfile

    if quant not in ("q8", "q4", "q2", "bf16"):
        raise ConvertError(f"synth --quant {quant!r}: choose q8, q4, q2 or bf16")
    cfg = config_for(like, layers)
    layout = RecordLayout.build(quant, cfg.hidden_size, cfg.moe_intermediate_size, cfg.expert_bias)
    rnd = _Random(seed)
    expert_total, dense_total = store_bytes(cfg, quant)
    total, done = expert_total + dense_total, 0
    batch = max(1, min(cfg.num_experts, (128 << 20) // layout.size))
    bufs = [np.empty((batch, layout.size), dtype=np.uint8) for _ in range(2)]
    pending = None  # double buffering: one batch is written (GIL released) while the next is made
    with StoreWriter(dst, layout, force=force) as w, ThreadPoolExecutor(1) as io:
        def write(layer, e0, recs):
            if e0 == 0:
                w.begin_layer(layer, cfg.num_experts)
            for r in recs:
                w.write_record(memoryview(r))
        for layer in cfg.moe_layers:
            for e0 in range(0, cfg.num_experts, batch):
                b = min(batch, cfg.num_experts - e0)
                buf = bufs[0][:b]
                _fill_records(rnd, buf, layout)
                if pending is not None:
                    pending.result()
                pending = io.submit(write, layer, e0, buf)
                bufs.reverse()
                done += b * layout.size
                if progress:
                    progress(done, total)
        if pending is not None:
            pending.result()
        for name, shape in _dense_shapes(cfg).items():
            t = _dense_tensor(rnd, name, shape)
            w.add_dense(name, t)
            done += t.numel() * 2
            if progress:
                progress(done, total)
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(Path(tmp), cfg)
            for f in Path(tmp).iterdir():
                w.copy_file(f)
        source = {"type": "synth", "like": like, "seed": seed, "random_weights": True,
                  "layers": f"first {cfg.num_layers} of {PRESETS[like]['num_layers']}",
                  "architecture_used": cfg.architecture,
                  "approximations": APPROXIMATIONS.get(like, []),
                  "tokenizer": "byte-level stand-in (259 ids)"}
        return w.finish(cfg.architecture, cfg.to_json(),
                        {"format": quant, "group_size": Q.GROUP if quant in Q.QUANT_BITS else None,
                         "dense": "bf16 (random)"}, source)
