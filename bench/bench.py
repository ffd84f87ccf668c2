"""digime latency benchmark against the local sandbox (see bench/run.sh).

Measures wall time per call from a client on the same machine, and prints
median and 90th percentile per scenario plus ratios to the first one:

  warm       one session: curl handle kept alive, JWKS cached (digime's normal case)
  no-cache   one session, digime.jwks_cache_ttl = 0: the JWKS is fetched for every
             verification, as the digi.me Node.js SDK does
  cold       a new session per call: new backend, new TLS connection, JWKS fetched
  flow       warm authorize + onboarding page + handle_callback (code exchange)
  refresh    warm digime_refresh_token

Compared against: digime itself in the SDK's way of working (no-cache, cold), and,
with DM_NODE_SDK set, the Node.js SDK itself (bench/node-sdk.js, run by run.sh);
the sandbox's own cost (Python, RSA signing per answer) is part of every figure.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "test", "pylib"))
import dmtest  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
CONTRACT = "bench-contract"
sandbox = dmtest.Sandbox()
conn = dmtest.fresh_db("bench")
dmtest.q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
         (CONTRACT, "bench-app", open(os.path.join(dmtest.ROOT, "test/fixtures/keys/second.pem")).read()))
AUTH = "SELECT url FROM digime.digime_authorize_url(%s, 'https://bench.example/cb', %s)"


def timed(fn, n):
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def warm(i):
    dmtest.q(conn, AUTH, (CONTRACT, "w%d" % i))


def no_cache(i):
    dmtest.q(nc, AUTH, (CONTRACT, "n%d" % i))


def cold(i):
    c = dmtest.connect("bench")
    dmtest.q(c, AUTH, (CONTRACT, "c%d" % i))
    c.close()


def flow(i):
    url = dmtest.q1(conn, AUTH, (CONTRACT, "f%d" % i))
    loc = sandbox.follow(url)
    tokens.append(dmtest.q1(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (loc,)))


def refresh(i):
    dmtest.q(conn, "SELECT id FROM digime.digime_refresh_token(%s)", (tokens[i % len(tokens)],))


nc = dmtest.connect("bench")
dmtest.q(nc, "SET digime.jwks_cache_ttl = 0")
tokens = []
timed(warm, 10)  # warm-up: connection, JWKS, plans
results = []
for name, fn, n in [("warm", warm, N), ("no-cache", no_cache, N), ("cold", cold, max(N // 4, 10)),
                    ("flow", flow, max(N // 4, 10)), ("refresh", refresh, max(N // 4, 10))]:
    ms = timed(fn, n)
    results.append((name, n, statistics.median(ms), sorted(ms)[int(len(ms) * 0.9) - 1]))

base = results[0][2]
print("%-9s %6s %10s %10s %8s" % ("scenario", "calls", "median ms", "p90 ms", "x warm"))
for name, n, med, p90 in results:
    print("%-9s %6d %10.2f %10.2f %8.2f" % (name, n, med, p90, med / base))
if os.environ.get("DM_BENCH_JSON"):  # for bench/node-sdk.js --compare (see bench/run.sh)
    with open(os.environ["DM_BENCH_JSON"], "w") as f:
        json.dump({"calls": N, "results": [{"scenario": name, "calls": n, "median_ms": round(med, 2),
                                            "p90_ms": round(p90, 2)} for name, n, med, p90 in results]}, f)
