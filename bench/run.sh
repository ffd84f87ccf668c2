#!/bin/bash
# Benchmark (not part of the test suite), as root:
#
#     bash bench/run.sh [SECTION...] [OPTIONS]
#     bash bench/run.sh CALLS              the original benchmark: scenarios + Node.js SDK
#
# Sections (default: all):
#   scenarios  bench/bench.py: warm, no-cache, cold, flow, refresh (the original table)
#   latency    wall-time medians of authorize, full flow and refresh, with the preload
#              (per-database worker) and without it (one-shot worker per token request),
#              and the Node.js SDK's when DM_NODE_SDK is set
#   cpu        backend + digime worker CPU per call (/proc/PID/stat) against the OpenSSL
#              floor (bench/floor.c, compiled here)
#   rows       the cpu figures again with 100,000 rows in digime.authorizations and in
#              digime.user_tokens
#   rss        RssAnon growth of the backend over N authorizes, of the worker over N refreshes
#   batch      digime_refresh_expiring at concurrency 1,4,8,16 against the sandbox's ceiling
#              (bench/ceiling.py) and a sequential loop; PNG plot (gnuplot)
#   profile    perf profile of the backend and the worker (skipped without perf)
#   all        all of the above (profile only when perf is installed)
#
# Options (the defaults finish `all` in about 5 minutes on this 2-core machine):
#   --calls N            latency: calls per figure (200); --sdk-calls N: the SDK's (= --calls)
#   --scenario-calls N   scenarios: bench.py's calls (200)
#   --cpu-calls N        cpu, rows: calls per function (1000), in --cpu-rounds R (4) or
#                        --rows-rounds R (4) rounds; --oneshot-calls N: without the preload (200)
#   --floor-seconds S --floor-repeats R   cpu: the floor's main measurement (0.5 s x 5)
#   --rows N             rows: synthetic rows per table (100000); --rows-idle S (12)
#   --rss-calls N        rss: authorizes and refreshes (20000; 100000 for the long run),
#                        --rss-warmup N (500), --rss-tokens N refreshed in turn (100)
#   --tokens N           batch: tokens (2000); --concurrency L (1,4,8,16)
#   --latency-ms MS      batch: latency the sandbox adds to oauth/token (0)
#   --profile-calls N --profile-tokens N --profile-freq HZ   profile (300, 1000, 1000)
# Environment: DM_NODE_SDK (a built SDK checkout, see bench/README.md), DM_KEEP=1 (keep the
# work directory), BENCH_RESULTS (where to copy summary, JSON and plot; default bench/results).
#
# Sets up like test/run-tests.sh (sandbox + throwaway clusters, no statement logging),
# removes everything when done.
source "$(dirname "$0")/../test/lib.sh"

usage() { sed -n '2,/^# removes/s/^# \{0,1\}//p' "$0"; }

sections=()
opts=()
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    # the original interface: bash bench/run.sh [calls]
    sections=(scenarios)
    opts=(--scenario-calls "$1" --legacy)
    shift
fi
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        scenarios | latency | cpu | rows | rss | batch | profile | all) sections+=("$1") ;;
        -*) opts+=("$1") ;;
        *)
            if ((${#opts[@]})) && [[ ${opts[-1]} == --* ]]; then
                opts+=("$1")
            else
                echo "unknown section: $1 (bash bench/run.sh --help)" >&2
                exit 2
            fi ;;
    esac
    shift
done
((${#sections[@]})) || sections=(all)
wants() {
    local s
    for s in "${sections[@]}"; do
        [[ $s == all || " $* " == *" $s "* ]] && return 0
    done
    return 1
}

dm_require_root
dm_install_deps
if wants batch && ! command -v gnuplot >/dev/null 2>&1; then
    dm_log "installing gnuplot-nox (for the batch plot)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends gnuplot-nox >/dev/null; }; } ||
        dm_log "could not install gnuplot-nox: the batch section will not plot"
fi
dm_build
dm_workdir

# a second cluster (without shared_preload_libraries) is stopped too
bench_cleanup() {
    local rc=$?
    set +e      # (exit "$rc") below must not end the trap before dm_cleanup
    if [ -n "${BENCH_NP_DATA:-}" ] && [ -f "$BENCH_NP_DATA/postmaster.pid" ]; then
        dm_as_postgres "$DM_PG_BIN/pg_ctl" -D "$BENCH_NP_DATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    (exit "$rc")
    dm_cleanup
}
trap bench_cleanup EXIT

if wants cpu rows; then
    export BENCH_FLOOR="$DM_WORK/floor"
    cc -O2 -Wall -o "$BENCH_FLOOR" "$DM_ROOT/bench/floor.c" -lcrypto
fi

dm_start_sandbox --contract "bench-app:bench-contract:$DM_ROOT/test/fixtures/keys/second.pem"
dm_make_key_file "$DM_WORK/keys/digime.key"
dm_start_cluster "shared_preload_libraries = 'digime'" "digime.key_file = '$DM_WORK/keys/digime.key'"

# The cluster without the preload: every token request starts a one-shot worker.  No
# digime.key_file (it needs the preload), so secrets are stored in plaintext there;
# autovacuum off, so that the only children of its postmaster that exit during the
# cpu section are the one-shot workers.
if wants latency cpu; then
    BENCH_NP_DATA=$DM_WORK/nopreload/pgdata    # for bench_cleanup
    dm_new_cluster "$DM_WORK/nopreload" "autovacuum = off"
    export BENCH_NP_HOST="$DM_WORK/nopreload/socket" BENCH_NP_PORT=$DM_CLUSTER_PORT
fi

export DM_ROOT
"$DM_PY" "$DM_ROOT/bench/sections.py" "${sections[@]}" "${opts[@]}"

# bench/results/ keeps the plot of the last batch run, and the summary and figures of the last
# `all` run (a run of single sections leaves those alone)
results=${BENCH_RESULTS:-$DM_ROOT/bench/results}
mkdir -p "$results"
copied=()
if [ -f "$DM_WORK/batch-throughput.png" ]; then
    cp "$DM_WORK/batch-throughput.png" "$results/" && copied+=(batch-throughput.png)
fi
if [[ " ${sections[*]} " == *" all "* ]]; then
    for f in summary.txt results.json; do
        [ ! -f "$DM_WORK/$f" ] || { cp "$DM_WORK/$f" "$results/" && copied+=("$f"); }
    done
fi
((${#copied[@]} == 0)) || dm_log "copied ${copied[*]} to $results"
