--
-- contracts: administration of contracts, keys and grants
--
\set example_key `cat test/fixtures/digime-example/read-data.key`
\set second_key `cat test/fixtures/keys/second.pem`
-- bad arguments and bad keys; the key is never echoed, nothing is stored
SELECT t_err($$SELECT digime.digime_add_contract(NULL, 'app', 'x')$$);
SELECT t_err($$SELECT digime.digime_add_contract('', 'app', 'x')$$);
SELECT t_err($$SELECT digime.digime_add_contract('c', NULL, 'x')$$);
SELECT t_err($$SELECT digime.digime_add_contract('c', 'app', NULL)$$);
SELECT t_err($$SELECT digime.digime_add_contract('c', 'app', 'not a key')$$);
SELECT t_err($$SELECT digime.digime_add_contract(E'c\n1', 'app', 'x')$$);
SELECT t_err($$SELECT digime.digime_add_contract('c', 'my app', 'x')$$);
SELECT t_err($$SELECT digime.digime_add_contract('c', 'app',
  E'-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n-----END RSA PRIVATE KEY-----\n')$$);
\set weak_key `cat test/fixtures/keys/weak-1024.pem`
\set ec_key `cat test/fixtures/keys/ec.pem`
\set encrypted_key `cat test/fixtures/keys/encrypted.pem`
SELECT t_err(format('SELECT digime.digime_add_contract(%L, %L, %L)', 'c', 'app', :'weak_key'));
SELECT t_err(format('SELECT digime.digime_add_contract(%L, %L, %L)', 'c', 'app', :'ec_key'));
SELECT t_err(format('SELECT digime.digime_add_contract(%L, %L, %L)', 'c', 'app', :'encrypted_key'));
-- an existing contract id
SELECT t_err(format('SELECT digime.digime_add_contract(%L, %L, %L)',
                    'second-contract', 'app', :'second_key'));
SELECT count(*) AS contracts FROM digime.contracts;
-- the key is stored encrypted (digime.key_file is set for the tests) and the
-- view shows everything but the key
SELECT contract_id, private_key LIKE 'dmenc1:' || digime.digime_encryption_key_id() || ':%' AS sealed
  FROM digime.contracts ORDER BY 1;
SELECT * FROM digime.contracts_info WHERE false;
SELECT contract_id, application_id, key_bits, key_fingerprint, key_encrypted, grantees
  FROM digime.contracts_info ORDER BY 1;
-- rotation
SELECT contract_id, key_fingerprint FROM digime.digime_add_contract('tmp-contract', 'tmp-app', :'second_key');
SELECT contract_id, key_fingerprint, rotated_at IS NOT NULL AS rotated
  FROM digime.digime_rotate_contract_key('tmp-contract', :'example_key');
SELECT t_err($$SELECT digime.digime_rotate_contract_key('no-such-contract', 'x')$$);
SELECT t_err(format('SELECT digime.digime_rotate_contract_key(%L, %L)', 'no-such-contract', :'second_key'));
SELECT t_err(format('SELECT digime.digime_rotate_contract_key(%L, %L)', 'tmp-contract', :'weak_key'));
-- grants
SELECT t_err($$SELECT digime.digime_grant_contract('no-such-contract', 'regress_app_a')$$);
SELECT t_err($$SELECT digime.digime_grant_contract('tmp-contract', NULL)$$);
SELECT t_err($$SELECT digime.digime_revoke_contract('tmp-contract', 'regress_app_a')$$);
SELECT digime.digime_grant_contract('tmp-contract', 'regress_none');
SELECT digime.digime_grant_contract('tmp-contract', 'regress_none');  -- again: no-op
SELECT grantees FROM digime.contracts_info WHERE contract_id = 'tmp-contract';
SELECT has_function_privilege('regress_none', 'digime.digime_refresh_token(bigint)', 'EXECUTE') AS can_refresh,
       has_schema_privilege('regress_none', 'digime', 'USAGE') AS schema_usage,
       has_column_privilege('regress_none', 'digime.user_tokens', 'access_token', 'SELECT') AS reads_secret,
       has_column_privilege('regress_none', 'digime.user_tokens', 'user_id', 'SELECT') AS reads_user_id;
SELECT digime.digime_revoke_contract('tmp-contract', 'regress_none');
-- the last grant gone, so are the privileges
SELECT has_function_privilege('regress_none', 'digime.digime_refresh_token(bigint)', 'EXECUTE') AS can_refresh,
       has_schema_privilege('regress_none', 'digime', 'USAGE') AS schema_usage;
-- dropping: refused while tokens use the contract, unless cascade
SELECT id FROM digime.digime_import_token('tmp-contract',
  '{"accessToken":{"value":"tmp-at","expiry":2000000000},"refreshToken":{"value":"tmp-rt","expiry":2000000000}}');
SELECT t_err($$SELECT digime.digime_drop_contract('tmp-contract')$$);
SELECT t_err($$SELECT digime.digime_drop_contract('no-such-contract')$$);
SELECT digime.digime_drop_contract('tmp-contract', cascade => true);
SELECT count(*) AS tmp_rows FROM digime.user_tokens WHERE contract_id = 'tmp-contract';
SELECT count(*) AS contracts FROM digime.contracts;
-- revoking a token (local delete)
SELECT id FROM digime.digime_import_token('second-contract',
  '{"accessToken":{"value":"rv-at","expiry":2000000000},"refreshToken":{"value":"rv-rt","expiry":2000000000}}') \gset rv_
SELECT digime.digime_revoke_token(:rv_id) AS revoked, digime.digime_revoke_token(:rv_id) AS again;
-- configuration: only a superuser sets where traffic goes and what is trusted
SET ROLE regress_app_a;
SELECT t_err($$SET digime.base_url = 'https://evil.example/'$$);
SELECT t_err($$SET digime.onboard_url = 'https://evil.example/'$$);
SELECT t_err($$SET digime.ca_file = '/tmp/evil.pem'$$);
SELECT t_err($$SET digime.timeout_ms = 1$$);
SELECT t_err($$SET digime.key_file = '/tmp/key'$$);
RESET ROLE;
SELECT t_err($$SET digime.base_url = 'http://api.example.com/v1.7/'$$);
SELECT t_err($$SET digime.base_url = 'ftp://127.0.0.1/v1.7/'$$);
SELECT t_err($$SET digime.base_url = 'https://user:pw@api.example.com/v1.7/'$$);
SELECT t_err($$SET digime.base_url = 'api.digi.me/v1.7/'$$);
SELECT t_err($$SET digime.key_file = '/tmp/key'$$);
BEGIN;
SET LOCAL digime.base_url = 'http://127.0.0.1:1/v1.7';
SHOW digime.base_url;
ROLLBACK;
