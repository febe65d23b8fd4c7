# Sourced by the benchmarks/h200_*.sh call scripts: $OUT (JSON and logs), log (stamped, also to
# $OUT/progress.log), fm (the CLI of the checkout, installed or not) and synth_store (the
# Mixtral-shaped q4 store written in the background; its pid in $SYNTH, `wait $SYNTH` before use).
set -u
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT" /tmp/rival
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" "$@"; }
synth_store() {  # synth_store DIR LOG
  (fm synth --like mixtral-8x7b --quant q4 "$1" > "$2" 2>&1; echo synth-done >> "$2") &
  SYNTH=$!
}
