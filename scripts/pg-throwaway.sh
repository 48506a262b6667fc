#!/usr/bin/env bash
# Start or stop a throwaway PostgreSQL cluster for tests.
#
#   eval "$(scripts/pg-throwaway.sh start)"   # exports DATABASE_URL and STARLING_PG_DIR
#   scripts/pg-throwaway.sh stop               # stops the cluster in $STARLING_PG_DIR
#
# initdb refuses to run as root, so as root the cluster runs as the `postgres` user
# (installing the `postgresql` package first when no server binaries are found).
set -euo pipefail

find_bindir() {
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  return 1
}

cmd=${1:-}
case "$cmd" in
start)
  if ! BIN=$(find_bindir); then
    echo "pg-throwaway: installing postgresql" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    BIN=$(find_bindir)
  fi
  DIR=$(mktemp -d /tmp/starling-pg.XXXXXX)
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  RUN=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home "$DIR" postgres
    chown postgres "$DIR"
    RUN=(runuser -u postgres --)
  fi
  "${RUN[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 1; }
  "${RUN[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
    || { cat "$DIR/server.log" >&2; exit 1; }
  echo "export DATABASE_URL=postgres://postgres@127.0.0.1:$PORT/postgres"
  echo "export STARLING_PG_DIR=$DIR"
  echo "export STARLING_PG_BIN=$BIN"
  ;;
stop)
  DIR=${STARLING_PG_DIR:?STARLING_PG_DIR is not set}
  BIN=${STARLING_PG_BIN:-$(find_bindir)}
  RUN=()
  [ "$(id -u)" = 0 ] && RUN=(runuser -u postgres --)
  "${RUN[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >&2 || true
  rm -rf "$DIR"
  ;;
*)
  echo "usage: $0 start|stop" >&2
  exit 2
  ;;
esac
