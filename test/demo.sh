#!/bin/bash
# The demo command (README, "Demo"): as root on Debian 12,
#     bash test/demo.sh
# runs the whole digi.me authorization from SQL against the bundled sandbox:
# registers a freshly generated contract key, starts an authorization,
# follows the onboarding URL as a browser would, hands the callback URL to
# digime_handle_callback, hands a second user's callback to the callback inbox
# (the digime worker completes it), refreshes expiring tokens in a batch, and
# prints the audit trail and the stored tokens with secrets masked.
source "$(dirname "$0")/lib.sh"

dm_require_root
dm_install_deps
dm_build
dm_workdir
dm_start_sandbox
dm_make_key_file "$DM_WORK/keys/digime.key"
dm_start_cluster "shared_preload_libraries = 'digime'" "digime.key_file = '$DM_WORK/keys/digime.key'" \
    "digime.worker_naptime = 2"

APP=demo-application
CONTRACT=demo-contract
CALLBACK=https://app.example/digime/return
openssl genrsa -traditional -out "$DM_WORK/contract.pem" 2048 2>/dev/null
chmod 644 "$DM_WORK/contract.pem"

dm_log "the digi.me sandbox learns the contract's public key"
"$DM_PY" - "$DM_WORK/contract.pem" <<EOF
import json, ssl, sys, urllib.request
from cryptography.hazmat.primitives import serialization
key = serialization.load_pem_private_key(open(sys.argv[1], "rb").read(), None)
pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()
req = urllib.request.Request("$DM_SANDBOX_URL/_sandbox/contracts", method="POST",
    data=json.dumps({"application_id": "$APP", "contract_id": "$CONTRACT",
                     "public_key_pem": pub, "redirect_uris": ["$CALLBACK"]}).encode())
urllib.request.urlopen(req, context=ssl.create_default_context(cafile="$DM_CA_FILE")).read()
EOF

psql() { command psql -X -v ON_ERROR_STOP=1 -q "$@"; }

dm_log "the DBA installs digime and registers the contract"
psql <<EOF
CREATE EXTENSION digime;
\set key \`cat $DM_WORK/contract.pem\`
\x on
SELECT * FROM digime.digime_add_contract('$CONTRACT', '$APP', :'key');
EOF

dm_log "the application starts an authorization for its user 'alice'"
URL=$(psql -At -c "SELECT url FROM digime.digime_authorize_url('$CONTRACT', '$CALLBACK', 'alice')")
echo "onboarding URL: $URL"

dm_log "the user's browser opens it; digi.me redirects back to the callback"
LOCATION=$(curl -s --cacert "$DM_CA_FILE" -o /dev/null -w '%{redirect_url}' "$URL")
echo "callback: ${LOCATION%%code=*}code=…"

dm_log "the application hands the callback URL to digime_handle_callback"
psql -c "SELECT id, user_id, state FROM digime.digime_handle_callback('$LOCATION')" >/dev/null

dm_log "a job hands a second user's callback to the inbox; the digime worker completes it"
URL2=$(psql -At -c "SELECT url FROM digime.digime_authorize_url('$CONTRACT', '$CALLBACK', 'bob')")
LOCATION2=$(curl -s --cacert "$DM_CA_FILE" -o /dev/null -w '%{redirect_url}' "$URL2")
psql -At -c "SELECT 'inbox row ' || digime.digime_submit_callback('$LOCATION2')"
for _ in $(seq 1 50); do
    [ "$(psql -At -c "SELECT status FROM digime.callback_inbox WHERE id = 1")" != pending ] && break
    sleep 0.1
done
psql -c "SELECT id, status, token_id, attempts FROM digime.callback_inbox"

dm_log "a scheduled job refreshes what expires soon (each refresh committed on its own)"
psql -c "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '5 minutes'" >/dev/null
psql -c "CALL digime.digime_refresh_expiring(within => '15 minutes')"

dm_log "the audit trail (no secrets in it)"
psql -c "SELECT id, role, action, token_id, outcome, reference FROM digime.audit_log ORDER BY id"

dm_log "the stored user access tokens (secrets masked)"
psql <<'EOF'
\x on
SELECT t.id, t.contract_id, t.owner_role, t.user_id, t.consent_id, t.status,
       left(t.access_token, 7) || '…' AS access_token_at_rest,
       t.access_token_expires_at,
       left(t.refresh_token, 7) || '…' AS refresh_token_at_rest,
       t.refresh_token_expires_at, t.refreshed_at, t.state, t.account_reference, t.created_at
  FROM digime.user_tokens t ORDER BY t.id;
SELECT jsonb_set(jsonb_set(digime.digime_user_access_token(1),
         '{accessToken,value}', to_jsonb(left(digime.digime_user_access_token(1) #>> '{accessToken,value}', 5) || '…')),
         '{refreshToken,value}', to_jsonb(left(digime.digime_user_access_token(1) #>> '{refreshToken,value}', 5) || '…'))
       AS "digime_user_access_token(1), values masked";
EOF
dm_log "demo finished"
