"""flashmoe against llama.cpp on the same machine, same Mixtral-8x7B shapes and bits, every regime of
issue 10's two tables and issue 9's table; one JSON per machine with both figures and their ratio.

    python3 benchmarks/rival.py --src LLAMA_SRC            # everything (build, GGUF, store, rows)
    python3 benchmarks/rival.py --src LLAMA_SRC --stage prepare   # build + GGUF + store only
    python3 benchmarks/rival.py --src LLAMA_SRC --stage rows      # the rows (after prepare)

LLAMA_SRC: llama.cpp's source trimmed from the llama-cpp-python 0.3.36 sdist by
benchmarks/rival/prepare_llama_cpp_src.sh (~24 MB; the GPU machine has no network, carry it).
The steps, each skipped when its output exists in --work (default /tmp/rival):
1. build llama.cpp's `llama-bench` (CUDA sm_90 when nvcc and a GPU are here; CPU otherwise);
2. write the Q4_0 GGUF of Mixtral-8x7B's shapes with gguf-py (benchmarks/rival/gen_mixtral_gguf.py,
   random weights, 26.3 GB at 32 layers);
3. `flashmoe synth --like mixtral-8x7b --quant q4` (26.6 GiB at 32 layers);
4. the rows of this machine (ROWS): llama-bench (-o json) and `flashmoe bench --json`, page cache
   dropped before each run (where permitted), RAM-limited rows inside a memory cgroup (v1 or v2;
   when none can be made the row says so and runs without one);
5. writes --out (default benchmarks/results/rival-{h200,cpu}.json) after every row, so a run
   cut short keeps what it measured; each flashmoe bench's whole JSON goes to
   --work/flashmoe-MACHINE-rowN[-roundR].json (prefetch, predictor and tier statistics the row omits).
--layers N makes all of it N layers deep (a smoke test; ratios then do not stand for Mixtral).
--from-raw DIR runs nothing: it rebuilds the picked rows' flashmoe side in --out from the bench
JSONs a device call brought back (DIR/flashmoe-MACHINE-rowN.json), llama.cpp's figures kept.

The disk's speed drifts by the hour on a shared machine, and the 2-core rows are disk-bound, so
one run of each engine compares two different disks. --rounds N runs each picked row N times as
pairs, llama.cpp and flashmoe back to back, the order swapped every round (L F, F L, ...: a
steady drift weighs on both sides alike), each run preceded by a short O_DIRECT read of records
(disk_probe) and watched through /proc/diskstats (the bytes the device read over the run, its
busy share). The row gets every pair (`pairs`: both figures, both disk rates, the ratio) and the
median ratio (`ratio_decode_median`), which then is the row's `ratio_decode`; each pair is also
appended to the row's `runs` history. --quiet-locks F,G holds exclusive flock(2) locks on these
files around each probe and run (a shared machine's measurement gate, e.g. /tmp/box.gate,
/tmp/box.lock), so the rounds need not hold the machine for the whole call; --pause S sleeps
between runs (others' turn).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RIVAL = HERE / "rival"

# (table, row, llama-bench args, flashmoe bench args, memory cgroup limit or None, (prompt, decode) tokens)
# The H200 rows' flashmoe bench also times its decode from an empty context (DEPTH0), as llama-bench's
# tg test decodes: that figure is the row's (run_flashmoe). The 2-core rows' prompt is 16 tokens, and
# their decode after it carries the pager's statistics, so they keep it.
DEPTH0 = ["--depth", "0"]
ROWS = {
    "h200": [
        ("issue 9", "every expert in VRAM (defaults: the dense part in q8)", ["-ngl", "99"], [*DEPTH0, "--device", "cuda"],
         None, (512, 32)),
        ("issue 10 (H200)", "8 layers' experts in VRAM, the rest in RAM (static: --n-cpu-moe 24)",
         ["-ngl", "99", "--n-cpu-moe", "24"], [*DEPTH0, "--device", "cuda", "--n-cpu-moe", "24"], None, (512, 32)),
        ("issue 10 (H200)", "8G of experts in VRAM, the rest in pinned RAM (dynamic tiers, host compute auto)",
         ["-ngl", "99", "--n-cpu-moe", "24"],
         [*DEPTH0, "--device", "cuda", "--vram-budget", "8G", "--ram-budget", "24G"], None, (512, 32)),
        ("issue 10 (H200)", "every expert in RAM, dense on the GPU (--n-cpu-moe 32)",
         ["-ngl", "99", "--n-cpu-moe", "32"], [*DEPTH0, "--device", "cuda", "--n-cpu-moe", "32"], None, (512, 32)),
        ("issue 9", "every expert in VRAM, dense part in bf16 (--dense-quant none; llama.cpp's GGUF holds it in Q4_0)",
         ["-ngl", "99"], [*DEPTH0, "--device", "cuda", "--dense-quant", "none"], None, (512, 32)),
        ("REFERENCE (H200)", "8 GiB RAM cgroup, experts beyond VRAM (llama.cpp ~0.2 tok/s: short run)",
         ["-ngl", "99", "--n-cpu-moe", "24", "--repack", "0", "-lm", "mmap"],
         [*DEPTH0, "--device", "cuda", "--vram-budget", "8G", "--ram-budget", "5G", "--direct-io", "on"], 8 << 30,
         (16, 8)),
        ("issue 9", "every expert in VRAM, dense part in q4 (--dense-quant q4: the GGUF's bytes per token)",
         ["-ngl", "99"], [*DEPTH0, "--device", "cuda", "--dense-quant", "q4"], None, (512, 32)),
    ],
    "cpu": [
        ("issue 10 (2-core)", "whole machine (model ~1.1x RAM)", ["-ngl", "0", "--repack", "0", "-lm", "mmap"],
         ["--device", "cpu"], None, (16, 16)),
        ("issue 10 (2-core)", "12 GiB memory cgroup (model ~2.2x budget)", ["-ngl", "0", "--repack", "0", "-lm", "mmap"],
         ["--device", "cpu"], 12 << 30, (16, 16)),
    ],
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(cmd, env=None, cgroup=None, timeout=None) -> subprocess.CompletedProcess:
    """Run cmd (a list), inside a cgroup's procs file when given (the child joins before exec)."""
    if cgroup:
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}" && exec "$@"', "sh", *cmd]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_cgroup(name: str, limit: int) -> tuple[str | None, str]:
    """A memory cgroup of `limit` bytes: (its procs file, how) or (None, why not)."""
    v1 = Path("/sys/fs/cgroup/memory")
    try:
        if v1.is_dir():
            d = v1 / name
            d.mkdir(exist_ok=True)
            (d / "memory.limit_in_bytes").write_text(str(limit))
            try:
                (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass  # no swap accounting: no swap to limit
            return str(d / "cgroup.procs"), f"cgroup v1 {d}, memory.limit_in_bytes {limit}"
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").is_file():
            try:
                (root / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass
            d = root / name
            d.mkdir(exist_ok=True)
            (d / "memory.max").write_text(str(limit))
            try:
                (d / "memory.swap.max").write_text("0")
            except OSError:
                pass
            return str(d / "cgroup.procs"), f"cgroup v2 {d}, memory.max {limit}"
        return None, "no cgroup v1 memory controller or cgroup v2 hierarchy here"
    except OSError as e:
        return None, f"cannot make a memory cgroup ({e})"


# ---------------------------------------------------------------------------- preparation
def build(src: Path, work: Path, cuda: bool) -> Path:
    exe = work / "llama-build" / "bin" / "llama-bench"
    if exe.is_file():
        return exe
    log("building llama-bench", "(CUDA)" if cuda else "(CPU)")
    r = sh(["bash", str(RIVAL / "build_llama_bench.sh"), str(src), str(work / "llama-build")] + (["cuda"] if cuda else []))
    if r.returncode or not exe.is_file():
        raise SystemExit(f"llama-bench build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return exe


def gguf(src: Path, work: Path, layers: int) -> Path:
    out = work / f"mixtral-q4_0-{layers}l.gguf"
    if out.is_file():
        return out
    log("writing", out)
    tmp = out.with_suffix(".tmp")
    env = {"VOCAB_GGUF": str(src / "models" / "ggml-vocab-llama-spm.gguf"),
           "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    r = sh([sys.executable, str(RIVAL / "gen_mixtral_gguf.py"), str(tmp), str(layers)], env=env)
    if r.returncode:
        raise SystemExit(f"GGUF writer failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    tmp.rename(out)
    return out


def store(work: Path, layers: int) -> Path:
    out = work / f"mixtral-q4-{layers}l"
    if (out / "manifest.json").is_file():
        return out
    log("writing", out)
    r = sh(flashmoe() + ["synth", "--like", "mixtral-8x7b", "--quant", "q4", "--layers", str(layers), "--force", str(out)])
    if r.returncode:
        raise SystemExit(f"flashmoe synth failed:\n{r.stderr[-3000:]}")
    return out


def flashmoe() -> list[str]:
    return [sys.executable, "-c", "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()"]


# ---------------------------------------------------------------------------- the disk under a run
def disk_device(path: Path) -> str:
    st = os.stat(path).st_dev
    return f"{os.major(st)}:{os.minor(st)}"


def diskstats(dev: str) -> dict | None:
    """The block device's counters (/proc/diskstats): bytes read, milliseconds busy; None if absent
    (a partition's major:minor is listed too)."""
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f"{f[0]}:{f[1]}" == dev:
                return {"read_bytes": int(f[5]) * 512, "busy_ms": int(f[12]), "t": time.time()}
    except OSError:
        pass
    return None


def disk_over(before: dict | None, dev: str) -> dict:
    """What the device did since `before`: GB read, its rate over the wall time, the busy share."""
    after = diskstats(dev)
    if not before or not after:
        return {}
    dt = after["t"] - before["t"]
    gb = (after["read_bytes"] - before["read_bytes"]) / 1e9
    return {"disk_read_gb": round(gb, 3), "disk_read_gbps_over_run": round(gb / dt, 3),
            "disk_busy_over_run": round((after["busy_ms"] - before["busy_ms"]) / 1e3 / dt, 3)}


def disk_probe(files: list[Path], chunk: int = 99 << 20, nbytes: int = 1 << 30, seconds: float = 2.0,
               threads: int = 8) -> float | None:
    """GB/s of O_DIRECT reads of `chunk`-sized pieces at random offsets of `files`, `threads` pieces in
    flight (as the pager reads records), for at most nbytes or seconds: the disk's rate now,
    whatever the page cache holds. None where O_DIRECT or the reader is not available."""
    import random
    try:
        from flashmoe_plugin.io import DIRECT_ALIGN, AlignedBuffer, Reader
    except ImportError:
        return None
    rng = random.Random()
    files = [f for f in files if f.stat().st_size > chunk]
    if not files:
        return None
    buf = AlignedBuffer(threads * chunk)
    try:
        with Reader(nthreads=threads, direct=True) as reader:
            fids = [(reader.open(str(f)), f.stat().st_size) for f in files]
            done, t0 = 0, time.perf_counter()
            while done < nbytes and time.perf_counter() - t0 < seconds:
                reqs = []
                for j in range(threads):
                    fid, size = rng.choice(fids)
                    off = rng.randrange(0, size - chunk) // DIRECT_ALIGN * DIRECT_ALIGN
                    reqs.append((fid, off, chunk, buf.address + j * chunk, None))
                reader.read(reqs)
                done += threads * chunk
            return done / (time.perf_counter() - t0) / 1e9
    except OSError:
        return None


class Gate:
    """Exclusive flock(2) locks on the given files, taken in order (empty: no locks)."""

    def __init__(self, files: list[str]):
        self.files, self.held = files, []

    def __enter__(self):
        import fcntl
        for f in self.files:
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.held.append(fd)
        return self

    def __exit__(self, *exc):
        for fd in reversed(self.held):
            os.close(fd)  # releases the lock
        self.held = []


# ---------------------------------------------------------------------------- rows
def run_llama(exe: Path, model: Path, args: list[str], p: int, n: int, cgroup, threads: int, reps: int = 2) -> dict:
    cmd = [str(exe), "-m", str(model), "-p", str(p), "-n", str(n), "-r", str(reps), "-o", "json", "-t", str(threads),
           *args]
    t0 = time.time()
    r = sh(cmd, cgroup=cgroup, timeout=900)
    out = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 1)}
    if r.returncode:
        return {**out, "error": (r.stderr or r.stdout)[-1500:]}
    try:
        tests = json.loads(r.stdout[r.stdout.index("["):])
    except ValueError:
        return {**out, "error": "unparsable llama-bench output: " + r.stdout[-800:]}
    for t in tests:
        if t.get("n_prompt") and not t.get("n_gen"):
            out["prefill_tok_s"], out["prefill_stddev"] = t["avg_ts"], t.get("stddev_ts")
        elif t.get("n_gen"):
            out["decode_tok_s"], out["decode_stddev"] = t["avg_ts"], t.get("stddev_ts")
    return out


KEEP = ("decode_tok_s", "decode_token_ms", "prefill_tok_s", "prefill_warm_tok_s", "prefill_warm_tok_s_all", "prefill_warm_method",
        "prefill_warm_after_profiler_tok_s", "ttft_s", "hit_rate", "belady_hit_rate",
        "hit_rate_vs_belady", "io_bound_tok_s", "io_efficiency", "bytes_read_per_token", "disk_bandwidth_gbps",
        "tiers", "capacity_records", "host_capacity_records", "budget_note", "peak_rss_bytes", "host_compute",
        "n_cpu_moe", "policy", "policy_note", "direct_io", "notes",
        # where a decode token's time goes (bench/launches.py) and the hybrid split's measured costs
        "host_ms_per_token", "launches_per_token", "kernels_per_token", "kernel_us_per_token", "kernel_us_by_name",
        "n_cpu_moe_split", "hbm_gbps", "h2d_gbps", "decode_graph_fallbacks", "decode_graph_cut_layers", "decode_pipelined",
        "decode_fused_tokens", "decode_fused_note",
        # where a CPU row's decode waits: stalls, prefetches, the look-ahead's precision per distance
        "stall_ms_per_token", "prefetch_stats", "predictor_precision")


def bench_cmd(st: Path, args: list[str], p: int, n: int) -> list[str]:
    return flashmoe() + ["bench", str(st), "--json", "--prompt-tokens", str(p), "--tokens", str(n),
                         "--no-compute-bound", "--drop-caches", "--io-threads", "8", *args]


def figures(res: dict) -> dict:
    """A row's flashmoe figures from flashmoe bench's whole JSON: KEEP, and the two mapped below."""
    out = {k: res.get(k) for k in KEEP}
    out["predictor_by_distance"] = (res.get("predictor") or {}).get("by_distance")
    d = res.get("decode_at_depth")
    if d:  # from an empty context, as llama-bench's tg test: like for like (DEPTH0)
        out.update(decode_after_prompt_tok_s=out["decode_tok_s"], decode_tok_s=d["tok_s"], decode_depth=d["depth"],
                   decode_at_depth_token_ms=d["token_ms"])
    # prefill: warm (experts resident where they fit) to compare with llama-bench's warm repetitions
    out["prefill_cold_tok_s"] = res.get("prefill_tok_s")
    out["prefill_tok_s"] = res.get("prefill_warm_tok_s") or res.get("prefill_tok_s")
    return out


def run_flashmoe(st: Path, args: list[str], p: int, n: int, cgroup, raw: Path | None = None) -> dict:
    """flashmoe bench's figures for a row (figures), its whole JSON written to `raw`."""
    cmd = bench_cmd(st, args, p, n)
    t0 = time.time()
    r = sh(cmd, cgroup=cgroup, timeout=900)
    out = {"command": "flashmoe " + " ".join(cmd[3:]), "seconds": round(time.time() - t0, 1)}
    if r.returncode:
        return {**out, "error": (r.stderr or r.stdout)[-1500:]}
    if raw is not None:
        raw.write_text(r.stdout)
    return {**out, **figures(json.loads(r.stdout))}


def set_ratios(row: dict) -> None:
    for k in ("decode_tok_s", "prefill_tok_s"):
        ours, theirs = row.get("flashmoe", {}).get(k), row.get("llama_cpp", {}).get(k)
        row[f"ratio_{k.split('_')[0]}"] = ours / theirs if ours and theirs else None


def merge_raw(raw: Path, out: Path, machine: str, pick: set[int] | None, st: Path) -> None:
    """The picked rows' flashmoe side rebuilt from the bench JSONs of a call made elsewhere
    (RAW/flashmoe-MACHINE-rowN.json, as run_flashmoe writes them), llama.cpp's figures kept."""
    doc = json.loads(out.read_text())
    for f in sorted(raw.glob(f"flashmoe-{machine}-row*.json")):
        i = int(f.stem.rsplit("row", 1)[1])
        if pick is not None and i not in pick:
            continue
        res, (table, name, _, fargs, _, (p, n)) = json.loads(f.read_text()), ROWS[machine][i]
        row = doc["rows"].setdefault(str(i), {"table": table, "row": name})
        row["flashmoe"] = {"command": "flashmoe " + " ".join(bench_cmd(st, fargs, p, n)[3:]), "seconds": None,
                           "measured_in": f"{f} (bench JSON brought back from the call)", **figures(res)}
        set_ratios(row)
        log(f"row {i}: decode {row['flashmoe']['decode_tok_s']} vs {row.get('llama_cpp', {}).get('decode_tok_s')}")
    out.write_text(json.dumps(doc, indent=1) + "\n")


def median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def history(pair: dict, tree: str | None) -> dict:
    """A pair as an entry of the row's `runs` (the figures earlier sessions recorded by hand)."""
    ll, fm = pair.get("llama", {}), pair.get("flashmoe", {})
    return {"date": pair["date"], "tree": tree, "round": pair["round"], "order": pair["order"],
            "load_avg_1m_at_start": (ll if pair["order"][0] == "llama" else fm).get("load_avg_1m_at_start"),
            "llama_cpp_decode_tok_s": ll.get("decode_tok_s"), "flashmoe_decode_tok_s": fm.get("decode_tok_s"),
            "ratio_decode": pair["ratio_decode"], "flashmoe_hit_rate": fm.get("hit_rate"),
            "flashmoe_bytes_read_per_token": fm.get("bytes_read_per_token"),
            "disk_bandwidth_gbps": fm.get("disk_bandwidth_gbps"), "stall_ms_per_token": fm.get("stall_ms_per_token"),
            "prefetch_stats": fm.get("prefetch_stats"), "capacity_records": fm.get("capacity_records"),
            "peak_rss_bytes": fm.get("peak_rss_bytes"),
            "disk_probe_gbps_before": {"llama_cpp": ll.get("disk_probe_gbps_before"),
                                       "flashmoe": fm.get("disk_probe_gbps_before")},
            "disk_read_gbps_over_run": {"llama_cpp": ll.get("disk_read_gbps_over_run"),
                                        "flashmoe": fm.get("disk_read_gbps_over_run")}}


def git_tree() -> str | None:
    """The commit measured ("-dirty": with changes not committed) and its subject."""
    d = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True)
    r = subprocess.run(["git", "-C", str(HERE), "log", "-1", "--format=%s"], capture_output=True, text=True)
    return f"{d.stdout.strip()} {r.stdout.strip()[:70]}" if d.returncode == 0 else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, help="llama.cpp source (prepare_llama_cpp_src.sh); needed to build llama-bench")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rival"))
    ap.add_argument("--machine", choices=["auto", "h200", "cpu"], default="auto")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--stage", choices=["all", "prepare", "rows"], default="all")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) to run; default all")
    ap.add_argument("--engines", default="llama,flashmoe",
                    help="which sides to run (llama, flashmoe or both); a side not run keeps its figures from the "
                         "JSON already there, so llama.cpp can be measured apart from a flashmoe build")
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/rival-MACHINE.json; "
                    "a copy stays in --work for merging the rows of later calls)")
    ap.add_argument("--rounds", type=int, default=None, help="run each row N times as pairs of both engines, the "
                    "order swapped every round, a disk probe before each run; the row keeps every pair and the median")
    ap.add_argument("--quiet-locks", default="", help="comma-separated files to hold exclusive flock(2) locks on "
                    "around each run (a shared machine's measurement gate; do not also run the script under it)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each run (others' turn)")
    ap.add_argument("--from-raw", type=Path, default=None, help="run nothing: rebuild the picked rows' flashmoe "
                    "side in --out from DIR/flashmoe-MACHINE-rowN.json (a call's bench JSONs brought back)")
    a = ap.parse_args(argv)
    if a.rounds is not None and a.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    import torch
    cuda = torch.cuda.is_available()
    machine = a.machine if a.machine != "auto" else ("h200" if cuda else "cpu")
    out = a.out or HERE / "results" / f"rival-{machine}{'' if a.layers == 32 else f'-{a.layers}l'}.json"
    pick = set(int(i) for i in a.rows.split(",")) if a.rows else None
    if a.from_raw:
        return merge_raw(a.from_raw, out, machine, pick, a.work / f"mixtral-q4-{a.layers}l")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor
    engines = set(a.engines.split(","))
    if not engines or engines - {"llama", "flashmoe"}:
        raise SystemExit(f"--engines: llama, flashmoe or both, not {a.engines!r}")
    if "llama" in engines and a.src is None:
        raise SystemExit("--src: llama.cpp's source is needed to build llama-bench (or --engines flashmoe)")
    with ThreadPoolExecutor(2) as pool:  # the build takes the cores, the writers the disk
        built = pool.submit(build, a.src.resolve(), a.work, cuda and machine == "h200") if "llama" in engines else None
        model = gguf(a.src.resolve(), a.work, a.layers) if "llama" in engines else None
        st = store(a.work, a.layers) if "flashmoe" in engines else None
        exe = built.result() if built else None
    log(f"prepared in {time.time() - t0:.0f} s")
    if a.stage == "prepare":
        return
    threads = os.cpu_count() or 1
    keep = a.work / out.name  # rows of earlier calls (--rows) are merged from here
    prior = keep if keep.is_file() else out  # rows of earlier calls, or the other engine's side
    doc = json.loads(prior.read_text()) if prior.is_file() and (a.rows or len(engines) < 2) else {}
    doc.update({"machine": {"kind": machine, "node": platform.node(), "cpus": threads,
                            "gpu": torch.cuda.get_device_name() if cuda else None,
                            "ram_total": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                            "load_avg_1m_at_start": os.getloadavg()[0]},
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": a.layers,
                "llama_cpp": "llama-bench from the llama-cpp-python 0.3.36 sdist's vendored llama.cpp"})
    if model:
        doc.update({"gguf": str(model), "gguf_bytes": model.stat().st_size})
    if st:
        doc["store"] = str(st)
    rows = doc.setdefault("rows", {})
    tree = git_tree() if a.rounds else None
    for i, (table, name, largs, fargs, limit, (p, n)) in enumerate(ROWS[machine]):
        if pick is not None and i not in pick:
            continue
        row = rows.get(str(i), {})
        row.update({"table": table, "row": name, "cgroup": None, "prompt_tokens": p, "decode_tokens": n})
        cg = None
        if limit:
            cg, how = make_cgroup(f"flashmoe-rival-{limit >> 30}g", limit)
            row["cgroup"] = how if cg else f"none: {how}; the row ran without a memory limit"
        # llama.cpp reads its GGUF through mmap: the page cache is dropped only for the cgroup rows
        # (as REFERENCE.md measured); flashmoe bench drops it itself before each run
        gate, dev = Gate([f for f in a.quiet_locks.split(",") if f]), disk_device(a.work)
        probe_files = [model] if model else sorted((st / "experts").iterdir()) if st else []

        def one(side: str, r: int) -> dict:
            """One run of one engine (inside the gate), with the disk's rate before and over it."""
            with gate:
                probe = disk_probe(probe_files) if a.rounds else None
                before, load = diskstats(dev), os.getloadavg()[0]
                if side == "llama":
                    row["page_cache_dropped_before_llama_cpp"] = drop_caches() if limit else False
                    log(f"row {i}: llama.cpp {' '.join(largs)}")
                    res = run_llama(exe, model, largs, p, n, cg, threads, reps=1 if limit else 2)
                else:
                    log(f"row {i}: flashmoe {' '.join(fargs)}")
                    raw = f"flashmoe-{machine}-row{i}" + (f"-round{r}" if a.rounds else "") + ".json"
                    res = run_flashmoe(st, fargs, p, n, cg, raw=a.work / raw)
                if a.rounds:
                    res.update({"disk_probe_gbps_before": probe and round(probe, 3), "load_avg_1m_at_start": load,
                                **disk_over(before, dev)})
            if a.pause:
                time.sleep(a.pause)
            return res

        sides = [side for side, have in (("llama", exe), ("flashmoe", st)) if have]
        if a.rounds:
            row["pairs"] = []  # this call's pairs (earlier calls' stay in `runs`)
        for r in range(a.rounds or 1):
            pair = {"round": r, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            for side in (sides if r % 2 == 0 else sides[::-1]):  # L F, F L, ...: a drift weighs on both
                row["llama_cpp" if side == "llama" else "flashmoe"] = pair[side] = one(side, r)
            if a.rounds:
                pair["order"] = [s for s in pair if s in ("llama", "flashmoe")]
                ours, theirs = pair.get("flashmoe", {}).get("decode_tok_s"), pair.get("llama", {}).get("decode_tok_s")
                pair["ratio_decode"] = ours / theirs if ours and theirs else None
                row["pairs"].append(pair)
                row.setdefault("runs", []).append(history(pair, tree))
                log(f"row {i} round {r}: decode {ours} vs {theirs} tok/s")
                if r + 1 < a.rounds:
                    rows[str(i)] = row
                    for f in {keep, out}:
                        f.write_text(json.dumps(doc, indent=1) + "\n")
        if "llama_cpp" not in row:  # the same llama-bench command measured for another row counts here
            twin = next((j for j, r in enumerate(ROWS[machine]) if j != i and r[2] == largs and r[4] == limit
                         and "llama_cpp" in rows.get(str(j), {})), None)
            if twin is not None:
                row["llama_cpp"] = {**rows[str(twin)]["llama_cpp"], "same_command_as_row": twin}
        set_ratios(row)
        if a.rounds:  # the row's ratio is the median pair's; every pair stays beside it
            ratios = sorted(q["ratio_decode"] for q in row["pairs"] if q.get("ratio_decode"))
            row["ratio_decode_median"] = row["ratio_decode"] = median(ratios)
            row["ratio_decode_min"] = ratios[0] if ratios else None
        rows[str(i)] = row
        log(f"row {i}: decode {row.get('flashmoe', {}).get('decode_tok_s')} vs "
            f"{row.get('llama_cpp', {}).get('decode_tok_s')} tok/s")
        for f in {keep, out}:
            f.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
