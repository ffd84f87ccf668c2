#!/usr/bin/python3
"""The sandbox's own ceiling for refresh requests (not part of the test suite).

    /usr/bin/python3 bench/ceiling.py --url https://127.0.0.1:PORT --ca DIR/ca.pem \
        --key CONTRACT_KEY.pem --app APPID --contract CONTRACTID [--tokens 2000] \
        [--concurrency 1,4,8,16] [--sandbox-pid PID]

For each concurrency level C it mints --tokens fresh pairs (POST /_sandbox/mint),
signs one refresh JWT per pair exactly as digime does (header {"alg":"PS512","typ":"JWT"},
sorted claims client_id, grant_type, nonce, refresh_token, timestamp; RSASSA-PSS, SHA-512,
MGF1-SHA-512, salt 64), then sends them as POST {base}oauth/token with an empty body from C
worker processes, each over one kept-alive HTTPS connection that trusts --ca.  Signing
happens before the clock starts and just before the level runs (the sandbox accepts a
timestamp within its timestamp_window, 60 s by default).

Workers are processes, so that the client is not serialized by one interpreter lock; they
still share the machine's cores with the sandbox, so on a small machine the figure is a
lower bound of what the sandbox alone could do.

Prints one line per level (tokens/s = 201 answers per second of wall time, median and p90
latency) and finally one JSON line with every figure: per level also machine_busy (the busy
share of all CPUs during the run, from /proc/stat, steal time included) and, with
--sandbox-pid, sandbox_cpu_ms_per_request (the sandbox process's CPU from /proc).  A sandbox without /_sandbox/mint
(older versions) is fed through the real flow instead (authorize, onboarding page, code
exchange), which is slower to set up but measures the same thing.
"""
import argparse
import base64
import hashlib
import http.client
import json
import multiprocessing
import os
import secrets
import ssl
import statistics
import string
import sys
import time
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

ALNUM = string.ascii_letters + string.digits
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64)
HEADER = b'{"alg":"PS512","typ":"JWT"}'


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def nonce():
    return "".join(secrets.choice(ALNUM) for _ in range(32))


def sign(key, claims):
    """Compact PS512 JWS with claims sorted by name, compact JSON (as src/api.c)."""
    payload = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode("utf-8")
    signing_input = b64url(HEADER) + "." + b64url(payload)
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii"), PSS,
                                                 hashes.SHA512()))


# ---- presigning (in a pool: the client's CPU must not count) --------------

_key = None


def _init_signer(pem):
    global _key
    _key = serialization.load_pem_private_key(pem, None)


def _sign_refresh(args):
    client_id, refresh_token = args
    return sign(_key, {"client_id": client_id, "grant_type": "refresh_token", "nonce": nonce(),
                       "refresh_token": refresh_token, "timestamp": int(time.time() * 1000)})


# ---- HTTP -----------------------------------------------------------------

class Api:
    def __init__(self, origin, ca):
        u = urllib.parse.urlsplit(origin)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = ssl.create_default_context(cafile=ca)

    def conn(self):
        c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
        c.connect()
        return c

    def call(self, method, path, body=None, headers=None):
        c = self.conn()
        data = None if body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        c.request(method, path, body=data, headers=hdrs)
        r = c.getresponse()
        out = r.status, r.read(), r.getheader("Location")
        c.close()
        return out

    def control(self, method, name, body=None):
        status, data, _ = self.call(method, "/_sandbox/" + name, body)
        if status >= 300:
            raise RuntimeError("sandbox %s %s: %d %s" % (method, name, status, data[:200]))
        return json.loads(data) if data else None


def jwt_payload(token):
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def pairs_via_flow(api, key, client_id, n):
    """Refresh tokens from n real authorizations (for a sandbox without /_sandbox/mint)."""
    out = []
    cb = "https://ceiling.example/cb"
    for _ in range(n):
        verifier = nonce() + nonce()
        challenge = b64url(hashlib.sha256(verifier.encode()).digest())
        jwt = sign(key, {"client_id": client_id, "code_challenge": challenge,
                         "code_challenge_method": "S256", "nonce": nonce(), "redirect_uri": cb,
                         "response_mode": "query", "response_type": "code", "state": "",
                         "timestamp": int(time.time() * 1000)})
        status, data, _ = api.call("POST", "/v1.7/oauth/authorize",
                                   {"agent": {"sdk": {"name": "ceiling", "version": "1.0"}}},
                                   {"Authorization": "Bearer " + jwt})
        if status != 201:
            raise RuntimeError("oauth/authorize answered %d" % status)
        pre = jwt_payload(json.loads(data)["token"])["preauthorization_code"]
        status, _, location = api.call(
            "GET", "/apps/saas/authorize?" + urllib.parse.urlencode({"code": pre}))
        code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["code"]
        jwt = sign(key, {"client_id": client_id, "code": code, "code_verifier": verifier,
                         "grant_type": "authorization_code", "nonce": nonce(),
                         "timestamp": int(time.time() * 1000)})
        status, data, _ = api.call("POST", "/v1.7/oauth/token", None,
                                   {"Authorization": "Bearer " + jwt, "Content-Length": "0"})
        if status != 201:
            raise RuntimeError("code exchange answered %d" % status)
        out.append(jwt_payload(json.loads(data)["token"])["refresh_token"]["value"])
    return out


# ---- workers --------------------------------------------------------------

def worker(api, jwts, counter, barrier, results):
    """Takes the next JWT until none is left; reports (start, end, latencies, statuses)."""
    lat, statuses = [], {}
    start = end = None
    conn = None
    try:
        conn = api.conn()  # TLS handshake before the clock starts
        barrier.wait()
        start = time.monotonic()
        while True:
            with counter.get_lock():
                i = counter.value
                counter.value = i + 1
            if i >= len(jwts):
                break
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = api.conn()
                conn.request("POST", "/v1.7/oauth/token", body=b"",
                             headers={"Authorization": "Bearer " + jwts[i],
                                      "Content-Length": "0", "Accept": "application/json",
                                      "User-Agent": "digime-ceiling"})
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = "error"
                if conn is not None:
                    conn.close()
                conn = None
            lat.append(time.monotonic() - t0)
            statuses[status] = statuses.get(status, 0) + 1
        end = time.monotonic()
    finally:
        if conn is not None:
            conn.close()
        results.put((start, end, lat, statuses))


def proc_cpu_s(pid):
    """utime + stime of a process in seconds (/proc/PID/stat), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_ticks():
    """(busy, total) ticks of all CPUs (/proc/stat; busy includes steal, excludes idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4], sum(v[:8])


def run_level(api, jwts, c, sandbox_pid=None):
    ctx = multiprocessing.get_context("fork")  # the JWT list is inherited, not pickled
    counter = ctx.Value("l", 0)
    barrier = ctx.Barrier(c + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(api, jwts, counter, barrier, results))
             for _ in range(c)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.monotonic()
    cpu0, m0 = (proc_cpu_s(sandbox_pid) if sandbox_pid else None), machine_ticks()
    got = [results.get() for _ in procs]
    cpu1, m1 = (proc_cpu_s(sandbox_pid) if sandbox_pid else None), machine_ticks()
    for p in procs:
        p.join()
    if any(g[1] is None for g in got):
        raise RuntimeError("a worker failed (could it connect?)")
    wall = max(g[1] for g in got) - t0
    lat = sorted(x for g in got for x in g[2])
    statuses = {}
    for g in got:
        for k, v in g[3].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    ok = statuses.get("201", 0)
    extra = {"machine_busy": round((m1[0] - m0[0]) / max(m1[1] - m0[1], 1), 3)}
    if cpu0 is not None and cpu1 is not None and lat:
        extra["sandbox_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / len(lat), 3)
    return {**extra, "concurrency": c, "requests": len(lat), "ok": ok,
            "statuses": statuses, "seconds": round(wall, 3),
            "tokens_per_s": round(ok / wall, 1) if wall > 0 else None,
            "median_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p90_ms": round(lat[max(int(len(lat) * 0.9) - 1, 0)] * 1000, 2) if lat else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="sandbox origin, https://127.0.0.1:PORT")
    ap.add_argument("--ca", required=True, help="the sandbox's ca.pem")
    ap.add_argument("--key", required=True, help="contract private key (PEM)")
    ap.add_argument("--app", required=True, help="application id")
    ap.add_argument("--contract", required=True, help="contract id")
    ap.add_argument("--tokens", type=int, default=2000, help="refreshes per level")
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    ap.add_argument("--sandbox-pid", type=int, default=None,
                    help="also report the sandbox process's CPU per request (from /proc)")
    ap.add_argument("--register", action="store_true",
                    help="(re-)register the contract even if the sandbox knows it")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.tokens < 1 or not levels or min(levels) < 1:
        ap.error("--tokens and every --concurrency level must be positive")

    origin = args.url.rstrip("/")
    if origin.endswith("/v1.7"):
        origin = origin[:-len("/v1.7")]
    api = Api(origin, args.ca)
    pem = open(args.key, "rb").read()
    key = serialization.load_pem_private_key(pem, None)
    client_id = "%s_%s" % (args.app, args.contract)
    known = {c["client_id"] for c in api.control("GET", "contracts")}
    if args.register or client_id not in known:
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        api.control("POST", "contracts", {"application_id": args.app,
                                          "contract_id": args.contract,
                                          "public_key_pem": public.decode("ascii")})
    window = api.control("GET", "config").get("timestamp_window")
    has_mint = api.call("POST", "/_sandbox/mint", {})[0] != 404

    report = []
    for c in levels:
        if has_mint:
            minted = api.control("POST", "mint", {"application_id": args.app,
                                                  "contract_id": args.contract,
                                                  "count": args.tokens})
            refresh_tokens = [p["refresh_token"] for p in minted["pairs"]]
        else:
            refresh_tokens = pairs_via_flow(api, key, client_id, args.tokens)
        # Sign just before the run (timestamps age), in a pool that is gone again
        # before the workers are forked.
        t = time.monotonic()
        with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2, _init_signer,
                                                      (pem,)) as signer:
            jwts = signer.map(_sign_refresh, [(client_id, r) for r in refresh_tokens],
                              chunksize=64)
        sign_s = time.monotonic() - t
        res = run_level(api, jwts, c, args.sandbox_pid)
        res["sign_seconds"] = round(sign_s, 2)
        report.append(res)
        print("C=%-3d %8.1f tokens/s  median %7.2f ms  p90 %7.2f ms  %d/%d ok  (%.1f s)"
              % (c, res["tokens_per_s"] or 0, res["median_ms"] or 0, res["p90_ms"] or 0,
                 res["ok"], res["requests"], res["seconds"]), flush=True)
        if res["ok"] < res["requests"]:
            print("   statuses %s%s" % (res["statuses"], (
                "; a level that outlasts the timestamp window (%s s) gets 401s" % window)
                if sign_s + res["seconds"] > (window or 60) else ""), flush=True)
    print(json.dumps({"url": origin, "tokens": args.tokens, "cpus": os.cpu_count(),
                      "mint": has_mint, "levels": report}))
    return 0 if all(r["ok"] == r["requests"] for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
