--
-- callback: digime_handle_callback's parsing and its refusals, exchange
-- and import argument checks.  The successful flows run in test/t/010_flow.py.
--
SELECT t_err($$SELECT * FROM digime.digime_handle_callback(NULL)$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?state=s&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=false&errorCode=UserCancelled')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('success=false')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('?success=maybe&state=s&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=s')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=a&state=b&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=nobody&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=x%00y&code=c')$$);
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=s&code=%ZZ')$$);
SELECT t_err(format('SELECT * FROM digime.digime_handle_callback(%L)',
                    'https://app.example/return?success=true&state=s&code=' || repeat('a', 2000000)));
-- one state pending for two end users of a role: the callback needs digime.end_user
SET digime.end_user = 'alice';
SELECT count(*) FROM digime.digime_authorize_url('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'https://app.example/return', 'shared');
SET digime.end_user = 'bob';
SELECT count(*) FROM digime.digime_authorize_url('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'https://app.example/return', 'shared');
RESET digime.end_user;
SELECT end_user, status FROM digime.authorizations WHERE state = 'shared' ORDER BY end_user;
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=shared&code=regress-code-Tg2')$$);
SET digime.end_user = 'alice';
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=shared&code=regress-code-Tg2')$$);
RESET digime.end_user;
-- an expired authorization is refused (its callback came too late)
SELECT count(*) FROM digime.digime_authorize_url('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'https://app.example/return', 'late user');
UPDATE digime.authorizations SET expires_at = now() - interval '1 second' WHERE state = 'late user';
SELECT t_err($$SELECT * FROM digime.digime_handle_callback('https://app.example/return?success=true&state=late+user&code=c&accountReference=r')$$);
SELECT status FROM digime.authorizations WHERE state = 'late user';
-- digime_exchange_code, the low-level call
SELECT t_err($$SELECT * FROM digime.digime_exchange_code(NULL, 'code', 'verifier')$$);
SELECT t_err($$SELECT * FROM digime.digime_exchange_code('second-contract', '', 'verifier')$$);
SELECT t_err($$SELECT * FROM digime.digime_exchange_code('second-contract', 'code', NULL)$$);
SELECT t_err($$SELECT * FROM digime.digime_exchange_code('second-contract', 'regress-unknown-code-J4q', 'regress-unknown-verifier-P8z')$$);
SELECT count(*) AS tokens FROM digime.user_tokens WHERE status <> 'revoked';
-- digime_import_token: the SDK's UserAccessToken, checked
SELECT v AS token,
       t_err(format('SELECT * FROM digime.digime_import_token(%L, %L)', 'second-contract', v))
  FROM unnest(ARRAY[
    '[]',
    '{"accessToken":{"value":"a","expiry":2000000000}}',
    '{"accessToken":{"value":"a","expiry":2000000000},"refreshToken":{"value":"r"}}',
    '{"accessToken":{"value":"","expiry":2000000000},"refreshToken":{"value":"r","expiry":2000000000}}',
    '{"accessToken":{"value":"a","expiry":2000000000000},"refreshToken":{"value":"r","expiry":2000000000}}',
    '{"accessToken":{"value":"a","expiry":1.5},"refreshToken":{"value":"r","expiry":2000000000}}',
    '{"accessToken":{"value":"a","expiry":2000000000},"refreshToken":{"value":"r","expiry":2000000000},"extra":1}',
    '{"accessToken":{"value":"a","expiry":2000000000},"refreshToken":{"value":"r","expiry":2000000000},"user":{"id":7}}']) v;
SELECT t_err($$SELECT * FROM digime.digime_import_token('second-contract', NULL)$$);
-- V90: the SDK's sample token goes in and comes out unchanged (expiries in seconds)
SELECT id, user_id, consent_id, access_token, refresh_token,
       access_token_expires_at AT TIME ZONE 'UTC' AS access_expires_utc
  FROM digime.digime_import_token('second-contract',
    '{"accessToken":{"value":"sample-token","expiry":1000000},"refreshToken":{"value":"sample-refresh-token","expiry":1000000},"user":{"id":"test-user-id"},"consentid":"test-consent-id"}') \gset imp_
SELECT :imp_id > 0 AS stored, :'imp_user_id' AS user_id, :'imp_consent_id' AS consent_id,
       NOT :{?imp_access_token} AS secrets_not_returned, :'imp_access_expires_utc' AS access_expires_utc;
-- compared without writing the token values into a logged statement: md5 of
-- "sample-token" and of "sample-refresh-token"
SELECT t - 'accessToken' - 'refreshToken' AS without_tokens,
       t #> '{accessToken,expiry}' AS access_expiry, t #> '{refreshToken,expiry}' AS refresh_expiry,
       md5(t #>> '{accessToken,value}') = 'd8088d1817f5552731e7f2f8b1aebf10' AS access_same,
       md5(t #>> '{refreshToken,value}') = 'b1280b50bf4771ee5c2e4ed249db7519' AS refresh_same
  FROM digime.digime_user_access_token(:imp_id) t;
-- a token digi.me does not know (its values are sent to the sandbox, so they
-- appear in no statement but the import, which the log redacts)
SELECT id AS unknown_id FROM digime.digime_import_token('second-contract',
    '{"accessToken":{"value":"regress-at-Hq3v","expiry":2000000000},"refreshToken":{"value":"regress-rt-Lw9k","expiry":2000000000}}') \gset
-- refreshing it: digi.me refuses the refresh token, so the user must reauthorize
SELECT t_err(format('SELECT * FROM digime.digime_refresh_token(%s)', :unknown_id));
SELECT t_err($$SELECT * FROM digime.digime_refresh_token(NULL)$$);
SELECT t_err($$SELECT * FROM digime.digime_refresh_token(999999)$$);
SELECT t_err($$SELECT * FROM digime.digime_user_access_token(999999)$$);
SELECT t_err($$SELECT * FROM digime.digime_reauthorize_url(NULL, 'https://app.example/')$$);
SELECT t_err($$SELECT * FROM digime.digime_reauthorize_url(999999, 'https://app.example/')$$);
SELECT t_err(format('SELECT * FROM digime.digime_reauthorize_url(%s, %L, state => %L)', :imp_id, 'https://app.example/', ''));
SELECT t_err(format('SELECT * FROM digime.digime_reauthorize_url(%s, %L, locale => %L)', :imp_id, 'https://app.example/', 'x'));
SELECT t_err(format('SELECT * FROM digime.digime_reauthorize_url(%s, %L, session_options => %L)', :imp_id, 'https://app.example/', '[]'));
-- digi.me does not know the imported access token
SELECT t_err(format('SELECT * FROM digime.digime_reauthorize_url(%s, %L)', :unknown_id, 'https://app.example/'));
