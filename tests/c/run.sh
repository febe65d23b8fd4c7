#!/bin/sh
# Builds and runs the C test of the expert reader under AddressSanitizer (+UBSan), then
# ThreadSanitizer. Usage: tests/c/run.sh   (needs gcc or clang; no Python involved)
set -eu
cd "$(dirname "$0")/../.."
CC=${CC:-cc}
OUT=${TMPDIR:-/tmp}/fm_io_test.$$
SRC="tests/c/test_fm_io.c csrc/cpu/fm_io.c csrc/cpu/crc32c.c"
trap 'rm -f "$OUT.asan" "$OUT.tsan"' EXIT

$CC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -pthread -Icsrc/cpu $SRC -o "$OUT.asan"
echo "== AddressSanitizer + UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 "$OUT.asan"

$CC -O1 -g -fsanitize=thread -Wall -Wextra -pthread -Icsrc/cpu $SRC -o "$OUT.tsan"
echo "== ThreadSanitizer"
TSAN_OPTIONS=halt_on_error=1 "$OUT.tsan"
