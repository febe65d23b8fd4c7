"""The built-in CLI commands, registered through the same hook third-party plugins use."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .hookspecs import hookimpl
from .models_path import MODEL
from .progress import progress_bar
from .sizes import SIZE


def _fail(e: Exception):
    raise click.ClickException(str(e))


def engine_options(f):
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or mps")(f)
    f = click.option("--ram-budget", type=SIZE, default=None, help="bytes of expert records kept in RAM (512M, 8G, 50% "
                     "of the experts, ...); CPU: default all, or the free RAM less a reserve; CUDA: the pinned tier "
                     "below VRAM, default what VRAM cannot hold, up to the free RAM less a reserve")(f)
    f = click.option("--vram-budget", type=SIZE, default=None, help="CUDA: bytes of expert records kept in GPU memory; default: "
                     "what is free after the dense part and the KV cache")(f)
    f = click.option("--policy", default="auto", show_default=True, help="expert cache policy")(f)
    f = click.option("--prefetch", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="predict the next layers' experts and load them early (auto: only while it pays)")(f)
    f = click.option("--direct-io", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="O_DIRECT reads (bypass the page cache), buffered, or auto: O_DIRECT when the free RAM "
                     "cannot hold the experts and the dense part")(f)
    f = click.option("--backend", default=None, help="kernel backend (default: best available for the device)")(f)
    f = click.option("--n-cpu-moe", default=0, show_default=True,
                     help="keep the experts of the first N MoE layers in RAM and compute them on the CPU")(f)
    f = click.option("--n-ctx", default=2048, show_default=True, help="context window")(f)
    f = click.option("--no-verify", is_flag=True, help="skip per-record checksum checks on reads")(f)
    f = click.option("--storage", default="native", show_default=True,
                     help="storage reader (`flashmoe plugins` lists them; faulty: faults from $FLASHMOE_FAULTS)")(f)
    f = EXPERTS_PER_TOKEN(f)
    f = DENSE_QUANT(f)
    return f


EXPERTS_PER_TOKEN = click.option("--experts-per-token", "experts_per_token", type=int, default=None,
                                 help="route K experts per token instead of the model's top-k (fewer: faster, "
                                 "at a quality cost)")


DENSE_QUANT = click.option("--dense-quant", "dense_quant", type=click.Choice(["auto", "none", "q8", "q4", "keep"]),
                           default="auto", show_default=True,
                           help="the dense part (attention, shared experts, output head, embedding): none = floats; "
                           "q8/q4 = quantized at load and computed packed; keep = a GGUF's own blocks (or a store's "
                           "stored dtype) kept as they are; auto = keep for a quantized GGUF on CPU, q8 on CPU when the free "
                           "RAM cannot hold the experts and the dense part, q8 on a GPU for a store with quantized "
                           "experts and 16-bit activations, else none")


def tri(value: str):
    """'on'/'off'/'auto' -> True/False/None."""
    return {"on": True, "off": False}.get(value)


def open_engine(store, device, ram_budget, vram_budget, policy, prefetch, direct_io, backend, n_ctx, no_verify,
                storage="native", experts_per_token=None, n_cpu_moe=0, dense_quant="auto"):
    from .runtime.engine import Engine
    return Engine(store, device=device, ram_budget=ram_budget, vram_budget=vram_budget, policy=policy,
                  prefetch=prefetch, direct_io=tri(direct_io), backend=backend, n_ctx=n_ctx, verify=not no_verify,
                  storage=storage, experts_per_token=experts_per_token, n_cpu_moe=n_cpu_moe, dense_quant=dense_quant)


def prompt_tokens(engine, prompt: str, n: int, truncate: bool = False) -> tuple[list[int], bool]:
    """The prompt's tokens, checked against the context window: a prompt that leaves no room to
    generate is an error, unless `truncate`, which keeps the first token (BOS) and the prompt's
    last tokens so that n tokens fit (said on stderr). Returns (ids, truncated)."""
    ids = engine.tokenizer.encode(prompt, add_bos=True, special=False)
    n_ctx = engine.n_ctx
    if len(ids) + (n if truncate else 1) <= n_ctx:
        return ids, False
    if not truncate:
        raise click.ClickException(
            f"the prompt is {len(ids)} tokens and the context window is {n_ctx} (--n-ctx): no room to generate; "
            f"raise --n-ctx, shorten the prompt, or pass --truncate to keep its last tokens")
    keep = max(1, n_ctx - n)
    head = ids[:1] if keep > 1 and ids[0] == engine.tokenizer.bos_id else []
    kept = head + ids[len(ids) - (keep - len(head)):]
    click.echo(f"note: prompt truncated to its last {len(kept) - len(head)} of {len(ids) - len(head)} tokens "
               f"(--truncate) so that {n_ctx - len(kept)} tokens fit in the context window of {n_ctx}", err=True)
    return kept, True


def stream_completion(engine, prompt: str, n: int, temp: float, seed, top_k=40, top_p=0.95, min_p=0.05,
                      repeat_penalty=1.0, out=None, truncate=False, echo=False):
    """Print the prompt (as the model sees it) and the completion as it is generated; returns
    (n_tokens, seconds, pager delta). Stopping short of n because the context window is full is
    said on stderr."""
    from .runtime.generate import complete
    from .runtime.sampling import SamplingParams
    out = out or sys.stdout
    ids, truncated = prompt_tokens(engine, prompt, n, truncate)
    if echo:
        out.write(engine.tokenizer.decode(ids).decode("utf-8", errors="replace") if truncated else prompt)
    before = engine.pager.stats.snapshot()
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    t0, count, reason = time.perf_counter(), 0, None
    for piece in complete(engine, ids, params, max_tokens=n):
        count += len(piece.token_ids)
        reason = piece.finish_reason
        out.write(piece.text)
        out.flush()
    out.write("\n")
    out.flush()
    if reason == "length" and count < n:
        click.echo(f"note: stopped after {count} of {n} tokens: the context window of {engine.n_ctx} (--n-ctx) is "
                   f"full ({len(ids)} prompt tokens)", err=True)
    return count, time.perf_counter() - t0, engine.pager.stats.delta(before)


def read_source(engine, cached_at_start) -> str:
    """Where the pager's reads came from: O_DIRECT is the disk; buffered reads may be served by the
    page cache, so say how much of the expert files it held when generation began."""
    p = engine.pager
    if p.fids and all(p.reader.is_direct(f) for f in p.fids.values()):
        return "from disk (O_DIRECT)"
    if cached_at_start is None:
        return "buffered (disk or page cache)"
    return f"buffered, {cached_at_start:.0%} of the expert files in the page cache at start"


def expert_files_cached(engine):
    """Fraction of the expert files in the page cache now (None: unknown for this kind of store)."""
    from .pagecache import cached_fraction
    s = engine.store
    try:
        paths = sorted({str(s.layer_path(l)) for l in s.layers})  # a file may hold several layers
    except (AttributeError, TypeError, KeyError):
        return None
    return cached_fraction(paths)


def print_stats(engine, n_tokens: int, seconds: float, delta: dict, err=True, cached_at_start=None):
    from .sizes import format_size
    p = engine.pager
    click.echo(
        f"[{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.1f} tok/s | experts: "
        f"{delta['hits']} hits, {delta['misses']} misses (hit rate {delta['hit_rate']:.1%}), "
        f"{delta['evictions']} evictions, {format_size(delta['bytes_read'])} read in {delta['read_seconds'] * 1e3:.0f} ms "
        f"({read_source(engine, cached_at_start)}) | "
        f"{'VRAM' if p.device.type == 'cuda' else 'RAM'} pool {p.capacity} records = {format_size(p.budget)}"
        + (f", host tier {p.host_capacity} records ({delta['host_hits']} hits)" if p.host_capacity else "")
        + (f", prefetched {delta['prefetch_used']} used of {delta['prefetch_reads'] + delta['prefetch_copies']}"
           if engine.predictor is not None else "")
        + f", policy {type(p.policy).__name__}, backend {engine.backend.name}]", err=err)


@hookimpl
def register_commands(cli):
    @cli.command()
    @click.argument("src", type=click.Path(exists=True, path_type=Path))
    @click.argument("dst", type=click.Path(path_type=Path))
    @click.option("--quant", type=click.Choice(["none", "bf16", "q8", "q4", "q2", "keep"]), default="q4", show_default=True,
                  help="expert format; none keeps the source dtype exactly; keep (GGUF source) keeps llama.cpp's blocks")
    @click.option("--force", is_flag=True, help="replace DST if it exists")
    def convert(src, dst, quant, force):
        """Convert an HF checkpoint folder or a GGUF file into an expert store (atomic: DST appears only when complete)."""
        from .convert import convert as run_convert
        t0 = time.perf_counter()
        with progress_bar(f"converting to {quant}") as bar:
            try:
                out = run_convert(src, dst, quant=quant, force=force, progress=bar)
            except (Exception,) as e:
                _fail(e)
        click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f} s")

    @cli.command()
    @click.argument("store", type=MODEL)
    @click.option("--verify", is_flag=True, help="check every record's checksum")
    @click.option("--index", is_flag=True, help="GGUF: write the sidecar crc32c index that later reads verify against")
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    def inspect(store, verify, index, as_json):
        """Show a model's config, sizes, quantization and checksum status (STORE: a store folder, a
        .gguf file, or `demo` for the embedded model)."""
        from .sizes import format_size
        from .models.hybrid import cache_sizes, describe_cache
        from .store.format import StoreError
        from .store.model import open_model
        try:
            s = open_model(store)
            if index and hasattr(s, "write_index"):
                s.write_index()
        except StoreError as e:
            _fail(e)
        dense = s.dense_bytes if hasattr(s, "dense_bytes") else (s.path / "dense.safetensors").stat().st_size
        info = {"path": str(s.path), "architecture": s.architecture, "quant": s.manifest["quant"],
                "config": s.config.to_json(), "moe_layers": len(s.layers),
                "experts_per_layer": s.config.num_experts, "record_bytes": s.layout.size,
                "expert_bytes": s.expert_bytes, "dense_bytes": dense, "source": s.manifest.get("source"),
                "cache_per_layer": cache_sizes(s.config)}
        if verify:
            n = sum(l.experts for l in s.layers.values())
            with progress_bar("verifying records", total=n) as bar:
                try:
                    problems = s.verify(progress=bar.advance)
                except StoreError as e:  # a GGUF file without its checksum index
                    _fail(e)
            info["verify"] = {"ok": not problems, "problems": problems}
        if as_json:
            click.echo(json.dumps(info, indent=1))
        else:
            c = s.config
            click.echo(f"{s.path}: {s.architecture}, {c.num_layers} layers ({len(s.layers)} MoE), hidden {c.hidden_size}, "
                       f"{c.num_experts} experts (top-{c.top_k}) of intermediate {c.moe_intermediate_size}")
            click.echo(f"experts: {s.quant}, {format_size(s.layout.size)} per record, {format_size(s.expert_bytes)} in all; "
                       f"dense part {format_size(dense)}")
            click.echo(describe_cache(info["cache_per_layer"]))
            if verify:
                click.echo("checksums: all records intact" if not problems else "checksums: DAMAGED\n  " + "\n  ".join(problems))
        if verify and problems:
            sys.exit(1)

    @cli.command()
    @click.argument("store", type=MODEL)
    @click.option("-p", "--prompt", required=True)
    @click.option("-n", "--n-predict", "n", default=128, show_default=True, help="tokens to generate")
    @click.option("--temp", default=0.8, show_default=True, help="temperature (0 = greedy)")
    @click.option("--seed", default=None, type=int)
    @click.option("--top-k", default=40, show_default=True)
    @click.option("--top-p", default=0.95, show_default=True)
    @click.option("--min-p", default=0.05, show_default=True)
    @click.option("--repeat-penalty", default=1.0, show_default=True)
    @click.option("--truncate", is_flag=True, help="a prompt too long for --n-ctx keeps its last tokens "
                  "(default: an error)")
    @engine_options
    def run(store, prompt, n, temp, seed, top_k, top_p, min_p, repeat_penalty, truncate, **eng):
        """Generate one completion of PROMPT, streamed, then the pager's figures. STORE is a model:
        a store folder, or `demo` for the embedded model."""
        try:
            engine = open_engine(store, **eng)
            cached = expert_files_cached(engine)
            stats = stream_completion(engine, prompt, n, temp, seed, top_k, top_p, min_p, repeat_penalty,
                                      truncate=truncate, echo=True)
        except (ValueError, RuntimeError, OSError) as e:
            _fail(e)
        print_stats(engine, *stats, cached_at_start=cached)

    @cli.command()
    @click.option("-p", "--prompt", default=None, help="prompt (default: a fixed one)")
    @click.option("-n", "--n-predict", "n", default=64, show_default=True)
    @click.option("--temp", default=0.7, show_default=True)
    @click.option("--seed", default=1, show_default=True)
    @click.option("--ram-budget", type=SIZE, default="50%", show_default=True,
                  help="expert RAM budget (512M, 8G, or a percentage of the experts' bytes)")
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--truncate", is_flag=True, help="a prompt too long for the context keeps its last tokens")
    def demo(prompt, n, temp, seed, ram_budget, device, truncate):
        """Run the embedded default model (no download, no arguments needed; elsewhere the model
        name `demo` opens it too: `flashmoe run demo -p ...`)."""
        from .demo import DEMO_PROMPT, demo_model_path
        from .runtime.engine import Engine
        from .sizes import format_size, parse_size
        from .store.format import Store
        path = demo_model_path()
        store = Store.open(path)
        budget = parse_size(ram_budget, store.expert_bytes, "--ram-budget")
        c = store.config
        click.echo(f"flashmoe demo: the project's own small {store.architecture} MoE ({c.num_layers} layers, "
                   f"{c.num_experts} experts of which {c.top_k} per token, {store.quant} experts, "
                   f"{format_size(store.expert_bytes)} of them) from {path}; expert RAM budget {format_size(budget)}",
                   err=True)
        try:
            engine = Engine(store, device=device, ram_budget=budget, n_ctx=512)
            cached = expert_files_cached(engine)
            stats = stream_completion(engine, prompt or DEMO_PROMPT, n, temp, seed, truncate=truncate, echo=True)
        except (ValueError, RuntimeError, OSError) as e:
            _fail(e)
        print_stats(engine, *stats, cached_at_start=cached)

    @cli.command()
    def plugins():
        """List loaded plugins, architectures, kernel backends (and why one is missing) and policies."""
        from .plugins import manager, registry
        pm, r = manager(), registry()
        click.echo("plugins: " + ", ".join(sorted(n for n, _ in pm.list_name_plugin())))
        click.echo("architectures: " + ", ".join(sorted({a.name for a in r.architectures.values()})))
        click.echo("kernel backends:")
        for name, b in sorted(r.backends.items()):
            ok, why = b.available()
            click.echo(f"  {name:6s} {'available' if ok else 'unavailable: ' + why} (devices: {', '.join(b.devices)})")
        click.echo("cache policies: " + ", ".join(sorted(r.policies)))
        click.echo("storage readers: " + ", ".join(sorted(r.storage)))
