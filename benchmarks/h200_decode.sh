#!/bin/bash
# GPU decode and prefill with every expert in VRAM (issue 9), on one H200: the CUDA tests, a
# mixtral-8x7b-shaped q4 store synthesised outside the repository copy, `flashmoe bench` with the
# graph-captured decode (default) and with the layer-by-layer path (--decode-graph off), and the
# kernel bench (--quick). Results in $OUT (one JSON per run, logs beside them).
set -u
OUT=${OUT:-/tmp/fm-out}
STORE=${STORE:-/tmp/syn}
TOKENS=${TOKENS:-64}
FLASHMOE=${FLASHMOE:-"python3 -c 'from flashmoe_plugin.cli import main; main()'"}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
if [ "${RUN_TESTS:-1}" = 1 ]; then
  log "tests (in the background)"
  python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_graph_decode.py tests/test_cuda_pager.py \
    tests/test_cuda_kernels.py} > "$OUT/tests.log" 2>&1 &
  tests=$!
fi
[ -d "$STORE" ] || { log synth; eval "$FLASHMOE synth --like mixtral-8x7b --quant q4 $STORE" 2>&1 | tail -1 >> "$OUT/progress.log"; }
[ "${RUN_TESTS:-1}" = 1 ] && { wait $tests; log "tests: $(tail -1 "$OUT/tests.log")"; }
bench() {  # name, then bench options
  local name=$1; shift
  log "bench $name"
  eval "$FLASHMOE bench $STORE --device cuda --json --tokens $TOKENS $*" > "$OUT/$name.json" 2>>"$OUT/progress.log" \
    || log "bench $name failed"
  python3 - "$OUT/$name.json" >> "$OUT/progress.log" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("decode_graph", "decode_tok_s", "compute_bound_tok_s", "kernel_bound_tok_s", "compute_bound_prefill_tok_s",
        "prefill_tok_s", "host_ms_per_token", "launches_per_token", "kernels_per_token", "graph_nodes", "decode_graph_note")
print({k: r.get(k) for k in keys}, r.get("compute_bound_launches"))
PY
}
bench h200-decode-graph ${BENCH_ARGS:-}
[ "${RUN_EAGER:-1}" = 1 ] && bench h200-decode-layers --decode-graph off --no-compute-bound ${BENCH_ARGS:-}
if [ "${RUN_KERNELS:-1}" = 1 ]; then
  log "kernel bench (--quick)"
  eval "$FLASHMOE bench --kernels --device cuda --json --quick" > "$OUT/kernels-quick.json" 2>"$OUT/kernels-quick.log"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(e.get('name'), e.get('shape'), e.get('us_fused'), e.get('us_dequant_cublas'), e.get('max_abs_err')) for e in d['kernels']]" "$OUT/kernels-quick.json" >> "$OUT/progress.log" 2>&1 || log "kernel bench JSON does not parse"
fi
log done
