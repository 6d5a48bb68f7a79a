#!/usr/bin/env bash
# The team tracking stack on one machine, without Docker: PostgreSQL holds runs, params and tags;
# `mlflow server` keeps artifacts in a folder and proxies them (--serve-artifacts), so clients need
# only its URL. The tests start their PostgreSQL-backed server with this script (tests/test_postgres.py)
# and the benchmarks start the whole stack with it (benchmarks/bench_postgres.py).
#
#   deploy/local-stack.sh start DIR      # PostgreSQL + mlflow server; prints the client settings
#   deploy/local-stack.sh postgres DIR   # PostgreSQL only; prints the backend store URI
#   deploy/local-stack.sh stop DIR       # stops both (the data stays in DIR; `start` again reuses it)
#
# Settings (environment): MLFLOW_HOST (127.0.0.1; 0.0.0.0 to serve other machines), MLFLOW_PORT (5000),
# MLFLOW_WORKERS (2), PG_PORT (a free port, chosen once), PYTHON (python3, with mlflow and psycopg).
# PostgreSQL listens on 127.0.0.1 only and needs a password there (kept in DIR/pg-password, mode 600);
# its unix socket is inside DIR. Run as root, the database runs as the `postgres` user (initdb refuses
# root), so DIR must be reachable by that user (e.g. under /srv or /tmp, not under /root).
set -euo pipefail

usage() { echo "usage: $0 start|postgres|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
PYTHON=${PYTHON:-python3}
PGDIR=$DIR/postgres          # data/ and the unix socket; owned by the user PostgreSQL runs as
DATA=$PGDIR/data

fail() { echo "local-stack: $*" >&2; exit 1; }

pg_bin() {  # where initdb lives: on PATH, else Debian's /usr/lib/postgresql/<version>/bin
    local found
    found=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] || fail "PostgreSQL is not installed: apt-get install postgresql (or your system's package)"
    dirname "$(readlink -f "$found")"
}

as_pg() {  # run a PostgreSQL program as the user that owns the data
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

backend_uri() {
    echo "postgresql+psycopg://mlflow:$(cat "$DIR/pg-password")@127.0.0.1:$(cat "$DIR/pg-port")/mlflow"
}

init_postgres() {
    local bin=$1 pwfile
    mkdir -p "$PGDIR"
    chmod 700 "$PGDIR"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || fail "running as root needs the 'postgres' user (the postgresql package makes it)"
        chown postgres: "$PGDIR"
        as_pg test -w "$PGDIR" || fail "the postgres user cannot reach $PGDIR: let it through the folders above (chmod o+x $DIR) or choose a folder outside /root"
    fi
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/pg-password")
    echo "${PG_PORT:-$(free_port)}" >"$DIR/pg-port"
    pwfile=$PGDIR/pwfile
    cp "$DIR/pg-password" "$pwfile"
    [ "$(id -u)" = 0 ] && chown postgres: "$pwfile"
    as_pg "$bin/initdb" -D "$DATA" -U mlflow -E UTF8 --auth-local=trust --auth-host=scram-sha-256 \
        --pwfile="$pwfile" >"$PGDIR/initdb.log" 2>&1 || { rm -f "$pwfile"; fail "initdb failed: $(tail -5 "$PGDIR/initdb.log")"; }
    rm -f "$pwfile"
    # Loopback only; the socket lives in $PGDIR (mode 700), so only its owner and root reach it.
    printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\n" \
        "$(cat "$DIR/pg-port")" "$PGDIR" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
    as_pg "$bin/pg_ctl" -D "$DATA" -l "$PGDIR/postgres.log" -w start >/dev/null
    as_pg "$bin/createdb" -h "$PGDIR" -p "$(cat "$DIR/pg-port")" -U mlflow mlflow
}

start_postgres() {
    local bin
    bin=$(pg_bin)
    if [ ! -f "$DATA/PG_VERSION" ]; then
        init_postgres "$bin"
    elif ! as_pg "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$bin/pg_ctl" -D "$DATA" -l "$PGDIR/postgres.log" -w start >/dev/null
    fi
}

start_mlflow() {
    local host=${MLFLOW_HOST:-127.0.0.1} port=${MLFLOW_PORT:-5000} url
    url="http://127.0.0.1:$port"
    if [ -f "$DIR/mlflow.pid" ] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null; then
        echo "mlflow server already running (pid $(cat "$DIR/mlflow.pid"))" >&2
        return
    fi
    mkdir -p "$DIR/artifacts"
    # The URI (with its password) goes through the environment, not the command line that `ps` shows.
    # MLflow's job runner (GenAI jobs) is off unless asked for: recordings never need it.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
    MLFLOW_BACKEND_STORE_URI=$(backend_uri) setsid "$PYTHON" -m mlflow server --host "$host" --port "$port" \
        --artifacts-destination "$DIR/artifacts" --serve-artifacts --workers "${MLFLOW_WORKERS:-2}" \
        >>"$DIR/mlflow.log" 2>&1 </dev/null &
    echo $! >"$DIR/mlflow.pid"
    for _ in $(seq 240); do
        if "$PYTHON" -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; then
            [ "$host" = 127.0.0.1 ] || host=$(hostname -f 2>/dev/null || hostname)
            printf 'export MLFLOW_TRACKING_URI=http://%s:%s\n' "$host" "$port"
            return
        fi
        kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null || fail "mlflow server exited: $(tail -5 "$DIR/mlflow.log")"
        sleep 0.5
    done
    fail "mlflow server did not answer on $url within 120 s (see $DIR/mlflow.log)"
}

stop_all() {
    if [ -f "$DIR/mlflow.pid" ]; then
        kill -TERM -- "-$(cat "$DIR/mlflow.pid")" 2>/dev/null || true  # its whole process group (workers)
        rm -f "$DIR/mlflow.pid"
    fi
    if [ -f "$DATA/PG_VERSION" ]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

case $ACTION in
    postgres) start_postgres; backend_uri ;;
    start) start_postgres; start_mlflow ;;
    stop) stop_all ;;
    *) usage ;;
esac
