#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes bytes from the network or a
# source: libFuzzer through cargo-fuzz (targets in fuzz/fuzz_targets/, seeds in
# fuzz/corpus/<target>/).
#
#   scripts/fuzz.sh [SECS] [TARGET...]   run each target SECS seconds (default 60), all
#                                        targets unless named; prints executions per
#                                        target; exits 1 on a crash (the reproducer is
#                                        kept under fuzz/artifacts/<target>/)
#   scripts/fuzz.sh --make-seeds         regenerate the seed corpora (signed seeds from
#                                        fuzz/examples/make_seeds.rs, media from ffmpeg)
#   scripts/fuzz.sh --list               the targets
#
# Built on the stable toolchain with `--sanitizer none`: the code under test is safe
# Rust, so AddressSanitizer would find nothing a panic does not, and stable is the one
# toolchain every machine here has. Debug assertions and overflow checks are on.
# Inputs the fuzzer finds interesting go to fuzz/target/corpus/<target> (not committed);
# FUZZ_JOBS=N runs N targets at once (default 1); FUZZ_RUNS=N stops each target after N
# executions instead (SECS is then only an upper bound).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v cargo-fuzz >/dev/null || {
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
}

targets() { (cd fuzz && cargo fuzz list); }

make_seeds() {
  (cd fuzz && cargo run --quiet --example make_seeds)
  local t c=fuzz/corpus
  t=$(mktemp -d)
  ffmpeg -v error -f lavfi -i "testsrc=size=64x48:rate=10" -t 1 -c:v libx264 -preset ultrafast \
    -g 5 -pix_fmt yuv420p -b:v 50k -f mpegts "$t/ts"
  ffmpeg -v error -f lavfi -i "sine=frequency=440:sample_rate=22050" -t 1 -c:a libmp3lame -b:a 32k -f mp3 "$t/mp3"
  ffmpeg -v error -f lavfi -i "sine=frequency=440:sample_rate=22050" -t 1 -c:a aac -b:a 32k -f adts "$t/aac"
  ffmpeg -v error -f lavfi -i "sine=frequency=440:sample_rate=48000" -t 1 -c:a libopus -b:a 24k -f ogg "$t/ogg"
  ffmpeg -v error -f lavfi -i "testsrc=size=64x48:rate=10" -t 1 -c:v libvpx -b:v 50k -deadline realtime -f webm "$t/webm"
  mkdir -p "$c/ts_chunker" "$c/framed_chunker"
  # ts_chunker: one knobs byte, then the stream.
  { printf '\x25'; cat "$t/ts"; } >"$c/ts_chunker/h264-aac"
  # framed_chunker: content-type index, reconnect point, knobs, then the stream.
  local i=0
  for f in mp3 aac ogg webm; do
    { printf "\\x0$i\\x80\\x13"; cat "$t/$f"; } >"$c/framed_chunker/$f"
    i=$((i + 1))
  done
  { printf '\x05\x40\x13'; cat "$t/mp3"; } >"$c/framed_chunker/sniffed-mp3"
  rm -rf "$t"
  log "seeds written under $c"
}

case "${1:-}" in
  --make-seeds) make_seeds; exit 0 ;;
  --list) targets; exit 0 ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
esac

SECS=${1:-60}
[[ "$SECS" =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECS] [TARGET...] | --make-seeds | --list" >&2; exit 2; }
shift || true
mapfile -t ALL < <(targets)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")

log "building the fuzz targets (cargo fuzz build -s none)"
(cd fuzz && cargo fuzz build -s none 2>&1) | { grep -v '^ *Compiling' >&2 || true; }

RESULTS=$(mktemp)
run_one() {
  local t=$1 work="fuzz/target/corpus/$t" logf="fuzz/target/fuzz-$1.log"
  mkdir -p "$work" "fuzz/artifacts/$t"
  local rc=0
  (cd fuzz && cargo fuzz run -s none "$t" "../$work" "corpus/$t" -- \
    -max_total_time="$SECS" -print_final_stats=1 -max_len=65536 -timeout=10 \
    -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" ${FUZZ_RUNS:+-runs=$FUZZ_RUNS} \
    >"../$logf" 2>&1) || rc=$?
  local execs
  execs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$logf" | grep -o '[0-9]*$' | tail -1)
  local cov
  cov=$(grep -ao 'cov: [0-9]*' "$logf" | tail -1 | grep -o '[0-9]*')
  printf '%s %s %s %s\n' "$t" "${execs:-0}" "${cov:-0}" "$rc" >>"$RESULTS"
  if [ "$rc" != 0 ]; then
    log "CRASH in $t (exit $rc): see $logf and fuzz/artifacts/$t/"
    grep -a -A20 -m1 'panicked\|ERROR: libFuzzer' "$logf" >&2 || tail -30 "$logf" >&2
  else
    log "$t: ${execs:-0} executions, coverage ${cov:-0}"
  fi
}

JOBS=${FUZZ_JOBS:-1}
for t in "${TARGETS[@]}"; do
  run_one "$t" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
done
wait

printf '\n%-18s %14s %9s %s\n' target executions coverage result
FAILED=0
while read -r t n c rc; do
  r=ok; [ "$rc" = 0 ] || { r="CRASH (exit $rc)"; FAILED=1; }
  printf '%-18s %14s %9s %s\n' "$t" "$n" "$c" "$r"
done < <(sort "$RESULTS")
rm -f "$RESULTS"
exit "$FAILED"
