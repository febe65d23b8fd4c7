#!/bin/bash
# The GPU pager's acceptance runs on one H200 (issue 4): a mixtral-8x7b-shaped q4 store (32
# layers, ~26 GB) synthesised on the machine's disk, then `flashmoe bench` with an 8 GiB VRAM
# budget and 0 / 16 GiB of pinned RAM, prefetch off and on, two policies, and one run with
# every expert in VRAM. Results: one JSON per run in $RES, merged into $MERGED after each run.
# Needs root for drop_caches. Keep RES and STORE outside the repository copy (the device tool
# resyncs the tree between calls).
set -u
RES=${RES:-/root/fm/res}
STORE=${STORE:-/root/fm/mixtral-8x7b-q4}
MERGED=${MERGED:-$RES/../h200_pager.json}
TOKENS_DISK=${TOKENS_DISK:-6}
TOKENS=${TOKENS:-16}
FLASHMOE=${FLASHMOE:-"python3 -c 'from flashmoe_plugin.cli import main; main()'"}
mkdir -p "$RES"
log() { echo "[$(date +%T)] $*" | tee -a "$RES/progress.log"; }
tests=
if [ "${RUN_TESTS:-1}" = 1 ]; then
  log "tests (in the background)"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_pager.py tests/test_pager.py > "$RES/tests.log" 2>&1 &
  tests=$!
fi
[ -d "$STORE" ] || { log synth; eval "$FLASHMOE synth --like mixtral-8x7b --quant q4 $STORE" 2>&1 | tail -1 | tee -a "$RES/progress.log"; }
[ -n "$tests" ] && { wait $tests; log "tests: $(tail -1 "$RES/tests.log")"; }
log disk_modes
python3 benchmarks/disk_modes.py "$STORE" --threads 4 8 > "$RES/disk_modes.json" 2>>"$RES/progress.log"
bench() {  # name, then bench options
  local name=$1; shift
  log "bench $name"
  eval "$FLASHMOE bench $STORE --device cuda --json --direct-io on --drop-caches --io-threads 8 $*" \
    > "$RES/$name.json" 2>>"$RES/progress.log" || log "bench $name failed"
  python3 -c "import glob, json, os, sys; json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json')) if os.path.getsize(f)}, open(sys.argv[2], 'w'), indent=1)" "$RES" "$MERGED" 2>>"$RES/progress.log"
}
for policy in lru fwlru; do
  for pf in off on; do
    bench "v8g-r0-$policy-pf$pf" --vram-budget 8G --ram-budget 0 --policy $policy --prefetch $pf --tokens $TOKENS_DISK --no-compute-bound
    bench "v8g-r16g-$policy-pf$pf" --vram-budget 8G --ram-budget 16G --policy $policy --prefetch $pf --tokens $TOKENS --no-compute-bound
  done
done
bench "vall" --vram-budget 27G --ram-budget 0 --prefetch off --tokens 32
log done
