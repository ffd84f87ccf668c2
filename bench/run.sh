#!/bin/bash
# Benchmark (not part of the test suite): as root,
#     bash bench/run.sh [calls]
# Sets up like test/run-tests.sh (sandbox + throwaway cluster, no statement
# logging) and runs bench/bench.py, which prints medians and ratios.
# With DM_NODE_SDK=/path/to/a/built/digime-sdk-nodejs checkout (kept outside
# this repo, see bench/README.md) it then runs bench/node-sdk.js against the
# same sandbox and prints the SDK's figures next to digime's.
source "$(dirname "$0")/../test/lib.sh"
calls=${1:-200}
dm_require_root
dm_install_deps
dm_build
dm_workdir
dm_start_sandbox --contract "bench-app:bench-contract:$DM_ROOT/test/fixtures/keys/second.pem"
dm_make_key_file "$DM_WORK/keys/digime.key"
dm_start_cluster "shared_preload_libraries = 'digime'" "digime.key_file = '$DM_WORK/keys/digime.key'"
export DM_ROOT
DM_BENCH_JSON="$DM_WORK/digime-bench.json" "$DM_PY" "$DM_ROOT/bench/bench.py" "$calls"

# The digi.me Node.js SDK against the same sandbox, same contract and key.
skip="skipping the Node.js SDK comparison"
if [ -z "${DM_NODE_SDK:-}" ]; then
    dm_log "$skip: DM_NODE_SDK is not set (a built SDK checkout outside the repo; see bench/README.md)"
elif ! command -v node >/dev/null 2>&1; then
    dm_log "$skip: node is not installed"
elif [ ! -f "$DM_NODE_SDK/package.json" ] || [ ! -f "$DM_NODE_SDK/dist/main/index.js" ]; then
    dm_log "$skip: $DM_NODE_SDK is not a built SDK checkout (run \`npm ci && npm run build\` there; see bench/README.md)"
else
    echo
    env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u all_proxy -u ALL_PROXY \
        NODE_EXTRA_CA_CERTS="$DM_CA_FILE" \
        node "$DM_ROOT/bench/node-sdk.js" --sdk "$DM_NODE_SDK" \
        --base-url "$DM_SANDBOX_URL/v1.7/" --onboard-url "$DM_SANDBOX_URL/apps/saas/" \
        --ca-file "$DM_CA_FILE" --app-id bench-app --contract-id bench-contract \
        --key-file "$DM_ROOT/test/fixtures/keys/second.pem" \
        --calls "${DM_NODE_CALLS:-$calls}" --compare "$DM_WORK/digime-bench.json"
fi
