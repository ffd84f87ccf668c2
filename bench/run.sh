#!/bin/bash
# Benchmark (not part of the test suite): as root,
#     bash bench/run.sh [calls]
# Sets up like test/run-tests.sh (sandbox + throwaway cluster, no statement
# logging) and runs bench/bench.py, which prints medians and ratios.
source "$(dirname "$0")/../test/lib.sh"
dm_require_root
dm_install_deps
dm_build
dm_workdir
dm_start_sandbox --contract "bench-app:bench-contract:$DM_ROOT/test/fixtures/keys/second.pem"
dm_make_key_file "$DM_WORK/keys/digime.key"
dm_start_cluster "shared_preload_libraries = 'digime'" "digime.key_file = '$DM_WORK/keys/digime.key'"
export DM_ROOT
"$DM_PY" "$DM_ROOT/bench/bench.py" "${1:-200}"
