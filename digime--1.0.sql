/* digime--1.0.sql — digi.me user authorization from SQL */

\echo Use "CREATE EXTENSION digime" to load this file. \quit

-- Everything here is qualified: the script runs with the creator's search_path.
-- Nothing is usable by PUBLIC; digime_grant_contract() grants what a role needs.

REVOKE ALL ON SCHEMA digime FROM PUBLIC;

----------------------------------------------------------------------------
-- Tables
----------------------------------------------------------------------------

CREATE TABLE digime.contracts (
    contract_id     text PRIMARY KEY CHECK (contract_id OPERATOR(pg_catalog.<>) ''),
    application_id  text NOT NULL CHECK (application_id OPERATOR(pg_catalog.<>) ''),
    private_key     text NOT NULL,
    key_bits        integer NOT NULL,
    key_fingerprint text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    rotated_at      timestamptz
);
COMMENT ON TABLE digime.contracts IS
  'digi.me contracts: application ID and the contract''s RSA private key (PEM, or AES-256-GCM ciphertext when digime.key_file is set). Readable only by the extension owner; see digime.contracts_info.';
COMMENT ON COLUMN digime.contracts.private_key IS 'Secret. PEM (PKCS#1 or PKCS#8), or "dmenc1:" ciphertext bound to this row.';
COMMENT ON COLUMN digime.contracts.key_fingerprint IS 'Lower-case hex SHA-256 of the public key (DER SubjectPublicKeyInfo).';

CREATE TABLE digime.contract_grants (
    contract_id text NOT NULL REFERENCES digime.contracts ON UPDATE CASCADE ON DELETE CASCADE,
    grantee     regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (contract_id, grantee)
);
COMMENT ON TABLE digime.contract_grants IS
  'Which roles may run the flow functions with which contract (digime_grant_contract). Membership in a grantee counts.';

CREATE SEQUENCE digime.user_tokens_id_seq;
CREATE TABLE digime.user_tokens (
    id                       bigint PRIMARY KEY DEFAULT pg_catalog.nextval('digime.user_tokens_id_seq'),
    contract_id              text NOT NULL REFERENCES digime.contracts ON UPDATE CASCADE,
    owner_role               regrole NOT NULL,
    end_user                 text,
    user_id                  text,
    consent_id               text,
    access_token             text NOT NULL,
    access_token_expires_at  timestamptz NOT NULL,
    refresh_token            text NOT NULL,
    refresh_token_expires_at timestamptz NOT NULL,
    state                    text,
    account_reference        text,
    created_at               timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at               timestamptz NOT NULL DEFAULT pg_catalog.now(),
    refreshed_at             timestamptz
);
ALTER SEQUENCE digime.user_tokens_id_seq OWNED BY digime.user_tokens.id;
CREATE INDEX ON digime.user_tokens (owner_role, contract_id);
COMMENT ON TABLE digime.user_tokens IS
  'digi.me user access tokens, one row per authorization. Row-level security: a role sees and changes only its own rows. Token columns are secrets: read them with digime_user_access_token().';
COMMENT ON COLUMN digime.user_tokens.owner_role IS 'Role that ran the authorization (current_user); only it sees the row.';
COMMENT ON COLUMN digime.user_tokens.end_user IS 'digime.end_user at authorization time: the application''s own user id, for tenant policies.';
COMMENT ON COLUMN digime.user_tokens.user_id IS 'digi.me user id (the token''s "sub").';
COMMENT ON COLUMN digime.user_tokens.consent_id IS 'digi.me consent id (the token''s "consentid").';
COMMENT ON COLUMN digime.user_tokens.access_token IS 'Secret. Plaintext, or "dmenc1:" ciphertext bound to this row.';
COMMENT ON COLUMN digime.user_tokens.access_token_expires_at IS 'Expiry of the access token (API "expires_on", seconds since the Unix epoch).';
COMMENT ON COLUMN digime.user_tokens.refresh_token IS 'Secret. Plaintext, or "dmenc1:" ciphertext bound to this row.';
COMMENT ON COLUMN digime.user_tokens.refresh_token_expires_at IS 'Expiry of the refresh token (API "expires_on", seconds since the Unix epoch).';
COMMENT ON COLUMN digime.user_tokens.state IS 'state of the authorization that created the token (a reauthorization keeps it).';
COMMENT ON COLUMN digime.user_tokens.account_reference IS 'accountReference of the authorization callback (matches an account''s reference).';
COMMENT ON COLUMN digime.user_tokens.refreshed_at IS 'Time of the last refresh_token grant.';

CREATE SEQUENCE digime.authorizations_id_seq;
CREATE TABLE digime.authorizations (
    id            bigint PRIMARY KEY DEFAULT pg_catalog.nextval('digime.authorizations_id_seq'),
    kind          text NOT NULL CHECK (kind OPERATOR(pg_catalog.=) ANY (ARRAY['authorize', 'reauthorize'])),
    contract_id   text NOT NULL REFERENCES digime.contracts ON UPDATE CASCADE ON DELETE CASCADE,
    owner_role    regrole NOT NULL,
    end_user      text,
    state         text NOT NULL,
    code_verifier text,
    session       jsonb NOT NULL,
    callback      text NOT NULL,
    token_id      bigint REFERENCES digime.user_tokens ON DELETE CASCADE,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status OPERATOR(pg_catalog.=) ANY (ARRAY['pending', 'completed', 'superseded'])),
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at    timestamptz NOT NULL,
    completed_at  timestamptz
);
ALTER SEQUENCE digime.authorizations_id_seq OWNED BY digime.authorizations.id;
CREATE UNIQUE INDEX authorizations_pending_state
    ON digime.authorizations (owner_role, (COALESCE(end_user, '')), state)
    WHERE status OPERATOR(pg_catalog.=) 'pending';
CREATE INDEX ON digime.authorizations (token_id);
COMMENT ON TABLE digime.authorizations IS
  'Authorizations started by digime_authorize_url / digime_reauthorize_url, waiting for (or completed by) digime_handle_callback. Row-level security as on user_tokens.';
COMMENT ON COLUMN digime.authorizations.code_verifier IS 'Secret (PKCE). Cleared when the authorization completes.';
COMMENT ON COLUMN digime.authorizations.session IS 'digi.me session of the authorize/reference answer: {"key": text, "expiry": ms since the epoch}.';
COMMENT ON COLUMN digime.authorizations.token_id IS 'Reauthorization: the token row it updates. Completed authorization: the token row it created.';
COMMENT ON COLUMN digime.authorizations.status IS 'pending, completed (by a callback), or superseded (by a newer authorization with the same state).';
COMMENT ON COLUMN digime.authorizations.expires_at IS 'created_at + digime.authorization_ttl; a later callback is refused.';

-- Row-level security, forced so that it also binds a non-superuser table owner.
ALTER TABLE digime.user_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE digime.user_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON digime.user_tokens
    USING (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)))
    WITH CHECK (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));
ALTER TABLE digime.authorizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE digime.authorizations FORCE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON digime.authorizations
    USING (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)))
    WITH CHECK (owner_role OPERATOR(pg_catalog.=) pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));

REVOKE ALL ON digime.contracts, digime.contract_grants, digime.user_tokens,
              digime.authorizations, digime.user_tokens_id_seq, digime.authorizations_id_seq
    FROM PUBLIC;

-- pg_dump keeps their rows (secrets are ciphertext when digime.key_file is set).
SELECT pg_catalog.pg_extension_config_dump('digime.contracts', '');
SELECT pg_catalog.pg_extension_config_dump('digime.contract_grants', '');
SELECT pg_catalog.pg_extension_config_dump('digime.user_tokens', '');
SELECT pg_catalog.pg_extension_config_dump('digime.user_tokens_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('digime.authorizations', '');
SELECT pg_catalog.pg_extension_config_dump('digime.authorizations_id_seq', '');

----------------------------------------------------------------------------
-- Views
----------------------------------------------------------------------------

CREATE VIEW digime.contracts_info WITH (security_barrier) AS
SELECT c.contract_id,
       c.application_id,
       c.key_bits,
       c.key_fingerprint,
       c.private_key LIKE 'dmenc1:%' AS key_encrypted,
       c.created_at,
       c.rotated_at,
       ARRAY(SELECT g.grantee FROM digime.contract_grants g
             WHERE g.contract_id OPERATOR(pg_catalog.=) c.contract_id
             ORDER BY g.grantee::text) AS grantees
  FROM digime.contracts c
 WHERE pg_catalog.pg_has_role(CURRENT_USER,
           (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'digime'),
           'USAGE')
    OR EXISTS (SELECT 1 FROM digime.contract_grants g
                WHERE g.contract_id OPERATOR(pg_catalog.=) c.contract_id
                  AND pg_catalog.pg_has_role(CURRENT_USER, g.grantee::oid, 'USAGE'));
COMMENT ON VIEW digime.contracts_info IS
  'Contracts without their keys: the administrator sees all, another role those granted to it. key_fingerprint is the SHA-256 of the public key.';

CREATE VIEW digime.user_tokens_info WITH (security_invoker = true) AS
SELECT id, contract_id, owner_role, end_user, user_id, consent_id,
       access_token_expires_at, refresh_token_expires_at,
       state, account_reference, created_at, updated_at, refreshed_at
  FROM digime.user_tokens;
COMMENT ON VIEW digime.user_tokens_info IS
  'digime.user_tokens without the secret columns; row-level security of the caller applies.';

REVOKE ALL ON digime.contracts_info, digime.user_tokens_info FROM PUBLIC;

----------------------------------------------------------------------------
-- Administration (extension owner or superuser; EXECUTE may be delegated)
----------------------------------------------------------------------------

CREATE FUNCTION digime.digime_add_contract(contract_id text, application_id text, private_key text)
RETURNS digime.contracts_info
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_add_contract';
COMMENT ON FUNCTION digime.digime_add_contract(text, text, text) IS
  'Registers a digi.me contract with its RSA private key (PEM, PKCS#1 or PKCS#8, >= 2048 bits). Errors: 22004/22023 bad argument or key, 23505 contract exists.';

CREATE FUNCTION digime.digime_rotate_contract_key(contract_id text, private_key text)
RETURNS digime.contracts_info
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_rotate_contract_key';
COMMENT ON FUNCTION digime.digime_rotate_contract_key(text, text) IS
  'Replaces a contract''s private key; sets rotated_at. Errors: 22004/22023 bad key, 42704 unknown contract.';

CREATE FUNCTION digime.digime_drop_contract(contract_id text, cascade boolean DEFAULT false)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_drop_contract';
COMMENT ON FUNCTION digime.digime_drop_contract(text, boolean) IS
  'Deletes a contract, its grants and pending authorizations; refuses (2BP01) while user tokens reference it unless cascade is true, which deletes them too. 42704 unknown contract.';

CREATE FUNCTION digime.digime_grant_contract(contract_id text, role regrole)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_grant_contract';
COMMENT ON FUNCTION digime.digime_grant_contract(text, regrole) IS
  'Lets role (and its members) run the flow functions with the contract; grants the privileges they need. 42704 unknown contract.';

CREATE FUNCTION digime.digime_revoke_contract(contract_id text, role regrole)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_revoke_contract';
COMMENT ON FUNCTION digime.digime_revoke_contract(text, regrole) IS
  'Withdraws a grant of digime_grant_contract; with the role''s last grant, also its privileges on digime objects. Tokens stay. 42704 unknown contract or grant.';

CREATE FUNCTION digime.digime_revoke_token(token_id bigint)
RETURNS boolean
LANGUAGE C VOLATILE STRICT
AS 'MODULE_PATHNAME', 'digime_revoke_token';
COMMENT ON FUNCTION digime.digime_revoke_token(bigint) IS
  'Deletes a user access token row of any role (digi.me is not told: its API has no token revocation). Returns false when no such row.';

CREATE FUNCTION digime.digime_reencrypt_secrets()
RETURNS bigint
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_reencrypt_secrets';
COMMENT ON FUNCTION digime.digime_reencrypt_secrets() IS
  'Rewrites every stored secret under the current digime.key_file (plaintext when none is set); returns the number of values rewritten. For enabling encryption and key rotation.';

CREATE FUNCTION digime.digime_encryption_key_id()
RETURNS text
LANGUAGE C STABLE
AS 'MODULE_PATHNAME', 'digime_encryption_key_id';
COMMENT ON FUNCTION digime.digime_encryption_key_id() IS
  'Id of the key loaded from digime.key_file (first 8 bytes of a SHA-256 of it, hex), or NULL when secrets are stored in plaintext.';

----------------------------------------------------------------------------
-- The authorization flow (roles granted a contract)
----------------------------------------------------------------------------

CREATE FUNCTION digime.digime_authorize_url(
    contract_id text,
    callback text,
    state text,
    service_id integer DEFAULT NULL,
    user_token_id bigint DEFAULT NULL,
    session_options jsonb DEFAULT NULL,
    source_type text DEFAULT 'pull',
    sample_data jsonb DEFAULT NULL,
    locale text DEFAULT NULL,
    include_sample_data_only_sources boolean DEFAULT NULL,
    storage_id text DEFAULT NULL,
    trigger_query boolean DEFAULT NULL,
    sources_scope jsonb DEFAULT NULL)
RETURNS TABLE (url text, code_verifier text, session jsonb)
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_authorize_url';
COMMENT ON FUNCTION digime.digime_authorize_url(text, text, text, integer, bigint, jsonb, text, jsonb, text, boolean, text, boolean, jsonb) IS
  'Starts an authorization (POST oauth/authorize, and POST reference with storage_id): returns the onboarding URL to send the user to, the PKCE code_verifier and the digi.me session, and records a pending authorization for digime_handle_callback.';

CREATE FUNCTION digime.digime_exchange_code(contract_id text, authorization_code text, code_verifier text)
RETURNS digime.user_tokens
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_exchange_code';
COMMENT ON FUNCTION digime.digime_exchange_code(text, text, text) IS
  'Low-level: exchanges a callback''s authorization code with its code_verifier (POST oauth/token, grant authorization_code) and stores the user access token. Secret columns of the returned row are NULL.';

CREATE FUNCTION digime.digime_handle_callback(callback_url text)
RETURNS digime.user_tokens
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_handle_callback';
COMMENT ON FUNCTION digime.digime_handle_callback(text) IS
  'Completes the caller''s pending authorization named by the callback''s state: exchanges its code (POST oauth/token) and stores (or, for a reauthorization, updates) the user access token. Secret columns of the returned row are NULL.';

CREATE FUNCTION digime.digime_refresh_token(token_id bigint)
RETURNS digime.user_tokens
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_refresh_token';
COMMENT ON FUNCTION digime.digime_refresh_token(bigint) IS
  'Refreshes a stored token now (POST oauth/token, grant refresh_token) and updates its row. A refused refresh token (YD001) needs digime_reauthorize_url.';

CREATE FUNCTION digime.digime_reauthorize_url(
    token_id bigint,
    callback text,
    state text DEFAULT NULL,
    locale text DEFAULT NULL,
    session_options jsonb DEFAULT NULL,
    trigger_query boolean DEFAULT NULL)
RETURNS TABLE (url text, code_verifier text, session jsonb)
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_reauthorize_url';
COMMENT ON FUNCTION digime.digime_reauthorize_url(bigint, text, text, text, jsonb, boolean) IS
  'Starts a reauthorization of a stored token whose refresh token is no longer valid (POST oauth/token/reference): returns the user-reauth URL; its callback updates the same token row.';

CREATE FUNCTION digime.digime_user_access_token(token_id bigint)
RETURNS jsonb
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_user_access_token';
COMMENT ON FUNCTION digime.digime_user_access_token(bigint) IS
  'The stored token in the digi.me SDK''s UserAccessToken shape: {"accessToken":{"value","expiry"},"refreshToken":{"value","expiry"},"user":{"id"},"consentid"}, expiries in seconds since the Unix epoch.';

CREATE FUNCTION digime.digime_import_token(contract_id text, user_access_token jsonb)
RETURNS digime.user_tokens
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'digime_import_token';
COMMENT ON FUNCTION digime.digime_import_token(text, jsonb) IS
  'Stores a token obtained elsewhere (the SDK''s UserAccessToken JSON, expiries in seconds). Secret columns of the returned row are NULL.';

REVOKE ALL ON FUNCTION
    digime.digime_add_contract(text, text, text),
    digime.digime_rotate_contract_key(text, text),
    digime.digime_drop_contract(text, boolean),
    digime.digime_grant_contract(text, regrole),
    digime.digime_revoke_contract(text, regrole),
    digime.digime_revoke_token(bigint),
    digime.digime_reencrypt_secrets(),
    digime.digime_encryption_key_id(),
    digime.digime_authorize_url(text, text, text, integer, bigint, jsonb, text, jsonb, text, boolean, text, boolean, jsonb),
    digime.digime_exchange_code(text, text, text),
    digime.digime_handle_callback(text),
    digime.digime_refresh_token(bigint),
    digime.digime_reauthorize_url(bigint, text, text, text, jsonb, boolean),
    digime.digime_user_access_token(bigint),
    digime.digime_import_token(text, jsonb)
FROM PUBLIC;

-- Secrets at rest: recommend the key file when it is not in use.
DO $$
BEGIN
    IF digime.digime_encryption_key_id() IS NULL THEN
        RAISE WARNING 'digime stores contract keys and user tokens in plaintext'
            USING HINT = 'Set digime.key_file (and shared_preload_libraries = ''digime''), restart, then run SELECT digime.digime_reencrypt_secrets().';
    END IF;
END
$$;
