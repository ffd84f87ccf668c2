"""065_standby: digime on a streaming standby, and in READ ONLY transactions on a primary.

An extra primary (preloaded, key file) and a standby made from it with pg_basebackup -R:
(a) on the standby no digime process runs (the launcher starts only once recovery is over);
(b) every function that would write or talk to digi.me refuses there with 25006, and the
    sandbox receives no request; digime_user_access_token and digime_valid_access_token of
    a fresh token read as on the primary;
(c) on the primary, the same calls in a READ ONLY transaction (BEGIN READ ONLY, and
    default_transaction_read_only) give 25006 with nothing sent; afterwards, read-write,
    the same callback and refresh succeed (nothing was used up);
(d) once the standby is promoted, the launcher starts its worker and a refresh works.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402
from dmtest import q, q1  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()
C = d.EXAMPLE_CONTRACT
NAPTIME = 2
CB = "https://app.example/return"
state = {}


def pending(conn, st):
    """A passed consent page: (callback URL, code, code_verifier)."""
    url, verifier, _ = d.authorize(conn, C, callback=CB, state=st)
    loc = sb.follow(url)
    code = dict(d.query_pairs(loc)).get("code")
    d.record_secret(code)
    return loc, code, verifier


def sb_valid(access_token):
    return any(t["access_token"] == access_token and t["state"] == "valid" for t in sb.tokens())


def writers(loc, code, verifier, tok):
    """(label, sql, args) of every call that writes or would send a request to digi.me."""
    return [
        ("digime_handle_callback", "SELECT * FROM digime.digime_handle_callback(%s)", (loc,)),
        ("digime_exchange_code", "SELECT * FROM digime.digime_exchange_code(%s, %s, %s)", (C, code, verifier)),
        ("digime_refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)", (tok,)),
        ("digime_authorize_url", "SELECT * FROM digime.digime_authorize_url(%s, %s, %s)", (C, CB, "t065-x")),
        ("digime_reauthorize_url", "SELECT * FROM digime.digime_reauthorize_url(%s, %s)", (tok, CB)),
        ("digime_submit_callback", "SELECT digime.digime_submit_callback(%s)", (loc,)),
        ("digime_refresh_expiring", "CALL digime.digime_refresh_expiring(within => '10 years')", None),
        ("digime_process_inbox", "CALL digime.digime_process_inbox()", None),
        ("digime_valid_access_token (due for a refresh)",
         "SELECT digime.digime_valid_access_token(%s, '10 years')", (tok,)),
    ]


def readers_agree(label, conn, ref, tok):
    """digime_user_access_token and digime_valid_access_token read the fresh token as on ref."""
    want = d.token_json(ref, tok)
    tap.eq(d.token_json(conn, tok), want, "%s: digime_user_access_token reads the token" % label)
    v = q1(conn, "SELECT digime.digime_valid_access_token(%s)", (tok,))
    tap.eq(v, want, "%s: digime_valid_access_token of a fresh token returns it without a refresh" % label)


# --------------------------------------------------------------------------
@tap.test
def setup():
    p = state["p"] = d.extra_cluster("t065p", {"digime.worker_naptime": NAPTIME}, start=False)
    key_path = os.path.join(p.keys, "k.key")
    d.write_key_file(key_path)
    p.settings["digime.key_file"] = key_path
    p.start()
    root = p.connect()
    q(root, "CREATE DATABASE s")
    c = p.connect("s")
    q(c, "CREATE EXTENSION digime")
    d.add_example_contract(c)
    state["tok"] = d.full_authorization(c, sb, C, state="t065-1")["id"]
    state["pending"] = pending(c, "t065-2")
    worker, _ = d.wait_db_worker(root, "s", timeout=NAPTIME + 8)
    tap.ok(worker is not None and d.launcher_pid(root) is not None, "primary: launcher and worker of s run")

    s = state["s"] = p.make_standby("t065s")
    s.start()
    lsn = q1(root, "SELECT pg_current_wal_lsn()")
    sroot = s.connect()
    caught_up, dt = d.wait_for(lambda: q1(sroot, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)),
                               timeout=30)
    tap.ok(q1(sroot, "SELECT pg_is_in_recovery()") and caught_up,
           "standby (pg_basebackup -R) in recovery, streaming, caught up (%.2f s)" % dt)
    c.close()
    root.close()
    sroot.close()


@tap.test
def no_worker_on_standby():
    s = state["s"]
    sroot = s.connect()
    seen = []
    # watch for two naptimes: a launcher would have started workers by then
    d.wait_for(lambda: seen.extend(d.activity(sroot)) and False, timeout=2 * NAPTIME + 1, interval=0.05)
    tap.eq(seen, [], "standby: no digime launcher or worker in pg_stat_activity (%d s watched)" % (2 * NAPTIME + 1))
    tap.ok('starting background worker process "digime' not in s.log_text(),
           "standby: the postmaster started no digime process", s.log_text()[-1500:])
    sroot.close()


@tap.test
def refused_on_standby():
    p, s = state["p"], state["s"]
    tok = state["tok"]
    loc, code, verifier = state["pending"]
    pc = p.connect("s")
    sc = s.connect("s")
    before = d.token_json(pc, tok)
    s0 = sb.last_seq()
    for label, sql, args in writers(loc, code, verifier, tok):
        e = d.error(sc, sql, args)
        tap.ok(e is not None and e[0] == "25006", "standby: %s -> 25006" % label, repr(e))
    tap.eq(sb.requests(s0), [], "standby: the sandbox received no request at all")
    readers_agree("standby", sc, pc, tok)
    tap.eq(sb.requests(s0), [], "standby: ... not even after the reads")
    tap.eq(d.token_json(pc, tok), before, "primary: the token is unchanged")
    tap.eq(q1(pc, "SELECT status FROM digime.authorizations WHERE state = 't065-2'"), "pending",
           "primary: the authorization is still pending")
    pc.close()
    sc.close()


def read_only_refusals(label, conn, begin):
    tok = state["tok"]
    loc, code, verifier = state["pending"]
    s0 = sb.last_seq()
    for name, sql, args in writers(loc, code, verifier, tok):
        if begin:
            q(conn, "BEGIN TRANSACTION READ ONLY")
        e = d.error(conn, sql, args)
        if begin:
            q(conn, "ROLLBACK")
        tap.ok(e is not None and e[0] == "25006", "%s: %s -> 25006" % (label, name), repr(e))
    tap.eq(d.api_records(sb, s0), [], "%s: nothing was sent to digi.me" % label)


@tap.test
def read_only_on_primary():
    p = state["p"]
    tok = state["tok"]
    loc = state["pending"][0]
    c = p.connect("s")
    ref = p.connect("s")
    before = d.token_json(c, tok)
    n_tokens = q1(c, "SELECT count(*) FROM digime.user_tokens")
    n_inbox = q1(c, "SELECT count(*) FROM digime.callback_inbox")
    read_only_refusals("BEGIN READ ONLY", c, True)
    q(c, "BEGIN TRANSACTION READ ONLY")
    readers_agree("BEGIN READ ONLY", c, ref, tok)
    q(c, "ROLLBACK")
    q(c, "SET default_transaction_read_only = on")
    read_only_refusals("default_transaction_read_only", c, False)
    readers_agree("default_transaction_read_only", c, ref, tok)
    q(c, "RESET default_transaction_read_only")
    tap.eq(d.token_json(c, tok), before, "the token is unchanged")
    tap.eq((q1(c, "SELECT count(*) FROM digime.user_tokens"), q1(c, "SELECT count(*) FROM digime.callback_inbox")),
           (n_tokens, n_inbox), "no token or inbox row was added")
    refused = q(c, "SELECT action, sqlstate, count(*) FROM digime.audit_log WHERE sqlstate = '25006' "
                   "GROUP BY 1, 2 ORDER BY 1")
    print("# audit rows of the refused calls (written by the worker): %r" % (refused,))
    # read-write again: the callback and the token were not used up
    row = q(c, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    tap.ok(len(row) == 1 and sb_valid(d.token_json(c, row[0][0])["accessToken"]["value"]),
           "read-write again: the same callback completes")
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.ok(sb_valid(d.token_json(c, tok)["accessToken"]["value"]), "... and the token refreshes")
    c.close()
    ref.close()


@tap.test
def promotion():
    # after promotion the launcher starts (BgWorkerStart_RecoveryFinished) and serves the database
    p, s = state["p"], state["s"]
    p.stop()
    sroot = s.connect()
    tap.eq(q1(sroot, "SELECT pg_promote(true, 30)"), True, "the standby is promoted")
    worker, dt = d.wait_db_worker(sroot, "s", timeout=NAPTIME + 8)
    tap.ok(d.launcher_pid(sroot) is not None and worker is not None,
           "promoted: the launcher runs and the worker of s starts (%.2f s)" % dt)
    c = s.connect("s")
    tok = state["tok"]
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.ok(sb_valid(d.token_json(c, tok)["accessToken"]["value"]), "promoted: a refresh works")
    c.close()
    sroot.close()


@tap.test
def logs_and_stop():
    secrets = sb.secrets()["values"] + d.recorded_secrets()
    for cl in (state["p"], state["s"]):
        tap.eq(d.find_secrets(cl.log_text(), secrets), [], "no secret in the log of %s" % cl.name)
    state["s"].stop()
    state["p"].stop()


tap.run()
