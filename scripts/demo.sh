#!/usr/bin/env bash
# README command 1: the whole system on this one machine, on the embedded default.
#
#   scripts/demo.sh [SECONDS]      (default: run until Ctrl-C)
#
# Builds the workspace (release), then starts:
#   - a built-in test source: an ffmpeg test pattern (H.264 + AAC in MPEG-TS) served over
#     HTTP at real time (ffmpeg is installed with apt-get if missing);
#   - starling-controlplane on embedded SQLite (a fresh database in the run folder),
#     with its dashboard on (the URL to open is printed);
#   - starling-dataplane, registered with it;
#   - a broadcast created and started through the gRPC admin API;
#   - three SDK viewers (starling-play), joining a few seconds apart;
# and shows a live progress line until Ctrl-C. Environment: DEMO_VIEWERS (default 3),
# DEMO_PROFILE (release|debug, default release), STARLING_* ports (see below).
set -euo pipefail
# Plaintext gRPC between the processes on loopback (the explicit, insecure opt-in of
# every binary; TLS is covered by `cargo test -p starling-controlplane --test tls`
# and the load test's demo).
export STARLING_INSECURE_PLAINTEXT=1
cd "$(dirname "$0")/.."
DURATION=${1:-0}
VIEWERS=${DEMO_VIEWERS:-3}
PROFILE=${DEMO_PROFILE:-release}
CP_ADDR=${STARLING_DEMO_CONTROL:-127.0.0.1:7000}
WIRE_ADDR=${STARLING_DEMO_WIRE:-127.0.0.1:7100}
HTTP_ADDR=${STARLING_DEMO_HTTP:-127.0.0.1:7180}
SRC_PORT=${STARLING_DEMO_SOURCE_PORT:-7190}
DASH_ADDR=${STARLING_DEMO_DASHBOARD:-127.0.0.1:7092}
DATA=${STARLING_DEMO_DATA_DIR:-}
RUN=$(mktemp -d /tmp/starling-demo.XXXXXX)
# A fresh SQLite database per run (previous demos' broadcasts would compete for the
# single-client test source); set STARLING_DEMO_DATA_DIR to keep one.
DATA=${DATA:-$RUN/data}
PIDS=()

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }
cleanup() {
  trap - EXIT INT TERM
  printf '\n' >&2
  say "stopping (logs in $RUN)"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

if ! command -v ffmpeg >/dev/null; then
  say "installing ffmpeg (the built-in test source)"
  SUDO=(); [ "$(id -u)" = 0 ] || SUDO=(sudo)
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q ffmpeg >/dev/null \
    || { "${SUDO[@]}" apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q ffmpeg >/dev/null; }
fi

say "building ($PROFILE)"
if [ "$PROFILE" = release ]; then cargo build --release --bins -q; else cargo build --bins -q; fi
B=target/$PROFILE

wait_port() { # addr seconds
  local host=${1%:*} port=${1##*:}
  for _ in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  say "nothing listens on $1 after $2 s; see $RUN"; exit 1
}

# The test source: ffmpeg serves one HTTP client at a time; restart it when the client
# goes away so the data plane's reconnects find it again.
(
  while true; do
    ffmpeg -nostdin -hide_banner -loglevel error -re \
      -f lavfi -i "testsrc2=size=640x360:rate=25" -f lavfi -i "sine=frequency=440" \
      -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -pix_fmt yuv420p -b:v 800k \
      -c:a aac -b:a 96k -f mpegts -listen 1 "http://127.0.0.1:$SRC_PORT/live.ts" || sleep 0.5
  done
) >"$RUN/source.log" 2>&1 &
PIDS+=($!)

mkdir -p "$DATA"
"$B/starling-controlplane" --listen "$CP_ADDR" --data-dir "$DATA" --metrics-listen "${STARLING_DEMO_METRICS:-127.0.0.1:7091}" \
  --dashboard-listen "$DASH_ADDR" >"$RUN/controlplane.log" 2>&1 &
PIDS+=($!)
wait_port "$CP_ADDR" 30
"$B/starling-dataplane" --control-url "http://$CP_ADDR" --node-key-file "$DATA/admin.key" --wire-listen "$WIRE_ADDR" \
  --allow-source-net 127.0.0.0/8 \
  --http-listen "$HTTP_ADDR" --advertise-host 127.0.0.1 >"$RUN/dataplane.log" 2>&1 &
DP_PID=$!
PIDS+=($DP_PID)
wait_port "$HTTP_ADDR" 30

# Zero-setup admin auth: the control plane wrote a random admin key into its data dir.
admin() { "$B/starling-admin" --control-url "http://$CP_ADDR" --admin-key-file "$DATA/admin.key" "$@"; }
ID=$(admin create --name "demo $(date +%H:%M)" --source "http://127.0.0.1:$SRC_PORT/live.ts" --public --id-only)
admin start "$ID" >/dev/null
say "broadcast $ID started; waiting for the source"
admin wait "$ID" --health up --timeout 60s >/dev/null

for i in $(seq 1 "$VIEWERS"); do
  "$B/starling-play" --control-url "http://$CP_ADDR" --broadcast "$ID" \
    -o "$RUN/viewer$i.ts" >"$RUN/viewer$i.log" 2>&1 &
  PIDS+=($!)
  sleep 1
done
sleep 1
say "SDK viewers' local URLs (open one in a player, e.g. ffplay URL):"
grep -ho 'http://127.0.0.1:[0-9]*/live/[^ ]*' "$RUN"/viewer*.log | sed 's/^/    /' >&2 || true
say "plain HTTP from the data plane: ffplay http://$HTTP_ADDR/live/$ID"
say "admin: $B/starling-admin --insecure-plaintext --control-url http://$CP_ADDR get $ID"
say "dashboard: http://$DASH_ADDR/#key=$(cat "$DATA/admin.key")"

START=$(date +%s)
while true; do
  now=$(date +%s); t=$((now - START))
  info=$(admin get "$ID" 2>/dev/null | tr '\n' ' ' || true)
  health=$(sed -n 's/.*source_health: *\([A-Za-z_]*\).*/\1/p' <<<"$info")
  seq=$(sed -n 's/.*last_seq: *\([0-9]*\).*/\1/p' <<<"$info")
  viewers=$(sed -n 's/.*viewers_now: *\([0-9]*\).*/\1/p' <<<"$info")
  share=$(sed -n 's/.*peer_share: *\([0-9.]*\) %.*/\1/p' <<<"$info")
  booster=$(sed -n 's/.*booster [0-9]* slots (\([0-9]*\) kbps.*/\1/p' <<<"$info")
  bytes=""
  for i in $(seq 1 "$VIEWERS"); do
    sz=$(stat -c %s "$RUN/viewer$i.ts" 2>/dev/null || echo 0)
    bytes+="$((sz / 1024))K "
  done
  rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$DP_PID/status" 2>/dev/null || echo "?")
  printf '\r\033[K[%4ss] source=%s chunk=%s viewers=%s peer_share=%s%% booster=%skbps received=[%s] dataplane_rss=%sMiB' \
    "$t" "${health:-?}" "${seq:-?}" "${viewers:-?}" "${share:-?}" "${booster:-?}" "${bytes% }" "$rss" >&2
  if [ "$DURATION" != 0 ] && [ "$t" -ge "$DURATION" ]; then break; fi
  sleep 1
done
