#!/usr/bin/env bash
# Starts a throwaway PostgreSQL for the test suite (a fresh cluster in a temporary directory,
# on a private port, trusting local connections) and prints its URL. Installs PostgreSQL from
# Debian's packages first when the machine has none. Usage: eval "$(scripts/postgres.sh start)";
# scripts/postgres.sh stop.
set -euo pipefail

PGPORT="${HEARTH_TEST_PGPORT:-54329}"
PGDIR="${HEARTH_TEST_PGDIR:-/tmp/hearth-test-pg}"

find_bin() {
    local b
    for b in /usr/lib/postgresql/*/bin; do
        [ -x "$b/pg_ctl" ] && { echo "$b"; return 0; }
    done
    return 1
}

install_postgres() {
    echo "PostgreSQL not found: installing it from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
}

run_as_postgres() {
    # PostgreSQL refuses to run as root.
    if [ "$(id -u)" = 0 ]; then
        su postgres -s /bin/bash -c "$*"
    else
        bash -c "$*"
    fi
}

case "${1:-start}" in
start)
    BIN="$(find_bin || { install_postgres; find_bin; })"
    if ! run_as_postgres "$BIN/pg_ctl -D $PGDIR status" >/dev/null 2>&1; then
        rm -rf "$PGDIR"
        mkdir -p "$PGDIR"
        [ "$(id -u)" = 0 ] && chown postgres "$PGDIR"
        run_as_postgres "$BIN/initdb -D $PGDIR -A trust -U postgres" >/dev/null
        run_as_postgres "$BIN/pg_ctl -D $PGDIR -l $PGDIR/log -o '-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c fsync=off' -w start" >/dev/null
    fi
    run_as_postgres "$BIN/psql -h 127.0.0.1 -p $PGPORT -U postgres -tc \"SELECT 1 FROM pg_database WHERE datname='hearth_test'\"" | grep -q 1 \
        || run_as_postgres "$BIN/createdb -h 127.0.0.1 -p $PGPORT -U postgres hearth_test"
    echo "export HEARTH_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PGPORT/hearth_test"
    ;;
stop)
    BIN="$(find_bin)" || exit 0
    run_as_postgres "$BIN/pg_ctl -D $PGDIR -m fast stop" >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
