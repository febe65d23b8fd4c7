"""The `flashmoe` command as a user runs it: a real process, real files."""
import json
import shutil
import subprocess
import sys

from flashmoe_plugin.store.format import Store


def flashmoe(*args, ok=True):
    r = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def test_convert_inspect_run(oracles, tmp_path):
    o = oracles("qwen3_moe")
    dst = tmp_path / "store"
    r = flashmoe("convert", o.hf_dir, dst, "--quant", "q4")
    assert f"wrote {dst}" in r.stdout
    info = json.loads(flashmoe("inspect", dst, "--verify", "--json").stdout)
    assert info["architecture"] == "qwen3_moe" and info["quant"]["format"] == "q4" and info["verify"]["ok"]
    r = flashmoe("run", dst, "-p", "Hello world", "-n", "8", "--temp", "0", "--ram-budget", str(2 * Store.open(dst).layout.size * 3))
    assert r.stdout.startswith("Hello world")
    assert "tokens in" in r.stderr and "misses" in r.stderr
    # same seed, same text
    a = flashmoe("run", dst, "-p", "Hello", "-n", "8", "--temp", "0.9", "--seed", "7").stdout
    b = flashmoe("run", dst, "-p", "Hello", "-n", "8", "--temp", "0.9", "--seed", "7").stdout
    assert a == b


def test_errors_are_messages_not_tracebacks(oracles, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(oracles("mixtral").store("q4"), store)
    r = flashmoe("convert", oracles("mixtral").hf_dir, store, ok=False)
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = flashmoe("run", store, "-p", "x", "--ram-budget", "1", ok=False)
    assert r.returncode != 0 and "the minimum is" in r.stderr and "Traceback" not in r.stderr
    f = store / "experts" / "layer_002.bin"
    data = bytearray(f.read_bytes())
    data[Store.open(store).layout.size * 3 + 7] ^= 1
    f.write_bytes(bytes(data))
    r = flashmoe("inspect", store, "--verify", ok=False)
    assert r.returncode == 1 and "layer 2 expert 3: checksum mismatch" in r.stdout


def test_demo_and_plugins():
    r = flashmoe("demo", "-n", "16", "--temp", "0")
    assert "flashmoe demo:" in r.stderr and "hit rate" in r.stderr
    words = r.stdout.split()
    assert len(words) >= 8
    r = flashmoe("plugins")
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next", "qwen3_5_moe", "torch", "cpu", "cuda", "lru", "belady"):
        assert name in r.stdout
