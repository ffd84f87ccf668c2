#!/bin/bash
# Development helper: rebuild, install (in the isolate.sh namespace NAME) and restart the
# cluster of a running test/fuzz/env.sh, whose $DM_WORK/env is sourced first.
#     /work/isolate.sh NAME bash test/fuzz/dev-restart.sh /tmp/digime-test.XXXX/env
set -euo pipefail
source "$1"
make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" >/dev/null
make -s -C "$DM_ROOT" PG_CONFIG="$DM_PG_BIN/pg_config" install >/dev/null
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-}; [ -n "$MALLOC_MMAP_THRESHOLD_" ] || unset MALLOC_MMAP_THRESHOLD_
cd / && runuser -u postgres -- "$DM_PG_BIN/pg_ctl" -D "$DM_PGDATA" -l "$DM_WORK/postgres.log" -w -m fast restart >/dev/null
echo restarted
