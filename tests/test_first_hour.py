"""What a new user meets in the first hour, as real processes: the model name `demo`, prompts
that do not fit the context, one size syntax everywhere, progress on stderr only, and the
README's examples run exactly as printed."""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flashmoe_plugin.demo import demo_model_path
from flashmoe_plugin.models_path import resolve_model
from flashmoe_plugin.sizes import format_rate, format_size, parse_size

ROOT = Path(__file__).parent.parent
LONG = "The history of the city begins in the valley of the river. " * 12  # ~150 tokens
CLEAN = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def flashmoe(*args, ok=True, cwd=None):
    r = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", *map(str, args)],
                       capture_output=True, text=True, timeout=300, cwd=cwd)
    assert "Traceback" not in r.stderr, r.stderr
    if ok:
        assert r.returncode == 0, r.stderr
    return r


# ------------------------------------------------------------------ item 5: `demo` is a model name

def test_demo_is_a_model_name_in_every_command(tmp_path):
    r = flashmoe("run", "demo", "-p", "The city", "-n", "6", "--temp", "0", cwd=tmp_path)
    assert r.stdout.startswith("The city") and len(r.stdout) > len("The city ")
    assert "6 tokens in" in r.stderr and "page cache" in r.stderr
    info = json.loads(flashmoe("inspect", "demo", "--json", cwd=tmp_path).stdout)
    assert info["architecture"] == "qwen3_moe" and Path(info["path"]) == demo_model_path()
    bench = flashmoe("bench", "demo", "--json", "--tokens", "2", "--prompt-tokens", "8", "--no-compute-bound",
                     "--ram-budget", "25%", cwd=tmp_path)
    result = json.loads(bench.stdout)  # stdout is the JSON and nothing else
    assert result["architecture"] == "qwen3_moe" and result["tokens"] == 2
    assert result["ram_budget"] <= demo_store_bytes() // 4
    r = flashmoe("run", "no-such-model", "-p", "x", ok=False, cwd=tmp_path)
    assert r.returncode == 2 and "no-such-model: no such model" in r.stderr and "demo" in r.stderr


def demo_store_bytes():
    from flashmoe_plugin.store.format import Store
    return Store.open(demo_model_path()).expert_bytes


def test_a_folder_called_demo_wins(tmp_path, monkeypatch):
    assert resolve_model("demo") == demo_model_path()
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo") == Path("demo")
    with pytest.raises(ValueError, match="nothing-here: no such model"):
        resolve_model("nothing-here")


# ------------------------------------------------------------------ item 1: prompts and the context

def test_prompt_longer_than_the_context_is_an_error(tmp_path):
    r = flashmoe("run", "demo", "-p", LONG, "--n-ctx", "64", "-n", "8", ok=False, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert re.search(r"the prompt is \d+ tokens and the context window is 64 \(--n-ctx\): no room to generate",
                     r.stderr), r.stderr
    assert "--truncate" in r.stderr
    # asked for: the prompt keeps its last tokens and the 8 tokens are generated
    r = flashmoe("run", "demo", "-p", LONG, "--n-ctx", "64", "-n", "8", "--temp", "0", "--truncate", cwd=tmp_path)
    from flashmoe_plugin.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(demo_model_path())
    n_prompt = len(tok.encode(LONG, add_bos=False))
    kept = 64 - 8 - tok.add_bos  # a BOS token, where the model has one, stays in front
    assert f"note: prompt truncated to its last {kept} of {n_prompt} tokens (--truncate)" in r.stderr, r.stderr
    assert "[8 tokens in" in r.stderr
    assert LONG.strip()[-40:] in r.stdout and not r.stdout.startswith(LONG[:40])  # the model's view is echoed
    # near the limit: what fits is generated and the early stop is said
    r = flashmoe("run", "demo", "-p", LONG[:120], "--n-ctx", "40", "-n", "64", "--temp", "0", cwd=tmp_path)
    m = re.search(r"note: stopped after (\d+) of 64 tokens: the context window of 40 \(--n-ctx\) is full", r.stderr)
    assert m, r.stderr
    assert f"[{m.group(1)} tokens in" in r.stderr


# ------------------------------------------------------------------ item 2: one size parser

def test_sizes_parse_one_way():
    assert parse_size("512M") == 512 << 20 and parse_size("8G") == 8 << 30 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096 and parse_size(7) == 7 and parse_size(None) is None and parse_size("0") == 0
    assert parse_size("50%", of=1000) == 500 and parse_size(" 25 % ", of=1000) == 250
    for bad in ("banana", "x%", "-1G", "12Q", "", "1e3"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad, of=10)
    with pytest.raises(ValueError, match="ram_budget: a percentage"):
        parse_size("50%", name="ram_budget")
    assert format_size(3 << 29) == "1.50 GiB" and format_rate(2.5e8) == "238.4 MiB/s" and format_rate(3 << 30) == "3.00 GiB/s"


def test_a_bad_budget_is_one_line_everywhere(tmp_path):
    for command, bad in ((["demo"], "banana"), (["demo"], "x%"), (["run", "demo", "-p", "x"], "banana"),
                         (["bench", "demo"], "1.5Q"), (["profile", "demo"], "-3G")):
        r = flashmoe(*command, "--ram-budget", bad, ok=False, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"Invalid value for '--ram-budget': not a size: '{bad}'" in r.stderr, r.stderr
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 3  # usage, hint, the error


def test_percentages_work_everywhere(tmp_path):
    r = flashmoe("run", "demo", "-p", "The city", "-n", "2", "--ram-budget", "25%", "--policy", "static", cwd=tmp_path)
    assert "RAM pool 64 records" in r.stderr  # a quarter of 8 layers x 32 experts
    # item 9: the static policy without routing stats is a one-line notice, not a raw UserWarning
    assert "flashmoe: note: static: " in r.stderr and "running as LRU" in r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr
    r = flashmoe("demo", "-n", "2", "--ram-budget", "25%", cwd=tmp_path)
    assert "RAM pool 64 records" in r.stderr
    from flashmoe_plugin import Llama
    with pytest.raises(ValueError, match="ram_budget: not a size: 'banana'"):
        Llama(model_path="demo", ram_budget="banana", verbose=False)
    with Llama(model_path="demo", n_ctx=64, ram_budget="25%", verbose=False) as llm:
        assert llm._engine.pager.capacity == 64


# ------------------------------------------------------------------ item 6: progress on stderr only

def _on_a_terminal(args, cwd) -> tuple[subprocess.CompletedProcess, str]:
    """Run flashmoe with stderr on a pseudo-terminal (stdout a pipe); returns (process, terminal text)."""
    master, slave = os.openpty()
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        env = {**os.environ, "COLUMNS": "120", "TERM": "xterm-256color"}
        r = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", *args],
                           stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300, cwd=cwd, env=env)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return r, b"".join(chunks).decode("utf-8", "replace")


def test_progress_bars_go_to_a_terminal_and_json_stays_pure(tmp_path):
    r, term = _on_a_terminal(["synth", tmp_path / "syn", "--like", "tiny", "--quant", "q4"], tmp_path)
    assert r.returncode == 0, term
    assert "synth tiny q4" in term and "ETA" in term  # the bar was drawn on the terminal
    assert "\x1b" not in r.stdout and r.stdout.startswith(f"wrote {tmp_path / 'syn'}")
    r, term = _on_a_terminal(["bench", tmp_path / "syn", "--json", "--tokens", "3", "--prompt-tokens", "8"], tmp_path)
    assert r.returncode == 0, term
    assert "decode" in term and "ETA" in term and "Traceback" not in term
    assert json.loads(r.stdout)["tokens"] == 3
    # not a terminal: no bar, no control codes
    r = flashmoe("synth", tmp_path / "syn2", "--like", "tiny", "--quant", "q4", cwd=tmp_path)
    assert r.stderr == "" and "\x1b" not in r.stdout


# ------------------------------------------------------------------ item 3: the README's examples

def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs_as_printed(tmp_path):
    (code,) = [b for b in _blocks("python") if "from flashmoe_plugin import Llama" in b]
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == ""  # verbose=False: nothing runs into the streamed text
    # three prints of sampled text (which may hold blank lines of its own): three lines at least
    assert sum(1 for line in r.stdout.split("\n") if line.strip()) >= 3, r.stdout


def test_readme_demo_commands_run_as_printed(tmp_path):
    (block,) = [b for b in _blocks("sh") if "flashmoe run demo" in b]
    for line in block.strip().splitlines():
        r = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=CLEAN)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.stderr)
        assert r.stdout.strip(), line


# ------------------------------------------------------------------ item 8: reads say where they came from

def test_page_cache_residency_is_measured(tmp_path):
    from flashmoe_plugin.pagecache import cached_fraction
    f = tmp_path / "records.bin"
    f.write_bytes(os.urandom(4 << 20))
    f.read_bytes()
    assert cached_fraction([f]) > 0.9  # just written and read: in the page cache
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    after = cached_fraction([f])
    if after > 0.5:
        pytest.skip(f"evicting from the page cache is not tested: the filesystem of {tmp_path} ignores "
                    "POSIX_FADV_DONTNEED")
    assert after < 0.1


def test_a_broken_plugin_is_one_line_not_a_traceback(tmp_path):
    info = tmp_path / "site" / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flashmoe]\nbroken = no_such_module_for_flashmoe\n")
    r = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "plugins"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert ("flashmoe: note: plugin 'broken' (no_such_module_for_flashmoe) not loaded: ModuleNotFoundError"
            in r.stderr), r.stderr
    assert "mixtral" in next(line for line in r.stdout.splitlines() if line.startswith("architectures:"))
