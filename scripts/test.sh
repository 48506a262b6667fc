#!/usr/bin/env bash
# Runs every Starling test on a fresh Debian machine, installing what it needs:
#   - Debian packages: ffmpeg (makes and decodes test streams), gcc (builds the C example
#     player), icecast2 (the broadcaster's media server in the end-to-end tests), prometheus
#     (promtool), chromium-headless-shell (the dashboard test), bsdutils (`script`, a pty),
#     postgresql (only when no server binaries are present);
#   - a throwaway PostgreSQL cluster when DATABASE_URL is unset (stopped on exit).
# Then: rustfmt check, clippy -D warnings, every unit/integration test (against both
# SQLite and Postgres), every fuzz target briefly (scripts/fuzz.sh), and the media
# end-to-end test (scripts/e2e-media.sh).
#
# Environment: DATABASE_URL (use this Postgres instead of a throwaway one),
# STARLING_FUZZ_SECS (seconds per fuzz target, default 5),
# STARLING_SKIP_E2E=1 (skip the media end-to-end test), CI=true (set by CI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

need_pkgs=()
command -v ffmpeg >/dev/null || need_pkgs+=(ffmpeg)
command -v icecast2 >/dev/null || need_pkgs+=(icecast2)
command -v promtool >/dev/null || need_pkgs+=(prometheus)
command -v curl >/dev/null || need_pkgs+=(curl)
# the C example player is built with the system C compiler (client-sdk/ffi/tests/c_player.rs)
command -v cc >/dev/null || need_pkgs+=(gcc libc6-dev)
command -v script >/dev/null || need_pkgs+=(bsdutils)  # a pty for `starling-admin top` (controlplane/tests/cli.rs)
command -v python3 >/dev/null || need_pkgs+=(python3)
# the NAT lab (scripts/natlab.sh): routers in network namespaces, NAT by nftables,
# UPnP-IGD by miniupnpd
command -v nft >/dev/null || need_pkgs+=(nftables)
command -v miniupnpd >/dev/null || need_pkgs+=(miniupnpd-nftables)
# the dashboard test (loadtest/tests/dashboard.rs) opens the page in headless Chromium
command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null \
  || need_pkgs+=(chromium-headless-shell)
# the e2e's generic gRPC client (grpcio + reflection from PyPI) needs venv or pip
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "${DATABASE_URL:-}" ] || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get install -y -q "${need_pkgs[@]}" \
    || { "${SUDO[@]}" apt-get update -q && "${SUDO[@]}" apt-get install -y -q "${need_pkgs[@]}"; }
fi

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

if [ -z "${DATABASE_URL:-}" ]; then
  log "starting a throwaway PostgreSQL"
  eval "$(scripts/pg-throwaway.sh start)"
  trap 'scripts/pg-throwaway.sh stop' EXIT
fi
export DATABASE_URL
export STARLING_REQUIRE_POSTGRES=1
export STARLING_REQUIRE_MEDIA=1

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "library crates build without their cli feature (no clap, anyhow, OpenTelemetry)"
cargo build --locked -p starling-controlplane --no-default-features --lib
cargo build --locked -p starling-dataplane --no-default-features --lib
cargo build --locked -p starling-loadtest --no-default-features --lib

log "cargo build (binaries for the end-to-end tests)"
cargo build --workspace --bins --locked

log "cargo test"
cargo test --workspace --locked --no-fail-fast

# --- issue 16: 2,000 simulated peers for 30 s, alone on the machine (the test is
# #[ignore]d so that `cargo test`, which runs suites side by side, leaves it out) ------
log "2,000 simulated peers for 30 s against the real control plane and data plane (loadtest/tests/sim_bars.rs)"
cargo test --locked -p starling-loadtest --test sim_bars -- --ignored

log "fuzz targets, 5 s each (scripts/fuzz.sh; longer runs: scripts/fuzz.sh SECS)"
scripts/fuzz.sh "${STARLING_FUZZ_SECS:-5}"

if [ "${STARLING_SKIP_E2E:-0}" != 1 ]; then
  log "media end-to-end (icecast2 + ffmpeg + control plane + data plane + SDK viewers)"
  STARLING_BIN_DIR="$ROOT/target/debug" scripts/e2e-media.sh
fi

# --- HLS ingest end-to-end (issue 19 item 2; STARLING_SKIP_E2E=1 skips it too) ---
if [ "${STARLING_SKIP_E2E:-0}" != 1 ]; then
  log "HLS end-to-end (ffmpeg HLS muxer, TS and fMP4 + http.server + control plane + data plane + SDK viewers)"
  STARLING_BIN_DIR="$ROOT/target/debug" scripts/e2e-hls.sh
fi

# --- the NAT lab, short (issue 17; STARLING_SKIP_E2E=1 skips it too) ---------------
if [ "${STARLING_SKIP_E2E:-0}" != 1 ]; then
  log "NAT lab (12 viewers in network namespaces: public, UPnP router, NAT, symmetric NAT)"
  STARLING_BIN_DIR="$ROOT/target/debug" NATLAB_SECS=20 NATLAB_CHECK=1 NATLAB_MIN_SHARE=0.5 \
    NATLAB_MIN_CONTINUITY=0.99 NATLAB_MIN_EIM_RELAYS=0.5 scripts/natlab.sh 12
fi

log "all tests passed"
