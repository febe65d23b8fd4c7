"""MXFP4 expert weights (gpt-oss's published format): our dequantization against transformers'
own, and a whole MXFP4 checkpoint converted and run against transformers on the same weights."""
import pytest
import torch
from hf_oracles import make_model, to_mxfp4
from safetensors.torch import load_file, save_file

from flashmoe_plugin.convert import convert, mxfp4
from flashmoe_plugin.runtime.engine import Engine


def test_dequantize_matches_transformers():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 6, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (3, 40, 6), dtype=torch.uint8, generator=g)
    ref = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [3, 192, 40]
    assert torch.equal(mxfp4.dequantize(blocks, scales).transpose(1, 2), ref)
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(blocks, scales[..., :-1])


def test_mxfp4_checkpoint_against_transformers(tmp_path):
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    src = tmp_path / "mxfp4"
    model, _ = make_model("gpt_oss", src)  # its own copy: the weights below are changed
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = to_mxfp4(tensors.pop(name).transpose(1, 2).contiguous())  # [E, out, in] rows
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        param = model.get_parameter(name)
        with torch.no_grad():  # the oracle runs transformers' own dequantization of the same bytes
            param.copy_(mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    eng = Engine(convert(src, tmp_path / "store", quant="none"))
    ids = torch.randint(3, 384, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    torch.testing.assert_close(eng.forward(ids), ref, atol=1e-4, rtol=0)
    eng.close()
