#!/bin/bash
# Issue 9, o13: the decode GEMV's L2 prefetch knob (fm_gemv.cu, gemv_tune("l2"), FLASHMOE_GEMV_L2;
# default off) inside the lead's H200 call, on a 32-layer Mixtral-shaped q4 store made earlier in
# the same call: the GEMV tests, the knob's own, then the file with it on (bits 7: every GEMV
# launch, mirror rows too; <= 30 s in all), then benchmarks/gemv_l2_ab.py in two processes (<= 40 s
# each), each alternating the knob's values 0 (main), 1 (o-style GEMVs), 5 (also the mirror block's
# rows), 7 (also the q/k/v GEMV with its norm) on one engine, `--dense-quant q4`: a JSON line each
# into $OUT/o13-ab.jsonl
# (a process cut by its timeout leaves its runs' lines in $OUT/o13-ab-N.log).
#   OUT=$OUT bash benchmarks/h200_o13_ab.sh [STORE]      (STORE default /tmp/rival/mixtral-q4-32l)
# DEVICE=cpu runs the same steps on the CPU twin (the script's logic only: no capture, no GEMV).
source benchmarks/h200_common.sh
export PYTHONUNBUFFERED=1
STORE=${1:-/tmp/rival/mixtral-q4-32l}
DEVICE=${DEVICE:-cuda}
log "o13 start, load $(cut -d' ' -f1-3 /proc/loadavg), store $STORE"
if [ ! -f "$STORE/manifest.json" ]; then log "o13: no store at $STORE"; exit 1; fi
# the knob's own bit-identity tests first (<= 12 s), then the rest of the file with the knob on (<= 18 s)
timeout 12 python3 -m pytest -q tests/test_cuda_gemv.py -k "l2_prefetch or cuda_graph" -p no:cacheprovider \
  > "$OUT/o13-tests-l2.log" 2>&1
log "o13 gemv l2 tests: rc=$? $(tail -1 "$OUT/o13-tests-l2.log")"
FLASHMOE_GEMV_L2=7 timeout 18 python3 -m pytest -q tests/test_cuda_gemv.py -k "not l2_prefetch" -p no:cacheprovider \
  --durations=5 > "$OUT/o13-tests.log" 2>&1
log "o13 gemv tests with l2 7: rc=$? $(tail -1 "$OUT/o13-tests.log")"
for i in 1 2; do
  timeout 40 python3 benchmarks/gemv_l2_ab.py "$STORE" --dense-quant q4 --tokens 32 --rounds 2 --l2 0,1,5,7 \
    --device "$DEVICE" --label "o13-process-$i" >> "$OUT/o13-ab.jsonl" 2> "$OUT/o13-ab-$i.log"
  log "o13 ab process $i: rc=$?"
done
python3 - "$OUT/o13-ab.jsonl" <<'PY' | tee -a "$OUT/progress.log"
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d["label"], {k: (round(v.get("graph_ms", v["wall_ms"]), 4), v["logits_equal"]) for k, v in d.items()
                       if k.startswith("l2-")})
PY
