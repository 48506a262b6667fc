#!/usr/bin/env bash
# The NAT lab: real viewers behind real NAT routers, on this one machine, with network
# namespaces (needs root: CAP_NET_ADMIN, and nftables; miniupnpd for the UPnP router).
#
#   public namespace (11.0.0.0/16 stands for the internet: an ordinary unicast range,
#   so that miniupnpd hands out mappings on it; the namespaces are isolated from the
#   host's network): the control plane (embedded
#   SQLite), one data plane and the source (ffmpeg through a tiny HTTP server), plus
#   the public viewers, each in its own namespace on the same bridge;
#   homes: each viewer behind its own router namespace doing NAT with nftables:
#     upnp  endpoint-independent masquerade, and miniupnpd (UPnP-IGD and NAT-PMP/PCP)
#           on the LAN side;
#     eim   endpoint-independent mapping (plain masquerade: the source port is kept);
#     sym   "symmetric": a random port per connection (masquerade random,fully-random).
#   Every router filters inbound traffic that matches no mapping (conntrack), as home
#   routers do.
#
# Each viewer is a real `starling-play` (relaying, upload 1.25x the stream) that plays
# for NATLAB_SECS seconds. The lab prints, per NAT type: viewers, how many played,
# relayed (admitted a child), got a router mapping, relayed by hole punching, peer
# share, continuity, stalls, parent changes, failed peer dials and the longest wait on a
# peer that could not be reached. With NATLAB_CHECK=1 it fails unless (issue 17's bars):
# everyone played; continuity >= NATLAB_MIN_CONTINUITY (0.999); peer share >=
# NATLAB_MIN_SHARE (0.90); each viewer learnt its public (server-reflexive) address;
# every public and UPnP viewer relayed (the latter mapped); at least
# NATLAB_MIN_EIM_RELAYS (1.0, a fraction) of the endpoint-independent ones relayed by
# hole punching; no symmetric one was given a child or asked to punch; nobody waited
# more than 2 s on a parent it could not reach. CI runs a short lab with lower
# share and continuity bars (scripts/test.sh).
#
# Usage: scripts/natlab.sh [VIEWERS] (default 40: 25 % public, 25 % upnp, 30 % eim,
# 20 % sym). Env: NATLAB_SECS (default 90), NATLAB_CHUNK_MS (default 500: chunk and
# key-frame interval), STARLING_BIN_DIR (default target/debug),
# NATLAB_KEEP=1 keeps the namespaces and a copy of the logs for inspection (remove the
# namespaces with `scripts/natlab.sh --clean`); logs are kept on failure anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${STARLING_BIN_DIR:-$(pwd)/target/debug}
SECS=${NATLAB_SECS:-90}
P=nl # namespace prefix
E2E_NAME=natlab
# The lab is about NAT, not TLS: the control plane serves plaintext here (a WARN line).
export STARLING_INSECURE_PLAINTEXT=1
# The control plane runs on its embedded SQLite: a DATABASE_URL (CI's throwaway Postgres
# listens on the host's loopback) is unreachable from the lab's namespaces.
unset DATABASE_URL
WORK=$(mktemp -d /tmp/starling-natlab.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/e2e-common.sh
source scripts/e2e-common.sh

clean_netns() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${P}-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
if [ "${1:-}" = "--clean" ]; then clean_netns; rm -rf "$WORK"; exit 0; fi
N=${1:-40}

if ! ip netns add "${P}-probe" 2>"$WORK/netns.err"; then
  if [ "${STARLING_REQUIRE_NETNS:-0}" = 1 ]; then
    log "FAIL: cannot create network namespaces (root and CAP_NET_ADMIN needed): $(cat "$WORK/netns.err")"
    exit 1
  fi
  log "SKIPPED: cannot create network namespaces: $(cat "$WORK/netns.err")"
  exit 0
fi
ip netns del "${P}-probe"
for t in nft ffmpeg python3; do
  command -v "$t" >/dev/null || { log "FAIL: $t is not installed"; exit 1; }
done
HAVE_UPNPD=1
command -v miniupnpd >/dev/null || HAVE_UPNPD=0
for b in starling-controlplane starling-dataplane starling-admin starling-play; do
  [ -x "$BIN/$b" ] || { log "missing $BIN/$b (cargo build --workspace --bins)"; exit 1; }
done

clean_netns
trap 'cleanup; [ "${NATLAB_KEEP:-0}" = 1 ] || clean_netns' EXIT

inns() { local ns=$1; shift; ip netns exec "$P-$ns" "$@"; }

# --- the public network ----------------------------------------------------------
PUB_IP=11.0.0.1
ip netns add "$P-pub"
inns pub ip link set lo up
inns pub ip link add br0 type bridge
inns pub ip addr add "$PUB_IP/16" dev br0
inns pub ip link set br0 up
LINK=0
# plug NS IFNAME ADDR/PLEN: a veth from namespace NS (named IFNAME there) to the bridge.
plug() {
  LINK=$((LINK + 1))
  ip link add "nla$LINK" type veth peer name "nlb$LINK"
  ip link set "nla$LINK" netns "$P-$1"
  ip link set "nlb$LINK" netns "$P-pub"
  inns "$1" ip link set "nla$LINK" name "$2"
  inns "$1" ip addr add "$3" dev "$2"
  inns "$1" ip link set "$2" up
  inns pub ip link set "nlb$LINK" master br0 up
}

# --- viewers' namespaces: public ones on the bridge, the others behind a router ---
TYPES=()
for i in $(seq 0 $((N - 1))); do
  # 25 % public, 25 % upnp, 30 % eim, 20 % sym, interleaved so any prefix is a mix.
  case $((i % 20)) in
    0|4|8|12|16) TYPES+=(public) ;;
    1|5|9|13|17) TYPES+=(upnp) ;;
    2|6|10|14|18|3) TYPES+=(eim) ;;
    *) TYPES+=(sym) ;;
  esac
done
for i in $(seq 0 $((N - 1))); do
  t=${TYPES[$i]}
  ip netns add "$P-v$i"
  inns "v$i" ip link set lo up
  if [ "$t" = public ]; then
    plug "v$i" eth0 "11.0.1.$((i + 1))/16"
    continue
  fi
  ip netns add "$P-r$i"
  inns "r$i" ip link set lo up
  plug "r$i" wan "11.0.2.$((i + 1))/16"
  ip link add "nlc$i" type veth peer name "nld$i"
  ip link set "nlc$i" netns "$P-r$i"
  ip link set "nld$i" netns "$P-v$i"
  inns "r$i" ip link set "nlc$i" name lan
  inns "v$i" ip link set "nld$i" name eth0
  inns "r$i" ip addr add "192.168.$((i + 1)).1/24" dev lan
  inns "v$i" ip addr add "192.168.$((i + 1)).2/24" dev eth0
  inns "r$i" ip link set lan up
  inns "v$i" ip link set eth0 up
  inns "v$i" ip route add default via "192.168.$((i + 1)).1"
  inns "r$i" sysctl -qw net.ipv4.ip_forward=1
  case $t in
    sym) masq="masquerade random,fully-random" ;;
    *) masq="masquerade" ;;
  esac
  # Inbound from the WAN only for established flows (and, on the UPnP router, what
  # miniupnpd maps: its chains are jumped to first). A connection from the WAN to the
  # router itself is dropped, not answered with a reset, as home routers do (a reset
  # would also leave a conntrack entry that takes the port a punch needs).
  inns "r$i" nft -f - <<NFT
table inet filter {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state new drop
  }
  chain miniupnpd {}
  chain forward {
    type filter hook forward priority 0; policy drop;
    jump miniupnpd
    ct state established,related accept
    iifname "lan" accept
  }
  chain prerouting_miniupnpd {}
  chain postrouting_miniupnpd {}
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
    oifname "wan" meta nfproto ipv4 $masq
  }
}
NFT
  if [ "$t" = upnp ] && [ "$HAVE_UPNPD" = 1 ]; then
    cat >"$WORK/upnp-$i.conf" <<CONF
ext_ifname=wan
listening_ip=lan
http_port=5000
enable_natpmp=yes
secure_mode=yes
system_uptime=yes
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
allow 1024-65535 192.168.$((i + 1)).0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
    bg "upnpd-$i" ip netns exec "$P-r$i" miniupnpd -d -f "$WORK/upnp-$i.conf" -P "$WORK/upnp-$i.pid"
  fi
done
log "namespaces up: $N viewers ($(printf '%s\n' "${TYPES[@]}" | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')miniupnpd: $HAVE_UPNPD)"

# Sanity: a home reaches the public servers' address, the public side cannot open a
# connection into a home.
inns pub python3 - "$PUB_IP" >"$WORK/echo.log" 2>&1 <<'PY' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9)); s.listen(8); s.settimeout(20)
c, a = s.accept(); c.sendall(a[0].encode()); c.close()
PY
PIDS+=($!)
sleep 0.5
home=-1
for i in $(seq 0 $((N - 1))); do [ "${TYPES[$i]}" != public ] && { home=$i; break; }; done
if [ "$home" -ge 0 ]; then
  seen=$(inns "v$home" python3 -c "
import socket; s=socket.create_connection(('$PUB_IP', 9), 5); print(s.recv(64).decode())")
  [ "$seen" = "11.0.2.$((home + 1))" ] || { fail "NAT: the server saw $seen, not the router's address"; exit 1; }
  log "ok: a home viewer (192.168.$((home + 1)).2) reaches the public side as $seen"
fi

# --- the public servers --------------------------------------------------------------
CP_PORT=7000; WIRE_PORT=7100; HTTP_PORT=7200; SRC_PORT=8000
CONTROL=http://$PUB_IP:$CP_PORT
cat >"$WORK/source.py" <<'PY'
# A live MPEG-TS source: every GET starts a real-time ffmpeg test pattern (400 kbit/s
# H.264, a key frame every argv[3] frames: one per chunk) and streams its output.
import http.server, subprocess, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "video/mp2t"); self.end_headers()
        p = subprocess.Popen(["ffmpeg", "-nostdin", "-v", "error", "-re", "-f", "lavfi", "-i",
            "testsrc=size=320x240:rate=25", "-c:v", "libx264", "-preset", "ultrafast",
            "-tune", "zerolatency", "-g", sys.argv[3], "-b:v", "400k", "-maxrate", "400k",
            "-bufsize", "400k", "-f", "mpegts", "pipe:1"], stdout=subprocess.PIPE)
        try:
            while True:
                b = p.stdout.read(4096)
                if not b: break
                self.wfile.write(b)
        except OSError:
            pass
        finally:
            p.kill(); p.wait()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
PY
CHUNK_MS=${NATLAB_CHUNK_MS:-500} # chunk (and key-frame interval) of the broadcast
bg source ip netns exec "$P-pub" python3 "$WORK/source.py" "$PUB_IP" "$SRC_PORT" "$((25 * CHUNK_MS / 1000))"
bg controlplane ip netns exec "$P-pub" "$BIN/starling-controlplane" --listen "$PUB_IP:$CP_PORT" \
  --data-dir "$WORK/cp-data"
sleep 0.5
for _ in $(seq 1 300); do [ -s "$WORK/cp-data/admin.key" ] && break; sleep 0.1; done
bg dataplane ip netns exec "$P-pub" "$BIN/starling-dataplane" --control-url "$CONTROL" \
  --node-key-file "$WORK/cp-data/admin.key" --allow-source-net 11.0.0.0/16 \
  --wire-listen "$PUB_IP:$WIRE_PORT" --http-listen "$PUB_IP:$HTTP_PORT" --advertise-host "$PUB_IP"
admin() { ip netns exec "$P-pub" "$BIN/starling-admin" --control-url "$CONTROL" \
  --admin-key-file "$WORK/cp-data/admin.key" "$@"; }
for _ in $(seq 1 300); do admin list >/dev/null 2>&1 && break; sleep 0.1; done
ID=$(admin create --name natlab --source "http://$PUB_IP:$SRC_PORT/live.ts" --public \
  --chunk-ms "$CHUNK_MS" --substreams 4 --id-only) || { fail "the control plane did not answer"; exit 1; }
admin start "$ID" >/dev/null
admin wait "$ID" --health up --timeout 60s >/dev/null || { fail "the source never came up"; exit 1; }
log "broadcast $ID is live: control plane $CONTROL, data plane $PUB_IP:$WIRE_PORT"
# Viewers join once the data plane's rate measurement has settled (two readings 2 s
# apart within 10 %): a grid created before counts slots with the default rate and is
# re-rated (every relay's slots recounted) when the measurement arrives.
prev=0; kbps=0
for _ in $(seq 1 20); do
  kbps=$(admin get "$ID" --json 2>/dev/null | python3 -c 'import json,sys; print(int(json.load(sys.stdin).get("stream_kbps") or 0))' 2>/dev/null || echo 0)
  if [ "$kbps" -gt 0 ] && [ "$prev" -gt 0 ] && [ $((kbps * 10)) -ge $((prev * 9)) ] && [ $((kbps * 10)) -le $((prev * 11)) ]; then
    break
  fi
  prev=$kbps; sleep 2
done
log "measured stream rate: ${kbps} kbit/s"

# --- the viewers -------------------------------------------------------------------------
UPLOAD=${NATLAB_UPLOAD_KBPS:-600} # 1.25x the ~480 kbit/s stream (video + TS overhead)
for i in $(seq 0 $((N - 1))); do
  bg "viewer-$i" ip netns exec "$P-v$i" "$BIN/starling-play" --control-url "$CONTROL" \
    --broadcast "$ID" --duration "${SECS}s" --upload-kbps "$UPLOAD" -o /dev/null
  sleep 0.1
done
log "$N viewers started; playing ${SECS}s"
for i in $(seq 0 $((N - 1))); do
  var=PID_viewer_$i
  wait "${!var}" 2>/dev/null || true
done

# --- the table --------------------------------------------------------------------------
for i in $(seq 0 $((N - 1))); do
  # the address the control plane should see: the viewer's own, or its router's
  if [ "${TYPES[$i]}" = public ]; then seen=11.0.1.$((i + 1)); else seen=11.0.2.$((i + 1)); fi
  echo "${TYPES[$i]} $WORK/viewer-$i.log $seen"
done >"$WORK/index"
python3 - "$WORK/index" "${NATLAB_CHECK:-0}" "${NATLAB_MIN_SHARE:-0.90}" \
  "${NATLAB_MIN_CONTINUITY:-0.999}" "${NATLAB_MIN_EIM_RELAYS:-1.0}" <<'PY' >"$WORK/table" || CHECK_FAILED=1
import re, sys
rows = {}
def num(pat, text, default=0):
    m = re.search(pat, text)
    return int(m.group(1)) if m else default
keys = ["n", "ok", "relayed", "mapped", "punched", "asked", "server", "peers", "played",
        "skipped", "stalls", "changes", "dial_fail", "wait_max"]
wrong_seen = []
for line in open(sys.argv[1]):
    t, path, seen = line.split()
    text = open(path, errors="replace").read()
    r = rows.setdefault(t, dict.fromkeys(keys, 0))
    r["n"] += 1
    if "starling-play: received" not in text:
        continue
    r["ok"] += 1
    m = re.search(r"the control plane sees this viewer at ([0-9.]+):", text)
    if not m or m.group(1) != seen:
        wrong_seen.append(f"{path}: seen at {m.group(1) if m else '?'}, not {seen}")
    r["relayed"] += num(r"children admitted (\d+)", text) > 0
    r["mapped"] += "(mapped by the router, UPnP)" in text
    r["server"] += num(r"from server (\d+) bytes", text)
    r["peers"] += num(r"from peers (\d+) bytes", text)
    r["played"] += num(r"played (\d+), skipped", text)
    r["skipped"] += num(r"skipped (\d+)", text)
    r["stalls"] += num(r"stalls (\d+) \(", text)
    r["changes"] += num(r"parent changes (\d+)", text)
    # How it was reached as a relay: through the router's mapping, by hole punching
    # (the control plane asked it to punch towards children), or directly.
    r["punched"] += num(r"punched links (\d+)", text) > 0 and num(r"children admitted (\d+)", text) > 0
    r["asked"] += num(r"punch requests (\d+)", text) > 0
    r["dial_fail"] += num(r"peer dials failed (\d+)", text)
    r["wait_max"] = max(r["wait_max"], num(r"peer dials failed \d+ \(longest (\d+) ms\)", text))
def share(r): return r["peers"] / max(1, r["peers"] + r["server"])
def cont(r): return r["played"] / max(1, r["played"] + r["skipped"])
print(f"{'NAT':8} {'VIEWERS':>7} {'PLAYED':>6} {'RELAYED':>7} {'MAPPED':>6} {'PUNCHED':>7} {'PEER_SHARE':>10} {'CONTINUITY':>10} {'STALLS':>6} {'PARENT_CHANGES':>14} {'LINK_FAILURES':>13} {'LONGEST_WAIT_MS':>15}")
tot = dict.fromkeys(keys, 0)
for t in ["public", "upnp", "eim", "sym", "all"]:
    if t == "all":
        r = tot
    elif t in rows:
        r = rows[t]
        for k in keys:
            tot[k] = max(tot[k], r[k]) if k == "wait_max" else tot[k] + r[k]
    else:
        continue
    print(f"{t:8} {r['n']:>7} {r['ok']:>6} {r['relayed']:>7} {r['mapped']:>6} {r['punched']:>7} {share(r):>10.1%} {cont(r):>10.4f} {r['stalls']:>6} {r['changes']:>14} {r['dial_fail']:>13} {r['wait_max']:>15}")
if sys.argv[2] == "1":
    # The bars (issue 17): everyone plays; every public, UPnP (through its mapping) and
    # endpoint-independent (by hole punching) viewer relays; no viewer behind a
    # symmetric NAT is ever given a child; peer share and continuity; no child waits
    # longer than 2 s on a parent it cannot reach.
    min_share, min_cont, min_eim = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    bad = []
    if tot["ok"] != tot["n"]: bad.append(f"{tot['n'] - tot['ok']} viewers did not play")
    if cont(tot) < min_cont: bad.append(f"continuity {cont(tot):.4f} < {min_cont}")
    if share(tot) < min_share: bad.append(f"peer share {share(tot):.3f} < {min_share}")
    for t in ["public", "upnp"]:
        if t in rows and rows[t]["relayed"] != rows[t]["n"]:
            bad.append(f"{t}: {rows[t]['relayed']} of {rows[t]['n']} relayed")
    if "upnp" in rows and rows["upnp"]["mapped"] != rows["upnp"]["n"]:
        bad.append(f"upnp: {rows['upnp']['mapped']} of {rows['upnp']['n']} got a mapping")
    if "eim" in rows and rows["eim"]["punched"] < min_eim * rows["eim"]["n"]:
        bad.append(f"eim: {rows['eim']['punched']} of {rows['eim']['n']} relayed by hole punching")
    if "sym" in rows and (rows["sym"]["relayed"] > 0 or rows["sym"]["asked"] > 0):
        bad.append(f"sym: {rows['sym']['relayed']} admitted children, {rows['sym']['asked']} were asked to punch")
    if tot["wait_max"] > 2000:
        bad.append(f"a child waited {tot['wait_max']} ms on a parent it could not reach (> 2000)")
    bad += wrong_seen
    for b in bad: print("CHECK FAILED:", b)
    sys.exit(1 if bad else 0)
PY
cat "$WORK/table"
[ "${CHECK_FAILED:-0}" = 1 ] && fail "the lab's checks failed (see above)"
if failed; then exit 1; fi
if [ "${NATLAB_KEEP:-0}" = 1 ]; then
  cp -a "$WORK" "$WORK.kept"
  log "logs kept in $WORK.kept; namespaces kept (remove them with scripts/natlab.sh --clean)"
fi
