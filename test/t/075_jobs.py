"""075_jobs: what triggers and scheduled jobs call — the callback inbox, batch refresh, token
health, the valid-token getter, automatic refresh, retention and the audit trail.

Values come from the sandbox (issued pairs, recorded requests) and from the tables.
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from dmtest import error, q, q1  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
sb.reset(everything=True)
DB = "t075"
conn = dmtest.fresh_db(DB)
APP = dmtest.EXAMPLE_APP
C1 = dmtest.EXAMPLE_CONTRACT
dmtest.add_example_contract(conn)
ROLE_A, ROLE_B = "t075_app_a", "t075_app_b"
for r in (ROLE_A, ROLE_B):
    dmtest.ensure_role(r, "LOGIN")
    q(conn, "SELECT digime.digime_grant_contract(%s, %s)", (C1, r))
conn_a = dmtest.connect_as(DB, ROLE_A)
conn_b = dmtest.connect_as(DB, ROLE_B)
_n = [0]


def state():
    _n[0] += 1
    return "t075-%d" % _n[0]


def callback_url(c=None, st=None):
    url, _, _ = dmtest.authorize(c or conn, C1, state=st or state())
    loc = sb.follow(url)
    dmtest.record_secret(dict(dmtest.query_pairs(loc)).get("code"))
    return loc




def inbox_row(c, iid):
    r = q(c, "SELECT status, token_id, sqlstate, message, attempts, callback_url "
             "FROM digime.callback_inbox WHERE id = %s", (iid,))
    return r[0] if r else None


def inbox_finished(c, iid, timeout=15.0):
    return dmtest.wait_value(lambda: (lambda r: r if r and r[0] != "pending" else None)(inbox_row(c, iid)), timeout)


def minted_tokens(n, c=None, expires_in="1 minute"):
    """n token pairs minted by the sandbox, imported, expiring soon; returns [(id, pair)]."""
    pairs = sb.mint(APP, C1, count=n)
    out = []
    for p in pairs:
        dmtest.record_secret(p["access_token"])
        dmtest.record_secret(p["refresh_token"])
        doc = {"accessToken": {"value": p["access_token"], "expiry": p["access_expires_on"]},
               "refreshToken": {"value": p["refresh_token"], "expiry": p["refresh_expires_on"]},
               "user": {"id": p["user_id"]}, "consentid": p["consentid"]}
        tid = q1(c or conn, "SELECT id FROM digime.digime_import_token(%s, %s)", (C1, json.dumps(doc)))
        out.append((tid, p))
    ids = [t for t, _ in out]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + %s::interval "
            "WHERE id = ANY(%s)", (expires_in, ids))
    return out


def current_access(tid):
    return dmtest.token_json(conn, tid)["accessToken"]["value"]


def sandbox_state(access_token):
    for p in sb.tokens():
        if p["access_token"] == access_token:
            return p["state"]
    return None


# --------------------------------------------------------------------------
@tap.test
def inbox_submit_and_notify():
    listener = dmtest.connect(DB, user=ROLE_A)
    q(listener, "LISTEN digime_token")
    loc = callback_url(conn_a)
    s0 = sb.last_seq()
    iid = q1(conn_a, "SELECT digime.digime_submit_callback(%s)", (loc,))
    row = inbox_finished(conn_a, iid)
    tap.ok(row is not None and row[0] == "done" and row[1] is not None,
           "digime_submit_callback: the worker completes the row (done, token_id)", row)
    if row is None:
        return
    tap.eq(q(conn_a, "SELECT owner_role::text FROM digime.user_tokens WHERE id = %s", (row[1],)),
           [(ROLE_A,)], "the token belongs to the submitting role")
    tap.eq(current_access(row[1]), sb.tokens()[-1]["access_token"], "with the issued values")
    tap.eq(len(dmtest.api_records(sb, s0, "oauth/token")), 1, "one code exchange")
    tap.ok("code=&" in row[5] or row[5].endswith("code="), "the code is cleared from the stored URL")
    tap.eq(row[4], 1, "attempts = 1")
    time.sleep(0.2)
    listener.poll()
    payloads = [json.loads(n.payload) for n in listener.notifies]
    tap.eq(payloads, [{"inbox_id": iid, "token_id": row[1], "status": "done"}],
           "NOTIFY digime_token with inbox_id, token_id, status")
    listener.close()
    # the same URL again through handle_callback: the same token
    tap.eq(q1(conn_a, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,)), row[1],
           "digime_handle_callback with the same URL returns the inbox's token")


@tap.test
def inbox_insert_and_rollback():
    loc = callback_url(conn_a)
    s0 = sb.last_seq()
    q(conn_a, "BEGIN")
    iid = q1(conn_a, "INSERT INTO digime.callback_inbox (callback_url) VALUES (%s) RETURNING id", (loc,))
    time.sleep(1.0)
    tap.eq(inbox_row(conn_a, iid)[0], "pending", "an uncommitted INSERT is not processed")
    q(conn_a, "ROLLBACK")
    time.sleep(0.5)
    tap.eq(dmtest.api_records(sb, s0, "oauth/token"), [], "a rolled-back INSERT sends nothing")
    row = q(conn_a, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    tap.ok(row and row[0][0] is not None, "and its code is still usable")
    # malformed URLs are refused at INSERT with 22023
    for bad in ("not a url at all", "https://x.example/cb?state=s&code=c",
                "https://x.example/cb?success=true&code=c", "https://x.example/cb?success=true&state=s",
                "https://x.example/cb?success=true&state=s&state=t&code=c",
                "https://x.example/cb?success=maybe&state=s&code=c"):
        err = error(conn_a, "INSERT INTO digime.callback_inbox (callback_url) VALUES (%s)", (bad,))
        tap.eq(err and err[0], "22023", "malformed callback URL refused at INSERT: %s" % bad[:40])
        err = error(conn_a, "SELECT digime.digime_submit_callback(%s)", (bad,))
        tap.eq(err and err[0], "22023", "... and by digime_submit_callback")
    tap.eq(q1(conn_a, "SELECT count(*) FROM digime.callback_inbox WHERE id > %s", (iid,)), 0,
           "no row written for them")
    # an application role cannot fake the bookkeeping
    err = error(conn_a, "INSERT INTO digime.callback_inbox (callback_url, status) VALUES (%s, 'done')",
                (callback_url(conn_a),))
    tap.eq(err and err[0], "42501", "an application role inserts callback_url (and end_user) only")


@tap.test
def inbox_failures():
    # a failed consent
    loc = callback_url(conn_a)
    fail = loc.replace("success=true", "success=false&errorCode=UserCancelled")
    iid = q1(conn_a, "SELECT digime.digime_submit_callback(%s)", (fail,))
    row = inbox_finished(conn_a, iid)
    tap.eq(row and row[:4], ("failed", None, "YD020", "digi.me authorization failed: UserCancelled"),
           "success=false: failed with YD020 and the errorCode")
    # another role's authorization: the worker acts with the rights of owner_role
    loc = callback_url(conn_a)
    s0 = sb.last_seq()
    iid = q1(conn_b, "SELECT digime.digime_submit_callback(%s)", (loc,))
    row = inbox_finished(conn_b, iid)
    tap.eq(row and row[:3], ("failed", None, "42501"),
           "a callback of another role's authorization: failed 42501")
    tap.eq(dmtest.api_records(sb, s0, "oauth/token"), [], "... and nothing was sent")
    tap.eq(q1(conn_a, "SELECT count(*) FROM digime.callback_inbox WHERE id = %s", (iid,)), 0,
           "the owner sees only its own inbox rows")
    tap.ok(q1(conn_a, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,)) is not None,
           "the right role can still complete it")
    # transient failures are retried with back-off
    loc = callback_url(conn_a)
    sb.fault(endpoint="oauth/token", action="error", status=503, code="ServiceUnavailable",
             message="try later", count=2 * 3)  # retry_limit 2: three attempts per round
    iid = q1(conn_a, "SELECT digime.digime_submit_callback(%s)", (loc,))
    row = dmtest.wait_value(lambda: (lambda r: r if r and r[4] >= 1 else None)(inbox_row(conn_a, iid)), 20)
    tap.ok(row and row[0] == "pending" and row[2] == "YD000" and "code=" in row[5] and "code=&" not in row[5],
           "a 503: pending again, SQLSTATE recorded, the code kept for the retry", row)
    row = inbox_finished(conn_a, iid, 30)
    tap.ok(row and row[0] == "done" and row[4] == 3, "done after two back-offs (attempts 3)", row)
    tap.eq(sb.faults(), [], "all 503s were used")


@tap.test
def process_inbox_procedure():
    loc = callback_url(conn_a)
    q(conn_a, "BEGIN")
    iid = q1(conn_a, "SELECT digime.digime_submit_callback(%s)", (loc,))
    q(conn_a, "COMMIT")
    res = q(conn_a, "CALL digime.digime_process_inbox()")
    row = inbox_row(conn_a, iid)
    tap.ok(row[0] == "done", "CALL digime_process_inbox(): the row is done when it returns", row)
    tap.ok(res[0][0] in (0, 1) and res[0][1] == 0 and res[0][2] == 0,
           "returns (done, failed, retrying); the worker may have taken it first", res)


@tap.test
def batch_refresh_200():
    toks = minted_tokens(200)
    dead = toks[57]
    sb.expire(refresh_token=dead[1]["refresh_token"])
    t0 = time.time()
    conn.notices.clear()
    res = q(conn, "CALL digime.digime_refresh_expiring(within => '15 minutes', concurrency => 8)")[0]
    dt = time.time() - t0
    tap.eq(tuple(res), (199, 0, 1, 0), "200 expiring, one refused: refreshed 199, needs_reauthorization 1")
    changed = [t for t, p in toks if current_access(t) != p["access_token"]]
    tap.eq(len(changed), 199, "199 tokens hold new values")
    tap.ok(all(sandbox_state(current_access(t)) == "valid" for t in changed[:20]),
           "the new values are valid pairs at digi.me")
    tap.eq(q(conn, "SELECT status, last_error_sqlstate, refresh_failures FROM digime.user_tokens_info WHERE id = %s",
             (dead[0],)), [("needs_reauthorization", "YD001", 0)],
           "the refused token: needs_reauthorization, YD001")
    notices = [n for n in conn.notices if "digime_refresh_expiring" in n]
    tap.ok(len(notices) >= 5, "progress NOTICEs (%d) on a long run" % len(notices), notices[:3])
    # nothing expiring any more; the refused one is skipped
    s0 = sb.last_seq()
    res = q(conn, "CALL digime.digime_refresh_expiring()")[0]
    tap.eq(tuple(res), (0, 0, 0, 1), "a second run refreshes nothing: the refused token is skipped")
    tap.eq(dmtest.api_records(sb, s0), [], "and sends nothing")
    # the application role refreshes only its own tokens
    own = [t for t, _ in minted_tokens(3, c=conn_a)]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 day' "
            "WHERE status = 'active'")
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 minute' "
            "WHERE id = ANY(%s) OR id = %s", (own, toks[0][0]))
    res = q(conn_a, "CALL digime.digime_refresh_expiring(within => '1 hour')")[0]
    tap.eq(tuple(res), (3, 0, 0, 0), "an application role refreshes its own tokens only (3)")
    tap.ok(dt < 60, "200 refreshes took %.1f s" % dt)


@tap.test
def batch_concurrency_and_rollback():
    toks = minted_tokens(40)
    ids = [t for t, _ in toks]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 hour' "
            "WHERE id <> ALL(%s)", (ids,))
    sb.config(latency_ms={"oauth/token": 200})
    try:
        t0 = time.time()
        res = q(conn, "CALL digime.digime_refresh_expiring(within => '30 minutes', concurrency => 8)")[0]
        t_conc = time.time() - t0
        q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 minute' "
                "WHERE id = ANY(%s)", (ids,))
        worker = dmtest.db_worker_pid(conn, DB)
        cpu0 = dmtest.proc_cpu_ticks(worker)
        t0 = time.time()
        res1 = q(conn, "CALL digime.digime_refresh_expiring(within => '30 minutes', concurrency => 1)")[0]
        t_seq = time.time() - t0
        cpu = (dmtest.proc_cpu_ticks(worker) - cpu0) / os.sysconf("SC_CLK_TCK")
    finally:
        sb.config(latency_ms={})
    tap.eq((res[0], res1[0]), (40, 40), "40 refreshed at concurrency 8 and at concurrency 1")
    tap.ok(t_conc < t_seq / 3, "200 ms per refresh: concurrency 8 takes %.2f s, sequential %.2f s (< 1/3)"
           % (t_conc, t_seq))
    # each child's end wakes the batch at once (not after digime.worker_naptime), and the worker
    # sleeps while the requests are under way (a busy loop once took 167 ms of CPU per token)
    tap.ok(t_seq < 40 * 0.2 + 4, "concurrency 1: the next refresh starts as soon as one ends (%.2f s for "
           "40 x 200 ms)" % t_seq)
    tap.ok(cpu < 1.0, "the worker idles while the answers are awaited: %.2f s of CPU over %.2f s" % (cpu, t_seq))
    # inside a transaction block that rolls back, every refresh is kept
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 minute' "
            "WHERE id = ANY(%s)", (ids,))
    before = {t: current_access(t) for t in ids}
    q(conn, "BEGIN")
    res = q(conn, "CALL digime.digime_refresh_expiring(within => '30 minutes')")[0]
    q(conn, "ROLLBACK")
    after = {t: current_access(t) for t in ids}
    tap.eq(res[0], 40, "CALL inside BEGIN: 40 refreshed")
    tap.eq(sum(1 for t in ids if after[t] != before[t]), 40, "after ROLLBACK all 40 new pairs are kept")


@tap.test
def batch_against_explicit_refresh():
    toks = minted_tokens(10)
    ids = [t for t, _ in toks]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 hour' "
            "WHERE id <> ALL(%s)", (ids,))
    sb.config(latency_ms={"oauth/token": 150})
    s0 = sb.last_seq()
    res = {}
    try:
        th = threading.Thread(target=lambda: res.update(
            batch=q(dmtest.connect(DB), "CALL digime.digime_refresh_expiring(concurrency => 2)")[0]))
        th.start()
        time.sleep(0.05)
        for t in ids[::-1][:4]:
            q(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (t,))
        th.join(30)
    finally:
        sb.config(latency_ms={})
    refreshes = len(dmtest.api_records(sb, s0, "oauth/token"))
    tap.ok(res.get("batch") is not None and res["batch"][1] == 0 and res["batch"][2] == 0,
           "batch refresh alongside explicit refreshes: no failure", res)
    tap.ok(10 <= refreshes <= 14, "each token refreshed once by the batch, at most once more explicitly (%d)"
           % refreshes)
    tap.ok(all(sandbox_state(current_access(t)) == "valid" for t in ids),
           "every stored pair is the valid one at digi.me")


@tap.test
def valid_access_token():
    (tid, pair), = minted_tokens(1, expires_in="30 seconds")
    s0 = sb.last_seq()
    tok = q1(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,))
    tap.eq(len(dmtest.api_records(sb, s0, "oauth/token")), 1, "expiring within 60 s: refreshed first")
    tap.ok(tok["accessToken"]["value"] != pair["access_token"] and
           tok["accessToken"]["expiry"] > time.time() + 3600, "returns the new, long-valid access token")
    tap.eq(tok, dmtest.token_json(conn, tid), "the same shape and values as digime_user_access_token")
    s0 = sb.last_seq()
    tok2 = q1(conn, "SELECT digime.digime_valid_access_token(%s, '1 minute')", (tid,))
    tap.eq((tok2, dmtest.api_records(sb, s0)), (tok, []), "valid long enough: returned as is, nothing sent")
    # a refresh inside a transaction that rolls back is kept
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() WHERE id = %s", (tid,))
    q(conn, "BEGIN")
    tok3 = q1(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,))
    q(conn, "ROLLBACK")
    tap.eq(dmtest.token_json(conn, tid), tok3, "the getter's refresh is committed at once")
    # a refresh token digi.me refuses: needs_reauthorization, and the HINT says what to do
    sb.expire(refresh_token=tok3["refreshToken"]["value"])
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() WHERE id = %s", (tid,))
    err = error(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,))
    tap.eq(err and err[0], "YD001", "digi.me refuses the refresh token: YD001")
    tap.match(err and err[3], r"digime_reauthorize_url", "HINT names digime_reauthorize_url")
    s0 = sb.last_seq()
    err = error(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,))
    tap.eq(err and err[:2], ("YD030", "user access token %d needs reauthorization" % tid),
           "then: YD030 with the token's status, nothing sent")
    tap.match(err and err[3], r"digime_reauthorize_url\(%d" % tid, "HINT names digime_reauthorize_url")
    tap.eq(dmtest.api_records(sb, s0), [], "no request for a token that needs reauthorization")
    err = error(conn, "SELECT digime.digime_refresh_token(%s)", (tid,))
    tap.eq(err and err[0], "YD030", "digime_refresh_token refuses it too")
    # a completed reauthorization makes it active again
    url = q1(conn, "SELECT url FROM digime.digime_reauthorize_url(%s, 'https://app.example/re')", (tid,))
    q(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (sb.follow(url),))
    tap.eq(q(conn, "SELECT status FROM digime.user_tokens WHERE id = %s", (tid,)), [("active",)],
           "after a reauthorization the token is active again")
    tap.ok(q1(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,)) is not None, "and usable")
    # revoked
    dmtest.revoke_token(conn, tid)
    err = error(conn, "SELECT digime.digime_valid_access_token(%s)", (tid,))
    tap.eq(err and err[0], "YD031", "revoked: YD031")


@tap.test
def transient_refresh_failures_back_off():
    (tid, pair), = minted_tokens(1)
    sb.fault(endpoint="oauth/token", action="error", status=503, code="Unavailable", message="busy", count=3)
    err = error(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    tap.eq(err and err[0], "YD000", "a 503 after the retries: YD000")
    row = q(conn, "SELECT status, refresh_failures, last_error_sqlstate, next_refresh_at > now() "
                  "FROM digime.user_tokens WHERE id = %s", (tid,))
    tap.eq(row, [("active", 1, "YD000", True)], "counted (refresh_failures 1) and backing off")
    res = q(conn, "CALL digime.digime_refresh_expiring()")[0]
    tap.eq(res[3] >= 1 and res[0] == 0, True, "batch refresh skips a token that backs off")
    tap.ok(error(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,)) is None,
           "an explicit refresh still works")
    tap.eq(q(conn, "SELECT refresh_failures, next_refresh_at FROM digime.user_tokens WHERE id = %s", (tid,)),
           [(0, None)], "and resets the count")


@tap.test
def automatic_refresh():
    toks = minted_tokens(3, expires_in="2 minutes")
    ids = [t for t, _ in toks]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 hour' "
            "WHERE id <> ALL(%s)", (ids,))
    before = {t: current_access(t) for t in ids}
    q(conn, "ALTER DATABASE t075 SET digime.auto_refresh = on")
    q(conn, "ALTER DATABASE t075 SET digime.auto_refresh_within = '5min'")
    q(conn, "ALTER DATABASE t075 SET digime.auto_refresh_interval = '1s'")
    try:
        done = dmtest.wait_value(lambda: all(current_access(t) != before[t] for t in ids), 20)
        tap.ok(done, "with digime.auto_refresh on (ALTER DATABASE ... SET) the worker refreshes them")
        tap.eq(q1(conn, "SELECT count(*) FROM digime.audit_log WHERE action = 'refresh_automatic' "
                        "AND token_id = ANY(%s) AND outcome = 'ok'", (ids,)), 3,
               "audited as refresh_automatic")
    finally:
        q(conn, "ALTER DATABASE t075 RESET digime.auto_refresh")
        q(conn, "ALTER DATABASE t075 RESET digime.auto_refresh_within")
        q(conn, "ALTER DATABASE t075 RESET digime.auto_refresh_interval")


@tap.test
def retention():
    # pending authorizations expire, finished ones and revoked tokens go after retention
    st = state()
    dmtest.authorize(conn, C1, state=st)
    aid = q1(conn, "SELECT id FROM digime.authorizations WHERE state = %s", (st,))
    q(conn, "UPDATE digime.authorizations SET expires_at = now() - interval '1 second' WHERE id = %s", (aid,))
    (tid, _), = minted_tokens(1)
    dmtest.revoke_token(conn, tid)
    res = q(conn, "CALL digime.digime_purge()")[0]
    tap.eq(q(conn, "SELECT status, code_verifier IS NULL, finished_at IS NOT NULL FROM digime.authorizations "
                   "WHERE id = %s", (aid,)), [("expired", True, True)],
           "digime_purge: a pending authorization past its expiry becomes expired, verifier cleared")
    tap.ok(res[0] >= 0, "digime_purge ran (expired %d; the worker's own round may have come first)"
           % res[0])
    q(conn, "SET digime.authorization_retention = '1s'")
    time.sleep(1.2)
    res = q(conn, "CALL digime.digime_purge()")[0]
    q(conn, "RESET digime.authorization_retention")
    tap.eq(q1(conn, "SELECT count(*) FROM digime.authorizations WHERE id = %s", (aid,)), 0,
           "with authorization_retention 1s the finished authorization is deleted")
    tap.eq(q1(conn, "SELECT count(*) FROM digime.user_tokens WHERE id = %s", (tid,)), 0,
           "and the revoked token")
    tap.eq(q1(conn, "SELECT count(*) FROM digime.authorizations WHERE status <> 'pending' "
                    "AND finished_at < now() - interval '1 second'"), 0, "no finished row older than that is left")
    tap.ok(res[1] >= 2, "deleted %d rows" % res[1])
    err = error(conn_a, "CALL digime.digime_purge()")
    tap.eq(err and err[0], "42501", "an application role may not purge")
    # the worker does the same on its own with the database's settings
    st = state()
    dmtest.authorize(conn, C1, state=st)
    q(conn, "UPDATE digime.authorizations SET expires_at = now() - interval '1 second' WHERE state = %s", (st,))
    q(conn, "ALTER DATABASE t075 SET digime.authorization_retention = '1s'")
    try:
        gone = dmtest.wait_value(lambda: q1(conn, "SELECT count(*) FROM digime.authorizations WHERE state = %s",
                                   (st,)) == 0, 20)
        tap.ok(gone, "the worker expires and deletes it by itself")
    finally:
        q(conn, "ALTER DATABASE t075 RESET digime.authorization_retention")
    # (that retention reads through indexes only: 058_caches_and_plans)


@tap.test
def audit_trail():
    s_before = q1(conn, "SELECT coalesce(max(id), 0) FROM digime.audit_log")
    loc = callback_url(conn_a)
    tid = q1(conn_a, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    q(conn_a, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    q(conn_a, "SELECT url FROM digime.digime_reauthorize_url(%s, 'https://app.example/re')", (tid,))
    err = error(conn_a, "SELECT * FROM digime.digime_authorize_url(%s, 'https://app.example/', 'x', "
                        "user_token_id => 999999)", (C1,))
    tap.eq(err and err[0], "42501", "a failing call")
    c = dmtest.connect_as(DB, ROLE_A)
    q(c, "BEGIN")
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    q(c, "ROLLBACK")
    rows = q(conn, "SELECT role::text, action, contract_id, token_id, outcome, sqlstate, reference "
                   "FROM digime.audit_log WHERE id > %s ORDER BY id", (s_before,))
    acts = [(r[0], r[1], r[4]) for r in rows]
    tap.eq(acts, [(ROLE_A, "authorize", "ok"), (ROLE_A, "exchange", "ok"), (ROLE_A, "refresh", "ok"),
                  (ROLE_A, "reauthorize", "ok"), (ROLE_A, "authorize", "error"), (ROLE_A, "refresh", "ok")],
           "a flow's actions are audited, the failure too, and the rolled-back refresh's row is kept")
    tap.eq([r[5] for r in rows if r[4] == "error"], ["42501"], "the failure's SQLSTATE")
    tap.eq([r[3] for r in rows if r[1] in ("exchange", "refresh", "reauthorize")], [tid] * 4,
           "token ids recorded")
    tap.ok(all(r[2] == C1 for r in rows), "contract recorded")
    everything = json.dumps(q(conn, "SELECT * FROM digime.audit_log"), default=str)
    secrets = [s for s in sb.secrets()["values"] if len(s) >= 8 and s in everything]
    tap.eq(secrets, [], "no issued or received secret in digime.audit_log")
    # an application role reads its own rows only
    roles = set(r[0] for r in q(conn_a, "SELECT role::text FROM digime.audit_log"))
    tap.eq(roles, {ROLE_A}, "an application role reads its own audit rows only")
    tap.ok(q1(conn, "SELECT count(DISTINCT role) FROM digime.audit_log") >= 3, "the DBA reads all")
    err = error(conn_a, "DELETE FROM digime.audit_log")
    tap.eq(err and err[0], "42501", "an application role cannot delete audit rows")
    for a in ("add_contract", "grant_contract", "import", "revoke", "submit_callback", "purge"):
        tap.ok(q1(conn, "SELECT count(*) FROM digime.audit_log WHERE action = %s", (a,)) > 0,
               "action %s is audited" % a)


tap.run()
