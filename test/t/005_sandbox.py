"""005_sandbox: the sandbox's own features used by later tests and the benchmark (no database).

delay faults, latency_ms, the "delivered" and "source" fields of GET /_sandbox/tokens,
POST /_sandbox/mint and GET /_sandbox/stats (test/sandbox/README.md).  The test talks to
the API like digime does (PS512 client JWTs), with a contract of its own.  Kept short:
the waits add up to about 2 s.
"""
import http.client
import json
import os
import secrets
import string
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
APP, CONTRACT = "t005-app", "t005-contract"
CLIENT_ID = APP + "_" + CONTRACT
KEY_PEM = dmtest.fixture_key("keys/second.pem")
KEY = serialization.load_pem_private_key(KEY_PEM.encode(), None)
CB = "https://t005.example/cb"
ALNUM = string.ascii_letters + string.digits


def nonce():
    return "".join(secrets.choice(ALNUM) for _ in range(32))


def client_jwt(**claims):
    """A client JWT as digime signs it (sorted claims, PS512, salt 64)."""
    claims.update(client_id=CLIENT_ID, nonce=nonce(), timestamp=int(time.time() * 1000))
    head = dmtest.b64url(b'{"alg":"PS512","typ":"JWT"}')
    body = dmtest.b64url(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    sig = KEY.sign((head + "." + body).encode(),
                   padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=64), hashes.SHA512())
    return head + "." + body + "." + dmtest.b64url(sig)


def api(path, jwt, body=None, timeout=30):
    """POST {base}path; returns (status, JSON body, seconds)."""
    c = http.client.HTTPSConnection(sb.host, sb.port, context=sb.ctx, timeout=timeout)
    data = b"" if body is None else json.dumps(body).encode()
    headers = {"Authorization": "Bearer " + jwt, "Content-Length": str(len(data))}
    t0 = time.monotonic()
    try:
        c.request("POST", "/v1.7/" + path, body=data, headers=headers)
        r = c.getresponse()
        out = r.read()
        return r.status, json.loads(out) if out else None, time.monotonic() - t0
    finally:
        c.close()


def payload(jws):
    return json.loads(dmtest.b64url_decode(jws.split(".")[1]))


_jwks = []


def jwt_valid(jws):
    """The response JWT verifies with the sandbox's published key."""
    if not _jwks:
        c = http.client.HTTPSConnection(sb.host, sb.port, context=sb.ctx, timeout=30)
        c.request("GET", "/v1.7/jwks/oauth")
        _jwks.append(json.loads(c.getresponse().read())["keys"][0]["pem"])
        c.close()
    return dmtest.jws_verify_ps512(jws, _jwks[0])


def auth_code():
    """authorize + onboarding page: returns (code, verifier)."""
    verifier = nonce() + nonce()
    challenge = dmtest.s256(verifier)
    st, body, _ = api("oauth/authorize", client_jwt(
        code_challenge=challenge, code_challenge_method="S256", redirect_uri=CB,
        response_mode="query", response_type="code", state="t005"),
        {"agent": {"sdk": {"name": "t005", "version": "1.0"}}})
    assert st == 201, "authorize answered %d" % st
    pre = payload(body["token"])["preauthorization_code"]
    loc = sb.follow("%s/apps/saas/authorize?%s" % (sb.url, urllib.parse.urlencode({"code": pre})))
    return dict(dmtest.query_pairs(loc))["code"], verifier


def exchange(timeout=30):
    code, verifier = auth_code()
    return api("oauth/token", client_jwt(grant_type="authorization_code", code=code,
                                         code_verifier=verifier), timeout=timeout)


def refresh(refresh_token, timeout=30):
    return api("oauth/token", client_jwt(grant_type="refresh_token", refresh_token=refresh_token),
               timeout=timeout)


def tokens_by_access():
    return {t["access_token"]: t for t in sb.tokens()}


def issued_value(body):
    """(access, refresh) of a token answer (recorded for 090_log_hygiene)."""
    p = payload(body["token"])
    dmtest.record_secret(p["access_token"]["value"])
    dmtest.record_secret(p["refresh_token"]["value"])
    return p["access_token"]["value"], p["refresh_token"]["value"]


def wait_for(cond, seconds=5):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@tap.test
def mint():
    before = int(time.time())
    pairs = sb.mint(APP, CONTRACT, 3, access_ttl=100, refresh_ttl=1000)
    tap.eq(len(pairs), 3, "mint: 3 pairs")
    tap.eq(sorted(pairs[0]), sorted(["access_token", "refresh_token", "access_expires_on",
                                     "refresh_expires_on", "user_id", "consentid"]),
           "mint: the members of a pair")
    tap.eq(len({p["user_id"] for p in pairs}), 3, "mint: a new user per pair")
    tap.ok(all(before + 100 <= p["access_expires_on"] <= before + 102
               and before + 1000 <= p["refresh_expires_on"] <= before + 1002 for p in pairs),
           "mint: access_ttl and refresh_ttl apply", pairs)
    toks = tokens_by_access()
    rec = [toks[p["access_token"]] for p in pairs]
    tap.ok(all(r["source"] == "mint" and r["delivered"] is True and r["state"] == "valid"
               and r["client_id"] == CLIENT_ID for r in rec),
           "mint: token records say source mint, delivered, valid", rec)
    for i, p in enumerate(pairs):
        st, body, _ = refresh(p["refresh_token"])
        tap.eq(st, 201, "minted pair %d refreshes (201)" % i)
        if st != 201:
            continue
        access, _ = issued_value(body)
        tap.ok(jwt_valid(body["token"]), "minted pair %d: the answer verifies" % i)
        toks = tokens_by_access()
        new, old = toks[access], toks[p["access_token"]]
        tap.ok(new["source"] == "refresh" and new["delivered"] is True
               and new["consentid"] == p["consentid"] and new["user_id"] == p["user_id"]
               and old["state"] == "rotated",
               "minted pair %d: refresh continues the family and rotates it" % i, (new, old))
    try:
        sb.call("POST", "mint", {"application_id": APP, "contract_id": "nope", "count": 1})
        tap.ok(False, "mint for an unknown contract is refused")
    except RuntimeError as e:
        tap.match(str(e), r": 404 ", "mint for an unknown contract: 404")
    try:
        sb.call("POST", "mint", {"application_id": APP, "contract_id": CONTRACT, "count": 0})
        tap.ok(False, "mint with count 0 is refused")
    except RuntimeError as e:
        tap.match(str(e), r": 400 ", "mint with count 0: 400")


@tap.test
def delivered_and_source():
    st, body, _ = exchange()
    tap.eq(st, 201, "clean exchange: 201")
    access, _ = issued_value(body)
    rec = tokens_by_access()[access]
    tap.ok(rec["delivered"] is True and rec["source"] == "exchange",
           "clean exchange: delivered true, source exchange", rec)

    code, verifier = auth_code()
    sb.fault(endpoint="oauth/token", action="token", sign_with="corrupt")
    st, body, _ = api("oauth/token", client_jwt(grant_type="authorization_code", code=code,
                                                code_verifier=verifier))
    tap.eq(st, 201, "exchange with a token fault: still 201")
    access, _ = issued_value(body)
    rec = tokens_by_access()[access]
    tap.ok(rec["delivered"] is False and rec["state"] == "valid" and rec["source"] == "exchange",
           "token fault: the pair is issued (valid) but not delivered", rec)

    # A reauthorization (reference code with PKCE, user-reauth page, exchange).
    verifier = nonce() + nonce()
    st, body, _ = api("oauth/token/reference", client_jwt(
        access_token=access, redirect_uri=CB, code_challenge=dmtest.s256(verifier),
        code_challenge_method="S256"), {"agent": {"sdk": {"name": "t005", "version": "1.0"}}})
    ref = payload(body["token"])["reference_code"]
    loc = sb.follow("%s/apps/saas/user-reauth?%s" % (sb.url, urllib.parse.urlencode({"code": ref})))
    st, body, _ = api("oauth/token", client_jwt(grant_type="authorization_code",
                                                code=dict(dmtest.query_pairs(loc))["code"],
                                                code_verifier=verifier))
    tap.eq(st, 201, "reauthorization exchange: 201")
    new_access, _ = issued_value(body)
    toks = tokens_by_access()
    tap.ok(toks[new_access]["source"] == "reauthorize" and toks[new_access]["delivered"] is True
           and toks[new_access]["family"] == toks[access]["family"]
           and toks[access]["state"] == "rotated",
           "reauthorization: source reauthorize, same family, delivered", toks[new_access])

    # The client gives up (timeout) during a delay: issued afterwards, never delivered.
    pair = sb.mint(APP, CONTRACT, 1)[0]
    known = set(tokens_by_access())
    failed = sb.stats()["write_failed"]
    sb.fault(endpoint="oauth/token", action="delay", seconds=0.6)
    try:
        st = refresh(pair["refresh_token"], timeout=0.2)[0]
    except OSError:
        st = "timeout"
    tap.eq(st, "timeout", "client timeout during a delay")
    tap.ok(wait_for(lambda: sb.stats()["write_failed"] == failed + 1),
           "the sandbox could not answer the client that left (write_failed counts it)")
    new = [t for a, t in tokens_by_access().items() if a not in known]
    for t in new:
        dmtest.record_secret(t["access_token"])
        dmtest.record_secret(t["refresh_token"])
    tap.ok(len(new) == 1 and new[0]["source"] == "refresh" and new[0]["delivered"] is False
           and new[0]["state"] == "valid" and tokens_by_access()[pair["access_token"]]["state"]
           == "rotated", "the refresh happened after the delay but was not delivered", new)


@tap.test
def delay():
    pair = sb.mint(APP, CONTRACT, 1)[0]
    code, verifier = auth_code()
    sb.fault(endpoint="oauth/token", action="delay", seconds=1)
    result = {}

    def delayed():
        result["r"] = api("oauth/token", client_jwt(grant_type="authorization_code", code=code,
                                                    code_verifier=verifier))

    th = threading.Thread(target=delayed)
    th.start()

    def delayed_arrived():
        recs = [r for r in sb.requests() if r["endpoint"] == "oauth/token" and r["fault"] == "delay"]
        return bool(recs) and recs[-1]["status"] is None

    arrived = wait_for(delayed_arrived, 1)
    tap.ok(arrived, "the delayed request is recorded at once, without a status yet")
    st, body, secs = refresh(pair["refresh_token"])
    still_waiting = th.is_alive()
    tap.ok(st == 201 and secs < 0.5 and still_waiting,
           "another oauth/token request is answered during the delay (the lock is free)",
           "status %s in %.3f s, delayed one still waiting: %s" % (st, secs, still_waiting))
    if st == 201:
        issued_value(body)
    th.join(10)
    st, body, secs = result.get("r", (None, None, 0))
    tap.ok(1.0 <= secs < 1.8, "delay of 1 s: answered after %.2f s" % secs)
    tap.eq(st, 201, "delayed exchange answers 201")
    if st == 201:
        access, _ = issued_value(body)
        tap.ok(jwt_valid(body["token"]), "delayed answer: the response JWT verifies")
        rec = tokens_by_access()[access]
        tap.ok(rec["state"] == "valid" and rec["delivered"] is True,
               "delayed answer: the pair is valid and delivered", rec)


@tap.test
def latency():
    sb.config(latency_ms={"oauth/token": 300})
    pairs = sb.mint(APP, CONTRACT, 2)
    out = [None, None]

    def one(i):
        out[i] = refresh(pairs[i]["refresh_token"])

    t0 = time.monotonic()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(10)
    total = time.monotonic() - t0
    tap.ok(all(o and o[0] == 201 for o in out), "latency: both refreshes answer 201",
           [o and o[0] for o in out])
    tap.ok(all(o and o[2] >= 0.3 for o in out), "latency: each waits at least 300 ms",
           [o and o[2] for o in out])
    tap.ok(total < 0.5, "latency: two concurrent requests overlap (%.3f s in total)" % total)
    for o in out:
        if o and o[0] == 201:
            issued_value(o[1])
    st, _, secs = api("oauth/token", "not-a-jwt")
    tap.ok(st == 406 and secs >= 0.3, "latency applies to a refused request too (406 after %.2f s)"
           % secs)
    c = http.client.HTTPSConnection(sb.host, sb.port, context=sb.ctx, timeout=30)
    t0 = time.monotonic()
    c.request("GET", "/v1.7/jwks/oauth")
    c.getresponse().read()
    c.close()
    tap.ok(time.monotonic() - t0 < 0.25, "latency is per endpoint: the JWKS is not slowed")
    cfg = sb.config(latency_ms={})
    tap.eq(cfg["latency_ms"], {}, "latency_ms can be cleared")
    try:
        sb.config(latency_ms={"oauth/nothing": 1})
        tap.ok(False, "latency_ms for an unknown endpoint is refused")
    except RuntimeError as e:
        tap.match(str(e), r": 400 ", "latency_ms for an unknown endpoint: 400")


@tap.test
def stats():
    sb.reset()
    s = sb.stats()
    tap.eq((s["requests"], s["write_failed"], s["tokens"]["issued"]["refresh"]), ({}, 0, 0),
           "stats are empty after a reset")
    pairs = sb.mint(APP, CONTRACT, 2)
    for p in pairs:
        st, body, _ = refresh(p["refresh_token"])
        if st == 201:
            issued_value(body)
    refresh(pairs[0]["refresh_token"])          # rotated out: 401
    sb.fault(endpoint="oauth/token", action="close")
    try:
        refresh(pairs[1]["refresh_token"])
    except (OSError, http.client.HTTPException):
        pass
    s = sb.stats()
    tap.eq(s["requests"], {"oauth/token": {"201": 2, "401": 1, "closed": 1}},
           "stats count per endpoint and status")
    tap.eq((s["tokens"]["issued"]["mint"], s["tokens"]["issued"]["refresh"],
            s["tokens"]["delivered"]["refresh"]), (2, 2, 2), "stats count issued and delivered pairs")


try:
    sb.reset(everything=True)
    sb.register(APP, CONTRACT, dmtest.public_pem(KEY_PEM))
    tap.run()
finally:
    sb.reset(everything=True)
