#!/bin/bash
# Development helper: builds and installs digime, starts the sandbox and a cluster the
# way test/run-tests.sh does (full statement and debug logging), then runs CMD in that
# environment and tears everything down.  Without CMD it waits (Ctrl-C ends it) and
# other shells can `source $DM_WORK/env` (the path is printed) to use it.
#     bash test/fuzz/env.sh prove --exec /usr/bin/python3 test/t/085_fuzz.py
# Run it through /work/isolate.sh like the suite (it installs the extension).
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/lib.sh"

dm_require_root
dm_install_deps
dm_build
dm_workdir
dm_fuzz_start \
    "log_statement = 'all'" \
    "log_min_messages = debug1" \
    "log_min_error_statement = debug1"
dm_fuzz_write_env
cd "$DM_ROOT"
if (($#)); then
    "$@"
else
    dm_log "ready: source $DM_WORK/env"
    while :; do sleep 3600; done
fi
