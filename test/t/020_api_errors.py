"""020_api_errors: every error family digime maps, with SQLSTATE, message, DETAIL and HINT.

API errors come from sandbox faults on oauth/authorize, oauth/token, oauth/token/reference,
reference and the JWKS. After each failure nothing may be left behind: no pending
authorization for a failed authorize, no token row for a failed exchange.
Vectors: /work/shared/digime-api-vectors.md (V..).
"""
import json
import os
import ssl
import sys
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from dmtest import error, q, q1  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
sb.reset(everything=True)
DB = "t020"
conn = dmtest.fresh_db(DB)

APP = dmtest.EXAMPLE_APP
C1 = dmtest.EXAMPLE_CONTRACT
C2 = dmtest.SECOND_CONTRACT
dmtest.add_example_contract(conn)
q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
  (C2, APP, dmtest.fixture_key("keys/second.pem")))
# every verification fetches the JWKS: "no JWKS request" below then means "not even tried"
q(conn, "SET digime.jwks_cache_ttl = 0")

CB = "https://cb.example/errors"
BASE = q1(conn, "SELECT current_setting('digime.base_url')")
JKU = BASE + "jwks/oauth"
PORT = int(os.environ["DM_SANDBOX_URL"].rsplit(":", 1)[1])
AGENT_NAME = q1(conn, "SELECT current_setting('digime.agent_name')")
REF = "3Wb9vDEsv4ODYKaoP6lQKCbZu9rnJ6UH"
SDK_HINT = "Set digime.agent_name and digime.agent_version to an SDK identity digi.me accepts."
_state = [0]


def next_state(prefix="s"):
    _state[0] += 1
    return "%s-%d" % (prefix, _state[0])


def n_auth():
    return q1(conn, "SELECT count(*) FROM digime.authorizations")


def n_tokens():
    return q1(conn, "SELECT count(*) FROM digime.user_tokens")


def no_secret(err, what):
    """No issued token/code/verifier in the message, DETAIL or HINT."""
    text = " ".join(x for x in (err or ()) if x)
    leaked = [s for s in sb.secrets()["values"] if s in text]
    tap.ok(not leaked, "%s: error text carries no secret" % what, leaked)


def api_detail(code, message, ref, status, call):
    return "code: %s; message: %s; reference: %s; HTTP status: %d; call: %s" % (code, message, ref, status, call)


def authorize_fails(what, faults, extra="", args=()):
    """digime_authorize_url after faults; checks nothing was stored. Returns (err, records)."""
    for f in faults:
        sb.fault(**f)
    a0 = n_auth()
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_authorize_url(%s, %s, %s" + extra + ")",
                (C1, CB, next_state("auth")) + tuple(args))
    recs = dmtest.api_records(sb, s0)
    tap.ok(err is not None, "%s: authorize fails" % what)
    tap.eq(n_auth(), a0, "%s: no authorization row added" % what)
    tap.eq(sb.faults(), [], "%s: fault consumed" % what)
    no_secret(err, what)
    return err, recs


def pending_callback(prefix="cb"):
    """A started authorization whose browser came back: (state, callback location)."""
    state = next_state(prefix)
    url, _, _ = dmtest.authorize(conn, C1, callback=CB, state=state)
    loc = sb.follow(url)
    dmtest.record_secret(dict(dmtest.query_pairs(loc)).get("code"))
    return state, loc


def callback_fails(what, faults, state_loc=None):
    """digime_handle_callback after faults on the exchange; checks nothing was stored."""
    state, loc = state_loc or pending_callback()
    for f in faults:
        sb.fault(**f)
    t0 = n_tokens()
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    recs = dmtest.api_records(sb, s0)
    tap.ok(err is not None, "%s: callback fails" % what)
    tap.eq(n_tokens(), t0, "%s: no token row added" % what)
    tap.eq(q(conn, "SELECT status FROM digime.authorizations WHERE state = %s", (state,)), [("pending",)],
           "%s: the authorization stays pending" % what)
    tap.eq(sb.faults(), [], "%s: fault consumed" % what)
    no_secret(err, what)
    return err, recs


def jwks_fetches(recs):
    return len([r for r in recs if r["endpoint"] == "jwks"])


# (HTTP status, API code, API message, SQLSTATE)
FAMILIES = [
    (401, "InvalidToken", "The token (access_token) is invalid", "YD001"),
    (401, "InvalidClient", "The client_id (%s_%s) is invalid" % (APP, C1), "YD002"),
    (404, "InvalidRedirectUri", "The redirect_uri (%s) is invalid" % CB, "YD003"),       # V100
    (403, "InsufficientScope", "The request requires higher privileges than provided by the access token", "YD004"),
    (400, "SDKInvalid", "The SDK is invalid: test", "YD005"),                             # V101
    (403, "SDKVersionInvalid", "This SDK version is no longer supported.", "YD005"),      # V101
    (511, "ServiceAuthorizationError", "Service authorization required", "YD006"),
    (400, "InvalidGrant", "The authorization code is invalid", "YD007"),
    (400, "ValidationErrors", "Parameter validation errors", "YD000"),
    (406, "InvalidRequest", "The nonce provided in JWT payload (abc) has already been used", "YD000"),
    (500, "SomethingNew", "An unknown failure", "YD000"),
]


# --------------------------------------------------------------------------
@tap.test
def api_error_families_on_authorize():
    for status, code, message, sqlstate in FAMILIES:
        what = "authorize %d %s" % (status, code)
        err, recs = authorize_fails(what, [dict(endpoint="oauth/authorize", action="error", status=status,
                                                code=code, message=message, reference=REF)])
        tap.eq(err and err[0], sqlstate, "%s -> %s" % (what, sqlstate))
        tap.eq(err and err[1], "digi.me API error %s: %s" % (code, message), "%s: message" % what)
        tap.eq(err and err[2], api_detail(code, message, REF, status, "oauth/authorize"),
               "%s: DETAIL has code, message, reference, HTTP status" % what)
        tap.eq(err and err[3], SDK_HINT if sqlstate == "YD005" else None, "%s: hint" % what)
        tap.eq([(r["endpoint"], r["status"]) for r in recs], [("oauth/authorize", status)],
               "%s: one request, not retried" % what)


@tap.test
def api_error_families_on_exchange():
    for status, code, message, sqlstate in FAMILIES:
        what = "exchange %d %s" % (status, code)
        err, recs = callback_fails(what, [dict(endpoint="oauth/token", action="error", status=status,
                                               code=code, message=message, reference=REF)])
        tap.eq(err and err[0], sqlstate, "%s -> %s" % (what, sqlstate))
        tap.eq(err and err[2], api_detail(code, message, REF, status, "oauth/token"), "%s: DETAIL" % what)
        tap.eq([r["endpoint"] for r in recs if r["endpoint"] != "jwks"], ["oauth/token"],
               "%s: one exchange request" % what)
    # the code was never consumed (faults act before the API): the same callback now completes
    state, loc = pending_callback()
    sb.fault(endpoint="oauth/token", action="error", status=400, code="ValidationErrors",
             message="Parameter validation errors")
    tap.eq((error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,)) or [None])[0], "YD000",
           "exchange refused once")
    row = q(conn, "SELECT state FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(row, [(state,)], "the same callback completes afterwards (nothing was half-done)")


@tap.test
def error_body_shapes():
    err, _ = authorize_fails("storage shape (V103)", [dict(
        endpoint="oauth/authorize", action="raw", status=400, content_type="application/json",
        body='{"error":"StorageErr","message":"storage message"}')])
    tap.eq(err and err[:3], ("YD000", "digi.me API error StorageErr: storage message",
                             api_detail("StorageErr", "storage message", "none", 400, "oauth/authorize")),
           "storage-shape body -> YD000 with its code and message, no reference (V103)")
    err, _ = authorize_fails("error and top-level message (V104)", [dict(
        endpoint="oauth/authorize", action="error", status=400, code="InvalidRequest", message="inner",
        reference="R", body_extra={"message": "top"})])
    tap.eq(err and err[:3], ("YD000", "digi.me API error InvalidRequest: inner",
                             api_detail("InvalidRequest", "inner", "R", 400, "oauth/authorize")),
           "API error object wins over a top-level message (SDK quirk V104 not copied)")
    err, _ = authorize_fails("X-Error-* headers", [dict(
        endpoint="oauth/authorize", action="raw", status=401, body="",
        headers={"X-Error-Code": "InvalidClient", "X-Error-Message": "The client_id (h) is invalid",
                 "X-Error-Reference": "HDRREF0123456789"})])
    tap.eq(err and err[:3], ("YD002", "digi.me API error InvalidClient: The client_id (h) is invalid",
                             api_detail("InvalidClient", "The client_id (h) is invalid", "HDRREF0123456789",
                                        401, "oauth/authorize")),
           "X-Error-Code/-Message/-Reference headers are mapped")
    err, _ = authorize_fails("empty JSON object (V102)", [dict(
        endpoint="oauth/authorize", action="raw", status=400, content_type="application/json", body="{}")])
    tap.eq(err and err[:3], ("YD010", "digi.me API answered oauth/authorize HTTP status 400 without an error code",
                             "HTTP status 400, Content-Type application/json, 2 bytes."),
           "400 {} -> YD010 (digime: no code, no mapping)")
    # V105: not mappable -> YD010 (the SDK leaks a raw HTTP error)
    q(conn, "SET digime.retry_limit = 0")  # 502 is retried otherwise (030_transport)
    html = "<html><body>Bad Gateway</body></html>"
    err, recs = authorize_fails("502 HTML (V105)", [dict(endpoint="oauth/authorize", action="raw", status=502,
                                                        content_type="text/html", body=html)])
    q(conn, "RESET digime.retry_limit")
    tap.eq(err and err[:3], ("YD010", "digi.me API answered oauth/authorize HTTP status 502 without an error code",
                             "HTTP status 502, Content-Type text/html, %d bytes." % len(html)),
           "502 HTML -> YD010 (V105)")
    err, _ = authorize_fails("empty 404 (V105)", [dict(endpoint="oauth/authorize", action="raw", status=404)])
    tap.eq(err and err[:3], ("YD010", "digi.me API answered oauth/authorize HTTP status 404 without an error code",
                             "HTTP status 404, Content-Type text/plain, 0 bytes."), "empty 404 -> YD010 (V105)")
    err, _ = authorize_fails("JSON array (V105)", [dict(endpoint="oauth/authorize", action="raw", status=400,
                                                       content_type="application/json", body='[{"error":"x"}]')])
    tap.eq(err and err[:2], ("YD010", "digi.me API answered oauth/authorize HTTP status 400 without an error code"),
           "400 JSON array -> YD010 (V105)")
    err, _ = authorize_fails("2xx non-JSON", [dict(endpoint="oauth/authorize", action="raw", status=201,
                                                  content_type="text/plain", body="created")])
    tap.eq(err and err[:3], ("YD010", "digi.me API answered oauth/authorize with a body that is not a JSON object",
                             "HTTP status 201, Content-Type text/plain, 7 bytes."), "201 text -> YD010")
    err, _ = authorize_fails("2xx JSON array", [dict(endpoint="oauth/authorize", action="raw", status=200,
                                                    content_type="application/json", body="[]")])
    tap.eq(err and err[0], "YD010", "200 [] -> YD010")


@tap.test
def response_token_failures():
    def case(what, fault, sqlstate, message, jwks, detail=None):
        err, recs = authorize_fails(what, [fault])
        tap.eq(err and err[0], sqlstate, "%s -> %s" % (what, sqlstate))
        tap.eq(err and err[1], message, "%s: message" % what)
        if detail is not None:
            tap.eq(err and err[2], detail, "%s: DETAIL" % what)
        tap.eq(jwks_fetches(recs), jwks, "%s: %d JWKS request(s)" % (what, jwks))

    vfail = "could not verify the digi.me API's answer: "
    case("token missing (V87)", dict(endpoint="oauth/authorize", action="body", remove=["token"]),
         "YD010", "digi.me API answered oauth/authorize without a token", 0)
    case("token not a JWT (V87)", dict(endpoint="oauth/authorize", action="body", patch={"token": "not-a-jwt"}),
         "YD010", "digi.me API answered with a token that is not a compact JWS", 0)
    case("corrupt signature", dict(endpoint="oauth/authorize", action="token", sign_with="corrupt"),
         "YD011", vfail + "the token's signature does not verify", 1)
    case("unlisted kid", dict(endpoint="oauth/authorize", action="token", sign_with="unlisted"),
         "YD011", vfail + "the token's kid is not in the JWKS", 1,
         'kid "sandbox-unlisted" is not among the 1 usable keys at %s.' % JKU)
    case("listed kid, wrong key", dict(endpoint="oauth/authorize", action="token", sign_with="unlisted",
                                       kid="sandbox-1"),
         "YD011", vfail + "the token's signature does not verify", 1)
    for jku in ("https://localhost:%d/v1.7/jwks/oauth" % PORT, "http://127.0.0.1:%d/v1.7/jwks/oauth" % PORT,
                "https://127.0.0.1:%d/v1.7/jwks/oauth" % dmtest.closed_port()):
        case("jku %s (V89)" % jku, dict(endpoint="oauth/authorize", action="token", jku=jku),
             "YD011", vfail + "the token's jku is not on the API's origin", 0,
             "jku %s is not on the origin of digime.base_url %s." % (jku, BASE))
    for hdr in ("jku", "kid"):
        case("no %s (V83)" % hdr, dict(endpoint="oauth/authorize", action="token", omit_header=[hdr]),
             "YD011", vfail + "the token header names no jku or no kid", 0)
    case("alg RS512 (V84)", dict(endpoint="oauth/authorize", action="token", alg="RS512"),
         "YD011", vfail + "the token is not signed with PS512", 0, "Header alg is RS512.")
    # alg none (empty signature segment): refused by its header, before any JWKS request
    case("alg none", dict(endpoint="oauth/authorize", action="token", alg="none"),
         "YD011", vfail + "the token is not signed with PS512", 0, "Header alg is none.")
    case("salt 32 (V86)", dict(endpoint="oauth/authorize", action="token", salt=32),
         "YD011", vfail + "the token's signature does not verify", 1)
    case("salt max (V86)", dict(endpoint="oauth/authorize", action="token", salt="max"),
         "YD011", vfail + "the token's signature does not verify", 1)
    case("exp in the past (V85)", dict(endpoint="oauth/authorize", action="token", exp=-60),
         "YD011", vfail + "the token has expired (exp)", 1)
    case("nbf in the future (V85)", dict(endpoint="oauth/authorize", action="token", nbf=300),
         "YD011", vfail + "the token is not valid yet (nbf)", 1)
    case("session missing (V88)", dict(endpoint="oauth/authorize", action="body", remove=["session"]),
         "YD010", "digi.me API answered oauth/authorize without a valid session", 1)
    case("session {} (V88)", dict(endpoint="oauth/authorize", action="body", patch={"session": {}}),
         "YD010", "digi.me API answered oauth/authorize without a valid session", 1)
    case("preauthorization_code missing (V74)",
         dict(endpoint="oauth/authorize", action="token", payload_remove=["preauthorization_code"]),
         "YD010", "digi.me API answered oauth/authorize without preauthorization_code", 1,
         'The response token has no non-empty string "preauthorization_code".')
    case("JWKS without keys (V82)", dict(endpoint="jwks", action="body", remove=["keys"]),
         "YD010", 'digi.me JWKS is not a JSON object with a "keys" array', 1, "GET %s" % JKU)
    case("JWKS 404", dict(endpoint="jwks", action="raw", status=404),
         "YD011", "could not fetch the digi.me JWKS", 1, "GET %s answered HTTP status 404." % JKU)

    # controls: salt 64 explicit, a future exp, and signed with the listed key are accepted (V85, V86)
    for fault in (dict(salt=64), dict(exp=300), dict(sign_with="listed")):
        sb.fault(endpoint="oauth/authorize", action="token", **fault)
        url = q1(conn, "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)", (C1, CB, next_state("ok")))
        tap.ok(url is not None, "accepted: token with %r" % fault)

    # V81: an entry with only pem removed still has n/e, which digime accepts (stronger than the SDK);
    # with neither pem nor n/e the kid has no usable key.
    ctx = ssl.create_default_context(cafile=os.environ["DM_CA_FILE"])
    jwk = json.load(urllib.request.urlopen(JKU, context=ctx))["keys"][0]
    ne = {k: v for k, v in jwk.items() if k != "pem"}
    sb.fault(endpoint="jwks", action="body", patch={"keys": [ne]})
    tap.ok(q1(conn, "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)", (C1, CB, next_state("ne")))
           is not None, "JWK with n/e and no pem verifies")
    bare = {k: v for k, v in jwk.items() if k in ("kid", "alg", "use")}
    err, _ = authorize_fails("JWK without pem and n/e (V81)", [dict(endpoint="jwks", action="body",
                                                                    patch={"keys": [bare]})])
    tap.eq(err and err[:3], ("YD011", "could not verify the digi.me API's answer: the token's kid is not in the JWKS",
                             'kid "sandbox-1" is not among the 0 usable keys at %s.' % JKU),
           "JWK without a key -> YD011 (V81)")


@tap.test
def reference_failures():
    err, recs = authorize_fails("reference without id (V73)",
                                [dict(endpoint="reference", action="body", remove=["id"])],
                                ", storage_id => %s", ("STORAGE-1",))
    tap.eq(err and err[:3], ("YD010", "digi.me API answered reference without id",
                             'The answer has no non-empty string "id".'), "reference answer without id -> YD010 (V73)")
    tap.eq([r["endpoint"] for r in recs if r["endpoint"] != "jwks"], ["oauth/authorize", "reference"],
           "authorize, then reference")
    err, _ = authorize_fails("reference error", [dict(endpoint="reference", action="error", status=400,
                                                      code="ValidationErrors", message="Parameter validation errors",
                                                      reference=REF)],
                             ", storage_id => %s", ("STORAGE-1",))
    tap.eq(err and err[:3], ("YD000", "digi.me API error ValidationErrors: Parameter validation errors",
                             api_detail("ValidationErrors", "Parameter validation errors", REF, 400, "reference")),
           "reference error -> YD000 naming call reference")


@tap.test
def token_answer_failures():
    def case(what, fault, sqlstate, message):
        err, recs = callback_fails(what, [fault])
        tap.eq(err and err[0], sqlstate, "%s -> %s" % (what, sqlstate))
        tap.eq(err and err[1], message, "%s: message reaches the client unaltered" % what)

    case("token answer without token (V87)", dict(endpoint="oauth/token", action="body", remove=["token"]),
         "YD010", "digi.me API answered oauth/token without a token")
    case("token answer corrupt signature", dict(endpoint="oauth/token", action="token", sign_with="corrupt"),
         "YD011", "could not verify the digi.me API's answer: the token's signature does not verify")
    case("token answer jku elsewhere",
         dict(endpoint="oauth/token", action="token", jku="https://localhost:%d/v1.7/jwks/oauth" % PORT),
         "YD011", "could not verify the digi.me API's answer: the token's jku is not on the API's origin")
    case("payload without access_token (V92: digime fails)",
         dict(endpoint="oauth/token", action="token", payload_remove=["access_token"]),
         "YD010", "digi.me API answered oauth/token without access_token")
    case("payload without refresh_token",
         dict(endpoint="oauth/token", action="token", payload_remove=["refresh_token"]),
         "YD010", "digi.me API answered oauth/token without refresh_token")
    case("expires_on in milliseconds",
         dict(endpoint="oauth/token", action="token",
              payload_patch={"access_token": {"value": "at-ms-test", "expires_on": 1796111970000}}),
         "YD010", "digi.me API answered oauth/token with an invalid access_token.expires_on")
    case("non-string sub", dict(endpoint="oauth/token", action="token", payload_patch={"sub": 5}),
         "YD010", "digi.me API answered oauth/token with a non-string sub or consentid")


@tap.test
def refresh_errors_and_scrubbing():
    row = dmtest.full_authorization(conn, sb, C1, state=next_state("base"))
    tid = row["id"]
    tok = dmtest.token_json(conn, tid)
    rt = tok["refreshToken"]["value"]
    hint = ("The refresh token of user access token %d is no longer valid: the user must reauthorize, "
            "see digime_reauthorize_url(%d, callback)." % (tid, tid))
    for status, code, sqlstate, want_hint, health in (
            (401, "InvalidToken", "YD001", hint, ("needs_reauthorization", "YD001", 0)),
            (400, "InvalidGrant", "YD007", hint, ("needs_reauthorization", "YD007", 0)),
            (500, "SomethingNew", "YD000", None, ("active", "YD000", 1))):
        # the API's message quotes the refresh token: digime must not repeat it
        msg = "The token (%s) is invalid" % rt
        sb.fault(endpoint="oauth/token", action="error", status=status, code=code, message=msg, reference=REF)
        err = error(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (tid,))
        tap.eq(err and err[0], sqlstate, "refresh %s -> %s" % (code, sqlstate))
        tap.eq(err and err[1], "digi.me API error %s: The token ([redacted]) is invalid" % code,
               "refresh %s: the refresh token in the API message is redacted" % code)
        tap.eq(err and err[2], api_detail(code, "The token ([redacted]) is invalid", REF, status, "oauth/token"),
               "refresh %s: DETAIL redacted too" % code)
        tap.eq(err and err[3], want_hint, "refresh %s: hint" % code)
        no_secret(err, "refresh %s" % code)
        tap.eq(q(conn, "SELECT status, last_error_sqlstate, refresh_failures FROM digime.user_tokens "
                       "WHERE id = %s", (tid,)), [health], "refresh %s: token health %s" % (code, health[0]))
        tap.eq(q1(conn, "SELECT last_error FROM digime.user_tokens WHERE id = %s", (tid,)),
               "digi.me API error %s: The token ([redacted]) is invalid" % code,
               "refresh %s: last_error is the message, redacted" % code)
        # the next case starts from a healthy token again
        q(conn, "UPDATE digime.user_tokens SET status = 'active', refresh_failures = 0, "
                "next_refresh_at = NULL WHERE id = %s", (tid,))
    tap.eq(dmtest.token_json(conn, tid), tok, "row unchanged by failed refreshes")

    # the exchange: an API message quoting the code and the verifier
    state = next_state("scrub")
    url, verifier, _ = dmtest.authorize(conn, C1, callback=CB, state=state)
    loc = sb.follow(url)
    code = dict(dmtest.query_pairs(loc))["code"]
    dmtest.record_secret(code)
    err, _ = callback_fails("exchange message with secrets", [dict(
        endpoint="oauth/token", action="error", status=400, code="InvalidGrant",
        message="code %s verifier %s" % (code, verifier), reference=REF)], (state, loc))
    tap.eq(err and err[1], "digi.me API error InvalidGrant: code [redacted] verifier [redacted]",
           "code and code_verifier redacted from the API message")

    # reauthorize (oauth/token/reference) 401: no refresh is attempted (V125)
    sb.fault(endpoint="oauth/token/reference", action="error", status=401, code="InvalidToken",
             message="The token (access_token) is invalid", reference=REF)
    a0 = n_auth()
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_reauthorize_url(%s, %s, %s)", (tid, CB, next_state("re")))
    tap.eq(err and err[:3], ("YD001", "digi.me API error InvalidToken: The token (access_token) is invalid",
                             api_detail("InvalidToken", "The token (access_token) is invalid", REF, 401,
                                        "oauth/token/reference")), "reauthorize 401 -> YD001")
    tap.eq([r["endpoint"] for r in dmtest.api_records(sb, s0)], ["oauth/token/reference"],
           "reauthorize: no refresh, no retry (V125)")
    tap.eq(n_auth(), a0, "reauthorize failure leaves no authorization row")


@tap.test
def authorize_with_token_401():
    row = dmtest.full_authorization(conn, sb, C1, state=next_state("base"))
    tid = row["id"]
    tok = dmtest.token_json(conn, tid)
    # 401 InvalidClient: not a token problem, no refresh (V121)
    err, recs = authorize_fails("401 InvalidClient with user token", [dict(
        endpoint="oauth/authorize", action="error", status=401, code="InvalidClient",
        message="The client_id (x) is invalid", reference=REF)], ", user_token_id => %s", (tid,))
    tap.eq(err and err[0], "YD002", "401 InvalidClient -> YD002")
    tap.eq([r["endpoint"] for r in recs], ["oauth/authorize"], "no refresh after 401 InvalidClient (V121)")
    tap.eq(dmtest.token_json(conn, tid), tok, "row unchanged")
    # 401 InvalidToken twice: one refresh, one retry, then the mapped error (unlike V123)
    err, recs = authorize_fails("401 InvalidToken twice", [dict(
        endpoint="oauth/authorize", action="error", status=401, code="InvalidToken",
        message="The token (access_token) is invalid", reference=REF, count=2)], ", user_token_id => %s", (tid,))
    tap.eq(err and err[0], "YD001", "second 401 InvalidToken -> YD001")
    tap.eq([(r["endpoint"], r["status"]) for r in recs if r["endpoint"] != "jwks"],
           [("oauth/authorize", 401), ("oauth/token", 201), ("oauth/authorize", 401)],
           "sequence: authorize 401 -> refresh -> authorize 401, no second refresh")
    # The refresh succeeded and rotated the pair at the API (the old pair is dead now):
    # the new pair must not be lost with the failed statement.
    now = dmtest.token_json(conn, tid)
    states = {p["refresh_token"]: p["refresh_state"] for p in sb.tokens()}
    tap.eq(states.get(now["refreshToken"]["value"]), "valid",
           "stored refresh token is still valid at the API after the failed authorize (refreshed pair kept)")
    err = error(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (tid,))
    tap.ok(err is None, "the stored token can still be refreshed", err)

    # Same with the refresh before sending (stored expiry passed) and an authorize refused for
    # another reason (404 InvalidRedirectUri): the refresh's new pair must survive.
    row = dmtest.full_authorization(conn, sb, C1, state=next_state("base"))
    tid = row["id"]
    q(conn, "UPDATE digime.user_tokens SET access_token_expires_at = now() - interval '1 minute' "
            "WHERE id = %s", (tid,))
    err, recs = authorize_fails("refresh, then 404 InvalidRedirectUri", [dict(
        endpoint="oauth/authorize", action="error", status=404, code="InvalidRedirectUri",
        message="The redirect_uri (%s) is invalid" % CB, reference=REF)], ", user_token_id => %s", (tid,))
    tap.eq(err and err[0], "YD003", "authorize after refresh refused -> YD003")
    tap.eq([(r["endpoint"], r["status"]) for r in recs if r["endpoint"] != "jwks"],
           [("oauth/token", 201), ("oauth/authorize", 404)], "sequence: refresh 201, authorize 404")
    now = dmtest.token_json(conn, tid)
    states = {p["refresh_token"]: p["refresh_state"] for p in sb.tokens()}
    tap.eq(states.get(now["refreshToken"]["value"]), "valid",
           "stored refresh token still valid at the API after refresh + failed authorize")


@tap.test
def sdk_identity():
    try:
        sb.config(sdk_blocklist=[AGENT_NAME])
        err, _ = authorize_fails("SDK name blocked", [])
        tap.eq(err and err[0], "YD005", "blocked agent name -> YD005")
        tap.eq(err and err[1], "digi.me API error SDKInvalid: The SDK is invalid: %s" % AGENT_NAME, "SDKInvalid message")
        tap.match(err and err[3], r"digime\.agent_name", "HINT names digime.agent_name")
        q(conn, "SET digime.agent_name = 't020-agent'")
        s0 = sb.last_seq()
        url = q1(conn, "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)", (C1, CB, next_state("sdk")))
        recs = dmtest.api_records(sb, s0, "oauth/authorize")
        tap.ok(url is not None and json.loads(recs[0]["body"])["agent"]["sdk"]["name"] == "t020-agent",
               "after SET digime.agent_name the call works and sends the new name")
        q(conn, "RESET digime.agent_name")
        sb.config(sdk_blocklist=[], min_sdk_version="999.0")
        err, _ = authorize_fails("SDK version too old", [])
        tap.eq(err and err[:2], ("YD005", "digi.me API error SDKVersionInvalid: This SDK version is no longer supported."),
               "version below the minimum -> YD005 SDKVersionInvalid")
        tap.match(err and err[3], r"digime\.agent_version", "HINT names digime.agent_version")
        q(conn, "SET digime.agent_version = '999.1'")
        tap.ok(q1(conn, "SELECT url FROM digime.digime_authorize_url(%s, %s, %s)", (C1, CB, next_state("sdk")))
               is not None, "after SET digime.agent_version the call works")
        q(conn, "RESET digime.agent_version")
        sb.config(min_sdk_version=None)
    finally:
        q(conn, "RESET digime.agent_name; RESET digime.agent_version")
        sb.config(sdk_blocklist=[], min_sdk_version=None)


@tap.test
def callback_errors():
    # YD020: the onboarding app reports failure
    state = next_state("fail")
    url, _, _ = dmtest.authorize(conn, C1, callback=CB, state=state)
    sb.fault(endpoint="onboard", error_code="ConsentDeclined", with_state=True)
    loc = sb.follow(url)
    t0 = n_tokens()
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(err and err[:3], ("YD020", "digi.me authorization failed: ConsentDeclined",
                             'The callback reported success=false, errorCode "ConsentDeclined".'),
           "success=false -> YD020 with the errorCode (V140)")
    tap.eq((n_tokens(), dmtest.api_records(sb, s0)), (t0, []), "nothing sent, no row")
    # Observed: the failed authorization stays pending (it expires with digime.authorization_ttl).
    tap.eq(q(conn, "SELECT status FROM digime.authorizations WHERE state = %s", (state,)), [("pending",)],
           "authorization left pending after success=false")
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (CB + "?success=false",))
    tap.eq(err and err[:2], ("YD020", "digi.me authorization failed: no errorCode"), "success=false without errorCode")

    # YD021: callback after digime.authorization_ttl
    state, loc = pending_callback("late")
    q(conn, "UPDATE digime.authorizations SET expires_at = now() - interval '1 second' WHERE state = %s", (state,))
    s0 = sb.last_seq()
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(err and err[0], "YD021", "late callback -> YD021")
    tap.match(err and err[1], r"^authorization \d+ has expired$", "YD021 message")
    tap.eq(err and err[3], "Start a new authorization.", "YD021 hint")
    tap.eq((n_tokens(), dmtest.api_records(sb, s0)), (t0, []), "expired: nothing sent, no row")

    # YD022 / YD023 are exercised in 010_flow; malformed callbacks:
    for url, msg in ((CB + "?success=true&code=c1", 'callback URL has no "state" parameter'),
                     (CB + "?success=true&state=" + state, 'callback URL has no "code" parameter'),
                     (CB + "?success=maybe", 'callback URL has success="maybe"; "true" or "false" expected'),
                     (CB + "?success=true&state=a&state=b&code=c1", 'callback URL has more than one "state" parameter'),
                     (CB + "?state=a", 'callback URL has no "success" parameter')):
        err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (url,))
        tap.eq(err and err[:2], ("22023", msg), "bad callback: %s" % msg)
    err = error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (CB + "?success=true&state=nobody&code=c1",))
    tap.eq(err and err[:2], ("42501", 'no authorization of role "postgres" has the callback\'s state'),
           "unknown state -> 42501")


@tap.test
def bad_arguments():
    s0 = sb.last_seq()
    a0 = n_auth()
    cases = [
        ("contract NULL", "SELECT * FROM digime.digime_authorize_url(NULL, 'https://cb.example/', 'x')", (),
         "22004", "contract_id must not be NULL"),
        ("callback not a URL", "SELECT * FROM digime.digime_authorize_url(%s, 'not a url', 'x')", (C1,),
         "22023", 'invalid callback'),
        ("callback with fragment", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/#f', 'x')", (C1,),
         "22023", 'invalid callback'),
        # V31: the SDK sends state "" as ""; digime needs a state to match the callback
        ("state ''", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', '')", (C1,),
         "22023", "state must not be empty"),
        ("service_id 0 (V62)", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', 0)", (C1,),
         "22023", "service_id must be a positive integer"),
        ("source_type both", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                             "source_type => 'both')", (C1,), "22023", 'source_type must be "pull" or "push"'),
        ("sample_data without dataSet", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                                        "sample_data => '{\"autoOnboard\": true}')", (C1,),
         "22023", "invalid sample_data"),
        ("sources_scope bad dataType", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                                       "sources_scope => '{\"dataType\": [\"nope\"]}')", (C1,),
         "22023", "invalid sources_scope.dataType[0]"),
        ("sources_scope organizationType array", "SELECT * FROM digime.digime_authorize_url(%s, "
         "'https://cb.example/', 'x', sources_scope => '{\"organizationType\": [\"hospital\"]}')", (C1,),
         "22023", "invalid sources_scope.organizationType"),
        ("sources_scope array", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                                "sources_scope => '[]')", (C1,), "22023", "invalid sources_scope"),
        ("session_options timeRanges", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
         "session_options => '{\"pull\": {\"scope\": {\"timeRanges\": [\"notAnObject\"]}}}')", (C1,),
         "22023", "invalid session_options.pull.scope.timeRanges[0]"),
        ("locale", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', locale => 'x')", (C1,),
         "22023", 'invalid locale "x"'),
        # V73: the SDK ignores storageId ""; digime refuses it
        ("storage_id ''", "SELECT * FROM digime.digime_authorize_url(%s, 'https://cb.example/', 'x', "
                          "storage_id => '')", (C1,), "22023", "storage_id must not be empty"),
        ("unknown contract", "SELECT * FROM digime.digime_authorize_url('nope', 'https://cb.example/', 'x')", (),
         "42704", 'digi.me contract "nope" does not exist'),
        ("exchange without verifier (V132)", "SELECT * FROM digime.digime_exchange_code(%s, 'c1', '')", (C1,),
         "22023", "code_verifier must not be empty"),
        ("refresh NULL", "SELECT * FROM digime.digime_refresh_token(NULL)", (), "22004", "token_id must not be NULL"),
        ("unknown token", "SELECT * FROM digime.digime_refresh_token(999999)", (),
         "42704", "user access token 999999 does not exist"),
        ("import ms expiry", "SELECT * FROM digime.digime_import_token(%s, '{\"accessToken\": {\"value\": \"v1\", "
         "\"expiry\": 1796111970000}, \"refreshToken\": {\"value\": \"v2\", \"expiry\": 1}}')", (C1,),
         "22023", "user_access_token.accessToken.expiry must be whole seconds since the Unix epoch"),
    ]
    for what, sql, args, state, msg in cases:
        err = error(conn, sql, args or None)
        tap.eq(err and err[:2], (state, msg), "bad argument: %s -> %s" % (what, state))
    tap.eq(dmtest.api_records(sb, s0), [], "no request sent for any bad argument")
    tap.eq(n_auth(), a0, "no authorization row added")


@tap.test
def not_granted_not_yours():
    for r in ("t020_app", "t020_other"):
        dmtest.ensure_role(r, "LOGIN")
        q(conn, "SELECT digime.digime_grant_contract(%s, %s)", (C1, r))
    app = dmtest.connect(DB, user="t020_app")
    other = dmtest.connect(DB, user="t020_other")
    s0 = sb.last_seq()
    err = error(app, "SELECT * FROM digime.digime_authorize_url(%s, %s, 'x')", (C2, CB))
    tap.eq(err and err[:2], ("42501", 'permission denied for digi.me contract "second-contract"'),
           "contract not granted -> 42501")
    tap.eq(err and err[3], "An administrator grants it with digime_grant_contract().", "42501 hint")
    tap.eq(dmtest.api_records(sb, s0), [], "nothing sent for an ungranted contract")
    # a token row of postgres is not t020_app's
    pid = q1(conn, "SELECT max(id) FROM digime.user_tokens")
    err = error(app, "SELECT digime.digime_user_access_token(%s)", (pid,))
    tap.eq(err and err[:2], ("42501", "permission denied for user access token %d" % pid), "foreign token -> 42501")
    err = error(app, "SELECT * FROM digime.digime_refresh_token(%s)", (pid,))
    tap.eq(err and err[0], "42501", "refreshing a foreign token -> 42501")
    # t020_app's authorization cannot be completed by t020_other
    url, _, _ = dmtest.authorize(app, C1, callback=CB, state="t020-mine")
    loc = sb.follow(url)
    dmtest.record_secret(dict(dmtest.query_pairs(loc)).get("code"))
    err = error(other, "SELECT * FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(err and err[:2], ("42501", 'no authorization of role "t020_other" has the callback\'s state'),
           "another role's callback -> 42501")
    row = q(app, "SELECT owner_role::text, state FROM digime.digime_handle_callback(%s)", (loc,))
    tap.eq(row, [("t020_app", "t020-mine")], "the owner completes it; the row is t020_app's")
    app.close()
    other.close()


tap.run()
