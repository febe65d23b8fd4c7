#!/bin/bash
# Issue 10's hybrid checks on the H200 in one call: CUDA build, the GPU tests of the hybrid path
# (beside the store's synth), then the rows (benchmarks/h200_hybrid_rows.py: `flashmoe bench` in one
# process) on a `synth --like mixtral-8x7b --quant q4 --layers LAYERS` store (512-token prompt, 32
# decoded). Nothing else uses the cores while a row is timed.
# usage (from the repository root on the GPU machine):
#   bash benchmarks/h200_hybrid.sh OUTDIR LAYERS "ROWS" ["MORE ROWS", a second process]
#   bash benchmarks/h200_hybrid.sh $OUT 12 "9 9,slice" "12"    # ~3 min; a row: n_cpu_moe[,cpu|,slice|,wantN|,whole]
#   bash benchmarks/h200_hybrid.sh $OUT 32 "24 32" ""           # the rows on the full store
set -u
OUT=${1:-/tmp/out}; LAYERS=${2:-32}; FIRST=${3:-"24 32"}; LATER=${4:-}
mkdir -p "$OUT"; t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" "$@"; }
rows() { python3 benchmarks/h200_hybrid_rows.py $STORE "$OUT/h200-hybrid-${LAYERS}l-$1.json" $2 2>> "$OUT/rows.err" \
  | grep -v "^$"; el rows $2; }
STORE=${STORE:-/tmp/m$LAYERS}  # override to keep apart from other stores
FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
el built  # synth needs the built reader: it runs beside the tests (they time nothing)
[ -f $STORE/manifest.json ] || (fm synth --like mixtral-8x7b --quant q4 --layers "$LAYERS" $STORE > "$OUT/synth.log" 2>&1; el synth) &
timeout 100 python3 -m pytest -q tests/test_hybrid_cpu_gpu.py -k on_the_gpu \
  > "$OUT/pytest.log" 2>&1; tail -4 "$OUT/pytest.log"
el tests; wait
[ -n "$FIRST" ] && rows a "$FIRST"
[ -n "$LATER" ] && rows b "$LATER"
tail -3 "$OUT/rows.err" 2>/dev/null
