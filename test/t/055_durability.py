"""055_durability: a token digi.me has issued ends up in the store, whatever the caller does.

The digime worker performs every code exchange and refresh and commits the token in its own
transaction (src/worker/).  Here the caller rolls back, fails later in the statement, is
cancelled, times out, is terminated or disconnects; each time the token row must appear, with
the very values the sandbox issued, and a retry of the same callback returns the same row.
Also: REPEATABLE READ, READ ONLY, lock waits that end in 55P03, a row the caller's own
transaction changed.
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
DB = "t055"
conn = dmtest.fresh_db(DB)
C1 = dmtest.EXAMPLE_CONTRACT
dmtest.add_example_contract(conn)
_n = [0]


def state():
    _n[0] += 1
    return "t055-%d" % _n[0]


def callback_url(st=None):
    """A callback URL the sandbox delivered for a new pending authorization."""
    url, _, _ = dmtest.authorize(conn, C1, state=st or state())
    loc = sb.follow(url)
    dmtest.record_secret(dict(dmtest.query_pairs(loc)).get("code"))
    return loc


def stored_access_tokens():
    ids = [r[0] for r in q(conn, "SELECT id FROM digime.user_tokens WHERE status <> 'revoked'")]
    return {dmtest.token_json(conn, i)["accessToken"]["value"]: i for i in ids}




def last_issued():
    toks = sb.tokens()
    return toks[-1] if toks else None


def n_tokens():
    return q1(conn, "SELECT count(*) FROM digime.user_tokens")


# --------------------------------------------------------------------------
@tap.test
def rollback_after_callback():
    loc = callback_url()
    c = dmtest.connect(DB)
    q(c, "BEGIN")
    row = q(c, "SELECT id, user_id FROM digime.digime_handle_callback(%s)", (loc,))[0]
    q(c, "ROLLBACK")
    pair = last_issued()
    stored = stored_access_tokens()
    tap.ok(pair["access_token"] in stored and stored[pair["access_token"]] == row[0],
           "ROLLBACK after digime_handle_callback: the issued token is stored in the returned row")
    tap.eq(q(conn, "SELECT status, token_id FROM digime.authorizations WHERE id = "
                   "(SELECT max(id) FROM digime.authorizations)"), [("completed", row[0])],
           "the authorization is completed with it")
    s0 = sb.last_seq()
    again = q(c, "SELECT id, user_id FROM digime.digime_handle_callback(%s)", (loc,))[0]
    tap.eq(tuple(again), tuple(row), "the same callback again returns the same row (not YD007)")
    tap.eq(dmtest.api_records(sb, s0, "oauth/token"), [], "the retry sends nothing")
    c.close()


@tap.test
def error_later_in_statement():
    loc = callback_url()
    n0 = n_tokens()
    err = error(conn, "SELECT id, 1 / (id - id) FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(err and err[0], "22012", "an error later in the statement (division by zero)")
    tap.eq(n_tokens(), n0 + 1, "the token row is there anyway")
    tap.ok(last_issued()["access_token"] in stored_access_tokens(), "with the issued values")


def quiet(c):
    """The application's own statements carry callback URLs (codes): keep them out of the log,
    as README "Caveats" advises for wrappers digime cannot recognise."""
    q(c, "SET log_statement = 'none'; SET log_min_error_statement = 'panic'")


@tap.test
def trigger_and_multi_row_insert():
    quiet(conn)
    q(conn, """
        CREATE TABLE app_callbacks (id serial PRIMARY KEY, url text NOT NULL, token_id bigint,
                                    note text CHECK (note <> 'bad'));
        CREATE FUNCTION app_on_callback() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.token_id := (SELECT id FROM digime.digime_handle_callback(NEW.url));
            RETURN NEW;
        END $$;
        CREATE TRIGGER app_on_callback BEFORE INSERT ON app_callbacks
            FOR EACH ROW EXECUTE FUNCTION app_on_callback();""")
    # a trigger in a transaction that later fails
    loc = callback_url()
    c = dmtest.connect(DB)
    quiet(c)
    q(c, "BEGIN")
    q(c, "INSERT INTO app_callbacks (url) VALUES (%s)", (loc,))
    err = error(c, "SELECT 1/0")
    q(c, "ROLLBACK")
    tap.eq(err and err[0], "22012", "the transaction with the trigger failed")
    tap.eq(q1(conn, "SELECT count(*) FROM app_callbacks"), 0, "the application's row is gone")
    tap.ok(last_issued()["access_token"] in stored_access_tokens(),
           "the token the trigger obtained is stored")
    tid = q1(conn, "INSERT INTO app_callbacks (url) VALUES (%s) RETURNING token_id", (loc,))
    tap.eq(tid, stored_access_tokens()[last_issued()["access_token"]],
           "the application retries the INSERT and gets the same token row")
    # a multi-row INSERT whose third row fails
    locs = [callback_url() for _ in range(3)]
    n0 = n_tokens()
    err = error(conn, "INSERT INTO app_callbacks (url, note) VALUES (%s, 'ok'), (%s, 'ok'), (%s, 'bad')",
                tuple(locs))
    tap.eq(err and err[0], "23514", "a multi-row INSERT fails on its third row")
    tap.eq(n_tokens(), n0 + 3, "the tokens of all three rows are stored")
    stored = stored_access_tokens()
    tap.ok(all(p["access_token"] in stored for p in sb.tokens()[-3:]), "with the issued values")
    q(conn, "RESET log_statement; RESET log_min_error_statement")
    c.close()


def slow_callback(seconds):
    """A pending callback whose exchange the sandbox will answer after `seconds`."""
    loc = callback_url()
    sb.fault(endpoint="oauth/token", action="delay", seconds=seconds)
    return loc


@tap.test
def statement_timeout_during_exchange():
    loc = slow_callback(3)
    n0 = n_tokens()
    c = dmtest.connect(DB)
    q(c, "SET statement_timeout = '1s'")
    t0 = time.time()
    err = error(c, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    dt = time.time() - t0
    tap.eq(err and err[:2], ("57014", "canceling statement due to statement timeout"),
           "1 s statement_timeout during a 3 s oauth/token: 57014")
    tap.ok(dt < 2.0, "... within 2 s (%.2f s)" % dt)
    tap.match(err and err[2], r"goes on in the digime worker.*the same callback URL again returns",
              "DETAIL: the request goes on, and where its result appears")
    row = dmtest.wait_value(lambda: n_tokens() == n0 + 1, 10)
    tap.ok(row, "the token row appears when digi.me answers")
    tap.ok(last_issued()["access_token"] in stored_access_tokens(), "with the issued values")
    q(c, "RESET statement_timeout")
    again = q1(c, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(again, stored_access_tokens()[last_issued()["access_token"]],
           "the same callback then returns that row")
    c.close()


@tap.test
def cancel_terminate_disconnect():
    for how in ("cancel", "terminate", "disconnect"):
        loc = slow_callback(2)
        n0 = n_tokens()
        c = dmtest.connect(DB)
        pid = dmtest.backend_pid(c)
        res = {}

        def run():
            res["err"] = error(c, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))

        th = threading.Thread(target=run)
        th.start()
        wait, _ = dmtest.wait_for(lambda: q(conn, "SELECT wait_event_type FROM pg_stat_activity "
                                                  "WHERE pid = %s AND wait_event_type = 'Extension'", (pid,)),
                                  timeout=1.5)
        tap.eq(wait, [("Extension",)], "%s: the caller waits on the worker (wait event Extension)" % how)
        if how == "cancel":
            q(conn, "SELECT pg_cancel_backend(%s)", (pid,))
        elif how == "terminate":
            q(conn, "SELECT pg_terminate_backend(%s)", (pid,))
        else:
            os.close(c.fileno())
        th.join(10)
        if how == "cancel":
            tap.eq(res.get("err") and res["err"][0], "57014", "cancel: 57014")
        tap.ok(dmtest.wait_value(lambda: n_tokens() == n0 + 1, 10), "%s: the token row appears" % how)
        tap.ok(last_issued()["access_token"] in stored_access_tokens(), "%s: with the issued values" % how)
        try:
            c.close()
        except Exception:
            pass


@tap.test
def repeatable_read():
    loc = callback_url()
    c = dmtest.connect(DB)
    q(c, "BEGIN ISOLATION LEVEL REPEATABLE READ")
    n_before = q1(c, "SELECT count(*) FROM digime.user_tokens")
    row = q(c, "SELECT id, user_id FROM digime.digime_handle_callback(%s)", (loc,))[0]
    seen = q1(c, "SELECT count(*) FROM digime.user_tokens WHERE id = %s", (row[0],))
    q(c, "COMMIT")
    tap.ok(row[0] is not None and row[1] is not None, "REPEATABLE READ: the function returns the new row")
    tap.eq(seen, 0, "... which the caller's snapshot does not show")
    tap.eq(q1(conn, "SELECT count(*) FROM digime.user_tokens WHERE id = %s", (row[0],)), 1,
           "... and which is stored")
    tap.ok(n_before is not None, "snapshot taken before the call")
    c.close()


@tap.test
def read_only_refuses_before_sending():
    loc = callback_url()
    tid = q1(conn, "SELECT id FROM digime.user_tokens ORDER BY id LIMIT 1")
    c = dmtest.connect(DB)
    s0 = sb.last_seq()
    q(c, "BEGIN READ ONLY")
    for what, sql, args in (("digime_handle_callback", "SELECT * FROM digime.digime_handle_callback(%s)", (loc,)),
                            ("digime_refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)", (tid,)),
                            ("digime_authorize_url", "SELECT * FROM digime.digime_authorize_url(%s, 'https://a.example/', 'ro')", (C1,)),
                            ("digime_submit_callback", "SELECT digime.digime_submit_callback(%s)", (loc,))):
        q(c, "SAVEPOINT s")
        err = error(c, sql, args)
        q(c, "ROLLBACK TO s")
        tap.eq(err and err[:2], ("25006", "cannot run %s in a read-only transaction" % what),
               "READ ONLY: %s refuses with 25006" % what)
        tap.ok(err and "CONTEXT" not in (err[2] or "") and "SQL statement" not in (err[2] or ""),
               "READ ONLY: %s: no internal SQL in the error" % what)
    q(c, "ROLLBACK")
    tap.eq(dmtest.api_records(sb, s0), [], "READ ONLY: nothing was sent to digi.me")
    c.close()
    q(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))


@tap.test
def lock_waits_end_in_55P03():
    tid = q1(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (callback_url(),))
    before = dmtest.token_json(conn, tid)
    # another transaction holds the row: the worker's wait ends in 55P03 for the caller,
    # and the new pair is stored once the row is free
    holder = dmtest.connect(DB)
    q(holder, "BEGIN")
    q(holder, "SELECT 1 FROM digime.user_tokens WHERE id = %s FOR UPDATE", (tid,))
    c = dmtest.connect(DB)
    t0 = time.time()
    err = error(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    dt = time.time() - t0
    tap.eq(err and err[0], "55P03", "a row locked by another transaction: 55P03 for the caller")
    tap.ok(dt < 3.0, "... after digime.worker_lock_timeout (%.2f s)" % dt)
    q(holder, "ROLLBACK")
    after = dmtest.wait_value(lambda: (lambda t: t if t["accessToken"]["value"] != before["accessToken"]["value"] else None)(
        dmtest.token_json(conn, tid)), 10)
    tap.ok(after and after["accessToken"]["value"] == last_issued()["access_token"],
           "once the row is free the refreshed pair is stored")
    tap.ok(error(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,)) is None,
           "and its refresh token works")
    # the caller's own transaction changed the row: refused before anything is sent
    s0 = sb.last_seq()
    q(c, "BEGIN")
    q(c, "UPDATE digime.user_tokens SET state = state WHERE id = %s", (tid,))
    err = error(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
    q(c, "ROLLBACK")
    tap.eq(err and err[:2], ("55006", "user access token %d was changed by the current transaction" % tid),
           "a row the caller's transaction changed: 55006")
    tap.eq(dmtest.api_records(sb, s0), [], "... and nothing was sent")
    holder.close()
    c.close()


tap.run()
