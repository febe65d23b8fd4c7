"""`flashmoe chat`: the shell driven through prompt-toolkit's pipe input (keys as a terminal sends
them) with DummyOutput, over the demo model; Ctrl-C is a real SIGINT sent mid-reply."""
import json
import os
import signal

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from flashmoe_plugin import Llama
from flashmoe_plugin.adapters.shell import ChatShell
from flashmoe_plugin.hookspecs import hookimpl
from flashmoe_plugin.plugins import manager


@pytest.fixture(scope="module")
def llama():
    llm = Llama(model_path="demo", n_ctx=512, verbose=False)
    yield llm
    llm.close()


class Transcript:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


class CtrlCInSecondReply:
    """Sends SIGINT to this process at the 2nd token of the shell's second reply."""

    def __init__(self, shell):
        self.shell, self.count, self.sent = shell, 0, False

    @hookimpl
    def on_token(self, stats):
        if sum(m["role"] == "user" for m in self.shell.messages) == 2 and not self.sent:
            self.count += 1
            if self.count == 2:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)


def test_turns_commands_ctrl_c_history(llama, tmp_path):
    saved, history = tmp_path / "conv.json", tmp_path / "history"
    keys = ("Where is the city?\r"
            "/system You answer briefly.\r"
            "Tell me about the history\r"          # interrupted by Ctrl-C at its 2nd token
            "/stats\r"
            f"/save {saved}\r"
            "/reset\r"
            f"/load {saved}\r"
            "first line\x1b\rsecond line\r"        # Alt-Enter (Esc Enter) adds a line
            "/nonsense\r"
            "/exit\r")
    out = Transcript()
    with create_pipe_input() as inp:
        inp.send_text(keys)
        shell = ChatShell(llama, max_tokens=24, temperature=0, history_file=history, input=inp, output=DummyOutput(),
                          stdout=out)
        interrupter = CtrlCInSecondReply(shell)
        manager().register(interrupter)
        try:
            shell.run()
        finally:
            manager().unregister(interrupter)
    text = out.text
    # turn 1: the reply is what the Llama itself answers to the same conversation
    want = llama.create_chat_completion(messages=[{"role": "user", "content": "Where is the city?"}], max_tokens=24,
                                        temperature=0)["choices"][0]["message"]["content"]
    assert want and text.count(want) >= 1
    # turn 2 was stopped by Ctrl-C after 2 tokens and the session went on
    assert interrupter.sent and text.count("[stopped]") == 1
    conv = json.loads(saved.read_text())
    assert conv["system"] == "You answer briefly."
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][1]["content"] == want
    partial = conv["messages"][3]["content"]
    full = llama.create_chat_completion(messages=[{"role": "system", "content": "You answer briefly."}]
                                        + conv["messages"][:3], max_tokens=24, temperature=0)
    assert full["choices"][0]["message"]["content"].startswith(partial)
    assert len(partial) < len(full["choices"][0]["message"]["content"])
    # /stats, /reset, /load, the multiline turn, an unknown command
    assert "pager totals:" in text and "tok/s" in text and "resident memory" in text
    assert "[conversation cleared]" in text and "[loaded 4 messages" in text
    assert shell.messages[4] == {"role": "user", "content": "first line\nsecond line"}
    assert [m["role"] for m in shell.messages] == ["user", "assistant"] * 3
    assert "[unknown command /nonsense" in text and text.rstrip().endswith("bye")
    bar = shell.toolbar()
    assert "tok/s" in bar and "experts device" in bar and "read/token" in bar and "RSS" in bar
    assert "Where is the city?" in history.read_text() and "/exit" in history.read_text()


def test_missing_or_bad_store_is_a_clear_message(tmp_path):
    from click.testing import CliRunner

    from flashmoe_plugin.cli import cli
    manager().hook.register_commands(cli=cli)  # as `flashmoe` (cli.main) does
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    for model in (tmp_path / "missing", bad):
        r = CliRunner().invoke(cli, ["chat", str(model)])
        assert r.exit_code == 1 and f"Error: cannot open model {model}: " in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
