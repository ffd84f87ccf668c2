"""010_flow: the whole authorization flow against the sandbox, and what goes over the wire.

Expected values come from /work/shared/digime-api-vectors.md (V..) and the sandbox's
own records (requests, issued codes and tokens).
"""
import json
import os
import re
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from dmtest import error, q, q1  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
sb.reset(everything=True)  # default sandbox config, no leftover faults
conn = dmtest.fresh_db("t010")

APP = dmtest.EXAMPLE_APP
C1 = dmtest.EXAMPLE_CONTRACT
C2 = dmtest.SECOND_CONTRACT
KEY1 = dmtest.fixture_key("digime-example/read-data.key")
KEY2 = dmtest.fixture_key("keys/second.pem")
q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C1, APP, KEY1))
q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C2, APP, KEY2))

ONBOARD = q1(conn, "SELECT current_setting('digime.onboard_url')")
AGENT_NAME = q1(conn, "SELECT current_setting('digime.agent_name')")
AGENT_VERSION = q1(conn, "SELECT current_setting('digime.agent_version')")
HEADER_SEG = "eyJhbGciOiJQUzUxMiIsInR5cCI6IkpXVCJ9"  # V10
NONCE_RE = re.compile(r"^[A-Za-z0-9]{32}$")

V30 = {"client_id", "code_challenge", "code_challenge_method", "nonce", "redirect_uri",
       "response_mode", "response_type", "state", "timestamp"}
V32 = {"client_id", "code", "code_verifier", "grant_type", "nonce", "timestamp"}
V33 = {"client_id", "grant_type", "nonce", "refresh_token", "timestamp"}
V34 = {"access_token", "client_id", "code_challenge", "code_challenge_method", "nonce",
       "redirect_uri", "timestamp"}
V37 = {"client_id", "nonce", "timestamp"}

SEQ0 = sb.last_seq()  # requests after this one are this file's
S = {}            # state shared between the tests, in order


def cols(cur):
    return [d[0] for d in cur.description]


def row_dict(sql, args=None):
    cur = conn.cursor()
    cur.execute(sql, args)
    r = cur.fetchone()
    return dict(zip(cols(cur), r)) if r else None


def handle_callback(location):
    return row_dict("SELECT * FROM digime.digime_handle_callback(%s)", (location,))


def callback_params(location):
    params = dict(dmtest.query_pairs(location))
    dmtest.record_secret(params.get("code"))
    return params


def last_code(kind):
    """Newest preauthorization_code / reference_code the sandbox issued."""
    return sb.secrets()["by_kind"][kind][-1]


def pair_for(access_token):
    for p in sb.tokens():
        if p["access_token"] == access_token:
            return p
    return None


def n_tokens():
    return q1(conn, "SELECT count(*) FROM digime.user_tokens")


def expiries(token_id):
    return tuple(q(conn, "SELECT extract(epoch FROM access_token_expires_at)::bigint, "
                         "extract(epoch FROM refresh_token_expires_at)::bigint "
                         "FROM digime.user_tokens WHERE id = %s", (token_id,))[0])


def check_client_jwt(rec, key_pem, claim_set, what):
    """V10-V15, V17: header, signature parameters, exact claim set, nonce, timestamp."""
    raw = rec["jwt"]["raw"]
    tap.ok(rec["headers"].get("authorization") == "Bearer " + raw,
           "%s: Authorization is 'Bearer ' + the JWT (V17)" % what)
    h, p, s = raw.split(".")
    tap.eq(h, HEADER_SEG, "%s: JWT header segment is exactly {\"alg\":\"PS512\",\"typ\":\"JWT\"} (V10)" % what)
    tap.eq(len(dmtest.b64url_decode(s)), 256, "%s: signature is 256 bytes (V15)" % what)
    tap.ok(dmtest.jws_verify_ps512(raw, key_pem, salt=64), "%s: verifies PS512, MGF1-SHA512, salt 64 (V14)" % what)
    tap.ok(not dmtest.jws_verify_ps512(raw, key_pem, salt=32), "%s: does not verify with salt 32 (V14)" % what)
    tap.ok(not dmtest.jws_verify_ps512(raw, key_pem, salt=64, mgf_hash=hashes.SHA256()),
           "%s: does not verify with MGF1-SHA256 (V14)" % what)
    tap.eq(json.loads(dmtest.b64url_decode(p)), rec["jwt"]["claims"], "%s: payload decodes" % what)
    c = rec["jwt"]["claims"]
    tap.eq(set(c), claim_set, "%s: exact claim set" % what)
    tap.ok(isinstance(c.get("nonce"), str) and NONCE_RE.match(c["nonce"]) is not None,
           "%s: nonce is 32 alphanumerics (V13)" % what, c.get("nonce"))
    ts = c.get("timestamp")
    tap.ok(isinstance(ts, int) and len(str(ts)) == 13 and abs(ts - rec["t"] * 1000) < 5000,
           "%s: timestamp is integer ms within 5 s of the request (V12)" % what,
           "timestamp %r, received at %r" % (ts, rec["t"]))
    tap.eq(rec["headers"].get("accept"), "application/json", "%s: Accept: application/json (V45)" % what)
    tap.ok(rec["jwt"]["signature_valid"] is True, "%s: the sandbox accepted the signature" % what)


# --------------------------------------------------------------------------
@tap.test
def authorize_callback_token():
    cb = "https://cb.example/return?x=1"          # V31: a callback with a query string
    state = "st ate&=1"                           # V31: a state that needs encoding
    s0 = sb.last_seq()
    n0 = n_tokens()
    url, verifier, session = dmtest.authorize(conn, C1, callback=cb, state=state)
    recs = dmtest.api_records(sb, s0)
    auth = [r for r in recs if r["endpoint"] == "oauth/authorize"]
    tap.eq(len(auth), 1, "one POST oauth/authorize")
    a = auth[0]
    jwks = [r for r in recs if r["endpoint"] == "jwks"]
    tap.ok(len(jwks) == 1 and jwks[0]["jwt"] is None and jwks[0]["headers"].get("accept") == "application/json"
           and jwks[0]["path"] == "/v1.7/jwks/oauth",
           "JWKS fetched once from {base}jwks/oauth, unauthenticated, Accept json (V45)")
    tap.eq((a["method"], a["path"], a["status"]), ("POST", "/v1.7/oauth/authorize", 201),
           "authorize went to {base}oauth/authorize and got 201")
    check_client_jwt(a, KEY1, V30, "authorize JWT")
    c = a["jwt"]["claims"]
    tap.eq(c["client_id"], APP + "_" + C1, "client_id = applicationId_contractId (V03)")
    tap.eq(c["redirect_uri"], cb, "redirect_uri is the callback byte for byte (V31)")
    tap.eq(c["state"], state, "state is the caller's state byte for byte (V31)")
    tap.eq((c["response_mode"], c["response_type"], c["code_challenge_method"]),
           ("query", "code", "S256"), "response_mode query, response_type code, method S256 (V31, V21)")
    tap.ok(re.match(r"^[A-Za-z0-9_-]{43}$", verifier) is not None, "code_verifier is 43 base64url characters (V20)")
    tap.ok(re.match(r"^[A-Za-z0-9]{32}$", dmtest.b64url_decode(verifier).decode("ascii")) is not None,
           "code_verifier decodes to 32 alphanumerics (V20)")
    tap.eq(c["code_challenge"], dmtest.s256(verifier),
           "code_challenge = base64url(SHA-256(code_verifier)) without padding (V21)")
    tap.ok("=" not in c["code_challenge"] and len(c["code_challenge"]) == 43, "challenge unpadded, 43 chars")
    tap.eq(a["headers"].get("content-type"), "application/json", "authorize has Content-Type: application/json")
    body = json.loads(a["body"])
    tap.eq(body["agent"]["sdk"]["name"], AGENT_NAME, "agent.sdk.name = digime.agent_name (V40)")
    tap.eq(body["agent"]["sdk"]["version"], AGENT_VERSION, "agent.sdk.version = digime.agent_version (V40)")
    tap.ok("actions" not in body and "actions" not in a, "no actions key without session_options (V40)")

    # the onboarding URL: {onboard}authorize?code=P&sourceType=pull (V60, V64, V72)
    pre = last_code("preauthorization_code")
    tap.eq(url, ONBOARD + "authorize?code=%s&sourceType=pull" % pre,
           "URL is {onboard}authorize?code=<preauthorization code>&sourceType=pull (V60)")
    tap.eq(ONBOARD, os.environ["DM_SANDBOX_URL"] + "/apps/saas/", "onboard URL is the sandbox's")
    names = [n for n, _ in dmtest.query_pairs(url)]
    tap.ok(not {"callback", "redirect_uri", "state", "service"} & set(names)
           and "cb.example" not in url and "st+ate" not in url and "st%20ate" not in url,
           "URL has no callback, redirect_uri, state (V72), no service without service_id")
    tap.ok(isinstance(session, dict) and session.get("key") == sb.secrets()["by_kind"]["session_key"][-1]
           and abs(session.get("expiry", 0) - (a["t"] * 1000 + 3600000)) < 5000,
           "session is the sandbox's {key, expiry ms}", session)
    pend = q(conn, "SELECT kind, status, callback, code_verifier IS NOT NULL, token_id "
                   "FROM digime.authorizations WHERE state = %s", (state,))
    tap.eq(pend, [("authorize", "pending", cb, True, None)], "a pending authorization is recorded")

    # browser: onboarding page -> callback
    s1 = sb.last_seq()
    location = sb.follow(url)
    params = callback_params(location)
    tap.ok(location.startswith(cb + "&success=true&"), "callback keeps the caller's query", location)
    tap.eq(params.get("state"), state, "callback carries the state")
    t_cb = time.time()
    row = handle_callback(location)
    recs = dmtest.api_records(sb, s1, "oauth/token")
    tap.eq(len(recs), 1, "one POST oauth/token for the exchange")
    t = recs[0]
    check_client_jwt(t, KEY1, V32, "exchange JWT")
    tc = t["jwt"]["claims"]
    tap.eq((tc["grant_type"], tc["code"], tc["code_verifier"], tc["client_id"]),
           ("authorization_code", params["code"], verifier, APP + "_" + C1),
           "exchange claims: grant authorization_code, the callback's code, the verifier (V32, V144)")
    tap.eq((t["headers"].get("content-length"), t["body"]), ("0", ""),
           "exchange is a POST with Content-Length 0 and an empty body (V42)")
    tap.ok("content-type" not in t["headers"], "exchange has no Content-Type (protocol 4.2)")
    tap.ok(tc["nonce"] != c["nonce"], "exchange nonce differs from authorize nonce (V13)")

    # the token row
    tap.eq(n_tokens(), n0 + 1, "one token row added")
    tap.ok(row["access_token"] is None and row["refresh_token"] is None,
           "returned row has access_token and refresh_token NULL")
    tok = dmtest.token_json(conn, row["id"])
    pair = pair_for(tok["accessToken"]["value"])
    tap.ok(pair is not None, "stored access token is one the sandbox issued")
    if pair is None:
        return
    tap.eq(tok, {"accessToken": {"value": pair["access_token"], "expiry": pair["access_expires_on"]},
                 "refreshToken": {"value": pair["refresh_token"], "expiry": pair["refresh_expires_on"]},
                 "user": {"id": pair["user_id"]}, "consentid": pair["consentid"]},
           "digime_user_access_token is the SDK shape with the issued values (V90, V91)")
    tap.eq((row["user_id"], row["consent_id"], row["contract_id"], row["owner_role"]),
           (pair["user_id"], pair["consentid"], C1, "postgres"), "row: user_id = sub, consent_id, contract, owner")
    tap.eq((row["state"], row["account_reference"]), (state, params["accountReference"]),
           "row: state and account_reference of the callback")
    tap.eq(expiries(row["id"]), (pair["access_expires_on"], pair["refresh_expires_on"]),
           "expiry columns = the sandbox's expires_on seconds (V91)")
    tap.ok(abs(pair["access_expires_on"] - (t_cb + 86400)) < 30, "access token expires about now + 1 day")
    tap.ok(abs(pair["refresh_expires_on"] - (t_cb + 7 * 86400)) < 30, "refresh token expires about now + 7 days")
    tap.ok(row["refreshed_at"] is None, "refreshed_at NULL on a fresh token")
    done = q(conn, "SELECT status, code_verifier IS NULL, token_id, completed_at IS NOT NULL "
                   "FROM digime.authorizations WHERE state = %s", (state,))
    tap.eq(done, [("completed", True, row["id"], True)], "authorization completed, verifier cleared, token linked")
    S["id1"] = row["id"]
    S["user1"] = pair["user_id"]
    S["loc1"] = location


@tap.test
def service_and_session_options():
    s0 = sb.last_seq()
    url, _, _ = dmtest.authorize(conn, C1, state="svc-30", service_id=30)
    pre = last_code("preauthorization_code")
    tap.eq(url, ONBOARD + "authorize?code=%s&sourceType=pull&service=30" % pre, "service_id 30 -> service=30 (V61)")
    opts = {"pull": {"limits": {"duration": {"sourceFetch": 6}}, "scope": {"timeRanges": [{"last": "6y"}]}}}
    dmtest.authorize(conn, C1, state="sess-opts", session_options=opts)
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq(len(recs), 2, "two authorize requests")
    body = json.loads(recs[1]["body"])
    tap.eq(body.get("actions"), opts, "actions = session_options (V41)")
    tap.eq(set(body), {"agent", "actions"}, "body has agent and actions only")
    tap.ok("actions" not in json.loads(recs[0]["body"]), "no actions without session_options (V40)")
    # digime refuses unknown session_options keys (stricter than V131); nothing is sent
    s1 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                      "session_options => '{\"push\": 1}')", (C1,))
    tap.eq(err and err[0], "22023", "unknown session_options key -> 22023")
    tap.eq(dmtest.api_records(sb, s1), [], "nothing sent for invalid arguments")


@tap.test
def second_contract_same_user():
    id1 = S["id1"]
    at1 = dmtest.token_json(conn, id1)["accessToken"]["value"]
    s0 = sb.last_seq()
    url, _, _ = dmtest.authorize(conn, C2, callback="https://cb.example/second", state="second-1",
                                 user_token_id=id1)
    recs = dmtest.api_records(sb, s0, "oauth/authorize")
    tap.eq(len(recs), 1, "one authorize request (token still valid: no refresh)")
    tap.eq(dmtest.api_records(sb, s0, "oauth/token"), [], "no refresh for a valid token")
    check_client_jwt(recs[0], KEY2, V30 | {"access_token"}, "second-contract authorize JWT")
    c = recs[0]["jwt"]["claims"]
    tap.ok(c["access_token"] == at1, "access_token claim = the first token's access token (V30, V17)")
    tap.eq(c["client_id"], APP + "_" + C2, "client_id of the second contract")
    tap.ok(at1 not in json.dumps(recs[0]["headers"]).replace(recs[0]["jwt"]["raw"], ""),
           "the access token travels only inside the JWT (V17)")
    row = handle_callback(sb.follow(url))
    tap.ok(row["id"] != id1, "a new token row for the second contract")
    tap.eq((row["contract_id"], row["user_id"]), (C2, S["user1"]), "same digi.me user, second contract")
    S["id2"] = row["id"]


@tap.test
def refresh_before_authorize():
    id1 = S["id1"]
    old = dmtest.token_json(conn, id1)
    # the stored expiry says the access token is (nearly) dead: digime refreshes first
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() - interval '1 minute' "
            "WHERE id = %s", (id1,))
    s0 = sb.last_seq()
    t0 = time.time()
    dmtest.authorize(conn, C1, state="refresh-1", user_token_id=id1)
    recs = [r for r in dmtest.api_records(sb, s0) if r["endpoint"] != "jwks"]
    tap.eq([(r["endpoint"], r["status"]) for r in recs], [("oauth/token", 201), ("oauth/authorize", 201)],
           "sequence: POST oauth/token (refresh), then POST oauth/authorize")
    if len(recs) != 2:
        return
    check_client_jwt(recs[0], KEY1, V33, "refresh JWT")
    rc = recs[0]["jwt"]["claims"]
    tap.ok(rc["grant_type"] == "refresh_token" and rc["refresh_token"] == old["refreshToken"]["value"],
           "refresh sends grant_type refresh_token and the stored refresh token (V33)")
    tap.eq((recs[0]["headers"].get("content-length"), recs[0]["body"]), ("0", ""),
           "refresh is a POST with Content-Length 0 and no body (V42)")
    new = dmtest.token_json(conn, id1)
    tap.ok(new["accessToken"]["value"] != old["accessToken"]["value"]
           and new["refreshToken"]["value"] != old["refreshToken"]["value"],
           "both tokens replaced (V93)")
    tap.ok(recs[1]["jwt"]["claims"].get("access_token") == new["accessToken"]["value"],
           "authorize carries the NEW access token")
    pair = pair_for(new["accessToken"]["value"])
    tap.ok(pair is not None and expiries(id1) == (pair["access_expires_on"], pair["refresh_expires_on"])
           and new["refreshToken"]["value"] == pair["refresh_token"],
           "row holds the sandbox's new pair and expiries")
    r = row_dict("SELECT refreshed_at, extract(epoch FROM refreshed_at) AS e, updated_at "
                 "FROM digime.user_tokens WHERE id = %s", (id1,))
    tap.ok(r["refreshed_at"] is not None and abs(float(r["e"]) - t0) < 10, "refreshed_at set to now")
    S["refreshed_at"] = r["refreshed_at"]


@tap.test
def refresh_after_401():
    id1 = S["id1"]
    old = dmtest.token_json(conn, id1)
    # expired on the sandbox only: the row still says valid
    sb.expire(access_token=old["accessToken"]["value"])
    s0 = sb.last_seq()
    dmtest.authorize(conn, C1, state="refresh-2", user_token_id=id1)
    recs = [r for r in dmtest.api_records(sb, s0) if r["endpoint"] != "jwks"]
    tap.eq([(r["endpoint"], r["status"], r["error_code"]) for r in recs],
           [("oauth/authorize", 401, "InvalidToken"), ("oauth/token", 201, None), ("oauth/authorize", 201, None)],
           "sequence: authorize 401 InvalidToken -> refresh -> authorize 201")
    new = dmtest.token_json(conn, id1)
    if len(recs) == 3:
        tap.ok(recs[0]["jwt"]["claims"].get("access_token") == old["accessToken"]["value"],
               "first authorize used the old access token")
        tap.ok(recs[1]["jwt"]["claims"].get("refresh_token") == old["refreshToken"]["value"],
               "refresh used the stored refresh token")
        tap.ok(recs[2]["jwt"]["claims"].get("access_token") == new["accessToken"]["value"]
               and new["accessToken"]["value"] != old["accessToken"]["value"],
               "retry used the new access token, which is stored")
    ra = q1(conn, "SELECT refreshed_at FROM digime.user_tokens WHERE id = %s", (id1,))
    tap.ok(ra is not None and ra > S["refreshed_at"], "refreshed_at advanced")


@tap.test
def refresh_rejected_then_reauthorize():
    id1 = S["id1"]
    old = dmtest.token_json(conn, id1)
    sb.expire(refresh_token=old["refreshToken"]["value"])
    err = error(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (id1,))
    tap.eq(err and err[0], "YD001", "refresh with a dead refresh token -> YD001")
    tap.eq(err and err[1], "digi.me API error InvalidToken: The token (refresh_token) is expired",
           "message names the API code and message")
    tap.match(err and err[2], r"^code: InvalidToken; message: The token \(refresh_token\) is expired; "
                              r"reference: [A-Za-z0-9]{32}; HTTP status: 401; call: oauth/token$",
              "DETAIL has code, message, reference, HTTP status")
    tap.match(err and err[3], r"digime_reauthorize_url\(%d, callback\)" % id1, "HINT names digime_reauthorize_url")
    tap.eq(dmtest.token_json(conn, id1), old, "row unchanged after the refused refresh")
    n0 = n_tokens()

    cb = "https://cb.example/reauth?y=2"
    s0 = sb.last_seq()
    row = q(conn, "SELECT url, code_verifier, session FROM digime.digime_reauthorize_url(%s, %s, %s, "
                  "locale => 'de', trigger_query => true)", (id1, cb, "reauth-state"))[0]
    url, verifier, session = row
    dmtest.record_secret(verifier)
    ref = last_code("reference_code")
    tap.eq(url, ONBOARD + "user-reauth?code=%s&lng=de&triggerQuery=true" % ref,
           "reauthorize URL: {onboard}user-reauth?code&lng&triggerQuery, in that order (V75)")
    recs = dmtest.api_records(sb, s0, "oauth/token/reference")
    tap.eq(len(recs), 1, "one POST oauth/token/reference, no refresh first")
    tap.eq(dmtest.api_records(sb, s0, "oauth/token"), [], "no refresh attempted")
    if recs:
        check_client_jwt(recs[0], KEY1, V34 | {"state"}, "reauthorize JWT")
        c = recs[0]["jwt"]["claims"]
        tap.ok(c["access_token"] == old["accessToken"]["value"], "reauthorize sends the stored access token")
        tap.eq((c["redirect_uri"], c["state"], c["code_challenge"]), (cb, "reauth-state", dmtest.s256(verifier)),
               "redirect_uri, state and code_challenge of the returned verifier (V34, V21)")
        tap.eq(json.loads(recs[0]["body"])["agent"]["sdk"]["name"], AGENT_NAME, "agent body sent")
    location = sb.follow(url)
    params = callback_params(location)
    tap.eq([n for n, _ in dmtest.query_pairs(location)], ["y", "success", "state", "code"],
           "reauth callback: success, state, code (V141)")
    before = row_dict("SELECT updated_at, refreshed_at, state FROM digime.user_tokens WHERE id = %s", (id1,))
    res = handle_callback(location)
    tap.eq(res["id"], id1, "the callback updates the same token row")
    tap.eq(n_tokens(), n0, "no new token row")
    new = dmtest.token_json(conn, id1)
    pair = pair_for(new["accessToken"]["value"])
    tap.ok(pair is not None and new["accessToken"]["value"] != old["accessToken"]["value"]
           and new["refreshToken"]["value"] == pair["refresh_token"]
           and expiries(id1) == (pair["access_expires_on"], pair["refresh_expires_on"]),
           "new token pair and expiries stored")
    # the token keeps the state of the authorization that created it
    tap.eq((res["user_id"], res["state"], res["consent_id"]), (S["user1"], before["state"], pair and pair["consentid"]),
           "same user, original state, consent kept")
    tap.ok(before["state"] != "reauth-state", "the original state differs from the reauthorization's")
    after = row_dict("SELECT updated_at, refreshed_at FROM digime.user_tokens WHERE id = %s", (id1,))
    tap.ok(after["updated_at"] > before["updated_at"] and after["refreshed_at"] == before["refreshed_at"],
           "updated_at advanced; refreshed_at untouched (not a refresh grant)")
    tap.eq(q(conn, "SELECT kind, status, token_id FROM digime.authorizations WHERE state = 'reauth-state'"),
           [("reauthorize", "completed", id1)], "reauthorization completed and linked to the row")
    tap.eq(params.get("state"), "reauth-state", "state echoed")


@tap.test
def reauthorize_revoked_meanwhile():
    """A token revoked while its reauthorization is under way stays revoked: the pair digi.me
    issues for the reauthorization is stored in a new row."""
    tok = dmtest.full_authorization(conn, sb, C1, state="revoked-meanwhile")
    tid = tok["id"]
    url = q1(conn, "SELECT url FROM digime.digime_reauthorize_url(%s, %s, %s)",
             (tid, "https://cb.example/reauth", "revoked-meanwhile-re"))
    location = sb.follow(url)
    dmtest.revoke_token(conn, tid)
    res = handle_callback(location)
    tap.ok(res["id"] != tid, "the callback stores the new pair in a new row (%s, not %s)" % (res["id"], tid))
    tap.eq(q(conn, "SELECT status, access_token IS NULL FROM digime.user_tokens WHERE id = %s", (tid,)),
           [("revoked", True)], "the revoked token stays revoked, without secrets")
    new = dmtest.token_json(conn, res["id"])
    pair = pair_for(new["accessToken"]["value"])
    tap.ok(pair is not None and pair["state"] == "valid", "the new row holds the pair digi.me issued")


@tap.test
def exchange_code_low_level():
    url, verifier, _ = dmtest.authorize(conn, C1, state="low-level-1")
    location = sb.follow(url)
    code = callback_params(location)["code"]
    n0 = n_tokens()
    s0 = sb.last_seq()
    row = row_dict("SELECT * FROM digime.digime_exchange_code(%s, %s, %s)", (C1, code, verifier))
    recs = dmtest.api_records(sb, s0, "oauth/token")
    tap.ok(len(recs) == 1 and recs[0]["jwt"]["claims"].get("code") == code
           and recs[0]["jwt"]["claims"].get("code_verifier") == verifier and recs[0]["status"] == 201,
           "digime_exchange_code sends the given code and verifier (V32)")
    tap.eq(n_tokens(), n0 + 1, "a token row is stored")
    tok = dmtest.token_json(conn, row["id"])
    pair = pair_for(tok["accessToken"]["value"])
    tap.ok(pair is not None and row["user_id"] == pair["user_id"] and row["access_token"] is None,
           "row holds the issued token; secret columns NULL in the result")
    tap.eq((row["state"], row["account_reference"]), (None, None), "low-level path stores no state/account reference")
    # Observed: the low-level exchange does not touch digime.authorizations, so the
    # authorization stays pending; its callback then fails because the code is used up.
    tap.eq(q(conn, "SELECT status FROM digime.authorizations WHERE state = 'low-level-1'"), [("pending",)],
           "the pending authorization is still pending after digime_exchange_code")
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (location,))
    tap.ok(err is not None and err[0] == "YD007" and "already been used" in err[1],
           "handling that callback afterwards: YD007 InvalidGrant (code already used)", err)
    tap.eq(n_tokens(), n0 + 1, "no second row")


def vec_url(state, **opts):
    """digime_authorize_url with opts; returns the query after {onboard}authorize?."""
    url, _, _ = dmtest.authorize(conn, C1, state=state, **opts)
    prefix = ONBOARD + "authorize?"
    tap.ok(url.startswith(prefix), "%s: URL starts with {onboard}authorize?" % state, url)
    return url[len(prefix):]


@tap.test
def onboarding_url_vectors():
    # V63, full example: fix the codes the sandbox answers with
    sb.fault(endpoint="oauth/authorize", action="token", payload_patch={"preauthorization_code": "pre-auth-code-1"})
    sb.fault(endpoint="reference", action="body", patch={"id": "storage-or-account-ref-1"})
    s0 = sb.last_seq()
    url, _, _ = dmtest.authorize(
        conn, C1, state="v63", source_type="push", service_id=30,
        sample_data={"dataSet": "default", "autoOnboard": True}, locale="nl",
        include_sample_data_only_sources=False, storage_id="STORAGE-1", trigger_query=False,
        sources_scope={"dataType": ["gp-data", "images"], "organizationType": "hospital"})
    tap.eq(url, ONBOARD + "authorize?code=pre-auth-code-1&sourceType=push&service=30&sampleDataSet=default"
                "&sampleDataAutoOnboard=true&lng=nl&includeSampleDataOnlySources=false"
                "&storageRef=storage-or-account-ref-1&triggerQuery=false&sourcesScope=%257B%2522dataType%2522"
                "%253A%255B%2522gp-data%2522%252C%2522images%2522%255D%252C%2522organizationType%2522%253A"
                "%2522hospital%2522%257D", "V63 full example, byte for byte")
    recs = dmtest.api_records(sb, s0)
    tap.eq([r["endpoint"] for r in recs if r["endpoint"] != "jwks"], ["oauth/authorize", "reference"],
           "order: POST oauth/authorize, then POST reference (V50)")
    ref = [r for r in recs if r["endpoint"] == "reference"]
    if ref:
        tap.eq(ref[0]["body"], '{"type":"cloudId","value":"STORAGE-1"}', "reference body (V43)")
        tap.eq(set(ref[0]["jwt"]["claims"]), V37, "reference claims: client_id, nonce, timestamp (V37)")
        tap.eq(ref[0]["headers"].get("content-type"), "application/json", "reference Content-Type json")
    tap.eq(sb.faults(), [], "both faults used")

    tap.eq(vec_url("v64-push", source_type="push").split("&")[1], "sourceType=push", "sourceType push (V64)")
    tap.eq(vec_url("v65", locale="en-GB").split("&")[2:], ["lng=en-GB"], "locale en-GB -> lng=en-GB (V65)")
    tap.eq(vec_url("v65-null").split("&")[2:], [], "no locale -> no lng (V65)")
    e = error(conn, "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'v65-e', locale => '')", (C1,))
    tap.eq(e and e[0], "22023", "locale '' is refused (SDK drops it; digime is stricter)")
    tap.eq(vec_url("v66-a", sample_data={"dataSet": "my set"}).split("&")[2:], ["sampleDataSet=my+set"],
           "sampleData {dataSet:'my set'} -> sampleDataSet=my+set (V66)")
    tap.eq(vec_url("v66-b", sample_data={"dataSet": "", "autoOnboard": False}).split("&")[2:], [],
           "sampleData {dataSet:'', autoOnboard:false} -> nothing (V66)")
    tap.eq(vec_url("v66-c", sample_data={"dataSet": "", "autoOnboard": True}).split("&")[2:],
           ["sampleDataAutoOnboard=true"], "sampleData {dataSet:'', autoOnboard:true} -> only autoOnboard (V66)")
    tap.eq(vec_url("v67-a", include_sample_data_only_sources=True, trigger_query=True).split("&")[2:],
           ["includeSampleDataOnlySources=true", "triggerQuery=true"], "booleans true (V67)")
    tap.eq(vec_url("v67-b", include_sample_data_only_sources=False, trigger_query=False).split("&")[2:],
           ["includeSampleDataOnlySources=false", "triggerQuery=false"], "booleans false (V67)")
    v68 = vec_url("v68", sources_scope={"dataType": ["gp-data"]}).split("&")[2:]
    tap.eq(v68, ["sourcesScope=%257B%2522dataType%2522%253A%255B%2522gp-data%2522%255D%257D"],
           "sourcesScope double encoded (V68)")
    once = dict(dmtest.query_pairs("?" + "&".join(v68))).get("sourcesScope")
    tap.eq(once, "%7B%22dataType%22%3A%5B%22gp-data%22%5D%7D", "decoded once (V68)")
    tap.eq(urllib.parse.unquote(once or ""), '{"dataType":["gp-data"]}', "decoded twice (V68)")
    tap.eq(vec_url("v69-a", sources_scope={}).split("&")[2:], ["sourcesScope=%257B%257D"], "sourcesScope {} (V69)")
    tap.eq(vec_url("v69-b", sources_scope={"organizationType": "general-practitioner"}).split("&")[2:],
           ["sourcesScope=%257B%2522organizationType%2522%253A%2522general-practitioner%2522%257D"],
           "sourcesScope organizationType (V69)")
    # V70 cannot hold: sources_scope is jsonb, which stores keys shorter-first, so the
    # caller's order {organizationType, dataType} comes out as {dataType, organizationType}.
    tap.eq(vec_url("v70", sources_scope={"organizationType": "hospital", "dataType": ["documents"]}).split("&")[2:],
           ["sourcesScope=%257B%2522dataType%2522%253A%255B%2522documents%2522%255D%252C%2522organizationType"
            "%2522%253A%2522hospital%2522%257D"], "V70 input: jsonb key order (dataType first), not the caller's")

    # V71: form encoding of the code and the storageRef
    sb.fault(endpoint="oauth/authorize", action="token", payload_patch={"preauthorization_code": "a b+c/d=e~f"})
    sb.fault(endpoint="reference", action="body", patch={"id": "ref 1/2"})
    url, _, _ = dmtest.authorize(conn, C1, state="v71", storage_id="S-71")
    tap.eq(url, ONBOARD + "authorize?code=a+b%2Bc%2Fd%3De%7Ef&sourceType=pull&storageRef=ref+1%2F2",
           "code a b+c/d=e~f -> a+b%2Bc%2Fd%3De%7Ef, storageRef ref 1/2 -> ref+1%2F2 (V71)")
    ok = True
    try:
        sb.follow(url)
    except RuntimeError:
        ok = False
    tap.ok(ok, "the onboarding page decodes that code back to the one it issued")


@tap.test
def supersede_and_replay():
    n0 = n_tokens()
    url1, _, _ = dmtest.authorize(conn, C1, state="dup-state")
    url2, _, _ = dmtest.authorize(conn, C1, state="dup-state")
    tap.eq(q(conn, "SELECT status, code_verifier IS NULL FROM digime.authorizations "
                   "WHERE state = 'dup-state' ORDER BY id"),
           [("superseded", True), ("pending", False)], "older authorization superseded, verifier dropped")
    loc1 = sb.follow(url1)
    callback_params(loc1)
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc1,))
    tap.eq(err and err[0], "YD023", "callback of the superseded authorization -> YD023")
    tap.eq(err and err[1], "the callback belongs to an authorization that was superseded", "YD023 message")
    tap.eq(n_tokens(), n0, "no token row from the superseded callback")
    loc2 = sb.follow(url2)
    callback_params(loc2)
    row = handle_callback(loc2)
    tap.ok(row is not None and row["state"] == "dup-state", "the newer authorization completes")
    tap.eq(n_tokens(), n0 + 1, "one token row")
    s0 = sb.last_seq()
    again = handle_callback(loc2)
    tap.eq(again, row, "the same callback again returns the same token row (an idempotent retry)")
    tap.eq(dmtest.api_records(sb, s0), [], "a retry sends nothing")
    tap.eq(n_tokens(), n0 + 1, "no row from the retry")
    # another code for the completed state: YD022
    other = loc2.replace("code=", "code=x")
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (other,))
    tap.eq(err and err[0], "YD022", "a completed authorization with another code -> YD022")
    tap.match(err and err[1], r"^authorization \d+ was already completed$", "YD022 message")
    tap.eq(dmtest.api_records(sb, s0), [], "a replay sends nothing")
    # the first flow's callback: completed before 1.1 stored code hashes? no: it returns its row too
    first = handle_callback(S["loc1"])
    tap.eq(first["id"], S["id1"], "first flow's callback again returns its token row")


@tap.test
def import_token():
    # V90 values; these are published test-vector strings, not secrets.
    sdk = {"accessToken": {"value": "sample-token", "expiry": 1000000},
           "refreshToken": {"value": "sample-refresh-token", "expiry": 1000000},
           "user": {"id": "test-user-id"}, "consentid": "test-consent-id"}
    s0 = sb.last_seq()
    row = row_dict("SELECT * FROM digime.digime_import_token(%s, %s)", (C1, json.dumps(sdk)))
    tap.eq(dmtest.api_records(sb, s0), [], "import sends nothing")
    tap.ok(row["access_token"] is None and row["refresh_token"] is None, "import result hides the secrets")
    tap.eq((row["user_id"], row["consent_id"], row["contract_id"], row["state"]),
           ("test-user-id", "test-consent-id", C1, None), "imported row columns")
    tap.eq(expiries(row["id"]), (1000000, 1000000), "expiries are seconds, unconverted (V91)")
    tap.eq(q1(conn, "SELECT digime.digime_user_access_token(%s)", (row["id"],)), sdk,
           "digime_user_access_token returns the imported SDK JSON (V90)")


@tap.test
def nonces_unique():
    nonces = [r["jwt"]["claims"]["nonce"] for r in dmtest.api_records(sb, SEQ0) if r["jwt"] is not None]
    tap.ok(len(nonces) > 20 and len(set(nonces)) == len(nonces),
           "all %d nonces of this file are distinct (V13)" % len(nonces))


tap.run()
