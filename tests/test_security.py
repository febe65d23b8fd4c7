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


def test_serve_never_touches_the_network(oracles, tmp_path):
    import socket
    import time

    import httpx
    dst = tmp_path / "store"
    assert offline("convert", oracles("mixtral").hf_dir, dst, "--quant", "q4").returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", OFFLINE, "serve", str(dst), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": ":".join(sys.path)})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "store", "prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "NETWORK" not in err, err[-3000:]


def test_serve_warns_when_bound_beyond_loopback():
    """The default is 127.0.0.1; asked for another address, `flashmoe serve` says it is reachable
    from other machines (no request is sent: only the warning is checked)."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "serve", "demo",
                             "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, line = time.time() + 120, ""
        while "WARNING" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "WARNING: listening on 0.0.0.0" in line and "no --api-key" in line, line
    finally:
        proc.terminate()
        proc.wait(30)
