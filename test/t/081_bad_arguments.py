"""081_bad_arguments: bad arguments for every SQL function of the extension.

For each function and procedure (digime--1.0.sql, digime--1.0--1.1.sql; README "Functions"),
generated bad values per argument:
NULL where a value is required, empty strings, over-long strings (> 16384 bytes), control
characters, wrong JSON shapes and types for the jsonb arguments, deep nesting, huge numbers,
negative/zero/nonexistent ids, malformed callback URLs (bad percent-encoding, repeated
parameters, no query, huge), unusable keys and roles.  Each call must fail cleanly with the
expected SQLSTATE (never class XX or 58), leave the backend alive, send nothing to the API
(unless the case says it calls the API) and change no row of the extension's tables.
Calls run as the superuser (an administrator) and as a role granted the contract.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from dmtest import q, q1  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
DB = "t080"
APP_ROLE = "t080_app"
admin = dmtest.fresh_db(DB)
C = dmtest.EXAMPLE_CONTRACT
APPID = dmtest.EXAMPLE_APP
KEY = dmtest.fixture_key("digime-example/read-data.key")
q(admin, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)", (C, APPID, KEY))
dmtest.ensure_role(APP_ROLE, "LOGIN")
q(admin, "SELECT digime.digime_grant_contract(%s, %s)", (C, APP_ROLE))
app = dmtest.connect(DB, user=APP_ROLE)
TOKEN = {"accessToken": {"value": "t080-at-%s" % os.urandom(8).hex(), "expiry": 4102444800},
         "refreshToken": {"value": "t080-rt-%s" % os.urandom(8).hex(), "expiry": 4102444800},
         "user": {"id": "u1"}, "consentid": "c1"}
for v in (TOKEN["accessToken"]["value"], TOKEN["refreshToken"]["value"]):
    dmtest.record_secret(v)
APP_TOKEN = q1(app, "SELECT id FROM digime.digime_import_token(%s, %s)", (C, json.dumps(TOKEN)))
ADMIN_TOKEN = q1(admin, "SELECT id FROM digime.digime_import_token(%s, %s)", (C, json.dumps(TOKEN)))
PENDING_STATE = "t080-pending"
q(app, "SELECT url FROM digime.digime_authorize_url(%s, 'https://cb.example/t080', %s)", (C, PENDING_STATE))
MISSING = 987654321
CB = "https://cb.example/t080"
LONG = "x" * 16385                     # one byte over the text argument limit
LONG_MB = "\u00e9" * 8193              # 16386 bytes in fewer characters
DEEP = 2000                            # jsonb accepts it; digime must refuse the shape


def deep(depth, leaf="1"):
    return "[" * depth + leaf + "]" * depth


def state_digest():
    return q(admin, """
        SELECT (SELECT md5(coalesce(string_agg(concat_ws(':', contract_id, application_id, private_key,
                       key_fingerprint, rotated_at), ',' ORDER BY contract_id), '')) FROM digime.contracts),
               (SELECT md5(coalesce(string_agg(concat_ws(':', contract_id, grantee), ',' ORDER BY contract_id,
                       grantee::text), '')) FROM digime.contract_grants),
               (SELECT md5(coalesce(string_agg(concat_ws(':', id, access_token, refresh_token, updated_at),
                       ',' ORDER BY id), '')) FROM digime.user_tokens),
               (SELECT md5(coalesce(string_agg(concat_ws(':', id, status, code_verifier), ',' ORDER BY id), ''))
                  FROM digime.authorizations),
               (SELECT md5(coalesce(string_agg(concat_ws(':', id, status, callback_url), ',' ORDER BY id), ''))
                  FROM digime.callback_inbox),
               (SELECT string_agg(relname || coalesce(relacl::text, ''), ';' ORDER BY relname)
                  FROM pg_class WHERE relnamespace = 'digime'::regnamespace),
               (SELECT string_agg(proname || coalesce(proacl::text, ''), ';' ORDER BY proname)
                  FROM pg_proc WHERE pronamespace = 'digime'::regnamespace)""")[0]


# (label, role, function, sql arguments, python arguments, expected SQLSTATE, API calls allowed)
CASES = []


def case(label, fn, args, params, expected, role="admin", api=False):
    CASES.append((label, role, fn, args, params, expected, api))


def text_cases(fn, build, argname, required=True, unknown=None, control=None, role="admin"):
    """The generic bad values of one text argument; build(value) -> (sql args, params)."""
    if required:
        case("%s NULL" % argname, fn, *build(None), "22004", role)
    case("%s ''" % argname, fn, *build(""), "22023", role)
    case("%s of 16385 bytes" % argname, fn, *build(LONG), "22023", role)
    case("%s of 16386 bytes in 8193 characters" % argname, fn, *build(LONG_MB), "22023", role)
    if unknown:
        for v in ("nope", "x" * 16384, "a\x01b", "\u00e9\U0001f4a5", " %s" % C, C.upper()):
            case("%s %r" % (argname, v[:20]), fn, *build(v), unknown, role)
    if control:
        for v in ("a\x01b", "a\nb", "\x7f", "a\tb", "\x1b[2J"):
            case("%s %r" % (argname, v), fn, *build(v), control, role)


def p(n):
    return ", ".join(["%s"] * n)


# ------------------------------------------------------------------ admin functions
F = "digime_add_contract"
text_cases(F, lambda v: ("%s" % p(3), (v, APPID, KEY)), "contract_id", control="22023")
for v in ("a b", "\u00e9", "x\x7f"):
    case("contract_id %r" % v, F, p(3), (v, APPID, KEY), "22023")
case("contract_id of an existing contract", F, p(3), (C, APPID, KEY), "23505")
text_cases(F, lambda v: (p(3), ("t080-new", v, KEY)), "application_id", control="22023")
text_cases(F, lambda v: (p(3), ("t080-new", APPID, v)), "private_key")
for label, pem in [
        ("not PEM", "hello"),
        ("PEM armour around garbage", "-----BEGIN RSA PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END RSA PRIVATE KEY-----\n"),
        ("truncated PEM", KEY[: len(KEY) // 2]),
        ("encrypted PEM", dmtest.fixture_key("keys/encrypted.pem")),
        ("EC key", dmtest.fixture_key("keys/ec.pem")),
        ("1024-bit RSA key", dmtest.fixture_key("keys/weak-1024.pem")),
        ("public key", dmtest.public_pem(KEY)),
        ("PEM with control characters", KEY.replace("\n", "\n\x01", 3)),
        ("BEGIN line only", "-----BEGIN PRIVATE KEY-----"),
        ("PEM of 16384 bytes", ("-----BEGIN PRIVATE KEY-----\n" + "QUFB" * 4087 + "\n-----END PRIVATE KEY-----\n")[:16384])]:
    case("private_key: %s" % label, F, p(3), ("t080-new", APPID, pem), "22023")

F = "digime_rotate_contract_key"
text_cases(F, lambda v: (p(2), (v, KEY)), "contract_id", unknown="42704")
text_cases(F, lambda v: (p(2), (C, v)), "private_key")
case("private_key: EC key", F, p(2), (C, dmtest.fixture_key("keys/ec.pem")), "22023")
case("private_key: not PEM", F, p(2), (C, "x"), "22023")

F = "digime_drop_contract"
text_cases(F, lambda v: (p(2), (v, False)), "contract_id", unknown="42704")
case("contract in use, cascade NULL", F, p(2), (C, None), "2BP01")
case("contract in use, cascade false", F, p(2), (C, False), "2BP01")

for F in ("digime_grant_contract", "digime_revoke_contract"):
    text_cases(F, lambda v: ("%s, %s::regrole", (v, APP_ROLE)), "contract_id", unknown="42704")
    case("role NULL", F, "%s, %s::regrole", (C, None), "22004")
    case("role that does not exist (regrole input)", F, "%s, %s::regrole", (C, "t080_nobody"), "42704")
    case("role by a stale OID", F, "%s, %s::oid::regrole", (C, 4000000000), "42704")
    case("role OID 0", F, "%s, 0::oid::regrole", (C,), "42704")
    case("role PUBLIC", F, "%s, %s::regrole", (C, "public"), "42704")
case("revoke a grant the role does not have", "digime_revoke_contract", "%s, %s::regrole", (C, "pg_monitor"),
     "42704")

F = "digime_revoke_token"
for v in (0, -1, -9223372036854775808, 9223372036854775807, MISSING):
    case("token_id %d (no such row: false)" % v, F, "%s", (v,), "false")
case("token_id NULL (STRICT: NULL)", F, "%s", (None,), "null")

# ------------------------------------------------------------------ flow functions
F = "digime_authorize_url"
AU = "%s, %s, %s"
for role, unknown in (("admin", "42704"), ("app", "42501")):
    text_cases(F, lambda v: (AU, (v, CB, "s")), "contract_id", unknown=unknown, role=role)
text_cases(F, lambda v: (AU, (C, v, "s")), "callback")
for v in ("not a url", "ftp://cb.example/", "https://", "https://u:p@cb.example/", "https://cb.example/#f",
          "https://cb.example/\x01", "javascript:alert(1)", "https://[::1/", "//cb.example/x",
          "cb.example/x", "file:///etc/passwd", "https://cb.example:99999/", "https://cb example/",
          "mailto:a@b.c", "HTTPS://u@cb.example/"):
    case("callback %r" % v, F, AU, (C, v, "s"), "22023")
text_cases(F, lambda v: (AU, (C, CB, v)), "state", control="22023")
for v in (0, -1, -2147483648):
    case("service_id %d" % v, F, AU + ", service_id => %s", (C, CB, "s", v), "22023")
for role, unknown in (("admin", "42704"), ("app", "42501")):
    for v in (0, -1, -9223372036854775808, 9223372036854775807, MISSING):
        case("user_token_id %d" % v, F, AU + ", user_token_id => %s", (C, CB, "s", v), unknown, role)
case("user_token_id of another role's token", F, AU + ", user_token_id => %s", (C, CB, "s", ADMIN_TOKEN), "42501",
     "app")
for label, v in [("array", "[]"), ("string", '"x"'), ("number", "1"), ("JSON null", "null"), ("true", "true"),
                 ("pull array", '{"pull": []}'), ("unknown key", '{"x": 1}'), ("pull.unknown", '{"pull": {"y": 1}}'),
                 ("timeRanges[0].from string", '{"pull": {"scope": {"timeRanges": [{"from": "a"}]}}}'),
                 ("timeRanges not array", '{"pull": {"scope": {"timeRanges": {}}}}'),
                 ("serviceGroups[0] without id", '{"pull": {"scope": {"serviceGroups": [{}]}}}'),
                 ("serviceTypes[0].id string", '{"pull": {"scope": {"serviceGroups": [{"id": 1, "serviceTypes": '
                                               '[{"id": "2"}]}]}}}'),
                 ("sourceFetch string", '{"pull": {"sourceFetch": "true"}}'),
                 ("limits.duration without sourceFetch", '{"pull": {"limits": {"duration": {}}}}'),
                 ("sourceFetchFilter.account.id of numbers", '{"pull": {"sourceFetchFilter": {"account": {"id": [1]}}}}'),
                 ("deep nesting", '{"pull": %s}' % deep(DEEP)),
                 ("deep nesting of objects", '{"pull": {"scope": %s}}' % ('{"a":' * DEEP + "1" + "}" * DEEP)),
                 ("pull.sourceFetch huge number", '{"pull": {"sourceFetch": 1e1000}}'),
                 ("key with NUL escape in a string", '{"pull": {"limits": "\\u00e9"}}')]:
    case("session_options %s" % label, F, AU + ", session_options => %s", (C, CB, "s", v), "22023")
for v in ("", "PULL", "both", LONG, "pull\x01"):
    case("source_type %r" % v[:20], F, AU + ", source_type => %s", (C, CB, "s", v), "22023")
for label, v in [("array", "[]"), ("empty object", "{}"), ("dataSet number", '{"dataSet": 1}'),
                 ("autoOnboard string", '{"dataSet": "x", "autoOnboard": "yes"}'),
                 ("unknown key", '{"dataSet": "x", "extra": 1}'), ("deep", '{"dataSet": %s}' % deep(DEEP))]:
    case("sample_data %s" % label, F, AU + ", sample_data => %s", (C, CB, "s", v), "22023")
text_cases(F, lambda v: (AU + ", locale => %s", (C, CB, "s", v)), "locale", required=False, control="22023")
for v in ("x", "english", "en GB", "en-", "-en", "en--GB", "en-toolongsubtag", "e1", "en_GB_x" + "-abc" * 10,
          "\u00e9n"):
    case("locale %r" % v, F, AU + ", locale => %s", (C, CB, "s", v), "22023")
text_cases(F, lambda v: (AU + ", storage_id => %s", (C, CB, "s", v)), "storage_id", required=False)
for label, v in [("array", "[]"), ("dataType string", '{"dataType": "gp-data"}'),
                 ("dataType unknown", '{"dataType": ["nope"]}'), ("dataType number", '{"dataType": [1]}'),
                 ("organizationType array", '{"organizationType": ["hospital"]}'),
                 ("organizationType unknown", '{"organizationType": "castle"}'),
                 ("unknown key", '{"x": 1}'), ("deep", '{"dataType": %s}' % deep(DEEP, '"gp-data"'))]:
    case("sources_scope %s" % label, F, AU + ", sources_scope => %s", (C, CB, "s", v), "22023")

F = "digime_exchange_code"
EX = p(3)
for role, unknown in (("admin", "42704"), ("app", "42501")):
    text_cases(F, lambda v: (EX, (v, "code", "verifier")), "contract_id", unknown=unknown, role=role)
text_cases(F, lambda v: (EX, (C, v, "verifier")), "authorization_code")
text_cases(F, lambda v: (EX, (C, "code", v)), "code_verifier")
case("a code digi.me does not know", F, EX, (C, "t080-no-such-code", "v" * 43), "YD007", api=True)

F = "digime_handle_callback"
text_cases(F, lambda v: ("%s", (v,)), "callback_url")
S = PENDING_STATE
for label, url, want in [
        ("no query", CB, "22023"),
        ("empty query", CB + "?", "22023"),
        ("only '?'", "?", "22023"),
        ("only '&'", "&&&", "22023"),
        ("no success", CB + "?state=%s&code=c" % S, "22023"),
        ("no state", CB + "?success=true&code=c", "22023"),
        ("no code", CB + "?success=true&state=%s" % S, "22023"),
        ("empty state", CB + "?success=true&state=&code=c", "22023"),
        ("empty code", CB + "?success=true&state=%s&code=" % S, "22023"),
        ("success TRUE", CB + "?success=TRUE&state=%s&code=c" % S, "22023"),
        ("success 1", CB + "?success=1&state=%s&code=c" % S, "22023"),
        ("repeated success", CB + "?success=true&success=true&state=%s&code=c" % S, "22023"),
        ("repeated state", CB + "?success=true&state=%s&state=%s&code=c" % (S, S), "22023"),
        ("repeated code", CB + "?success=true&state=%s&code=c&code=c" % S, "22023"),
        ("percent at the end", CB + "?success=true&state=%s&code=c%%" % S, "22023"),
        ("percent with one digit", CB + "?success=true&state=%s&code=c%%4" % S, "22023"),
        ("percent zz", CB + "?success=true&state=%s&code=%%zz" % S, "22023"),
        ("percent-encoded NUL", CB + "?success=true&state=%s&code=a%%00b" % S, "22023"),
        ("percent-encoded invalid UTF-8", CB + "?success=true&state=%s&code=%%ff%%fe" % S, "22023"),
        ("percent-encoded overlong UTF-8", CB + "?success=true&state=%s&code=%%c0%%80" % S, "22023"),
        ("percent-encoded surrogate", CB + "?success=true&state=%s&code=%%ed%%a0%%80" % S, "22023"),
        ("percent in a name", CB + "?succ%%zzess=true&state=%s&code=c" % S, "22023"),
        ("URL that does not parse", "https://[cb/?success=true&state=%s&code=c" % S, "22023"),
        ("URL with a space", "https://cb.example/a b?success=true&state=%s&code=c" % S, "22023"),
        ("URL with a control character", "https://cb.example/\x01?success=true&state=%s&code=c" % S, "22023"),
        ("16384 bytes of ampersands", "&" * 16384, "22023"),
        ("16384 bytes of parameters", ("a=1&" * 4096)[:16384], "22023"),
        ("unknown state", CB + "?success=true&state=t080-nobody&code=c", "42501"),
        ("state with control characters", CB + "?success=true&state=%01%0a&code=c", "42501"),
        ("success=false", CB + "?success=false&state=%s" % S, "YD020"),
        ("success=false, errorCode with control characters", CB + "?success=false&errorCode=%1b%5b2J%0aX", "YD020"),
        ("success=false, errorCode of 16000 bytes", CB + "?success=false&errorCode=" + "E" * 16000, "YD020"),
        ("success=false, repeated errorCode", CB + "?success=false&errorCode=a&errorCode=b", "22023"),
        ("query string only, unknown state", "success=true&state=t080-nobody&code=c", "42501"),
        ("fragment only", "#success=true&state=%s&code=c" % S, "22023")]:
    case("callback_url: %s" % label, F, "%s", (url,), want, "app")

for F in ("digime_refresh_token", "digime_user_access_token"):
    case("token_id NULL", F, "%s", (None,), "22004")
    for role, unknown in (("admin", "42704"), ("app", "42501")):
        for v in (0, -1, -9223372036854775808, 9223372036854775807, MISSING):
            case("token_id %d" % v, F, "%s", (v,), unknown, role)
    case("another role's token", F, "%s", (ADMIN_TOKEN,), "42501", "app")

F = "digime_reauthorize_url"
RE = "%s, %s"
case("token_id NULL", F, RE, (None, CB), "22004", "app")
for v in (0, -1, 9223372036854775807, MISSING, ADMIN_TOKEN):
    case("token_id %d" % v, F, RE, (v, CB), "42501", "app")
text_cases(F, lambda v: (RE, (APP_TOKEN, v)), "callback", role="app")
case("callback with a fragment", F, RE, (APP_TOKEN, CB + "#x"), "22023", "app")
text_cases(F, lambda v: (RE + ", state => %s", (APP_TOKEN, CB, v)), "state", required=False, control="22023",
           role="app")
text_cases(F, lambda v: (RE + ", locale => %s", (APP_TOKEN, CB, v)), "locale", required=False, control="22023",
           role="app")
for v in ("[]", '{"x": 1}', '{"pull": %s}' % deep(DEEP)):
    case("session_options %s" % v[:20], F, RE + ", session_options => %s", (APP_TOKEN, CB, v), "22023", "app")

F = "digime_import_token"
for role, unknown in (("admin", "42704"), ("app", "42501")):
    text_cases(F, lambda v: ("%s, %s", (v, json.dumps(TOKEN))), "contract_id", unknown=unknown, role=role)
case("user_access_token NULL", F, "%s, %s", (C, None), "22004")


def tok(**changes):
    t = json.loads(json.dumps(TOKEN))
    for path, v in changes.items():
        node = t
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        if v is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = v
    return json.dumps(t)


for label, v in [
        ("array", "[]"), ("empty object", "{}"), ("string", '"x"'), ("JSON null", "null"), ("number", "1"),
        ("accessToken missing", tok(accessToken=KeyError)), ("refreshToken missing", tok(refreshToken=KeyError)),
        ("accessToken a string", tok(accessToken="x")), ("accessToken.value missing", tok(accessToken__value=KeyError)),
        ("accessToken.value ''", tok(accessToken__value="")), ("accessToken.value a number", tok(accessToken__value=1)),
        ("refreshToken.value null", tok(refreshToken__value=None)),
        ("accessToken.expiry missing", tok(accessToken__expiry=KeyError)),
        ("accessToken.expiry a string", tok(accessToken__expiry="4102444800")),
        ("accessToken.expiry 0", tok(accessToken__expiry=0)), ("accessToken.expiry -1", tok(accessToken__expiry=-1)),
        ("accessToken.expiry 1.5", tok(accessToken__expiry=1.5)),
        ("accessToken.expiry in milliseconds", tok(accessToken__expiry=4102444800000)),
        ("accessToken.expiry 2^63", tok(accessToken__expiry=2 ** 63)),
        ("refreshToken.expiry 1e308", tok(refreshToken__expiry=1e308)),
        ("accessToken.expiry 1e400", tok(accessToken__expiry=2).replace('"expiry": 2', '"expiry": 1e400')),
        ("accessToken.expiry 1e-400", tok(accessToken__expiry=2).replace('"expiry": 2', '"expiry": 1e-400')),
        ("accessToken.expiry -1e400", tok(accessToken__expiry=2).replace('"expiry": 2', '"expiry": -1e400')),
        ("unknown key", tok(extra=1)), ("accessToken unknown key", tok(accessToken__extra=1)),
        ("user a string", tok(user="u")), ("user.id a number", tok(user__id=1)),
        ("user.id deep", tok(user__id=json.loads(deep(500)))), ("consentid a number", tok(consentid=1)),
        ("deep nesting", '{"accessToken": %s}' % deep(DEEP))]:
    case("user_access_token: %s" % label, F, "%s, %s", (C, v), "22023")

# ------------------------------------------------------------------ 1.1
F = "digime_submit_callback"
text_cases(F, lambda v: ("%s", (v,)), "callback_url", role="app")
for label, url in [("no query", CB), ("no success", CB + "?state=s&code=c"),
                   ("no code", CB + "?success=true&state=s"), ("repeated state", CB + "?success=true&state=a&state=b&code=c"),
                   ("bad percent-encoding", CB + "?success=true&state=s&code=%zz"),
                   ("percent-encoded NUL", CB + "?success=true&state=s&code=a%00"),
                   ("success maybe", CB + "?success=maybe&state=s&code=c"),
                   ("URL that does not parse", "https://[cb/?success=true&state=s&code=c")]:
    case("callback_url: %s" % label, F, "%s", (url,), "22023", "app")

F = "digime_valid_access_token"
case("token_id NULL", F, "%s", (None,), "22004", "app")
case("min_validity NULL", F, "%s, %s", (APP_TOKEN, None), "22004", "app")
for v in ("-1 second", "3651 days", "1000 years", "-178000000 years", "178000000 years", "-1 month -1 day"):
    case("min_validity %r" % v, F, "%s, %s::interval", (APP_TOKEN, v), "22023", "app")
for role, unknown in (("admin", "42704"), ("app", "42501")):
    for v in (0, -1, -9223372036854775808, MISSING):
        case("token_id %d" % v, F, "%s", (v,), unknown, role)
case("another role's token", F, "%s", (ADMIN_TOKEN,), "42501", "app")

PROCEDURES = {"digime_refresh_expiring", "digime_process_inbox", "digime_purge"}
F = "digime_refresh_expiring"
case("within NULL", F, "within => %s", (None,), "22004")
for v in ("-1 minute", "3651 days", "-178000000 years"):
    case("within %r" % v, F, "within => %s::interval", (v,), "22023")
for v in (None, 0, -1, 1001, 2147483647, -2147483648):
    case("concurrency %r" % (v,), F, "concurrency => %s", (v,), "22023")
for v in (-1, -2147483648):
    case("max_tokens %d" % v, F, "max_tokens => %s", (v,), "22023")

# administration functions are not granted to a flow role
for F, args, params in [("digime_add_contract", p(3), ("x", "y", KEY)), ("digime_drop_contract", "%s", (C,)),
                        ("digime_rotate_contract_key", p(2), (C, KEY)), ("digime_revoke_token", "%s", (APP_TOKEN,)),
                        ("digime_grant_contract", "%s, %s::regrole", (C, APP_ROLE)),
                        ("digime_reencrypt_secrets", "", ()), ("digime_purge", "", ())]:
    case("%s by a flow role" % F, F, args, params, "42501", "app")


# ------------------------------------------------------------------ run
@tap.test
def every_bad_argument():
    conns = {"admin": admin, "app": app}
    before = state_digest()
    counts = {}
    seq = sb.last_seq()
    for label, role, fn, args, params, expected, api in CASES:
        conn = conns[role]
        what = "%s(%s) as %s" % (fn, label, role)
        got, result = None, None
        try:
            rows = q(conn, "%s digime.%s(%s)" % ("CALL" if fn in PROCEDURES else "SELECT", fn, args), params)
            result = rows[0][0] if rows else None
        except Exception as e:
            got = getattr(e, "pgcode", None) or type(e).__name__
            msg = getattr(getattr(e, "diag", None), "message_primary", None) or str(e)
        if expected in ("false", "null"):
            ok = got is None and result == {"false": False, "null": None}[expected]
            tap.ok(ok, "%s -> %s" % (what, expected), "got %r / %r" % (got, result))
        else:
            tap.ok(got == expected, "%s -> %s" % (what, expected),
                   "got %s: %s" % (got, (msg if got else "no error, result %r" % (result,))[:300]))
        counts[got] = counts.get(got, 0) + 1
        if got and (got.startswith("XX") or got.startswith("58")):
            tap.ok(False, "%s: no internal error" % what, msg)
        if conn.closed:
            tap.ok(False, "%s: the backend is alive" % what)
            return
        new = sb.requests(seq)
        if new:
            seq = new[-1]["seq"]
        if not api and expected not in ("false", "null") and new:
            tap.ok(False, "%s: nothing sent to the API" % what, [r["endpoint"] for r in new])
        after = state_digest()
        if after != before:
            tap.ok(False, "%s: no row of the extension changed" % what)
            before = after
    tap.ok(not any(s and (s.startswith("XX") or s.startswith("58")) for s in counts),
           "%d cases, none failed with class XX or 58: %s" % (len(CASES), ", ".join(
               "%s %d" % (k or "no error", v) for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))))
    tap.eq(state_digest(), before, "the extension's tables are as before")
    tap.eq(q1(admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (DB,)) >= 2, True,
           "both sessions are still connected")


@tap.test
def callback_values_in_messages():
    """errorCode and success come from the browser: repeated in messages (and stored in the
    callback inbox) cut at whole characters, without control characters."""
    e = dmtest.error(app, "SELECT digime.digime_handle_callback(%s)", (CB + "?success=false&errorCode=%1b%5b2J%0aX",))
    tap.eq(e and e[:3], ("YD020", "digi.me authorization failed: ?[2J?X",
                         'The callback reported success=false, errorCode "?[2J?X".'),
           "errorCode with an escape sequence and a newline: shown with '?'")
    e = dmtest.error(app, "SELECT digime.digime_handle_callback(%s)", (CB + "?success=%1b%5b2J&state=s&code=c",))
    tap.eq(e and e[:2], ("22023", 'callback URL has success="?[2J"; "true" or "false" expected'),
           "success with an escape sequence: shown with '?'")
    euro = "%E2%82%AC" * 342                  # 1026 bytes: a cut at 1024 bytes splits a character
    e = dmtest.error(app, "SELECT digime.digime_handle_callback(%s)", (CB + "?success=false&errorCode=" + euro,))
    tap.eq(e and e[:2], ("YD020", "digi.me authorization failed: " + "\u20ac" * 341),
           "errorCode of 1026 bytes: cut to 341 whole characters")
    iid = q1(app, "SELECT digime.digime_submit_callback(%s)", (CB + "?success=false&state=t080-inbox&errorCode=" +
                                                             euro + "%0a%1b",))
    q(app, "CALL digime.digime_process_inbox()")
    try:
        row = q(admin, "SELECT status, message FROM digime.callback_inbox WHERE id = %s", (iid,))
        msg = row[0][1] if row else None
        tap.ok(row and row[0][0] == "failed" and msg is not None and "\ufffd" not in msg and
               not any(ord(ch) < 0x20 for ch in msg), "the inbox row's message is valid text without control "
               "characters", row)
    except UnicodeDecodeError as ex:
        tap.ok(False, "the inbox row's message is valid UTF-8", ex)
    q(admin, "DELETE FROM digime.callback_inbox WHERE id = %s", (iid,))


tap.run()
