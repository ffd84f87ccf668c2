#!/bin/bash
# Long hostile-answer fuzz run, set up like test/run-tests.sh (as root, on Debian 12):
#     bash test/fuzz/fuzz.sh [CALLS [SEED [run.py options...]]]
# builds and installs digime, starts the sandbox and a throwaway cluster, and runs
# test/fuzz/run.py for CALLS calls (default 20000) with SEED (default: from the clock,
# printed).  Exits non-zero when a check failed; the output names the seed and call to
# replay.  DM_KEEP=1 keeps the work directory (server log).
# With other agents on the machine, run it through /work/isolate.sh like the suite.
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/lib.sh"

calls=${1:-20000}
seed=${2:-$(( $(date +%s) % 100000 ))}
shift $(( $# < 2 ? $# : 2 ))

dm_require_root
dm_install_deps
dm_build
dm_workdir
# glibc keeps freed heap for reuse once its mmap threshold has adapted upwards; a fixed
# threshold returns large blocks at once, so that RssAnon shows what the backend holds.
export MALLOC_MMAP_THRESHOLD_=131072
dm_fuzz_start "log_min_messages = warning"
dm_fuzz_write_env
dm_log "fuzzing: $calls calls, seed $seed"
"$DM_PY" "$DM_ROOT/test/fuzz/run.py" --seed "$seed" --calls "$calls" --db digime_fuzz "$@"
