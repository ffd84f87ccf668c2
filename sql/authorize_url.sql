--
-- authorize_url: argument validation (nothing is sent or recorded), the
-- onboarding URL for every option (digime-api-vectors.md V60-V72), and the
-- pending authorization it records.
--
\! test/sandbox/ctl POST reset
\set c yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs
\set cb https://app.example/return?x=1
-- required arguments
SELECT t_err($$SELECT * FROM digime.digime_authorize_url(NULL, 'https://app.example/', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('', 'https://app.example/', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', NULL, 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', '', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'https://app.example/', NULL)$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'https://app.example/', '')$$);
-- the callback must be an absolute http(s) URL without fragment (the SDK takes "not a url")
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'not a url', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'ftp://app.example/cb', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'https://app.example/cb#top', 's')$$);
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'https://user:pw@app.example/cb', 's')$$);
-- states with control characters, and over-long arguments
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('c', 'https://app.example/', E'a\x01b')$$);
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L)', 'c', 'https://app.example/', repeat('s', 16385)));
-- unknown contract (for the administrator; other roles get 42501, see security)
SELECT t_err($$SELECT * FROM digime.digime_authorize_url('no-such-contract', 'https://app.example/', 's')$$);
-- options, validated like the SDK does (V130) and stricter where it fails silently
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, service_id => %s)', :'c', :'cb', 's', v))
  FROM unnest(ARRAY['0', '-1']) v;
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, source_type => %L)', :'c', :'cb', 's', 'both'));
SELECT v AS session_options,
       t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, session_options => %L)', :'c', :'cb', 's', v))
  FROM unnest(ARRAY['true', 'null', '[]', '0', '""',
                    '{"push":1}',
                    '{"pull":1}',
                    '{"pull":{"scope":{"timeRanges":["notAnObject"]}}}',
                    '{"pull":{"scope":{"serviceGroups":[{"noIdSet":18}]}}}',
                    '{"pull":{"scope":{"timeRanges":[{"from":"1"}]}}}',
                    '{"pull":{"sourceFetchFilter":{"account":{"id":[1]}}}}',
                    '{"pull":{"limits":{"duration":{"sourceFetch":"6"}}}}',
                    '{"pull":{"sourceFetch":"no"}}']) v;
SELECT v AS sample_data,
       t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, sample_data => %L)', :'c', :'cb', 's', v))
  FROM unnest(ARRAY['{"autoOnboard":true}', '{"dataSet":1}', '{"dataSet":"x","autoOnboard":"yes"}', '[]']) v;
SELECT v AS locale,
       t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, locale => %L)', :'c', :'cb', 's', v))
  FROM unnest(ARRAY['', '5', 'e', 'en-', 'english-GB-x']) v;
SELECT v AS sources_scope,
       t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, sources_scope => %L)', :'c', :'cb', 's', v))
  FROM unnest(ARRAY['{"dataType":["nope"]}', '{"dataType":"gp-data"}', '{"organizationType":["hospital"]}',
                    '{"organizationType":"castle"}', '[]', '{"foo":1}']) v;
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, storage_id => %L)', :'c', :'cb', 's', ''));
SELECT count(*) AS recorded FROM digime.authorizations;
-- V60 minimal URL; the sandbox is told which preauthorization_code to issue
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","payload_patch":{"preauthorization_code":"PRE"}}'
SELECT t_url(url) AS url, code_verifier ~ '^[A-Za-z0-9_-]{43}$' AS verifier_ok,
       jsonb_typeof(session->'key') AS session_key, jsonb_typeof(session->'expiry') AS session_expiry
  FROM digime.digime_authorize_url(:'c', :'cb', 'state-1');
-- V63 every option, in the SDK's order; sourcesScope double-encoded
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","payload_patch":{"preauthorization_code":"pre-auth-code-1"}}'
\! test/sandbox/ctl POST faults '{"endpoint":"reference","action":"body","patch":{"id":"storage-or-account-ref-1"}}'
SELECT t_url(url) AS url
  FROM digime.digime_authorize_url(:'c', :'cb', 'state-2', service_id => 30, source_type => 'push',
         sample_data => '{"dataSet":"default","autoOnboard":true}', locale => 'nl',
         include_sample_data_only_sources => false, storage_id => 'STORAGE-1', trigger_query => false,
         sources_scope => '{"dataType":["gp-data","images"],"organizationType":"hospital"}');
-- V61, V64-V69
CREATE TEMP TABLE url_cases (n int, args text);
INSERT INTO url_cases VALUES
  (1, 'service_id => 30'),
  (2, 'locale => ''en-GB'''),
  (3, 'sample_data => ''{"dataSet":"my set"}'''),
  (4, 'sample_data => ''{"dataSet":"","autoOnboard":false}'''),
  (5, 'sample_data => ''{"dataSet":"","autoOnboard":true}'''),
  (6, 'include_sample_data_only_sources => true, trigger_query => true'),
  (7, 'sources_scope => ''{"dataType":["gp-data"]}'''),
  (8, 'sources_scope => ''{}'''),
  (9, 'sources_scope => ''{"organizationType":"general-practitioner"}'''),
  -- jsonb orders keys by length, so the caller's order (V70) is not kept
  (10, 'sources_scope => ''{"organizationType":"hospital","dataType":["documents"]}'''),
  (11, 'source_type => NULL');
CREATE FUNCTION t_case_url(args text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE u text;
BEGIN
    PERFORM 1;
    EXECUTE format('SELECT url FROM digime.digime_authorize_url(%L, %L, %L, %s)',
                   'yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'https://app.example/return?x=1', 'case', args) INTO u;
    RETURN t_url(u);
END $$;
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","count":11,"payload_patch":{"preauthorization_code":"PRE"}}'
SELECT n, t_case_url(args) FROM url_cases ORDER BY n;
-- V71 form encoding of values
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","payload_patch":{"preauthorization_code":"a b+c/d=e~f"}}'
\! test/sandbox/ctl POST faults '{"endpoint":"reference","action":"body","patch":{"id":"ref 1/2"}}'
SELECT t_url(url) AS url FROM digime.digime_authorize_url(:'c', :'cb', 'state-3', storage_id => 'S');
-- the pending authorizations: one per state; a newer one with the same state supersedes
SELECT kind, state, status, callback, code_verifier LIKE 'dmenc1:%' AS verifier_sealed,
       expires_at - created_at AS ttl, token_id
  FROM digime.authorizations ORDER BY id;
-- an answer without preauthorization_code (V74) or a reference without id
-- (V73) fails, and nothing is recorded
SELECT count(*) AS before FROM digime.authorizations \gset
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","payload_remove":["preauthorization_code"]}'
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L)', :'c', :'cb', 'state-4'));
\! test/sandbox/ctl POST faults '{"endpoint":"reference","action":"body","remove":["id"]}'
SELECT t_err(format('SELECT * FROM digime.digime_authorize_url(%L, %L, %L, storage_id => %L)', :'c', :'cb', 'state-4', 'S'));
SELECT count(*) - :before AS recorded FROM digime.authorizations;
