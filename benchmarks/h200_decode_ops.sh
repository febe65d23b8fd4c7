#!/bin/bash
# Issue 9, the small kernels of a decode step (runtime/decode_ops.py) on one H200: an 8-layer
# Mixtral-shaped q4 store, `flashmoe bench --dense-quant q8` with another checkout's decode_ops
# functions (BEFORE_OPS, e.g. main's runtime/decode_ops.py, through decode_ops_variant.py) and
# with this tree's, back to back; then the CUDA graph-decode tests.
# Uses the compiled modules in flashmoe_plugin/ if they import (built elsewhere for this python),
# else builds them. JSON and logs in $OUT.
set -u
OUT=${OUT:-/tmp/fm-out}
STORE=${STORE:-/tmp/m8}
TOKENS=${TOKENS:-64}
BEFORE_OPS=${BEFORE_OPS:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
cat /proc/loadavg >> "$OUT/progress.log"
if python3 -c "import flashmoe_plugin._kernels_cuda" 2>>"$OUT/progress.log"; then
  # not installed: the architectures registered as entry points (deepseek_v3, gpt_oss, grok)
  # need a dist-info on the path
  python3 - <<'PY'
import pathlib, tomllib
eps = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["entry-points"]
d = pathlib.Path("flashmoe_plugin-0+local.dist-info")
d.mkdir(exist_ok=True)
(d / "METADATA").write_text("Metadata-Version: 2.1\nName: flashmoe-plugin\nVersion: 0+local\n")
(d / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in e.items()) for g, e in eps.items()))
PY
else
  log "build"
  rm -f flashmoe_plugin/*.so
  FLASHMOE_CUDA_ARCH=${FLASHMOE_CUDA_ARCH:-"-gencode arch=compute_90,code=sm_90"} \
    python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || log "build failed"
fi
if [ ! -d "$STORE" ]; then
  log synth
  python3 -c 'from flashmoe_plugin.cli import main; main()' synth --like mixtral-8x7b --quant q4 --layers 8 "$STORE" \
    > "$OUT/synth.log" 2>&1
  log "synth: $(tail -1 "$OUT/synth.log")"
fi
bench() {  # name, then the command's prefix
  local name=$1; shift
  log "bench $name"
  timeout ${BENCH_TIMEOUT:-60} "$@" bench "$STORE" --device cuda --json --tokens "$TOKENS" --dense-quant q8 \
    --no-compute-bound > "$OUT/$name.json" 2>>"$OUT/progress.log" || log "bench $name failed"
  python3 - "$OUT/$name.json" >> "$OUT/progress.log" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ("decode_tok_s", "host_ms_per_token", "kernels_per_token", "graph_nodes", "decode_graph_note")})
for n, c, us in r.get("kernel_us_by_name") or []:
    print(f"  {us:9.1f} us {c:6.1f}x  {n}")
PY
}
[ -n "$BEFORE_OPS" ] && bench before python3 benchmarks/decode_ops_variant.py "$BEFORE_OPS"
bench after python3 -c 'from flashmoe_plugin.cli import main; main()'
cat /proc/loadavg >> "$OUT/progress.log"
if [ "${RUN_TESTS:-1}" = 1 ]; then  # last: a timeout then costs only test coverage
  log tests
  timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_graph_decode.py \
    tests/test_decode_ops.py} > "$OUT/tests.log" 2>&1
  log "tests: $(tail -1 "$OUT/tests.log")"
fi
log done
