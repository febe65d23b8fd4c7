#!/bin/bash
# Fused decode kernels (issue 9, runtime/fused_decode.py + csrc/cuda/fm_decode.cu) on one H200:
# an 8-layer Mixtral-shaped q4 store, `flashmoe bench` on that store with the dense part at q8: decode_ops' compiled step
# (FLASHMOE_DECODE_FUSED=0, the "before") and the fused step, each with kernels per token and
# the per-kernel device time (and the fused step without programmatic dependent launch); the
# kernels alone (fused_decode_kernels.py); last the CUDA tests they touch. JSON and logs in $OUT.
set -u
OUT=${OUT:-/tmp/fm-out}
STORE=${STORE:-/tmp/m8}
LAYERS=${LAYERS:-8}
TOKENS=${TOKENS:-64}
FLASHMOE=${FLASHMOE:-"python3 -c 'from flashmoe_plugin.cli import main; main()'"}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
[ -d "$STORE" ] || { log synth; eval "$FLASHMOE synth --like mixtral-8x7b --quant q4 --layers $LAYERS $STORE" 2>&1 | tail -1 >> "$OUT/progress.log"; }
bench() {  # name, env, then bench options
  local name=$1 env=$2; shift 2
  log "bench $name ($env)"
  eval "env $env $FLASHMOE bench $STORE --device cuda --json --tokens $TOKENS --no-compute-bound $*" > "$OUT/$name.json" \
    2>>"$OUT/progress.log" || log "bench $name failed"
  python3 - "$OUT/$name.json" >> "$OUT/progress.log" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("decode_tok_s", "prefill_tok_s", "host_ms_per_token", "kernels_per_token", "graph_nodes", "decode_fused",
        "decode_fused_note", "decode_graph_note")
print({k: r.get(k) for k in keys})
for n, c, us in r.get("kernel_us_by_name") or []:
    print(f"  {us:9.1f} us {c:6.1f}x  {n}")
PY
}
for b in ${BENCHES:-"before FLASHMOE_DECODE_FUSED=0" "fused FLASHMOE_DECODE_FUSED=1" "fused-nopdl FLASHMOE_DECODE_PDL=0"}; do
  set -- $b
  bench "$1" "$2" ${BENCH_ARGS:---dense-quant q8}
done
if [ "${RUN_KERNELS:-1}" = 1 ]; then
  log "kernel bench"
  python3 benchmarks/fused_decode_kernels.py > "$OUT/kernels.json" 2>>"$OUT/progress.log" || log "kernel bench failed"
  python3 -c "import json,sys; [print(p, {k: round(v, 2) for k, v in d.items()}) for p, d in json.load(open(sys.argv[1]))['us'].items()]" \
    "$OUT/kernels.json" >> "$OUT/progress.log" 2>&1
fi
if [ "${RUN_TESTS:-1}" = 1 ]; then  # last: a timeout then costs only test coverage
  log "tests"
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_fused_decode.py \
    tests/test_cuda_graph_decode.py} > "$OUT/tests.log" 2>&1
  log "tests: $(tail -1 "$OUT/tests.log")"
fi
log done
