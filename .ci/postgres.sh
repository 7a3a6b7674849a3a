# Sourced by .ci/run: `start_postgres` starts a throw-away PostgreSQL cluster (Debian's PostgreSQL,
# installed from Debian's packages if missing) on 127.0.0.1 and a free port, with a role `posttrain`
# (password login, CREATEDB, no superuser) and a database `posttrain_test`; it exports
# POSTTRAIN_TEST_DATABASE_URL and stops and removes the cluster when the calling shell exits.
# A cluster of its own rather than the machine's `main` one: nothing is left in a shared cluster,
# and a server already on port 5432 does not matter.

_pg_as_owner() {  # PostgreSQL refuses to run as root: the cluster belongs to `postgres`
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    PG_BIN=$bin
    PG_DIR=$(mktemp -d /tmp/posttrain-ci-pg.XXXXXX)
    if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR"; fi
    PG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    trap stop_postgres EXIT
    _pg_as_owner "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --auth-local=trust \
        --auth-host=scram-sha-256 >"$PG_DIR/initdb.log"
    _pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 120 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >/dev/null
    _pg_as_owner "$PG_BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE ROLE posttrain LOGIN PASSWORD 'posttrain' CREATEDB" \
        -c "CREATE DATABASE posttrain_test OWNER posttrain"
    export POSTTRAIN_TEST_DATABASE_URL="postgresql://posttrain:posttrain@127.0.0.1:$PG_PORT/posttrain_test"
    echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT (data $PG_DIR/data)"
}

stop_postgres() {
    if [ -n "${PG_DIR:-}" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
        _pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
    fi
    if [ -n "${PG_DIR:-}" ]; then rm -rf "$PG_DIR"; fi
}
