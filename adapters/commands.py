"""`flashmoe serve` and `flashmoe chat`, registered through the `register_commands` hook like any
plugin's commands (entry point `adapter_commands`). Heavy imports (FastAPI, prompt-toolkit) happen
only when a command runs, so `flashmoe --help` stays fast."""
from __future__ import annotations

import click

from flashmoe_plugin.commands import engine_options, tri
from flashmoe_plugin.hookspecs import hookimpl


def open_llama(model, device, ram_budget, vram_budget, policy, prefetch, direct_io, backend, n_ctx, no_verify,
               chat_format=None, **engine):
    """A Llama over MODEL with the engine options every command shares (the rest of
    engine_options, e.g. storage or experts_per_token, go to the engine as they are); a missing or
    damaged store becomes a one-line error naming it (no traceback)."""
    from flashmoe_plugin import Llama
    try:
        return Llama(model_path=model, n_ctx=n_ctx, device=device, ram_budget=ram_budget, vram_budget=vram_budget,
                     cache_policy=policy, prefetch=prefetch, backend=backend, direct_io=tri(direct_io),
                     verify=not no_verify, chat_format=chat_format, verbose=False, **engine)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(f"cannot open model {model}: {e}") from None


@hookimpl
def register_commands(cli):
    @cli.command()
    @click.argument("model")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to bind; anything but loopback is reachable from other machines (a warning says so)")
    @click.option("--port", default=8000, show_default=True, type=int)
    @click.option("--api-key", default=None, envvar="FLASHMOE_API_KEY",
                  help="require 'Authorization: Bearer KEY' on /v1/* (env FLASHMOE_API_KEY)")
    @click.option("--model-alias", default=None, help="the model id clients use (default: MODEL's folder name)")
    @click.option("--max-tokens-limit", default=4096, show_default=True, help="largest max_tokens a request may ask")
    @click.option("--max-body-size", default="4M", show_default=True, help="largest request body (4M, 512K, bytes)")
    @click.option("--chat-format", default=None, help="a llama-cpp-python chat format when the model has no template")
    @engine_options
    def serve(model, host, port, api_key, model_alias, max_tokens_limit, max_body_size, chat_format, **eng):
        """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /v1/embeddings)."""
        try:
            from .server import serve as run_server
        except ImportError as e:
            raise click.ClickException(f"flashmoe serve needs FastAPI and uvicorn ({e}): "
                                       "pip install 'flashmoe-plugin[server]'") from None
        from flashmoe_plugin.sizes import parse_size
        llm = open_llama(model, chat_format=chat_format, **eng)
        name = model_alias or ("demo" if model == "demo" else None)
        run_server(llm, host=host, port=port, model_name=name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                   max_body_size=parse_size(max_body_size))

    @cli.command()
    @click.argument("model")
    @click.option("--system", "system_prompt", default=None, help="system prompt")
    @click.option("-n", "--max-tokens", default=512, show_default=True, help="most tokens per reply")
    @click.option("--temp", default=0.7, show_default=True)
    @click.option("--seed", default=None, type=int)
    @click.option("--history-file", default=None, help="input history (default: in the user's data folder)")
    @click.option("--chat-format", default=None, help="a llama-cpp-python chat format when the model has no template")
    @engine_options
    def chat(model, system_prompt, max_tokens, temp, seed, history_file, chat_format, **eng):
        """Interactive chat shell: streamed replies, slash commands (/help), live pager figures."""
        from .shell import ChatShell, default_history_file
        llm = open_llama(model, chat_format=chat_format, **eng)
        ChatShell(llm, system=system_prompt, max_tokens=max_tokens, temperature=temp, seed=seed,
                  history_file=history_file or default_history_file()).run()
