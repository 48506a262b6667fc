# Helpers shared by the end-to-end scripts (sourced, not run): logging, failures recorded
# in a file (background subshells fail too), background processes with their logs kept
# on failure, ports, and ffmpeg decode checks.
#
# The sourcing script sets first: E2E_NAME (the log prefix), WORK (its temporary folder),
# DECODE_SECS (default media seconds for decode_check), and optionally E2E_EXTRA_LOGS
# (more log files to print on failure). It gets PIDS, FAILED and an EXIT trap.
PIDS=()
FAILED=0

log() { printf '[%s %s] %s\n' "$E2E_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
# fail is also called from background subshells: failures are recorded in a file.
fail() { log "FAIL: $*"; echo "$*" >>"$WORK/FAILURES"; FAILED=1; }
failed() { [ "$FAILED" = 1 ] || [ -s "$WORK/FAILURES" ]; }
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  if failed; then
    log "logs kept in $WORK"
    # shellcheck disable=SC2086 # E2E_EXTRA_LOGS is a list of globs
    for f in "$WORK"/*.log ${E2E_EXTRA_LOGS:-}; do
      [ -f "$f" ] || continue
      echo "----- $f (last 40 lines)" >&2
      tail -n 40 "$f" >&2
    done
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() { # host port seconds
  for _ in $(seq 1 $(($3 * 10))); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
bg() { # name cmd... : start in background, log to $WORK/name.log; its pid in PID_<name>
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  local var=${name//[^a-zA-Z0-9]/_}
  eval "PID_$var=$!"
}
# decode_check NAME URL [SECS]: decodes URL (SECS, default DECODE_SECS, plus 2 s of
# margin); asserts no error line and that at least the full SECS seconds were decoded.
decode_check() {
  local name=$1 url=$2 want=${3:-$DECODE_SECS}
  local err="$WORK/decode-$name.err" prog="$WORK/decode-$name.progress"
  timeout $((want + 40)) ffmpeg -nostdin -hide_banner -v error -i "$url" \
    -t $((want + 2)) -f null - -progress "$prog" 2>"$err" || true
  local us
  us=$(grep '^out_time_us=' "$prog" 2>/dev/null | tail -1 | cut -d= -f2)
  [[ "$us" =~ ^[0-9]+$ ]] || us=0
  local secs
  secs=$(printf '%d.%03d' $((us / 1000000)) $((us % 1000000 / 1000)))
  if [ -s "$err" ]; then
    fail "$name: ffmpeg printed $(wc -l <"$err") error lines, first: $(head -3 "$err")"
  elif [ "$us" -lt $((want * 1000000)) ]; then
    fail "$name: decoded only ${secs}s of media (wanted >= ${want}s)"
  else
    log "ok: $name decoded ${secs}s (>= ${want}s) with zero errors"
  fi
}
