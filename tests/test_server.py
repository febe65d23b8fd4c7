"""`flashmoe serve` as clients use it: a real uvicorn server on 127.0.0.1 (a free port) over the
demo model, driven by the official `openai` client; every response validates through the
client's own pydantic models, and the served text equals what the same `Llama` returns directly."""
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from flashmoe_plugin import Llama
from flashmoe_plugin.adapters.server import create_app

MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is the city?"}]


@pytest.fixture(scope="module")
def server():
    llm = Llama(model_path="demo", n_ctx=512, verbose=False)
    app = create_app(llm, model_name="demo", max_tokens_limit=256, max_body_size=64 * 1024)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60,
                           _strict_response_validation=True)
    yield SimpleNamespace(url=url, app=app, llm=llm, client=client)
    srv.should_exit = True
    thread.join(10)
    llm.close()


def direct(server, fn):
    """Call the served Llama directly, once the server is idle (one user at a time)."""
    wait_idle(server.app.state.engine)
    return fn(server.llm)


def wait_idle(engine, timeout=30):
    """The last chunk reaches a client just before the worker records the job as done."""
    deadline = time.time() + timeout
    while engine.busy is not None or engine.waiting:
        assert time.time() < deadline, "the server stayed busy"
        time.sleep(0.02)


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "demo"


def test_chat_completion_matches_llama(server):
    resp = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 seed=3)
    assert isinstance(resp, ChatCompletion) and resp.object == "chat.completion"
    want = direct(server, lambda llm: llm.create_chat_completion(messages=MESSAGES, max_tokens=12, temperature=0,
                                                                 seed=3))
    assert resp.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert resp.usage.completion_tokens == want["usage"]["completion_tokens"] > 0


def test_streamed_chat(server):
    stream = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                                   seed=3, stream=True, stream_options={"include_usage": True})
    chunks = [ChatCompletionChunk.model_validate(c.to_dict()) for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    whole = server.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12, temperature=0,
                                                  seed=3)
    assert text == whole.choices[0].message.content and finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion(server):
    resp = server.client.completions.create(model="demo", prompt="The history of the city", max_tokens=10,
                                            temperature=0, logprobs=2)
    assert isinstance(resp, Completion) and resp.object == "text_completion"
    want = direct(server, lambda llm: llm.create_completion("The history of the city", max_tokens=10,
                                                            temperature=0, logprobs=2))
    assert resp.choices[0].text == want["choices"][0]["text"] and resp.choices[0].text
    assert resp.choices[0].logprobs.tokens == want["choices"][0]["logprobs"]["tokens"]
    # Streamed completion chunks carry finish_reason null until the last, as OpenAI's own API
    # sends them; the client's Completion model types it non-null, so only the last validates.
    loose = server.client.with_options()
    loose._strict_response_validation = False
    chunks = [c.to_dict() for c in loose.completions.create(model="demo", prompt="The history of the city",
                                                            max_tokens=10, temperature=0, stream=True)]
    assert Completion.model_validate(chunks[-1]).choices[0].finish_reason == resp.choices[0].finish_reason
    assert all(c["choices"][0]["finish_reason"] is None and c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == resp.choices[0].text


def test_tool_call_named(server):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    resp = server.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    calls = resp.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].id
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert resp.choices[0].finish_reason in ("tool_calls", "stop")


def test_json_schema_response(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = server.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=96,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, seed=1)
    data = json.loads(resp.choices[0].message.content)
    assert set(data) == {"name", "age"} and isinstance(data["name"], str) and len(data["name"]) <= 20
    assert isinstance(data["age"], int) and 0 <= data["age"] <= 150


def test_bad_requests_are_clear_4xx(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "demo", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "gpt-4o" in e.value.message and "demo" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="demo", prompt="x", max_tokens=-5)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="demo", prompt="x", max_tokens=100000)
    assert "limit of 256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "x"}])
    assert "role" in e.value.message
    r = httpx.post(server.url + "/v1/completions", json={"model": "demo", "prompt": "x" * 100_000})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    # a prompt longer than the context window: the Llama's own message, as a 400
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="demo", prompt=[5] * 600, max_tokens=4)
    assert "context window" in e.value.message
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_embeddings(server):
    emb = server.client.embeddings.create(model="demo", input=["hello", "the city"])
    want = direct(server, lambda llm: llm.create_embedding(["hello", "the city"]))
    assert [d.embedding for d in emb.data] == [d["embedding"] for d in want["data"]]
    assert len(emb.data[0].embedding) == server.llm.n_embd() and emb.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "demo", "input": [[1, 2, 3]]})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]


def test_api_key():
    llm = SimpleNamespace(model_path="/x/model")
    app = create_app(llm, api_key="s3cret")
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return ((await c.get("/v1/models")).status_code,
                    (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code,
                    (await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).json(),
                    (await c.get("/health")).status_code)
    import asyncio
    missing, wrong, ok, health = asyncio.run(go())
    assert missing == wrong == 401 and ok["data"][0]["id"] == "model" and health == 200
    app.state.engine.close()


def test_concurrent_streams_and_disconnects(server):
    """8 streaming clients at once; 2 hang up after 3 chunks. The 6 others get exactly the text a
    lone request gets, the 2 abandoned generations stop (far before their max_tokens), and the
    server answers afterwards."""
    eos = server.llm.token_eos()
    prompt, bias = "The history of the city", {str(eos): -100}  # never stop early: only a hang-up ends them
    want = server.client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    engine = server.app.state.engine
    wait_idle(engine)
    before = len(engine.history)
    results, errors = {}, []

    def client(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            hang_up = i in (2, 5)
            stream = c.completions.create(model="demo", prompt=prompt, temperature=0, stream=True,
                                          max_tokens=250 if hang_up else 6,
                                          logit_bias=bias if hang_up else openai.NOT_GIVEN)
            text = ""
            for n, chunk in enumerate(stream):
                text += chunk.choices[0].text
                if hang_up and n == 2:
                    stream.close()
                    break
            results[i] = text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(results[i] == want for i in range(8) if i not in (2, 5)), results
    wait_idle(engine)
    runs = list(engine.history)[before:]
    assert len(runs) == 8
    cancelled = [r for r in runs if r["outcome"] == "cancelled"]
    assert len(cancelled) == 2, runs
    assert all(r["completion_tokens"] < 100 and r["finish_reason"] is None for r in cancelled), cancelled
    assert sum(r["outcome"] == "completed" and r["completion_tokens"] == 6 for r in runs) == 6, runs
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and not health["busy"] and health["queued"] == 0
    again = server.client.completions.create(model="demo", prompt=prompt, max_tokens=6, temperature=0)
    assert again.choices[0].text == want


def test_non_streaming_client_that_leaves_stops_its_generation(server):
    engine = server.app.state.engine
    wait_idle(engine)
    before = len(engine.history)
    # the server's max_tokens limit (256) against a client that leaves after 0.4 s: a run of 250
    # tokens had once finished within the 1.5 s the client used to wait (an idle 2-core box)
    body = {"model": "demo", "prompt": "The history of the city", "max_tokens": 256, "temperature": 0,
            "logit_bias": {str(server.llm.token_eos()): -100}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.4)
    wait_idle(engine)
    (run,) = list(engine.history)[before:]
    assert run["outcome"] == "cancelled" and run["completion_tokens"] < 256, run
    assert httpx.get(server.url + "/health").json()["generations"]["cancelled"] >= 1
