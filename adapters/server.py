"""`flashmoe serve MODEL`: an OpenAI-compatible HTTP server over one `flashmoe_plugin.Llama`.

    POST /v1/completions        text completion (SSE with "stream": true)
    POST /v1/chat/completions   chat, tools / tool_choice / response_format passed to the Llama
    POST /v1/embeddings         the Llama's embeddings (501 where a Llama has none)
    GET  /v1/models             the one model served
    GET  /health                liveness, queue depth, generations completed/cancelled/failed

Requests and responses have the OpenAI shapes (the `Llama` produces llama-cpp-python's dicts,
which are those). Generations run one at a time in arrival order (engine_queue.py); a client
that disconnects cancels its generation. Bad requests get a 4xx with an OpenAI error body that
names the field; `--api-key` is checked in constant time; bodies and max_tokens are bounded.

Why not llama-cpp-python's own server app: it constructs `llama_cpp.Llama` itself and, when
streaming, calls the unbound `llama_cpp.Llama` methods on the object, so it needs monkeypatching;
and it would make llama-cpp-python a dependency of serving. FastAPI + uvicorn is what it uses too.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine_queue import Cancelled, EngineQueue

log = logging.getLogger("flashmoe.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------------- request bodies
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    typical_p: float = Field(1.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, ge=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    n: int = Field(1, ge=1, le=1)
    logit_bias: Optional[Dict[str, float]] = None
    grammar: Optional[str] = None  # llama.cpp server extension: a GBNF grammar

    def sampling(self) -> dict:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias")
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    typical_p=self.typical_p, repeat_penalty=self.repeat_penalty,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    stop=self.stop or [], seed=self.seed, logit_bias=bias,
                    **({"grammar": self.grammar} if self.grammar is not None else {}))


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]] = ""
    max_tokens: Optional[int] = Field(16, ge=1)
    suffix: Optional[str] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class ChatCompletionRequest(_Sampling):
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    functions: Optional[List[Dict[str, Any]]] = None
    function_call: Optional[Union[str, Dict[str, Any]]] = None
    response_format: Optional[Dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input: Union[str, List[str]]  # texts (token-id inputs are not taken)


def _parse(cls, raw: bytes):
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        shown = repr(first.get("input"))
        got = f" (got {shown})" if first["type"] != "missing" and field and len(shown) <= 80 else ""
        raise APIError(400, f"{field or 'body'}: {first['msg']}{got}", param=field) from None


_ROLES = {"system", "user", "assistant", "tool", "function", "developer"}


def _messages(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """OpenAI messages as chat templates expect them: text parts joined, developer -> system."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}",
                           param=f"messages.{i}.role")
        m = dict(m, role="system" if role == "developer" else role)
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                   param=f"messages.{i}.content")
                texts.append(part.get("text", ""))
            m["content"] = "".join(texts)
        out.append(m)
    return out


# ---------------------------------------------------------------------- app
class _BodyLimit:
    """Reject request bodies over `limit` bytes with 413 before anything parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._reject(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: disconnect notices pass through

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        err = APIError(413, f"request body larger than this server's limit of {self.limit} bytes "
                            "(flashmoe serve --max-body-size)")
        await err.response()(scope, receive, send)


def create_app(llm, model_name: Optional[str] = None, api_key: Optional[str] = None,
               max_tokens_limit: int = 4096, max_body_size: int = 4 * 2**20) -> FastAPI:
    """The ASGI app serving `llm` (a flashmoe_plugin.Llama) as `model_name`."""
    name = model_name or Path(llm.model_path).name
    engine = EngineQueue(llm)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)  # lets a running generation finish its token

    app = FastAPI(title="flashmoe", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.model_name, app.state.llm = engine, name, llm
    app.add_middleware(_BodyLimit, limit=max_body_size)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    def authorize(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    def check_model(model: Optional[str]):
        if model is not None and model != name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{name}' (GET /v1/models)",
                           param="model", code="model_not_found")

    def token_budget(requested: Optional[int]) -> int:
        if requested is not None and requested > max_tokens_limit:
            raise APIError(400, f"max_tokens {requested} is above this server's limit of {max_tokens_limit} "
                                "(flashmoe serve --max-tokens-limit)", param="max_tokens")
        return min(requested or max_tokens_limit, max_tokens_limit)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "busy": engine.busy is not None, "queued": engine.waiting,
                "generations": dict(engine.counts)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "flashmoe"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = _parse(CompletionRequest, await request.body())
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of several prompts is not supported)",
                               param="prompt")
            prompt = prompt[0]
        kwargs = dict(prompt=prompt, suffix=req.suffix, max_tokens=token_budget(req.max_tokens), echo=req.echo,
                      logprobs=req.logprobs, stream=req.stream, model=name, **req.sampling())
        return await _run(request, engine, "completion", req,
                          lambda job: llm.create_completion(**kwargs, logits_processor=job.processor))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = _parse(ChatCompletionRequest, await request.body())
        check_model(req.model)
        kwargs = dict(messages=_messages(req.messages), max_tokens=token_budget(req.max_completion_tokens or req.max_tokens),
                      stream=req.stream, model=name, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                      **req.sampling())
        for k in ("tools", "tool_choice", "functions", "function_call", "response_format"):
            if getattr(req, k) is not None:
                kwargs[k] = getattr(req, k)
        return await _run(request, engine, "chat", req,
                          lambda job: llm.create_chat_completion(**kwargs, logits_processor=job.processor))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        req = _parse(EmbeddingRequest, await request.body())
        check_model(req.model)
        return await _run(request, engine, "embedding", req,
                          lambda job: llm.create_embedding(req.input, model=name))

    return app


async def _wait(request: Request, job):
    """The job's next event, cancelling the job if the client disconnects meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(job.next(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise Cancelled() from None


def _api_error_of(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotImplementedError):
        return APIError(501, str(exc) or "not implemented by flashmoe", type="not_implemented_error")
    if isinstance(exc, ValueError):  # the Llama's checks of a request (context, template, schema, ...)
        return APIError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


async def _run(request: Request, engine: EngineQueue, label: str, req, fn):
    job = engine.submit(fn, label)
    try:
        kind, value = await _wait(request, job)
    except Cancelled:
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
    if kind == "error":
        raise _api_error_of(value)
    if kind == "result":
        await job.next()  # "end"
        return JSONResponse(value)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return StreamingResponse(_sse(job, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(job, include_usage: bool):
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`. A client that goes
    away closes this generator (Starlette cancels it), which cancels the generation."""
    last = None
    try:
        while True:
            kind, value = await job.next()
            if kind == "item":
                last = value
                yield f"data: {json.dumps(value)}\n\n"
            elif kind == "end":
                if include_usage and last is not None:
                    usage = {"prompt_tokens": value.get("prompt_tokens", 0),
                             "completion_tokens": value.get("completion_tokens", 0)}
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield f"data: {json.dumps({**{k: last[k] for k in ('id', 'object', 'created', 'model')}, 'choices': [], 'usage': usage})}\n\n"
                break
            elif kind == "error":
                if isinstance(value, Cancelled):
                    return
                yield f"data: {json.dumps(_api_error_of(value).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op when the generation already ended


def serve(llm, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          api_key: Optional[str] = None, max_tokens_limit: int = 4096, max_body_size: int = 4 * 2**20,
          log_level: str = "info"):
    import uvicorn
    if host not in LOOPBACK:
        print(f"flashmoe serve: WARNING: listening on {host}, reachable from other machines"
              + ("" if api_key else " by anyone (no --api-key)"), file=sys.stderr)
    app = create_app(llm, model_name=model_name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                     max_body_size=max_body_size)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
