#!/bin/bash
# The sandbox's own ceiling for refreshes (not part of the test suite):
#     bash bench/ceiling.sh [--tokens N] [--concurrency 1,4,8,16]
# Starts a private sandbox (as test/run-tests.sh does; no database, no root
# needed) and runs bench/ceiling.py against it with the fixture key second.pem.
source "$(dirname "$0")/../test/lib.sh"
dm_workdir
dm_start_sandbox
"$DM_PY" "$DM_ROOT/bench/ceiling.py" --url "$DM_SANDBOX_URL" --ca "$DM_CA_FILE" \
    --key "$DM_ROOT/test/fixtures/keys/second.pem" --app ceiling-app --contract ceiling-contract "$@"
