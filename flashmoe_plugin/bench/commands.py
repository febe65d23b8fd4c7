"""CLI commands for measuring: bench (kernels; stores), synth, profile."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from ..commands import DENSE_QUANT, EXPERTS_PER_TOKEN, tri
    from ..convert.synth import LIKE_CHOICES
    from ..models_path import MODEL
    from ..progress import progress_bar
    from ..sizes import SIZE

    @cli.command()
    @click.argument("store", required=False, type=MODEL)
    @click.option("--kernels", is_flag=True, help="measure the expert kernels instead of a store")
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--quick", is_flag=True, help="kernels: smaller working set (not for reported figures)")
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    @click.option("--ram-budget", type=SIZE, default=None, help="bytes of expert records kept in RAM (512M, 8G, 50% "
                  "of the experts, ...)")
    @click.option("--policy", default="auto", show_default=True, help="expert cache policy")
    @click.option("--tokens", default=32, show_default=True, help="decode steps measured")
    @click.option("--prompt-tokens", default=512, show_default=True, help="prompt length for TTFT and prefill")
    @click.option("--depth", type=int, default=None, help="also time the decode from this many tokens of context "
                  "(llama-bench -d; 0: an empty context, as llama-bench's tg test); the main figure stays the "
                  "decode after the prompt")
    @click.option("--vram-budget", type=SIZE, default=None, help="CUDA: bytes of expert records kept in GPU memory")
    @click.option("--prefetch", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="predictor-driven prefetch (auto: only while it pays)")
    @click.option("--prefetch-depth", type=int, default=None,
                  help="layers ahead the predictor guesses (default: up to 8 for disk reads, as far as a read's "
                       "time needs, and 1 for host-tier copies)")
    @click.option("--host-compute", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="CUDA: compute host-tier experts on the CPU when that beats copying them (measured)")
    @click.option("--n-cpu-moe", default=0, show_default=True,
                  help="keep the experts of the first N MoE layers in RAM and compute them on the CPU")
    @click.option("--io-threads", default=4, show_default=True, help="reader threads")
    @click.option("--direct-io", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="O_DIRECT reads (bypass the page cache), buffered, or auto: O_DIRECT when the free RAM "
                  "cannot hold the experts and the dense part")
    @click.option("--drop-caches", is_flag=True, help="drop the OS page cache first (needs root; else the "
                  "store's files are evicted)")
    @click.option("--no-verify", is_flag=True, help="skip per-record checksum checks on reads")
    @click.option("--no-compute-bound", is_flag=True, help="skip the second run with every expert resident")
    @click.option("--backend", default=None, help="kernel backend (default: best for the device)")
    @click.option("--temp", default=1.0, show_default=True, help="decode sampling temperature (0 = greedy)")
    @click.option("--seed", default=0, show_default=True, help="sampling seed (same seed, same tokens)")
    @click.option("--save-trace", type=click.Path(path_type=Path), default=None,
                  help="write this run's routing trace (to STORE/routing_trace.npz, a rerun with --policy "
                  "belady replays it)")
    @EXPERTS_PER_TOKEN
    @DENSE_QUANT
    @click.option("--decode-graph", type=click.Choice(["auto", "on", "eager", "off"]), default="auto",
                  show_default=True, help="decode steps on the device, captured as a CUDA graph (auto: CUDA runs "
                  "with a q8/q4/q2 store); eager: the same step uncaptured; off: the layer-by-layer path")
    @click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
                  help="dense weights and activations (auto: the engine's default for the device)")
    def bench(store, kernels, device, quick, as_json, ram_budget, policy, tokens, prompt_tokens, depth, vram_budget, prefetch,
              prefetch_depth, host_compute, n_cpu_moe, io_threads, direct_io, drop_caches, no_verify, no_compute_bound, backend,
              temp, seed, save_trace, experts_per_token, dense_quant, decode_graph, dtype):
        """Measure a STORE end to end (tok/s against the I/O and compute bounds, hit rate against
        Belady), or the kernels (--kernels) against memory bandwidth and the best torch path.
        STORE is a model: a store folder, or `demo` for the embedded model."""
        if kernels:
            from .kernels import run
            try:
                with progress_bar("kernels") as bar:
                    result = run(device=device, quick=quick, progress=bar)
            except (ValueError, RuntimeError) as e:
                raise click.ClickException(str(e)) from None
            click.echo(json.dumps(result, indent=1) if as_json else _table(result))
            return
        if store is None:
            raise click.UsageError("give a STORE to measure, or --kernels")
        from .store import run_bench
        try:
            with progress_bar("bench") as bar:
                result = run_bench(store, device=device, ram_budget=ram_budget, policy=policy, tokens=tokens,
                                   prompt_tokens=prompt_tokens, depth=depth, direct_io=tri(direct_io), drop_caches=drop_caches,
                                   verify=not no_verify, backend=backend, temp=temp, seed=seed, save_trace=save_trace,
                                   vram_budget=vram_budget, prefetch=prefetch, prefetch_depth=prefetch_depth,
                                   host_compute=host_compute, n_cpu_moe=n_cpu_moe, experts_per_token=experts_per_token,
                                   decode_graph=decode_graph, dense_quant=dense_quant, dtype=dtype,
                                   io_threads=io_threads, compute_bound=not no_compute_bound, progress=bar)
        except (ValueError, RuntimeError, OSError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(json.dumps(result, indent=1) if as_json else _store_table(result))

    @cli.command()
    @click.argument("dst", type=click.Path(path_type=Path))
    @click.option("--like", required=True, type=click.Choice(LIKE_CHOICES), help="model whose shapes to copy")
    @click.option("--layers", type=int, default=None, help="only the first N layers (default: all)")
    @click.option("--quant", type=click.Choice(["q4", "q8", "q2", "bf16"]), default="q4", show_default=True)
    @click.option("--seed", default=0, show_default=True)
    @click.option("--force", is_flag=True, help="replace DST if it exists")
    def synth(dst, like, layers, quant, seed, force):
        """Write a store of a real model's exact shapes with random weights (fast; atomic)."""
        from ..convert.synth import synth as run_synth
        from ..sizes import format_rate, format_size
        t0 = time.perf_counter()
        with progress_bar(f"synth {like} {quant}", unit="bytes") as bar:
            try:
                out = run_synth(dst, like, layers=layers, quant=quant, force=force, seed=seed, progress=bar)
            except (ValueError, OSError) as e:
                raise click.ClickException(str(e)) from None
        secs = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
        click.echo(f"wrote {out}: {format_size(nbytes)} in {secs:.1f} s ({format_rate(nbytes / secs)})")

    @cli.command()
    @click.argument("store", type=MODEL)
    @click.option("--prompts", "prompts_file", type=click.Path(exists=True, path_type=Path), default=None,
                  help="text file, one prompt per line (default: a few built-in ones)")
    @click.option("-n", "--n-predict", "n", default=64, show_default=True, help="tokens generated per prompt")
    @click.option("--trace", "trace_path", type=click.Path(path_type=Path), default=None,
                  help="where to write the routing trace (default: STORE/routing_trace.npz)")
    @click.option("--ram-budget", type=SIZE, default=None, help="expert RAM budget while profiling (512M, 8G, 50%, ...)")
    @click.option("--policy", default="auto", show_default=True)
    @click.option("--temp", default=0.0, show_default=True, help="sampling temperature (0 = greedy)")
    @click.option("--seed", default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
    def profile(store, prompts_file, n, trace_path, ram_budget, policy, temp, seed, as_json):
        """Run prompts (greedy by default); write STORE/routing_stats.json (per-layer expert frequencies, used
        by --policy static) and the routing trace (used by --policy belady and for grading)."""
        from .store import run_profile
        prompts = prompts_file.read_text().splitlines() if prompts_file else None
        try:
            with progress_bar("profile") as bar:
                result = run_profile(store, prompts, n=n, ram_budget=ram_budget, policy=policy, trace_path=trace_path,
                                     temp=temp, seed=seed, progress=bar)
        except (ValueError, RuntimeError, OSError) as e:
            raise click.ClickException(str(e)) from None
        if as_json:
            click.echo(json.dumps(result, indent=1))
            return
        click.echo(f"{result['prompts']} prompts, {result['tokens_routed']} tokens routed "
                   f"({result['tokens_generated']} generated), {result['requests']} pager requests, "
                   f"hit rate {result['hit_rate']:.1%}")
        for l, d in result["layers"].items():
            click.echo(f"  layer {l:3d}: {d['experts_used']} experts used, hottest 10% take {d['top10pct_share']:.0%}")
        click.echo(f"wrote {result['routing_stats']}\nwrote {result['trace']}")


def _store_table(r: dict) -> str:
    from ..sizes import format_rate, format_size

    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    def rate(gbps):
        return format_rate(None if gbps is None else gbps * 1e9)
    tiers = " | ".join(f"{name} {f(t['hit_rate'], '{:.1%}')}" for name, t in r["tiers"].items()
                       if t and "hit_rate" in t)
    return "\n".join([
        f"{r['store']}: {r['architecture']} {r['quant']}, policy {r['policy']}, device tier {r['capacity_records']}"
        f" + host tier {r['host_capacity_records']} of {r['total_records']} records, backend {r['backend']}, "
        f"prefetch {r['prefetch']}",
        f"prefill {r['prompt_tokens']} tokens: TTFT {f(r['ttft_s'])} s, {f(r['prefill_tok_s'])} tok/s, warm "
        f"{f(r.get('prefill_warm_tok_s'))} tok/s (median of {len(r.get('prefill_warm_tok_s_all') or [])})",
        f"decode {r['tokens']} tokens: {f(r['decode_tok_s'])} tok/s | I/O bound {f(r['io_bound_tok_s'])} "
        f"(efficiency {f(r['io_efficiency'])}) | compute bound {f(r['compute_bound_tok_s'])}",
        *([f"decode {r['tokens']} tokens from depth {d['depth']} (llama-bench's way): {f(d['tok_s'])} tok/s"]
          if (d := r.get("decode_at_depth")) else []),
        f"decode graph {r.get('decode_graph')} | per token: host {f(r.get('host_ms_per_token'))} ms, "
        f"{f(r.get('launches_per_token'), '{:.0f}')} launch calls, {f(r.get('kernels_per_token'), '{:.0f}')} kernels",
        f"hit rate {f(r['hit_rate'], '{:.1%}')} decode ({tiers}), {f(r['hit_rate_run'], '{:.1%}')} run vs Belady "
        f"{f(r['belady_hit_rate'], '{:.1%}')} | {format_size(r['bytes_read_per_token'])} read/token, "
        f"stall {f(r['stall_ms_per_token'])} ms/token | disk {rate(r['disk_bandwidth_gbps'])} "
        f"({'O_DIRECT' if r['direct_io'] else 'buffered'}, page cache {r['disk']['page_cache']})",
        f"predictor precision {f(r['predictor_precision'], '{:.1%}')}, recall {f(r['predictor_recall'], '{:.1%}')}"
        f" | h2d {rate(r['h2d_gbps'])} | peak RSS {format_size(r.get('peak_rss_bytes') or 0)}, dense in RAM "
        f"{format_size(r.get('dense_resident_bytes') or 0)} ({r.get('dense_quant')})",
    ] + [f"note: {n}" for n in r["notes"]])


def _table(result: dict) -> str:
    """One row per kernel entry; rates in GiB/s (the JSON's gbps are 10^9 B/s); n/a where an entry
    has no such figure (mem_copy has no torch path; a failed entry has only its error)."""
    def num(v, width, digits):
        return f"{'n/a':>{width}s}" if v is None else f"{v:{width}.{digits}f}"
    rows = [f"{'kernel':28s} {'quant':5s} {'shape':>16s} {'GiB/s':>8s} {'vs mem':>7s} {'vs torch':>8s}"]
    for k in result["kernels"]:
        shape = k.get("shape")
        shape = "x".join(map(str, shape)) if isinstance(shape, (list, tuple)) else str(shape or "-")
        gbps = k.get("gbps")
        rows.append(f"{k['name']:28s} {k.get('quant') or '-':5s} {shape:>16s} "
                    f"{num(None if gbps is None else gbps * 1e9 / (1 << 30), 8, 1)} "
                    f"{num(k.get('ratio_vs_mem_bw'), 7, 2)} {num(k.get('ratio_vs_torch'), 8, 2)}"
                    + (f"  error: {k['error']}" if k.get("error") else ""))
    return "\n".join(rows)
