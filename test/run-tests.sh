#!/bin/bash
# The test command (README, "Testing"): as root on Debian 12,
#     bash test/run-tests.sh
# installs what is missing, builds and installs digime, starts the sandbox
# API and a throwaway PostgreSQL 15 cluster, runs every suite (pg_regress,
# then the TAP tests in test/t/), and exits non-zero on any failure.
# DM_KEEP=1 keeps the work directory (logs) for inspection.
#
#     bash test/run-tests.sh --asan
# runs the same suites against digime built with AddressSanitizer and
# UndefinedBehaviorSanitizer (the server loads the runtimes by LD_PRELOAD) and
# fails also on any sanitizer report, which it prints.
source "$(dirname "$0")/lib.sh"

DM_ASAN=
for arg in "$@"; do
    case $arg in
        --asan) DM_ASAN=1 ;;
        *) echo "usage: bash test/run-tests.sh [--asan]" >&2; exit 2 ;;
    esac
done

dm_require_root
dm_install_deps
dm_build
dm_workdir
[ -z "$DM_ASAN" ] || dm_asan_build

# Every suite runs with full statement and debug logging: 090_log_hygiene
# then checks that no secret reached the log.
dm_start_test_setup \
    "log_statement = 'all'" \
    "log_min_messages = debug1" \
    "log_min_error_statement = debug1" \
    "max_worker_processes = 40" \
    "digime.worker_naptime = 2"
[ -z "$DM_ASAN" ] || dm_asan_check_server

failed=0
dm_log "pg_regress, then the isolation specs"
rm -f "$DM_ROOT/test/results/regression.diffs" "$DM_ROOT/test/results/isolation/regression.diffs"
if ! make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" installcheck; then
    cat "$DM_ROOT/test/results/regression.diffs" "$DM_ROOT/test/results/isolation/regression.diffs" \
        >&2 2>/dev/null || true
    failed=1
fi

dm_log "TAP tests"
cd "$DM_ROOT"
prove --exec "$DM_PY" --timer test/t/*.py || failed=1

if [ -n "$DM_ASAN" ]; then
    # shutdown code runs instrumented too, and every process has written its reports
    dm_stop_cluster || failed=1
    dm_sanitizer_reports || failed=1
fi

if [ "$failed" != 0 ]; then
    echo "FAILED" >&2
    exit 1
fi
echo "all suites passed"
