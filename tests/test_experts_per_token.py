"""--experts-per-token K: route fewer (or more) experts than the checkpoint says. Oracle:
transformers with its routers set to the same K."""
import json

import pytest
import torch
from click.testing import CliRunner
from test_oracles import hf_logits, prompt

from flashmoe_plugin.cli import cli
from flashmoe_plugin.convert.synth import synth
from flashmoe_plugin.plugins import manager
from flashmoe_plugin.runtime.engine import Engine


@pytest.mark.parametrize("family", ["qwen3_5_moe_text", "mixtral"])
def test_fewer_experts_per_token_match_transformers_routing_as_many(oracles, family):
    """experts_per_token=K routes K experts (renormalised as the model does) and matches
    transformers with its routers set to the same K."""
    o = oracles(family)
    ids = prompt(24, seed=7)
    full = hf_logits(o.model, ids)
    routers = [m for m in o.model.modules() if hasattr(m, "top_k") and hasattr(m, "weight")]
    assert routers
    k0 = routers[0].top_k
    try:
        for m in routers:
            m.top_k = 1
        ref = hf_logits(o.model, ids)
    finally:
        for m in routers:
            m.top_k = k0
    assert (ref - full).abs().max() > 1e-2  # K matters
    eng = Engine(o.store("none"), experts_per_token=1)
    assert eng.config.top_k == 1 and eng.store.config.top_k == k0
    torch.testing.assert_close(eng.forward(ids), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="experts_per_token=0"):
        Engine(o.store("none"), experts_per_token=0)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth") / "tiny", "tiny", quant="q4")


def test_cli_and_llama_take_experts_per_token(tiny, oracles):
    manager().hook.register_commands(cli=cli)
    runner = CliRunner()
    runs = {}
    for k in (None, 1):
        args = ["bench", str(tiny), "--json", "--tokens", "4", "--prompt-tokens", "16", "--no-compute-bound"]
        r = runner.invoke(cli, args + (["--experts-per-token", str(k)] if k else []))
        assert r.exit_code == 0, r.output
        runs[k] = json.loads(r.output)
    assert runs[None]["experts_per_token"] == 2 and runs[1]["experts_per_token"] == 1
    r = runner.invoke(cli, ["run", str(tiny), "-p", "hi", "-n", "3", "--temp", "0", "--experts-per-token", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["run", str(tiny), "-p", "hi", "-n", "3", "--experts-per-token", "9"])
    assert r.exit_code != 0 and "experts_per_token=9" in r.output
    from flashmoe_plugin import Llama
    with Llama(model_path=str(oracles("mixtral").store("none")), n_ctx=64, verbose=False, experts_per_token=1) as llm:
        assert llm._engine.config.top_k == 1
