"""`flashmoe serve` under load on loopback: a real server process, N concurrent clients for a
fixed time, streaming and plain requests, random hang-ups and malformed requests interleaved.

Every answered request is checked (a streamed completion is a run of well-formed chunks ending in
[DONE]; a bad request gets a 4xx with an OpenAI error body); the server's RSS is sampled from
/proc; hang-ups are checked against the server's own count of cancelled generations. Prints one
JSON object: requests by kind and outcome, p50/p99 latency of completed requests, RSS, crashes.

    python benchmarks/server_load.py --clients 16 --seconds 120 [--model demo] [--json out.json]

tests/test_server_load.py runs it scaled down in CI. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

PROMPT = "The history of the city"
BAD = [  # (body, expected status)
    (b"{not json", 400),
    (json.dumps({"model": "no-such-model", "prompt": PROMPT}).encode(), 404),
    (json.dumps({"model": "MODEL", "prompt": PROMPT, "max_tokens": -3}).encode(), 400),
]


def start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "serve", model,
           "--port", str(port), "--max-tokens-limit", "256"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def eos_token(model: str) -> int:
    """The model's end-of-generation token: hang-up streams ban it, so only the hang-up ends them."""
    from flashmoe_plugin import Llama
    with Llama(model_path=model, n_ctx=64, verbose=False) as llm:
        return llm.token_eos()


def one_request(url: str, model: str, rng: random.Random, eos: int) -> tuple[str, str, float]:
    """(kind, outcome, seconds) of one request; outcome is ok | hung_up | bad_ok | or a failure text."""
    t0 = time.perf_counter()
    kind = rng.choices(["stream", "chat", "bad"], weights=[5, 3, 2])[0]
    if kind == "bad":
        body, want = rng.choice(BAD)
        r = httpx.post(url + "/v1/completions", content=body.replace(b"MODEL", model.encode()),
                       headers={"content-type": "application/json"}, timeout=60)
        ok = r.status_code == want and "message" in r.json().get("error", {})
        return kind, "bad_ok" if ok else f"bad request answered {r.status_code}: {r.text[:200]}", time.perf_counter() - t0
    if kind == "chat":
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Where is the city?"}],
            "max_tokens": rng.randint(4, 24), "temperature": 0.7, "seed": rng.randint(0, 1000)})
        d = r.json()
        ok = r.status_code == 200 and d["object"] == "chat.completion" and \
            isinstance(d["choices"][0]["message"]["content"], str) and d["usage"]["completion_tokens"] > 0
        return kind, "ok" if ok else f"chat answered {r.status_code}: {r.text[:200]}", time.perf_counter() - t0
    hang_up_after = rng.randint(1, 4) if rng.random() < 0.3 else None
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200 if hang_up_after else rng.randint(4, 24),
            "temperature": 0.7, "stream": True}
    if hang_up_after:
        body["logit_bias"] = {str(eos): -100}
    n, done = 0, False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            return kind, f"stream answered {r.status_code}", time.perf_counter() - t0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("object") != "text_completion" or not isinstance(chunk["choices"][0]["text"], str):
                return kind, f"malformed chunk {data[:200]}", time.perf_counter() - t0
            n += 1
            if hang_up_after and n >= hang_up_after:
                return kind, "hung_up", time.perf_counter() - t0  # leaving the block closes the connection
    return kind, "ok" if done else "stream ended without [DONE]", time.perf_counter() - t0


def run(model: str = "demo", clients: int = 16, seconds: float = 120, seed: int = 0) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    eos = eos_token(model)
    proc = start_server(model, port)
    try:
        name = wait_healthy(url, proc)["model"]
        rss = [rss_bytes(proc.pid)]
        results, lock, stop = [], threading.Lock(), time.time() + seconds

        def client(i):
            rng = random.Random(seed * 1000 + i)
            while time.time() < stop:
                try:
                    res = one_request(url, name, rng, eos)
                except Exception as e:  # noqa: BLE001 - a transport failure is a result too
                    res = ("?", f"error {e!r}", 0.0)
                with lock:
                    results.append(res)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(rss_bytes(proc.pid))
            time.sleep(0.5)
        deadline = time.time() + 60  # the hung-up generations are cancelled within a token
        while (h := httpx.get(url + "/health", timeout=10).json())["busy"] or h["queued"]:
            if time.time() > deadline:
                break
            time.sleep(0.1)
        rss.append(rss_bytes(proc.pid))
        lat = sorted(s for k, o, s in results if o == "ok")
        outcomes: dict = {}
        for k, o, _ in results:
            key = o if o in ("ok", "hung_up", "bad_ok") else "failed"
            outcomes.setdefault(k, {}).setdefault(key, 0)
            outcomes[k][key] += 1
        return {"clients": clients, "seconds": seconds, "requests": len(results), "by_kind": outcomes,
                "failures": [o for _, o, _ in results if o not in ("ok", "hung_up", "bad_ok")][:20],
                "hung_up": sum(o == "hung_up" for _, o, _ in results),
                "server_generations": h["generations"], "server_alive": proc.poll() is None,
                "p50_s": lat[len(lat) // 2] if lat else None,
                "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                "rss_start_bytes": rss[0], "rss_peak_bytes": max(rss), "rss_end_bytes": rss[-1]}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    res = run(a.model, a.clients, a.seconds, a.seed)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
