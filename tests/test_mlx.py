"""MLX checkpoints: the affine formats against mx.dequantize, and a checkpoint written by
mlx_lm.convert (4-bit) converted without requantization: records byte-identical to MLX's packed
codes, logits against mlx-lm running the same checkpoint (in fp32)."""
import json
import os

import numpy as np
import pytest
import torch
from test_oracles import prompt

from flashmoe_plugin import quant as Q
from flashmoe_plugin.convert import ConvertError, convert
from flashmoe_plugin.convert.mlx import dequantize
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import Store

mx = pytest.importorskip("mlx.core", reason="needs mlx (pip install 'mlx[cpu]' on Linux)")


def to_torch(a) -> torch.Tensor:
    t = torch.from_numpy(np.array(a.astype(mx.float32)))
    return t.to(torch.bfloat16) if a.dtype == mx.bfloat16 else t


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_matches_mlx(bits, dtype):
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((48, 256)).astype(np.float32) * 0.05).astype(getattr(mx, dtype))
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    # in fp32 (bf16 scales upcast exactly): MLX's quantized matmuls use these values unrounded
    ref = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=bits))
    words = torch.from_numpy(np.array(q).view(np.int32))
    ours = dequantize(words, to_torch(s), to_torch(b), bits, 64, torch.float32).numpy()
    assert np.array_equal(ours, ref)
    if bits in (2, 4) and dtype == "bfloat16":  # the same bytes read as our q4 / q2 part
        fmt = {4: "q4", 2: "q2"}[bits]
        part = torch.zeros(Q.part_nbytes(fmt, (48, 256)), dtype=torch.uint8)
        v = Q.views(part, fmt, (48, 256))
        v["q"][:] = words.view(torch.uint8).view(v["q"].shape)
        v["scales"][:], v["biases"][:] = to_torch(s).half(), to_torch(b).half()
        assert np.array_equal(Q.dequantize(part, fmt, (48, 256)).float().numpy(), ref)


def mlx_checkpoint(oracle, family, out):
    """The oracle model through mlx_lm.convert (4-bit, group 64, bf16 scales)."""
    mlx_lm = pytest.importorskip("mlx_lm", reason="needs mlx-lm")
    hf = out / "hf"
    # mlx-lm reads Qwen3.5's experts fused (as published), Qwen3-Next's per expert
    oracle.model.save_pretrained(hf, save_original_format=not family.startswith("qwen3_5"))
    oracle.tokenizer.save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    for t in (cfg, cfg.get("text_config") or {}):  # mlx-lm wants these at the top level
        rope = t.get("rope_parameters") or {}
        if rope:
            t.setdefault("rope_theta", rope["rope_theta"])
            t.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    (hf / "config.json").write_text(json.dumps(cfg))
    mlx_lm.convert(str(hf), str(out / "mlx"), quantize=True, q_group_size=64, q_bits=4, dtype="bfloat16")
    return out / "mlx", mlx_lm


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe", "mixtral"])
def test_mlx_lm_checkpoint_is_kept_exactly_and_matches_mlx_lm(oracles, family, tmp_path):
    from safetensors import safe_open
    src, mlx_lm = mlx_checkpoint(oracles(family), family, tmp_path)
    store = Store.open(convert(src, tmp_path / "store"))
    assert store.quant == "q4" and store.manifest["source"]["type"] == "mlx"
    # records: MLX's packed words and scales, byte for byte
    layer = store.config.moe_layers[-1]
    f = next(src.glob("*.safetensors"))
    with safe_open(str(f), "np") as st:
        key = next(k for k in st.keys() if k.endswith(f"layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}"
                                                        ".switch_mlp.gate_proj.weight"))
        gate = st.get_tensor(key)
        e = store.config.num_experts - 1
        size = store.layout.size
        with open(store.layer_path(layer), "rb") as fh:
            fh.seek(e * size)
            rec = torch.frombuffer(bytearray(fh.read(size)), dtype=torch.uint8)
    part = store.layout.parts[0]
    v = Q.views(rec[part.offset:part.offset + part.nbytes], "q4", part.shape)
    assert v["q"][:gate.shape[1]].numpy().tobytes() == gate[e].tobytes()
    # logits: mlx-lm on the same checkpoint, upcast to fp32 (bf16 -> fp32 is exact)
    ids = prompt(24, seed=3)
    model, _ = mlx_lm.load(str(src))
    model.set_dtype(mx.float32)
    ref = torch.from_numpy(np.array(model(mx.array(ids.numpy())[None]).astype(mx.float32)))[0]
    eng = Engine(store)
    torch.testing.assert_close(eng.forward(ids), ref, atol=1e-4, rtol=0)
    eng.reset()
    steps = torch.cat([eng.forward(ids[:8])] + [eng.forward(ids[i:i + 1]) for i in range(8, 24)])
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=0)
    with pytest.raises(ConvertError, match="kept exactly as q4"):
        convert(src, tmp_path / "store-q8", quant="q8")


def test_inexact_scales_are_refused(oracles, tmp_path):
    """fp32 scales (an fp32 model quantized by MLX) have no exact fp16 form: an error naming the
    tensor, not a silent requantization; --quant none dequantizes instead."""
    mlx_lm = pytest.importorskip("mlx_lm", reason="needs mlx-lm")
    o = oracles("mixtral")
    hf = tmp_path / "hf"
    o.model.save_pretrained(hf)
    o.tokenizer.save_pretrained(hf)
    mlx_lm.convert(str(hf), str(tmp_path / "mlx"), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    with pytest.raises(ConvertError, match=r"switch_mlp\.\w+\.(scales|biases).*no exact fp16 form"):
        convert(tmp_path / "mlx", tmp_path / "store")
    assert not os.path.exists(tmp_path / "store")
    store = Store.open(convert(tmp_path / "mlx", tmp_path / "store-none", quant="none"))
    assert store.quant == "f32"
