"""030_transport: interrupts, timeouts, connection and TLS failures, retries, JWKS cache,
keep-alive and memory per call.

Timing bounds are loose (a loaded machine is slower) but tight enough to tell a retry or a
back-off from none. Retry policy: src/http.c (back-off 500 ms doubling + <=100 ms jitter,
Retry-After <= 10 s honoured). Vectors: /work/shared/digime-api-vectors.md (V..).
"""
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
DB = "t030"
conn = dmtest.fresh_db(DB)
C1 = dmtest.EXAMPLE_CONTRACT
dmtest.add_example_contract(conn)
CB = "https://cb.example/transport"
AUTH_SQL = "SELECT url, code_verifier FROM digime.digime_authorize_url(%s, %s, %s)"
_n = [0]


def state():
    _n[0] += 1
    return "t030-%d" % _n[0]


def authorize(c=None):
    """One authorize call; returns (url, verifier)."""
    url, verifier = q(c or conn, AUTH_SQL, (C1, CB, state()))[0]
    dmtest.record_secret(verifier)
    return url, verifier


def authorize_err(c=None):
    return error(c or conn, AUTH_SQL, (C1, CB, state()))


def timed(fn, *a):
    t0 = time.time()
    r = fn(*a)
    return r, time.time() - t0


def pending_callback():
    url, _ = authorize()
    loc = sb.follow(url)
    dmtest.record_secret(dict(dmtest.query_pairs(loc)).get("code"))
    return loc


def endpoints(recs):
    return [(r["endpoint"], r["status"]) for r in recs if r["endpoint"] != "jwks"]


def wait_for_hang(since, timeout=5):
    end = time.time() + timeout
    while time.time() < end:
        if any(r["fault"] == "hang" for r in sb.requests(since)):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------
@tap.test
def statement_timeout_interrupts():
    authorize()  # warm: JWKS cached, connection open
    sb.fault(endpoint="oauth/authorize", action="hang", seconds=30)
    s0 = sb.last_seq()
    q(conn, "SET statement_timeout = '500ms'")
    err, dt = timed(authorize_err)
    q(conn, "RESET statement_timeout")
    tap.eq(err and err[:2], ("57014", "canceling statement due to statement timeout"),
           "statement_timeout stops a hanging request (57014, PostgreSQL's message)")
    tap.ok(0.4 < dt < 2.0, "... after about 0.5 s, well under 2 s (%.2f s)" % dt)
    hung = [r for r in sb.requests(s0) if r["fault"] == "hang"]
    tap.eq(len(hung), 1, "the request did reach the (hanging) API once")
    s1 = sb.last_seq()
    url, _ = authorize()
    recs = dmtest.api_records(sb, s1, "oauth/authorize")
    tap.ok(url is not None and recs and recs[0]["status"] == 201, "next call in the same backend succeeds")
    tap.ok(hung and recs and recs[0]["connection"] != hung[0]["connection"],
           "... over a new connection (the interrupted handle was discarded)")


@tap.test
def cancel_interrupts():
    pid = dmtest.backend_pid(conn)
    other = dmtest.connect(DB)
    sb.fault(endpoint="oauth/authorize", action="hang", seconds=30)
    s0 = sb.last_seq()
    res = {}

    def run():
        res["err"] = authorize_err()
        res["end"] = time.time()

    th = threading.Thread(target=run)
    th.start()
    reached = wait_for_hang(s0)
    time.sleep(0.2)
    wait = q(other, "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,))
    tap.eq(wait, [("Extension", "Extension")], "while waiting for digi.me the backend shows wait event Extension")
    t_cancel = time.time()
    cancelled = q1(other, "SELECT pg_cancel_backend(%s)", (pid,))
    th.join(10)
    other.close()
    tap.ok(reached and cancelled, "request hanging at the API, cancel sent")
    tap.eq(res.get("err") and res["err"][:2], ("57014", "canceling statement due to user request"),
           "pg_cancel_backend stops the hanging request (57014)")
    tap.ok("end" in res and res["end"] - t_cancel < 1.0,
           "... within 1 s of the cancel (%.2f s)" % (res.get("end", 99) - t_cancel))
    url, _ = authorize()
    tap.ok(url is not None, "next call in the same backend succeeds")


@tap.test
def digime_timeout_ms():
    q(conn, "SET digime.timeout_ms = 1000")
    q(conn, "SET digime.retry_limit = 0")
    sb.fault(endpoint="oauth/authorize", action="hang", seconds=30)
    err, dt = timed(authorize_err)
    tap.eq(err and err[:2], ("08006", "request to the digi.me API timed out"), "digime.timeout_ms -> 08006 timed out")
    tap.eq(err and err[3], "The limit is digime.timeout_ms.", "hint names digime.timeout_ms")
    tap.match(err and err[2], r"^POST https://\S+/v1\.7/oauth/authorize, attempt 1: ", "DETAIL names request and attempt")
    tap.ok(0.9 < dt < 2.5, "... after about 1 s (%.2f s)" % dt)
    q(conn, "RESET digime.retry_limit")

    # retries: an idempotent call (authorize) is retried after a timeout ...
    q(conn, "SET digime.timeout_ms = 300")
    sb.fault(endpoint="oauth/authorize", action="hang", seconds=30, count=2)
    s0 = sb.last_seq()
    (url, _), dt = timed(authorize)
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq([r["fault"] for r in recs], ["hang", "hang", None], "authorize timed out twice, third attempt succeeded")
    tap.ok(url is not None and 1.9 < dt < 4.0, "two timeouts + back-offs 0.5 s and 1 s (%.2f s)" % dt)
    # ... the exchange, whose request reached the API, is not (it could consume the code)
    loc = pending_callback()
    sb.fault(endpoint="oauth/token", action="hang", seconds=30, count=3)
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    recs = dmtest.api_records(sb, s0, "oauth/token")
    tap.eq(err and err[0], "08006", "exchange timeout -> 08006")
    tap.eq(len(recs), 1, "exchange not retried after a timeout (request was sent)")
    q(conn, "RESET digime.timeout_ms")
    sb.reset()  # drop the unused hang faults


@tap.test
def connection_refused():
    port = dmtest.closed_port()
    q(conn, "SET digime.base_url = 'https://127.0.0.1:%d/v1.7/'" % port)
    err, dt = timed(authorize_err)
    tap.eq(err and err[:2], ("08001", "could not connect to the digi.me API"), "closed port -> 08001 could not connect")
    tap.match(err and err[2], r"^POST https://127\.0\.0\.1:%d/v1\.7/oauth/authorize, attempt 3: " % port,
              "DETAIL: third attempt (retry_limit 2)")
    tap.ok(1.45 < dt < 3.5, "two back-offs, about 0.5 s + 1 s (%.2f s)" % dt)
    q(conn, "SET digime.retry_limit = 0")
    err, dt = timed(authorize_err)
    tap.match(err and err[2], r"attempt 1: ", "retry_limit 0: one attempt")
    tap.ok(dt < 0.5, "retry_limit 0: no back-off (%.2f s)" % dt)
    q(conn, "RESET digime.retry_limit")
    q(conn, "RESET digime.base_url")


@tap.test
def tls_failures():
    s0 = sb.last_seq()
    q(conn, "SET digime.ca_file = ''")
    err, dt = timed(authorize_err)
    tap.eq(err and err[:2], ("08001", "could not verify the TLS certificate of the digi.me API"),
           "untrusted certificate -> 08001")
    tap.match(err and err[3], r"digime\.ca_file", "HINT names digime.ca_file")
    tap.match(err and err[2], r"attempt 1: ", "a verification failure is not retried")
    tap.eq(dmtest.api_records(sb, s0), [], "no request reached the API over the untrusted connection")
    q(conn, "SET digime.ca_file = '/nonexistent/digime-ca.pem'")
    err = authorize_err()
    tap.eq(err and err[:2], ("F0000", "could not load the CA bundle named by digime.ca_file"),
           "nonexistent ca_file -> F0000")
    q(conn, "RESET digime.ca_file")
    tap.ok(authorize()[0] is not None, "works again with the configured CA")


@tap.test
def retries():
    # 503 once on authorize: retried, re-signed, new PKCE (V13, V26)
    sb.fault(endpoint="oauth/authorize", action="error", status=503, code="ServiceUnavailable", message="busy")
    s0 = sb.last_seq()
    url, verifier = authorize()
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq([r["status"] for r in recs], [503, 201], "503 once -> one retry, two requests")
    if len(recs) == 2:
        c1, c2 = recs[0]["jwt"]["claims"], recs[1]["jwt"]["claims"]
        tap.ok(c1["nonce"] != c2["nonce"], "retry has a new nonce (V13)")
        tap.ok(c1["code_challenge"] != c2["code_challenge"], "retry has a new code_challenge")
        tap.eq(dmtest.s256(verifier), c2["code_challenge"], "returned code_verifier matches the LAST challenge (V26)")
        gap = recs[1]["t"] - recs[0]["t"]
        tap.ok(0.45 < gap < 1.5, "back-off about 0.5 s (%.2f s)" % gap)
    # Retry-After: 1 honoured
    sb.fault(endpoint="oauth/authorize", action="error", status=503, code="ServiceUnavailable", message="busy",
             headers={"Retry-After": "1"})
    s0 = sb.last_seq()
    authorize()
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq([r["status"] for r in recs], [503, 201], "503 with Retry-After: 1 -> retried")
    tap.ok(len(recs) == 2 and 0.9 <= recs[1]["t"] - recs[0]["t"] < 2.0,
           "Retry-After: 1 honoured (gap %.2f s)" % (recs[-1]["t"] - recs[0]["t"]))
    # Retry-After: 120 -> longer than digime waits: no retry
    sb.fault(endpoint="oauth/authorize", action="error", status=503, code="ServiceUnavailable", message="busy",
             headers={"Retry-After": "120"})
    s0 = sb.last_seq()
    err, dt = timed(authorize_err)
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq((err and err[:2], len(recs)), (("YD000", "digi.me API error ServiceUnavailable: busy"), 1),
           "Retry-After: 120 -> no retry, the 503 is reported")
    tap.ok(dt < 1.0, "... at once (%.2f s)" % dt)
    # 502: retried for authorize ...
    sb.fault(endpoint="oauth/authorize", action="raw", status=502, content_type="text/html", body="<html>502</html>")
    s0 = sb.last_seq()
    authorize()
    tap.eq([r["status"] for r in dmtest.api_records(sb, s0, "oauth/authorize")], [502, 201], "502 on authorize retried")
    # ... not for the exchange (the API may have consumed the code)
    loc = pending_callback()
    sb.fault(endpoint="oauth/token", action="raw", status=502, content_type="text/html", body="<html>502</html>")
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(endpoints(dmtest.api_records(sb, s0)), [("oauth/token", 502)], "502 on oauth/token (exchange) not retried")
    tap.eq(err and err[0], "YD010", "... and reported (YD010)")
    # 503 says "not processed": the exchange is retried
    s0 = sb.last_seq()
    sb.fault(endpoint="oauth/token", action="error", status=503, code="ServiceUnavailable", message="busy")
    row = q(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    recs = [r for r in dmtest.api_records(sb, s0, "oauth/token")]
    tap.eq([r["status"] for r in recs], [503, 201], "503 on oauth/token retried, then the exchange succeeds")
    tap.ok(row and len(recs) == 2 and recs[0]["jwt"]["claims"]["nonce"] != recs[1]["jwt"]["claims"]["nonce"],
           "exchange retry re-signed with a new nonce")
    # retry_limit 0
    q(conn, "SET digime.retry_limit = 0")
    sb.fault(endpoint="oauth/authorize", action="error", status=503, code="ServiceUnavailable", message="busy")
    s0 = sb.last_seq()
    err = authorize_err()
    q(conn, "RESET digime.retry_limit")
    tap.eq((err and err[0], len(dmtest.api_records(sb, s0, "oauth/authorize"))), ("YD000", 1),
           "digime.retry_limit = 0 -> no retry")
    # the JWKS GET is retried on 503 (V112 uses 500, which digime does not retry)
    q(conn, "SET digime.jwks_cache_ttl = 0")
    sb.fault(endpoint="jwks", action="error", status=503, code="ServiceUnavailable", message="busy")
    s0 = sb.last_seq()
    url, _ = authorize()
    q(conn, "RESET digime.jwks_cache_ttl")
    tap.eq([r["status"] for r in dmtest.api_records(sb, s0, "jwks")], [503, 200], "JWKS 503 once -> fetched again")
    tap.ok(url is not None, "... and verification succeeds")


@tap.test
def jwks_cache():
    c = dmtest.connect(DB)  # a new backend: empty cache
    s0 = sb.last_seq()
    for _ in range(5):
        authorize(c)
    tap.eq(len(dmtest.api_records(sb, s0, "jwks")), 1, "5 authorize calls in one backend: JWKS fetched once")
    for i in (1, 2):
        sb.fault(endpoint="oauth/authorize", action="token", sign_with="unlisted")
        s1 = sb.last_seq()
        err = authorize_err(c)
        tap.eq(err and err[0], "YD011", "unknown kid #%d -> YD011" % i)
        tap.eq(len(dmtest.api_records(sb, s1, "jwks")), 1, "unknown kid #%d: exactly one refetch" % i)
    s1 = sb.last_seq()
    authorize(c)
    tap.eq(len(dmtest.api_records(sb, s1, "jwks")), 0, "known kid afterwards: no fetch")
    q(c, "SET digime.jwks_cache_ttl = 0")
    s1 = sb.last_seq()
    for _ in range(3):
        authorize(c)
    tap.eq(len(dmtest.api_records(sb, s1, "jwks")), 3, "jwks_cache_ttl 0: one fetch per verification")
    c.close()
    sb.config(jwks_pem="pkcs1")  # V80: PKCS#1 "pem"
    try:
        c = dmtest.connect(DB)
        s1 = sb.last_seq()
        url, _ = authorize(c)
        tap.ok(url is not None and len(dmtest.api_records(sb, s1, "jwks")) == 1,
               "JWKS with a PKCS#1 pem: fetched and verifies (V80)")
        c.close()
    finally:
        sb.config(jwks_pem="spki")


@tap.test
def keep_alive():
    c = dmtest.connect(DB)
    s0 = sb.last_seq()
    for _ in range(10):
        authorize(c)
    recs = dmtest.api_records(sb, s0)
    conns = {r["connection"] for r in recs}
    ports = {r["client_port"] for r in recs}
    tap.ok(len(recs) == 11 and len(conns) == 1 and len(ports) == 1,
           "10 authorize calls + 1 JWKS GET in one backend share one TCP connection",
           "%d requests, connections %r" % (len(recs), conns))
    c2 = dmtest.connect(DB)
    s1 = sb.last_seq()
    authorize(c2)
    tap.ok(not ({r["connection"] for r in dmtest.api_records(sb, s1)} & conns),
           "another backend uses its own connection (the observable distinguishes)")
    c.close()
    c2.close()


@tap.test
def no_leak_per_call():
    c = dmtest.connect(DB)
    pid = dmtest.backend_pid(c)

    def mem():
        return (dmtest.proc_status_kb(pid, "VmRSS"), dmtest.proc_status_kb(pid, "RssAnon"),
                int(q1(c, "SELECT sum(total_bytes) FROM pg_backend_memory_contexts")))

    states = ["leak-%d" % i for i in range(10)]
    for i in range(20):
        q(c, AUTH_SQL, (C1, CB, states[i % 10]))
    rss0, anon0, ctx0 = mem()
    t0 = time.time()
    for i in range(300):
        q(c, AUTH_SQL, (C1, CB, states[i % 10]))
    dt = time.time() - t0
    rss1, anon1, ctx1 = mem()
    if dmtest.SANITIZED:
        # ASan keeps freed memory in quarantine (up to 256 MB) instead of reusing it, so RSS grows
        # by what the calls allocated (~250 MB here); the memory-context check below still applies
        why = "under ASan RSS measures its quarantine, not leaks (grew %d kB)" % (rss1 - rss0)
        tap.skip("300 authorize calls: VmRSS flat", why)
        tap.skip("300 authorize calls: RssAnon flat", why)
    else:
        tap.ok(rss1 - rss0 < 3072, "300 authorize calls: VmRSS grew %d kB (< 3 MB), %.1f s" % (rss1 - rss0, dt))
        tap.ok(anon1 - anon0 < 1024, "300 authorize calls: RssAnon grew %d kB (< 1 MB)" % (anon1 - anon0))
    tap.ok(abs(ctx1 - ctx0) < 65536, "memory contexts total %d -> %d bytes (flat)" % (ctx0, ctx1))
    c.close()


@tap.test
def refresh_survives_rollback():
    """A refreshed pair is committed by the token writer: a rollback of the caller keeps it."""
    tid = q1(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (pending_callback(),))
    before = dmtest.token_json(conn, tid)
    c = dmtest.connect(DB)
    q(c, "BEGIN")
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    q(c, "ROLLBACK")
    after = dmtest.token_json(conn, tid)
    issued = {t["access_token"] for t in sb.tokens()}
    tap.ok(after["accessToken"]["value"] != before["accessToken"]["value"]
           and after["accessToken"]["value"] in issued,
           "READ COMMITTED: the refreshed pair is stored although the caller rolled back")
    tap.ok(q1(conn, "SELECT refreshed_at IS NOT NULL FROM digime.user_tokens WHERE id = %s", (tid,)),
           "refreshed_at set by the token writer")
    tap.ok(error(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,)) is None,
           "the stored refresh token still works")

    # REPEATABLE READ: the worker commits too; the function returns the new row, which the
    # caller's snapshot does not show, and a rollback keeps it
    before = dmtest.token_json(conn, tid)
    c.notices.clear()
    q(c, "BEGIN ISOLATION LEVEL REPEATABLE READ")
    seen = q1(c, "SELECT refreshed_at FROM digime.user_tokens WHERE id = %s", (tid,))
    row = q(c, "SELECT refreshed_at, access_token_expires_at FROM digime.digime_refresh_token(%s)", (tid,))[0]
    seen_after = q1(c, "SELECT refreshed_at FROM digime.user_tokens WHERE id = %s", (tid,))
    q(c, "ROLLBACK")
    after = dmtest.token_json(conn, tid)
    stored = q(conn, "SELECT refreshed_at, access_token_expires_at FROM digime.user_tokens WHERE id = %s",
               (tid,))[0]
    tap.ok(row[0] > seen and seen_after == seen,
           "REPEATABLE READ: the returned row is the new one although the snapshot still shows the old")
    tap.eq(tuple(row), tuple(stored), "REPEATABLE READ: the returned row is the stored row")
    tap.ok(after["accessToken"]["value"] != before["accessToken"]["value"]
           and after["accessToken"]["value"] in {t["access_token"] for t in sb.tokens()},
           "REPEATABLE READ: the new pair is stored although the caller rolled back")
    tap.eq(c.notices, [], "no warning")
    c.close()


tap.run()
