"""Security items of issue 16 that do not need the server: chat templates run in jinja2's sandbox,
and convert / run never touch the network (checked with an audit hook that refuses every
non-loopback connection and name lookup in a subprocess). Manifest paths that escape the store
are in test_forged_stores.py. Bind address, API key and load are the server's (adapters/server.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from flashmoe_plugin.runtime.chat import TemplateError, render

HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages }}",   # immutable: no mutation
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_chat_template_cannot_escape_the_sandbox(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError):
        render(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


OFFLINE = textwrap.dedent("""
    import sys

    LOOPBACK = ("127.0.0.1", "::1", "localhost")

    def hook(event, args):
        bad = None
        if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOOPBACK:
            bad = args[1]
        elif event in ("socket.getaddrinfo", "socket.gethostbyname") and args[0] not in LOOPBACK:
            bad = args[0]
        if bad is not None:
            sys.stderr.write(f"NETWORK ACCESS: {event} {bad!r}\\n")
            raise OSError(f"network access refused by the test: {event} {bad!r}")

    sys.addaudithook(hook)
    from flashmoe_plugin.cli import main
    sys.argv = ["flashmoe", *sys.argv[1:]]
    main()
""")


def offline(*args):
    return subprocess.run([sys.executable, "-c", OFFLINE, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                                            "PYTHONPATH": ":".join(sys.path)})


def test_convert_and_run_never_touch_the_network(oracles, tmp_path):
    hf = oracles("mixtral").hf_dir
    dst = tmp_path / "store"
    conv = offline("convert", hf, dst, "--quant", "q4")
    assert conv.returncode == 0 and "NETWORK" not in conv.stderr, conv.stderr[-3000:]
    run = offline("run", dst, "-p", "Hello", "-n", "4", "--seed", "1")
    assert run.returncode == 0 and "NETWORK" not in run.stderr, run.stderr[-3000:]
    # the hook itself works: a lookup in the same harness is refused and reported
    probe = subprocess.run([sys.executable, "-c", OFFLINE.replace(
        "from flashmoe_plugin.cli import main", "import socket; socket.getaddrinfo('example.com', 443)")],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "NETWORK ACCESS" in probe.stderr
