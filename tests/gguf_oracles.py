"""llama.cpp as the oracle: small transformers models -> llama.cpp's own convert_hf_to_gguf.py ->
GGUF (F32, then Q8_0 / Q4_0 / Q4_K_M through llama.cpp's quantizer) -> llama_cpp.Llama.

llama.cpp's converter, gguf-py and vocabulary GGUFs come from the llama-cpp-python sdist (the
installed wheel has none of them), downloaded once from PyPI into a user cache (never committed):
$FLASHMOE_TEST_CACHE or ~/.cache/flashmoe/tests. Tests skip with the reason when it is unreachable.

Quirks (REFERENCE.md): Mixtral needs a SentencePiece tokenizer.model (we build the proto from
the llama-spm vocab GGUF); Qwen/OLMoE need a BPE vocabulary whose pre-tokenizer the converter
recognises (the gpt-2 vocab GGUF, through transformers); OLMoE needs kv heads = heads (the
oracle config has that); K-quants need rows of 256, so the Mixtral model is 256 wide.
DeepSeek-V3 needs `scoring_func: sigmoid` in config.json (else the converter writes a softmax
router); gpt-oss needs YaRN `truncate: true` (llama.cpp's correction range). gpt-oss experts are
made MXFP4-exact (rounded through MXFP4 once), so that the float checkpoint (-> F32 GGUF) and the
MXFP4 one (`mxfp4_gguf`: llama.cpp's converter keeps MXFP4 blocks) hold the same values. The hybrid
families convert with --no-mtp and without dense-MLP layers; Qwen3.5's converter recognises the
qwen2 vocabulary (not gpt-2's), and its M-RoPE runs with head_dim 64 (16 aborts llama.cpp).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import torch

SDIST = "llama-cpp-python", "0.3.36"
KEEP = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/",
        "vendor/llama.cpp/models/ggml-vocab-")
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
VOCAB = {"mixtral": ("llama-spm", 32000), "qwen2_moe": ("gpt-2", 50257), "qwen3_moe": ("gpt-2", 50257),
         "olmoe": ("gpt-2", 50257), "deepseek_v3": ("gpt-2", 50257), "gpt_oss": ("gpt-2", 50257),
         "qwen3_next": ("gpt-2", 50257), "qwen3_5_moe_text": ("qwen2", 151936)}
# Mixtral is also quantized with K-quants by the tests (rows of 256); the others stay small.
SHAPE = {"mixtral": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024)}
# the hybrid families' converter expects a multi-token-prediction layer unless told there is none
CONVERT_ARGS = {"qwen3_next": ["--no-mtp"], "qwen3_5_moe_text": ["--no-mtp"]}
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHMOE_TEST_CACHE") or Path.home() / ".cache" / "flashmoe" / "tests")


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the sdist (converter, gguf-py, vocab GGUFs); raises OSError if unreachable."""
    root = cache_dir() / f"llama-cpp-python-{SDIST[1]}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    local = os.environ.get("FLASHMOE_LLAMA_SDIST")  # an already downloaded sdist .tar.gz
    if local:
        data = Path(local).read_bytes()
    else:
        # the package index's JSON simple API (PEP 691), as pip reads it; the file's sha256 checked
        req = urllib.request.Request(f"https://pypi.org/simple/{SDIST[0]}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        files = json.load(urllib.request.urlopen(req, timeout=30))["files"]
        f = next(f for f in files if f["filename"] == f"{SDIST[0].replace('-', '_')}-{SDIST[1]}.tar.gz")
        data = urllib.request.urlopen(f["url"], timeout=300).read()
        if hashlib.sha256(data).hexdigest() != f["hashes"]["sha256"]:
            raise OSError(f"{f['url']}: sha256 mismatch")
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if m.isfile() and rel.startswith(KEEP):
                m.name = rel[len("vendor/llama.cpp/"):]
                tar.extract(m, tmp, filter="data")
    os.replace(tmp, root)
    return root


def vocab_gguf(name: str) -> Path:
    return llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf"


def hf_tokenizer(name: str) -> Path:
    """A tokenizer folder the converter accepts, made once from a vocab GGUF."""
    out = cache_dir() / f"tokenizer-{name}"
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = vocab_gguf(name)
    if name == "llama-spm":
        _sentencepiece_model(path, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    else:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _sentencepiece_model(vocab: Path, out: Path):
    """A SentencePiece BPE model proto with the vocab GGUF's pieces, scores and types."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = GGUFReader(str(vocab))
    f = r.fields
    tokens = [x if isinstance(x, str) else bytes(x).decode() for x in f["tokenizer.ggml.tokens"].contents()]
    scores, types = f["tokenizer.ggml.scores"].contents(), f["tokenizer.ggml.token_type"].contents()
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.escape_whitespaces = True
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(s), int(ty)
    out.write_bytes(m.SerializeToString())


def make_gguf_model(family: str, root: Path, seed: int = 0):
    """(transformers model, F32 GGUF path) for a family, converted by llama.cpp's converter."""
    from hf_oracles import make_model

    name, vocab = VOCAB[family]
    over = dict(SHAPE.get(family, SMALL), vocab_size=vocab, bos_token_id=1 if name == "llama-spm" else 50256,
                eos_token_id=2 if name == "llama-spm" else 50256, pad_token_id=None)
    if family == "qwen2_moe":
        over.update(mlp_only_layers=[], shared_expert_intermediate_size=96)
    if family == "qwen3_moe":
        over.update(head_dim=32)
    if family in ("olmoe", "deepseek_v3"):
        over.update(num_key_value_heads=4)
    if family == "gpt_oss":
        over.update(intermediate_size=64, rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": True, "original_max_position_embeddings": 4096})
    if family in CONVERT_ARGS:  # hybrid: hf_oracles' own small shapes (not SMALL); llama.cpp maps no
        # dense-MLP layer in these families, and Qwen3.5's M-RoPE runs with head_dim 64 (16 aborts it)
        over = dict(vocab_size=vocab, bos_token_id=50256, eos_token_id=50256, pad_token_id=None, mlp_only_layers=[])
        if family == "qwen3_5_moe_text":
            over.update(head_dim=64)
    hf = root / "hf"
    model, _ = make_model(family, hf, seed=seed, **over)
    if family == "deepseek_v3":
        _edit_config(hf, scoring_func="sigmoid")
    if family == "gpt_oss":
        _mxfp4_experts(model, hf, root / "hf-mxfp4")
    for p in list(hf.glob("tokenizer*")) + list(hf.glob("special_tokens_map.json")) + list(hf.glob("chat_template*")):
        p.unlink()
    for p in hf_tokenizer(name).iterdir():
        shutil.copy(p, hf / p.name)
    return model, _convert(hf, root / "model-f32.gguf", family)


def _convert(hf: Path, out: Path, family: str) -> Path:
    src = llama_cpp_source()
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(out),
                        "--outtype", "f32", *CONVERT_ARGS.get(family, [])], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {family}:\n{r.stderr[-3000:]}")
    return out


def _edit_config(hf: Path, **fields):
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(fields)
    (hf / "config.json").write_text(json.dumps(cfg))


def _mxfp4_experts(model, hf: Path, mx: Path):
    """gpt-oss: round the experts through MXFP4 in `model` and hf/ (float), and write mx/, the
    same checkpoint with the published MXFP4 layout (`*_blocks`, `*_scales`, quant_method mxfp4)."""
    import torch
    from hf_oracles import to_mxfp4
    from safetensors.torch import load_file, save_file

    from flashmoe_plugin.convert import mxfp4
    tensors = load_file(hf / "model.safetensors")
    packed = dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = to_mxfp4(tensors[name].transpose(1, 2).contiguous())  # rows = output features
        packed.pop(name)
        packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
        tensors[name] = mxfp4.dequantize(blocks, scales).transpose(1, 2).contiguous()
        with torch.no_grad():
            model.get_parameter(name).copy_(tensors[name])
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(hf, mx, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json", "chat_template*"))
    save_file(packed, mx / "model.safetensors", metadata={"format": "pt"})
    _edit_config(mx, quantization_config={"quant_method": "mxfp4"})


def mxfp4_gguf(root: Path) -> Path:
    """The gpt-oss model of make_gguf_model(root) as llama.cpp's converter writes the MXFP4
    checkpoint: experts in MXFP4 blocks, the rest F32."""
    out = root / "model-mxfp4.gguf"
    if not out.is_file():
        mx = root / "hf-mxfp4"
        for p in (root / "hf").iterdir():  # the tokenizer files the float folder got
            if not (mx / p.name).exists():
                shutil.copy(p, mx / p.name)
        _convert(mx, out, "gpt_oss")
    return out


def quantize(src: Path, kind: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python) on a GGUF: q8_0 | q4_0 | q4_k_m."""
    import llama_cpp

    out = src.with_name(src.name.replace("-f32", f"-{kind}"))
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src.name} -> {kind}) returned {rc}")
    return out


def llama_cpp_logits(path: Path, ids: list[int]):
    """llama.cpp's logits for every position (F32 KV cache, as REFERENCE.md measured)."""
    import llama_cpp
    import numpy as np
    import torch

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                          type_k=0, type_v=0, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    scores = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    return scores, llm


def write_demo_gguf(out: Path) -> Path:
    """The project's trained demo model (a Qwen3-MoE, q4 experts) written as an F32 GGUF with
    gguf-py under llama.cpp's names: a model with realistic, decisive logits, to compare
    quantized files where random models sit on near-ties."""
    import gguf
    import numpy as np

    from flashmoe_plugin import demo_model_path, quant
    from flashmoe_plugin.models import gguf as names
    from flashmoe_plugin.store.format import Store

    if out.is_file():
        return out
    store = Store.open(demo_model_path())
    c = store.config
    tok = json.loads((store.path / "tokenizer.json").read_text())
    w = gguf.GGUFWriter(str(out) + ".partial", "qwen3moe")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.dense_intermediate_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([added.get(i, t) for t, i in vocab])
    w.add_token_types([3 if i in added else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(c.eos_token_id)
    back = {v: k for k, v in names.TOP_NAMES.items()}
    back.update({f"layers.{i}.{v}": f"blk.{i}.{k}" for i in range(c.num_layers) for k, v in names.LAYER_NAMES.items()})
    for name, t in sorted(store.load_dense().items()):
        w.add_tensor(back[name], t.float().numpy())
    lay = store.layout
    for layer in c.moe_layers:
        recs = np.fromfile(store.layer_path(layer), dtype=np.uint8).reshape(c.num_experts, lay.size)
        parts = {p: [quant.dequantize(torch_u8(r[lay.part(p).offset:]), lay.part(p).format, lay.part(p).shape)
                     for r in recs] for p in ("w13", "w2")}
        w13 = np.stack([x.numpy() for x in parts["w13"]])
        I = c.moe_intermediate_size
        w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(w13[:, :I]))
        w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(w13[:, I:]))
        w.add_tensor(f"blk.{layer}.ffn_down_exps.weight", np.stack([x.numpy() for x in parts["w2"]]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(out) + ".partial", out)
    return out


def torch_u8(a):
    import torch
    return torch.from_numpy(a.copy())


def write_tiny_gguf(path: Path, expert_type: str = "F32", split_max_tensors: int = 0, seed: int = 0,
                    arch: str = "qwen3moe") -> Path:
    """A tiny random Qwen3-MoE GGUF written with gguf-py (no converter): 2 layers, 4 experts of
    64 x 64, hidden 64, a byte-level vocabulary of 300 tokens. For store/CLI/error tests."""
    import gguf
    import numpy as np
    from gguf.quants import quantize as gquant

    g = np.random.default_rng(seed)
    H, I, E, L, V, heads, kv, hd = 64, 64, 4, 2, 300, 4, 2, 16
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(128)
    w.add_expert_feed_forward_length(I)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    from flashmoe_plugin.runtime.tokenizer import _byte_decoder
    chars = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])
    tokens = chars + ["<|endoftext|>", "\u0120t"] + [f"[PAD{i}]" for i in range(V - 258)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 1] + [5] * (V - 258))
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}")

    def t(*shape, s=0.05):
        return (g.standard_normal(shape) * s).astype(np.float32)
    w.add_tensor("token_embd.weight", t(V, H, s=0.5))
    w.add_tensor("output_norm.weight", 1 + t(H))
    w.add_tensor("output.weight", t(V, H, s=0.2))
    qt = gguf.GGMLQuantizationType[expert_type]
    for i in range(L):
        p = f"blk.{i}."
        for n, shape in (("attn_norm", (H,)), ("ffn_norm", (H,)), ("attn_q_norm", (hd,)), ("attn_k_norm", (hd,))):
            w.add_tensor(p + n + ".weight", 1 + t(*shape))
        for n, shape in (("attn_q", (heads * hd, H)), ("attn_k", (kv * hd, H)), ("attn_v", (kv * hd, H)),
                         ("attn_output", (H, heads * hd))):
            w.add_tensor(p + n + ".weight", t(*shape, s=0.15))
        w.add_tensor(p + "ffn_gate_inp.weight", t(E, H, s=0.5))
        for n, shape in (("ffn_gate_exps", (E, I, H)), ("ffn_up_exps", (E, I, H)), ("ffn_down_exps", (E, H, I))):
            x = t(*shape, s=0.15)
            if expert_type == "F32":
                w.add_tensor(p + n + ".weight", x)
            else:
                w.add_tensor(p + n + ".weight", gquant(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path if not split_max_tensors else w.format_shard_names(path)[0]


# where each block keeps its f16 scales (random bytes there could be inf/nan)
SCALES = {"q4_0": [0], "q8_0": [0], "q5_0": [0], "q4_1": [0, 2], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208], "mxfp4": []}


def random_part(fmt, rows, cols, seed=0):
    """Random blocks (every bit pattern of the quants and sub-scales) with finite f16 scales."""
    import numpy as np
    import torch

    from flashmoe_plugin import quant_gguf
    tid, blk, size = quant_gguf.BLOCK_FORMATS[fmt]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, (rows * cols // blk, size), dtype=np.uint8)
    for at in SCALES[fmt]:
        raw[:, at:at + 2] = (g.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if fmt == "mxfp4":  # the e8m0 exponent byte: scales 2^-10 .. 2^-4 (every byte is tested apart)
        raw[:, 0] = g.integers(117, 124, len(raw))
    return torch.from_numpy(raw.reshape(-1).copy())


def gguf_layout(f13, f2, H, I):
    """A record layout of GGUF block parts, as store/gguf.py builds them."""
    from flashmoe_plugin import quant
    from flashmoe_plugin.store.layout import Part, RecordLayout
    w13 = Part("w13", 0, f13, (2 * I, H))
    w2 = Part("w2", quant._align(w13.nbytes), f2, (H, I))
    return RecordLayout(size=quant._align(w2.offset + w2.nbytes, 4096), parts=(w13, w2))


class _Blocks(torch.Tensor):
    """A dense weight that F.linear computes from the GGUF tensor's own blocks through the
    backend's fused kernel (rows re-ordered afterwards where the store un-permuted q/k)."""

    @staticmethod
    def __new__(cls, w, blocks, fmt, perm, backend):
        t = torch.Tensor._make_subclass(cls, w)
        t.blocks, t.fmt, t.perm, t.backend = blocks, fmt, perm, backend
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        import torch.nn.functional as F
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], _Blocks) and not isinstance(args[0], _Blocks):
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            shape = x.shape
            y = w.backend.linear(x.reshape(-1, shape[-1]).as_subclass(torch.Tensor), w.blocks, w.fmt,
                                 (w.shape[0], w.shape[1]))
            y = (y if w.perm is None else y[:, w.perm]).reshape(*shape[:-1], w.shape[0])
            return y if bias is None else y + bias
        args = [a.as_subclass(torch.Tensor) if isinstance(a, _Blocks) else a for a in args]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def dense_in_blocks(eng) -> int:
    """Route the engine's quantized dense matrices (those it holds as float tensors) (attention, output head) through its kernel
    backend's linear on the GGUF's own blocks, as llama.cpp computes them (the embedding stays a
    table lookup, exact either way). Returns how many matrices were routed."""
    import numpy as np

    from flashmoe_plugin import quant_gguf
    from flashmoe_plugin.models import gguf as names
    store, w, n = eng.store, eng.model.w, 0
    data = {t.name: t for r in store.readers for t in r.tensors}
    for name, t in store.tensors.items():
        kind = names.classify(name)
        fmt = quant_gguf.format_of_type(t.type)
        if kind[0] != "dense" or not quant_gguf.is_block_format(fmt or "") or kind[1] == "embed.weight":
            continue
        canon = kind[1]
        if not isinstance(w[canon], torch.Tensor):  # the engine keeps it packed already (dense_quant)
            n += 1
            continue
        rows = t.shape[0]
        perm = names.fix_dense(canon, torch.arange(rows), store.config, store.arch_key)
        perm = None if torch.equal(perm, torch.arange(rows)) else perm
        blocks = torch.from_numpy(np.ascontiguousarray(data[name].data).reshape(-1).copy())
        w[canon] = _Blocks(w[canon], blocks, fmt, perm, eng.backend)
        if canon == "lm_head.weight":
            eng.model.lm_head = w[canon]
        n += 1
    return n
