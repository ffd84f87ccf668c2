"""070_upgrade: ALTER EXTENSION digime UPDATE from 1.0 to 1.1 after a binary upgrade.

An extra cluster (preloaded, key file) first runs the 1.0 library: it is built from the last
commit of this repository whose digime.control says default_version = '1.0', into
$DM_WORK/build-1.0, and bind-mounted over the installed digime.so for that server only
(dmtest.Cluster.library).  There: CREATE EXTENSION digime VERSION '1.0', two contracts,
grants to an application role, tokens (imported, and real flows through the sandbox), and an
authorization left pending.  Then the server restarts with the installed 1.1 library:
(a) while the extension is 1.0 every call fails with 55000 and the HINT "Run ALTER EXTENSION
    digime UPDATE.", nothing is sent, and the database has no worker;
(b) ALTER EXTENSION digime UPDATE: extversion 1.1; contracts, grants, tokens (values read with
    the key file, sealed values untouched) kept; the database's worker starts; the
    application role runs the new functions, a full flow, a refresh and the pending callback;
(c) catalog facts of the updated database equal those of a database created fresh with 1.1
    and given the same contracts and grants: columns, indexes, constraints, policies,
    triggers, views, sequences, functions (signatures, attributes, ACLs), table, column and
    schema ACLs, comments, extension members and dump configuration.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402
from dmtest import q, q1  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()
C = d.EXAMPLE_CONTRACT
C2 = d.SECOND_CONTRACT
APP = "t070_app"
NAPTIME = 2
state = {}


def sb_valid(access_token):
    return any(t["access_token"] == access_token and t["state"] == "valid" for t in sb.tokens())


def git(*args):
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", d.ROOT] + list(args), check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout


def build_1_0():
    """Builds the 1.0 library (once per work directory); returns (path of digime.so, commit)."""
    # the commit that made 1.1 the default; its parent is the last 1.0
    intro = git("log", "--format=%H", "-G", "default_version = '1.1'", "--", "digime.control").split()[-1]
    commit = git("rev-parse", intro + "^").strip()
    assert "default_version = '1.0'" in git("show", commit + ":digime.control"), "no 1.0 commit found"
    out = os.path.join(d.WORK, "build-1.0")
    so = os.path.join(out, "digime.so")
    if not os.path.exists(so):
        os.makedirs(out, exist_ok=True)
        archive = subprocess.run(["git", "-c", "safe.directory=*", "-C", d.ROOT, "archive", commit],
                                 check=True, stdout=subprocess.PIPE).stdout
        subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
        subprocess.run(["make", "-s", "-j2", "-C", out, "PG_CONFIG=" + os.path.join(d.PG_BIN, "pg_config"),
                        "with_llvm=no"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.chmod(out, 0o755)
    return so, commit


def secrets_of(conn):
    """Every stored secret as stored: {(table, column, row key): text}."""
    out = {}
    for table, key_col, col in (("contracts", "contract_id", "private_key"),
                                ("user_tokens", "id", "access_token"),
                                ("user_tokens", "id", "refresh_token"),
                                ("authorizations", "id", "code_verifier")):
        for k, v in q(conn, "SELECT %s::text, %s FROM digime.%s WHERE %s IS NOT NULL"
                      % (key_col, col, table, col)):
            out[(table, col, k)] = v
    return out


def mint_doc():
    p = sb.mint(d.EXAMPLE_APP, C)[0]
    return {"accessToken": {"value": p["access_token"], "expiry": p["access_expires_on"]},
            "refreshToken": {"value": p["refresh_token"], "expiry": p["refresh_expires_on"]},
            "user": {"id": p["user_id"]}, "consentid": p["consentid"]}


# --------------------------------------------------------------------------
@tap.test
def on_1_0():
    so, commit = build_1_0()
    print("# 1.0 library built from %s" % commit[:12])
    cl = state["cl"] = d.extra_cluster("t070", {"digime.worker_naptime": NAPTIME}, library=so, start=False)
    key_path = os.path.join(cl.keys, "k.key")
    state["key"] = d.write_key_file(key_path)
    cl.settings["digime.key_file"] = key_path
    cl.start()
    root = cl.connect()
    q(root, "CREATE ROLE %s LOGIN" % APP)
    q(root, "CREATE DATABASE up")
    c = cl.connect("up")
    q(c, "CREATE EXTENSION digime VERSION '1.0'")
    tap.eq(q1(c, "SELECT extversion FROM pg_extension WHERE extname = 'digime'"), "1.0", "CREATE EXTENSION "
           "digime VERSION '1.0'")
    tap.eq(d.activity(root), [], "the 1.0 library runs (it has no launcher)")
    for cid, key in ((C, "digime-example/read-data.key"), (C2, "keys/second.pem")):
        q(c, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (cid, d.EXAMPLE_APP, d.fixture_key(key)))
        q(c, "SELECT digime.digime_grant_contract(%s, %s)", (cid, APP))
    app = cl.connect("up", APP)
    toks = {}
    toks["app_flow"] = d.full_authorization(app, sb, C, state="t070-app-1")["id"]
    toks["app_import"] = q1(app, "SELECT id FROM digime.digime_import_token(%s, %s)", (C, json.dumps(mint_doc())))
    toks["admin_flow"] = d.full_authorization(c, sb, C2, state="t070-admin-1")["id"]
    toks["admin_import"] = q1(c, "SELECT id FROM digime.digime_import_token(%s, %s)", (C, json.dumps(mint_doc())))
    q(app, "SELECT id FROM digime.digime_refresh_token(%s)", (toks["app_flow"],))
    url, _, _ = d.authorize(app, C, state="t070-pending")
    state["pending"] = sb.follow(url)
    d.record_secret(dict(d.query_pairs(state["pending"])).get("code"))
    state["toks"] = toks
    state["values"] = {k: d.token_json(c, t) for k, t in toks.items()}
    tap.ok(all(sb_valid(v["accessToken"]["value"]) for v in state["values"].values()),
           "1.0: two contracts granted to %s, four tokens (flows, imports), all valid at digi.me" % APP)
    state["sealed"] = secrets_of(c)
    kid = d.key_id(state["key"])
    tap.ok(len(state["sealed"]) == 2 + 2 * 4 + 1 and
           all(v.startswith("dmenc1:%s:" % kid) for v in state["sealed"].values()),
           "1.0: every secret is sealed with the key file (%d values)" % len(state["sealed"]))
    state["contracts"] = q(c, "SELECT * FROM digime.contracts_info ORDER BY contract_id")
    state["grants"] = q(c, "SELECT contract_id, grantee::text FROM digime.contract_grants ORDER BY 1, 2")
    state["token_rows"] = q(c, "SELECT id, contract_id, owner_role::text, end_user, user_id, consent_id, "
                               "access_token_expires_at, refresh_token_expires_at, state, account_reference "
                               "FROM digime.user_tokens ORDER BY id")
    for x in (app, c, root):
        x.close()


@tap.test
def library_1_1_on_extension_1_0():
    cl = state["cl"]
    cl.stop()
    cl.library = None
    cl.start()
    root = cl.connect()
    c = cl.connect("up")
    app = cl.connect("up", APP)
    tap.eq(q1(c, "SELECT extversion FROM pg_extension WHERE extname = 'digime'"), "1.0",
           "restarted with the 1.1 library: the extension is still 1.0")
    d.wait_for(lambda: d.launcher_pid(root), timeout=10)
    tap.ok(d.launcher_pid(root) is not None, "the 1.1 launcher runs")
    tok = state["toks"]["app_flow"]
    s0 = sb.last_seq()
    calls = [
        ("digime_user_access_token", "SELECT digime.digime_user_access_token(%s)", (tok,)),
        ("digime_refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)", (tok,)),
        ("digime_authorize_url", "SELECT * FROM digime.digime_authorize_url(%s, %s, %s)",
         (C, "https://app.example/return", "t070-x")),
        ("digime_handle_callback", "SELECT * FROM digime.digime_handle_callback(%s)", (state["pending"],)),
        ("digime_import_token", "SELECT * FROM digime.digime_import_token(%s, %s)",
         (C, json.dumps({"accessToken": {"value": "at-x", "expiry": 1}, "refreshToken": {"value": "rt-x", "expiry": 1}}))),
    ]
    for who, conn in (("superuser", c), (APP, app)):
        for label, sql, args in calls:
            e = d.error(conn, sql, args)
            tap.ok(e is not None and e[0] == "55000" and e[3] == "Run ALTER EXTENSION digime UPDATE.",
                   "%s, extension 1.0: %s -> 55000, HINT ALTER EXTENSION digime UPDATE" % (who, label), repr(e))
    e = d.error(c, "SELECT * FROM digime.digime_add_contract('x', 'y', 'z')")
    tap.ok(e is not None and e[0] == "55000" and e[3] == "Run ALTER EXTENSION digime UPDATE.",
           "superuser, extension 1.0: digime_add_contract -> 55000 with the HINT", repr(e))
    tap.eq(d.api_records(sb, s0), [], "nothing was sent to digi.me")
    seen = []
    d.wait_for(lambda: seen.extend(r for r in d.activity(root) if r["datname"] == "up"
                                   and r["state"] == "idle") and False, timeout=NAPTIME + 1)
    tap.eq(seen, [], "no worker serves the database while its extension is 1.0")
    for x in (app, c, root):
        x.close()


@tap.test
def update():
    cl = state["cl"]
    root = cl.connect()
    c = cl.connect("up")
    q(c, "ALTER EXTENSION digime UPDATE")
    tap.eq(q1(c, "SELECT extversion FROM pg_extension WHERE extname = 'digime'"), "1.1",
           "ALTER EXTENSION digime UPDATE: extversion 1.1")
    pid, dt = d.wait_db_worker(root, "up", timeout=NAPTIME + 8)
    print("# figure: worker start after ALTER EXTENSION UPDATE: %.2f s" % dt)
    tap.ok(pid is not None and dt < NAPTIME + 1, "the database's worker starts (%.2f s)" % dt)
    tap.eq(q(c, "SELECT * FROM digime.contracts_info ORDER BY contract_id"), state["contracts"],
           "contracts kept (contracts_info)")
    tap.eq(q(c, "SELECT contract_id, grantee::text FROM digime.contract_grants ORDER BY 1, 2"), state["grants"],
           "grants kept")
    tap.eq(q(c, "SELECT id, contract_id, owner_role::text, end_user, user_id, consent_id, "
                "access_token_expires_at, refresh_token_expires_at, state, account_reference "
                "FROM digime.user_tokens ORDER BY id"), state["token_rows"], "token rows kept")
    tap.eq(set(q(c, "SELECT status, refresh_failures, last_error FROM digime.user_tokens")), {("active", 0, None)},
           "... with the new columns at their defaults (active, 0 failures, no error)")
    tap.eq(secrets_of(c), state["sealed"], "sealed values untouched by the update")
    tap.eq(q1(c, "SELECT digime.digime_encryption_key_id()"), d.key_id(state["key"]), "the key file is loaded")
    tap.eq({k: d.token_json(c, t) for k, t in state["toks"].items()}, state["values"],
           "digime_user_access_token returns every token's values as under 1.0")
    root.close()
    c.close()


@tap.test
def application_role_after_update():
    cl = state["cl"]
    app = cl.connect("up", APP)
    toks = state["toks"]
    s0 = sb.last_seq()
    mine = [toks["app_flow"], toks["app_import"]]
    v = q1(app, "SELECT digime.digime_valid_access_token(%s)", (toks["app_flow"],))
    tap.eq(v, state["values"]["app_flow"], "%s: digime_valid_access_token of its fresh token" % APP)
    row = q(app, "SELECT id FROM digime.digime_handle_callback(%s)", (state["pending"],))
    tap.ok(len(row) == 1 and sb_valid(d.token_json(app, row[0][0])["accessToken"]["value"]),
           "%s: the authorization started under 1.0 completes" % APP)
    mine.append(row[0][0])
    url, _, _ = d.authorize(app, C, state="t070-app-inbox")
    loc = sb.follow(url)
    d.record_secret(dict(d.query_pairs(loc)).get("code"))
    inbox = q1(app, "SELECT digime.digime_submit_callback(%s)", (loc,))
    done, dt = d.wait_for(lambda: q(app, "SELECT status, token_id FROM digime.callback_inbox WHERE id = %s",
                                    (inbox,))[0][0] != "pending" and
                          q(app, "SELECT status, token_id FROM digime.callback_inbox WHERE id = %s", (inbox,))[0],
                          timeout=NAPTIME + 8)
    tap.ok(done and done[0] == "done" and done[1] is not None,
           "%s: digime_submit_callback: the worker completes it (%.2f s)" % (APP, dt), repr(done))
    if done and done[1]:
        mine.append(done[1])
    tok = d.full_authorization(app, sb, C, state="t070-app-2")["id"]
    mine.append(tok)
    tap.ok(sb_valid(d.token_json(app, tok)["accessToken"]["value"]), "%s: a full flow" % APP)
    q(app, "SELECT id FROM digime.digime_refresh_token(%s)", (toks["app_import"],))
    tap.ok(sb_valid(d.token_json(app, toks["app_import"])["accessToken"]["value"]),
           "%s: a refresh of a token imported under 1.0" % APP)
    r = q(app, "CALL digime.digime_refresh_expiring(within => '10 years')")
    tap.eq(r, [(len(mine), 0, 0, 0)], "%s: CALL digime_refresh_expiring refreshes its %d tokens" % (APP, len(mine)))
    tap.ok(all(sb_valid(d.token_json(app, t)["accessToken"]["value"]) for t in mine),
           "... all of them hold digi.me's current tokens")
    tap.eq(d.error(app, "SELECT digime.digime_user_access_token(%s)", (toks["admin_flow"],))[0], "42501",
           "%s still cannot read the administrator's token" % APP)
    tap.ok(len(d.api_records(sb, s0, "oauth/token")) >= 4, "the requests reached digi.me")
    app.close()


# --------------------------------------------------------------------------
# (c) catalog facts: updated versus fresh 1.1
# --------------------------------------------------------------------------
FACTS = {
    "relations": """
        SELECT c.relname, c.relkind::text, c.relrowsecurity, c.relforcerowsecurity,
               coalesce(c.reloptions::text, ''), c.relpersistence::text
          FROM pg_class c WHERE c.relnamespace = 'digime'::regnamespace""",
    "columns": """
        SELECT c.relname || '.' || a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               coalesce(pg_get_expr(ad.adbin, ad.adrelid), ''), a.attidentity::text, a.attgenerated::text,
               coalesce(a.attcollation::regcollation::text, '')
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
         WHERE c.relnamespace = 'digime'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped""",
    "indexes": """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'digime'::regnamespace""",
    "constraints": """
        SELECT conrelid::regclass::text || ' ' || conname, contype::text, pg_get_constraintdef(oid), convalidated
          FROM pg_constraint WHERE connamespace = 'digime'::regnamespace""",
    "policies": """
        SELECT tablename || ' ' || policyname, permissive, roles::text, cmd, coalesce(qual, ''),
               coalesce(with_check, '')
          FROM pg_policies WHERE schemaname = 'digime'""",
    "triggers": """
        SELECT tgrelid::regclass::text || ' ' || tgname, pg_get_triggerdef(oid), tgenabled::text
          FROM pg_trigger WHERE NOT tgisinternal
           AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'digime'::regnamespace)""",
    "views": """
        SELECT c.relname, pg_get_viewdef(c.oid)
          FROM pg_class c WHERE c.relnamespace = 'digime'::regnamespace AND c.relkind = 'v'""",
    "sequences": """
        SELECT s.seqrelid::regclass::text, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax,
               s.seqmin, s.seqcache, s.seqcycle,
               coalesce((SELECT refobjid::regclass::text || '.' || refobjsubid FROM pg_depend
                          WHERE classid = 'pg_class'::regclass AND objid = s.seqrelid AND deptype = 'a'
                            AND refclassid = 'pg_class'::regclass), '')
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
         WHERE c.relnamespace = 'digime'::regnamespace""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid), p.prokind::text, p.prosecdef,
               p.provolatile::text, p.proparallel::text, p.proisstrict, coalesce(p.proconfig::text, ''),
               l.lanname, pg_get_function_arguments(p.oid),
               CASE WHEN l.lanname = 'c' THEN p.prosrc || ' ' || p.probin ELSE md5(p.prosrc) END
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'digime'::regnamespace""",
    "function ACLs": """
        SELECT p.oid::regprocedure::text || ' ' || coalesce(g.rolname, 'PUBLIC'), string_agg(
                 a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END, ',' ORDER BY a.privilege_type)
          FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f'::"char", p.proowner))) a
          LEFT JOIN pg_roles g ON g.oid = a.grantee
         WHERE p.pronamespace = 'digime'::regnamespace
         GROUP BY 1""",
    "table ACLs": """
        SELECT c.relname || ' ' || coalesce(g.rolname, 'PUBLIC'), string_agg(
                 a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END, ',' ORDER BY a.privilege_type)
          FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char",
                                                                    c.relowner))) a
          LEFT JOIN pg_roles g ON g.oid = a.grantee
         WHERE c.relnamespace = 'digime'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'p')
         GROUP BY 1""",
    "column ACLs": """
        SELECT c.relname || '.' || att.attname || ' ' || coalesce(g.rolname, 'PUBLIC'), string_agg(
                 a.privilege_type || CASE WHEN a.is_grantable THEN '*' ELSE '' END, ',' ORDER BY a.privilege_type)
          FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid, aclexplode(att.attacl) a
          LEFT JOIN pg_roles g ON g.oid = a.grantee
         WHERE c.relnamespace = 'digime'::regnamespace AND att.attacl IS NOT NULL
         GROUP BY 1""",
    "schema ACL": """
        SELECT coalesce(g.rolname, 'PUBLIC'), string_agg(a.privilege_type, ',' ORDER BY a.privilege_type)
          FROM pg_namespace n, aclexplode(n.nspacl) a LEFT JOIN pg_roles g ON g.oid = a.grantee
         WHERE n.nspname = 'digime' GROUP BY 1""",
    "comments": """
        SELECT pg_describe_object(classoid, objoid, objsubid), description
          FROM pg_description
         WHERE (classoid = 'pg_class'::regclass AND objoid IN
                  (SELECT oid FROM pg_class WHERE relnamespace = 'digime'::regnamespace))
            OR (classoid = 'pg_proc'::regclass AND objoid IN
                  (SELECT oid FROM pg_proc WHERE pronamespace = 'digime'::regnamespace))""",
    "extension members": """
        SELECT pg_describe_object(classid, objid, objsubid), deptype::text
          FROM pg_depend WHERE refclassid = 'pg_extension'::regclass
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'digime')""",
    "extension": """
        SELECT extname, extversion, extrelocatable, extnamespace::regnamespace::text,
               (SELECT array_agg(x::regclass::text ORDER BY x::regclass::text) FROM unnest(extconfig) x)::text,
               extcondition::text
          FROM pg_extension WHERE extname = 'digime'""",
}


def facts(conn, what):
    return {r[0]: tuple(r[1:]) for r in q(conn, FACTS[what])}


def diff(a, b):
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append("%s\n  updated: %r\n  fresh:   %r" % (k, a.get(k), b.get(k)))
    return "\n".join(out[:12]) + ("\n... %d differences" % len(out) if len(out) > 12 else "")


@tap.test
def catalog_matches_fresh_install():
    cl = state["cl"]
    root = cl.connect()
    q(root, "CREATE DATABASE fresh")
    f = cl.connect("fresh")
    q(f, "CREATE EXTENSION digime")
    for cid, key in ((C, "digime-example/read-data.key"), (C2, "keys/second.pem")):
        q(f, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (cid, d.EXAMPLE_APP, d.fixture_key(key)))
        q(f, "SELECT digime.digime_grant_contract(%s, %s)", (cid, APP))
    u = cl.connect("up")
    for what in FACTS:
        a, b = facts(u, what), facts(f, what)
        tap.ok(a == b and len(b) > 0, "updated = fresh 1.1: %s (%d)" % (what, len(b)), diff(a, b))
    # revoking the contracts granted under 1.0 takes away everything, as for a 1.1 grant
    for conn in (u, f):
        for cid in (C, C2):
            q(conn, "SELECT digime.digime_revoke_contract(%s, %s)", (cid, APP))
    for what in ("function ACLs", "table ACLs", "column ACLs", "schema ACL"):
        a, b = facts(u, what), facts(f, what)
        tap.ok(a == b, "after digime_revoke_contract, updated = fresh 1.1: %s" % what, diff(a, b))
        tap.eq([k for k in a if APP in k], [], "... %s has no %s left" % (APP, what))
    for x in (u, f, root):
        x.close()


@tap.test
def log_and_stop():
    cl = state["cl"]
    secrets = sb.secrets()["values"] + d.recorded_secrets()
    tap.eq(d.find_secrets(cl.log_text(), secrets), [], "no secret in the extra cluster's log")
    cl.stop()


tap.run()
