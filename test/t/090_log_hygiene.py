"""090_log_hygiene: runs last.  The main cluster ran the whole suite (pg_regress
included) with log_statement = all, log_min_messages = debug1 and
log_min_error_statement = debug1; no secret the suite created may appear in its
log: the sandbox's issued and received secrets, the values recorded with
dmtest.record_secret(), and the fixture contract keys.
"""
import hashlib
import os
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402

tap = d.Tap()


def label(secret):
    """Names a secret in TAP output without printing it."""
    return "%s... (%d chars, sha256 %s)" % (secret[:3], len(secret), hashlib.sha256(secret.encode()).hexdigest()[:12])


@tap.test
def secrets_in_failing_statements():
    """Statements with secrets that PostgreSQL itself rejects (input syntax errors quote the
    input in CONTEXT/DETAIL): their secrets must not reach the log either."""
    conn = d.fresh_db("t090")
    at, rt = "t090-at-%s" % os.urandom(8).hex(), "t090-rt-%s" % os.urandom(8).hex()
    d.record_secret(at)
    d.record_secret(rt)
    bad_json = '{"accessToken":{"value":"%s","expiry":1900000000},"refreshToken":{"value":"%s",' % (at, rt)
    err = d.error(conn, "SELECT * FROM digime.digime_import_token('c', %s)", (bad_json,))
    tap.eq(err and err[0], "22P02", "malformed JSON is refused by jsonb input")
    err = d.error(conn, "SELECT * FROM digime.digime_import_token('c', %s::jsonb)", ('{"x": "%s" ' % at,))
    tap.eq(err and err[0], "22P02", "malformed JSON with an explicit cast too")
    conn.close()


@tap.test
def no_secret_in_server_log():
    sandbox = d.Sandbox().secrets()["values"]
    recorded = d.recorded_secrets()
    fixtures = d.fixture_key_bodies()
    secrets = sorted(set(s for s in sandbox + recorded + fixtures if len(s) >= d.SECRET_MIN_LEN))
    tap.ok(len(sandbox) >= 10, "the sandbox issued or received secrets (%d)" % len(sandbox))
    tap.ok(len(recorded) >= 10, "the tests recorded secrets (%d)" % len(recorded))
    tap.ok(len(fixtures) == 2 and all(len(f) > 1000 for f in fixtures), "both fixture keys are included")

    with open(d.server_log_path(), errors="replace") as f:
        log = f.read()
    statements = log.count("LOG:  statement: ")
    tap.ok(len(log) > 100000 and statements > 500,
           "the log is substantial (%d bytes, %d statements)" % (len(log), statements))
    tap.ok("digime_handle_callback('***')" in log, "the log has redacted handle_callback statements")
    tap.ok("digime_add_contract('***', '***', '***')" in log, "the log has redacted add_contract statements")
    tap.ok("digime_user_access_token(" in log and "digime_authorize_url(" in log,
           "the log has the flow's statements")

    # the scan finds what it looks for: a secret inside a line, a PEM logged with its line
    # breaks (as a STATEMENT continuation), a URL-encoded value
    pem = open(os.path.join(d.ROOT, "test", "fixtures", "keys", "second.pem")).read()
    tok = next(s for s in sandbox if s.startswith("at-"))
    planted = ("LOG:  statement: SELECT 'x%sy'\n" % tok +
               "STATEMENT:  SELECT f('%s')\n" % pem.replace("\n", "\n\t") +
               "LOG:  statement: SELECT '%s'\n" % urllib.parse.quote("a+b/c=" + fixtures[0][:40], safe=""))
    found = d.find_secrets(planted, [tok, d.pem_body(pem), "a+b/c=" + fixtures[0][:40], "never-in-there"])
    tap.eq(len(found), 3, "self-check: a token, a multi-line PEM and a URL-encoded value are found")

    leaked = d.find_secrets(log, secrets)
    where = []
    for s in leaked[:10]:
        lines = [i + 1 for i, l in enumerate(log.splitlines())
                 if any(n in l for n in d.secret_needles(s))][:5]
        where.append("%s at log lines %s" % (label(s), lines))
    tap.ok(not leaked, "none of the %d secrets appears in %s" % (len(secrets), d.server_log_path()),
           "%d leaked:\n%s" % (len(leaked), "\n".join(where)))


tap.run()
