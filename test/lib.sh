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
    make -s -j"$(nproc)" -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" >/dev/null
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
    if [ "$rc" != 0 ] && [ -n "${DM_SANITIZER_DIR:-}" ] && [ -z "${DM_SANITIZER_CHECKED:-}" ]; then
        dm_sanitizer_reports || true
    fi
    if [ -n "${DM_ASAN_INSTALLED:-}" ]; then
        # put the normal build (dm_build, in the checkout) back in place of the instrumented one
        make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" install >/dev/null 2>&1 \
            || echo "could not reinstall the normal build of digime" >&2
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

# Initializes and starts a cluster in DIR (DIR/pgdata, DIR/socket,
# DIR/postgres.log) pointed at the sandbox; extra postgresql.conf lines in
# "$@".  Sets DM_CLUSTER_PORT.
dm_new_cluster() {
    local dir=$1
    shift
    [ -d "$dir" ] || install -d -m 755 "$dir"
    install -d -o postgres -g postgres -m 700 "$dir/pgdata" "$dir/socket"
    dm_as_postgres "$DM_PG_BIN/initdb" -D "$dir/pgdata" -A trust -U postgres \
        --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1
    DM_CLUSTER_PORT=$(dm_free_port)
    {
        echo "port = $DM_CLUSTER_PORT"
        echo "listen_addresses = ''"
        echo "unix_socket_directories = '$dir/socket'"
        echo "fsync = off"
        echo "digime.base_url = '$DM_SANDBOX_URL/v1.7/'"
        echo "digime.onboard_url = '$DM_SANDBOX_URL/apps/saas/'"
        echo "digime.ca_file = '$DM_CA_FILE'"
        for line in "$@"; do echo "$line"; done
    } >>"$dir/pgdata/postgresql.conf"
    install -o postgres -g postgres -m 644 /dev/null "$dir/postgres.log"
    local senv=()
    mapfile -t senv < <(dm_server_env)
    dm_as_postgres env "${senv[@]}" "$DM_PG_BIN/pg_ctl" -D "$dir/pgdata" -l "$dir/postgres.log" \
        -w start >/dev/null
}

# Starts the cluster in $DM_WORK (dm_new_cluster); extra postgresql.conf lines
# in "$@".  Sets PGHOST/PGPORT/PGUSER/PGDATABASE for the rest of the script.
dm_start_cluster() {
    DM_PGDATA="$DM_WORK/pgdata"
    export DM_PGDATA
    dm_new_cluster "$DM_WORK" "$@"
    export PGHOST="$DM_WORK/socket" PGPORT=$DM_CLUSTER_PORT PGUSER=postgres PGDATABASE=postgres
}

# The suites' setup: the sandbox with the example contract and a second one,
# a key file, and a cluster preloading digime (extra postgresql.conf lines in
# "$@").  Exports what the TAP helpers (test/pylib/dmtest.py) read.
dm_start_test_setup() {
    local app=qgEUV8iJENRiUkuYF5lLpdsOv7Hp0biy
    dm_start_sandbox \
        --contract "$app:yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs:$DM_ROOT/test/fixtures/digime-example/read-data.key" \
        --contract "$app:second-contract:$DM_ROOT/test/fixtures/keys/second.pem"
    DM_SANDBOX_DIR="$DM_WORK/sandbox"
    dm_make_key_file "$DM_WORK/keys/digime.key"
    dm_start_cluster \
        "shared_preload_libraries = 'digime'" \
        "digime.key_file = '$DM_WORK/keys/digime.key'" \
        "max_connections = 40" \
        "$@"
    export DM_ROOT DM_PG_BIN DM_SANDBOX_DIR
}

# Writes the environment a client needs to reach the setup to $DM_WORK/env
# (source it from another shell while the setup runs).
dm_write_env() {
    local v
    for v in PGHOST PGPORT PGUSER PGDATABASE DM_WORK DM_ROOT DM_PG_BIN DM_PGDATA \
             DM_SANDBOX_URL DM_SANDBOX_PORT DM_SANDBOX_DIR DM_CA_FILE; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done >"$DM_WORK/env"
}

# Stops the cluster of dm_start_cluster cleanly (shutdown code runs too).
dm_stop_cluster() {
    dm_as_postgres "$DM_PG_BIN/pg_ctl" -D "$DM_PGDATA" -m fast -w -t 60 stop >/dev/null
}

# The NAME=VALUE lines of DM_SERVER_ENV, for `env`: only postmaster starts get
# them (here and in dmtest.Cluster), not psql, python or the sandbox.
dm_server_env() {
    printf '%s\n' "${DM_SERVER_ENV:-}" | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' || true
}

# --------------------------------------------------------------------------
# Sanitizer run (test/run-tests.sh --asan)
# --------------------------------------------------------------------------
# digime compiled with AddressSanitizer + UndefinedBehaviorSanitizer; Debian's
# PostgreSQL is not, so the postmaster gets the runtimes by LD_PRELOAD.
# COPT is PGXS's variable for extra flags: it goes to CFLAGS and LDFLAGS (the
# link of digime.so pulls in libasan and libubsan).  Frame pointers and no
# sibling calls give complete stacks.  UBSan recovers (gcc's default): each
# finding is reported once per process and the run goes on, so one run lists
# them all; ASan cannot (memory may be corrupt after a bad access).
DM_ASAN_COPT="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-optimize-sibling-calls"

# Builds digime with the sanitizers from scratch (make clean) in a copy of the
# checkout, $DM_WORK/asan-build, so that the checkout keeps its normal build
# (dm_build); installs it in place of the normal one, which dm_cleanup puts
# back; sets DM_SERVER_ENV, so that every postmaster start loads the runtimes
# and all its processes write reports to $DM_SANITIZER_DIR/reports.  After
# dm_workdir.
dm_asan_build() {
    local build=$DM_WORK/asan-build libasan libubsan cppflags
    libasan=$(gcc -print-file-name=libasan.so)
    libubsan=$(gcc -print-file-name=libubsan.so)
    # without them gcc prints the bare name
    if [[ $libasan != /* || $libubsan != /* ]]; then
        echo "gcc has no libasan.so or libubsan.so (Debian packages libasan8, libubsan1)" >&2
        return 1
    fi
    libasan=$(readlink -f "$libasan")
    libubsan=$(readlink -f "$libubsan")
    dm_log "building digime with AddressSanitizer + UBSan (in $build)"
    mkdir -p "$build"
    tar -C "$DM_ROOT" --exclude=./.git --exclude=./test -cf - . | tar -C "$build" -xf -
    # glibc's _FORTIFY_SOURCE wrappers (__memcpy_chk, ...) bypass ASan's checks;
    # with_llvm=no: no LLVM bitcode for JIT inlining (it would be uninstrumented;
    # the suites never reach the JIT's cost thresholds anyway), 6 s less
    cppflags=$("$DM_PG_BIN/pg_config" --cppflags | sed -E 's/(^| )-D_FORTIFY_SOURCE=[0-9]+//g')
    local mk=(make -s -j"$(nproc)" -C "$build" PG_CONFIG="$DM_PG_BIN/pg_config" COPT="$DM_ASAN_COPT" CPPFLAGS="$cppflags"
              with_llvm=no)
    "${mk[@]}" clean >/dev/null
    "${mk[@]}" >/dev/null
    if ! readelf -d "$build/digime.so" | grep -q 'NEEDED.*libasan'; then
        echo "$build/digime.so is not instrumented (no libasan)" >&2
        return 1
    fi
    DM_ASAN_INSTALLED=1
    "${mk[@]}" install >/dev/null

    DM_SANITIZER_DIR=$DM_WORK/sanitizer
    mkdir -p "$DM_SANITIZER_DIR"
    install -d -o postgres -g postgres -m 755 "$DM_SANITIZER_DIR/reports"
    # where user postgres can read them (the clone may be root-only)
    install -m 644 "$DM_ROOT/test/asan.supp" "$DM_ROOT/test/ubsan.supp" "$DM_SANITIZER_DIR/"
    # initializes ASan before any other library constructor and keeps
    # UBSAN_OPTIONS for backends (see the file for why both are needed)
    gcc -shared -fPIC -O2 -Wall -Wl,-z,initfirst -o "$DM_SANITIZER_DIR/sanitizer_init.so" \
        "$DM_ROOT/test/sanitizer_init.c" "$libasan"
    # ASan writes its reports to reports/asan.<program>.<pid>: every forked
    # backend and worker its own file.  libubsan has its own copy of the
    # common options but applies its log_path to libasan's report file (and
    # writes its own reports to stderr, i.e. the server log): so both name the
    # same path.  A process that dies of a report aborts (SIGABRT: the server
    # log says "terminated by signal 6" with the statement it ran, and the
    # postmaster restarts as after any crash; no core files, ASan's default).
    local common="log_path=$DM_SANITIZER_DIR/reports/asan:log_exe_name=1:abort_on_error=1"
    # ASan: detect_leaks=0, since PostgreSQL frees memory contexts wholesale
    # and exits without freeing, so LeakSanitizer would report every backend;
    # detect_stack_use_after_return: a pointer to a dead stack frame;
    # halt_on_error=1 (cannot be otherwise without -fsanitize-recover).
    # UBSan: halt_on_error=0 (report and continue), with stacks, and a
    # summary line that names the check (for a suppression).
    DM_SERVER_ENV="LD_PRELOAD=$libasan $DM_SANITIZER_DIR/sanitizer_init.so $libubsan
ASAN_OPTIONS=$common:detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:suppressions=$DM_SANITIZER_DIR/asan.supp
UBSAN_OPTIONS=$common:halt_on_error=0:print_stacktrace=1:print_summary=1:report_error_type=1:suppressions=$DM_SANITIZER_DIR/ubsan.supp"
    DM_SANITIZE=asan
    export DM_SANITIZER_DIR DM_SERVER_ENV DM_SANITIZE
}

# Checks that the running postmaster (dm_start_cluster) has the ASan runtime
# and the instrumented digime.so mapped.
dm_asan_check_server() {
    local pid maps
    pid=$(head -n 1 "$DM_PGDATA/postmaster.pid")
    maps=$(cat "/proc/$pid/maps")
    if ! grep -q '/libasan\.so' <<<"$maps" || ! grep -q '/digime\.so' <<<"$maps"; then
        echo "the postmaster ($pid) has not loaded libasan and digime.so" >&2
        return 1
    fi
    readelf -d "$(grep -o '/[^ ]*/digime\.so' <<<"$maps" | head -n 1)" | grep -q 'NEEDED.*libasan' || {
        echo "the postmaster's digime.so is not the instrumented build" >&2
        return 1
    }
}

# Prints the sanitizer reports of the run and returns 1 when there is any:
# ASan's report files, each distinct finding in full with the last server log
# lines of its process (the statement it ran) and the other processes that
# reported the same by file name; then UBSan's reports, which are in the
# server logs, each distinct one once (with its stack) and how often it came.
# Call it after the servers have stopped.
dm_sanitizer_reports() {
    DM_SANITIZER_CHECKED=1
    local f key pid files=0 logs=() ubsan
    local -A seen=()
    local -a order=()
    logs=(/dev/null)       # and the server logs there are
    for f in "$DM_WORK"/postgres.log "$DM_WORK"/clusters/*/postgres.log; do
        [ ! -f "$f" ] || logs+=("$f")
    done
    for f in "$DM_SANITIZER_DIR"/reports/*; do
        [ -s "$f" ] || continue
        files=$((files + 1))
        # the line that names the finding (ASan's ERROR line, else the first
        # one: UBSan's summary lines come here), without pids and addresses
        key=$( { grep -m 1 'ERROR: ' "$f" || head -n 1 "$f"; } | sed -E 's/^==[^ ]*==//; s/0x[0-9a-f]+/ADDR/g')
        if [ -n "${seen[$key]+set}" ]; then
            seen[$key]+=" ${f##*/}"
            continue
        fi
        seen[$key]=""
        order+=("$key")
        printf -- '---- sanitizer report %s ----\n' "$f" >&2
        cat "$f" >&2
        pid=${f##*.}
        printf -- '---- last server log lines of process %s ----\n' "$pid" >&2
        grep -h -F "[$pid] " "${logs[@]}" | tail -n 6 >&2 || true
    done
    for key in "${order[@]}"; do
        [ -z "${seen[$key]}" ] || printf -- '---- the same as "%s" in:%s\n' "$key" "${seen[$key]}" >&2
    done
    # UBSan: "file:line:col: runtime error: ..." then "    #N ..." stack lines;
    # any other sanitizer line in a server log counts as well
    ubsan=$(awk '
        /: runtime error: |ERROR: [A-Za-z]+Sanitizer|Sanitizer:DEADLYSIGNAL/ {
            key = $0; gsub(/0x[0-9a-f]+/, "ADDR", key); gsub(/==[0-9]+==/, "", key)
            n[key]++; cur = (n[key] == 1) ? key : ""
            if (cur != "") { order[++k] = key; block[key] = $0 }
            next
        }
        cur != "" && /^    #[0-9]+ |^SUMMARY: / { block[cur] = block[cur] "\n" $0; next }
        { cur = "" }
        END { for (i = 1; i <= k; i++) printf "%s\n(reported %d times)\n", block[order[i]], n[order[i]] }
    ' "${logs[@]}")
    if [ -n "$ubsan" ]; then
        printf -- '---- sanitizer reports in the server logs (UBSan) ----\n%s\n' "$ubsan" >&2
    fi
    if [ "$files" != 0 ] || [ -n "$ubsan" ]; then
        echo "sanitizer: $files report file(s) in $DM_SANITIZER_DIR/reports, ${ubsan:+and reports in the server log; }DM_KEEP=1 keeps them" >&2
        return 1
    fi
    dm_log "sanitizer: no reports"
}
