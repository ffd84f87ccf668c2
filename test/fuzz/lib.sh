# test/fuzz/lib.sh — environment helpers for the hostile-answer fuzzer (source it after
# test/lib.sh).  Adds nothing to test/lib.sh itself.

# Sandbox + cluster as test/run-tests.sh sets them up (same contracts, key file and
# preloading); extra postgresql.conf lines in "$@".  Sets what test/lib.sh sets, plus
# DM_SANDBOX_DIR, and exports what the TAP helpers (test/pylib/dmtest.py) read.
dm_fuzz_start() {
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

# Writes the environment a client needs to reach this setup to $DM_WORK/env
# (source it from another shell while the setup runs).
dm_fuzz_write_env() {
    local v
    for v in PGHOST PGPORT PGUSER PGDATABASE DM_WORK DM_ROOT DM_PG_BIN DM_PGDATA \
             DM_SANDBOX_URL DM_SANDBOX_PORT DM_SANDBOX_DIR DM_CA_FILE; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done >"$DM_WORK/env"
}
