#!/usr/bin/env bash
# The control plane's benchmark (issue 15): builds release binaries and runs
# `starling-loadtest control-bench` on SQLite and on PostgreSQL, in both keep-alive
# modes, printing each table.
#
#   scripts/control-bench.sh                 # 10,000 sessions, 30 s steady state
#   SESSIONS=100000 STEADY=60 scripts/control-bench.sh
#   MODES=heartbeat BACKENDS=sqlite scripts/control-bench.sh
#
# PostgreSQL: a fresh database is created (and dropped afterwards) on the server of
# $DATABASE_URL, or, when it is unset, on a throwaway cluster (scripts/pg-throwaway.sh).
# Extra flags for the bench: BENCH_ARGS="--churn 50 --json".
set -euo pipefail
cd "$(dirname "$0")/.."

SESSIONS=${SESSIONS:-10000}
STEADY=${STEADY:-30}
CONCURRENCY=${CONCURRENCY:-64}
MODES=${MODES:-"heartbeat stream"}
BACKENDS=${BACKENDS:-"sqlite postgres"}
BENCH_ARGS=${BENCH_ARGS:-}

cargo build --release -q -p starling-loadtest -p starling-controlplane
TARGET=${CARGO_TARGET_DIR:-target}
BENCH="$TARGET/release/starling-loadtest"

throwaway=""
fresh_db=""
admin_url=""
cleanup() {
  if [ -n "$fresh_db" ] && [ -n "$admin_url" ]; then
    psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $fresh_db" >/dev/null 2>&1 || true
  fi
  if [ -n "$throwaway" ]; then scripts/pg-throwaway.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

case " $BACKENDS " in
  *" postgres "*)
    if [ -z "${DATABASE_URL:-}" ]; then
      eval "$(scripts/pg-throwaway.sh start)"
      throwaway=1
    fi
    admin_url=$DATABASE_URL
    ;;
esac

for backend in $BACKENDS; do
  for mode in $MODES; do
    echo "=== control-bench: $backend, --mode $mode, $SESSIONS sessions, ${STEADY}s steady"
    db_args=()
    if [ "$backend" = postgres ]; then
      fresh_db="starling_bench_$$_$mode"
      psql -q "$admin_url" -c "CREATE DATABASE $fresh_db" >/dev/null
      # Same server, the fresh database (the URL's path replaced).
      db_args=(--database-url "${admin_url%/*}/$fresh_db")
    fi
    status=0
    # shellcheck disable=SC2086
    "$BENCH" control-bench --sessions "$SESSIONS" --steady "$STEADY" \
      --concurrency "$CONCURRENCY" --mode "$mode" "${db_args[@]}" $BENCH_ARGS || status=$?
    if [ "$status" != 0 ]; then echo "(control-bench failed: exit $status)"; fi
    if [ -n "$fresh_db" ]; then
      psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $fresh_db" >/dev/null 2>&1 || true
      fresh_db=""
    fi
  done
done
