#!/usr/bin/env bash
# Media end-to-end test with real components, no mocks:
#   ffmpeg encodes an H.264/AAC MPEG-TS test pattern and pushes it to icecast2 (the
#   broadcaster's media server); starling-controlplane (embedded SQLite) and
#   starling-dataplane run as real processes; a broadcast is created and started through
#   the gRPC admin API (starling-admin); three viewers join through the SDK
#   (starling-play) at different times and relay to each other (the peer grid: later
#   viewers get their substreams from earlier ones); ffmpeg decodes each viewer's local HTTP stream
#   for >= 20 s and must print nothing at -v error; the data plane's plain HTTP endpoint
#   must decode the same way. Meanwhile: non-TS sources end to end (an Ogg/Opus and an
#   MP3 test tone pushed to icecast2, each its own broadcast, decoded from the plain HTTP
#   endpoint for >= 10 s with zero errors), and a generic gRPC client without our .proto
#   files (Python grpcio + server reflection: lists the services, calls Health/Check and
#   AdminService/ListBroadcasts). Then the bad-input cases: unknown and stopped
#   broadcasts, an unreachable source that comes back, garbage and oversized frames on
#   the wire port.
#
# Needs: ffmpeg (with libopus and libmp3lame), icecast2, python3 (with venv or pip),
# curl, network access to PyPI on first run (grpcio and grpcio-reflection are installed
# into a venv cached under target/e2e-grpc-py, or $E2E_GRPC_PY_DIR), and the binaries in
# $STARLING_BIN_DIR (default target/debug). Run through scripts/test.sh, or directly
# after `cargo build`.
set -euo pipefail
# Plaintext gRPC between the processes on loopback (the explicit, insecure opt-in of
# every binary; TLS is covered by `cargo test -p starling-controlplane --test tls`
# and the load test's demo).
export STARLING_INSECURE_PLAINTEXT=1
cd "$(dirname "$0")/.."
BIN=${STARLING_BIN_DIR:-$(pwd)/target/debug}
DECODE_SECS=${E2E_DECODE_SECS:-20}
# Seconds of media decoded from the Ogg and MP3 broadcasts.
FORMAT_DECODE_SECS=${E2E_FORMAT_DECODE_SECS:-10}
GRPC_PY_DIR=${E2E_GRPC_PY_DIR:-$(pwd)/target/e2e-grpc-py}
WORK=$(mktemp -d /tmp/starling-e2e.XXXXXX)
chmod 755 "$WORK"
DECODERS=()
E2E_NAME=e2e
E2E_EXTRA_LOGS="$WORK/ice/log/error.log"
# shellcheck source=scripts/e2e-common.sh
source scripts/e2e-common.sh  # (the working directory is the repository root)

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

for b in starling-controlplane starling-dataplane starling-admin starling-play; do
  [ -x "$BIN/$b" ] || { log "missing $BIN/$b (cargo build --workspace --bins)"; exit 1; }
done

ICE_PORT=$(free_port); CP_PORT=$(free_port); WIRE_PORT=$(free_port); HTTP_PORT=$(free_port)
MET_PORT=$(free_port)
CONTROL=http://127.0.0.1:$CP_PORT

# --- icecast2, the broadcaster's media server -------------------------------------
mkdir -p "$WORK/ice/log"
ICE_USER=$(id -un)
if [ "$(id -u)" = 0 ]; then
  # icecast2 refuses to run as root unless it drops privileges.
  ICE_USER=nobody
  chown -R nobody "$WORK/ice/log"
fi
ICE_GROUP=$(id -gn "$ICE_USER")
cat >"$WORK/ice/icecast.xml" <<XML
<icecast>
  <limits><clients>100</clients><sources>8</sources><burst-size>65536</burst-size></limits>
  <authentication>
    <source-password>e2e-source</source-password>
    <admin-user>admin</admin-user><admin-password>e2e-admin</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>$ICE_PORT</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <paths>
    <basedir>/usr/share/icecast2</basedir>
    <logdir>$WORK/ice/log</logdir>
    <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>3</loglevel></logging>
  <security><chroot>0</chroot>$([ "$(id -u)" = 0 ] && echo "<changeowner><user>$ICE_USER</user><group>$ICE_GROUP</group></changeowner>")</security>
</icecast>
XML
bg icecast icecast2 -c "$WORK/ice/icecast.xml"
wait_port 127.0.0.1 "$ICE_PORT" 15 || { fail "icecast2 did not start"; exit 1; }
log "icecast2 on :$ICE_PORT"

# push_source MOUNT: ffmpeg test pattern (H.264 1 s GOP + AAC) into icecast at real time.
push_source() {
  bg "ffmpeg-$1" ffmpeg -nostdin -hide_banner -loglevel error -re \
    -f lavfi -i "testsrc=size=320x240:rate=25" -f lavfi -i "sine=frequency=440:sample_rate=44100" \
    -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -pix_fmt yuv420p -b:v 400k \
    -c:a aac -b:a 64k -f mpegts -content_type video/mp2t \
    "icecast://source:e2e-source@127.0.0.1:$ICE_PORT/$1"
}
push_source live.ts
push_source_live() { push_source live.ts; }
# push_audio MOUNT CONTENT_TYPE RATE ARGS...: a sine test tone, encoded with ARGS.
push_audio() {
  local mount=$1 ctype=$2 rate=$3; shift 3
  bg "ffmpeg-$mount" ffmpeg -nostdin -hide_banner -loglevel error -re \
    -f lavfi -i "sine=frequency=660:sample_rate=$rate" "$@" -content_type "$ctype" \
    "icecast://source:e2e-source@127.0.0.1:$ICE_PORT/$mount"
}
push_ogg() { push_audio tone.ogg audio/ogg 48000 -c:a libopus -b:a 64k -f ogg; }
push_mp3() { push_audio tone.mp3 audio/mpeg 44100 -c:a libmp3lame -b:a 128k -f mp3; }
push_ogg
push_mp3

# mount_flows MOUNT: within 15 s, icecast2 serves at least 8 KiB of MOUNT on one
# connection (a mount not up yet answers 404 at once: retried).
mount_flows() {
  local n deadline=$((SECONDS + 15))
  while [ "$SECONDS" -lt "$deadline" ]; do
    n=$(curl -s -f --max-time 8 "http://127.0.0.1:$ICE_PORT/$1" 2>/dev/null | head -c 8192 | wc -c)
    [ "$n" -ge 8192 ] && return 0
    sleep 0.5
  done
  return 1
}
# icecast2 itself once held a mount's listeners for 30 s with its source connected (seen
# once in CI, on /tone.mp3): make sure every mount flows before our servers see it, and
# re-push a mount that does not, once. What is under test starts after this.
for mount in live.ts:push_source_live tone.ogg:push_ogg tone.mp3:push_mp3; do
  m=${mount%%:*} push=${mount#*:}
  ok=0
  mount_flows "$m" && ok=1
  if [ "$ok" = 0 ]; then
    var=PID_ffmpeg_${m//[^a-zA-Z0-9]/_}
    log "icecast2 mount /$m does not flow: restarting its ffmpeg pusher"
    kill "${!var}" 2>/dev/null || true
    sleep 1
    "$push"
    mount_flows "$m" && ok=1
  fi
  [ "$ok" = 1 ] || { fail "icecast2 mount /$m never delivered data (an icecast2/ffmpeg problem, not ours)"; exit 1; }
done
log "icecast2 mounts flow: /live.ts /tone.ogg /tone.mp3"

# --- control plane (embedded SQLite) and data plane --------------------------------
bg controlplane "$BIN/starling-controlplane" --listen "127.0.0.1:$CP_PORT" --data-dir "$WORK/cp-data" \
  --metrics-listen "127.0.0.1:$MET_PORT"
wait_port 127.0.0.1 "$CP_PORT" 30 || { fail "control plane did not start"; exit 1; }
bg dataplane "$BIN/starling-dataplane" --control-url "$CONTROL" --node-key-file "$WORK/cp-data/admin.key" \
  --allow-source-net 127.0.0.0/8 \
  --wire-listen "127.0.0.1:$WIRE_PORT" --http-listen "127.0.0.1:$HTTP_PORT" --advertise-host 127.0.0.1
wait_port 127.0.0.1 "$HTTP_PORT" 30 || { fail "data plane did not start"; exit 1; }
log "control plane :$CP_PORT, data plane wire :$WIRE_PORT http :$HTTP_PORT"

# Zero-setup admin auth: the control plane wrote a random admin key into its data dir.
admin() { "$BIN/starling-admin" --control-url "$CONTROL" --admin-key-file "$WORK/cp-data/admin.key" "$@"; }
if "$BIN/starling-admin" --control-url "$CONTROL" --admin-key "not-the-admin-key-at-all" list >/dev/null 2>"$WORK/noauth.err"; then
  fail "an admin call with a wrong admin key succeeded"
elif grep -qi "unauthenticated" "$WORK/noauth.err"; then
  log "ok: admin call with a wrong key -> $(head -1 "$WORK/noauth.err")"
else
  fail "admin call with a wrong key: unexpected error: $(cat "$WORK/noauth.err")"
fi

ID=$(admin create --name e2e-live --source "http://127.0.0.1:$ICE_PORT/live.ts" --public --id-only)
log "created broadcast $ID"
admin start "$ID" >/dev/null
# The non-TS broadcasts: an Ogg/Opus and an MP3 tone, started now, checked in the
# background while the viewers play.
OGG_ID=$(admin create --name e2e-ogg --source "http://127.0.0.1:$ICE_PORT/tone.ogg" --public --id-only)
MP3_ID=$(admin create --name e2e-mp3 --source "http://127.0.0.1:$ICE_PORT/tone.mp3" --public --id-only)
admin start "$OGG_ID" >/dev/null
admin start "$MP3_ID" >/dev/null
admin wait "$ID" --health up --timeout 30s >/dev/null || { fail "source never came up"; exit 1; }
log "broadcast $ID is live (also started: Ogg $OGG_ID, MP3 $MP3_ID)"

# format_check NAME ID CODEC: the broadcast comes up, its plain HTTP stream is CODEC
# and decodes for FORMAT_DECODE_SECS with zero errors.
format_check() {
  local name=$1 id=$2 codec=$3 url="http://127.0.0.1:$HTTP_PORT/live/$2"
  if ! admin wait "$id" --health up --timeout 30s >/dev/null; then
    fail "$name: source never came up"
    return
  fi
  local got
  got=$(timeout 20 ffprobe -v error -show_entries stream=codec_name -of csv=p=0 "$url" 2>&1 | head -3 | tr '\n' ' ')
  if [ "${got%% *}" != "$codec" ]; then
    fail "$name: the data plane's stream is not $codec: ffprobe says: $got"
    return
  fi
  decode_check "$name" "$url" "$FORMAT_DECODE_SECS"
}
format_check ogg-opus "$OGG_ID" opus &
DECODERS+=($!)
format_check mp3 "$MP3_ID" mp3 &
DECODERS+=($!)

# A generic gRPC client that has none of our .proto files: Python grpcio with server
# reflection. grpcio and grpcio-reflection come from PyPI into a venv cached under
# target/ (pip --target when the venv module is missing).
grpc_python() { # prints a python command that imports grpc and grpc_reflection
  local venv="$GRPC_PY_DIR/venv" site="$GRPC_PY_DIR/site" wrap="$GRPC_PY_DIR/python"
  if [ -x "$wrap" ] && "$wrap" -c 'import grpc, grpc_reflection' 2>/dev/null; then
    echo "$wrap"; return 0
  fi
  rm -rf "$GRPC_PY_DIR"; mkdir -p "$GRPC_PY_DIR"
  local pkgs=(grpcio grpcio-reflection) pip=(-m pip install -q --disable-pip-version-check)
  if python3 -m venv "$venv" >&2 && "$venv/bin/python" "${pip[@]}" "${pkgs[@]}" >&2; then
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$venv/bin/python" >"$wrap"
  elif python3 "${pip[@]}" --target "$site" "${pkgs[@]}" >&2; then
    printf '#!/bin/sh\nPYTHONPATH="%s" exec python3 "$@"\n' "$site" >"$wrap"
  else
    return 1
  fi
  chmod +x "$wrap"
  "$wrap" -c 'import grpc, grpc_reflection' && echo "$wrap"
}
grpc_reflection_check() {
  local py
  if ! py=$(grpc_python 2>"$WORK/grpc-py-install.log"); then
    fail "gRPC reflection: cannot install grpcio + grpcio-reflection from PyPI (needs network \
and python3-venv or pip): $(tail -3 "$WORK/grpc-py-install.log" | tr '\n' ' ')"
    return
  fi
  if "$py" - "127.0.0.1:$CP_PORT" "$WORK/cp-data/admin.key" "$ID" >"$WORK/grpc-reflection.log" 2>&1 <<'PY'
import sys
import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

target, key_file, want_id = sys.argv[1:4]
with open(key_file) as f:
    admin_key = f.read().strip()
channel = grpc.insecure_channel(target)
# Everything below comes from the server's reflection service: no .proto, no stubs.
db = ProtoReflectionDescriptorDatabase(channel)
services = set(db.get_services())
print("services:", ", ".join(sorted(services)))
missing = {
    "starling.v1.AdminService",
    "starling.v1.ViewerService",
    "starling.v1.EdgeService",
    "grpc.health.v1.Health",
} - services
if missing:
    sys.exit(f"reflection does not list {sorted(missing)}")
pool = descriptor_pool.DescriptorPool(db)


def call(service, method, fields, metadata=()):
    m = pool.FindServiceByName(service).FindMethodByName(method)
    req_cls = message_factory.GetMessageClass(m.input_type)
    resp_cls = message_factory.GetMessageClass(m.output_type)
    rpc = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    return rpc(req_cls(**fields), metadata=metadata, timeout=10)


health = call("grpc.health.v1.Health", "Check", {"service": ""})
status = health.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[health.status].name
print("grpc.health.v1.Health/Check:", status)
if status != "SERVING":
    sys.exit(f"health status {status}, wanted SERVING")
try:
    call("starling.v1.AdminService", "ListBroadcasts", {})
    sys.exit("ListBroadcasts without a bearer token succeeded")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.UNAUTHENTICATED:
        sys.exit(f"ListBroadcasts without a bearer token: {e.code()}, wanted UNAUTHENTICATED")
resp = call(
    "starling.v1.AdminService",
    "ListBroadcasts",
    {},
    metadata=(("authorization", f"Bearer {admin_key}"),),
)
listed = MessageToDict(resp, preserving_proto_field_name=True).get("broadcasts", [])
mine = [b for b in listed if b.get("id") == want_id]
if not mine:
    sys.exit(f"broadcast {want_id} not in ListBroadcasts: {[b.get('id') for b in listed]}")
print("starling.v1.AdminService/ListBroadcasts:", {k: mine[0].get(k) for k in ("id", "name", "state")})
PY
  then
    log "ok: Python grpcio via reflection only: $(tr '\n' ';' <"$WORK/grpc-reflection.log")"
  else
    fail "gRPC reflection client: $(tail -5 "$WORK/grpc-reflection.log" | tr '\n' ' ')"
  fi
}
grpc_reflection_check &
DECODERS+=($!)

# --- three SDK viewers joining at different times, each decoded by ffmpeg ---------------
VPORTS=()
for i in 1 2 3; do
  p=$(free_port); VPORTS+=("$p")
  bg "viewer$i" "$BIN/starling-play" --control-url "$CONTROL" --broadcast "$ID" \
    --http-listen "127.0.0.1:$p" -o "$WORK/viewer$i.ts" --duration $((DECODE_SECS + 45))s \
    --upload-kbps 4000 --peer-listen 127.0.0.1:0
  wait_port 127.0.0.1 "$p" 20 || fail "viewer$i local endpoint did not open"
  decode_check "viewer$i" "http://127.0.0.1:$p/live/$ID" &
  DECODERS+=($!)
  if [ "$i" -lt 3 ]; then sleep 4; fi
done
# The plain HTTP endpoint, and bad input on the wire port, while the viewers play.
decode_check "plain-http" "http://127.0.0.1:$HTTP_PORT/live/$ID" &
DECODERS+=($!)

sleep 2
python3 - "$WIRE_PORT" <<'PY' || fail "garbage / oversized frame connections were not closed"
import os, socket, struct, sys
port = int(sys.argv[1])
def closed_after(payload):
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        s.sendall(payload)
        while True:
            d = s.recv(65536)
            if not d:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        s.close()
ok = closed_after(os.urandom(4096))
# A CHUNK header declaring 4 GiB, then some bytes.
ok = closed_after(struct.pack(">BBHI", 5, 0, 0, 0xFFFFFFFF) + b"x" * 100) and ok
# A valid HELLO followed by a SUBSCRIBE declaring a 1 MiB control payload.
hello = b"STRL" + struct.pack(">HHBH", 2, 2, 1, 0)  # wire protocol version 2
ok = closed_after(struct.pack(">BBHI", 1, 0, 0, len(hello)) + hello + struct.pack(">BBHI", 3, 0, 0, 1 << 20)) and ok
print("garbage closed:", ok)
sys.exit(0 if ok else 1)
PY
log "garbage and oversized frames: connections closed"

DP_RSS=$(rss_kib "$PID_dataplane")
log "data plane RSS with 3 SDK viewers + 1 HTTP viewer (+ decoders): ${DP_RSS} KiB"
for d in "${DECODERS[@]}"; do wait "$d" || true; done
GRID=$(admin get "$ID" --json 2>/dev/null | tr -d '\n ' || true)
log "grid figures: $(grep -oE '"(peers|booster_slots|peer_share|max_depth)":[^,}]*' <<<"$GRID" | tr '\n' ' ')"

# Stop the viewers (Ctrl-C) and read their exit statistics: who got bytes from peers.
for i in 1 2 3; do
  v="PID_viewer$i"
  kill -INT "${!v}" 2>/dev/null || true
done
MOSTLY_PEERS=0
for i in 1 2 3; do
  v="PID_viewer$i"
  for _ in $(seq 1 50); do kill -0 "${!v}" 2>/dev/null || break; sleep 0.1; done
  line=$(grep -o 'from server [0-9]* bytes, from peers [0-9]* bytes, uploaded [0-9]* bytes, played [0-9]*, skipped [0-9]*' "$WORK/viewer$i.log" | tail -1)
  if [ -z "$line" ]; then fail "viewer$i printed no exit statistics"; continue; fi
  read -r srv peers up played skipped < <(sed -E 's/from server ([0-9]*) bytes, from peers ([0-9]*) bytes, uploaded ([0-9]*) bytes, played ([0-9]*), skipped ([0-9]*)/\1 \2 \3 \4 \5/' <<<"$line")
  log "viewer$i: from data plane ${srv} B, from peers ${peers} B, uploaded ${up} B, chunks played ${played}, skipped ${skipped}"
  if [ "$peers" -gt "$srv" ]; then MOSTLY_PEERS=$((MOSTLY_PEERS + 1)); fi
done
if [ "$MOSTLY_PEERS" -ge 1 ]; then
  log "ok: $MOSTLY_PEERS viewer(s) got most of their bytes from other viewers"
else
  fail "no viewer got most of its bytes from peers"
fi
for i in 1 2 3; do
  if [ -s "$WORK/viewer$i.ts" ]; then
    errs=$(ffmpeg -nostdin -v error -i "$WORK/viewer$i.ts" -f null - 2>&1 | wc -l)
    [ "$errs" = 0 ] && log "ok: viewer$i's -o file decodes with zero errors" \
      || fail "viewer$i's -o file has $errs decode error lines"
  else
    fail "viewer$i wrote no output file"
  fi
done

# --- bad input --------------------------------------------------------------------
# Unknown broadcast: clear gRPC status from Join.
if "$BIN/starling-play" --control-url "$CONTROL" --broadcast no-such-broadcast --duration 5s -o /dev/null 2>"$WORK/unknown.err"; then
  fail "joining an unknown broadcast succeeded"
elif grep -qi "not.found" "$WORK/unknown.err"; then
  log "ok: unknown broadcast -> $(grep -i 'not.found' "$WORK/unknown.err" | head -1)"
else
  fail "unknown broadcast: unexpected error: $(cat "$WORK/unknown.err")"
fi

# Unreachable source: the mount does not exist yet -> DOWN; it appears -> UP.
LATE=$(admin create --name e2e-late --source "http://127.0.0.1:$ICE_PORT/late.ts" --id-only)
admin start "$LATE" >/dev/null
if admin wait "$LATE" --health down --timeout 20s >/dev/null; then
  log "ok: unreachable source reported down"
else
  fail "unreachable source never reported down"
fi
push_source late.ts
if admin wait "$LATE" --health up --timeout 30s >/dev/null; then
  log "ok: source recovered and reported up"
else
  fail "source did not recover"
fi

# The late broadcast is not public: a viewer without a credential cannot join it.
if "$BIN/starling-play" --control-url "$CONTROL" --broadcast "$LATE" --duration 5s -o /dev/null 2>"$WORK/nocred.err"; then
  fail "joining a non-public broadcast without a credential succeeded"
elif grep -qi "unauthenticated" "$WORK/nocred.err"; then
  log "ok: no credential -> $(grep -i 'unauthenticated' "$WORK/nocred.err" | head -1)"
else
  fail "no credential: unexpected error: $(cat "$WORK/nocred.err")"
fi

# Both servers' Prometheus metrics pass promtool.
for m in "control-plane http://127.0.0.1:$MET_PORT/metrics" "data-plane http://127.0.0.1:$HTTP_PORT/metrics"; do
  name=${m%% *}; url=${m#* }
  if ! curl -fsS "$url" >"$WORK/$name.metrics"; then
    fail "$name: cannot fetch $url"
  elif out=$(promtool check metrics <"$WORK/$name.metrics" 2>&1) && [ -z "$out" ]; then
    log "ok: $name /metrics passes promtool ($(grep -vc '^#' "$WORK/$name.metrics") samples)"
  else
    fail "$name /metrics: promtool: $out"
  fi
done

# Stopped broadcast: viewers are told, new joins get a clear status.
admin stop "$ID" >/dev/null
if "$BIN/starling-play" --control-url "$CONTROL" --broadcast "$ID" --duration 5s -o /dev/null 2>"$WORK/stopped.err"; then
  fail "joining a stopped broadcast succeeded"
elif grep -qiE "stopped|failed.?precondition" "$WORK/stopped.err"; then
  log "ok: stopped broadcast -> $(grep -iE 'stopped|precondition' "$WORK/stopped.err" | head -1)"
else
  fail "stopped broadcast: unexpected error: $(cat "$WORK/stopped.err")"
fi

if failed; then
  log "media end-to-end FAILED:"
  cat "$WORK/FAILURES" >&2
  exit 1
fi
log "media end-to-end passed (data plane RSS ${DP_RSS} KiB with 4 viewers)"
