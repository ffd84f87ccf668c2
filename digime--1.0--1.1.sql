/* digime--1.0--1.1.sql — token-granting requests in a background worker, callback inbox,
 * token health, batch refresh, retention, audit trail.  CREATE EXTENSION digime installs 1.0
 * and then runs this script. */

\echo Use "ALTER EXTENSION digime UPDATE TO '1.1'" to load this file. \quit

-- Everything here is qualified, as in 1.0: the script runs with the caller's search_path.

----------------------------------------------------------------------------
-- Token health
----------------------------------------------------------------------------

ALTER TABLE digime.user_tokens
    ADD COLUMN status text NOT NULL DEFAULT 'active'
        CONSTRAINT user_tokens_status_check
        CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['active', 'needs_reauthorization', 'revoked'])),
    ADD COLUMN last_error_sqlstate text,
    ADD COLUMN last_error text,
    ADD COLUMN last_error_at timestamptz,
    ADD COLUMN refresh_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN next_refresh_at timestamptz,
    ALTER COLUMN access_token DROP NOT NULL,
    ALTER COLUMN refresh_token DROP NOT NULL,
    ADD CONSTRAINT user_tokens_secrets_check
        CHECK (status OPERATOR(pg_catalog.=) 'revoked'
               OR (access_token IS NOT NULL AND refresh_token IS NOT NULL));
-- batch and automatic refresh select by expiry; retention finds revoked rows
CREATE INDEX user_tokens_access_expiry ON digime.user_tokens (access_token_expires_at);
CREATE INDEX user_tokens_revoked ON digime.user_tokens (updated_at)
    WHERE status OPERATOR(pg_catalog.=) 'revoked';

COMMENT ON COLUMN digime.user_tokens.access_token IS 'Secret. Plaintext, or "dmenc1:" ciphertext bound to this row. NULL once revoked.';
COMMENT ON COLUMN digime.user_tokens.refresh_token IS 'Secret. Plaintext, or "dmenc1:" ciphertext bound to this row. NULL once revoked.';
COMMENT ON COLUMN digime.user_tokens.status IS 'active; needs_reauthorization (digi.me refused the refresh token: see digime_reauthorize_url); revoked (digime_revoke_token; secrets cleared).';
COMMENT ON COLUMN digime.user_tokens.last_error_sqlstate IS 'SQLSTATE of the last failed refresh (kept after a later success; compare last_error_at with refreshed_at).';
COMMENT ON COLUMN digime.user_tokens.last_error IS 'Message of the last failed refresh (no secrets).';
COMMENT ON COLUMN digime.user_tokens.last_error_at IS 'Time of the last failed refresh.';
COMMENT ON COLUMN digime.user_tokens.refresh_failures IS 'Transient refresh failures since the last success; batch and automatic refresh back off accordingly.';
COMMENT ON COLUMN digime.user_tokens.next_refresh_at IS 'After a transient failure: batch and automatic refresh leave the token alone until then.';

CREATE OR REPLACE VIEW digime.user_tokens_info WITH (security_invoker = true) AS
SELECT id, contract_id, owner_role, end_user, user_id, consent_id,
       access_token_expires_at, refresh_token_expires_at,
       state, account_reference, created_at, updated_at, refreshed_at,
       status, last_error_sqlstate, last_error, last_error_at, refresh_failures, next_refresh_at
  FROM digime.user_tokens;

----------------------------------------------------------------------------
-- Authorizations: expiry, retention, idempotent callbacks
----------------------------------------------------------------------------

ALTER TABLE digime.authorizations DROP CONSTRAINT authorizations_status_check;
ALTER TABLE digime.authorizations
    ADD CONSTRAINT authorizations_status_check
        CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'completed', 'superseded', 'expired'])),
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN code_hash text;
UPDATE digime.authorizations SET finished_at = COALESCE(completed_at, expires_at)
 WHERE status OPERATOR(pg_catalog.<>) 'pending';
-- callbacks look a state up whatever its status (retries, YD022, YD023)
CREATE INDEX authorizations_state ON digime.authorizations (owner_role, state);
-- retention: pending ones expire, finished ones are deleted
CREATE INDEX authorizations_pending_expiry ON digime.authorizations (expires_at)
    WHERE status OPERATOR(pg_catalog.=) 'pending';
CREATE INDEX authorizations_finished ON digime.authorizations (finished_at)
    WHERE status OPERATOR(pg_catalog.<>) 'pending';
COMMENT ON COLUMN digime.authorizations.status IS 'pending, completed (by a callback), superseded (by a newer authorization with the same state), or expired (after digime.authorization_ttl; its code_verifier is cleared).';
COMMENT ON COLUMN digime.authorizations.finished_at IS 'When the authorization stopped being pending; digime.authorization_retention later deletes it.';
COMMENT ON COLUMN digime.authorizations.code_hash IS 'Hex SHA-256 of the code that completed it: the same callback again returns the same token row.';

----------------------------------------------------------------------------
-- Callback inbox
----------------------------------------------------------------------------

CREATE SEQUENCE digime.callback_inbox_id_seq;
CREATE TABLE digime.callback_inbox (
    id              bigint PRIMARY KEY DEFAULT pg_catalog.nextval('digime.callback_inbox_id_seq'),
    owner_role      regrole NOT NULL DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)),
    end_user        text,
    callback_url    text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'done', 'failed'])),
    token_id        bigint,
    sqlstate        text,
    message         text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    submitted_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at     timestamptz
);
ALTER SEQUENCE digime.callback_inbox_id_seq OWNED BY digime.callback_inbox.id;
CREATE INDEX callback_inbox_due ON digime.callback_inbox (next_attempt_at)
    WHERE status OPERATOR(pg_catalog.=) 'pending';
CREATE INDEX callback_inbox_finished ON digime.callback_inbox (finished_at)
    WHERE status OPERATOR(pg_catalog.<>) 'pending';
COMMENT ON TABLE digime.callback_inbox IS
  'Callback URLs handed over by triggers and jobs (INSERT, or digime_submit_callback). After the inserting transaction commits, the digime worker completes each like digime_handle_callback, with the rights of owner_role, and sends NOTIFY digime_token. Row-level security as on user_tokens.';
COMMENT ON COLUMN digime.callback_inbox.callback_url IS 'The callback URL as the browser delivered it; its code is cleared once the row is processed.';
COMMENT ON COLUMN digime.callback_inbox.status IS 'pending (waiting or retrying), done (token_id set), failed (sqlstate, message).';
COMMENT ON COLUMN digime.callback_inbox.attempts IS 'Exchanges tried; transient failures are retried up to digime.inbox_max_attempts.';
COMMENT ON COLUMN digime.callback_inbox.next_attempt_at IS 'Earliest time of the next attempt (back-off after a transient failure).';

CREATE FUNCTION digime._callback_inbox_insert() RETURNS trigger
LANGUAGE C AS 'MODULE_PATHNAME', 'digime_callback_inbox_insert';
COMMENT ON FUNCTION digime._callback_inbox_insert() IS
  'Private: checks a new inbox row (22023 for a malformed callback URL), fills its defaults and wakes the worker at commit.';
REVOKE ALL ON FUNCTION digime._callback_inbox_insert() FROM PUBLIC;
CREATE TRIGGER callback_inbox_insert BEFORE INSERT ON digime.callback_inbox
    FOR EACH ROW EXECUTE FUNCTION digime._callback_inbox_insert();

ALTER TABLE digime.callback_inbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE digime.callback_inbox FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON digime.callback_inbox
    USING (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)))
    WITH CHECK (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));

----------------------------------------------------------------------------
-- Audit trail
----------------------------------------------------------------------------

CREATE SEQUENCE digime.audit_log_id_seq;
CREATE TABLE digime.audit_log (
    id          bigint PRIMARY KEY DEFAULT pg_catalog.nextval('digime.audit_log_id_seq'),
    at          timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    role        regrole NOT NULL,
    action      text NOT NULL,
    contract_id text,
    token_id    bigint,
    outcome     text NOT NULL CHECK (outcome OPERATOR(pg_catalog.=) ANY (ARRAY['ok', 'error'])),
    sqlstate    text,
    reference   text
);
ALTER SEQUENCE digime.audit_log_id_seq OWNED BY digime.audit_log.id;
CREATE INDEX audit_log_at ON digime.audit_log (at);
COMMENT ON TABLE digime.audit_log IS
  'Who authorized, refreshed, revoked or administered what, failures included; never a secret. Rows of token-granting requests and of failures are committed at once (a rolled-back caller keeps them). An application role reads its own rows. Deleted after digime.audit_retention.';
COMMENT ON COLUMN digime.audit_log.role IS 'The role that called (for automatic refresh by the worker: the token''s owner).';
COMMENT ON COLUMN digime.audit_log.action IS 'authorize, reauthorize, exchange, refresh, refresh_automatic, refresh_batch, import, revoke, submit_callback, add_contract, rotate_contract_key, drop_contract, grant_contract, revoke_contract, reencrypt_secrets, purge.';
COMMENT ON COLUMN digime.audit_log.outcome IS 'ok or error (then sqlstate says which).';
COMMENT ON COLUMN digime.audit_log.reference IS 'What the action refers to: an authorization, an inbox row, a role, or digi.me''s error reference.';

ALTER TABLE digime.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE digime.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON digime.audit_log FOR SELECT
    USING (role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));

REVOKE ALL ON digime.callback_inbox, digime.callback_inbox_id_seq,
              digime.audit_log, digime.audit_log_id_seq
    FROM PUBLIC;

-- the audit trail is kept by pg_dump; the inbox is a transient queue (its codes are single-use)
SELECT pg_catalog.pg_extension_config_dump('digime.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('digime.audit_log_id_seq', '');

----------------------------------------------------------------------------
-- Functions and procedures
----------------------------------------------------------------------------

CREATE FUNCTION digime.digime_submit_callback(callback_url text)
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_submit_callback';
COMMENT ON FUNCTION digime.digime_submit_callback(text) IS
  'Queues a callback URL in digime.callback_inbox for the worker (for triggers and jobs): returns the inbox id. Processed after the transaction commits (a rollback sends nothing). 22023 for a malformed URL.';

CREATE PROCEDURE digime.digime_process_inbox(
    INOUT done integer DEFAULT NULL,
    INOUT failed integer DEFAULT NULL,
    INOUT retrying integer DEFAULT NULL)
LANGUAGE C
AS 'MODULE_PATHNAME', 'digime_process_inbox';
COMMENT ON PROCEDURE digime.digime_process_inbox(integer, integer, integer) IS
  'Processes the caller''s due inbox rows now (all rows for the administrator), as the worker does on its own when digime is preloaded. Returns how many rows ended done, failed, or wait for a retry.';

CREATE PROCEDURE digime.digime_refresh_expiring(
    within interval DEFAULT '15 minutes',
    concurrency integer DEFAULT 8,
    max_tokens integer DEFAULT NULL,
    INOUT refreshed integer DEFAULT NULL,
    INOUT failed integer DEFAULT NULL,
    INOUT needs_reauthorization integer DEFAULT NULL,
    INOUT skipped integer DEFAULT NULL)
LANGUAGE C
AS 'MODULE_PATHNAME', 'digime_refresh_expiring';
COMMENT ON PROCEDURE digime.digime_refresh_expiring(interval, integer, integer, integer, integer, integer, integer) IS
  'Refreshes every token the caller may manage whose access token expires within "within" (POST oauth/token, grant refresh_token), up to "concurrency" at once, each committed on its own. Returns refreshed, failed, needs_reauthorization, skipped (not active, refresh token expired, or backing off).';

CREATE FUNCTION digime.digime_valid_access_token(token_id bigint, min_validity interval DEFAULT '60 seconds')
RETURNS jsonb
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_valid_access_token';
COMMENT ON FUNCTION digime.digime_valid_access_token(bigint, interval) IS
  'The token in the SDK''s UserAccessToken shape, refreshed first (committed at once) when its access token expires within min_validity. YD030/YD031 when the token needs reauthorization or was revoked.';

CREATE PROCEDURE digime.digime_purge(
    INOUT expired bigint DEFAULT NULL,
    INOUT deleted bigint DEFAULT NULL)
LANGUAGE C
AS 'MODULE_PATHNAME', 'digime_purge';
COMMENT ON PROCEDURE digime.digime_purge(bigint, bigint) IS
  'Retention now (the worker does it every digime.worker_naptime): pending authorizations past their expiry become expired (code_verifier cleared); finished authorizations, inbox rows and revoked tokens older than digime.authorization_retention and audit rows older than digime.audit_retention are deleted. Administrator only.';

REVOKE ALL ON FUNCTION
    digime.digime_submit_callback(text),
    digime.digime_valid_access_token(bigint, interval)
FROM PUBLIC;
REVOKE ALL ON PROCEDURE
    digime.digime_process_inbox(integer, integer, integer),
    digime.digime_refresh_expiring(interval, integer, integer, integer, integer, integer, integer),
    digime.digime_purge(bigint, bigint)
FROM PUBLIC;

COMMENT ON FUNCTION digime.digime_revoke_token(bigint) IS
  'Marks a user access token revoked and clears its secrets (digi.me is not told: its API has no token revocation); retention deletes the row later. Returns false when no such row.';
COMMENT ON FUNCTION digime.digime_refresh_token(bigint) IS
  'Refreshes a stored token now (POST oauth/token, grant refresh_token); the digime worker commits the new pair at once, whatever the caller''s transaction does. YD001 when digi.me refuses the refresh token (the token then needs reauthorization).';
COMMENT ON FUNCTION digime.digime_handle_callback(text) IS
  'Completes the caller''s pending authorization named by the callback''s state: the digime worker exchanges its code (POST oauth/token) and commits the token row (or, for a reauthorization, updates it) at once. The same callback again returns the same row. Secret columns of the returned row are NULL.';
COMMENT ON FUNCTION digime.digime_exchange_code(text, text, text) IS
  'Low-level: exchanges a callback''s authorization code with its code_verifier (POST oauth/token, grant authorization_code); the digime worker commits the user access token at once. Secret columns of the returned row are NULL.';

----------------------------------------------------------------------------
-- What digime_grant_contract grants (versioned here, not in C)
----------------------------------------------------------------------------

CREATE FUNCTION digime._role_privileges(role regrole, do_grant boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    privileges text[] := ARRAY[
        'USAGE ON SCHEMA digime',
        'EXECUTE ON FUNCTION digime.digime_authorize_url(text, text, text, integer, bigint, jsonb, text, jsonb, text, boolean, text, boolean, jsonb), '
            'digime.digime_exchange_code(text, text, text), digime.digime_handle_callback(text), '
            'digime.digime_refresh_token(bigint), digime.digime_reauthorize_url(bigint, text, text, text, jsonb, boolean), '
            'digime.digime_user_access_token(bigint), digime.digime_import_token(text, jsonb), '
            'digime.digime_submit_callback(text), digime.digime_valid_access_token(bigint, interval)',
        'EXECUTE ON PROCEDURE digime.digime_process_inbox(integer, integer, integer), '
            'digime.digime_refresh_expiring(interval, integer, integer, integer, integer, integer, integer)',
        'SELECT (id, contract_id, owner_role, end_user, user_id, consent_id, '
            'access_token_expires_at, refresh_token_expires_at, state, account_reference, '
            'created_at, updated_at, refreshed_at, status, last_error_sqlstate, last_error, '
            'last_error_at, refresh_failures, next_refresh_at), DELETE ON digime.user_tokens',
        'SELECT (id, kind, contract_id, owner_role, end_user, state, session, callback, '
            'token_id, status, created_at, expires_at, completed_at, finished_at) ON digime.authorizations',
        'SELECT, DELETE, INSERT (callback_url, end_user) ON digime.callback_inbox',
        'USAGE ON SEQUENCE digime.callback_inbox_id_seq',
        'SELECT ON digime.user_tokens_info, digime.contracts_info, digime.audit_log'];
    p text;
BEGIN
    FOREACH p IN ARRAY privileges LOOP
        IF do_grant THEN
            EXECUTE format('GRANT %s TO %s', p, role);
        ELSE
            EXECUTE format('REVOKE %s FROM %s', p, role);
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION digime._role_privileges(regrole, boolean) FROM PUBLIC;
COMMENT ON FUNCTION digime._role_privileges(regrole, boolean) IS
  'Private: grants (or revokes) what a role granted a contract needs; called by digime_grant_contract / digime_revoke_contract.';

-- roles granted under 1.0 get the new privileges
SELECT digime._role_privileges(g.grantee, true)
  FROM (SELECT DISTINCT grantee FROM digime.contract_grants) g;
