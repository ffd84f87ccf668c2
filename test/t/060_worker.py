"""060_worker: hygiene of the worker layer (launcher, per-database workers, one-shot workers),
with the known failures of pg_cron and pg_net as the checklist.

(a) main cluster (digime.worker_naptime = 2): one launcher; one worker per database with the
    extension, none elsewhere; CREATE / DROP EXTENSION start and stop it (timed); ALTER
    DATABASE SET restarts it; DROP DATABASE (idle worker, and a worker with a request in
    flight), ALTER DATABASE RENAME and CREATE DATABASE ... TEMPLATE succeed promptly and the
    worker comes back; the worker's memory stays flat over thousands of refreshes.
(b) an extra cluster (preloaded): pg_ctl stop -m fast with a request in flight; kill -9 of a
    database worker, of an ordinary backend and of the launcher (crash restart: launcher and
    workers come back, inbox rows in flight or queued meanwhile are completed);
    pg_terminate_backend of a database worker.
(c) an extra cluster without shared_preload_libraries: one-shot workers serve the flow; with
    no free background worker slot a request fails at once with 53400 and sends nothing.
Measured figures are printed as "# figure: ..." lines.
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402
from dmtest import q, q1  # noqa: E402

import psycopg2  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()
C = d.EXAMPLE_CONTRACT
NAPTIME = 2                 # digime.worker_naptime of the main cluster (test/run-tests.sh)
state = {}


def figure(name, value):
    print("# figure: %s: %s" % (name, value))
    sys.stdout.flush()


def main_log_size():
    return os.path.getsize(d.server_log_path())


def main_log(since):
    with open(d.server_log_path(), errors="replace") as f:
        f.seek(since)
        return f.read()


def pending_callback(conn, st):
    """An authorization whose consent page was passed: its callback URL (not yet handled)."""
    url, _, _ = d.authorize(conn, C, state=st)
    loc = sb.follow(url)
    d.record_secret(dict(d.query_pairs(loc)).get("code"))
    return loc


def sb_valid(access_token):
    return any(t["access_token"] == access_token and t["state"] == "valid" for t in sb.tokens())


def access_token(conn, token_id):
    return d.token_json(conn, token_id)["accessToken"]["value"]


def wait_hang(since, timeout=10):
    return d.wait_for(lambda: any(r["fault"] == "hang" for r in sb.requests(since)), timeout)[0]


def timed(fn, *a):
    t0 = time.time()
    r = fn(*a)
    return r, time.time() - t0


def has_extension(dbname, connect=d.connect):
    c = connect(dbname)
    try:
        return q1(c, "SELECT count(*) FROM pg_extension WHERE extname = 'digime'") == 1
    finally:
        c.close()


def idle_workers(conn):
    return [r for r in d.activity(conn) if r["backend_type"] == "digime worker"
            and r["application_name"] == "digime worker" and r["state"] == "idle"]


# --------------------------------------------------------------------------
# (a) main cluster
# --------------------------------------------------------------------------
@tap.test
def one_worker_per_database():
    sb.reset()
    root = d.connect()
    for db in ("t060a", "t060n"):
        d.drop_database(root, db, force=True)
    state["log_n"] = main_log_size()
    state["t_n"] = time.time()
    q(root, "CREATE DATABASE t060n")
    q(root, "CREATE DATABASE t060a")
    state["oid_n"] = q1(root, "SELECT oid FROM pg_database WHERE datname = 't060n'")
    state["oid_a"] = q1(root, "SELECT oid FROM pg_database WHERE datname = 't060a'")
    a = d.connect("t060a")
    q(a, "CREATE EXTENSION digime")
    pid, dt = d.wait_db_worker(root, "t060a", timeout=NAPTIME + 8)
    figure("worker start after CREATE EXTENSION", "%.2f s" % dt)
    tap.ok(pid is not None and dt < NAPTIME + 1,
           "CREATE EXTENSION: the database gets a worker within digime.worker_naptime (%.2f s)" % dt)

    launchers = [r for r in d.activity(root) if r["backend_type"] == "digime launcher"]
    tap.eq([(r["datname"], r["application_name"], r["wait_event_type"], r["wait_event"]) for r in launchers],
           [(None, "digime launcher", "Extension", "Extension")],
           "one launcher, connected to no database, waiting on wait event Extension")

    dbs = [r[0] for r in q(root, "SELECT datname FROM pg_database WHERE datallowconn "
                                 "AND NOT datistemplate ORDER BY datname")]
    want = sorted(db for db in dbs if has_extension(db))
    got, _ = d.wait_for(lambda: sorted(r["datname"] for r in idle_workers(root)) == want
                        and idle_workers(root), timeout=NAPTIME * 3)
    tap.eq(sorted(r["datname"] for r in (got or idle_workers(root))), want,
           "exactly one idle 'digime worker' per database with the extension (%d of %d databases)"
           % (len(want), len(dbs)))
    tap.ok(got and all((r["wait_event_type"], r["wait_event"]) == ("Extension", "Extension") for r in got),
           "idle workers wait on wait event Extension", repr(got))
    tap.ok("t060n" not in [r["datname"] for r in d.activity(root)], "no worker for t060n (no extension)")
    state["worker_a"] = pid
    a.close()
    root.close()


@tap.test
def drop_and_create_extension():
    root = d.connect()
    a = d.connect("t060a")
    old = state["worker_a"]
    q(a, "DROP EXTENSION digime")
    gone, dt = d.wait_no_db_worker(root, "t060a", timeout=NAPTIME + 8)
    figure("worker exit after DROP EXTENSION", "%.2f s" % dt)
    tap.ok(gone and dt < NAPTIME + 1, "DROP EXTENSION: the database's worker exits (%.2f s)" % dt)
    tap.ok(d.wait_for(lambda: not os.path.exists("/proc/%d" % old), timeout=2)[0], "... the process is gone")
    since = main_log_size()
    seen = []
    d.wait_for(lambda: seen.extend(r["datname"] for r in d.activity(root)) and False,
               timeout=NAPTIME + 1, interval=0.1)
    tap.eq(d.log_worker_starts(main_log(since), state["oid_a"]), 0,
           "while the extension is absent the launcher starts no worker there (%d s)" % (NAPTIME + 1))
    tap.ok("t060a" not in seen, "... and pg_stat_activity shows none")

    q(a, "CREATE EXTENSION digime")
    pid, dt = d.wait_db_worker(root, "t060a", timeout=NAPTIME + 8, other_than=old)
    figure("worker start after CREATE EXTENSION again", "%.2f s" % dt)
    tap.ok(pid is not None and dt < NAPTIME + 1,
           "CREATE EXTENSION again: a new worker within digime.worker_naptime (%.2f s)" % dt)
    d.add_example_contract(a)
    tok = d.full_authorization(a, sb, C, state="t060a-1")
    tap.ok(tok["id"] is not None and sb_valid(access_token(a, tok["id"])),
           "a full flow works there (token row stored, its access token valid at digi.me)")

    q(root, "ALTER DATABASE t060a SET digime.auto_refresh = off")
    new, dt = d.wait_db_worker(root, "t060a", timeout=NAPTIME + 8, other_than=pid)
    tap.ok(new is not None and dt < NAPTIME + 2,
           "ALTER DATABASE ... SET restarts the database's worker (%.2f s)" % dt)
    state["worker_a"] = new
    a.close()

    # the database created without the extension, watched since before CREATE DATABASE
    window = time.time() - state["t_n"]
    starts = d.log_worker_starts(main_log(state["log_n"]), state["oid_n"])
    tap.ok(starts <= 1, "database without the extension: the launcher started a worker there at most "
           "once in %.1f s (%d times)" % (window, starts),
           "digime worker started %d times for database %d (no extension) in %.1f s: the launcher "
           "keeps starting a worker there every digime.worker_naptime" % (starts, state["oid_n"], window))
    root.close()


@tap.test
def idle_cpu():
    root = d.connect()
    launcher = d.launcher_pid(root)
    worker = d.db_worker_pid(root, "t060a")
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.time()
    before = [d.proc_cpu_ticks(p) for p in (launcher, worker)]
    time.sleep(2 * NAPTIME)
    after = [d.proc_cpu_ticks(p) for p in (launcher, worker)]
    dt = time.time() - t0
    share = [(b - a) / hz / dt for a, b in zip(before, after)]
    figure("idle CPU", "launcher %.2f %%, worker %.2f %% over %.1f s" % (100 * share[0], 100 * share[1], dt))
    tap.ok(share[0] < 0.02 and share[1] < 0.02,
           "idle launcher and worker use under 2 %% CPU (%.2f %%, %.2f %%)" % (100 * share[0], 100 * share[1]))
    root.close()


@tap.test
def drop_database_right_after_create_extension():
    """DROP DATABASE right after CREATE EXTENSION, while the launcher starts the database's
    worker.  Probabilistic: the worker is in its start-up window for a few milliseconds, so
    DROP DATABASE is sent 0 to 20 ms after the commit, 22 times (each try ~0.2 s)."""
    root = d.connect()
    times, errors = [], []
    for i in range(22):
        d.drop_database(root, "t060x", force=True)
        q(root, "CREATE DATABASE t060x")
        c = d.connect("t060x")
        q(c, "CREATE EXTENSION digime")
        c.close()
        time.sleep((i % 11) * 0.002)
        e, dt = timed(d.error, root, "DROP DATABASE t060x")
        times.append(dt)
        if e is not None:
            errors.append("try %d (%d ms after the commit): %.2f s, %s" % (i, (i % 11) * 2, dt, e[:3]))
    d.drop_database(root, "t060x", force=True)
    figure("DROP DATABASE right after CREATE EXTENSION", "max %.2f s, %d of 22 failed" % (max(times), len(errors)))
    tap.ok(not errors and max(times) < 2.5, "DROP DATABASE right after CREATE EXTENSION (worker starting) "
           "succeeds promptly, 22 times (max %.2f s)" % max(times), "\n".join(errors))
    root.close()


def drop_timed(root, db):
    d.discard_database_tokens(db)
    e, dt = timed(d.error, root, "DROP DATABASE %s" % db)
    return e, dt


@tap.test
def drop_rename_template():
    root = d.connect()
    for db in ("t060d", "t060r", "t060r2", "t060t"):
        d.drop_database(root, db, force=True)

    # DROP DATABASE (without FORCE) while the worker idles
    q(root, "CREATE DATABASE t060d")
    c = d.connect("t060d")
    q(c, "CREATE EXTENSION digime")
    c.close()
    pid, _ = d.wait_db_worker(root, "t060d", timeout=NAPTIME + 8)
    e, dt = drop_timed(root, "t060d")
    figure("DROP DATABASE, idle worker", "%.2f s" % dt)
    tap.ok(pid is not None and e is None and dt < 2.5,
           "DROP DATABASE of a database whose worker idles succeeds promptly (%.2f s)" % dt, repr(e))

    # ... and while its worker has a token request in flight (an inbox row, the API hangs)
    q(root, "CREATE DATABASE t060d")
    c = d.connect("t060d")
    q(c, "CREATE EXTENSION digime")
    d.add_example_contract(c)
    pid, _ = d.wait_db_worker(root, "t060d", timeout=NAPTIME + 8)
    loc = pending_callback(c, "t060d-1")
    sb.fault(endpoint="oauth/token", action="hang", seconds=20)
    s0 = sb.last_seq()
    q(c, "SELECT digime.digime_submit_callback(%s)", (loc,))
    c.close()
    hung = wait_hang(s0)
    e, dt = drop_timed(root, "t060d")
    figure("DROP DATABASE, request in flight", "%.2f s" % dt)
    tap.ok(hung and e is None and dt < 4.5,
           "DROP DATABASE while the worker has a request in flight succeeds after the worker's "
           "3 s grace (%.2f s)" % dt, repr(e))
    tap.ok(pid is not None and d.wait_for(lambda: not os.path.exists("/proc/%d" % pid), timeout=2)[0],
           "... and the worker is gone")

    # ALTER DATABASE ... RENAME TO
    q(root, "CREATE DATABASE t060r")
    c = d.connect("t060r")
    q(c, "CREATE EXTENSION digime")
    c.close()
    pid, _ = d.wait_db_worker(root, "t060r", timeout=NAPTIME + 8)
    e, dt = timed(d.error, root, "ALTER DATABASE t060r RENAME TO t060r2")
    figure("ALTER DATABASE RENAME", "%.2f s" % dt)
    tap.ok(pid is not None and e is None and dt < 2.5,
           "ALTER DATABASE ... RENAME TO of a database whose worker runs succeeds promptly (%.2f s)" % dt,
           repr(e))
    new, dt = d.wait_db_worker(root, "t060r2", timeout=NAPTIME + 8, other_than=pid)
    tap.ok(new is not None and dt < NAPTIME + 1, "the renamed database gets its worker back (%.2f s)" % dt)

    # CREATE DATABASE ... TEMPLATE
    e, dt = timed(d.error, root, "CREATE DATABASE t060t TEMPLATE t060r2")
    figure("CREATE DATABASE TEMPLATE", "%.2f s" % dt)
    tap.ok(e is None and dt < 2.5,
           "CREATE DATABASE ... TEMPLATE a database whose worker runs succeeds promptly (%.2f s)" % dt,
           repr(e))
    back, dt1 = d.wait_db_worker(root, "t060r2", timeout=NAPTIME + 8, other_than=new)
    copy, dt2 = d.wait_db_worker(root, "t060t", timeout=NAPTIME + 8)
    tap.ok(back is not None and dt1 < NAPTIME + 1, "the template's worker comes back (%.2f s)" % dt1)
    tap.ok(copy is not None, "the copy (which has the extension) gets a worker of its own")
    c = d.connect("t060t")
    d.add_example_contract(c)
    tok = d.full_authorization(c, sb, C, state="t060t-1")
    tap.ok(sb_valid(access_token(c, tok["id"])), "a full flow works in the copy")
    c.close()
    for db in ("t060r2", "t060t"):
        e, dt = drop_timed(root, db)
        tap.ok(e is None and dt < 2.5, "DROP DATABASE %s (%.2f s)" % (db, dt), repr(e))
    tap.eq([r["datname"] for r in d.activity(root) if r["datname"] in ("t060d", "t060r2", "t060t")], [],
           "no worker is left for a dropped database")
    root.close()


@tap.test
def worker_memory_flat():
    conn = d.fresh_db("t060m")
    d.add_example_contract(conn)
    root = d.connect()
    toks = [d.full_authorization(conn, sb, C, state="t060m-%d" % i)["id"] for i in range(20)]
    pid, _ = d.wait_db_worker(root, "t060m", timeout=NAPTIME + 8)
    ids = ",".join(str(t) for t in toks[:4])
    loop = ("DO $$BEGIN FOR i IN 1..COUNT LOOP PERFORM digime.digime_refresh_token((ARRAY[%s])[1 + i %% 4]); "
            "END LOOP; END$$" % ids)
    batch = "CALL digime.digime_refresh_expiring(within => '10 years', concurrency => 8)"
    # warm-up: caches, connection pool, JWKS, prepared statements
    q(conn, loop.replace("COUNT", "400"))
    for _ in range(5):
        q(conn, batch)
    rss0 = d.proc_status_kb(pid, "RssAnon")
    t0 = time.time()
    n_single, results = 0, []
    for _ in range(6):
        q(conn, loop.replace("COUNT", "500"))
        n_single += 500
    for _ in range(40):
        results.append(tuple(q(conn, batch)[0]))
    dt = time.time() - t0
    rss1 = d.proc_status_kb(pid, "RssAnon")
    n = n_single + sum(r[0] for r in results)
    figure("worker RssAnon", "%d kB before, %d kB after %d refreshes (%d single, %d in 40 batches) "
           "in %.1f s: %+d kB" % (rss0, rss1, n, n_single, n - n_single, dt, rss1 - rss0))
    tap.eq(set(results), {(20, 0, 0, 0)}, "each batch refreshed all 20 tokens (refreshed, failed, "
           "needs_reauthorization, skipped)")
    tap.eq(d.db_worker_pid(root, "t060m"), pid, "the same worker served all of them")
    if d.SANITIZED:
        tap.skip("the worker's RssAnon grew by less than 2 MB",
                 "under ASan RssAnon measures its quarantine, not leaks (%+d kB)" % (rss1 - rss0))
    else:
        tap.ok(rss1 - rss0 < 2048, "the worker's RssAnon grew by less than 2 MB over %d refreshes (%+d kB)"
               % (n, rss1 - rss0))
    valid = {t["access_token"] for t in sb.tokens() if t["state"] == "valid"}
    tap.ok(all(access_token(conn, t) in valid for t in toks), "every stored token is digi.me's current one")
    conn.close()
    d.drop_database(root, "t060m")
    root.close()


# --------------------------------------------------------------------------
# (b) an extra cluster: stop, crash, terminate
# --------------------------------------------------------------------------
@tap.test
def extra_cluster_setup():
    cl = state["cl"] = d.extra_cluster("t060", {"digime.worker_naptime": NAPTIME,
                                                "max_worker_processes": 16})
    root = cl.connect()
    q(root, "CREATE DATABASE w")
    w = cl.connect("w")
    q(w, "SET client_min_messages = error")
    q(w, "CREATE EXTENSION digime")
    d.add_example_contract(w)
    state["tok"] = d.full_authorization(w, sb, C, state="t060w-1")["id"]
    pid, dt = d.wait_db_worker(root, "w", timeout=NAPTIME + 8)
    tap.ok(pid is not None and d.launcher_pid(root) is not None, "extra cluster: launcher and worker of w run")
    w.close()
    root.close()


def refresh_in_background(cl, tok):
    """digime_refresh_token(tok) in database w of cl, in a thread: (thread, result), where
    result["e"] becomes None on success or (SQLSTATE, message)."""
    res = {}

    def refresh():
        c = cl.connect("w")
        try:
            q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
            res["e"] = None
        except psycopg2.Error as e:
            res["e"] = (e.pgcode, str(e).strip())

    th = threading.Thread(target=refresh)
    th.start()
    return th, res


@tap.test
def fast_stop_in_flight():
    cl = state["cl"]
    w = cl.connect("w")
    tok = state["tok"]
    before = d.token_json(w, tok)
    sb.fault(endpoint="oauth/token", action="hang", seconds=20)
    s0 = sb.last_seq()
    th, res = refresh_in_background(cl, tok)
    hung = wait_hang(s0)
    w.close()
    rc, dt, out = cl.pg_ctl_stop("fast")
    th.join(10)
    figure("pg_ctl stop -m fast with a request in flight", "%.2f s" % dt)
    tap.ok(hung and rc == 0 and dt < 5,
           "pg_ctl stop -m fast with a token request in flight returns within 5 s (%.2f s)" % dt, out)
    tap.ok(res.get("e") is not None and not th.is_alive(), "the waiting caller got an error", repr(res))
    cl.start()
    w = cl.connect("w")
    tap.eq(d.token_json(w, tok), before, "after the restart the token is unchanged")
    tap.ok(sb_valid(before["accessToken"]["value"]), "... and still digi.me's current one")
    q(w, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.ok(sb_valid(access_token(w, tok)), "a refresh works after the restart")
    w.close()


def refreshes_issued():
    return sb.stats()["tokens"]["issued"].get("refresh", 0)


def slow_refresh_while_stopping(stop, label):
    """A refresh whose answer takes 2 s while the worker is stopped by stop(): the pair digi.me
    issues must be stored (it rotated the old one): the worker gives requests in flight 3 s."""
    cl = state["cl"]
    w = cl.connect("w")
    tok = state["tok"]
    sb.fault(endpoint="oauth/token", action="delay", seconds=2)
    s0 = sb.last_seq()
    n_issued = refreshes_issued()
    th, res = refresh_in_background(cl, tok)
    d.wait_for(lambda: sb.requests(s0), timeout=5)
    w.close()
    stop()
    th.join(15)
    # digi.me processes the request after its delay, whatever the client did
    d.wait_for(lambda: refreshes_issued() > n_issued, timeout=10)
    t_req = sb.requests(s0)[0]["t"]
    issued = [t for t in sb.tokens() if t["source"] == "refresh" and t["issued_at"] >= t_req]
    c, _ = cl.wait_accepting("w", timeout=30)
    stored = access_token(c, tok)
    new = issued[-1] if issued else {}
    tap.ok(issued and stored == new.get("access_token") and sb_valid(stored),
           "%s while digi.me takes 3 s to answer a refresh: the pair it issued is stored" % label,
           "caller: %r\nissued pair delivered=%r; stored token is %s at digi.me"
           % (res.get("e"), new.get("delivered"),
              next((t["state"] for t in sb.tokens() if t["access_token"] == stored), "unknown")))
    if not sb_valid(stored):
        # repair for the tests that follow: a new authorization
        state["tok"] = d.full_authorization(c, sb, C, state="t060w-%s" % label.split()[0])["id"]
    c.close()


@tap.test
def terminate_with_slow_answer():
    cl = state["cl"]
    root = cl.connect()
    pid = d.db_worker_pid(root, "w")
    slow_refresh_while_stopping(lambda: q(root, "SELECT pg_terminate_backend(%s)", (pid,)),
                                "pg_terminate_backend of the worker")
    root.close()


@tap.test
def fast_stop_with_slow_answer():
    cl = state["cl"]
    out = {}

    def stop():
        out["r"] = cl.pg_ctl_stop("fast")
        cl.start()
    slow_refresh_while_stopping(stop, "pg_ctl stop -m fast")
    rc, dt, _ = out["r"]
    tap.ok(rc == 0 and dt < 5, "... and the stop still returns within 5 s (%.2f s)" % dt)


def crash(which):
    """kill -9 of the database worker / an ordinary backend / the launcher of the extra cluster.

    Row a is in flight at the API when the process is killed.  To queue row b while the victim
    is dead and before the crash restart (which takes ~0.1 s), the postmaster is held with
    SIGSTOP around the kill; an existing session commits row b meanwhile (it needs no
    postmaster), then SIGCONT lets the postmaster see the death and restart the cluster."""
    cl = state["cl"]
    w = cl.connect("w")
    root = cl.connect()
    loc_a = pending_callback(w, "t060-%s-a" % which)
    loc_b = pending_callback(w, "t060-%s-b" % which)
    launcher0 = d.launcher_pid(root)
    worker0, _ = d.wait_db_worker(root, "w", timeout=NAPTIME + 8)
    victim = cl.connect("w")
    pid = {"worker": worker0, "launcher": launcher0, "backend": d.backend_pid(victim)}[which]
    sb.fault(endpoint="oauth/token", action="hang", seconds=15)
    s0 = sb.last_seq()
    id_a = q1(w, "SELECT digime.digime_submit_callback(%s)", (loc_a,))
    hung = wait_hang(s0)
    root.close()
    since = cl.log_size()
    postmaster = cl.postmaster_pid()
    queued = {}

    def queue_b():
        # its commit callback takes the worker layer's LWLock, which the killed process may
        # have held (the crash restart frees it): the row is committed before that callback
        try:
            queued["id"] = q1(w, "SELECT digime.digime_submit_callback(%s)", (loc_b,))
        except psycopg2.Error as e:
            queued["error"] = str(e).strip()

    os.kill(postmaster, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        dead, _ = d.wait_for(lambda: not os.path.exists("/proc/%d/status" % pid)
                             or "State:\tZ" in open("/proc/%d/status" % pid).read(), timeout=5, interval=0.01)
        th = threading.Thread(target=queue_b, daemon=True)
        th.start()
        th.join(3)
    finally:
        t_cont = time.time()
        os.kill(postmaster, signal.SIGCONT)
        t0 = time.time()
    tap.ok(hung and dead, "%s killed (kill -9) with row a in flight; row b queued after its death" % which)
    w.close()
    restarted, _ = d.wait_for(lambda: "all server processes terminated; reinitializing" in cl.log_text(since),
                              timeout=20)
    c, _ = cl.wait_accepting("w", timeout=30)
    t_accept = time.time() - t0
    tap.ok(restarted and c is not None, "... the postmaster restarts the cluster", cl.log_text(since)[-2000:])
    if c is None:
        return
    # row b by its state (the row keeps its callback URL without the code)
    id_b = q1(c, "SELECT id FROM digime.callback_inbox WHERE callback_url LIKE %s",
              ("%state=t060-" + which + "-b&%",))
    tap.ok(id_b is not None, "... row b, committed while the %s was dead, is in the inbox%s"
           % (which, "" if "id" in queued else " (its session was still in the commit callback)"),
           repr(queued))
    launcher1, _ = d.wait_for(lambda: (d.launcher_pid(c) or 0) not in (0, launcher0) and d.launcher_pid(c),
                              timeout=15)
    t_launcher = time.time() - t0
    worker1, _ = d.wait_db_worker(c, "w", timeout=15, other_than=worker0)
    t_worker = time.time() - t0
    tap.ok(launcher1 is not None, "... the launcher comes back (new pid, %.2f s after the restart began)"
           % t_launcher)
    tap.ok(worker1 is not None, "... and starts the worker of w again (%.2f s)" % t_worker)

    def rows():
        r = q(c, "SELECT id, status, token_id, sqlstate FROM digime.callback_inbox WHERE id IN (%s, %s) "
                 "ORDER BY id", (id_a, id_b))
        return r if len(r) == 2 and all(x[1] != "pending" for x in r) else None
    done, _ = d.wait_for(rows, timeout=20, interval=0.1)
    t_done = time.time() - t0
    figure("kill -9 of the %s" % which, "after SIGCONT: accepting %.2f s, launcher %.2f s, worker %.2f s, "
           "both inbox rows done %.2f s" % (t_accept, t_launcher, t_worker, t_done))
    final = done or q(c, "SELECT id, status, token_id, sqlstate FROM digime.callback_inbox "
                         "WHERE id IN (%s, %s) ORDER BY id", (id_a, id_b))
    tap.eq([(x[1], x[3]) for x in final], [("done", None), ("done", None)],
           "... the row in flight at the crash and the row queued while the %s was dead are both done" % which)
    fin = dict(q(c, "SELECT id, extract(epoch FROM finished_at)::float8 FROM digime.callback_inbox "
                    "WHERE id IN (%s, %s)", (id_a, id_b)))
    late = [id_a] + ([id_b] if which == "worker" else [])
    tap.ok(all(fin.get(i) is not None and fin[i] >= t_cont for i in late),
           "... %s after the crash restart" % ("both completed" if which == "worker" else "row a completed"),
           repr((fin, t_cont)))
    ids = [x[2] for x in final if x[2] is not None]
    tap.eq(q1(c, "SELECT count(*) FROM digime.user_tokens WHERE id = ANY(%s)", (ids,)), 2,
           "... each with its token row stored")
    tap.ok(len(ids) == 2 and all(sb_valid(access_token(c, t)) for t in ids),
           "... holding digi.me's current tokens")
    tap.eq(len([r for r in idle_workers(c) if r["datname"] == "w"]), 1, "... one worker for w, not two")
    c.close()


@tap.test
def kill_database_worker():
    crash("worker")


@tap.test
def kill_backend():
    crash("backend")


@tap.test
def kill_launcher():
    crash("launcher")


@tap.test
def terminate_database_worker():
    cl = state["cl"]
    c = cl.connect("w")
    tok = state["tok"]
    old, _ = d.wait_db_worker(c, "w", timeout=NAPTIME + 8)
    since = cl.log_size()
    t0 = time.time()
    tap.eq(q1(c, "SELECT pg_terminate_backend(%s)", (old,)), True, "pg_terminate_backend of the worker of w")
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.ok(sb_valid(access_token(c, tok)), "a refresh made right after it succeeds")
    t2 = d.full_authorization(c, sb, C, state="t060-term")
    tap.ok(sb_valid(access_token(c, t2["id"])), "so does a full flow")
    new, _ = d.wait_db_worker(c, "w", timeout=15, other_than=old)
    dt = time.time() - t0
    log = cl.log_text(since)
    oneshot = log.count('starting background worker process "digime one-shot worker"')
    figure("worker back after pg_terminate_backend", "%.2f s (%d request(s) served by one-shot workers meanwhile)"
           % (dt, oneshot))
    tap.ok(new is not None and dt < 5, "the worker comes back within a few seconds (%.2f s)" % dt)
    tap.ok("reinitializing" not in log and "terminated by signal" not in log,
           "a terminated worker is no crash: no restart of the cluster")
    c.close()


@tap.test
def extra_cluster_log():
    cl = state["cl"]
    secrets = sb.secrets()["values"] + d.recorded_secrets()
    leaked = d.find_secrets(cl.log_text(), secrets)
    tap.eq(len(leaked), 0, "no secret in the extra cluster's log (full statement logging)")
    cl.stop()


# --------------------------------------------------------------------------
# (c) without shared_preload_libraries, and with no free worker slot
# --------------------------------------------------------------------------
def oneshot_starts(cl, since):
    return cl.log_text(since).count('starting background worker process "digime one-shot worker"')


@tap.test
def without_preload():
    # log_statement none: without the preload the redaction hook loads after the statement is logged
    cl = state["np"] = d.extra_cluster("t060np", {"shared_preload_libraries": "", "log_statement": "none"})
    root = cl.connect()
    tap.eq(q1(root, "SHOW max_worker_processes"), "8", "max_worker_processes is the default, 8")
    q(root, "CREATE DATABASE np")
    c = cl.connect("np")
    q(c, "SET client_min_messages = error")
    q(c, "CREATE EXTENSION digime")
    d.add_example_contract(c)
    since = cl.log_size()
    tok = d.full_authorization(c, sb, C, state="t060np-1")["id"]
    q(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.ok(sb_valid(access_token(c, tok)), "not preloaded: a full flow and a refresh work")
    tap.eq(oneshot_starts(cl, since), 2, "... each token request served by a one-shot worker (2 started)")
    loc = pending_callback(c, "t060np-2")
    inbox = q1(c, "SELECT digime.digime_submit_callback(%s)", (loc,))
    tap.eq(q(c, "CALL digime.digime_process_inbox()"), [(1, 0, 0)], "CALL digime_process_inbox() completes a "
           "queued callback (done 1, failed 0, retrying 0)")
    tap.eq(q1(c, "SELECT status FROM digime.callback_inbox WHERE id = %s", (inbox,)), "done", "... row done")
    # (a one-shot worker exits right after it answered)
    tap.eq(d.wait_for(lambda: d.activity(root) == [], timeout=2)[0] or d.activity(root), True,
           "no launcher and no database worker run (and no one-shot worker stays)")
    c.close()
    root.close()
    state["np_tok"] = tok


def refused_without_slot(cl, label):
    c = cl.connect("np")
    tok = state["np_tok"]
    before = d.token_json(c, tok)
    ntok = q1(c, "SELECT count(*) FROM digime.user_tokens")
    loc = pending_callback(c, "t060np-%s" % label)
    s0 = sb.last_seq()
    since = cl.log_size()
    e, dt = timed(d.error, c, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    tap.ok(e is not None and e[0] == "53400" and e[3] is not None and "max_worker_processes" in e[3],
           "%s: the callback fails with 53400 and a HINT naming max_worker_processes" % label, repr(e))
    tap.ok(dt < 1, "... at once (%.2f s)" % dt)
    e2 = d.error(c, "SELECT id FROM digime.digime_refresh_token(%s)", (tok,))
    tap.eq(e2 and e2[0], "53400", "%s: so does a refresh" % label)
    inbox = q1(c, "SELECT digime.digime_submit_callback(%s)", (loc,))
    e3 = d.error(c, "CALL digime.digime_process_inbox()")
    tap.eq(e3 and e3[0], "53400", "%s: and CALL digime_process_inbox()" % label)
    tap.eq(d.api_records(sb, s0), [], "%s: nothing was sent to digi.me" % label)
    tap.eq(q1(c, "SELECT count(*) FROM digime.user_tokens"), ntok, "%s: no token row was added" % label)
    tap.eq(d.token_json(c, tok), before, "%s: the refreshed token is unchanged" % label)
    tap.eq(q1(c, "SELECT status FROM digime.authorizations WHERE state = %s", ("t060np-%s" % label,)),
           "pending", "%s: the authorization is still pending" % label)
    tap.eq(q1(c, "SELECT status FROM digime.callback_inbox WHERE id = %s", (inbox,)), "pending",
           "%s: the inbox row is still pending" % label)
    q(c, "DELETE FROM digime.callback_inbox WHERE id = %s", (inbox,))
    c.close()
    return since


@tap.test
def no_free_worker_slot():
    cl = state["np"]
    # the logical replication launcher takes the only slot
    cl.settings["max_worker_processes"] = 1
    cl.restart()
    root = cl.connect()
    tap.eq([r[0] for r in q(root, "SELECT backend_type FROM pg_stat_activity WHERE backend_type "
                                  "NOT IN ('client backend', 'checkpointer', 'background writer', "
                                  "'walwriter', 'autovacuum launcher') ORDER BY 1")],
           ["logical replication launcher"], "max_worker_processes = 1: the logical replication launcher "
           "holds the only slot")
    root.close()
    refused_without_slot(cl, "not preloaded")

    # preloaded, and the launcher cannot start a worker for the database either
    cl.settings["shared_preload_libraries"] = "digime"
    cl.settings["max_worker_processes"] = 2
    cl.settings["digime.worker_naptime"] = NAPTIME
    cl.restart()
    root = cl.connect()
    d.wait_for(lambda: d.launcher_pid(root), timeout=10)
    tap.ok(d.launcher_pid(root) is not None and d.db_worker_pid(root, "np") is None,
           "preloaded, max_worker_processes = 2: the launcher runs, the database has no worker")
    root.close()
    since = refused_without_slot(cl, "preloaded")
    tap.ok("digime launcher could not start a worker for database" in cl.log_text()
           and "Raise max_worker_processes." in cl.log_text(),
           "the launcher logs that it could not start a worker, with a HINT")
    cl.stop()


tap.run()
