"""040_security: who may do what.  Roles x functions, tables and views; row-level
security; contract grants (also through membership); revoke and drop; the end_user
recipe; GUC privileges; a hostile search_path; COPY and pg_dump.

Roles: postgres (DBA, superuser), t040_app_a (contract 1), t040_app_b (contract 2),
t040_none (nothing), t040_group (contract 1, NOLOGIN) with member t040_member,
"T040_Mixed" (contract 2) next to a lower-case t040_mixed (contract 2).
"""
import json
import os
import subprocess
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402

tap = d.Tap()
DB = "t040"
C1, C2 = d.EXAMPLE_CONTRACT, d.SECOND_CONTRACT
FIX = os.path.join(d.ROOT, "test", "fixtures")
KEY1 = open(os.path.join(FIX, "digime-example", "read-data.key")).read()
KEY2 = open(os.path.join(FIX, "keys", "second.pem")).read()
KEY_LINES = [l for l in (KEY1 + KEY2).splitlines() if l and not l.startswith("-----")]
FP1 = "bfb0b64e0468208c23b123798f16eb15ec8d5129887f990500d25704d5358f7a"
FP2 = "3c6e5c67cb099122e98ba35e6b6faf1d5ebb70aca4bf6bcbe3e8faf8d063165c"

A, B, NONE, GROUP, MEMBER, MIXED, LOWER = ("t040_app_a", "t040_app_b", "t040_none", "t040_group",
                                            "t040_member", "T040_Mixed", "t040_mixed")
DENIED = "42501"

sb = d.Sandbox()
admin = None
conns = {}          # role -> connection
tokens = {}         # role -> [token ids]
verifiers = []      # every code_verifier this file received
contract_of = {A: C1, MEMBER: C1, B: C2, MIXED: C2, LOWER: C2}

FUNCS = ["digime_add_contract(text,text,text)", "digime_rotate_contract_key(text,text)",
         "digime_drop_contract(text,boolean)", "digime_grant_contract(text,regrole)",
         "digime_revoke_contract(text,regrole)", "digime_revoke_token(bigint)",
         "digime_reencrypt_secrets()", "digime_encryption_key_id()",
         "digime_authorize_url(text,text,text,integer,bigint,jsonb,text,jsonb,text,boolean,text,boolean,jsonb)",
         "digime_exchange_code(text,text,text)", "digime_handle_callback(text)",
         "digime_refresh_token(bigint)", "digime_reauthorize_url(bigint,text,text,text,jsonb,boolean)",
         "digime_user_access_token(bigint)", "digime_import_token(text,jsonb)",
         "digime_submit_callback(text)", "digime_valid_access_token(bigint,interval)",
         "digime_process_inbox(integer,integer,integer)",
         "digime_refresh_expiring(interval,integer,integer,integer,integer,integer,integer)",
         "digime_purge(bigint,bigint)", "_role_privileges(regrole,boolean)", "_callback_inbox_insert()"]


def rtext(role):
    """A role as regrole text (quoted when needed)."""
    return '"%s"' % role if role != role.lower() else role


def authorize(conn, contract, state, **kw):
    url, verifier, session = d.authorize(conn, contract, state=state, **kw)
    verifiers.append(verifier)
    return url, verifier


def full_auth(conn, contract, state):
    url, _ = authorize(conn, contract, state)
    row = d.q(conn, "SELECT id, access_token, refresh_token FROM digime.digime_handle_callback(%s)",
              (sb.follow(url),))[0]
    tap.ok(row[1] is None and row[2] is None, "handle_callback's row hides the token columns")
    return row[0]


def imported(conn, contract):
    at, rt = "at-imp-" + os.urandom(12).hex(), "rt-imp-" + os.urandom(12).hex()
    d.record_secret(at)
    d.record_secret(rt)
    doc = {"accessToken": {"value": at, "expiry": 4102444800},
           "refreshToken": {"value": rt, "expiry": 4102444800},
           "user": {"id": "imported-user"}, "consentid": "imported-consent"}
    row = d.q(conn, "SELECT id, access_token, refresh_token FROM digime.digime_import_token(%s, %s)",
              (contract, json.dumps(doc)))[0]
    tap.ok(row[1] is None and row[2] is None, "import_token's row hides the token columns")
    return row[0]


def all_tokens():
    """{id: owner_role text} of the tokens in use (not revoked), as the DBA sees it."""
    return dict(d.q(admin, "SELECT id, owner_role::text FROM digime.user_tokens WHERE status <> 'revoked'"))


def sandbox_pair(access_token):
    return next((t for t in sb.tokens() if t["access_token"] == access_token), None)


def own_ids(role):
    return sorted(i for i, o in all_tokens().items() if o == rtext(role))


def denied(conn, who, what, sql, args=None):
    e = d.error(conn, sql, args)
    return tap.ok(e is not None and e[0] == DENIED, "%s: %s -> 42501" % (who, what),
                  "got: %r" % (e,))


# --------------------------------------------------------------------------
@tap.test
def setup():
    global admin
    sb.reset(everything=True)   # no fault or config left by an earlier file
    admin = d.fresh_db(DB)
    for r in (A, B, NONE, MEMBER, MIXED, LOWER):
        d.ensure_role(r, "LOGIN")
    d.ensure_role(GROUP, "NOLOGIN")
    d.q(admin, "GRANT t040_group TO t040_member")
    d.q(admin, "ALTER ROLE t040_member INHERIT")
    d.q(admin, "SELECT digime.digime_add_contract(%s, %s, %s)", (C1, d.EXAMPLE_APP, KEY1))
    d.q(admin, "SELECT digime.digime_add_contract(%s, %s, %s)", (C2, d.EXAMPLE_APP, KEY2))
    for role, c in ((A, C1), (GROUP, C1), (B, C2), (MIXED, C2), (LOWER, C2)):
        d.q(admin, "SELECT digime.digime_grant_contract(%s, %s::regrole)", (c, rtext(role)))
    for r in (A, B, NONE, MEMBER, MIXED, LOWER):
        conns[r] = d.connect_as(DB, r)
    for r in (A, B, MEMBER, MIXED):
        tokens[r] = [full_auth(conns[r], contract_of[r], "setup-" + r)]
    tokens[LOWER] = [imported(conns[LOWER], C2)]
    tokens[A].append(imported(conns[A], C1))
    # pending authorizations (their code_verifier is stored)
    for r in (A, B):
        authorize(conns[r], contract_of[r], "pending-" + r)
    owners = all_tokens()
    tap.eq(sorted(owners.values()),
           sorted([A, A, B, MEMBER, rtext(MIXED), LOWER]), "token rows are owned by their callers")


@tap.test
def nothing_for_public():
    # no ACL entry of any object of the extension names PUBLIC (grantee 0)
    rows = d.q(admin, """
        SELECT o.what FROM (
          SELECT 'schema' AS what, nspacl AS acl FROM pg_namespace WHERE nspname = 'digime'
          UNION ALL SELECT 'rel ' || relname, relacl FROM pg_class
                     WHERE relnamespace = 'digime'::regnamespace AND relkind <> 'i'
          UNION ALL SELECT 'func ' || proname, proacl FROM pg_proc
                     WHERE pronamespace = 'digime'::regnamespace) o
        WHERE o.acl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(o.acl) x WHERE x.grantee = 0)""")
    tap.eq(rows, [], "no digime object has a default or PUBLIC ACL")
    cnt = d.q1(admin, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'digime'::regnamespace")
    tap.eq(cnt, len(FUNCS), "all %d functions are in the matrix" % len(FUNCS))
    for f in FUNCS:
        tap.eq(d.q1(admin, "SELECT has_function_privilege('t040_none', %s, 'EXECUTE')",
                    ("digime." + f,)), False, "t040_none has no EXECUTE on " + f.split("(")[0])
    tap.eq(d.q1(admin, "SELECT has_schema_privilege('t040_none', 'digime', 'USAGE')"), False,
           "t040_none has no USAGE on schema digime")
    rels = d.q(admin, "SELECT relname FROM pg_class WHERE relnamespace = 'digime'::regnamespace "
                      "AND relkind IN ('r', 'v', 'S') AND "
                      "(has_table_privilege('t040_none', oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER') "
                      " OR has_any_column_privilege('t040_none', oid, 'SELECT,INSERT,UPDATE,REFERENCES'))")
    tap.eq(rels, [], "t040_none has no privilege on any digime table, view or sequence")
    # the secret columns are granted to nobody but the owner
    for table, col in (("contracts", "private_key"), ("user_tokens", "access_token"),
                       ("user_tokens", "refresh_token"), ("authorizations", "code_verifier")):
        for r in (A, B, MEMBER, MIXED):
            tap.eq(d.q1(admin, "SELECT has_column_privilege(%s, %s, %s, 'SELECT')",
                        (r, "digime." + table, col)), False,
                   "%s cannot select digime.%s.%s" % (r, table, col))


@tap.test
def contracts_info():
    want = {C1: (d.EXAMPLE_APP, 2048, FP1, True, sorted([A, GROUP])),
            C2: (d.EXAMPLE_APP, 2048, FP2, True, sorted([rtext(MIXED), B, LOWER]))}
    sql = ("SELECT contract_id, application_id, key_bits, key_fingerprint, key_encrypted, "
           "grantees::text[] FROM digime.contracts_info ORDER BY 1")
    cols = [c[0] for c in d.q(admin, "SELECT attname FROM pg_attribute WHERE attrelid = "
                                     "'digime.contracts_info'::regclass AND attnum > 0 ORDER BY attnum")]
    tap.eq(cols, ["contract_id", "application_id", "key_bits", "key_fingerprint", "key_encrypted",
                  "created_at", "rotated_at", "grantees"], "contracts_info columns: no key")
    for who, conn, visible in (("DBA", admin, [C1, C2]), (A, conns[A], [C1]), (B, conns[B], [C2]),
                               (MEMBER, conns[MEMBER], [C1]), (MIXED, conns[MIXED], [C2])):
        rows = d.q(conn, sql)
        tap.eq([r[0] for r in rows], sorted(visible), "%s sees contracts_info rows of its grants" % who)
        for r in rows:
            tap.eq((r[1], r[2], r[3], r[4], sorted(r[5])), want[r[0]],
                   "%s: contracts_info of %s: app, 2048 bits, SPKI SHA-256, encrypted, grantees" % (who, r[0]))
        text = repr(d.q(conn, "SELECT * FROM digime.contracts_info"))
        tap.ok(not any(l in text for l in KEY_LINES), "%s: no key material in contracts_info" % who)
    denied(conns[NONE], NONE, "SELECT contracts_info", "SELECT * FROM digime.contracts_info")
    # add/rotate return contracts_info rows, never the key
    row = d.q(admin, "SELECT * FROM digime.digime_rotate_contract_key(%s, %s)", (C2, KEY2))[0]
    tap.ok(len(row) == 8 and row[3] == FP2 and row[6] is not None,
           "rotate_contract_key returns the contracts_info row (fingerprint, rotated_at)")


def parse_code(location):
    qs = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    d.record_secret(qs.get("code"))
    return qs["code"], qs["state"]


@tap.test
def function_matrix():
    others = {r: [t for o, ts in tokens.items() if o != r for t in ts] for r in tokens}
    cb = "https://app.example/return"
    for r in (A, B, MEMBER, MIXED):
        conn, own_c = conns[r], contract_of[r]
        other_c = C2 if own_c == C1 else C1
        own_t = tokens[r][0]
        # allowed, with its own contract and token
        url, verifier = authorize(conn, own_c, "m-" + r)
        tap.ok(url.startswith(os.environ["DM_SANDBOX_URL"] + "/apps/saas/authorize?code="),
               "%s: authorize_url with its contract" % r)
        code, _ = parse_code(sb.follow(url))
        row = d.q(conn, "SELECT owner_role::text, access_token FROM digime.digime_exchange_code(%s, %s, %s)",
                  (own_c, code, verifier))[0]
        tap.eq(row, (rtext(r), None), "%s: exchange_code stores a token it owns (secret columns NULL)" % r)
        before = d.token_json(conn, own_t)
        pair = sandbox_pair(before["accessToken"]["value"])
        tap.ok(pair is not None and pair["refresh_token"] == before["refreshToken"]["value"]
               and pair["user_id"] == before["user"]["id"] and pair["state"] == "valid",
               "%s: user_access_token returns its token as the sandbox issued it" % r)
        d.q(conn, "SELECT digime.digime_refresh_token(%s)", (own_t,))
        after = d.token_json(conn, own_t)
        tap.ok(after["accessToken"]["value"] != before["accessToken"]["value"] and
               sandbox_pair(after["accessToken"]["value"])["state"] == "valid",
               "%s: refresh_token of its token" % r)
        tap.ok(d.q1(conn, "SELECT url FROM digime.digime_reauthorize_url(%s, %s)", (own_t, cb))
               .startswith(os.environ["DM_SANDBOX_URL"] + "/apps/saas/user-reauth?code="),
               "%s: reauthorize_url of its token" % r)
        tap.ok(d.q1(conn, "SELECT url FROM digime.digime_authorize_url(%s, %s, %s, user_token_id => %s)",
                    (own_c, cb, "m2-" + r, own_t)) is not None,
               "%s: authorize_url with its own user_token_id" % r)
        imp = imported(conn, own_c)
        tap.ok(imp in own_ids(r), "%s: import_token with its contract" % r)
        tokens[r].append(imp)

        # denied: the other contract, other roles' tokens, the admin functions
        seq = sb.last_seq()
        snapshot = {t: d.token_json(admin, t) for t in others[r][:3]}
        denied(conn, r, "authorize_url(other contract)",
               "SELECT * FROM digime.digime_authorize_url(%s, %s, 'x')", (other_c, cb))
        denied(conn, r, "exchange_code(other contract)",
               "SELECT * FROM digime.digime_exchange_code(%s, 'not-a-code', 'not-a-verifier')", (other_c,))
        denied(conn, r, "import_token(other contract)",
               "SELECT * FROM digime.digime_import_token(%s, %s)",
               (other_c, '{"accessToken":{"value":"x","expiry":4102444800},'
                         '"refreshToken":{"value":"y","expiry":4102444800}}'))
        for t in others[r]:
            who = "%s: token %d of %s" % (r, t, all_tokens()[t])
            denied(conn, who, "user_access_token", "SELECT digime.digime_user_access_token(%s)", (t,))
            denied(conn, who, "refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)", (t,))
            denied(conn, who, "reauthorize_url", "SELECT * FROM digime.digime_reauthorize_url(%s, %s)", (t, cb))
            denied(conn, who, "authorize_url(user_token_id)",
                   "SELECT * FROM digime.digime_authorize_url(%s, %s, 'x', user_token_id => %s)", (own_c, cb, t))
        for sql, args in (("SELECT digime.digime_add_contract('t040-x', 'app', 'not a key')", None),
                          ("SELECT digime.digime_rotate_contract_key(%s, 'not a key')", (own_c,)),
                          ("SELECT digime.digime_drop_contract('t040-nonexistent', true)", None),
                          ("SELECT digime.digime_grant_contract(%s, current_user::regrole)", (other_c,)),
                          ("SELECT digime.digime_revoke_contract(%s, 't040_app_b'::regrole)", (C2,)),
                          ("SELECT digime.digime_revoke_token(%s)", (others[r][0],)),
                          ("SELECT digime.digime_reencrypt_secrets()", None),
                          ("SELECT digime.digime_encryption_key_id()", None)):
            denied(conn, r, sql.split("(")[0].split(".")[-1], sql, args)
        tap.eq(sb.last_seq(), seq, "%s: no denied call reached the API" % r)
        tap.eq({t: d.token_json(admin, t) for t in snapshot}, snapshot,
               "%s: other roles' tokens unchanged" % r)

    # the ungranted role: every function
    conn = conns[NONE]
    t = tokens[A][0]
    for sql, args in (("SELECT * FROM digime.digime_authorize_url(%s, %s, 'x')", (C1, cb)),
                      ("SELECT * FROM digime.digime_exchange_code(%s, 'c', 'v')", (C1,)),
                      ("SELECT * FROM digime.digime_handle_callback('https://app.example/?success=true&state=x&code=c')", None),
                      ("SELECT * FROM digime.digime_refresh_token(%s)", (t,)),
                      ("SELECT * FROM digime.digime_reauthorize_url(%s, %s)", (t, cb)),
                      ("SELECT digime.digime_user_access_token(%s)", (t,)),
                      ("SELECT * FROM digime.digime_import_token(%s, '{}')", (C1,)),
                      ("SELECT digime.digime_add_contract('t040-x', 'app', 'not a key')", None),
                      ("SELECT digime.digime_rotate_contract_key(%s, 'not a key')", (C1,)),
                      ("SELECT digime.digime_drop_contract('t040-nonexistent')", None),
                      ("SELECT digime.digime_grant_contract(%s, current_user::regrole)", (C1,)),
                      ("SELECT digime.digime_revoke_contract(%s, 't040_app_a'::regrole)", (C1,)),
                      ("SELECT digime.digime_revoke_token(%s)", (t,)),
                      ("SELECT digime.digime_reencrypt_secrets()", None),
                      ("SELECT digime.digime_encryption_key_id()", None)):
        denied(conn, NONE, sql.split("(")[0].split(".")[-1], sql, args)
    # PostgreSQL's own refusal gets a HINT saying what to do
    for sql in ("SELECT * FROM digime.digime_authorize_url('c', 'https://a.example/', 's')",
                "SELECT * FROM digime.user_tokens_info", "CALL digime.digime_refresh_expiring()"):
        e = d.error(conn, sql)
        tap.eq(e and (e[0], e[3]), (DENIED, "An administrator lets a role use digime with "
                                            "digime.digime_grant_contract(contract_id, role)."),
               "%s: %s -> 42501 with a HINT naming digime_grant_contract" % (NONE, sql[:40]))

    # the DBA: every flow function, with any role's token
    url, verifier = authorize(admin, C2, "m-dba")
    code, _ = parse_code(sb.follow(url))
    tap.eq(d.q1(admin, "SELECT owner_role::text FROM digime.digime_exchange_code(%s, %s, %s)",
                (C2, code, verifier)), "postgres", "DBA: exchange_code")
    ta = tokens[A][0]
    tap.ok(sandbox_pair(d.token_json(admin, ta)["accessToken"]["value"]) is not None,
           "DBA: user_access_token of a token of t040_app_a")
    tap.eq(d.q1(admin, "SELECT owner_role::text FROM digime.digime_refresh_token(%s)", (ta,)), A,
           "DBA: refresh_token of t040_app_a's token keeps its owner")
    tap.ok(d.q1(admin, "SELECT url FROM digime.digime_reauthorize_url(%s, %s)", (ta, cb)) is not None,
           "DBA: reauthorize_url of t040_app_a's token")
    tokens["postgres"] = [imported(admin, C1)]
    tap.ok(tokens["postgres"][0] in all_tokens(), "DBA: import_token")
    key = d.read_key_file(os.path.join(d.WORK, "keys", "digime.key"))
    tap.eq(d.q1(admin, "SELECT digime.digime_encryption_key_id()"), d.key_id(key),
           "DBA: encryption_key_id is the key file's id")
    tap.eq(d.q1(admin, "SELECT digime.digime_reencrypt_secrets()"), 0,
           "DBA: reencrypt_secrets finds nothing to do")


def table_checks(role):
    """(label, sql, expectation): '42501', or 'own' (rows' first column = the role's ids)."""
    c = contract_of.get(role, C1)
    return [
        ("contracts SELECT *", "SELECT * FROM digime.contracts", DENIED),
        ("contracts SELECT contract_id", "SELECT contract_id FROM digime.contracts", DENIED),
        ("contracts SELECT private_key", "SELECT private_key FROM digime.contracts", DENIED),
        ("contracts UPDATE", "UPDATE digime.contracts SET application_id = 'x'", DENIED),
        ("contracts DELETE", "DELETE FROM digime.contracts", DENIED),
        ("contracts INSERT", "INSERT INTO digime.contracts (contract_id, application_id, private_key, "
                             "key_bits, key_fingerprint) VALUES ('t040-i', 'a', 'k', 2048, 'f')", DENIED),
        ("contracts COPY TO", "COPY digime.contracts TO STDOUT", DENIED),
        ("contracts COPY (SELECT) TO", "COPY (SELECT private_key FROM digime.contracts) TO STDOUT", DENIED),
        ("contracts COPY FROM", "COPY digime.contracts FROM STDIN", DENIED),
        ("contract_grants SELECT", "SELECT * FROM digime.contract_grants", DENIED),
        ("contract_grants INSERT (self-grant)",
         "INSERT INTO digime.contract_grants (contract_id, grantee) VALUES ('%s', current_user::regrole)"
         % (C2 if c == C1 else C1), DENIED),
        ("contract_grants DELETE", "DELETE FROM digime.contract_grants", DENIED),
        ("contract_grants UPDATE", "UPDATE digime.contract_grants SET granted_at = NULL", DENIED),
        ("contract_grants COPY TO", "COPY digime.contract_grants TO STDOUT", DENIED),
        ("user_tokens SELECT *", "SELECT * FROM digime.user_tokens", DENIED),
        ("user_tokens SELECT access_token", "SELECT access_token FROM digime.user_tokens", DENIED),
        ("user_tokens SELECT refresh_token", "SELECT refresh_token FROM digime.user_tokens", DENIED),
        ("user_tokens WHERE on access_token",
         "SELECT id FROM digime.user_tokens WHERE access_token LIKE 'dmenc1:%'", DENIED),
        ("user_tokens SELECT non-secret columns",
         "SELECT id, owner_role, contract_id, end_user, user_id, consent_id, state FROM digime.user_tokens",
         "own"),
        ("user_tokens UPDATE state", "UPDATE digime.user_tokens SET state = 'x'", DENIED),
        ("user_tokens UPDATE owner_role",
         "UPDATE digime.user_tokens SET owner_role = current_user::regrole", DENIED),
        ("user_tokens INSERT", "INSERT INTO digime.user_tokens (contract_id, owner_role, access_token, "
                               "access_token_expires_at, refresh_token, refresh_token_expires_at) "
                               "VALUES ('%s', current_user::regrole, 'a', now(), 'r', now())" % c, DENIED),
        ("user_tokens COPY TO", "COPY digime.user_tokens TO STDOUT", DENIED),
        ("user_tokens COPY (access_token) TO", "COPY digime.user_tokens (id, access_token) TO STDOUT", DENIED),
        ("user_tokens COPY FROM", "COPY digime.user_tokens FROM STDIN", DENIED),
        ("user_tokens TRUNCATE", "TRUNCATE digime.user_tokens", DENIED),
        ("user_tokens_id_seq nextval", "SELECT nextval('digime.user_tokens_id_seq')", DENIED),
        ("user_tokens_id_seq SELECT", "SELECT last_value FROM digime.user_tokens_id_seq", DENIED),
        ("authorizations SELECT *", "SELECT * FROM digime.authorizations", DENIED),
        ("authorizations SELECT code_verifier", "SELECT code_verifier FROM digime.authorizations", DENIED),
        ("authorizations UPDATE", "UPDATE digime.authorizations SET status = 'pending'", DENIED),
        ("authorizations DELETE", "DELETE FROM digime.authorizations", DENIED),
        ("authorizations INSERT", "INSERT INTO digime.authorizations (kind, contract_id, owner_role, state, "
                                  "session, callback, expires_at) VALUES ('authorize', '%s', "
                                  "current_user::regrole, 's', '{}', 'https://x/', now())" % c, DENIED),
        ("authorizations COPY TO", "COPY digime.authorizations TO STDOUT", DENIED),
        ("authorizations COPY FROM", "COPY digime.authorizations FROM STDIN", DENIED),
        ("authorizations identity nextval",
         "SELECT nextval(pg_get_serial_sequence('digime.authorizations', 'id'))", DENIED),
        ("user_tokens_info SELECT *", "SELECT * FROM digime.user_tokens_info", "own"),
        ("user_tokens_info UPDATE", "UPDATE digime.user_tokens_info SET state = 'x'", DENIED),
    ]


@tap.test
def table_matrix():
    owners = all_tokens()
    auth_owners = dict(d.q(admin, "SELECT id, owner_role::text FROM digime.authorizations"))
    for r in (A, B, MEMBER, MIXED, NONE):
        conn = conns[r]
        mine = sorted(i for i, o in owners.items() if o == rtext(r))
        for label, sql, want in table_checks(r):
            if want == DENIED or r == NONE:
                if sql.startswith("COPY") and "FROM STDIN" in sql:
                    try:
                        d.copy_in(conn, sql, "")
                        e = None
                    except d.psycopg2.Error as ex:
                        e = ex.pgcode
                    tap.eq(e, DENIED, "%s: %s -> 42501" % (r, label))
                elif sql.startswith("COPY"):
                    try:
                        d.copy_out(conn, sql)
                        e = None
                    except d.psycopg2.Error as ex:
                        e = ex.pgcode
                    tap.eq(e, DENIED, "%s: %s -> 42501" % (r, label))
                else:
                    denied(conn, r, label, sql)
            else:
                rows = d.q(conn, sql)
                tap.eq(sorted(x[0] for x in rows), mine, "%s: %s: only its own rows" % (r, label))
        if r == NONE:
            denied(conn, r, "user_tokens SELECT id", "SELECT id FROM digime.user_tokens")
            continue
        # COPY of the granted columns applies row-level security
        out = d.copy_out(conn, "COPY digime.user_tokens (id, owner_role) TO STDOUT")
        tap.eq(sorted(int(l.split("\t")[0]) for l in out.splitlines()), mine,
               "%s: COPY user_tokens (id, owner_role) TO: only its own rows" % r)
        out = d.copy_out(conn, "COPY digime.authorizations (id, owner_role, state) TO STDOUT")
        tap.eq(sorted(int(l.split("\t")[0]) for l in out.splitlines()),
               sorted(i for i, o in auth_owners.items() if o == rtext(r)),
               "%s: COPY authorizations (non-secret columns) TO: only its own rows" % r)
        tap.eq(sorted(x[0] for x in d.q(conn, "SELECT id FROM digime.authorizations")),
               sorted(i for i, o in auth_owners.items() if o == rtext(r)),
               "%s: SELECT id FROM authorizations: only its own rows" % r)
        # DELETE is granted, but reaches only its own rows
        theirs = [i for i, o in owners.items() if o != rtext(r)]
        tap.eq(d.q(conn, "DELETE FROM digime.user_tokens WHERE id = ANY(%s) RETURNING id", (theirs,)), [],
               "%s: DELETE of other roles' tokens deletes nothing" % r)
        tap.eq(d.q(conn, "SELECT count(*) FROM pg_stats WHERE schemaname = 'digime'"), [(0,)],
               "%s: pg_stats shows nothing of digime's tables" % r)
    tap.eq(all_tokens(), owners, "no token row was deleted or changed owner")
    # a role deletes its own token row
    victim = tokens[MEMBER].pop()
    d.discard_all_tokens(admin, "id = %d" % victim)
    tap.eq(d.q(conns[MEMBER], "DELETE FROM digime.user_tokens WHERE id = %s RETURNING id", (victim,)),
           [(victim,)], "t040_member deletes its own token row")
    # the DBA sees everything
    tap.eq(sorted(x[0] for x in d.q(admin, "SELECT id FROM digime.user_tokens_info")),
           sorted(all_tokens()), "DBA sees every row of user_tokens_info")
    tap.eq(d.q1(admin, "SELECT count(*) FROM digime.contracts"), 2, "DBA reads digime.contracts")


@tap.test
def leaky_functions():
    # a cheap, NOTICE-raising function in a WHERE clause must not see rows RLS/the view hide
    d.q(admin, "DROP SCHEMA IF EXISTS t040_leak CASCADE; CREATE SCHEMA t040_leak AUTHORIZATION t040_app_a")
    conn = conns[A]
    d.q(conn, "CREATE FUNCTION t040_leak.peek(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS "
              "$$BEGIN RAISE NOTICE 'peek:%', $1; RETURN true; END$$")
    del conn.notices[:]
    d.q(conn, "SELECT * FROM digime.contracts_info WHERE t040_leak.peek(contract_id)")
    d.q(conn, "SELECT * FROM digime.user_tokens_info WHERE t040_leak.peek(owner_role::text)")
    d.q(conn, "SELECT id FROM digime.user_tokens WHERE t040_leak.peek(owner_role::text || ' ' || user_id)")
    seen = "".join(conn.notices)
    tap.ok("peek:" + C1 in seen and ("peek:" + A) in seen, "the leak function ran on visible rows",
           seen)
    tap.ok(C2 not in seen and B not in seen and MEMBER not in seen and "postgres" not in seen,
           "it never saw rows of contract 2 or of other roles", seen)
    d.q(admin, "DROP SCHEMA t040_leak CASCADE")


@tap.test
def foreign_callback():
    url, _ = authorize(conns[A], C1, "shared-state")
    location = sb.follow(url)
    parse_code(location)
    seq = sb.last_seq()
    for who, role, conn in ((B, B, conns[B]), (MEMBER, MEMBER, conns[MEMBER]), ("DBA", "postgres", admin)):
        e = d.error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (location,))
        tap.ok(e is not None and e[0] == DENIED and
               e[1] == 'no authorization of role "%s" has the callback\'s state' % role,
               "%s: handle_callback of t040_app_a's state -> 42501" % who, repr(e))
    denied(conns[NONE], NONE, "handle_callback of t040_app_a's state",
           "SELECT * FROM digime.digime_handle_callback(%s)", (location,))
    tap.eq(sb.last_seq(), seq, "the refused callbacks sent nothing to digi.me (code not used)")
    # a role with its own pending authorization of the same state gets no token from A's code
    authorize(conns[MEMBER], C1, "shared-state")
    n_member = len(own_ids(MEMBER))
    e = d.error(conns[MEMBER], "SELECT * FROM digime.digime_handle_callback(%s)", (location,))
    tap.ok(e is not None and e[0] == "YD007", "t040_member with the same state: A's code fails PKCE (YD007)",
           repr(e))
    tap.eq(len(own_ids(MEMBER)), n_member, "t040_member got no token")
    row = d.q(conns[A], "SELECT id, owner_role::text, state FROM digime.digime_handle_callback(%s)",
              (location,))[0]
    tap.eq(row[1:], (A, "shared-state"), "t040_app_a still completes its authorization afterwards")
    tap.ok(sandbox_pair(d.token_json(conns[A], row[0])["accessToken"]["value"]) is not None,
           "and gets a valid token")
    tokens[A].append(row[0])


@tap.test
def mixed_case_roles():
    # "T040_Mixed" and t040_mixed are different roles; RLS must not confuse them
    for r in (MIXED, LOWER):
        got = d.q(conns[r], "SELECT id, owner_role::text FROM digime.user_tokens_info")
        tap.ok(len(got) >= 1 and all(o == rtext(r) for _, o in got) and
               sorted(i for i, _ in got) == own_ids(r), "%s sees exactly its own token rows" % r, got)
        tap.eq(sorted(x[0] for x in d.q(conns[r], "SELECT id FROM digime.user_tokens")), own_ids(r),
               "%s: direct SELECT on user_tokens: its own rows" % r)
    tap.eq(d.q1(admin, "SELECT has_schema_privilege(%s, 'digime', 'USAGE')", (MIXED,)), True,
           "grant_contract granted the mixed-case role its privileges")
    denied(conns[LOWER], LOWER, "user_access_token of \"T040_Mixed\"",
           "SELECT digime.digime_user_access_token(%s)", (tokens[MIXED][0],))
    denied(conns[MIXED], MIXED, "user_access_token of t040_mixed",
           "SELECT digime.digime_user_access_token(%s)", (tokens[LOWER][0],))


@tap.test
def membership():
    # t040_member uses contract 1 only through t040_group
    tap.eq(d.q1(admin, "SELECT count(*) FROM digime.contract_grants WHERE grantee = 't040_member'::regrole"),
           0, "t040_member has no grant of its own")
    tap.ok(len(own_ids(MEMBER)) >= 1, "t040_member ran the flow with contract 1 via t040_group")
    # the group's rows are not the member's: SET ROLE t040_group sees none of t040_member's rows
    conn = d.connect_as(DB, MEMBER)
    d.q(conn, "SET ROLE t040_group")
    tap.eq(d.q(conn, "SELECT id FROM digime.user_tokens_info"), [],
           "as t040_group, t040_member's rows are not visible")
    denied(conn, "t040_group", "user_access_token of t040_member's token",
           "SELECT digime.digime_user_access_token(%s)", (own_ids(MEMBER)[0],))
    conn.close()
    # NOINHERIT membership does not carry the grant
    d.q(admin, "ALTER ROLE t040_member NOINHERIT")
    conn = d.connect_as(DB, MEMBER)
    denied(conn, "t040_member (NOINHERIT)", "authorize_url(contract 1)",
           "SELECT * FROM digime.digime_authorize_url(%s, 'https://app.example/', 'x')", (C1,))
    conn.close()
    d.q(admin, "ALTER ROLE t040_member INHERIT")


@tap.test
def end_user_recipe():
    conn = conns[A]
    for t in ("user_tokens", "authorizations"):
        d.q(admin, "CREATE POLICY end_user_scope ON digime.%s AS RESTRICTIVE TO t040_app_a "
                   "USING (end_user = current_setting('digime.end_user')) "
                   "WITH CHECK (end_user = current_setting('digime.end_user'))" % t)
    try:
        ids = {}
        for u in ("alice", "bob"):
            d.q(conn, "SET digime.end_user = %s", (u,))
            ids[u] = full_auth(conn, C1, "eu-" + u)
        tap.eq(d.q(admin, "SELECT end_user FROM digime.user_tokens WHERE id = ANY(%s) ORDER BY id",
                   ([ids["alice"], ids["bob"]],)), [("alice",), ("bob",)],
               "tokens record digime.end_user")
        # as bob
        tap.eq(d.q(conn, "SELECT id FROM digime.user_tokens_info"), [(ids["bob"],)],
               "bob: user_tokens_info shows only bob's token")
        tap.eq(sorted(set(x[0] for x in d.q(conn, "SELECT end_user FROM digime.authorizations"))), ["bob"],
               "bob: authorizations shows only bob's rows")
        tap.eq(d.q(conn, "DELETE FROM digime.user_tokens WHERE id = %s RETURNING id", (ids["alice"],)), [],
               "bob: DELETE of alice's token deletes nothing")
        cb = "https://app.example/return"
        for label, sql, args in (
                ("user_access_token", "SELECT digime.digime_user_access_token(%s)", (ids["alice"],)),
                ("refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)", (ids["alice"],)),
                ("reauthorize_url", "SELECT * FROM digime.digime_reauthorize_url(%s, %s)", (ids["alice"], cb)),
                ("authorize_url(user_token_id)",
                 "SELECT * FROM digime.digime_authorize_url(%s, %s, 'x', user_token_id => %s)",
                 (C1, cb, ids["alice"]))):
            denied(conn, "bob", label + " of alice's token", sql, args)
        tap.ok(d.token_json(conn, ids["bob"])["user"]["id"].startswith("user-"),
               "bob: user_access_token of bob's token")
        # alice's pending callback cannot be completed as bob
        d.q(conn, "SET digime.end_user = 'alice'")
        url, _ = authorize(conn, C1, "eu-cb")
        loc = sb.follow(url)
        d.q(conn, "SET digime.end_user = 'bob'")
        denied(conn, "bob", "handle_callback of alice's authorization",
               "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
        d.q(conn, "SET digime.end_user = 'alice'")
        tap.eq(d.q1(conn, "SELECT end_user FROM digime.digime_handle_callback(%s)", (loc,)), "alice",
               "alice completes it")
        # an authorization of bob must not change alice's pending one with the same state
        url, _ = authorize(conn, C1, "eu-same")
        loc = sb.follow(url)
        d.q(conn, "SET digime.end_user = 'bob'")
        authorize(conn, C1, "eu-same")
        tap.eq(d.q(admin, "SELECT end_user, status FROM digime.authorizations WHERE state = 'eu-same' "
                          "ORDER BY id"), [("alice", "pending"), ("bob", "pending")],
               "bob's authorization with the same state leaves alice's pending")
        d.q(conn, "SET digime.end_user = 'alice'")
        e = d.error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
        tap.ok(e is None, "alice still completes her authorization", repr(e))
        # without digime.end_user: the policy shows nothing, the functions see all of A's rows
        d.q(conn, "RESET digime.end_user")
        tap.eq(d.q(conn, "SELECT id FROM digime.user_tokens_info"), [],
               "no end user: the restrictive policy hides every row")
        tap.ok(d.token_json(conn, ids["alice"])["user"]["id"].startswith("user-"),
               "no end user: the functions reach all of the role's tokens")
        tap.ok(set(ids.values()) <= set(x[0] for x in d.q(admin, "SELECT id FROM digime.user_tokens_info")),
               "DBA sees every end user's rows")
        tokens[A].extend(ids.values())
    finally:
        d.q(conn, "RESET digime.end_user")
        for t in ("user_tokens", "authorizations"):
            d.q(admin, "DROP POLICY IF EXISTS end_user_scope ON digime.%s" % t)


@tap.test
def guc_privileges():
    conn = conns[A]
    for guc, val in (("digime.base_url", "https://evil.example/"), ("digime.onboard_url", "https://evil.example/"),
                     ("digime.ca_file", "/tmp/evil.pem"), ("digime.timeout_ms", "100"),
                     ("digime.connect_timeout_ms", "100"), ("digime.jwks_cache_ttl", "0"),
                     ("digime.authorization_ttl", "60"), ("digime.agent_name", "evil")):
        denied(conn, A, "SET %s" % guc, "SET %s = %%s" % guc, (val,))
        denied(conn, A, "set_config(%s)" % guc, "SELECT set_config(%s, %s, false)", (guc, val))
    for guc in ("digime.key_file", "digime.previous_key_file"):
        denied(conn, A, "SHOW " + guc, "SHOW " + guc)
    tap.eq(d.q(conn, "SELECT name FROM pg_settings WHERE name LIKE 'digime.%key_file'"), [],
           "pg_settings hides the key file settings")
    # the endpoints are visible (README), just not settable
    tap.eq(d.q1(conn, "SHOW digime.base_url"), os.environ["DM_SANDBOX_URL"] + "/v1.7/",
           "t040_app_a may read digime.base_url")
    denied(conn, A, "ALTER ROLE SET digime.base_url", "ALTER ROLE t040_app_a SET digime.base_url = 'https://evil/'")
    tap.eq(d.sqlstate(conn, "SET digime.key_file = '/tmp/k'"), "55P02", "t040_app_a: SET digime.key_file -> 55P02")
    try:
        d.psycopg2.connect(dbname=DB, user=A, options="-c digime.base_url=https://evil.example/").close()
        e = None
    except d.psycopg2.Error as ex:
        e = str(ex)
    tap.ok(e is not None and "permission denied to set parameter" in e,
           "t040_app_a cannot set digime.base_url in the startup packet", e)
    d.q(conn, "SET digime.end_user = 'x'; SET digime.refresh_margin = 10; SET digime.retry_limit = 1")
    tap.ok(True, "t040_app_a may set the user-level settings (end_user, refresh_margin, retry_limit)")
    d.q(conn, "RESET ALL")
    # endpoints: https, or http to loopback only
    for val, ok in (("http://example.com/", False), ("http://10.0.0.1/v1.7/", False),
                    ("ftp://127.0.0.1/", False), ("file:///etc/passwd", False),
                    ("https://user:pw@api.example/", False), ("https://api.example/?x=1", False),
                    ("http://127.0.0.1:1/", True), ("http://localhost:1/v1.7", True),
                    ("https://api.example/v1.7/", True)):
        for guc in ("digime.base_url", "digime.onboard_url"):
            st = d.sqlstate(admin, "SET %s = %%s" % guc, (val,))
            tap.eq(st, None if ok else "22023", "DBA: SET %s = %s %s" % (guc, val, "accepted" if ok else "refused"))
    d.q(admin, "SET digime.base_url = 'http://localhost:1/v1.7'")
    tap.eq(d.q1(admin, "SHOW digime.base_url"), "http://localhost:1/v1.7/", "a trailing slash is added")
    d.q(admin, "RESET digime.base_url; RESET digime.onboard_url")
    tap.eq(d.sqlstate(admin, "SET digime.key_file = '/tmp/k'"), "55P02", "DBA: SET digime.key_file -> 55P02")
    # TLS verification cannot be turned off, and is on
    names = [x[0] for x in d.q(admin, "SELECT name FROM pg_settings WHERE name LIKE 'digime.%'")]
    tap.ok(len(names) > 10 and not any(w in n for n in names for w in ("verify", "insecure", "ssl", "tls")),
           "no setting turns TLS verification off", names)
    seq = sb.last_seq()
    for ca in ("", other_ca()):
        c = d.connect(DB)
        d.q(c, "SET digime.ca_file = %s", (ca,))
        e = d.error(c, "SELECT * FROM digime.digime_authorize_url(%s, 'https://app.example/', 'tls')", (C1,))
        tap.ok(e is not None and "certificate" in e[1], "ca_file %r: the sandbox's certificate is not trusted" % ca,
               repr(e))
        c.close()
    tap.eq(sb.last_seq(), seq, "no request reached the sandbox without a trusted certificate")


def other_ca():
    """A self-signed CA certificate (not the sandbox's), readable by postgres."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t040 other CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(d.WORK, "t040-other-ca.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)
    return path


HOSTILE = r"""
CREATE TABLE hostile.calls (what text, usr text);
CREATE FUNCTION hostile.hit(what text) RETURNS boolean LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO hostile.calls VALUES (what, current_user); RETURN true; END$$;
CREATE FUNCTION hostile.now() RETURNS timestamptz LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('now') THEN 'epoch'::timestamptz END$$;
CREATE FUNCTION hostile.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('clock_timestamp') THEN 'epoch'::timestamptz END$$;
CREATE FUNCTION hostile.to_timestamp(double precision) RETURNS timestamptz LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('to_timestamp') THEN 'epoch'::timestamptz END$$;
CREATE FUNCTION hostile.make_interval(secs double precision) RETURNS interval LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('make_interval') THEN '1 year'::interval END$$;
CREATE FUNCTION hostile.nextval(regclass) RETURNS bigint LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('nextval') THEN 1::bigint END$$;
CREATE FUNCTION hostile.pg_get_serial_sequence(text, text) RETURNS text LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('pg_get_serial_sequence') THEN 'digime.user_tokens_id_seq' END$$;
CREATE FUNCTION hostile.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('pg_has_role(name)')$$;
CREATE FUNCTION hostile.pg_has_role(oid, oid, text) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('pg_has_role(oid)')$$;
CREATE FUNCTION hostile.to_regrole(text) RETURNS regrole LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('to_regrole') THEN 'postgres'::regrole END$$;
CREATE FUNCTION hostile.quote_ident(text) RETURNS text LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('quote_ident') THEN 'postgres' END$$;
CREATE FUNCTION hostile.eq(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('=(text)')$$;
CREATE FUNCTION hostile.eq(bigint, bigint) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('=(bigint)')$$;
CREATE FUNCTION hostile.eq(regrole, regrole) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('=(regrole)')$$;
CREATE FUNCTION hostile.eq(oid, oid) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('=(oid)')$$;
CREATE FUNCTION hostile.ne(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('<>(text)')$$;
CREATE FUNCTION hostile.lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS $$SELECT hostile.hit('<(timestamptz)')$$;
CREATE FUNCTION hostile.plus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('+(timestamptz)') THEN 'epoch'::timestamptz END$$;
CREATE FUNCTION hostile.minus(timestamptz, interval) RETURNS timestamptz LANGUAGE sql AS $$SELECT CASE WHEN hostile.hit('-(timestamptz)') THEN 'infinity'::timestamptz END$$;
CREATE OPERATOR hostile.= (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.eq);
CREATE OPERATOR hostile.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = hostile.eq);
CREATE OPERATOR hostile.= (LEFTARG = regrole, RIGHTARG = regrole, FUNCTION = hostile.eq);
CREATE OPERATOR hostile.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = hostile.eq);
CREATE OPERATOR hostile.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = hostile.ne);
CREATE OPERATOR hostile.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = hostile.lt);
CREATE OPERATOR hostile.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = hostile.plus);
CREATE OPERATOR hostile.- (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = hostile.minus);
CREATE VIEW hostile.contracts AS SELECT 'x'::text AS contract_id, 'x'::text AS application_id,
  'x'::text AS private_key, 2048 AS key_bits, 'x'::text AS key_fingerprint FROM (SELECT hostile.hit('table contracts')) s;
CREATE VIEW hostile.contract_grants AS SELECT 'x'::text AS contract_id, 0::oid::regrole AS grantee FROM (SELECT hostile.hit('table contract_grants')) s;
CREATE VIEW hostile.user_tokens AS SELECT 1::bigint AS id FROM (SELECT hostile.hit('table user_tokens')) s;
CREATE VIEW hostile.authorizations AS SELECT 1::bigint AS id FROM (SELECT hostile.hit('table authorizations')) s;
CREATE VIEW hostile.pg_extension AS SELECT 'digime'::name AS extname, 0::oid AS extowner FROM (SELECT hostile.hit('table pg_extension')) s;
CREATE VIEW hostile.pg_class AS SELECT 1 AS x FROM (SELECT hostile.hit('table pg_class')) s;
"""


@tap.test
def hostile_search_path():
    d.q(admin, "DROP SCHEMA IF EXISTS hostile CASCADE; CREATE SCHEMA hostile AUTHORIZATION t040_app_a; "
               "GRANT USAGE ON SCHEMA hostile TO PUBLIC")
    conn = d.connect_as(DB, A)
    d.q(conn, HOSTILE)
    d.q(conn, "GRANT ALL ON ALL TABLES IN SCHEMA hostile TO PUBLIC")
    path = "hostile, pg_catalog, public"
    d.q(conn, "SET search_path = " + path)
    d.q(conn, "CREATE TEMP VIEW user_tokens AS SELECT 1 AS id FROM (SELECT hostile.hit('temp user_tokens')) s")
    d.q(conn, "CREATE TEMP VIEW contracts AS SELECT 1 AS id FROM (SELECT hostile.hit('temp contracts')) s")
    # the plants work: unqualified names in the caller's own SQL reach them
    d.q(conn, "SELECT now(), 'a'::text = 'b'::text, pg_has_role(current_user, 10::oid, 'USAGE')")
    tap.eq(sorted(x[0] for x in d.q(conn, "SELECT what FROM hostile.calls")),
           ["=(text)", "now", "pg_has_role(name)"], "control: the hostile objects shadow pg_catalog")
    d.q(conn, "TRUNCATE hostile.calls")
    # the flows, as t040_app_a with the hostile search_path
    url, verifier = authorize(conn, C1, "hostile-1")
    row = d.q(conn, "SELECT id, owner_role::text, contract_id, updated_at > 'epoch'::timestamptz "
                    "FROM digime.digime_handle_callback(%s)", (sb.follow(url),))[0]
    tid = row[0]
    tap.eq(row[1:], (A, C1, True), "authorize_url + handle_callback work; updated_at is real")
    tj = d.token_json(conn, tid)
    tap.ok(sandbox_pair(tj["accessToken"]["value"]) is not None, "user_access_token is the sandbox's token")
    d.q(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (tid,))
    tap.ok(d.token_json(conn, tid)["accessToken"]["value"] != tj["accessToken"]["value"], "refresh_token works")
    d.q(conn, "SELECT * FROM digime.digime_reauthorize_url(%s, 'https://app.example/')", (tid,))
    url, verifier = authorize(conn, C1, "hostile-2")
    code, _ = parse_code(sb.follow(url))
    d.q(conn, "SELECT * FROM digime.digime_exchange_code(%s, %s, %s)", (C1, code, verifier))
    imp = imported(conn, C1)
    tap.eq([x[0] for x in d.q(conn, "SELECT contract_id FROM digime.contracts_info")], [C1],
           "contracts_info: still only contract 1")
    tap.eq(sorted(x[0] for x in d.q(conn, "SELECT id FROM digime.user_tokens_info")), own_ids(A),
           "user_tokens_info: exactly t040_app_a's rows")
    denied(conn, A, "user_access_token of t040_app_b's token (hostile path)",
           "SELECT digime.digime_user_access_token(%s)", (tokens[B][0],))
    denied(conn, A, "authorize_url with contract 2 (hostile path)",
           "SELECT * FROM digime.digime_authorize_url(%s, 'https://app.example/', 'x')", (C2,))
    tap.eq(d.q(admin, "SELECT end_user, to_char(created_at, 'YYYY') <> '1970', "
                      "(SELECT count(*) FROM digime.user_tokens t2 WHERE t2.id = %s) FROM digime.user_tokens "
                      "WHERE id = %s", (imp, imp)), [(None, True, 1)], "the imported row is right")
    # the DBA with the same search_path: administration functions
    d.q(admin, "SET search_path = " + path)
    try:
        k3 = d.new_rsa_key()
        d.q(admin, "SELECT * FROM digime.digime_add_contract('t040-hostile', 'app', %s)", (k3,))
        d.q(admin, "SELECT * FROM digime.digime_rotate_contract_key('t040-hostile', %s)", (k3,))
        d.q(admin, "SELECT digime.digime_grant_contract('t040-hostile', 't040_app_a')")
        d.q(admin, "SELECT digime.digime_revoke_contract('t040-hostile', 't040_app_a')")
        d.q(admin, "SELECT digime.digime_drop_contract('t040-hostile')")
        tap.eq(d.q1(admin, "SELECT digime.digime_reencrypt_secrets()"), 0, "DBA: reencrypt_secrets -> 0")
        tap.eq(d.revoke_token(admin, imp), True, "DBA: revoke_token works")
        tap.eq(d.q1(admin, "SELECT digime.digime_encryption_key_id() IS NOT NULL"), True, "DBA: key id")
    finally:
        d.q(admin, "RESET search_path")
    tap.eq(d.q(admin, "SELECT contract_id FROM digime.contracts ORDER BY 1"), sorted([(C1,), (C2,)]),
           "DBA: admin functions did what they should")
    tap.eq(d.q(admin, "SELECT what, usr FROM hostile.calls"), [], "no hostile object was ever used")
    conn.close()
    d.q(admin, "DROP SCHEMA hostile CASCADE")


def pg_dump(user, *args):
    return subprocess.run([os.path.join(d.PG_BIN, "pg_dump"), "-U", user, "-d", DB] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)


@tap.test
def dump_and_copy():
    for args in ((), ("-t", "digime.user_tokens"), ("-n", "digime")):
        r = pg_dump(A, *args)
        tap.ok(r.returncode != 0 and "permission denied" in r.stderr and "dmenc1" not in r.stdout,
               "pg_dump %s as t040_app_a fails with permission denied" % " ".join(args), r.stderr[-500:])
    r = pg_dump("postgres")
    tap.eq(r.returncode, 0, "pg_dump as the superuser succeeds")
    dump = r.stdout
    ids = sorted(all_tokens())
    plain = []
    for t in ids:
        j = d.token_json(admin, t)
        plain += [j["accessToken"]["value"], j["refreshToken"]["value"]]
    n_sealed = dump.count("dmenc1:")
    tap.ok(n_sealed >= 2 * len(ids) + 2, "the dump has the sealed values (%d)" % n_sealed)
    tap.ok(all(j in dump for j in ("COPY digime.user_tokens", "COPY digime.contracts", "COPY digime.authorizations")),
           "the dump has digime's tables")
    leaked = [p for p in plain if p in dump]
    tap.eq(leaked, [], "no access or refresh token (%d values) in the dump" % len(plain))
    tap.eq([v for v in verifiers if v in dump], [], "no code_verifier (%d) in the dump" % len(verifiers))
    tap.eq([l for l in KEY_LINES if l in dump], [], "no line of the contract keys in the dump")
    # what the dump holds decrypts only with the key file, and is bound to its row
    key = d.read_key_file(os.path.join(d.WORK, "keys", "digime.key"))
    t = ids[0]
    stored = d.q1(admin, "SELECT access_token FROM digime.user_tokens WHERE id = %s", (t,))
    tap.ok(stored in dump and d.unseal(stored, key, "digime/user_tokens/access_token/%d" % t) == plain[0],
           "a dumped access_token is AES-GCM under the key file, bound to its row")


@tap.test
def revoke_token():
    t = tokens[B][0]
    denied(conns[A], A, "revoke_token", "SELECT digime.digime_revoke_token(%s)", (t,))
    seq = sb.last_seq()
    tap.eq(d.revoke_token(admin, t), True, "DBA revokes t040_app_b's token")
    tap.eq(sb.last_seq(), seq, "revoke_token is a local change (no API call)")
    tap.eq(d.q(conns[B], "SELECT status FROM digime.user_tokens_info WHERE id = %s", (t,)), [("revoked",)],
           "t040_app_b sees its token as revoked")
    tap.eq(d.q(admin, "SELECT access_token IS NULL AND refresh_token IS NULL FROM digime.user_tokens "
                      "WHERE id = %s", (t,)), [(True,)], "the revoked row's secrets are cleared")
    err = d.error(conns[B], "SELECT digime.digime_user_access_token(%s)", (t,))
    tap.eq(err and err[:2], ("YD031", "user access token %d was revoked" % t),
           "user_access_token of the revoked token -> YD031")
    tap.eq(d.q1(admin, "SELECT digime.digime_revoke_token(%s)", (t,)), False, "revoking it again -> false")
    tokens[B].remove(t)


@tap.test
def revoke_contract():
    cb = "https://app.example/"
    # a role with two grants keeps its privileges when one is revoked
    d.q(admin, "SELECT digime.digime_grant_contract(%s, 't040_app_a')", (C2,))
    tap.ok(d.q1(conns[A], "SELECT url FROM digime.digime_authorize_url(%s, %s, 'r1')", (C2, cb)) is not None,
           "t040_app_a uses contract 2 once granted")
    d.q(admin, "SELECT digime.digime_revoke_contract(%s, 't040_app_a')", (C2,))
    denied(conns[A], A, "authorize_url(contract 2) after revoke",
           "SELECT * FROM digime.digime_authorize_url(%s, %s, 'r2')", (C2, cb))
    tap.ok(d.q1(conns[A], "SELECT url FROM digime.digime_authorize_url(%s, %s, 'r3')", (C1, cb)) is not None,
           "t040_app_a still uses contract 1")
    tap.eq(d.q(admin, "SELECT grantees::text[] FROM digime.contracts_info WHERE contract_id = %s", (C2,)),
           [(sorted([rtext(MIXED), B, LOWER]),)], "contracts_info grantees updated")
    # the last grant takes the privileges with it; tokens stay
    n = len(own_ids(B))
    d.q(admin, "SELECT digime.digime_revoke_contract(%s, 't040_app_b')", (C2,))
    privs = d.q(admin, """
        SELECT has_schema_privilege('t040_app_b', 'digime', 'USAGE'),
               has_function_privilege('t040_app_b', 'digime.digime_user_access_token(bigint)', 'EXECUTE'),
               has_column_privilege('t040_app_b', 'digime.user_tokens', 'id', 'SELECT'),
               has_table_privilege('t040_app_b', 'digime.user_tokens', 'DELETE'),
               has_column_privilege('t040_app_b', 'digime.authorizations', 'state', 'SELECT'),
               has_table_privilege('t040_app_b', 'digime.user_tokens_info', 'SELECT'),
               has_table_privilege('t040_app_b', 'digime.contracts_info', 'SELECT')""")[0]
    tap.eq(privs, (False,) * 7, "revoking t040_app_b's last grant revokes all its digime privileges")
    tap.eq(len(own_ids(B)), n, "t040_app_b's tokens stay")
    c = d.connect_as(DB, B)
    denied(c, B, "authorize_url after its last revoke",
           "SELECT * FROM digime.digime_authorize_url(%s, %s, 'r4')", (C2, cb))
    denied(c, B, "SELECT user_tokens_info after its last revoke", "SELECT * FROM digime.user_tokens_info")
    denied(c, B, "DELETE user_tokens after its last revoke", "DELETE FROM digime.user_tokens WHERE false")
    c.close()
    tap.eq(d.sqlstate(admin, "SELECT digime.digime_revoke_contract(%s, 't040_app_b')", (C2,)), "42704",
           "revoking a grant that does not exist -> 42704")
    denied(conns[A], A, "revoke_contract", "SELECT digime.digime_revoke_contract(%s, 't040_app_a')", (C1,))
    # revoking the group's grant takes the member's access
    d.q(admin, "SELECT digime.digime_revoke_contract(%s, 't040_group')", (C1,))
    c = d.connect_as(DB, MEMBER)
    denied(c, MEMBER, "authorize_url after the group's grant is revoked",
           "SELECT * FROM digime.digime_authorize_url(%s, %s, 'r5')", (C1, cb))
    c.close()


@tap.test
def drop_contract():
    d.ensure_role("t040_temp", "LOGIN")
    k3 = d.new_rsa_key()
    d.q(admin, "SELECT * FROM digime.digime_add_contract('t040-c3', 'app', %s)", (k3,))
    for r in ("t040_app_a", "t040_temp"):
        d.q(admin, "SELECT digime.digime_grant_contract('t040-c3', %s)", (r,))
    temp = d.connect_as(DB, "t040_temp")
    imported(temp, "t040-c3")
    imported(conns[A], "t040-c3")
    temp.close()
    denied(conns[A], A, "drop_contract", "SELECT digime.digime_drop_contract('t040-c3', true)")
    e = d.error(admin, "SELECT digime.digime_drop_contract('t040-c3')")
    tap.ok(e is not None and e[0] == "2BP01" and e[2] == "2 user access tokens use it.",
           "drop_contract refuses while tokens use it (2BP01)", repr(e))
    tap.eq(d.q1(admin, "SELECT count(*) FROM digime.user_tokens WHERE contract_id = 't040-c3'"), 2,
           "nothing was dropped")
    d.discard_all_tokens(admin, "contract_id = 't040-c3'")
    d.q(admin, "SELECT digime.digime_drop_contract('t040-c3', cascade => true)")
    tap.eq(d.q(admin, "SELECT (SELECT count(*) FROM digime.contracts WHERE contract_id = 't040-c3'), "
                      "(SELECT count(*) FROM digime.user_tokens WHERE contract_id = 't040-c3'), "
                      "(SELECT count(*) FROM digime.contract_grants WHERE contract_id = 't040-c3')"),
           [(0, 0, 0)], "cascade drops the contract, its tokens and grants")
    tap.eq(d.q(admin, "SELECT has_schema_privilege('t040_temp', 'digime', 'USAGE'), "
                      "has_schema_privilege('t040_app_a', 'digime', 'USAGE')"), [(False, True)],
           "the role whose last grant it was loses its privileges; t040_app_a keeps them")
    tap.eq(d.sqlstate(admin, "SELECT digime.digime_drop_contract('t040-c3')"), "42704",
           "dropping an unknown contract -> 42704")
    # only pending authorizations: no cascade needed, they go too
    d.add_contract(admin, "t040-c4", sandbox=sb)
    d.q(admin, "SELECT digime.digime_grant_contract('t040-c4', 't040_app_a')")
    authorize(conns[A], "t040-c4", "c4-pending")
    d.q(admin, "SELECT digime.digime_drop_contract('t040-c4')")
    tap.eq(d.q1(admin, "SELECT count(*) FROM digime.authorizations WHERE contract_id = 't040-c4'"), 0,
           "dropping a contract without tokens deletes its pending authorizations")


tap.run()
