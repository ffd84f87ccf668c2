"""058_caches_and_plans: what each process keeps between calls stays correct, and every statement
of the store reads through an index.

- Parsed contract keys (src/keycache.c): a key rotated in the same backend or in another, a
  contract dropped and added again with another key, a key re-stored: the next signature is made
  with the current key, in the backend (oauth/authorize) and in the digime worker (oauth/token).
- Prepared statements (src/store.c): still right after DROP/CREATE EXTENSION and after ALTER
  EXTENSION UPDATE in the same backend, and under a hostile search_path.
- Plans: every statement of src/store.c (read from the source, so the test follows the code), as
  a generic plan on tables of 20,000 rows, uses an index; the few administration statements that
  may scan are listed below with the reason.
"""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402
from dmtest import error, q, q1  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()
sb.reset(everything=True)
DB = "t058"
conn = d.fresh_db(DB)
APP = d.EXAMPLE_APP
C = "t058-contract"
CB = "https://t058.example/cb"
_n = [0]


def state():
    _n[0] += 1
    return "t058-%d" % _n[0]


def last_jwt(endpoint):
    return d.api_records(sb, 0, endpoint)[-1]["jwt"]["raw"]


def signed_by(endpoint, key):
    return d.jws_verify_ps512(last_jwt(endpoint), key)


def register(key):
    """The sandbox learns the contract's new public key (it keeps only the latest)."""
    sb.register(APP, C, d.public_pem(key))


def flow(c):
    """authorize in connection c, then the callback (its exchange is signed by the worker)."""
    url, _, _ = d.authorize(c, C, callback=CB, state=state())
    return q1(c, "SELECT id FROM digime.digime_handle_callback(%s)", (sb.follow(url),))


@tap.test
def contract_key_cache():
    k1, k2, k3, k4 = (d.new_rsa_key() for _ in range(4))
    register(k1)
    q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C, APP, k1))
    other = d.connect(DB)
    tap.ok(flow(conn) and signed_by("oauth/authorize", k1) and signed_by("oauth/token", k1),
           "signed with the key as added (backend and worker)")
    # rotated in the same backend
    register(k2)
    q(conn, "SELECT * FROM digime.digime_rotate_contract_key(%s, %s)", (C, k2))
    tap.ok(flow(conn) and signed_by("oauth/authorize", k2) and not signed_by("oauth/authorize", k1),
           "rotated in the same backend: the next authorize signs with the new key")
    tap.ok(signed_by("oauth/token", k2), "... and so does the worker's exchange")
    # rotated in another backend: this backend's cached key must not be used
    register(k3)
    q(other, "SELECT * FROM digime.digime_rotate_contract_key(%s, %s)", (C, k3))
    tap.ok(flow(conn) and signed_by("oauth/authorize", k3), "rotated in another backend: the new key")
    tap.ok(signed_by("oauth/token", k3), "... in the worker too")
    # dropped and added again with another key, in another backend
    d.discard_all_tokens(other, "contract_id = '%s'" % C)
    q(other, "SELECT digime.digime_drop_contract(%s, cascade => true)", (C,))
    tap.eq(error(conn, "SELECT * FROM digime.digime_authorize_url(%s, %s, 'gone')", (C, CB))[0], "42704",
           "a dropped contract is refused, cached key or not")
    register(k4)
    q(other, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C, APP, k4))
    tap.ok(flow(conn) and signed_by("oauth/authorize", k4) and signed_by("oauth/token", k4),
           "dropped and added again with another key: the new key")
    # the same key stored again (new ciphertext): parsed afresh, still right
    q(other, "SELECT * FROM digime.digime_rotate_contract_key(%s, %s)", (C, k4))
    tap.ok(flow(conn) and signed_by("oauth/authorize", k4), "the same key stored again: still signs")
    other.close()


@tap.test
def statements_after_extension_changes():
    c = d.connect(DB)
    key = d.new_rsa_key()
    register(key)
    q(c, "SELECT * FROM digime.digime_rotate_contract_key(%s, %s)", (C, key))
    tap.ok(flow(c) is not None, "the session has used its prepared statements")
    # DROP and CREATE EXTENSION in the same session
    d.discard_all_tokens(c)
    q(c, "DROP EXTENSION digime CASCADE")
    q(c, "SET client_min_messages = error; CREATE EXTENSION digime; RESET client_min_messages")
    q(c, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C, APP, key))
    tid = flow(c)
    tap.ok(tid is not None and q1(c, "SELECT count(*) FROM digime.user_tokens") == 1,
           "after DROP/CREATE EXTENSION in the same session: a flow works on the new tables")
    # back to 1.0, then ALTER EXTENSION UPDATE, in the same session
    d.discard_all_tokens(c)
    q(c, "DROP EXTENSION digime CASCADE")
    q(c, "SET client_min_messages = error; CREATE EXTENSION digime VERSION '1.0'; RESET client_min_messages")
    err = error(c, "SELECT * FROM digime.digime_authorize_url(%s, %s, 'v10')", (C, CB))
    tap.eq(err and (err[0], err[3]), ("55000", "Run ALTER EXTENSION digime UPDATE."),
           "on 1.0 the 1.1 library refuses with 55000 and says what to do")
    q(c, "ALTER EXTENSION digime UPDATE")
    tap.eq(q1(c, "SELECT extversion FROM pg_extension WHERE extname = 'digime'"), "1.1", "updated to 1.1")
    q(c, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C, APP, key))
    tap.ok(flow(c) is not None, "after ALTER EXTENSION UPDATE in the same session: a flow works")
    # a hostile search_path with look-alike objects
    q(c, "CREATE SCHEMA IF NOT EXISTS evil")
    q(c, "CREATE TABLE IF NOT EXISTS evil.user_tokens (id bigint)")
    q(c, "CREATE TABLE IF NOT EXISTS evil.authorizations (id bigint)")
    q(c, "CREATE OR REPLACE FUNCTION evil.nextval(regclass) RETURNS bigint LANGUAGE sql AS 'SELECT -1::bigint'")
    q(c, "SET search_path = evil, public")
    tid = flow(c)
    q(c, "RESET search_path")
    tap.ok(tid is not None and tid > 0, "under a hostile search_path the flow still works")
    tap.eq(q1(c, "SELECT count(*) FROM evil.user_tokens") + q1(c, "SELECT count(*) FROM evil.authorizations"),
           0, "nothing went to the look-alike tables")
    c.close()


# --------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------
TYPES = {"TEXTOID": "text", "INT8OID": "bigint", "OIDOID": "oid", "BOOLOID": "boolean",
         "FLOAT8OID": "double precision", "TIMESTAMPTZOID": "timestamptz", "INT4OID": "integer",
         "JSONBOID": "jsonb", "INT8ARRAYOID": "bigint[]"}
# administration statements that may read the whole table, and why that is fine
MAY_SCAN = {
    "st_contract_tokens": "digime_drop_contract counts a contract's tokens (administration, rare)",
    "st_contract_delete_tokens": "digime_drop_contract(cascade) deletes them",
    "st_contract_grantees": "contract_grants is tiny (one row per grant)",
    "st_role_has_grants": "contract_grants is tiny",
}


def store_statements():
    """(name, sql, [types]) of every STMT in src/store.c."""
    src = open(os.path.join(d.ROOT, "src", "store.c")).read()
    out = []
    for m in re.finditer(r'STMT0?\((\w+),\s*((?:"(?:[^"\\]|\\.)*"\s*)+)((?:,\s*\w+\s*)*)\);', src):
        name, strings, types = m.group(1), m.group(2), m.group(3)
        sql = "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"', strings))
        out.append((name, sql, [TYPES[t.strip()] for t in types.split(",") if t.strip()]))
    return out


@tap.test
def every_statement_uses_an_index():
    q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", ("t058-big", APP, d.new_rsa_key()))
    q(conn, """
        INSERT INTO digime.user_tokens (contract_id, owner_role, access_token, access_token_expires_at,
            refresh_token, refresh_token_expires_at, status, updated_at)
        SELECT 't058-big', 'postgres', 'a' || g, now() + g * interval '1 minute', 'r' || g,
               now() + interval '7 days', CASE WHEN g % 10 = 0 THEN 'revoked' ELSE 'active' END,
               now() - g * interval '1 minute'
          FROM generate_series(1, 20000) g;
        INSERT INTO digime.authorizations (kind, contract_id, owner_role, state, code_verifier, session,
            callback, status, expires_at, finished_at)
        SELECT 'authorize', 't058-big', 'postgres', 's' || g, 'v', '{}', 'https://x/',
               (ARRAY['pending', 'completed', 'expired'])[1 + g % 3], now() + g * interval '1 second',
               CASE WHEN g % 3 <> 0 THEN now() - g * interval '1 second' END
          FROM generate_series(1, 20000) g;
        INSERT INTO digime.callback_inbox (callback_url)
        SELECT 'https://x/?success=true&state=s&code=c' FROM generate_series(1, 2000);
        UPDATE digime.callback_inbox SET status = 'done', finished_at = now() WHERE id % 2 = 0;
        INSERT INTO digime.audit_log (role, action, outcome, at)
        SELECT 'postgres', 'authorize', 'ok', now() - g * interval '1 minute' FROM generate_series(1, 20000) g;
        ANALYZE digime.user_tokens; ANALYZE digime.authorizations; ANALYZE digime.callback_inbox;
        ANALYZE digime.audit_log; ANALYZE digime.contracts; ANALYZE digime.contract_grants;""")
    stmts = store_statements()
    tap.ok(len(stmts) >= 35, "read %d statements from src/store.c" % len(stmts))
    q(conn, "SET plan_cache_mode = force_generic_plan")
    for name, sql, types in stmts:
        q(conn, "PREPARE p%s AS %s" % ("(%s)" % ", ".join(types) if types else "", sql))
        plan = "\n".join(r[0] for r in q(conn, "EXPLAIN (COSTS OFF) EXECUTE p%s" % (
            "(%s)" % ", ".join(["NULL"] * len(types)) if types else "")))
        q(conn, "DEALLOCATE p")
        scans = re.findall(r"Seq Scan on (\w+)", plan)
        big = [s for s in scans if s in ("user_tokens", "authorizations", "callback_inbox", "audit_log")]
        if name in MAY_SCAN:
            continue
        tap.ok(not big, "%s: generic plan reads no large table whole" % name, plan)
    q(conn, "RESET plan_cache_mode")
    q(conn, "SELECT digime.digime_drop_contract('t058-big', cascade => true)")   # synthetic rows


tap.run()
