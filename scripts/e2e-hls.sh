#!/usr/bin/env bash
# HLS ingest end-to-end test with real components, no mocks:
#   ffmpeg's HLS muxer writes a live playlist (1 s segments, a window of 6, old segments
#   deleted) into a directory served over HTTP by python3 -m http.server;
#   starling-controlplane (embedded SQLite) and starling-dataplane run as real processes;
#   a broadcast whose source is the playlist URL is created and started through the admin
#   CLI; three SDK viewers (starling-play, relaying to each other) and one plain-HTTP
#   viewer (the data plane's /live/ID) each decode >= 20 s with zero ffmpeg errors
#   (`-v error` prints nothing), and the viewers' -o files decode the same way. Two cases,
#   one after the other: MPEG-TS segments (the source is a master playlist naming the
#   live playlist as its best variant) and fMP4 segments (-hls_segment_type fmp4,
#   EXT-X-MAP init segment, the media playlist itself). Then bad sources: a playlist URL that does not exist and a
#   playlist that is not one are reported down.
#
# Needs: ffmpeg, python3, curl, and the binaries in $STARLING_BIN_DIR (default
# target/debug). Run through scripts/test.sh, or directly after `cargo build`.
# The helpers below repeat a few of scripts/e2e-media.sh's on purpose (that script is
# left untouched).
set -euo pipefail
# Plaintext gRPC between the processes on loopback (the explicit, insecure opt-in of
# every binary; TLS is covered by `cargo test -p starling-controlplane --test tls`
# and the load test's demo).
export STARLING_INSECURE_PLAINTEXT=1
cd "$(dirname "$0")/.."
BIN=${STARLING_BIN_DIR:-$(pwd)/target/debug}
DECODE_SECS=${E2E_DECODE_SECS:-20}
WORK=$(mktemp -d /tmp/starling-e2e-hls.XXXXXX)
chmod 755 "$WORK"
E2E_NAME=e2e-hls
# shellcheck source=scripts/e2e-common.sh
source scripts/e2e-common.sh  # (the working directory is the repository root)

for b in starling-controlplane starling-dataplane starling-admin starling-play; do
  [ -x "$BIN/$b" ] || { log "missing $BIN/$b (cargo build --workspace --bins)"; exit 1; }
done

WWW_PORT=$(free_port); CP_PORT=$(free_port); WIRE_PORT=$(free_port); HTTP_PORT=$(free_port)
CONTROL=http://127.0.0.1:$CP_PORT
mkdir -p "$WORK/www/ts" "$WORK/www/fmp4"
printf 'this is not a playlist\n' >"$WORK/www/garbage.m3u8"
# The TS case goes through a master playlist: the highest-bandwidth variant is followed.
cat >"$WORK/www/master.m3u8" <<'M3U8'
#EXTM3U
#EXT-X-STREAM-INF:BANDWIDTH=150000,RESOLUTION=160x120
low/does-not-exist.m3u8
#EXT-X-STREAM-INF:BANDWIDTH=600000,RESOLUTION=320x240,CODECS="avc1.42c00d,mp4a.40.2"
ts/live.m3u8
M3U8

# --- the origin: a plain HTTP server over the directory ffmpeg writes into -----------
bg www python3 -m http.server "$WWW_PORT" --bind 127.0.0.1 --directory "$WORK/www"
wait_port 127.0.0.1 "$WWW_PORT" 15 || { fail "http.server did not start"; exit 1; }

# --- control plane (embedded SQLite) and data plane --------------------------------
bg controlplane "$BIN/starling-controlplane" --listen "127.0.0.1:$CP_PORT" --data-dir "$WORK/cp-data"
wait_port 127.0.0.1 "$CP_PORT" 30 || { fail "control plane did not start"; exit 1; }
bg dataplane "$BIN/starling-dataplane" --control-url "$CONTROL" --node-key-file "$WORK/cp-data/admin.key" \
  --allow-source-net 127.0.0.0/8 \
  --wire-listen "127.0.0.1:$WIRE_PORT" --http-listen "127.0.0.1:$HTTP_PORT" --advertise-host 127.0.0.1
wait_port 127.0.0.1 "$HTTP_PORT" 30 || { fail "data plane did not start"; exit 1; }
log "origin :$WWW_PORT, control plane :$CP_PORT, data plane wire :$WIRE_PORT http :$HTTP_PORT"
admin() { "$BIN/starling-admin" --control-url "$CONTROL" --admin-key-file "$WORK/cp-data/admin.key" "$@"; }

# hls_case NAME PLAYLIST FORMAT(mpegts|mov) FFMPEG_HLS_ARGS...
hls_case() {
  local name=$1 playlist=$2 want_format=$3; shift 3
  local dir="$WORK/www/$name"
  bg "ffmpeg-$name" ffmpeg -nostdin -hide_banner -loglevel error -re \
    -f lavfi -i "testsrc=size=320x240:rate=25" -f lavfi -i "sine=frequency=440:sample_rate=44100" \
    -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -pix_fmt yuv420p -b:v 400k \
    -c:a aac -b:a 64k -f hls -hls_time 1 -hls_list_size 6 -hls_flags delete_segments "$@" \
    "$dir/live.m3u8"
  local enc_pid=$!
  for _ in $(seq 1 100); do [ -s "$dir/live.m3u8" ] && break; sleep 0.1; done
  local id
  id=$(admin create --name "e2e-hls-$name" --source "http://127.0.0.1:$WWW_PORT/$playlist" --public --id-only)
  admin start "$id" >/dev/null
  if ! admin wait "$id" --health up --timeout 40s >/dev/null; then
    fail "$name: HLS source never came up"
    return
  fi
  log "$name: broadcast $id is live ($(grep -c EXTINF "$dir/live.m3u8") segments in the playlist)"
  local url="http://127.0.0.1:$HTTP_PORT/live/$id"
  local got
  got=$(timeout 20 ffprobe -v error -show_entries format=format_name -of csv=p=0 "$url" 2>&1 | head -1)
  if [[ "$got" != *"$want_format"* ]]; then
    fail "$name: the data plane's stream is not $want_format: ffprobe says: $got"
  fi
  local decoders=() vpids=() i p
  for i in 1 2 3; do
    p=$(free_port)
    bg "$name-viewer$i" "$BIN/starling-play" --control-url "$CONTROL" --broadcast "$id" \
      --http-listen "127.0.0.1:$p" -o "$WORK/$name-viewer$i.out" --duration $((DECODE_SECS + 45))s \
      --upload-kbps 4000 --peer-listen 127.0.0.1:0
    vpids+=($!)
    wait_port 127.0.0.1 "$p" 20 || fail "$name viewer$i: local endpoint did not open"
    decode_check "$name-viewer$i" "http://127.0.0.1:$p/live/$id" &
    decoders+=($!)
    if [ "$i" -lt 3 ]; then sleep 3; fi
  done
  decode_check "$name-plain-http" "$url" &
  decoders+=($!)
  for d in "${decoders[@]}"; do wait "$d" || true; done
  for p in "${vpids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${vpids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  for i in 1 2 3; do
    local f="$WORK/$name-viewer$i.out" line
    line=$(grep -o 'from server [0-9]* bytes, from peers [0-9]* bytes' "$WORK/$name-viewer$i.log" | tail -1 || true)
    [ -n "$line" ] && log "$name viewer$i: $line"
    if [ -s "$f" ]; then
      local errs
      errs=$(ffmpeg -nostdin -v error -i "$f" -f null - 2>&1 | wc -l)
      [ "$errs" = 0 ] && log "ok: $name viewer$i's -o file ($(stat -c %s "$f") bytes) decodes with zero errors" \
        || fail "$name viewer$i's -o file has $errs decode error lines"
    else
      fail "$name viewer$i wrote no output file"
    fi
  done
  admin stop "$id" >/dev/null || true
  kill "$enc_pid" 2>/dev/null || true
}

hls_case ts master.m3u8 mpegts
hls_case fmp4 fmp4/live.m3u8 mov -hls_segment_type fmp4 -hls_fmp4_init_filename init.mp4
grep -E 'HLS segments lost|HLS segment skipped' "$WORK/dataplane.log" | head -5 >&2 || true

# --- bad sources --------------------------------------------------------------------
for bad in missing.m3u8 garbage.m3u8; do
  bid=$(admin create --name "e2e-hls-bad" --source "http://127.0.0.1:$WWW_PORT/$bad" --id-only)
  admin start "$bid" >/dev/null
  if admin wait "$bid" --health down --timeout 20s >/dev/null; then
    log "ok: $bad reported down"
  else
    fail "$bad was never reported down"
  fi
  admin stop "$bid" >/dev/null || true
done
if grep -q 'invalid HLS playlist' "$WORK/dataplane.log"; then
  log "ok: the data plane logged: $(grep -o 'invalid HLS playlist[^"]*' "$WORK/dataplane.log" | head -1)"
else
  fail "no 'invalid HLS playlist' log line for garbage.m3u8"
fi

if failed; then
  log "HLS end-to-end FAILED:"
  cat "$WORK/FAILURES" >&2
  exit 1
fi
log "HLS end-to-end passed (TS and fMP4: 3 SDK viewers + 1 plain-HTTP viewer each, zero decode errors)"
