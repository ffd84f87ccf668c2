--
-- security: what a granted role, another granted role and an ungranted
-- role may do.  Everything else fails with 42501 or shows no rows.
-- (test/t/040_security.py goes further: membership, COPY, pg_dump, hostile
-- search_path, tenant policies.)
--
-- tokens are owned by the role that stores them: store one as regress_app_a
SET ROLE regress_app_a;
SELECT id AS a_token, owner_role, user_id FROM digime.digime_import_token('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs',
  '{"accessToken":{"value":"a-at","expiry":2000000000},"refreshToken":{"value":"a-rt","expiry":2000000000},"user":{"id":"u-a"}}') \gset
SELECT :a_token > 0 AS stored, :'owner_role' AS owner_role, :'user_id' AS user_id;
-- its own rows, without the secret columns
SELECT owner_role, user_id, contract_id FROM digime.user_tokens_info ORDER BY id;
SELECT t_err($$SELECT access_token FROM digime.user_tokens$$);
SELECT t_err($$SELECT * FROM digime.user_tokens$$);
SELECT t_err($$SELECT * FROM digime.contracts$$);
SELECT t_err($$UPDATE digime.user_tokens SET user_id = 'x'$$);
SELECT t_err($$INSERT INTO digime.user_tokens (contract_id, owner_role, access_token, access_token_expires_at, refresh_token, refresh_token_expires_at) VALUES ('x', 'regress_app_a', 'a', now(), 'r', now())$$);
SELECT contract_id, grantees FROM digime.contracts_info ORDER BY 1;
SELECT digime.digime_user_access_token(:a_token) #>> '{user,id}' AS own_token_user;
-- the administration is not for it
SELECT t_err($$SELECT digime.digime_add_contract('c', 'a', 'k')$$);
SELECT t_err($$SELECT digime.digime_grant_contract('second-contract', 'regress_app_a')$$);
SELECT t_err($$SELECT digime.digime_revoke_token(1)$$);
SELECT t_err($$SELECT digime.digime_reencrypt_secrets()$$);
-- a contract not granted to it
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('second-contract', 'https://app.example/', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_import_token('second-contract', '{"accessToken":{"value":"a","expiry":2000000000},"refreshToken":{"value":"r","expiry":2000000000}}')$$);
-- another granted role sees none of it
SET ROLE regress_app_b;
SELECT count(*) AS visible FROM digime.user_tokens_info;
SELECT count(*) AS visible FROM digime.authorizations;
SELECT contract_id FROM digime.contracts_info ORDER BY 1;
DELETE FROM digime.user_tokens;
SELECT t_err(format('SELECT digime.digime_user_access_token(%s)', :a_token));
SELECT t_err(format('SELECT * FROM digime.digime_refresh_token(%s)', :a_token));
SELECT t_err(format('SELECT * FROM digime.digime_reauthorize_url(%s, %L)', :a_token, 'https://app.example/'));
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, user_token_id => %s)',
                    'second-contract', 'https://app.example/', 's', :a_token));
-- a role with no grant cannot even reach the schema
SET ROLE regress_none;
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'https://app.example/', 's')$$);
SELECT t_err($$SELECT count(*) FROM digime.user_tokens_info$$);
SELECT t_err($$SELECT count(*) FROM digime.contracts_info$$);
RESET ROLE;
-- regress_app_b's DELETE removed nothing of regress_app_a's
SELECT count(*) AS app_a_rows FROM digime.user_tokens WHERE owner_role = 'regress_app_a'::regrole;
-- the administrator sees every row and may act on any token
SELECT owner_role, status, count(*) FROM digime.user_tokens GROUP BY 1, 2 ORDER BY 1, 2;
SELECT digime.digime_user_access_token(:a_token) #>> '{user,id}' AS admin_reads;
