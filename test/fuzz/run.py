#!/usr/bin/python3
"""Hostile-answer fuzz driver for digime.

Makes N calls through SQL (psycopg2), with digime.base_url / digime.onboard_url
pointing at the hostile proxy (hostile.py) in front of the sandbox, mixing:

  authorize      digime_authorize_url without options
  authorize+opt  digime_authorize_url with options (session_options, sample_data,
                 locale, storage_id -> POST reference, user_token_id -> maybe a
                 refresh first, ...)
  callback       an authorization (unmutated), then the hostile part: the
                 onboarding redirect and digime_handle_callback (code exchange)
  refresh        digime_refresh_token
  reauthorize    digime_reauthorize_url, sometimes followed by its callback

Everything a call needs first (a stored token, a pending authorization) is
made with unmutated answers; then the call's own requests get answers mutated
from random.Random("SEED/CALL/REQUEST").  Each call's choices come from
random.Random("SEED:CALL") only, so `--only N` replays call N alone and
`--calls N` replays the run up to it.

After each call it checks: the backend and the postmaster are alive, no error
of class XX or 58 (nor any SQLSTATE outside the documented set for the call),
nothing was written for a rejected answer (row counts and a digest of
digime.user_tokens / digime.authorizations), what was accepted was stored as
sent (values, expiries, URL code, session); at the end (and every 250 calls)
the server log (no crash, no PANIC/TRAP, no resource-leak WARNING) and the
backend's RssAnon after warm-up vs at the end.

    run.py [--seed S] [--calls N] [--first K | --only K] [--db NAME] [--log FILE]

Environment: libpq's PG* (a superuser), DM_SANDBOX_URL, DM_CA_FILE (the sandbox's
--dir is its directory, or DM_SANDBOX_DIR), DM_WORK (server log
$DM_WORK/postgres.log unless --log), DM_ROOT.
Exit status 0 when every check passed, 1 otherwise (the failures name the seed
and call to replay).
"""
import argparse
import collections
import decimal
import http.client
import json
import os
import random
import re
import ssl
import sys
import time
import traceback
import urllib.parse

import psycopg2
import psycopg2.extras

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "pylib"))
import hostile  # noqa: E402

ROOT = os.environ.get("DM_ROOT", os.path.abspath(os.path.join(HERE, "..", "..")))
APP = "qgEUV8iJENRiUkuYF5lLpdsOv7Hp0biy"
CONTRACT = "yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs"
ROLE = "digime_fuzz_app"
CALLBACK = "https://cb.example/fuzz/return"

# documented SQLSTATEs of a call that talks to a hostile API (README "Errors")
API_STATES = {"YD000", "YD001", "YD002", "YD003", "YD004", "YD005", "YD006", "YD007", "YD010", "YD011",
              "08001", "08006"}
CALLBACK_STATES = API_STATES | {"22023", "42501", "YD020", "YD021", "YD022", "YD023"}
# answers that leave bytes on a kept-alive connection (hostile.py closes it after them)
DESYNC = {"wire.extra-response", "wire.extra-copy", "wire.extra-late", "wire.cl-short"}
OPS = [("authorize", 22), ("authorize+opt", 20), ("callback", 28), ("refresh", 18), ("reauthorize", 12)]

CRASH_RE = re.compile(r"terminated by signal|was terminated by exception|server process \(PID \d+\) (was terminated|"
                      r"exited with exit code)|PANIC:|TRAP:|terminating any other active server processes|"
                      r"all server processes terminated|background worker \"digime[^\"]*\" \(PID \d+\) "
                      r"exited with exit code [1-9]")
LEAK_RE = re.compile(r"WARNING:.*(leak|was not closed|still referenced|not released|still active)")


def dec_loads(s):
    return json.loads(s, parse_float=decimal.Decimal, parse_int=decimal.Decimal)


def same_json(a, b):
    """Equal as JSON values (numbers compared as decimals)."""
    if isinstance(a, (int, float, decimal.Decimal)) and not isinstance(a, bool) and \
            isinstance(b, (int, float, decimal.Decimal)) and not isinstance(b, bool):
        try:
            return decimal.Decimal(a) == decimal.Decimal(b)
        except Exception:
            return False
    if type(a) != type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return a == b


class Failure(Exception):
    pass


def start_sandbox(directory):
    """A sandbox of one's own (test/sandbox/sandbox.py --dir DIRECTORY, with the example
    contract): (process, its directory, its origin).  Tests that make the sandbox deliver
    tokens digime rejects on purpose use one, so that the suite's sandbox keeps count only
    of what the other tests do (088_every_token_stored)."""
    import subprocess
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    os.chmod(os.path.dirname(directory), 0o755)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    fix = os.path.join(ROOT, "test", "fixtures", "digime-example", "read-data.key")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "test", "sandbox", "sandbox.py"), "--dir", directory,
                          "--contract", "%s:%s:%s" % (APP, CONTRACT, fix)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    info = json.loads(p.stdout.readline())
    return p, directory, "https://127.0.0.1:%d" % info["port"]


# Known bugs not fixed yet, as (id, description, pattern of the failure message): a failure
# matching one is counted and shown as KNOWN, not as a new failure.  Remove an entry when
# its fix lands.
KNOWN_ISSUES = []


class Fuzzer:
    def __init__(self, seed, db="digime_fuzz", log_path=None, rate=0.6, out=sys.stdout, mem_margin_kb=2048,
                 sandbox_url=None, sandbox_dir=None):
        self.seed, self.db, self.rate, self.out = seed, db, rate, out
        self.mem_margin_kb = mem_margin_kb
        self.sandbox_url = sandbox_url or os.environ["DM_SANDBOX_URL"]
        self.sandbox_dir = sandbox_dir or os.environ.get("DM_SANDBOX_DIR") or \
            os.path.dirname(os.environ["DM_CA_FILE"])
        self.ca_file = os.path.join(self.sandbox_dir, "ca.pem")
        work = os.environ.get("DM_WORK", "/tmp")
        self.log_path = log_path or os.path.join(work, "postgres.log")
        self.failures = []
        self.stats = collections.Counter()
        self.sqlstates = collections.Counter()
        self.mutations = collections.Counter()
        self.accepted = collections.Counter()     # mutation names of answers digime accepted
        self.ops = collections.Counter()
        self.pool = []
        self.mem = {}
        self.slowest = (0.0, None)
        self.calls_done = 0
        self.max_failures = 20
        self.known = collections.defaultdict(list)
        self.verbose = False
        self.as_limit_mb = 2048
        self.jwks_dirty = False
        self.desync_dirty = False

    # ------------------------------------------------------------------ setup
    def say(self, *a):
        print(*a, file=self.out)
        self.out.flush()

    def connect(self, db=None):
        c = psycopg2.connect(dbname=db or self.db)
        c.autocommit = True
        psycopg2.extras.register_default_jsonb(conn_or_curs=c, loads=dec_loads)
        return c

    def setup(self):
        admin = self.connect("postgres")
        cur = admin.cursor()
        cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.db)
        cur.execute('CREATE DATABASE "%s"' % self.db)
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,))
        if cur.fetchone() is None:
            cur.execute('CREATE ROLE "%s" LOGIN' % ROLE)
        admin.close()
        self.proxy = hostile.HostileServer(self.sandbox_url, self.sandbox_dir).start()
        self.chk = self.connect()
        with open(os.path.join(ROOT, "test", "fixtures", "digime-example", "read-data.key")) as f:
            key = f.read()
        self.q(self.chk, "SET client_min_messages = error; CREATE EXTENSION digime; RESET client_min_messages")
        self.q(self.chk, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (CONTRACT, APP, key))
        self.q(self.chk, "SELECT digime.digime_grant_contract(%s, %s)", (CONTRACT, ROLE))
        self.postmaster_pid = self._ppid(self.q(self.chk, "SELECT pg_backend_pid()")[0][0])
        self.limit_memory(self.postmaster_pid)      # inherited by every process forked from now on
        self.configure_cluster()
        self.conn = self.connect()
        self.conn.notices = collections.deque(maxlen=50)
        self.pid = self.q(self.conn, "SELECT pg_backend_pid()")[0][0]
        self.limit_memory(self.pid)
        self.q(self.conn, "SET digime.base_url = %s; SET digime.onboard_url = %s; SET digime.ca_file = %s; "
                          "SET digime.connect_timeout_ms = 3000; SET statement_timeout = '30s'",
               (self.proxy.base_url, self.proxy.onboard_url, self.ca_file))
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self.browser = ssl.create_default_context(cafile=self.ca_file)
        self.wait_for_worker()

    def limit_memory(self, pid):
        """Caps a server process's address space, so that a runaway allocation ends in an
        error (53200) instead of the kernel's OOM killer on a shared machine.  Capping the
        postmaster caps every backend and worker it forks later.  prlimit runs as postgres:
        lowering a limit of one's own process needs no privilege.  Not under AddressSanitizer,
        which reserves terabytes of address space for its shadow memory."""
        import subprocess
        if os.environ.get("DM_SANITIZE"):
            self.as_limited = False
            return
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        r = subprocess.run(["runuser", "-u", "postgres", "--", "prlimit", "--pid", str(pid),
                            "--as=%d" % (self.as_limit_mb << 20)], cwd="/", env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ok = r.returncode == 0
        self.as_limited = getattr(self, "as_limited", True) and ok
        if not ok:
            self.say("fuzz: warning: could not limit the address space of %d: %s" % (pid, r.stdout.strip()))

    # The digime worker performs the token-granting requests (code exchange, refresh) with
    # the cluster's settings, not the caller's: they point at the proxy for the run.
    WORKER_SETTINGS = ("base_url", "onboard_url", "ca_file", "jwks_cache_ttl", "timeout_ms",
                       "connect_timeout_ms", "retry_limit")

    def configure_cluster(self):
        values = {"base_url": self.proxy.base_url, "onboard_url": self.proxy.onboard_url,
                  "ca_file": self.ca_file,
                  # a JWKS poisoned by a mutated answer would stay cached in the worker
                  "jwks_cache_ttl": "0", "timeout_ms": "3000", "connect_timeout_ms": "3000",
                  "retry_limit": "0"}
        for k in self.WORKER_SETTINGS:
            self.q(self.chk, "ALTER SYSTEM SET digime.%s = %%s" % k, (values[k],))
        self.q(self.chk, "SELECT pg_reload_conf()")
        self.configured = True

    def unconfigure_cluster(self):
        if getattr(self, "configured", False):
            for k in self.WORKER_SETTINGS:
                self.q(self.chk, "ALTER SYSTEM RESET digime.%s" % k)
            self.q(self.chk, "SELECT pg_reload_conf()")

    def worker_pids(self):
        return [r[0] for r in self.q(self.chk, "SELECT pid FROM pg_stat_activity WHERE backend_type = "
                                               "'digime worker' AND datname = %s", (self.db,))]

    def wait_for_worker(self):
        """Until a token exchange (done by the worker) goes through the proxy: the worker has
        reloaded the settings."""
        deadline = time.monotonic() + 30
        while True:
            self.settings(3600, 0, 5000)
            self.plan(0, False)
            try:
                tid = self.new_token(0, "probe")
            except Failure:
                tid = None
            if tid is not None and any(r["endpoint"] == "oauth/token" for r in self.proxy.take_records()):
                self.pool.append(tid)
                break
            if time.monotonic() > deadline:
                raise Failure("the digime worker does not use the proxy (digime.base_url reload)")
            time.sleep(0.5)
        for pid in self.worker_pids():
            self.limit_memory(pid)

    def rss_of(self, pid):
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except (OSError, TypeError):
            return None

    @staticmethod
    def _ppid(pid):
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        return None

    def close(self):
        try:
            self.unconfigure_cluster()
        except Exception:
            pass
        for c in ("conn", "chk"):
            try:
                getattr(self, c).close()
            except Exception:
                pass
        try:
            self.proxy.stop()
        except Exception:
            pass

    @staticmethod
    def q(conn, sql, args=None):
        cur = conn.cursor()
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None

    # ------------------------------------------------------------ state probes
    def rss_anon_kb(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except OSError:
            return None

    def worker_rss(self):
        """(pid, RssAnon kB) of the database's digime worker."""
        pids = self.worker_pids()
        return (pids[0], self.rss_of(pids[0])) if pids else (None, None)

    def context_bytes(self):
        """(all memory contexts, TopMemoryContext alone) of the fuzzed backend, in bytes: what
        it holds through palloc, exactly (RssAnon also counts libcurl/OpenSSL memory and what
        glibc keeps after free())."""
        rows = self.q(self.conn, "RESET ROLE; SELECT sum(total_bytes)::bigint, sum(total_bytes) FILTER (WHERE "
                                 "name = 'TopMemoryContext')::bigint FROM pg_backend_memory_contexts")
        self.q(self.conn, "SET ROLE %s" % ROLE)
        return rows[0]

    def snapshot(self):
        r = self.q(self.chk, """
            SELECT (SELECT count(*) FROM digime.user_tokens),
                   (SELECT coalesce(md5(string_agg(concat_ws(':', id, access_token, refresh_token,
                            access_token_expires_at, refresh_token_expires_at, user_id, consent_id, state,
                            account_reference, refreshed_at), ',' ORDER BY id)), '')
                      FROM digime.user_tokens),
                   (SELECT count(*) FROM digime.authorizations),
                   (SELECT coalesce(md5(string_agg(concat_ws(':', id, status, token_id, code_verifier IS NULL,
                            code_hash), ',' ORDER BY id)), '') FROM digime.authorizations),
                   (SELECT coalesce(max(id), 0) FROM digime.authorizations),
                   (SELECT coalesce(max(id), 0) FROM digime.user_tokens)""")[0]
        return {"tokens": r[0], "tokens_md5": r[1], "auths": r[2], "auths_md5": r[3], "max_auth": r[4],
                "max_token": r[5]}

    def token_rows(self):
        return dict(self.q(self.chk, """
            SELECT id, md5(concat_ws(':', access_token, refresh_token, access_token_expires_at,
                   refresh_token_expires_at, user_id, consent_id, state, account_reference, refreshed_at))
              FROM digime.user_tokens"""))

    def token_json(self, tid):
        return self.q(self.chk, "SELECT digime.digime_user_access_token(%s)", (tid,))[0][0]

    def alive(self):
        """Raises Failure when the postmaster or the fuzzed backend is gone."""
        if self.postmaster_pid is not None:
            try:
                os.kill(self.postmaster_pid, 0)
            except OSError:
                raise Failure("the postmaster (pid %d) is gone" % self.postmaster_pid)
        if self.conn.closed:
            raise Failure("the fuzzed backend's connection is closed")

    def scan_log(self):
        """New lines of the server log that show a crash or a resource leak."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        self.log_offset += len(data)
        bad = []
        for line in data.decode("utf-8", "replace").splitlines():
            if CRASH_RE.search(line) or LEAK_RE.search(line):
                bad.append(line[:500])
        return bad

    # ---------------------------------------------------------------- helpers
    def plan(self, call, mutate, rng=None, slow=False):
        p = hostile.Plan(seed=self.seed, call=call, mutate=mutate, rate=self.rate, slow=slow)
        self.proxy.begin(p)
        return p

    def settings(self, ttl, retries, timeout_ms):
        self.q(self.conn, "RESET ROLE; SET digime.jwks_cache_ttl = %s; SET digime.retry_limit = %s; "
                          "SET digime.timeout_ms = %s; SET ROLE %s" % (ttl, retries, timeout_ms, ROLE))

    def sql(self, sql, args=None):
        """Runs a flow statement on the fuzzed backend: (rows, None) or (None, (sqlstate, message))."""
        try:
            return self.q(self.conn, sql, args), None
        except psycopg2.Error as e:
            if self.conn.closed or isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)) \
                    and e.pgcode is None:
                raise Failure("the backend went away: %s" % str(e).strip()[:300])
            return None, (e.pgcode, (e.diag.message_primary or "") + (" | " + e.diag.message_detail
                                                                       if e.diag.message_detail else ""))

    def follow(self, url):
        """GETs an onboarding URL like a browser: the Location it answers, or None."""
        u = urllib.parse.urlsplit(url)
        c = http.client.HTTPSConnection(u.hostname, u.port, context=self.browser, timeout=3)
        try:
            c.request("GET", u.path + ("?" + u.query if u.query else ""))
            r = c.getresponse()
            r.read()
            return r.getheader("Location") if 300 <= r.status < 400 else None
        except Exception:           # whatever a hostile answer does to http.client
            return None
        finally:
            c.close()

    def setup_sql(self, what, sql, args):
        """An unmutated step, retried once: a kept-alive connection (of the backend or the
        worker) may still hold bytes of an earlier call's hostile answer, read as the answer
        to this request (a finding, reported); the connection is closed after them."""
        rows, err = self.sql(sql, args)
        if err:
            # also a stale answer read from a connection (an answer of an earlier call followed
            # by more bytes): after it, the connection is closed; a real problem fails twice
            self.stats["setup step retried"] += 1
            rows, err = self.sql(sql, args)
        if err:
            raise Failure("%s failed: %s %s" % (what, err[0], err[1]))
        return rows

    def new_token(self, call, tag):
        """A stored token of ROLE, made with unmutated answers; its id."""
        self.settings(3600, 0, 5000)
        self.plan(call, False)
        state = "fz%d-%d-%s" % (self.seed, call, tag)
        rows = self.setup_sql("setup authorize", "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)",
                              (CONTRACT, CALLBACK, state))
        loc = self.follow(rows[0][0])
        rows = self.setup_sql("setup callback", "SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
        return rows[0][0]

    def pool_token(self, call, rng):
        while len(self.pool) < 3:
            self.pool.append(self.new_token(call, "pool%d" % len(self.pool)))
        return rng.choice(self.pool)

    def drop_token(self, tid):
        if tid in self.pool:
            self.pool.remove(tid)

    def housekeeping(self):
        """Keeps the tables small (snapshots are digests over them)."""
        self.q(self.chk, "DELETE FROM digime.authorizations")
        if self.pool:
            self.q(self.chk, "DELETE FROM digime.user_tokens WHERE id <> ALL(%s)", (self.pool,))
        else:
            self.q(self.chk, "DELETE FROM digime.user_tokens")

    # ------------------------------------------------------------------ oracle
    def check_error(self, what, err, allowed):
        state = err[0] or "none"
        self.sqlstates[state] += 1
        if "\ufffd" in err[1]:
            raise Failure("%s: error text is not valid UTF-8 (SQLSTATE %s): %r ... %r" % (
                what, state, err[1][:60], err[1][-60:]))
        if any(ord(ch) < 0x20 for ch in err[1]):
            raise Failure("%s: error text has control characters (SQLSTATE %s): %r ... %r" % (
                what, state, err[1][:60], err[1][-60:]))
        if state.startswith("XX") or state.startswith("58"):
            raise Failure("%s failed with SQLSTATE %s: %s" % (what, state, err[1][:400]))
        if state not in allowed:
            raise Failure("%s failed with unexpected SQLSTATE %s: %s" % (what, state, err[1][:400]))

    def records(self):
        return self.proxy.take_records()

    @staticmethod
    def token_answers(recs):
        """oauth/token answers of the call: (payload as sent or None, whether the bytes a client
        reads are exactly the recorded answer)."""
        return [(r["token_payload"] if isinstance(r.get("token_payload"), dict) else None, r["exact"])
                for r in recs if r["endpoint"] == "oauth/token"]

    def check_token_row(self, tid, payload, what, reauth=False, refresh=False):
        """The stored token equals the token payload digime accepted."""
        if not isinstance(payload, dict):
            raise Failure("%s: digime accepted a token answer whose payload is not a JSON object" % what)
        t = self.token_json(tid)
        at, rt = payload.get("access_token"), payload.get("refresh_token")
        problems = []
        try:
            if t["accessToken"]["value"] != at["value"] or t["refreshToken"]["value"] != rt["value"]:
                problems.append("token values differ from the answer")
            if decimal.Decimal(t["accessToken"]["expiry"]) != at["expires_on"] or \
                    decimal.Decimal(t["refreshToken"]["expiry"]) != rt["expires_on"]:
                problems.append("expiries differ: stored %s/%s, sent %s/%s" % (
                    t["accessToken"]["expiry"], t["refreshToken"]["expiry"], at["expires_on"], rt["expires_on"]))
            for k, (tv, pv) in {"sub": (t.get("user", {}).get("id"), payload.get("sub")),
                                "consentid": (t.get("consentid"), payload.get("consentid"))}.items():
                if (reauth or refresh) and pv is None:
                    continue        # an answer without it keeps the stored value
                if tv != pv:
                    problems.append("%s stored %r, sent %r" % (k, str(tv)[:60], str(pv)[:60]))
        except (KeyError, TypeError, AttributeError, decimal.InvalidOperation) as e:
            problems.append("accepted answer of unexpected shape (%s: %s)" % (type(e).__name__, e))
        if problems:
            raise Failure("%s: stored token %d is not what was accepted: %s" % (what, tid, "; ".join(problems)))

    def allowed_token_change(self, before_rows, recs, what):
        """After a call that may have refreshed a stored token first (authorize with
        user_token_id): every changed row must hold an accepted refresh answer."""
        after_rows = self.token_rows()
        if set(after_rows) != set(before_rows):
            raise Failure("%s: token rows added or removed (%s -> %s)" % (what, sorted(before_rows)[:10],
                                                                         sorted(after_rows)[:10]))
        changed = [tid for tid in after_rows if after_rows[tid] != before_rows[tid]]
        answers = self.token_answers(recs)
        for tid in changed:
            t = self.token_json(tid)
            if not answers:
                raise Failure("%s: token %d was rewritten without any refresh answer" % (what, tid))
            if all(exact for _, exact in answers) and not any(
                    p and isinstance(p.get("access_token"), dict) and
                    p["access_token"].get("value") == t["accessToken"]["value"] for p, _ in answers):
                raise Failure("%s: token %d was rewritten with values no refresh answer carried" % (what, tid))
        return changed

    def check_url_result(self, row, recs, endpoint, code_key, path, what):
        url, verifier, session = row
        answers = [r for r in recs if r["endpoint"] == endpoint]
        if not answers:
            raise Failure("%s: succeeded without an %s answer" % (what, endpoint))
        last = answers[-1]
        payload, body = last.get("token_payload"), last.get("body")
        prefix = self.proxy.onboard_url + path + "?"
        if not url.startswith(prefix):
            raise Failure("%s: URL does not start with %s" % (what, prefix))
        self.accepted.update(last["mutations"])
        if not last["exact"]:
            return
        code = dict(urllib.parse.parse_qsl(url[len(prefix):], keep_blank_values=True)).get("code")
        if not isinstance(payload, dict) or payload.get(code_key) != code:
            raise Failure("%s: URL code %r is not the answer's %s %r" % (
                what, (code or "")[:60], code_key, str(payload.get(code_key) if isinstance(payload, dict)
                                                       else payload)[:60]))
        if not isinstance(body, dict) or not same_json(body.get("session"), session):
            raise Failure("%s: returned session %r is not the answer's %r" % (
                what, str(session)[:80], str(body.get("session") if isinstance(body, dict) else body)[:80]))
        if not (isinstance(verifier, str) and len(verifier) == 43):
            raise Failure("%s: code_verifier of %r characters" % (what, len(verifier or "")))

    # ------------------------------------------------------------------- calls
    def random_options(self, rng):
        opts = {}
        if rng.random() < 0.5:
            opts["session_options"] = json.dumps(rng.choice([
                {}, {"pull": {}}, {"pull": {"sourceFetch": True}},
                {"pull": {"limits": {"duration": {"sourceFetch": 3600}}}},
                {"pull": {"scope": {"timeRanges": [{"from": 1, "to": 2}, {"last": "1d"}],
                                    "serviceGroups": [{"id": 1, "serviceTypes": [{"id": 2,
                                                       "serviceObjectTypes": [{"id": 3}]}]}]}}}]))
        if rng.random() < 0.3:
            opts["service_id"] = rng.choice([1, 16, 2147483647])
        if rng.random() < 0.3:
            opts["sample_data"] = json.dumps({"dataSet": rng.choice(["default", "x y"]), "autoOnboard":
                                              rng.random() < 0.5})
        if rng.random() < 0.3:
            opts["locale"] = rng.choice(["nl", "en-GB", "zh-Hant-TW"])
        if rng.random() < 0.25:
            opts["storage_id"] = rng.choice(["storage-1", "s p a c e", "\u00e9t\u00e9"])
        if rng.random() < 0.3:
            opts["sources_scope"] = json.dumps({"dataType": ["gp-data"], "organizationType": "hospital"})
        for k in ("include_sample_data_only_sources", "trigger_query"):
            if rng.random() < 0.2:
                opts[k] = rng.random() < 0.5
        if rng.random() < 0.2:
            opts["source_type"] = "push"
        return opts

    def op_authorize(self, call, rng, with_options):
        opts = self.random_options(rng) if with_options else {}
        tid = None
        if with_options and rng.random() < 0.4:
            tid = self.pool_token(call, rng)
            opts["user_token_id"] = tid
            if rng.random() < 0.4:          # due for a refresh before it is sent
                self.q(self.chk, "UPDATE digime.user_tokens SET access_token_expires_at = now() - "
                                 "interval '1 minute' WHERE id = %s", (tid,))
        names = ["contract_id => %s", "callback => %s", "state => %s"]
        args = [CONTRACT, CALLBACK, "fz%d-%d" % (self.seed, call)]
        for k, v in opts.items():
            names.append("%s => %%s" % k)
            args.append(v)
        sql = "SELECT url, code_verifier, session FROM digime.digime_authorize_url(%s)" % ", ".join(names)
        before = self.snapshot()
        rows_before = self.token_rows()
        self.mutated_plan(call, rng)
        rows, err = self.sql(sql, args)
        recs = self.records()
        after = self.snapshot()
        what = "digime_authorize_url%s" % (" (options: %s)" % ", ".join(sorted(opts)) if opts else "")
        changed = self.allowed_token_change(rows_before, recs, what)
        if changed and tid is not None and tid in self.pool and err:
            pass        # the refresh before the failed authorize was kept: as documented
        if err:
            self.check_error(what, err, API_STATES)
            if (after["auths"], after["auths_md5"]) != (before["auths"], before["auths_md5"]):
                raise Failure("%s failed (%s) but digime.authorizations changed" % (what, err[0]))
            if tid is not None and not changed:
                # a refresh answer may have been consumed at the API and rejected: the pair is dead
                if any(r["endpoint"] == "oauth/token" for r in recs):
                    self.drop_token(tid)
        else:
            if after["auths"] != before["auths"] + 1:
                raise Failure("%s succeeded but digime.authorizations went from %d to %d rows" % (
                    what, before["auths"], after["auths"]))
            self.check_url_result(rows[0], recs, "oauth/authorize", "preauthorization_code", "authorize", what)
            if "storage_id" in opts:
                ref = [r for r in recs if r["endpoint"] == "reference" and r["exact"]]
                if not ref:
                    return recs
                want = ref[-1]["body"].get("id") if ref and isinstance(ref[-1]["body"], dict) else None
                got = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(rows[0][0]).query)).get("storageRef")
                if not isinstance(want, str) or got != want:
                    raise Failure("%s: storageRef %r is not the reference answer's id %r" % (
                        what, str(got)[:60], str(want)[:60]))
        return recs

    def mutated_plan(self, call, rng):
        slow = rng.random() < 0.01
        self.settings(ttl=0 if rng.random() < 0.35 else 3600, retries=1 if rng.random() < 0.12 else 0,
                      timeout_ms=700 if slow else 5000)
        self.plan(call, True, slow=slow)

    def op_callback(self, call, rng, reauth_tid=None, url=None):
        state = "fz%d-%d" % (self.seed, call)
        if url is None:
            self.plan(call, False)
            self.settings(3600, 0, 5000)
            rows = self.setup_sql("setup authorize", "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)",
                                  (CONTRACT, CALLBACK, state))
            url = rows[0][0]
            self.mutated_plan(call, rng)
        before = self.snapshot()
        rows_before = self.token_rows()
        loc = self.follow(url)
        if loc is None:
            recs = [r for r in self.proxy.take_records() if r["endpoint"] == "onboard"]
            loc = recs[-1]["location"] if recs and recs[-1].get("location") else None
        if loc is None:
            self.stats["callback without a redirect"] += 1
            return self.records()
        loc = loc.replace("\x00", "")      # a text argument cannot hold NUL: no application could pass it
        rows, err = self.sql("SELECT id FROM digime.digime_handle_callback(%s)", (loc,))
        recs = self.records()
        after = self.snapshot()
        what = "digime_handle_callback" + (" (reauthorization)" if reauth_tid else "")
        if err:
            self.check_error(what, err, CALLBACK_STATES)
            if (after["tokens"], after["tokens_md5"], after["auths"], after["auths_md5"]) != \
                    (before["tokens"], before["tokens_md5"], before["auths"], before["auths_md5"]):
                raise Failure("%s failed (%s) but the tables changed (tokens %d -> %d, authorizations %d -> %d)"
                              % (what, err[0], before["tokens"], after["tokens"], before["auths"], after["auths"]))
            if reauth_tid is not None and any(r["endpoint"] == "oauth/token" for r in recs):
                self.drop_token(reauth_tid)
            return recs
        tid = rows[0][0]
        answers = self.token_answers(recs)
        if not answers:
            raise Failure("%s succeeded without a token answer" % what)
        if reauth_tid is None:
            if after["tokens"] != before["tokens"] + 1 or tid <= before["max_token"]:
                raise Failure("%s succeeded but no new token row (%d -> %d)" % (what, before["tokens"],
                                                                               after["tokens"]))
        else:
            if tid != reauth_tid or after["tokens"] != before["tokens"]:
                raise Failure("%s: returned token %s, expected the reauthorized %s" % (what, tid, reauth_tid))
            changed = [t for t, h in self.token_rows().items() if rows_before.get(t) != h]
            if changed != [reauth_tid]:
                raise Failure("%s: changed token rows %s" % (what, changed))
        st = self.q(self.chk, "SELECT status, token_id FROM digime.authorizations WHERE token_id = %s AND "
                              "status = 'completed' ORDER BY id DESC LIMIT 1", (tid,))
        if not st:
            raise Failure("%s succeeded but no completed authorization names token %d" % (what, tid))
        if answers[-1][1]:
            self.check_token_row(tid, answers[-1][0], what, reauth=reauth_tid is not None)
        for r in recs:
            if r["endpoint"] == "oauth/token":
                self.accepted.update(r["mutations"])
        return recs

    def op_refresh(self, call, rng):
        tid = self.pool_token(call, rng)
        before = self.token_rows()
        self.mutated_plan(call, rng)
        rows, err = self.sql("SELECT id FROM digime.digime_refresh_token(%s)", (tid,))
        recs = self.records()
        after = self.token_rows()
        what = "digime_refresh_token"
        if err:
            self.check_error(what, err, API_STATES)
            if after != before:
                raise Failure("%s failed (%s) but token rows changed" % (what, err[0]))
            if any(r["endpoint"] == "oauth/token" for r in recs):
                self.drop_token(tid)        # the API may have rotated the pair
            return recs
        if set(after) != set(before) or [t for t in after if after[t] != before[t]] != [tid]:
            raise Failure("%s succeeded but changed rows %s" % (what, [t for t in after if after.get(t) !=
                                                                  before.get(t)]))
        answers = self.token_answers(recs)
        if not answers:
            raise Failure("%s succeeded without a token answer" % what)
        if answers[-1][1]:
            self.check_token_row(tid, answers[-1][0], what, refresh=True)
        for r in recs:
            if r["endpoint"] == "oauth/token":
                self.accepted.update(r["mutations"])
        return recs

    def op_reauthorize(self, call, rng):
        tid = self.pool_token(call, rng)
        args = [tid, CALLBACK, "fz%d-%d" % (self.seed, call)]
        extra = ""
        if rng.random() < 0.3:
            extra = ", locale => 'nl', trigger_query => true"
        before = self.snapshot()
        rows_before = self.token_rows()
        self.mutated_plan(call, rng)
        rows, err = self.sql("SELECT url, code_verifier, session FROM digime.digime_reauthorize_url(%s, %s, %s"
                             + extra + ")", args)
        recs = self.records()
        after = self.snapshot()
        what = "digime_reauthorize_url"
        if self.token_rows() != rows_before:
            raise Failure("%s changed token rows" % what)
        if err:
            self.check_error(what, err, API_STATES)
            if (after["auths"], after["auths_md5"]) != (before["auths"], before["auths_md5"]):
                raise Failure("%s failed (%s) but digime.authorizations changed" % (what, err[0]))
            return recs
        if after["auths"] != before["auths"] + 1:
            raise Failure("%s succeeded but digime.authorizations went from %d to %d rows" % (
                what, before["auths"], after["auths"]))
        self.check_url_result(rows[0], recs, "oauth/token/reference", "reference_code", "user-reauth", what)
        if rng.random() < 0.6:
            recs += self.op_callback(call, rng, reauth_tid=tid, url=rows[0][0])
        return recs

    def repair_jwks_cache(self, call):
        """A mutated JWKS answer may sit in the backend's key cache (a wrong key under the
        right kid is not refetched before digime.jwks_cache_ttl runs out): one unmutated
        verification with digime.jwks_cache_ttl = 0 stores the real key set again, so that
        every call starts like a replay of it alone would."""
        self.settings(0, 0, 5000)
        self.plan(call, False)
        self.setup_sql("JWKS cache repair", "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)",
                       (CONTRACT, CALLBACK, "fz%d-%d-repair" % (self.seed, call)))
        self.jwks_dirty = False

    def resync(self, call):
        """An answer followed by more bytes (a second response, a body longer than its
        Content-Length) leaves them on the kept-alive connection of the backend or the
        worker; curl reads them as the answer to the next request on it (a finding,
        reported).  The proxy closes such connections, so one stale answer at most per
        connection: unmutated authorizations until one goes through both."""
        for attempt in range(4):
            self.settings(3600, 0, 5000)
            self.plan(call, False)
            try:
                self.new_token(call, "resync%d" % attempt)
                break
            except Failure:
                self.stats["resync: stale answer consumed"] += 1
        self.desync_dirty = False

    def one_call(self, call):
        if self.desync_dirty:
            self.resync(call)
        if self.jwks_dirty:
            self.repair_jwks_cache(call)
        rng = random.Random("%d:%d" % (self.seed, call))
        op = rng.choices([o for o, _ in OPS], [w for _, w in OPS])[0]
        self.ops[op] += 1
        t0 = time.monotonic()
        try:
            if op == "authorize":
                recs = self.op_authorize(call, rng, False)
            elif op == "authorize+opt":
                recs = self.op_authorize(call, rng, True)
            elif op == "callback":
                recs = self.op_callback(call, rng)
            elif op == "refresh":
                recs = self.op_refresh(call, rng)
            else:
                recs = self.op_reauthorize(call, rng)
        finally:
            # also when a check failed: what the call's answers left behind
            for r in self.proxy.take_records():
                if r["endpoint"] == "jwks" and r["mutations"]:
                    self.jwks_dirty = True
                if set(r["mutations"]) & DESYNC:
                    self.desync_dirty = True
        dt = time.monotonic() - t0
        if dt > self.slowest[0]:
            self.slowest = (dt, call)
        if self.verbose:
            self.say("call %d %s %.3fs rss %s: %s" % (call, op, dt, self.rss_anon_kb(), "; ".join(
                "%s %s %s" % (r["method"], r["endpoint"], ",".join(r["mutations"]) or "-") for r in recs or [])))
        for r in recs or []:
            self.mutations.update(r["mutations"])
            self.stats["requests"] += 1
            if r["mutations"]:
                self.stats["mutated answers"] += 1
        return op

    # -------------------------------------------------------------------- run
    def run(self, first, calls, only=None):
        self.setup()
        todo = [only] if only else list(range(first, first + calls))
        warm_at = todo[min(len(todo) - 1, max(100, len(todo) // 10))] if len(todo) > 1 else todo[0]
        t0 = time.monotonic()
        current = None
        try:
            for i, call in enumerate(todo):
                current = call
                if i and i % 100 == 0:
                    self.housekeeping()
                try:
                    self.one_call(call)
                except Failure as f:
                    self.fail(call, str(f))
                    self.recover()
                self.calls_done += 1
                self.alive()
                if call == warm_at:
                    self.mem["warm"] = (call, self.rss_anon_kb(), self.context_bytes(), self.worker_rss())
                if i % 250 == 249:
                    bad = self.scan_log()
                    if bad:
                        self.fail(call, "server log: " + " || ".join(bad[:5]))
                if len(self.failures) >= self.max_failures:
                    break
            self.mem["end"] = (current, self.rss_anon_kb(), self.context_bytes(), self.worker_rss())
        except Failure as f:
            self.fail(current, str(f))
        except Exception:
            self.fail(current, "driver error:\n" + traceback.format_exc())
        finally:
            self.elapsed = time.monotonic() - t0
            try:
                bad = self.scan_log()
                if bad:
                    self.fail(current, "server log: " + " || ".join(bad[:5]))
            except Exception:
                pass
        return not self.failures

    def recover(self):
        """After a failed check: the backend must still be there; start from a clean pool."""
        self.alive()
        self.pool = []
        self.jwks_dirty = True
        self.desync_dirty = True
        self.housekeeping()

    def fail(self, call, msg):
        for kid, _, pattern in KNOWN_ISSUES:
            if pattern.search(msg):
                self.known[kid].append(call)
                return
        recs = []
        try:
            recs = self.proxy.take_records()
        except Exception:
            pass
        muts = "; ".join("%s %s: %s" % (r["method"], r["endpoint"], ",".join(r["mutations"]) or "-") for r in recs)
        self.failures.append("call %s (seed %d): %s\n  answers of the call: %s\n  replay: %s --seed %d --only %s"
                             "   (or the run up to it: --calls %s)"
                             % (call, self.seed, msg, muts or "none", os.path.relpath(__file__, ROOT), self.seed,
                                call, call))

    def memory(self):
        w, e = self.mem.get("warm"), self.mem.get("end")
        if not w or not e or w[1] is None or e[1] is None:
            return None
        return {"warm_call": w[0], "warm_kb": w[1], "end_call": e[0], "end_kb": e[1], "growth_kb": e[1] - w[1],
                "ctx_warm": w[2][0], "ctx_end": e[2][0], "top_warm": w[2][1], "top_end": e[2][1],
                "ctx_growth": e[2][0] - w[2][0], "top_growth": e[2][1] - w[2][1],
                "worker_pid": e[3][0], "worker_same": w[3][0] == e[3][0], "worker_warm_kb": w[3][1],
                "worker_end_kb": e[3][1],
                "worker_growth_kb": (e[3][1] - w[3][1]) if w[3][1] is not None and e[3][1] is not None
                and w[3][0] == e[3][0] else None}

    def report(self):
        say = self.say
        say("fuzz: seed %d, %d calls in %.1f s (%.1f ms/call), %d requests, %d mutated answers" % (
            self.seed, self.calls_done, self.elapsed, 1000 * self.elapsed / max(1, self.calls_done),
            self.stats["requests"], self.stats["mutated answers"]))
        say("fuzz: operations: " + ", ".join("%s %d" % kv for kv in sorted(self.ops.items())))
        say("fuzz: SQLSTATEs of failed calls: " + ", ".join("%s %d" % kv for kv in sorted(self.sqlstates.items())))
        fam = collections.Counter()
        for k, v in self.mutations.items():
            fam[k.split(".")[0]] += v
        say("fuzz: mutation families: " + ", ".join("%s %d" % kv for kv in sorted(fam.items())))
        say("fuzz: distinct mutations: %d; accepted by digime (answers it took): %d distinct" % (
            len(self.mutations), len(self.accepted)))
        say("fuzz: slowest call %.2f s (call %s)" % self.slowest)
        m = self.memory()
        if m:
            say("fuzz: backend RssAnon %d kB after call %d, %d kB after call %d: %+d kB" % (
                m["warm_kb"], m["warm_call"], m["end_kb"], m["end_call"], m["growth_kb"]))
            say("fuzz: backend memory contexts %d -> %d bytes (%+d), TopMemoryContext %d -> %d bytes (%+d)" % (
                m["ctx_warm"], m["ctx_end"], m["ctx_growth"], m["top_warm"], m["top_end"], m["top_growth"]))
            if m["worker_growth_kb"] is not None:
                say("fuzz: digime worker (pid %d) RssAnon %d kB -> %d kB: %+d kB" % (
                    m["worker_pid"], m["worker_warm_kb"], m["worker_end_kb"], m["worker_growth_kb"]))
            else:
                say("fuzz: digime worker RssAnon not comparable (pid %s at warm-up, %s at the end)" % (
                    self.mem["warm"][3][0], m["worker_pid"]))
        for kid, desc, _ in KNOWN_ISSUES:
            if self.known[kid]:
                say("KNOWN %s (reported, not fixed here) in %d call(s), first %d: %s" % (
                    kid, len(self.known[kid]), self.known[kid][0], desc))
        for f in self.failures:
            say("FAIL " + f)


def main(argv=None):
    ap = argparse.ArgumentParser(description="hostile-answer fuzzing of digime (see the module docstring)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--first", type=int, default=1, help="number of the first call")
    ap.add_argument("--only", type=int, help="run only this call (replay)")
    ap.add_argument("--db", default="digime_fuzz")
    ap.add_argument("--log", help="server log (default $DM_WORK/postgres.log)")
    ap.add_argument("--rate", type=float, default=0.6, help="share of a call's answers that are mutated")
    ap.add_argument("--mem-margin-kb", type=int, default=2048)
    ap.add_argument("--list-mutations", action="store_true", help="print the count of every mutation used")
    ap.add_argument("--verbose", action="store_true", help="one line per call")
    a = ap.parse_args(argv)
    fz = Fuzzer(a.seed, db=a.db, log_path=a.log, rate=a.rate, mem_margin_kb=a.mem_margin_kb)
    fz.verbose = a.verbose
    ok = fz.run(a.first, a.calls, a.only)
    m = fz.memory()
    if ok and m and m["growth_kb"] > a.mem_margin_kb and not a.only:
        fz.failures.append("backend memory grew by %d kB between call %d and call %d (margin %d kB)" % (
            m["growth_kb"], m["warm_call"], m["end_call"], a.mem_margin_kb))
        ok = False
    fz.report()
    if a.list_mutations:
        for k, v in sorted(fz.mutations.items()):
            fz.say("  %6d %s%s" % (v, k, "  (accepted)" if k in fz.accepted else ""))
    fz.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
