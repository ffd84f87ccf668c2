# test/lib.sh — shared by test/run-tests.sh and test/demo.sh (source it; bash).
#
# Installs what is missing (Debian packages), builds and installs digime,
# and runs a throwaway PostgreSQL cluster (as user postgres, on a free port,
# Unix socket only) plus the sandbox API (HTTPS on 127.0.0.1), all under one
# temporary directory that dm_cleanup removes again, also on failure.

set -euo pipefail

DM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DM_PY=/usr/bin/python3
DM_PG_BIN=/usr/lib/postgresql/15/bin
DM_PACKAGES=(make gcc postgresql-15 postgresql-server-dev-15 postgresql-15-cron libcurl4-openssl-dev libssl-dev
             libipc-run-perl python3-jwt python3-cryptography python3-psycopg2 curl openssl)

dm_log() { printf '== %s\n' "$*" >&2; }

# Runs a command as postgres, without proxy settings (all traffic is local),
# from a directory it may enter (the clone may sit where only root can).
dm_as_postgres() {
    (cd / && env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY runuser -u postgres -- "$@")
}

dm_require_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run this as root: it installs packages and starts PostgreSQL as user postgres" >&2
        exit 2
    fi
}

dm_install_deps() {
    local missing=() p
    for p in "${DM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        dm_log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Debian's postgresql package may start a default cluster; we run our own.
}

dm_build() {
    dm_log "building and installing digime"
    make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" >/dev/null
    make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" install >/dev/null
}

# A work directory the postgres user can enter even when the clone is in a
# directory only root may enter.
dm_workdir() {
    DM_WORK=$(mktemp -d /tmp/digime-test.XXXXXX)
    chmod 755 "$DM_WORK"
    export DM_WORK
    trap dm_cleanup EXIT
    trap 'exit 130' INT TERM
}

dm_cleanup() {
    local rc=$?
    if [ -n "${DM_PGDATA:-}" ] && [ -f "$DM_PGDATA/postmaster.pid" ]; then
        dm_as_postgres "$DM_PG_BIN/pg_ctl" -D "$DM_PGDATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [ -n "${DM_SANDBOX_PID:-}" ]; then
        kill "$DM_SANDBOX_PID" 2>/dev/null || true
        wait "$DM_SANDBOX_PID" 2>/dev/null || true
    fi
    if [ "$rc" != 0 ] && [ -n "${DM_WORK:-}" ] && [ -f "$DM_WORK/postgres.log" ]; then
        echo "---- last lines of the server log ----" >&2
        tail -n 40 "$DM_WORK/postgres.log" >&2 || true
    fi
    if [ -n "${DM_WORK:-}" ] && [ -z "${DM_KEEP:-}" ]; then
        rm -rf "$DM_WORK"
    fi
    exit "$rc"
}

dm_free_port() {
    "$DM_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts the sandbox in $DM_WORK/sandbox (extra sandbox.py options in "$@");
# sets DM_SANDBOX_PORT/_URL/_PID and DM_CA_FILE.
dm_start_sandbox() {
    local dir="$DM_WORK/sandbox" i
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
        "$DM_PY" "$DM_ROOT/test/sandbox/sandbox.py" --dir "$dir" "$@" \
        >"$DM_WORK/sandbox.out" 2>"$DM_WORK/sandbox.err" &
    DM_SANDBOX_PID=$!
    for i in $(seq 1 100); do
        [ -s "$dir/port" ] && break
        kill -0 "$DM_SANDBOX_PID" 2>/dev/null || { cat "$DM_WORK/sandbox.err" >&2; return 1; }
        sleep 0.1
    done
    [ -s "$dir/port" ] || { echo "sandbox did not start" >&2; return 1; }
    DM_SANDBOX_PORT=$(cat "$dir/port")
    DM_SANDBOX_URL="https://127.0.0.1:$DM_SANDBOX_PORT"
    DM_CA_FILE="$dir/ca.pem"
    export DM_SANDBOX_PID DM_SANDBOX_PORT DM_SANDBOX_URL DM_CA_FILE
}

# Writes a 256-bit key file for digime.key_file, readable only by postgres.
dm_make_key_file() {
    local file=$1
    mkdir -p "$(dirname "$file")"
    openssl rand -hex 32 >"$file"
    chown postgres:postgres "$file"
    chmod 600 "$file"
}

# Starts a cluster in $DM_WORK/pgdata; extra postgresql.conf lines in "$@".
# Sets PGHOST/PGPORT/PGUSER/PGDATABASE for the rest of the script.
dm_start_cluster() {
    DM_PGDATA="$DM_WORK/pgdata"
    export DM_PGDATA
    install -d -o postgres -g postgres -m 700 "$DM_PGDATA" "$DM_WORK/socket"
    dm_as_postgres "$DM_PG_BIN/initdb" -D "$DM_PGDATA" -A trust -U postgres \
        --no-sync -E UTF8 --locale=C >"$DM_WORK/initdb.log" 2>&1
    PGPORT=$(dm_free_port)
    {
        echo "port = $PGPORT"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$DM_WORK/socket'"
        echo "fsync = off"
        echo "digime.base_url = '$DM_SANDBOX_URL/v1.7/'"
        echo "digime.onboard_url = '$DM_SANDBOX_URL/apps/saas/'"
        echo "digime.ca_file = '$DM_CA_FILE'"
        for line in "$@"; do echo "$line"; done
    } >>"$DM_PGDATA/postgresql.conf"
    touch "$DM_WORK/postgres.log"
    chown postgres:postgres "$DM_WORK/postgres.log"
    dm_as_postgres "$DM_PG_BIN/pg_ctl" -D "$DM_PGDATA" -l "$DM_WORK/postgres.log" -w start >/dev/null
    export PGHOST="$DM_WORK/socket" PGPORT PGUSER=postgres PGDATABASE=postgres
}
