--
-- setup: contracts from the fixtures, roles, and a helper that shows an
-- error's SQLSTATE, message, DETAIL and HINT (URLs of the sandbox replaced
-- by {base} and {onboard}).  pg_regress created the extension.
--
CREATE FUNCTION t_err(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text; msg text; det text; hnt text; r text;
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    r := st || ': ' || msg;
    IF det <> '' THEN r := r || E'\nDETAIL: ' || det; END IF;
    IF hnt <> '' THEN r := r || E'\nHINT: ' || hnt; END IF;
    r := replace(r, current_setting('digime.base_url'), '{base}');
    r := replace(r, current_setting('digime.onboard_url'), '{onboard}');
    -- what varies between runs: the sandbox's port, error references, timings
    r := regexp_replace(r, 'https://127\.0\.0\.1:[0-9]+/', 'https://sandbox/', 'g');
    r := regexp_replace(r, 'reference: [A-Za-z0-9]{32}', 'reference: R', 'g');
    RETURN regexp_replace(r, 'after [0-9]+ ms', 'after N ms', 'g');
END
$$;
-- the onboarding URL with the configured prefix replaced by {onboard}
CREATE FUNCTION t_url(u text) RETURNS text LANGUAGE sql AS $$
    SELECT replace(u, current_setting('digime.onboard_url'), '{onboard}')
$$;
-- Nothing of digime is usable by PUBLIC.
SELECT count(*) AS public_privileges
  FROM information_schema.role_routine_grants
 WHERE routine_schema = 'digime' AND grantee = 'PUBLIC';
SELECT has_schema_privilege('public', 'digime', 'USAGE') AS public_schema_usage;
-- digi.me's published sample contract, as digi.me hands out keys (PKCS#1)
\set example_key `cat test/fixtures/digime-example/read-data.key`
\set second_key `cat test/fixtures/keys/second.pem`
SELECT contract_id, application_id, key_bits, key_fingerprint, key_encrypted, rotated_at, grantees
  FROM digime.digime_add_contract('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs',
                                  'qgEUV8iJENRiUkuYF5lLpdsOv7Hp0biy', :'example_key');
-- a second contract of the same application, PKCS#8 key
SELECT contract_id, key_bits, key_fingerprint
  FROM digime.digime_add_contract('second-contract', 'qgEUV8iJENRiUkuYF5lLpdsOv7Hp0biy', :'second_key');
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_app_a, regress_app_b, regress_none;  -- left by an earlier run
RESET client_min_messages;
CREATE ROLE regress_app_a;
CREATE ROLE regress_app_b;
CREATE ROLE regress_none;
SELECT digime.digime_grant_contract('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs', 'regress_app_a');
SELECT digime.digime_grant_contract('second-contract', 'regress_app_b');
