"""MXFP4 expert weights (gpt-oss's published format): our dequantization against transformers'
own, and a whole MXFP4 checkpoint converted and run against transformers on the same weights."""
import pytest
import torch
from hf_oracles import make_model
from safetensors.torch import load_file, save_file

from flashmoe_plugin.convert import convert, mxfp4
from flashmoe_plugin.runtime.engine import Engine

E2M1 = torch.tensor(mxfp4.E2M1[:8])


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float -> (blocks [..., N/32, 16], scales [..., N/32]): per block of 32 the smallest
    power of two that fits the largest magnitude into e2m1's range, codes by nearest value."""
    g = w.reshape(*w.shape[:-1], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -100) / 6.0)).to(torch.int32)
    mag = g.abs() / torch.exp2(exp.float())[..., None]
    code = (mag[..., None] - E2M1).abs().argmin(-1) | ((g < 0).long() << 3)
    pairs = code.reshape(*code.shape[:-1], 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


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
