"""045_dump_restore: a database that holds digime's secrets, dumped and restored.

On the main cluster (digime.key_file: secrets sealed at rest), database t045 has two contracts,
grants to two application roles, tokens from real flows through the sandbox (one refreshed, one
completed through the callback inbox), pending authorizations, inbox rows and audit rows.

(a) pg_dump by the superuser, restored into fresh databases (the roles exist already, as after
    pg_dumpall --roles-only): plain format with psql, custom format with pg_restore.  Contracts,
    grants (digime.contract_grants and the roles' privileges), tokens (same values through
    digime_user_access_token, still sealed, same ciphertext), pending authorizations, audit rows
    and sequences are there; the inbox is not (README: not a configuration table).  In the
    pg_restore copy the application role completes a full flow, completes a pending authorization
    that came with the dump, and refreshes a token.
(b) pg_dump by the database's owner (a non-superuser that created nothing of digime) and by an
    application role: both fail; the exact errors are asserted.  A member of the extension owner
    fails too unless it has BYPASSRLS.  Leaving digime out (--exclude-schema=digime) lets the
    owner dump, without any of digime's rows.
(c) No secret (tokens, codes, verifiers, contract keys, the encryption key) appears in any output
    or in the dump files.

A restored copy holds the same tokens as the original: a refresh in the copy rotates the pair at
digi.me and makes the original's invalid.  So the copy refreshes only a token that the original
then revokes (dmtest.revoke_token tells 088), and the tokens that exist only in the copies are
reported to 088 (dmtest.discard_tokens) before the copies are dropped.
"""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402
from dmtest import error, q, q1  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()
sb.reset(everything=True)

DB = "t045"
COPY_PLAIN, COPY_CUSTOM = "t045_plain", "t045_custom"
ROLE_A, ROLE_B, OWNER = "t045_app_a", "t045_app_b", "t045_owner"
DBA, DBA_BYPASS = "t045_dba", "t045_dba_bypassrls"      # members of the extension owner, dropped again
C1, C2 = d.EXAMPLE_CONTRACT, d.SECOND_CONTRACT
DUMPS = os.path.join(d.WORK, "t045")
KEY_FILE = os.path.join(d.WORK, "keys", "digime.key")

for r in (ROLE_A, ROLE_B, OWNER):
    d.ensure_role(r, "LOGIN")
admin = d.fresh_db(DB)
q(admin, 'DROP ROLE IF EXISTS "%s", "%s"' % (DBA, DBA_BYPASS))      # left by an aborted run
q(admin, 'ALTER DATABASE "%s" OWNER TO "%s"' % (DB, OWNER))
d.add_example_contract(admin)
q(admin, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
  (C2, d.EXAMPLE_APP, d.fixture_key("keys/second.pem")))
q(admin, "SELECT digime.digime_grant_contract(%s, %s)", (C1, ROLE_A))
q(admin, "SELECT digime.digime_grant_contract(%s, %s)", (C2, ROLE_B))
conn_a = d.connect_as(DB, ROLE_A)
conn_b = d.connect_as(DB, ROLE_B)
if os.path.exists(DUMPS):
    shutil.rmtree(DUMPS)
os.makedirs(DUMPS, mode=0o700)

# every value that must never appear in an output: the sandbox's, the suite's, the fixture keys,
# and the key of digime.key_file (as its file holds it, and as hex of its bytes)
def all_secrets():
    key_text = open(KEY_FILE).read().strip()
    return sorted(set(s for s in sb.secrets()["values"] + d.recorded_secrets() + d.fixture_key_bodies()
                      + [key_text, d.read_key_file(KEY_FILE).hex()] if len(s) >= d.SECRET_MIN_LEN))


OUTPUTS = []        # (what, text) of every client program run here


def run(what, *cmd):
    """Runs a client program (as root, on the test socket); returns CompletedProcess."""
    r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    OUTPUTS.append((what, r.stdout + r.stderr))
    return r


def pg_dump(role, *args):
    return run("pg_dump -U %s %s" % (role, " ".join(args)),
               os.path.join(d.PG_BIN, "pg_dump"), "-U", role, "-d", DB, *args)




# --------------------------------------------------------------------------
# The original's contents, as compared with the copies
# --------------------------------------------------------------------------
SNAPSHOT_QUERIES = {
    "contracts": "SELECT contract_id, application_id, private_key, key_bits, key_fingerprint, "
                 "created_at, rotated_at FROM digime.contracts ORDER BY 1",
    "contract_grants": "SELECT contract_id, grantee::text, granted_at FROM digime.contract_grants ORDER BY 1, 2",
    "user_tokens": "SELECT id, contract_id, owner_role::text, end_user, user_id, consent_id, access_token, "
                   "access_token_expires_at, refresh_token, refresh_token_expires_at, state, account_reference, "
                   "created_at, updated_at, refreshed_at, status, last_error_sqlstate, last_error, "
                   "last_error_at, refresh_failures, next_refresh_at FROM digime.user_tokens ORDER BY id",
    "authorizations": "SELECT id, kind, contract_id, owner_role::text, end_user, state, code_verifier, "
                      "session, callback, token_id, status, created_at, expires_at, completed_at, "
                      "finished_at, code_hash FROM digime.authorizations ORDER BY id",
    "audit_log": "SELECT id, at, role::text, action, contract_id, token_id, outcome, sqlstate, reference "
                 "FROM digime.audit_log ORDER BY id",
    "sequences": "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'digime' "
                 "AND sequencename <> 'callback_inbox_id_seq' ORDER BY 1",
    # every privilege on digime's schema, relations, columns, functions and procedures
    "privileges": """
        SELECT 'schema' AS kind, n.nspname AS object, a.grantee::regrole::text, a.privilege_type
          FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'digime'
        UNION ALL
        SELECT 'relation', c.oid::regclass::text, a.grantee::regrole::text, a.privilege_type
          FROM pg_class c, aclexplode(c.relacl) a WHERE c.relnamespace = 'digime'::regnamespace
        UNION ALL
        SELECT 'column', c.oid::regclass::text || '.' || t.attname, a.grantee::regrole::text, a.privilege_type
          FROM pg_class c JOIN pg_attribute t ON t.attrelid = c.oid, aclexplode(t.attacl) a
         WHERE c.relnamespace = 'digime'::regnamespace
        UNION ALL
        SELECT 'routine', p.oid::regprocedure::text, a.grantee::regrole::text, a.privilege_type
          FROM pg_proc p, aclexplode(p.proacl) a WHERE p.pronamespace = 'digime'::regnamespace
        ORDER BY 1, 2, 3, 4""",
}


def snapshot(conn):
    return {k: q(conn, s) for k, s in SNAPSHOT_QUERIES.items()}


def sealed_values(conn):
    """Every stored secret value (non-NULL)."""
    return [r[0] for r in q(conn, """
        SELECT private_key FROM digime.contracts
        UNION ALL SELECT access_token FROM digime.user_tokens WHERE access_token IS NOT NULL
        UNION ALL SELECT refresh_token FROM digime.user_tokens WHERE refresh_token IS NOT NULL
        UNION ALL SELECT code_verifier FROM digime.authorizations WHERE code_verifier IS NOT NULL""")]


def plain_tokens(conn, ids):
    """{id: (access token, refresh token)} through digime_user_access_token."""
    out = {}
    for t in ids:
        j = d.token_json(conn, t)
        out[t] = (j["accessToken"]["value"], j["refreshToken"]["value"])
    return out


def role_privileges(conn, role):
    return [r for r in q(conn, SNAPSHOT_QUERIES["privileges"]) if r[2] == role]


# --------------------------------------------------------------------------
# The original
# --------------------------------------------------------------------------
A1 = d.full_authorization(conn_a, sb, C1, state="t045-a1")["id"]
A2 = d.full_authorization(conn_a, sb, C1, state="t045-a2")["id"]
B1 = d.full_authorization(conn_b, sb, C2, state="t045-b1")["id"]
q(conn_a, "SELECT id FROM digime.digime_refresh_token(%s)", (A1,))        # refreshed_at, an audit row
# a token through the callback inbox (its row is not dumped)
_url, _, _ = d.authorize(conn_b, C2, state="t045-b2")
_loc = sb.follow(_url)
d.record_secret(dict(d.query_pairs(_loc)).get("code"))
INBOX_ID = q1(conn_b, "SELECT digime.digime_submit_callback(%s)", (_loc,))
B2 = d.wait_value(lambda: q1(conn_b, "SELECT token_id FROM digime.callback_inbox WHERE id = %s AND status = 'done'",
                             (INBOX_ID,)), 15)
# pending authorizations: role A's is completed later in a copy, role B's stays pending
PENDING_URL, _, _ = d.authorize(conn_a, C1, state="t045-pending-a")
d.authorize(conn_b, C2, state="t045-pending-b")
TOKENS = [A1, A2, B1, B2]
ORIGINAL_PLAIN = plain_tokens(admin, TOKENS)


@tap.test
def original_contents():
    tap.ok(B2 is not None, "the inbox row was completed (token %s)" % B2)
    n = {k: len(v) for k, v in snapshot(admin).items()}
    tap.ok(n["contracts"] == 2 and n["contract_grants"] == 2 and n["user_tokens"] == 4
           and n["authorizations"] == 6 and n["audit_log"] >= 10,
           "t045 has 2 contracts, 2 grants, 4 tokens, 6 authorizations, audit rows", n)
    tap.eq(q(admin, "SELECT status, count(*) FROM digime.authorizations GROUP BY 1 ORDER BY 1"),
           [("completed", 4), ("pending", 2)], "two of them pending")
    vals = sealed_values(admin)
    tap.ok(len(vals) == 2 + 8 + 2 and all(v.startswith("dmenc1:") for v in vals),
           "every stored secret is sealed (%d values)" % len(vals))
    tap.eq(q1(admin, "SELECT count(*) FROM digime.callback_inbox"), 1, "one inbox row")
    tap.ok(len(role_privileges(admin, ROLE_A)) > 20 and len(role_privileges(admin, ROLE_B)) > 20,
           "both application roles hold privileges on digime's objects")
    tap.eq(q1(admin, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"),
           OWNER, "the database belongs to %s" % OWNER)
    tap.eq(q1(admin, "SELECT pg_get_userbyid(extowner) FROM pg_extension WHERE extname = 'digime'"),
           "postgres", "the extension to the superuser")


# --------------------------------------------------------------------------
# (a) the superuser's dump, restored
# --------------------------------------------------------------------------
PLAIN_FILE = os.path.join(DUMPS, "t045.sql")
CUSTOM_FILE = os.path.join(DUMPS, "t045.dump")
ORIGINAL = None


def fresh_copy(name):
    d.drop_database(admin, name, force=True)        # a copy an aborted run left
    q(admin, 'CREATE DATABASE "%s"' % name)


@tap.test
def superuser_dump_and_restore():
    global ORIGINAL
    r1 = pg_dump("postgres", "-Fp", "-f", PLAIN_FILE)
    r2 = pg_dump("postgres", "-Fc", "-Z0", "-f", CUSTOM_FILE)     # uncompressed: searchable below
    ORIGINAL = snapshot(admin)          # nothing changes t045 between the dumps and this
    tap.ok(r1.returncode == 0 and r2.returncode == 0, "pg_dump as the superuser: plain and custom format",
           r1.stderr + r2.stderr)
    dump = open(PLAIN_FILE).read()
    tap.ok(all("COPY digime.%s " % t in dump for t in
               ("contracts", "contract_grants", "user_tokens", "authorizations", "audit_log")),
           "the dump has the rows of digime's configuration tables")
    tap.ok("COPY digime.callback_inbox" not in dump, "... but not the inbox's")
    tap.ok(dump.count("dmenc1:") == 12, "it holds the 12 secrets sealed (%d)" % dump.count("dmenc1:"))
    OUTPUTS.append(("the plain dump file", dump))
    OUTPUTS.append(("the custom dump file", open(CUSTOM_FILE, "rb").read().decode("latin-1")))

    fresh_copy(COPY_PLAIN)
    r = run("psql restore", os.path.join(d.PG_BIN, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-d", COPY_PLAIN, "-f", PLAIN_FILE)
    tap.ok(r.returncode == 0 and "ERROR" not in r.stderr, "psql restores the plain dump into %s" % COPY_PLAIN,
           r.stderr[-2000:])
    fresh_copy(COPY_CUSTOM)
    r = run("pg_restore", os.path.join(d.PG_BIN, "pg_restore"), "--exit-on-error", "-d", COPY_CUSTOM,
            CUSTOM_FILE)
    tap.ok(r.returncode == 0 and r.stderr == "", "pg_restore restores the custom dump into %s" % COPY_CUSTOM,
           r.stderr[-2000:])


@tap.test
def copies_hold_the_same():
    for name in (COPY_PLAIN, COPY_CUSTOM):
        c = d.connect(name)
        snap = snapshot(c)
        for k in SNAPSHOT_QUERIES:
            tap.eq(snap[k], ORIGINAL[k], "%s: %s as in the original (%d rows)" % (name, k, len(ORIGINAL[k])))
        vals = sealed_values(c)
        tap.ok(len(vals) == 12 and all(v.startswith("dmenc1:") for v in vals),
               "%s: every secret still sealed (%d values)" % (name, len(vals)))
        tap.eq(q1(c, "SELECT digime.digime_encryption_key_id()"),
               q1(admin, "SELECT digime.digime_encryption_key_id()"), "%s: the same key" % name)
        tap.eq(plain_tokens(c, TOKENS), ORIGINAL_PLAIN,
               "%s: digime_user_access_token gives the same values (superuser)" % name)
        for role, tid in ((ROLE_A, A1), (ROLE_B, B1)):
            rc = d.connect_as(name, role)
            tap.eq(plain_tokens(rc, [tid]), {tid: ORIGINAL_PLAIN[tid]},
                   "%s: %s reads its own token, the same values" % (name, role))
            tap.eq(d.sqlstate(rc, "SELECT digime.digime_user_access_token(%s)", (A2 if role == ROLE_B else B1,)),
                   "42501", "%s: %s cannot read the other role's" % (name, role))
            rc.close()
        tap.eq(q(c, "SELECT grantees FROM digime.contracts_info ORDER BY contract_id"),
               q(admin, "SELECT grantees FROM digime.contracts_info ORDER BY contract_id"),
               "%s: contracts_info lists the same grantees" % name)
        tap.eq(q1(c, "SELECT count(*) FROM digime.callback_inbox"), 0,
               "%s: no inbox rows (the inbox is not dumped)" % name)
        c.close()


@tap.test
def copy_works_for_the_application_role():
    ca = d.connect_as(COPY_CUSTOM, ROLE_A)
    copy_admin = d.connect(COPY_CUSTOM)
    max_id = max(TOKENS)
    # a full flow
    tok = d.full_authorization(ca, sb, C1, state="t045-copy-flow")
    tap.ok(tok["id"] > max_id, "a full flow in the copy: a new token row after the restored ones (id %d)" % tok["id"])
    tap.eq(d.token_json(ca, tok["id"])["accessToken"]["value"], sb.tokens()[-1]["access_token"],
           "... holding the pair the sandbox issued")
    # the pending authorization that came with the dump: its sealed verifier still works
    loc = sb.follow(PENDING_URL)
    d.record_secret(dict(d.query_pairs(loc)).get("code"))
    s0 = sb.last_seq()
    row = q(ca, "SELECT id, state FROM digime.digime_handle_callback(%s)", (loc,))
    tap.ok(row and row[0][1] == "t045-pending-a",
           "the callback of an authorization started before the dump completes in the copy", row)
    recs = d.api_records(sb, s0, "oauth/token")
    tap.ok(len(recs) == 1 and recs[0]["status"] == 201, "one code exchange, accepted (the verifier matched)")
    tap.eq(q1(copy_admin, "SELECT status FROM digime.authorizations WHERE state = 't045-pending-a'"), "completed",
           "the authorization is completed in the copy")
    tap.eq(q1(admin, "SELECT status FROM digime.authorizations WHERE state = 't045-pending-a'"), "pending",
           "... and still pending in the original")
    # a refresh in the copy, of a token the original then gives up
    before = ORIGINAL_PLAIN[A2]
    tap.ok(error(ca, "SELECT id FROM digime.digime_refresh_token(%s)", (A2,)) is None,
           "digime_refresh_token in the copy, as the application role")
    after = plain_tokens(ca, [A2])[A2]
    tap.ok(after != before and after[0] == sb.tokens()[-1]["access_token"], "the copy stores the new pair")
    tap.eq(plain_tokens(admin, [A2])[A2], before, "the original still has the old pair")
    err = error(conn_a, "SELECT id FROM digime.digime_refresh_token(%s)", (A2,))
    tap.eq(err and err[0], "YD001",
           "which digi.me no longer accepts: a refresh in the original fails with YD001 (README, Caveats)")
    tap.eq(d.revoke_token(admin, A2), True, "the original revokes that token")
    tap.eq(q1(ca, "SELECT status FROM digime.user_tokens WHERE id = %s", (A2,)), "active",
           "the copy's is active")
    ca.close()
    copy_admin.close()


# --------------------------------------------------------------------------
# (b) the database's owner and an application role cannot dump digime's rows
# --------------------------------------------------------------------------
def error_lines(r):
    return [l for l in r.stderr.splitlines() if l.startswith("pg_dump: error: ") or l.startswith("pg_dump: detail: ")]


@tap.test
def owner_and_application_role_cannot_dump():
    cases = [
        # (role, pg_dump arguments, the error line, the detail line or None)
        (OWNER, (), "permission denied for schema digime",
         "Query was: SELECT last_value, is_called FROM digime.audit_log_id_seq"),
        (OWNER, ("-a", "-t", "digime.contracts"), "permission denied for schema digime", None),
        (OWNER, ("-a", "-t", "digime.user_tokens"), "permission denied for schema digime", None),
        (ROLE_A, (), "permission denied for sequence audit_log_id_seq",
         "Query was: SELECT last_value, is_called FROM digime.audit_log_id_seq"),
        (ROLE_A, ("-a", "-t", "digime.contracts"), "permission denied for table contracts", None),
        (ROLE_A, ("-a", "-t", "digime.user_tokens"), "permission denied for table user_tokens", None),
        (ROLE_A, ("-a", "-t", "digime.authorizations"), "permission denied for table authorizations", None),
        (ROLE_A, ("-a", "-t", "digime.audit_log"),
         'query would be affected by row-level security policy for table "audit_log"', None),
    ]
    for role, args, msg, detail in cases:
        r = pg_dump(role, *args)
        lines = error_lines(r)
        what = "pg_dump %sas %s" % (" ".join(args) + " " if args else "", role)
        tap.ok(r.returncode == 1 and lines and lines[0] == "pg_dump: error: query failed: ERROR:  " + msg,
               "%s fails: %s" % (what, msg), r.stderr[-1500:])
        if detail:
            tap.ok(len(lines) > 1 and lines[1] == "pg_dump: detail: " + detail, "... on " + detail[11:],
                   r.stderr[-1500:])
        tap.ok("dmenc1:" not in r.stdout, "... and writes no sealed value")
        hints = [l for l in r.stderr.splitlines() if l.startswith("HINT:")]
        if hints:
            print("# %s: %s" % (what, hints[0]))
    # roles that have the extension owner's privileges (members of it): without BYPASSRLS the
    # forced row-level security stops pg_dump (row_security = off), with it the dump is complete
    ext_owner = q1(admin, "SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'digime'")
    for role, opts in ((DBA, "LOGIN"), (DBA_BYPASS, "LOGIN BYPASSRLS")):
        d.ensure_role(role, opts)
        q(admin, 'GRANT "%s" TO "%s"' % (ext_owner, role))
    r = pg_dump(DBA)
    lines = error_lines(r)
    tap.ok(r.returncode == 1 and lines and lines[0] == "pg_dump: error: query failed: ERROR:  query would be "
           'affected by row-level security policy for table "audit_log"',
           "pg_dump as a member of the extension owner (%s) without BYPASSRLS fails on row-level security"
           % ext_owner, r.stderr[-1500:])
    r = pg_dump(DBA_BYPASS)
    n = len(sealed_values(admin))
    tap.ok(r.returncode == 0 and r.stdout.count("dmenc1:") == n,
           "pg_dump as a member of the extension owner with BYPASSRLS succeeds, secrets sealed (%d)" % n,
           r.stderr[-1500:])
    for role in (DBA, DBA_BYPASS):
        q(admin, 'DROP ROLE "%s"' % role)
    # what the owner can dump: everything but digime's schema, so none of digime's rows
    r = pg_dump(OWNER, "--exclude-schema=digime")
    tap.ok(r.returncode == 0 and "CREATE EXTENSION IF NOT EXISTS digime" in r.stdout
           and "COPY digime." not in r.stdout and "dmenc1:" not in r.stdout,
           "pg_dump --exclude-schema=digime as the owner succeeds: the extension without its rows",
           r.stderr[-1500:])


# --------------------------------------------------------------------------
# (c) no secret anywhere; clean up
# --------------------------------------------------------------------------
@tap.test
def no_secret_in_any_output():
    secrets = all_secrets()
    tap.ok(len(secrets) > 20, "looking for %d secrets" % len(secrets))
    for what, text in OUTPUTS:
        found = d.find_secrets(text, secrets)
        tap.ok(not found, "no secret in the output of %s (%d bytes)" % (what, len(text)),
               "%d secret(s) found" % len(found))


@tap.test
def cleanup():
    # tokens that only the copies hold go with them; tell 088 (not dmtest.drop_database: it would
    # also discard the copies' duplicates of the original's tokens, which t045 keeps)
    original = d.stored_access_tokens(admin)
    for name in (COPY_PLAIN, COPY_CUSTOM):
        c = d.connect(name)
        only_here = d.stored_access_tokens(c) - original
        d.discard_tokens(only_here)
        c.close()
        q(admin, 'DROP DATABASE "%s" WITH (FORCE)' % name)
        print("# %s dropped (%d tokens only it held)" % (name, len(only_here)))
    shutil.rmtree(DUMPS)
    tap.ok(not os.path.exists(DUMPS), "the dump files are removed")


tap.run()
