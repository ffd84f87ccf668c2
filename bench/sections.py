#!/usr/bin/python3
"""digime benchmark sections (run by bench/run.sh; see bench/README.md).

    sections.py SECTION... [options]

Sections: scenarios, latency, cpu, rows, rss, batch, profile (all = every one
but profile, in that order, then profile when perf is installed).

The environment comes from run.sh: PGHOST/PGPORT (the cluster with
shared_preload_libraries = 'digime' and digime.key_file), BENCH_NP_HOST /
BENCH_NP_PORT (a second cluster without the preload: a one-shot worker per
token request; plaintext secrets, since digime.key_file needs the preload),
DM_SANDBOX_URL, DM_SANDBOX_PID, DM_CA_FILE, DM_ROOT, DM_WORK, BENCH_FLOOR (the
compiled bench/floor.c), DM_NODE_SDK (optional).

Every section prints its tables as it finishes; at the end all tables are
printed again with the targets, and written to DM_WORK/summary.txt and
DM_WORK/results.json (run.sh copies them and the batch plot to bench/results/).
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
import urllib.parse

ROOT = os.environ.get("DM_ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.join(ROOT, "test", "pylib"))
import psycopg2  # noqa: E402

import dmtest  # noqa: E402
from dmtest import q, q1  # noqa: E402

WORK = os.environ.get("DM_WORK", "/tmp")
APP, CONTRACT = "bench-app", "bench-contract"
KEY_FILE = os.path.join(ROOT, "test", "fixtures", "keys", "second.pem")
CALLBACK = "https://bench.example/cb"
APP_ROLE = "bench_app"
OTHER_ROLES = ("bench_r1", "bench_r2", "bench_r3")
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
SECTIONS = ("scenarios", "latency", "cpu", "rows", "rss", "batch", "profile")

AUTH_SQL = "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)"
CALLBACK_SQL = "SELECT id FROM digime.digime_handle_callback(%s)"
REFRESH_SQL = "SELECT id FROM digime.digime_refresh_token(%s)"

summary = []        # (section, text) of every table printed
targets = []        # (section, description, met: bool|None, figure text)
results = {}        # section -> figures (results.json)


def log(msg):
    sys.stderr.write("-- %s\n" % msg)
    sys.stderr.flush()


def emit(section, text):
    """Prints a table and keeps it for the summary."""
    print(text.rstrip("\n") + "\n", flush=True)
    summary.append((section, text.rstrip("\n")))


def target(section, description, met, figure):
    targets.append((section, description, met, figure))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def p90(xs):
    """Same definition as bench.py and node-sdk.js: sorted(xs)[int(n * 0.9) - 1]."""
    s = sorted(xs)
    return s[max(int(len(s) * 0.9) - 1, 0)] if s else float("nan")


def verdict(met):
    return "met" if met else "MISSED"


# --------------------------------------------------------------------------
# Processes: CPU and memory from /proc
# --------------------------------------------------------------------------
def proc_stat(pid):
    """Fields of /proc/PID/stat after the command name: [0] is field 3 (state)."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_us(pid):
    """utime + stime of a process, in microseconds (clock ticks of /proc/PID/stat)."""
    f = proc_stat(pid)
    return (int(f[11]) + int(f[12])) * TICK_US


def children_cpu_us(pid):
    """cutime + cstime: CPU of the process's children that exited and were waited for."""
    f = proc_stat(pid)
    return (int(f[13]) + int(f[14])) * TICK_US


def parent_pid(pid):
    return int(proc_stat(pid)[1])


def sched_us(pid):
    """Time on the CPU from /proc/PID/schedstat (ns resolution), in microseconds; None if absent."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0]) / 1000.0
    except (OSError, ValueError, IndexError):
        return None


def ctx_switches(pid):
    """Voluntary + involuntary context switches of a process (/proc/PID/status)."""
    return (dmtest.proc_status_kb(pid, "voluntary_ctxt_switches") or 0) + \
        (dmtest.proc_status_kb(pid, "nonvoluntary_ctxt_switches") or 0)


def machine_ticks():
    """(busy, total) clock ticks of all CPUs from /proc/stat; busy includes steal time (CPU the
    hypervisor gave to other guests) and excludes idle and iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


def machine_busy(a, b):
    return (b[0] - a[0]) / max(b[1] - a[1], 1)


def rss_kb(pid, field="RssAnon"):
    return dmtest.proc_status_kb(pid, field)


# --------------------------------------------------------------------------
# Clusters, databases, sandbox
# --------------------------------------------------------------------------
class Cluster:
    def __init__(self, label, host, port, preload):
        self.label, self.host, self.port, self.preload = label, host, int(port), preload

    def connect(self, db="postgres", user="postgres"):
        c = psycopg2.connect(host=self.host, port=self.port, dbname=db, user=user)
        c.autocommit = True
        return c


def clusters():
    pre = Cluster("preload", os.environ["PGHOST"], os.environ["PGPORT"], True)
    np_ = None
    if os.environ.get("BENCH_NP_PORT"):
        np_ = Cluster("no-preload", os.environ["BENCH_NP_HOST"], os.environ["BENCH_NP_PORT"], False)
    return pre, np_


def setup_db(cl, db):
    """A fresh database with digime, the bench contract granted to bench_app (and the other
    roles); returns (superuser connection, bench_app connection)."""
    admin = cl.connect()
    q(admin, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db)
    q(admin, 'CREATE DATABASE "%s"' % db)
    for role in (APP_ROLE,) + OTHER_ROLES:
        if q1(admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 0:
            q(admin, 'CREATE ROLE "%s" LOGIN' % role)
    admin.close()
    su = cl.connect(db)
    q(su, "SET client_min_messages = error; CREATE EXTENSION digime; RESET client_min_messages")
    q(su, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (CONTRACT, APP, open(KEY_FILE).read()))
    for role in (APP_ROLE,) + OTHER_ROLES:
        q(su, "SELECT digime.digime_grant_contract(%s, %s)", (CONTRACT, role))
    app = cl.connect(db, APP_ROLE)
    return su, app


def drop_db(cl, db):
    """Drops a section's database at its end: each database with digime holds a worker, and
    max_worker_processes (8) leaves room for only a few."""
    admin = cl.connect()
    q(admin, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % db)
    admin.close()


def worker_pid(su, db, timeout=30.0):
    """The pid of the database's digime worker (preload cluster), waiting for it to start."""
    end = time.time() + timeout
    while True:
        rows = q(su, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'digime worker' "
                     "AND datname = %s", (db,))
        if len(rows) == 1:
            return rows[0][0]
        if time.time() > end:
            raise RuntimeError("database %s: expected one digime worker, found %d" % (db, len(rows)))
        time.sleep(0.1)


def wait_no_oneshot(mon, timeout=5.0):
    """Until no digime (one-shot) worker runs in the monitored cluster."""
    end = time.time() + timeout
    while time.time() < end:
        if q1(mon, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'digime worker'") == 0:
            return
        time.sleep(0.02)


class Browser:
    """Follows onboarding URLs like a browser: one kept-alive HTTPS connection to the sandbox."""

    def __init__(self):
        self.ctx = ssl.create_default_context(cafile=os.environ["DM_CA_FILE"])
        self.conn = None

    def follow(self, url):
        u = urllib.parse.urlsplit(url)
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection(u.hostname, u.port, context=self.ctx, timeout=30)
                self.conn.request("GET", u.path + "?" + u.query)
                r = self.conn.getresponse()
                r.read()
                if r.will_close:
                    self.conn.close()
                    self.conn = None
                if r.status != 302:
                    raise RuntimeError("onboarding page answered %d" % r.status)
                return r.getheader("Location")
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise


sandbox = dmtest.Sandbox()
browser = Browser()
_state_n = [0]


def next_state(prefix):
    _state_n[0] += 1
    return "%s-%d" % (prefix, _state_n[0])


def authorize(conn, state):
    return q1(conn, AUTH_SQL, (CONTRACT, CALLBACK, state))


def full_flow(conn, prefix):
    """authorize + onboarding page + callback: returns (token id, ms authorize, page, callback)."""
    t0 = time.perf_counter()
    url = authorize(conn, next_state(prefix))
    t1 = time.perf_counter()
    loc = browser.follow(url)
    t2 = time.perf_counter()
    tid = q1(conn, CALLBACK_SQL, (loc,))
    t3 = time.perf_counter()
    return tid, (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000


def mint_and_import(su, app, n, expires_in=None):
    """n pairs minted by the sandbox, imported by bench_app with digime_import_token; optionally
    made to expire within expires_in (an interval).  Returns the token ids."""
    ids = []
    left = n
    while left > 0:
        k = min(left, 5000)
        pairs = sandbox.call("POST", "mint", {"application_id": APP, "contract_id": CONTRACT,
                                              "count": k})["pairs"]
        docs = [{"accessToken": {"value": p["access_token"], "expiry": p["access_expires_on"]},
                 "refreshToken": {"value": p["refresh_token"], "expiry": p["refresh_expires_on"]},
                 "user": {"id": p["user_id"]}, "consentid": p["consentid"]} for p in pairs]
        ids += [r[0] for r in q(app, "SELECT (digime.digime_import_token(%s, d)).id "
                                     "FROM jsonb_array_elements(%s::jsonb) d", (CONTRACT, json.dumps(docs)))]
        left -= k
    if expires_in:
        expire_soon(su, ids, expires_in)
    return ids


def expire_soon(su, ids, expires_in="1 minute"):
    q(su, "UPDATE digime.user_tokens SET access_token_expires_at = now() + %s::interval "
          "WHERE id = ANY(%s)", (expires_in, ids))


def sandbox_phase_stats_of(recs):
    """API requests, TCP connections, JWKS fetches and failures among recorded requests."""
    api = [r for r in recs if r["endpoint"] in dmtest.API_ENDPOINTS]
    ids = sorted({r["connection"] for r in api})
    return {"requests": len(api), "connections": len(ids), "connection_ids": ids,
            "jwks": sum(1 for r in api if r["endpoint"] == "jwks"),
            "failed": sum(1 for r in api if r["status"] is None or r["status"] >= 400)}


def add_stats(total, st):
    """Sums sandbox stats; connections counted once over all phases (by the sandbox's ids)."""
    for k, v in st.items():
        if k == "connection_ids":
            total[k] = sorted(set(total.get(k, [])) | set(v))
            total["connections"] = len(total[k])
        elif k != "connections":
            total[k] = total.get(k, 0) + v


def sandbox_phase_stats():
    """What the sandbox saw since its last reset (the log is cleared again)."""
    out = sandbox_phase_stats_of(sandbox.requests(0))
    sandbox.reset()
    return out


# --------------------------------------------------------------------------
# scenarios: the original benchmark (bench/bench.py), unchanged
# --------------------------------------------------------------------------
def section_scenarios(opts, pre, np_):
    out = os.path.join(WORK, "digime-bench.json")
    env = dict(os.environ, DM_BENCH_JSON=out)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), str(opts.scenario_calls)],
                       env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError("bench.py failed (exit %d)" % r.returncode)
    emit("scenarios", "Scenarios (bench/bench.py %d, database bench, superuser; wall time per call; "
                      "x warm = median / warm median)\n%s" % (opts.scenario_calls, r.stdout.rstrip()))
    results["scenarios"] = json.load(open(out))
    drop_db(pre, "bench")
    if opts.legacy:
        sdk = run_node_sdk(opts.scenario_calls, out)
        if sdk is not None:
            results["scenarios"]["sdk"] = sdk


# --------------------------------------------------------------------------
# latency: authorize, full flow, refresh; preload, no preload, Node.js SDK
# --------------------------------------------------------------------------
def latency_on(cl, n):
    """Wall time of n authorize calls, n full flows, n refreshes (bench_app on a fresh database).
    Each call is also split at the moment its API request reached the sandbox (the sandbox records
    the arrival time, same clock): before = from the SQL call to the request's arrival (SQL,
    handing over to the worker, signing, sending); after = from the arrival to the result (the
    sandbox's own work, verification, storing, committing, answering the caller)."""
    db = "bench_latency"
    su, app = setup_db(cl, db)
    if cl.preload:
        worker_pid(su, db)
    # warm-up: connections, JWKS caches, kept plans, key caches
    for i in range(10):
        authorize(app, next_state("lw"))
    tokens = [full_flow(app, "lw")[0] for _ in range(3)]
    for t in tokens:
        q(app, REFRESH_SQL, (t,))
    seen = {}
    out = {}

    def phase(fn, split_span, endpoint):
        sandbox.reset()
        spans = [fn(i) for i in range(n)]
        recs = sandbox.requests(0)
        add_stats(seen, sandbox_phase_stats_of(recs))
        for name in spans[0]:
            out[name] = [(e - s) * 1000 for s, e in (sp[name] for sp in spans)]
        arrivals = [r["t"] for r in recs if r["endpoint"] == endpoint]
        if len(arrivals) == len(spans):
            out[split_span + "_before"] = [(a - sp[split_span][0]) * 1000 for sp, a in zip(spans, arrivals)]
            out[split_span + "_after"] = [(sp[split_span][1] - a) * 1000 for sp, a in zip(spans, arrivals)]

    def one_authorize(i):
        t0 = time.time()
        authorize(app, next_state("la"))
        return {"authorize": (t0, time.time())}

    def one_flow(i):
        t0 = time.time()
        url = authorize(app, next_state("lf"))
        t1 = time.time()
        loc = browser.follow(url)
        t2 = time.time()
        tokens.append(q1(app, CALLBACK_SQL, (loc,)))
        t3 = time.time()
        return {"flow": (t0, t3), "flow_authorize": (t0, t1), "flow_page": (t1, t2), "flow_callback": (t2, t3)}

    def one_refresh(i):
        t0 = time.time()
        q(app, REFRESH_SQL, (tokens[i % len(tokens)],))
        return {"refresh": (t0, time.time())}

    phase(one_authorize, "authorize", "oauth/authorize")
    tokens = []
    phase(one_flow, "flow_callback", "oauth/token")
    phase(one_refresh, "refresh", "oauth/token")
    sandbox.reset()
    app.close()
    su.close()
    drop_db(cl, db)
    res = {k: {"calls": len(v), "median_ms": round(median(v), 3), "p90_ms": round(p90(v), 3)}
           for k, v in out.items()}
    res["sandbox"] = seen
    return res


def node_sdk_usable():
    sdk = os.environ.get("DM_NODE_SDK")
    if not sdk:
        return None, "DM_NODE_SDK is not set (a built SDK checkout outside the repo; see bench/README.md)"
    if shutil.which("node") is None:
        return None, "node is not installed"
    if not (os.path.isfile(os.path.join(sdk, "package.json")) and
            os.path.isfile(os.path.join(sdk, "dist", "main", "index.js"))):
        return None, "%s is not a built SDK checkout (run `npm ci && npm run build` there)" % sdk
    return sdk, None


def run_node_sdk(calls, compare_json):
    """bench/node-sdk.js against the same sandbox; prints its output, returns its JSON line."""
    sdk, why = node_sdk_usable()
    if sdk is None:
        log("skipping the Node.js SDK comparison: " + why)
        return None
    env = {k: v for k, v in os.environ.items()
           if k not in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}
    env["NODE_EXTRA_CA_CERTS"] = os.environ["DM_CA_FILE"]
    url = os.environ["DM_SANDBOX_URL"]
    cmd = ["node", os.path.join(ROOT, "bench", "node-sdk.js"), "--sdk", sdk,
           "--base-url", url + "/v1.7/", "--onboard-url", url + "/apps/saas/",
           "--ca-file", os.environ["DM_CA_FILE"], "--app-id", APP, "--contract-id", CONTRACT,
           "--key-file", KEY_FILE, "--calls", str(calls)]
    if compare_json:
        cmd += ["--compare", compare_json]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = r.stdout.rstrip().splitlines()
    print("\n".join(lines[:-1]) + "\n", flush=True)
    if r.returncode != 0 or not lines:
        log("node-sdk.js failed (exit %d)" % r.returncode)
        return None
    return json.loads(lines[-1])


def section_latency(opts, pre, np_):
    n = opts.calls
    res = {"calls": n}
    log("latency: preload cluster, %d calls each" % n)
    res["preload"] = latency_on(pre, n)
    if np_ is not None:
        log("latency: cluster without the preload, %d calls each" % n)
        res["no-preload"] = latency_on(np_, n)
    # node-sdk.js --compare reads bench.py's format: digime's preload figures
    cmp_file = os.path.join(WORK, "latency-for-node.json")
    json.dump({"calls": n, "results": [
        dict(scenario="warm", **res["preload"]["authorize"]),
        dict(scenario="refresh", **res["preload"]["refresh"])]}, open(cmp_file, "w"))
    sdk = run_node_sdk(opts.sdk_calls or n, cmp_file)
    if sdk is not None:
        res["sdk"] = {"version": sdk.get("sdk_version"), "node": sdk.get("node"),
                      "authorize": sdk["authorize"], "refresh": sdk["refresh"], "flow_once": sdk["flow"]}
    results["latency"] = res

    cols = [("preload", "digime, preload (db worker)")]
    if "no-preload" in res:
        cols.append(("no-preload", "digime, no preload (one-shot)"))
    if "sdk" in res:
        cols.append(("sdk", "Node.js SDK %s" % res["sdk"]["version"]))
    head = "%-38s" % "call" + "".join("%-32s" % c[1] for c in cols)
    sub = "%-38s" % "" + "".join("%-32s" % "median ms   p90 ms   calls" for _ in cols)
    lines = ["Latency (wall time per call from a Python client on this machine, sandbox without added "
             "latency; role %s)" % APP_ROLE, head, sub]

    def row(label, key):
        s = label.ljust(38)
        for c, _ in cols:
            v = res[c].get(key)
            s += ("%9.2f %8.2f %7d       " % (v["median_ms"], v["p90_ms"], v["calls"])) if v else "%-32s" % "   -"
        lines.append(s)
    row("authorize", "authorize")
    row("  until the request reached digi.me", "authorize_before")
    row("  from its arrival to the result", "authorize_after")
    row("full flow (authorize+page+callback)", "flow")
    row("  its authorize", "flow_authorize")
    row("  its onboarding page (client)", "flow_page")
    row("  its callback (code exchange)", "flow_callback")
    row("    until the request reached digi.me", "flow_callback_before")
    row("    from its arrival to the result", "flow_callback_after")
    row("refresh", "refresh")
    row("  until the request reached digi.me", "refresh_before")
    row("  from its arrival to the result", "refresh_after")
    lines.append("(until/from: each call split at the arrival of its API request at the sandbox, which records "
                 "it; \"from\" includes the sandbox's own work)")
    lines.append("")
    for c, name in cols:
        if c == "sdk":
            continue
        r = res[c]
        ratio = r["refresh"]["median_ms"] / r["authorize"]["median_ms"]
        lines.append("%s: refresh %.2f ms vs authorize %.2f ms = %.2fx; full flow %.2f ms" % (
            name, r["refresh"]["median_ms"], r["authorize"]["median_ms"], ratio, r["flow"]["median_ms"]))
        target("latency", "%s: refresh median <= authorize median" % name, ratio <= 1.0,
               "%.2f vs %.2f ms (%.2fx)" % (r["refresh"]["median_ms"], r["authorize"]["median_ms"], ratio))
        if "sdk" in res:
            s = res["sdk"]["refresh"]["median_ms"]
            lines.append("%s: refresh %.2f ms vs SDK refreshToken %.2f ms = %.2fx; authorize vs SDK "
                         "getAuthorizeUrl %.2fx" % (name, r["refresh"]["median_ms"], s, r["refresh"]["median_ms"] / s,
                                                    r["authorize"]["median_ms"] / res["sdk"]["authorize"]["median_ms"]))
            target("latency", "%s: refresh median <= SDK refreshToken median" % name,
                   r["refresh"]["median_ms"] <= s, "%.2f vs %.2f ms (%.2fx)" % (r["refresh"]["median_ms"], s,
                                                                             r["refresh"]["median_ms"] / s))
    if "sdk" in res:
        f = res["sdk"]["flow_once"]
        lines.append("Node.js SDK full flow, once: %.2f ms (getAuthorizeUrl %.2f + page %.2f + exchangeCodeForToken "
                     "%.2f); the SDK fetches the JWKS for every answer (two HTTP requests per call) and stores "
                     "nothing" % (f["total_ms"], f["authorize_ms"], f["onboarding_ms"], f["exchange_ms"]))
    else:
        lines.append("Node.js SDK: not run (%s)" % node_sdk_usable()[1])
    for c, name in cols:
        if c != "sdk":
            s = res[c]["sandbox"]
            lines.append("sandbox saw (%s): %d API requests over %d TCP connection(s), %d JWKS fetches, %d failed" % (
                name, s["requests"], s["connections"], s["jwks"], s["failed"]))
    emit("latency", "\n".join(lines))


# --------------------------------------------------------------------------
# cpu: backend and worker CPU per call; the OpenSSL floor
# --------------------------------------------------------------------------
def run_floor(opts, ops="sign,verify,parse", seconds=None, repeats=None):
    """bench/floor.c (compiled by run.sh): returns (its JSON figures, its table)."""
    exe = os.environ.get("BENCH_FLOOR")
    if not exe or not os.path.exists(exe):
        raise RuntimeError("BENCH_FLOOR (the compiled bench/floor.c) is missing")
    r = subprocess.run([exe, "--key", KEY_FILE, "--ops", ops,
                        "--seconds", str(seconds or opts.floor_seconds),
                        "--repeats", str(repeats or opts.floor_repeats)],
                       stdout=subprocess.PIPE, text=True, check=True)
    lines = r.stdout.rstrip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def floor_burst(opts):
    """A short floor measurement (sign + verify, 3 x 0.2 s each) between two phases."""
    f, _ = run_floor(opts, "sign,verify", 0.2, 3)
    return {"sign_us": f["sign_us"], "verify_us": f["verify_us"]}


class CpuProbe:
    """CPU of the processes digime runs in over a phase: the backend, the database's worker
    (preload), or the one-shot workers (the postmaster's cutime + cstime, no preload)."""

    def __init__(self, backend, worker=None, postmaster=None, mon=None):
        self.backend, self.worker, self.postmaster, self.mon = backend, worker, postmaster, mon

    def read(self):
        r = {"backend": cpu_us(self.backend), "backend_sched": sched_us(self.backend)}
        if self.worker:
            r["worker"] = cpu_us(self.worker)
            r["worker_sched"] = sched_us(self.worker)
        if self.postmaster:
            r["worker"] = children_cpu_us(self.postmaster)
            r["worker_sched"] = None
        r["t"] = time.monotonic()
        return r

    def measure(self, n, fn):
        sandbox.reset()
        a = self.read()
        lat = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            lat.append((time.perf_counter() - t) * 1000)
        if self.postmaster:
            wait_no_oneshot(self.mon)
            time.sleep(0.05)
        b = self.read()
        out = {"calls": n, "backend_us": (b["backend"] - a["backend"]) / n,
               "wall_median_ms": median(lat), "seconds": b["t"] - a["t"]}
        out["worker_us"] = (b["worker"] - a["worker"]) / n if "worker" in a else 0.0
        out["sum_us"] = out["backend_us"] + out["worker_us"]
        if a["backend_sched"] is not None:
            out["backend_sched_us"] = (b["backend_sched"] - a["backend_sched"]) / n
        if a.get("worker_sched") is not None:
            out["worker_sched_us"] = (b["worker_sched"] - a["worker_sched"]) / n
        out["sandbox"] = sandbox_phase_stats()
        return out


PHASES = (("authorize", "digime_authorize_url"), ("callback", "digime_handle_callback"),
          ("refresh", "digime_refresh_token"))


def cpu_phases(app, probe, n, prefix, between=None):
    """n authorize calls, the n onboarding pages (not measured), n callbacks, n refreshes.
    between(), when given, runs before the callbacks, before the refreshes and after them
    (the floor bursts; the caller measures one before the authorize calls)."""
    urls, tokens = [], []
    res = {"floors": []}

    def gap():
        if between:
            res["floors"].append(between())
    res["authorize"] = probe.measure(n, lambda i: urls.append(authorize(app, next_state(prefix))))
    a = probe.read()
    locs = [browser.follow(u) for u in urls]
    b = probe.read()
    if probe.worker:
        k = "worker_sched" if a.get("worker_sched") is not None else "worker"
        res["worker_idle_us_per_s"] = (b[k] - a[k]) / (b["t"] - a["t"])
    sandbox.reset()
    gap()
    res["callback"] = probe.measure(n, lambda i: tokens.append(q1(app, CALLBACK_SQL, (locs[i],))))
    gap()
    res["refresh"] = probe.measure(n, lambda i: q1(app, REFRESH_SQL, (tokens[i],)))
    gap()
    add_flow(res)
    return res


def add_flow(res):
    res["flow"] = {k: res["authorize"][k] + res["callback"][k] for k in ("backend_us", "worker_us", "sum_us")}


def phase_floors(res, floor):
    """Floor (sign + verify, us) of each phase: with floor bursts, the mean over the rounds of the
    bursts just before and just after the phase; else the given floor."""
    by = res.get("floor_by_phase")
    out = {}
    for key, _ in PHASES:
        out[key] = by[key] if by else floor["sign_us"] + floor["verify_us"]
    out["flow"] = out["authorize"] + out["callback"]
    return out


def warm_up(app, prefix, n=20):
    for _ in range(n):
        authorize(app, next_state(prefix))
    toks = [full_flow(app, prefix)[0] for _ in range(max(n // 4, 3))]
    for t in toks * 2:
        q(app, REFRESH_SQL, (t,))


def cpu_table(title, res, floor, note=None):
    fl = phase_floors(res, floor)
    lines = [title,
             "%-30s %6s %12s %12s %12s %10s %9s %9s" % ("call", "calls", "backend us", "worker us", "sum us",
                                                      "floor us", "x floor", "wall ms")]
    for key, label in PHASES:
        r = res[key]
        lines.append("%-30s %6d %12.0f %12.0f %12.0f %10.0f %9.2f %9.2f" % (
            label, r["calls"], r["backend_us"], r["worker_us"], r["sum_us"], fl[key], r["sum_us"] / fl[key],
            r["wall_median_ms"]))
    f = res["flow"]
    lines.append("%-30s %6s %12.0f %12.0f %12.0f %10.0f %9.2f" % (
        "flow (authorize + callback)", "", f["backend_us"], f["worker_us"], f["sum_us"], fl["flow"],
        f["sum_us"] / fl["flow"]))
    bursts = res.get("floors") or []
    if bursts:
        lines.append("floor = OpenSSL in this run (bench/floor.c): 1 PS512 sign + 1 verify per request, a flow 2 + 2; "
                     "measured before and between the phases (sign %.0f..%.0f us, verify %.0f..%.0f us over %d "
                     "bursts); a phase's floor is the mean of the bursts around it" % (
                         min(b["sign_us"] for b in bursts), max(b["sign_us"] for b in bursts),
                         min(b["verify_us"] for b in bursts), max(b["verify_us"] for b in bursts), len(bursts)))
    else:
        lines.append("floor = OpenSSL in this run (bench/floor.c): PS512 sign %.0f us + verify %.0f us per request, "
                     "a flow 2 + 2" % (floor["sign_us"], floor["verify_us"]))
    if note:
        lines.append(note)
    return "\n".join(lines)


def sandbox_note(res):
    parts = []
    for key, _ in PHASES:
        s = res[key]["sandbox"]
        parts.append("%s %d req/%d conn/%d jwks%s" % (key, s["requests"], s["connections"], s["jwks"],
                                                      "/%d FAILED" % s["failed"] if s["failed"] else ""))
    return "sandbox saw: " + ", ".join(parts)


def sched_note(res):
    parts = []
    for key, _ in PHASES:
        r = res[key]
        b = r.get("backend_sched_us")
        w = r.get("worker_sched_us")
        if b is None:
            return None
        parts.append("%s %.0f+%.0f" % (key, b, w or 0))
    return "cross-check, /proc/PID/schedstat (ns clock) backend+worker us: " + ", ".join(parts)


def accumulate(total, res):
    """Adds one cpu_phases result to running totals (per phase: calls, CPU, latency medians,
    sandbox counts)."""
    for key, _ in PHASES:
        t = total.setdefault(key, {"calls": 0, "backend": 0.0, "worker": 0.0, "bsched": 0.0, "wsched": 0.0,
                                   "lat": [], "sandbox": {}})
        r = res[key]
        t["calls"] += r["calls"]
        t["backend"] += r["backend_us"] * r["calls"]
        t["worker"] += r["worker_us"] * r["calls"]
        t["bsched"] += (r.get("backend_sched_us") or 0) * r["calls"]
        t["wsched"] += (r.get("worker_sched_us") or 0) * r["calls"]
        t["lat"].append(r["wall_median_ms"])
        add_stats(t["sandbox"], r["sandbox"])
    if "worker_idle_us_per_s" in res:
        total.setdefault("idle", []).append(res["worker_idle_us_per_s"])


def per_call(total):
    out = {}
    for key, _ in PHASES:
        t = total[key]
        n = t["calls"]
        out[key] = {"calls": n, "backend_us": t["backend"] / n, "worker_us": t["worker"] / n,
                    "sum_us": (t["backend"] + t["worker"]) / n, "wall_median_ms": median(t["lat"]),
                    "backend_sched_us": t["bsched"] / n, "worker_sched_us": t["wsched"] / n,
                    "sched_us": (t["bsched"] + t["wsched"]) / n, "sandbox": t["sandbox"]}
    if total.get("idle"):
        out["worker_idle_us_per_s"] = sum(total["idle"]) / len(total["idle"])
    add_flow(out)
    return out


def cpu_rounds(app, probe, n, rounds, prefix, opts=None):
    """cpu_phases in rounds of n / rounds calls; with opts, floor bursts before and between the
    phases; returns the per-call figures over all rounds and each phase's mean floor."""
    per = max(n // max(rounds, 1), 1)
    total = {}
    bursts = [floor_burst(opts)] if opts else []
    by_phase = {key: [] for key, _ in PHASES}
    for r in range(rounds):
        res = cpu_phases(app, probe, per, "%s%d" % (prefix, r), between=(lambda: floor_burst(opts)) if opts else None)
        accumulate(total, res)
        if opts:
            seq = [bursts[-1]] + res["floors"]      # before authorize, callback, refresh, after
            for i, (key, _) in enumerate(PHASES):
                by_phase[key].append((seq[i]["sign_us"] + seq[i]["verify_us"] +
                                      seq[i + 1]["sign_us"] + seq[i + 1]["verify_us"]) / 2)
            bursts += res["floors"]
    out = per_call(total)
    if opts:
        out["floors"] = bursts
        out["floor_by_phase"] = {k: sum(v) / len(v) for k, v in by_phase.items()}
    return out


def section_cpu(opts, pre, np_):
    n = opts.cpu_calls
    log("cpu: OpenSSL floor")
    floor, floor_text = run_floor(opts)
    emit("cpu", floor_text)
    db = "bench_cpu"
    su, app = setup_db(pre, db)
    wpid = worker_pid(su, db)
    bpid = q1(app, "SELECT pg_backend_pid()")
    log("cpu: preload cluster, backend %d, worker %d, %d calls each" % (bpid, wpid, n))
    warm_up(app, "cw")
    probe = CpuProbe(bpid, worker=wpid)
    time.sleep(1.5)     # statistics are flushed at most once a second
    scans0 = scan_stats(su)
    res = cpu_rounds(app, probe, n, opts.cpu_rounds, "ca", opts)
    time.sleep(1.5)
    scans = scan_delta(scans0, scan_stats(su))
    app.close()
    su.close()
    drop_db(pre, db)
    idle = res.get("worker_idle_us_per_s", 0.0)
    note = "\n".join(x for x in (
        "backend = pg_backend_pid() of the calling session (role %s); worker = the 'digime worker' of database %s "
        "(pg_stat_activity); utime+stime of /proc/PID/stat over %d calls each, in %d rounds" % (
            APP_ROLE, db, res["authorize"]["calls"], opts.cpu_rounds),
        "the worker used %.0f us CPU per second while idle (while the client followed the onboarding pages; "
        "schedstat): its periodic work, also in its column" % idle,
        sandbox_note(res), sched_note(res),
        "scans (pg_stat_user_tables: sequential scans / rows they read / index scans): " + "; ".join(
            "%s %d/%d/%d" % (t, v[0], v[1], v[2]) for t, v in sorted(scans.items()))) if x)
    emit("cpu", cpu_table("CPU per call, preload cluster (per-database worker), empty tables", res, floor, note))
    fl = phase_floors(res, floor)["flow"]
    target("cpu", "authorize + callback CPU (backend + worker) <= 2.5x the floor (2 sign + 2 verify)",
           res["flow"]["sum_us"] / fl <= 2.5,
           "%.0f us vs %.0f us = %.2fx" % (res["flow"]["sum_us"], fl, res["flow"]["sum_us"] / fl))
    results["cpu"] = {"floor": floor, "preload": res, "scans": scans}

    if np_ is not None and opts.oneshot_calls > 0:
        m = opts.oneshot_calls
        db2 = "bench_cpu_oneshot"
        su2, app2 = setup_db(np_, db2)
        bpid2 = q1(app2, "SELECT pg_backend_pid()")
        pm = parent_pid(bpid2)
        log("cpu: cluster without the preload, backend %d, postmaster %d, %d calls each" % (bpid2, pm, m))
        warm_up(app2, "ow", 10)
        probe2 = CpuProbe(bpid2, postmaster=pm, mon=su2)
        res2 = cpu_rounds(app2, probe2, m, 1, "oa")
        results["cpu"]["no-preload"] = res2
        fb = res.get("floors") or [floor]
        mid = {"sign_us": median([b["sign_us"] for b in fb]), "verify_us": median([b["verify_us"] for b in fb])}
        note2 = ("worker = CPU of the one-shot workers: the postmaster's cutime + cstime (children that exited "
                 "and were waited for), %d calls each; autovacuum is off on this cluster, so no other child "
                 "exits; floor = median of the bursts above\n%s" % (m, sandbox_note(res2)))
        emit("cpu", cpu_table("CPU per call, cluster without the preload (a one-shot worker per token request)",
                              res2, mid, note2))
        app2.close()
        su2.close()
        drop_db(np_, db2)


# --------------------------------------------------------------------------
# rows: the cpu figures again with 100,000 rows in each table
# --------------------------------------------------------------------------
FILL_TOKENS = """
INSERT INTO digime.user_tokens (contract_id, owner_role, end_user, user_id, consent_id,
    access_token, access_token_expires_at, refresh_token, refresh_token_expires_at, state,
    account_reference, created_at, updated_at, refreshed_at, status, last_error_sqlstate,
    last_error_at, refresh_failures)
SELECT %(contract)s, (%(roles)s::regrole[])[1 + i %% 4], 'end-user-' || i, 'user-' || md5(i::text),
       'consent-' || i,
       CASE WHEN i %% 20 = 0 THEN NULL ELSE 'at-' || md5('a' || i) || md5('b' || i) END,
       now() + (1 + i %% 29) * interval '1 day',
       CASE WHEN i %% 20 = 0 THEN NULL ELSE 'rt-' || md5('c' || i) || md5('d' || i) END,
       now() + interval '90 days', 'synthetic-' || i, 'acc-' || i,
       now() - (i %% 1000) * interval '1 hour', now() - (i %% 100) * interval '1 minute',
       CASE WHEN i %% 3 = 0 THEN now() - interval '1 day' END,
       CASE WHEN i %% 20 = 0 THEN 'revoked' WHEN i %% 20 = 1 THEN 'needs_reauthorization' ELSE 'active' END,
       CASE WHEN i %% 20 = 1 THEN 'YD001' END, CASE WHEN i %% 20 = 1 THEN now() END, 0
  FROM generate_series(1, %(n)s) i
RETURNING id
"""

FILL_AUTHORIZATIONS = """
INSERT INTO digime.authorizations (kind, contract_id, owner_role, end_user, state, code_verifier,
    session, callback, token_id, status, created_at, expires_at, completed_at, finished_at, code_hash)
SELECT CASE WHEN i %% 10 = 0 THEN 'reauthorize' ELSE 'authorize' END, %(contract)s,
       (%(roles)s::regrole[])[1 + i %% 4], 'end-user-' || i, 'synthetic-auth-' || i,
       CASE WHEN i %% 5 < 2 THEN md5('v' || i) || substr(md5('w' || i), 1, 11) END,
       jsonb_build_object('key', md5('s' || i), 'expiry', 1700000000000 + i),
       'https://bench.example/cb',
       CASE WHEN i %% 5 IN (2, 3) OR i %% 10 = 0 THEN (%(tokens)s::bigint[])[1 + i %% %(ntok)s] END,
       CASE WHEN i %% 5 < 2 THEN 'pending' WHEN i %% 5 < 4 THEN 'completed' ELSE 'expired' END,
       now() - (i %% 50) * interval '1 minute',
       now() + interval '1 day' - (i %% 50) * interval '1 minute',
       CASE WHEN i %% 5 IN (2, 3) THEN now() - (i %% 50) * interval '1 second' END,
       CASE WHEN i %% 5 >= 2 THEN now() - (i %% 50) * interval '1 second' END,
       CASE WHEN i %% 5 IN (2, 3) THEN md5('h' || i) || md5('i' || i) END
  FROM generate_series(1, %(n)s) i
"""


def scan_stats(su):
    """{table: (seq_scan, seq_tup_read, idx_scan)} of digime's tables that the flow functions read."""
    return {r[0]: (r[1], r[2], r[3] or 0) for r in q(
        su, "SELECT relname, seq_scan, seq_tup_read, idx_scan FROM pg_stat_user_tables "
            "WHERE schemaname = 'digime' AND relname IN ('authorizations', 'user_tokens', 'contracts', "
            "'contract_grants')")}


def scan_delta(a, b):
    return {t: tuple(b[t][i] - a.get(t, (0, 0, 0))[i] for i in range(3)) for t in b}


def fill_tables(su, n):
    """n synthetic rows in digime.user_tokens and in digime.authorizations, of four roles:
    tokens 90 % active, 5 % needs_reauthorization, 5 % revoked, none expiring soon; authorizations
    40 % pending (not yet expired), 40 % completed, 20 % expired, finished recently (so that
    retention leaves them alone); then VACUUM ANALYZE so that the planner sees them."""
    roles = "{%s}" % ",".join((APP_ROLE,) + OTHER_ROLES)
    t = time.time()
    ids = [r[0] for r in q(su, FILL_TOKENS, {"contract": CONTRACT, "roles": roles, "n": n})]
    q(su, FILL_AUTHORIZATIONS, {"contract": CONTRACT, "roles": roles, "n": n,
                                "tokens": "{%s}" % ",".join(str(i) for i in ids[:50000]),
                                "ntok": min(len(ids), 50000)})
    q(su, "VACUUM ANALYZE digime.user_tokens")
    q(su, "VACUUM ANALYZE digime.authorizations")
    counts = q(su, "SELECT (SELECT count(*) FROM digime.user_tokens), "
                   "(SELECT count(*) FROM digime.authorizations), "
                   "(SELECT reltuples::bigint FROM pg_class WHERE oid = 'digime.user_tokens'::regclass), "
                   "(SELECT reltuples::bigint FROM pg_class WHERE oid = 'digime.authorizations'::regclass)")[0]
    mix = q(su, "SELECT status, count(*) FROM digime.authorizations GROUP BY 1 ORDER BY 1")
    return {"seconds": round(time.time() - t, 1), "user_tokens": counts[0], "authorizations": counts[1],
            "reltuples_tokens": counts[2], "reltuples_authorizations": counts[3],
            "authorization_status": dict(mix)}


def section_rows(opts, pre, np_):
    """Two databases, one left empty, one filled with opts.rows rows per table; both sessions and
    both workers warmed up (and their plans made) before the fill; then rounds alternate between
    them, so that other load on the machine falls on both alike."""
    n = opts.cpu_calls
    rounds = max(opts.rows_rounds, 1)
    per = max(n // rounds, 1)
    side = {}
    for name in ("empty", "filled"):
        db = "bench_rows_" + name
        su, app = setup_db(pre, db)
        wpid = worker_pid(su, db)
        bpid = q1(app, "SELECT pg_backend_pid()")
        warm_up(app, "rw" + name[0])
        side[name] = {"db": db, "su": su, "app": app, "probe": CpuProbe(bpid, worker=wpid), "total": {}}
    log("rows: filling %d rows per table" % opts.rows)
    fill = fill_tables(side["filled"]["su"], opts.rows)
    log("rows: filled in %.1f s: %s" % (fill["seconds"], fill))
    for name in ("empty", "filled"):
        warm_up(side[name]["app"], "rx" + name[0], 10)
    log("rows: %d rounds of %d calls per function, alternating between the databases" % (rounds, per))
    time.sleep(1.5)     # statistics are flushed at most once a second
    scans0 = {name: scan_stats(side[name]["su"]) for name in side}
    for r in range(rounds):
        order = ("empty", "filled") if r % 2 == 0 else ("filled", "empty")
        for name in order:
            s = side[name]
            accumulate(s["total"], cpu_phases(s["app"], s["probe"], per, "r%s%d" % (name[0], r)))
    time.sleep(1.5)
    scans = {name: scan_delta(scans0[name], scan_stats(side[name]["su"])) for name in side}
    # both workers idle, over more than one digime.worker_naptime (their periodic work: inbox, retention)
    def wcpu(name):
        pid = side[name]["probe"].worker
        v = sched_us(pid)
        return v if v is not None else cpu_us(pid)
    idle0 = {name: (wcpu(name), time.monotonic()) for name in side}
    time.sleep(opts.rows_idle)
    idle = {name: (wcpu(name) - idle0[name][0]) / (time.monotonic() - idle0[name][1]) for name in side}
    empty, filled = per_call(side["empty"]["total"]), per_call(side["filled"]["total"])
    sizes = q(side["filled"]["su"], "SELECT pg_size_pretty(pg_total_relation_size('digime.user_tokens')), "
                                    "pg_size_pretty(pg_total_relation_size('digime.authorizations'))")[0]
    for s in side.values():
        s["app"].close()
        s["su"].close()
        drop_db(pre, s["db"])
    results["rows"] = {"fill": fill, "empty": empty, "filled": filled, "rounds": rounds, "scans": scans,
                       "worker_idle_us_per_s": idle}
    lines = ["CPU per call (backend + worker, /proc/PID/stat) with %d rows in digime.user_tokens (%s) and %d in "
             "digime.authorizations (%s), after VACUUM ANALYZE, against a database whose tables hold only the "
             "bench's own rows; %d rounds alternating between the two" % (
                 fill["user_tokens"], sizes[0], fill["authorizations"], sizes[1], rounds),
             "%-30s %6s %11s %11s %8s %10s %10s %11s" % ("call", "calls", "empty us", "filled us", "ratio",
                                                       "backend x", "worker x", "(schedstat)")]
    for key, label in PHASES + (("flow", "flow (authorize + callback)"),):
        e, f = empty[key], filled[key]
        ratio = f["sum_us"] / e["sum_us"]
        wr = ("%10.3f" % (f["worker_us"] / e["worker_us"])) if e["worker_us"] > 0.1 * e["sum_us"] else "%10s" % "-"
        if key == "flow":
            es = empty["authorize"]["sched_us"] + empty["callback"]["sched_us"]
            fs = filled["authorize"]["sched_us"] + filled["callback"]["sched_us"]
        else:
            es, fs = e["sched_us"], f["sched_us"]
        lines.append("%-30s %6s %11.0f %11.0f %8.3f %10.3f %s %11.3f" % (
            label, e.get("calls", ""), e["sum_us"], f["sum_us"], ratio, f["backend_us"] / e["backend_us"], wr,
            fs / es if es else float("nan")))
        target("rows", "%s CPU with the filled tables at most 10 %% above the empty ones" % label,
               ratio <= 1.10, "%.0f vs %.0f us (%.3fx%s)" % (f["sum_us"], e["sum_us"], ratio,
                                                            ", cheaper" if ratio < 0.90 else ""))
    lines.append("(schedstat) = the same ratio from /proc/PID/schedstat, the kernel's ns counter behind utime+stime")
    lines.append("idle workers afterwards (%d s, their periodic inbox and retention work; schedstat): empty %.0f us, "
                 "filled %.0f us CPU per second" % (opts.rows_idle, idle["empty"], idle["filled"]))
    lines.append("scans during the rounds (pg_stat_user_tables: sequential scans / rows they read / index scans):")
    for name in ("empty", "filled"):
        lines.append("  %-7s %s" % (name, "; ".join("%s %d/%d/%d" % (t, v[0], v[1], v[2])
                                                   for t, v in sorted(scans[name].items()))))
    lines.append("the filled database's sessions made their plans before the fill (as tables grow under a running "
                 "worker); fill %.1f s; authorizations by status: %s; tokens: 90 %% active, 5 %% "
                 "needs_reauthorization, 5 %% revoked; four roles" % (
                     fill["seconds"], ", ".join("%s %d" % kv for kv in fill["authorization_status"].items())))
    emit("rows", "\n".join(lines))


# --------------------------------------------------------------------------
# rss: memory of the backend over N authorizes, of the worker over N refreshes
# --------------------------------------------------------------------------
def rss_run(n, pid, fn, samples=10, label=""):
    warm = rss_kb(pid)
    points = [(0, warm)]
    step = max(n // samples, 1)
    t = time.time()
    for i in range(n):
        fn(i)
        if (i + 1) % step == 0 or i + 1 == n:
            points.append((i + 1, rss_kb(pid)))
            if (i + 1) % (step * 2) == 0:
                sandbox.reset()          # the sandbox keeps a log of every request
                log("rss: %s %d/%d, RssAnon %d kB" % (label, i + 1, n, points[-1][1]))
    return {"calls": n, "warm_kb": warm, "final_kb": points[-1][1], "growth_mb": (points[-1][1] - warm) / 1024.0,
            "max_kb": max(p[1] for p in points), "points": points, "seconds": round(time.time() - t, 1)}


def section_rss(opts, pre, np_):
    n = opts.rss_calls
    db = "bench_rss"
    su, app = setup_db(pre, db)
    wpid = worker_pid(su, db)
    bpid = q1(app, "SELECT pg_backend_pid()")
    log("rss: backend %d, worker %d, %d calls" % (bpid, wpid, n))
    toks = mint_and_import(su, app, opts.rss_tokens)
    # warm-up
    for _ in range(opts.rss_warmup):
        authorize(app, next_state("mw"))
    for i in range(opts.rss_warmup):
        q(app, REFRESH_SQL, (toks[i % len(toks)],))
    sandbox.reset()
    res = {}
    res["backend_authorize"] = rss_run(n, bpid, lambda i: authorize(app, next_state("ma")), label="authorize")
    w0 = rss_kb(wpid)
    b0 = rss_kb(bpid)
    res["worker_refresh"] = rss_run(n, wpid, lambda i: q(app, REFRESH_SQL, (toks[i % len(toks)],)),
                                    label="refresh")
    res["backend_refresh"] = {"warm_kb": b0, "final_kb": rss_kb(bpid)}
    res["backend_refresh"]["growth_mb"] = (res["backend_refresh"]["final_kb"] - b0) / 1024.0
    res["worker_idle_during_authorize_kb"] = w0
    res["vmrss"] = {"backend_kb": rss_kb(bpid, "VmRSS"), "worker_kb": rss_kb(wpid, "VmRSS")}
    results["rss"] = res
    sandbox.reset()
    app.close()
    su.close()
    drop_db(pre, db)
    lines = ["Memory (RssAnon of /proc/PID/status: private anonymous memory; MB = 1024 kB), preload cluster, "
             "after %d warm-up calls" % opts.rss_warmup,
             "%-38s %8s %12s %12s %10s %10s" % ("process over calls", "calls", "warm MB", "after MB", "growth MB",
                                                "max MB")]
    for key, label in (("backend_authorize", "backend over digime_authorize_url"),
                       ("worker_refresh", "worker over digime_refresh_token")):
        r = res[key]
        lines.append("%-38s %8d %12.2f %12.2f %+10.2f %10.2f" % (label, r["calls"], r["warm_kb"] / 1024.0,
                                                                 r["final_kb"] / 1024.0, r["growth_mb"],
                                                                 r["max_kb"] / 1024.0))
        target("rss", "%s: RssAnon growth <= 1 MB over %d calls" % (label, r["calls"]), r["growth_mb"] <= 1.0,
               "%+.2f MB" % r["growth_mb"])
    r = res["backend_refresh"]
    lines.append("%-38s %8d %12.2f %12.2f %+10.2f" % ("backend over digime_refresh_token", n, r["warm_kb"] / 1024.0,
                                                      r["final_kb"] / 1024.0, r["growth_mb"]))
    for key in ("backend_authorize", "worker_refresh"):
        lines.append("%s RssAnon kB at calls: %s" % (key, " ".join("%d:%d" % p for p in res[key]["points"])))
    lines.append("refreshes cycle over %d imported tokens; VmRSS now: backend %.1f MB, worker %.1f MB (includes "
                 "shared memory touched)" % (opts.rss_tokens, res["vmrss"]["backend_kb"] / 1024.0,
                                             res["vmrss"]["worker_kb"] / 1024.0))
    emit("rss", "\n".join(lines))


# --------------------------------------------------------------------------
# batch: digime_refresh_expiring against the sandbox's ceiling and a sequential loop
# --------------------------------------------------------------------------
def run_ceiling(opts, levels):
    """bench/ceiling.py against the same sandbox, all levels; returns its per-level figures."""
    url = os.environ["DM_SANDBOX_URL"]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "ceiling.py"), "--url", url, "--ca",
           os.environ["DM_CA_FILE"], "--key", KEY_FILE, "--app", "ceiling-app", "--contract", "ceiling-contract",
           "--tokens", str(opts.tokens), "--concurrency", ",".join(str(c) for c in levels),
           "--sandbox-pid", os.environ["DM_SANDBOX_PID"]]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = r.stdout.rstrip().splitlines()
    for line in lines[:-1]:
        print("   ceiling " + line, flush=True)
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError("ceiling.py failed (exit %d)" % r.returncode)
    sandbox.reset()
    return json.loads(lines[-1])["levels"]


def section_batch(opts, pre, np_):
    levels = [int(x) for x in opts.concurrency.split(",")]
    n = opts.tokens
    spid = int(os.environ["DM_SANDBOX_PID"])
    if opts.latency_ms:
        sandbox.config(latency_ms={"oauth/token": opts.latency_ms})
    try:
        log("batch: the sandbox's ceiling (bench/ceiling.py, %d refreshes per level)" % n)
        ceiling = run_ceiling(opts, levels)
        db = "bench_batch"
        su, app = setup_db(pre, db)
        wpid = worker_pid(su, db)
        bpid = q1(app, "SELECT pg_backend_pid()")
        log("batch: minting and importing %d tokens" % n)
        ids = mint_and_import(su, app, n)
        # warm-up: the worker's connection, JWKS and key caches
        expire_soon(su, ids[:20])
        q(su, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '1 day' "
              "WHERE NOT (id = ANY(%s))", (ids[:20],))
        q(app, "CALL digime.digime_refresh_expiring(within => '15 minutes', concurrency => 4)")
        sandbox.reset()
        levels_out = []
        for c in levels:
            expire_soon(su, ids)
            w0, b0, s0, m0, x0 = cpu_us(wpid), cpu_us(bpid), cpu_us(spid), machine_ticks(), ctx_switches(wpid)
            t = time.monotonic()
            row = q(app, "CALL digime.digime_refresh_expiring(within => '15 minutes', concurrency => %s)", (c,))[0]
            dt = time.monotonic() - t
            w1, b1, s1, m1, x1 = cpu_us(wpid), cpu_us(bpid), cpu_us(spid), machine_ticks(), ctx_switches(wpid)
            seen = sandbox_phase_stats()
            lv = {"concurrency": c, "refreshed": row[0], "failed": row[1], "needs_reauthorization": row[2],
                  "skipped": row[3], "seconds": dt, "tokens_per_s": row[0] / dt,
                  "worker_cpu_ms_per_token": (w1 - w0) / 1000.0 / max(row[0], 1),
                  "sandbox_cpu_ms_per_token": (s1 - s0) / 1000.0 / max(row[0], 1),
                  "cores_busy": ((w1 - w0) + (b1 - b0) + (s1 - s0)) / 1e6 / dt, "sandbox": seen,
                  "machine_busy": machine_busy(m0, m1), "worker_switches_per_token": (x1 - x0) / max(row[0], 1)}
            levels_out.append(lv)
            log("batch: C=%d %.1f tokens/s (%s)" % (c, lv["tokens_per_s"], tuple(row)))
        # the sequential loop over the same tokens
        expire_soon(su, ids)
        w0, b0, s0, m0 = cpu_us(wpid), cpu_us(bpid), cpu_us(spid), machine_ticks()
        t = time.monotonic()
        for tid in ids:
            q(app, REFRESH_SQL, (tid,))
        dt = time.monotonic() - t
        w1, b1, s1, m1 = cpu_us(wpid), cpu_us(bpid), cpu_us(spid), machine_ticks()
        seq = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt,
               "worker_cpu_ms_per_token": (w1 - w0) / 1000.0 / n,
               "sandbox_cpu_ms_per_token": (s1 - s0) / 1000.0 / n,
               "backend_cpu_ms_per_token": (b1 - b0) / 1000.0 / n,
               "cores_busy": ((w1 - w0) + (b1 - b0) + (s1 - s0)) / 1e6 / dt, "sandbox": sandbox_phase_stats(),
               "machine_busy": machine_busy(m0, m1)}
        app.close()
        su.close()
        drop_db(pre, db)
    finally:
        if opts.latency_ms:
            sandbox.config(latency_ms={})
    results["batch"] = {"tokens": n, "latency_ms": opts.latency_ms, "levels": levels_out, "ceiling": ceiling,
                        "sequential": seq}
    lines = ["Batch refresh: CALL digime.digime_refresh_expiring(concurrency => C) over %d imported tokens that "
             "expire within a minute%s" % (n, "; sandbox oauth/token latency %d ms" % opts.latency_ms
                                           if opts.latency_ms else ""),
             "%-5s %12s %12s %10s %12s %10s %10s %7s %8s %17s" % (
                 "C", "digime tok/s", "ceiling t/s", "% ceiling", "x sequential", "worker ms", "sandbox ms",
                 "cores", "machine", "refreshed/failed")]
    by_c = {lv["concurrency"]: lv for lv in ceiling}
    for lv in levels_out:
        ce = by_c.get(lv["concurrency"])
        pct = 100.0 * lv["tokens_per_s"] / ce["tokens_per_s"] if ce and ce["tokens_per_s"] else float("nan")
        lines.append("%-5d %12.1f %12.1f %9.1f%% %12.2f %10.2f %10.2f %7.2f %7.0f%% %12d/%d" % (
            lv["concurrency"], lv["tokens_per_s"], ce["tokens_per_s"] if ce else float("nan"), pct,
            lv["tokens_per_s"] / seq["tokens_per_s"], lv["worker_cpu_ms_per_token"], lv["sandbox_cpu_ms_per_token"],
            lv["cores_busy"], 100 * lv["machine_busy"], lv["refreshed"], lv["failed"] + lv["needs_reauthorization"]))
        if lv["concurrency"] == 8:
            target("batch", "digime_refresh_expiring at concurrency 8 >= 80 % of the sandbox's ceiling", pct >= 80,
                   "%.1f vs %.1f tokens/s = %.1f %%" % (lv["tokens_per_s"], ce["tokens_per_s"], pct))
    lines.append("%-5s %12.1f %12s %10s %12.2f %10.2f %10.2f %7.2f %7.0f%%   (digime_refresh_token x %d, one "
                 "session; backend %.2f ms/token)" % (
                     "seq", seq["tokens_per_s"], "", "", 1.0, seq["worker_cpu_ms_per_token"],
                     seq["sandbox_cpu_ms_per_token"], seq["cores_busy"], 100 * seq["machine_busy"], n,
                     seq["backend_cpu_ms_per_token"]))
    lines.append("ceiling = bench/ceiling.py in this run: %d pre-signed refresh JWTs per level sent by C Python "
                 "client processes over kept-alive connections (signing not timed; the clients share the cores): "
                 % n + ", ".join("C=%d median %.1f ms, sandbox %.2f ms CPU/request, machine %.0f%% busy" % (
                     c["concurrency"], c["median_ms"], c.get("sandbox_cpu_ms_per_request", float("nan")),
                     100 * c.get("machine_busy", float("nan"))) for c in ceiling))
    lines.append("worker ms / sandbox ms = CPU per token of the digime worker / the sandbox process; cores = CPU of "
                 "worker + calling backend + sandbox per second of wall time (the machine has %d); machine = busy "
                 "share of all CPUs from /proc/stat, other processes and steal time included" % os.cpu_count())
    lines.append("sandbox saw: " + ", ".join("C=%d %d req/%d conn" % (lv["concurrency"], lv["sandbox"]["requests"],
                                                                     lv["sandbox"]["connections"])
                                           for lv in levels_out) +
                 "; worker context switches per token: " + ", ".join(
                     "C=%d %.1f" % (lv["concurrency"], lv["worker_switches_per_token"]) for lv in levels_out))
    png = plot_batch(levels_out, ceiling, seq, n)
    if png:
        lines.append("plot: %s" % png)
        results["batch"]["plot"] = png
    emit("batch", "\n".join(lines))


def plot_batch(levels, ceiling, seq, n):
    if shutil.which("gnuplot") is None:
        log("gnuplot is not installed: no plot (run.sh installs gnuplot-nox)")
        return None
    data = os.path.join(WORK, "batch-throughput.dat")
    by_c = {c["concurrency"]: c for c in ceiling}
    with open(data, "w") as f:
        f.write("# concurrency digime_tokens_per_s ceiling_tokens_per_s sequential_tokens_per_s pct_of_ceiling\n")
        for lv in levels:
            ce = by_c.get(lv["concurrency"], {}).get("tokens_per_s") or float("nan")
            f.write("%d %.2f %.2f %.2f %.1f\n" % (lv["concurrency"], lv["tokens_per_s"], ce, seq["tokens_per_s"],
                                                100.0 * lv["tokens_per_s"] / ce))
    png = os.path.join(WORK, "batch-throughput.png")
    script = os.path.join(WORK, "batch-throughput.gp")
    xs = [lv["concurrency"] for lv in levels]
    with open(script, "w") as f:
        f.write("""set terminal pngcairo size 1100,560 noenhanced font ",11"
set output '%s'
set title "Batch refresh of %d tokens: digime vs the sandbox's ceiling and a sequential loop (%d cores)"
set xlabel "concurrency"
set ylabel "tokens refreshed per second"
set logscale x 2
set xrange [%g:%g]
set xtics (%s)
set yrange [0:*]
set offsets 0, 0, graph 0.08, 0
set grid
set key outside below center horizontal maxrows 1 spacing 1.5
plot '%s' using 1:3 with linespoints lw 2 pt 7 title "sandbox ceiling (ceiling.py)", \\
     '' using 1:2 with linespoints lw 2 pt 5 title "digime_refresh_expiring (labels: %% of the ceiling)", \\
     '' using 1:2:(sprintf("%%.0f %%%%", $5)) with labels offset 0,1 notitle, \\
     '' using 1:4 with lines lw 2 dt 2 title "digime_refresh_token loop"
""" % (png, n, os.cpu_count(), min(xs) / 1.3, max(xs) * 1.3, ", ".join(str(x) for x in xs), data))
    r = subprocess.run(["gnuplot", script], stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 and "pngcairo" in r.stderr:
        # gnuplot built without cairo: the plain png terminal
        txt = open(script).read().replace('pngcairo size 1100,560 noenhanced font ",11"', "png size 1100,560")
        open(script, "w").write(txt)
        r = subprocess.run(["gnuplot", script], stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        log("gnuplot failed: %s" % r.stderr.strip())
        return None
    return png


# --------------------------------------------------------------------------
# profile: where the CPU goes (perf), backend and worker during flows and refreshes
# --------------------------------------------------------------------------
PROFILE_GROUPS = [
    # (label, frames: a name, or a prefix ending in "*"); a sample counts for the first group
    # (in this order) that has a frame on its stack: inclusive time, each sample counted once
    ("PS512 signing (RSA private key)", ("dm_jws_sign_ps512",)),
    ("PS512 verification (answer JWT)", ("dm_jws_verify_ps512",)),
    ("key parsing (PEM, JWK)", ("dm_private_key_parse", "dm_public_key_from_pem", "dm_public_key_from_jwk",
                                "PEM_read_bio_PrivateKey*", "d2i_*")),
    ("AES-GCM seal/open (secrets at rest)", ("dm_seal", "dm_open")),
    ("random (PKCE verifier, nonces)", ("dm_random_alnum", "dm_pkce_verifier", "dm_pkce_challenge",
                                        "pg_strong_random")),
    ("JSON, JWS parsing, base64", ("dm_json_*", "dm_jws_parse", "dm_base64url_*", "pg_parse_json")),
    ("TLS + HTTP (libcurl, libssl)", ("curl_*", "Curl_*", "SSL_*", "ssl3_*", "tls_*", "BIO_write", "BIO_read")),
    ("SQL planning", ("BuildCachedPlan", "pg_plan_queries", "pg_plan_query", "standard_planner", "planner")),
    ("SQL parse/analyze", ("pg_parse_query", "raw_parser", "pg_analyze_and_rewrite_fixedparams",
                           "pg_analyze_and_rewrite_varparams", "parse_analyze_*", "RevalidateCachedQuery")),
    ("commit, WAL", ("CommitTransactionCommand", "CommitTransaction", "XLogInsertRecord", "XLogFlush")),
    ("SQL execution of digime's statements (SPI)", ("SPI_execute_plan", "SPI_execute_snapshot",
                                                    "SPI_execute_with_args", "SPI_execute", "_SPI_*")),
    ("waiting (latch, poll; kernel entry and exit)", ("WaitEventSetWait", "WaitLatch", "__poll", "epoll_wait",
                                                      "__GI___poll", "dm_http_multi_wait")),
    ("other: statement protocol, transaction start, catalog lookups, ...", ()),
]


def _frame_matches(frames, pats):
    for pat in pats:
        if pat.endswith("*"):
            if any(f.startswith(pat[:-1]) for f in frames):
                return True
        elif pat in frames:
            return True
    return False


def perf_samples(data):
    """[(pid, [(frame name, library), ...] innermost first)] of a perf.data file (perf script)."""
    r = subprocess.run(["perf", "script", "-i", data, "-F", "pid,ip,sym,dso"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out, cur = [], None
    for line in r.stdout.splitlines():
        s = line.strip()
        if not s:
            if cur:
                out.append(cur)
            cur = None
            continue
        if cur is None:
            try:
                cur = (int(s.split()[0]), [])
            except ValueError:
                pass
            continue
        dso = ""
        if s.endswith(")") and " (" in s:
            s, dso = s[:-1].rsplit(" (", 1)
            dso = os.path.basename(dso)
        parts = s.split(None, 1)
        cur[1].append((parts[1].split()[0] if len(parts) > 1 else "?", dso))
    if cur:
        out.append(cur)
    return out


def perf_self(samples, pid, by_symbol, limit):
    """Self time (the innermost frame) by library or by symbol, as lines."""
    stacks = [st for p, st in samples if p == pid and st]
    counts = {}
    for st in stacks:
        sym, dso = st[0]
        key = dso if not by_symbol else ("%s  %s" % (dso, sym if sym not in ("[unknown]", "?")
                                                     else "[internal, no symbol]"))
        counts[key] = counts.get(key, 0) + 1
    return ["%6.1f %%  %s" % (100.0 * c / len(stacks), k)
            for k, c in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def perf_groups(samples, pid):
    stacks = [set(f[0] for f in st) for p, st in samples if p == pid]
    counts = {g[0]: 0 for g in PROFILE_GROUPS}
    for frames in stacks:
        for label, pats in PROFILE_GROUPS:
            if not pats or _frame_matches(frames, pats):
                counts[label] += 1
                break
    return len(stacks), counts


def perf_available():
    return shutil.which("perf") is not None


def perf_record(opts, pids, name, action):
    """Runs action() under perf record on pids; returns the perf.data path, or None."""
    data = os.path.join(WORK, "perf-%s.data" % name)
    cmd = ["perf", "record", "-q", "-F", str(opts.profile_freq), "--call-graph", "dwarf,16384",
           "-p", ",".join(str(p) for p in pids), "-o", data]
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    try:
        action()
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=300)
    if not os.path.exists(data):
        log("perf record failed: %s" % perf.stderr.read().decode(errors="replace")[:500])
        return None
    return data


def profile_lines(data, procs, title):
    out = [title]
    prof = {}
    samples = perf_samples(data)
    for label, pid in procs:
        total, counts = perf_groups(samples, pid)
        prof[label] = {"samples": total, "groups": counts}
        out.append("%s (pid %d, %d samples):" % (label, pid, total))
        for g, c in sorted(counts.items(), key=lambda kv: -kv[1]):
            if c:
                out.append("  %-44s %6.1f %%" % (g, 100.0 * c / max(total, 1)))
        out.append("  self time by library:")
        out += ["   " + l for l in perf_self(samples, pid, False, 8)]
        out.append("  self time by symbol (top 12):")
        out += ["   " + l for l in perf_self(samples, pid, True, 12)]
    return out, prof


def section_profile(opts, pre, np_):
    if not perf_available():
        log("profile: perf is not installed (Debian package linux-perf): skipped")
        emit("profile", "Profile: skipped (perf is not installed)")
        return
    db = "bench_profile"
    su, app = setup_db(pre, db)
    wpid = worker_pid(su, db)
    bpid = q1(app, "SELECT pg_backend_pid()")
    warm_up(app, "pw")
    n = opts.profile_calls
    urls = [authorize(app, next_state("pp")) for _ in range(n)]  # not profiled: the pages need them
    locs = [browser.follow(u) for u in urls]
    tokens = []

    def flows():
        for i in range(n):
            authorize(app, next_state("pq"))
            tokens.append(q1(app, CALLBACK_SQL, (locs[i],)))
        for t in tokens:
            q(app, REFRESH_SQL, (t,))
    log("profile: perf record on backend %d and worker %d: %d authorize + %d callbacks + %d refreshes"
        % (bpid, wpid, n, n, n))
    data = perf_record(opts, (bpid, wpid), "flow", flows)
    results["profile"] = {}
    out = []
    if data:
        lines, prof = profile_lines(data, (("backend", bpid), ("worker", wpid)), (
            "Profile (perf record -F %d --call-graph dwarf) of %d authorize + %d callbacks + %d refreshes; inclusive "
            "share of the process's samples, a sample counted in the first group (in this order: signing, "
            "verification, key parsing, AES, random, JSON, TLS/HTTP, planning, parse, commit, SPI, waiting) that "
            "has a frame on its stack" % (opts.profile_freq, n, n, n)))
        out += lines
        results["profile"]["flow"] = prof
    # the worker during batch refreshes
    ids = mint_and_import(su, app, opts.profile_tokens)
    for c in (1, 8):
        expire_soon(su, ids)
        log("profile: perf record on worker %d: digime_refresh_expiring of %d tokens at concurrency %d"
            % (wpid, len(ids), c))
        data = perf_record(opts, (wpid,), "batch%d" % c, lambda: q(
            app, "CALL digime.digime_refresh_expiring(within => '15 minutes', concurrency => %s)", (c,)))
        if data:
            lines, prof = profile_lines(data, (("worker", wpid),), "\nProfile of the worker during "
                                        "digime_refresh_expiring of %d tokens at concurrency %d" % (len(ids), c))
            out += lines
            results["profile"]["batch%d" % c] = prof
    app.close()
    su.close()
    drop_db(pre, db)
    sandbox.reset()
    emit("profile", "\n".join(out) if out else "Profile: perf record failed")


# --------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description="digime benchmark sections (bench/run.sh)")
    ap.add_argument("sections", nargs="*", default=["all"])
    ap.add_argument("--calls", type=int, default=200, help="latency: timed calls per figure (200)")
    ap.add_argument("--sdk-calls", type=int, default=0, help="latency: Node.js SDK calls (default --calls)")
    ap.add_argument("--scenario-calls", type=int, default=200, help="scenarios: bench.py's calls (200)")
    ap.add_argument("--cpu-calls", type=int, default=1000, help="cpu, rows: calls per measured function (1000)")
    ap.add_argument("--cpu-rounds", type=int, default=4,
                    help="cpu: rounds, each bracketed by floor measurements (4)")
    ap.add_argument("--oneshot-calls", type=int, default=200,
                    help="cpu: calls on the cluster without the preload (200; 0 skips)")
    ap.add_argument("--floor-seconds", type=float, default=0.5, help="cpu: seconds per floor repeat (0.5)")
    ap.add_argument("--floor-repeats", type=int, default=5, help="cpu: floor repeats (5)")
    ap.add_argument("--rows", type=int, default=100000, help="rows: synthetic rows per table (100000)")
    ap.add_argument("--rows-rounds", type=int, default=4, help="rows: alternating rounds (4)")
    ap.add_argument("--rows-idle", type=int, default=12,
                    help="rows: seconds the idle workers are watched afterwards (12)")
    ap.add_argument("--rss-calls", type=int, default=20000, help="rss: authorize calls and refreshes (20000)")
    ap.add_argument("--rss-warmup", type=int, default=500, help="rss: warm-up calls (500)")
    ap.add_argument("--rss-tokens", type=int, default=100, help="rss: tokens the refreshes cycle over (100)")
    ap.add_argument("--tokens", type=int, default=2000, help="batch: tokens (2000)")
    ap.add_argument("--concurrency", default="1,4,8,16", help="batch: levels (1,4,8,16)")
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="batch: added sandbox latency of oauth/token, ms (0)")
    ap.add_argument("--profile-calls", type=int, default=300, help="profile: flows and refreshes (300)")
    ap.add_argument("--profile-tokens", type=int, default=1000, help="profile: tokens of the batch runs (1000)")
    ap.add_argument("--profile-freq", type=int, default=1000, help="profile: perf sampling Hz (1000)")
    ap.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    wanted = []
    for s in opts.sections:
        if s == "all":
            wanted += [x for x in SECTIONS if x != "profile" or perf_available()]
        elif s in SECTIONS:
            wanted.append(s)
        else:
            ap.error("unknown section %r (one of %s, all)" % (s, ", ".join(SECTIONS)))
    wanted = [s for i, s in enumerate(wanted) if s not in wanted[:i]]
    pre, np_ = clusters()
    t0 = time.time()
    timings = []
    for s in wanted:
        t = time.time()
        log("section %s" % s)
        sandbox.reset()
        globals()["section_" + s](opts, pre, np_)
        timings.append((s, time.time() - t))
    total = time.time() - t0

    if len(wanted) > 1 or targets:
        text = ["=" * 100, "Summary of bench/run.sh %s (%s; %d CPUs; %.0f s: %s)" % (
            " ".join(opts.sections), time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), total,
            ", ".join("%s %.0f s" % st for st in timings)), "=" * 100]
        for sec, tab in summary:
            text += ["", "[%s]" % sec, tab]
        if targets:
            text += ["", "Targets:"]
            for sec, desc, met, fig in targets:
                text.append("  %-7s %-6s %s: %s" % (sec, verdict(met), desc, fig))
        out = "\n".join(text)
        print("\n" + out, flush=True)
        with open(os.path.join(WORK, "summary.txt"), "w") as f:
            f.write(out + "\n")
    results["targets"] = [{"section": s, "target": d, "met": m, "figure": f} for s, d, m, f in targets]
    results["sections"] = wanted
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
