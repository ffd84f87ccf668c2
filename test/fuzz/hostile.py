#!/usr/bin/python3
"""Hostile digi.me API for fuzzing digime's parsing of network input.

A TLS proxy in front of the sandbox (test/sandbox/sandbox.py): every request
digime (or the driver, for onboarding pages) sends is forwarded to the sandbox,
and the answer is then mutated according to a seeded RNG, so that a failure
replays from (seed, call number):  the RNG of request number i of call n is
random.Random("seed/n/i").

Answers are normalised first: every response JWT is re-signed with the
sandbox's listed key (DIR/jwks-sandbox-1.key, kid sandbox-1) and a jku on this
server's origin, so that digime, whose digime.base_url points here, accepts
unmutated answers.  Mutated payloads and headers are re-signed the same way
(most of the time), so that they pass the signature check and reach the
parsing behind it.

Mutations (names are recorded per request, see HostileServer.records):
  json.*   JSON tree edits of an answer, a token payload or header, or the JWKS:
           wrong types, removed/extra/duplicate/renamed members, huge and negative
           numbers, numbers beyond float8/numeric, deep nesting, huge strings,
           control characters, \\u0000, lone surrogates, invalid UTF-8, raw NUL
  raw.*    byte edits of a JSON text (bit flips, truncation, insertions, BOM ...)
  jws.*    compact-JWS edits (segments, base64url alphabet, signature, alg, jku,
           kid, other keys, RS512, PSS salt lengths)
  jwks.*   JWKS edits (bad n/e, huge keys, wrong kty/use, duplicate kids, PEM
           garbage, many keys)
  status.* / error.*  other statuses, hostile error bodies and X-Error-* headers,
           Retry-After
  loc.*    onboarding redirects with a hostile callback URL (repeated parameters,
           bad percent-encoding, huge, success=false, ...)
  wire.*   HTTP framing: wrong Content-Length, truncation, chunked encoding
           (valid and broken), huge headers, many headers, huge bodies (> 1 MB),
           gzip (valid, bomb, corrupt), slow drip, 1xx, garbage status lines,
           header garbage, bit flips, early close

"slow" mutations (a drip longer than digime.timeout_ms, a Content-Length that
promises more than is sent on a kept-alive connection) are only used when the
call's plan allows them (the driver lowers digime.timeout_ms for such calls).

Standalone (manual experiments):
    hostile.py --upstream https://127.0.0.1:PORT --sandbox-dir DIR --seed 7 [--rate 0.5]
prints {"port": N, "base_url": ..., "onboard_url": ...}; every request then counts
as part of call 0.  The driver (run.py) imports it instead.
Only Debian's /usr/bin/python3 and python3-cryptography are needed.
"""

import base64
import copy
import decimal
import gzip
import http.client
import json
import os
import random
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

API = "/v1.7/"
ONBOARD = "/apps/saas/"
LISTED_KID = "sandbox-1"
MB = 1 << 20


# --------------------------------------------------------------------------
# JSON text with pieces Python's json cannot write
# --------------------------------------------------------------------------
class Raw:
    """Literal JSON text (str or bytes), e.g. 1e400, a deep nesting, bad UTF-8."""
    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")

    def __repr__(self):
        return "Raw(%r)" % self.text[:40]


class Pairs:
    """An object written from an explicit list of pairs (duplicate keys allowed)."""
    __slots__ = ("pairs",)

    def __init__(self, pairs):
        self.pairs = list(pairs)


def dumps(value, ascii_only=True):
    """JSON text (bytes) of a tree that may contain Raw and Pairs."""
    out = []
    _dump(value, out, ascii_only)
    return b"".join(out)


def _str(s, ascii_only):
    if ascii_only:
        return json.dumps(s).encode("ascii")
    # raw UTF-8; a lone surrogate becomes invalid UTF-8 (CESU-style bytes)
    return json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _dump(v, out, a):
    if isinstance(v, Raw):
        out.append(v.text)
    elif isinstance(v, str):
        out.append(_str(v, a))
    elif v is None or isinstance(v, (bool, int, float)):
        out.append(json.dumps(v).encode())
    elif isinstance(v, (dict, Pairs)):
        items = v.pairs if isinstance(v, Pairs) else list(v.items())
        out.append(b"{")
        for i, (k, x) in enumerate(items):
            if i:
                out.append(b",")
            out.append(k.text if isinstance(k, Raw) else _str(k, a))
            out.append(b":")
            _dump(x, out, a)
        out.append(b"}")
    elif isinstance(v, list):
        out.append(b"[")
        for i, x in enumerate(v):
            if i:
                out.append(b",")
            _dump(x, out, a)
        out.append(b"]")
    else:
        raise TypeError(type(v))


def plain(v):
    """The tree as Python's json would read it back (None when it cannot be told)."""
    try:
        return json.loads(dumps(v).decode("utf-8"))
    except Exception:
        return None


# --------------------------------------------------------------------------
# Hostile values
# --------------------------------------------------------------------------
def deep(rng, kind=None):
    d = rng.choice([64, 200, 1000, 5000, 20000, 100000, 400000])
    kind = kind or rng.choice(["array", "object", "mixed"])
    if kind == "array":
        return Raw("[" * d + "]" * d)
    if kind == "object":
        d = min(d, 150000)
        return Raw('{"a":' * d + "1" + "}" * d)
    d = min(d, 100000)
    return Raw('[{"a":' * d + "null" + "}]" * d)


HOSTILE_NUMBERS = [
    0, -1, 1, -0.0, 0.5, 1.5, 2 ** 31, 2 ** 31 - 1, -2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1,
    2 ** 63, -2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 11, 10 ** 11 + 1, 99999999999, 10 ** 30, 10 ** 100,
    1e308, -1e308, 5e-324, 1e-300,
    Raw("1e400"), Raw("-1e400"), Raw("1e-400"), Raw("1e1001"), Raw("-1e1001"), Raw("1e-1001"),
    Raw("1e20000"), Raw("1e-20000"), Raw("1E999999999"), Raw("1e-999999999"),
    Raw("9" * 400), Raw("1" + "0" * 5000), Raw("0." + "0" * 20000 + "1"), Raw("1" * 140000),
    Raw("-0"), Raw("0.0"), Raw("1.0"), Raw("1E3"), Raw("1e+3"), Raw("123.456e7"),
    Raw("01"), Raw("1."), Raw(".5"), Raw("+1"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
    Raw("0x10"), Raw("1e"), Raw("-"), Raw("1_000"),
]


def hostile_string(rng):
    c = rng.randrange(24)
    if c == 0:
        return ""
    if c == 1:
        return "x" * rng.choice([300, 501, 4096, 16385, 70000, 300000])
    if c == 2:
        return "\x00"
    if c == 3:
        return "a\x00b"
    if c == 4:
        return "\x01\x07\x1b[31mred\x1b[0m\n\r\t\x7f"
    if c == 5:     # (no U+FFFD: in an error text, it is how the driver sees invalid UTF-8)
        return "\u202e\u200b\ufeff\u2028"
    if c == 6:     # multibyte text that a byte-length cut splits in a character
        return rng.choice(["\u20ac", "\u00e9", "\U0001f600", "\u4e2d"]) * rng.choice([167, 250, 300, 2000])
    if c == 7:
        return "\ud800"
    if c == 8:
        return "\udfff\ud800x"
    if c == 9:
        return rng.choice(["null", "true", "{}", "[]", "0", "-1", "undefined", "%00", "%zz", "'", '"', "\\"])
    if c == 10:
        return "https://evil.example/" + "a" * rng.choice([1, 100, 20000])
    if c == 11:
        return " " * rng.choice([1, 100])
    if c == 12:
        return "".join(chr(rng.randrange(1, 0x80)) for _ in range(rng.randrange(1, 200)))
    if c == 13:
        return "".join(chr(rng.randrange(0x80, 0x2000)) for _ in range(rng.randrange(1, 200)))
    if c == 14:
        return rng.choice(["a.b.c", "..", ".", "a.b", "a.b.c.d", "e30.e30.", "e30.e30.e30"])
    if c == 15:
        return "%s=%s&%s" % ("state", "x", "code=y")
    if c == 16:
        return "\\u0000"
    if c == 17:
        return "InvalidToken"
    if c == 18:
        return "at-" + "A" * 40
    if c == 19:
        return "\t\n"
    if c == 20:
        return "".join(rng.choice("abc\x00\x01\u00e9\u20ac\ud800") for _ in range(rng.randrange(1, 64)))
    if c == 21:
        return "PS512"
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
                   for _ in range(rng.randrange(1, 64)))


RAW_STRINGS = [
    b'"\xff\xfe"', b'"\xc0\x80"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"',
    b'"a\x00b"', b'"\x01"', b'"\x1f"', b'"\\u0000"', b'"x\\u0000y"', b'"\\ud800"', b'"\\udc00\\ud800"',
    b'"\\uD83D\\uDE00"', b'"\\u00"', b'"\\x41"', b'"\\"', b'"\\u00e9"', b"'single'", b'"unterminated',
    b'"\\/\\b\\f\\n\\r\\t"', b'"\\uFFFF"', b'"\\uFEFF"',
]


def hostile_value(rng, depth_ok=True):
    c = rng.randrange(14)
    if c <= 2:
        return rng.choice(HOSTILE_NUMBERS)
    if c <= 6:
        return hostile_string(rng)
    if c == 7:
        return Raw(rng.choice(RAW_STRINGS))
    if c == 8:
        return rng.choice([None, True, False])
    if c == 9:
        return rng.choice([[], {}, [None], {"": ""}, {"value": None}, [[[]]], ["a", 1, None]])
    if c == 10 and depth_ok:
        return deep(rng)
    if c == 11:
        n = rng.choice([100, 10000, 100000])
        return Raw("[" + ",".join(["0"] * n) + "]")
    if c == 12:
        n = rng.choice([100, 5000, 40000])
        return Raw("{" + ",".join('"k%d":%d' % (i, i) for i in range(n)) + "}")
    return Raw(rng.choice([b"", b"nul", b"tru", b"[", b"{", b"}", b",", b"1 2", b"[1,]", b'{"a"}', b'{"a":}',
                           b"/*c*/1", b"\x00", b"\xff"]))


# --------------------------------------------------------------------------
# JSON tree mutation
# --------------------------------------------------------------------------
def _paths(obj, prefix=()):
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_tree(rng, tree, prefer=()):
    """One edit of a JSON tree (dict/list from json.loads); returns (new tree, name).
    prefer: key names worth hitting more often."""
    tree = copy.deepcopy(tree)
    paths = _paths(tree)
    hot = [p for p in paths if p and p[-1] in prefer]
    if hot and rng.random() < 0.6:
        path = rng.choice(hot)
    else:
        path = rng.choice(paths)
    node = _get(tree, path)
    op = rng.choice(["replace", "replace", "replace", "delete", "retype", "add", "dup", "rename",
                     "wrap", "stringify", "edge"])
    if not path:
        if op in ("delete", "rename", "dup"):
            op = "add"
        if op == "replace":
            return hostile_value(rng), "json.root-replace"
        if op == "wrap":
            return [tree], "json.root-wrap"
        if op == "stringify":
            return json.dumps(tree), "json.root-stringify"
    parent = _get(tree, path[:-1]) if path else None
    key = path[-1] if path else None

    def put(v):
        parent[key] = v

    if op == "replace":
        put(hostile_value(rng))
    elif op == "delete":
        del parent[key]
    elif op == "retype":
        if isinstance(node, str):
            put(rng.choice([0, 1, None, True, [node], {"value": node}, Raw(node.encode("utf-8", "surrogatepass")
                                                                                  if node.isdigit() else b"1e999")]))
        elif isinstance(node, bool) or node is None:
            put(rng.choice(["true", 1, 0, [], {}]))
        elif isinstance(node, (int, float)):
            put(rng.choice([str(node), [node], {"v": node}, None, True, Raw(("%s" % node).encode() + b".0"),
                            Raw(b"-" + str(node).encode())]))
        else:
            put(rng.choice(["", 0, None, [], {}, "[object Object]"]))
    elif op == "add":
        target = node if isinstance(node, (dict, list)) else parent
        if isinstance(target, dict):
            k = rng.choice(["", "x", "__proto__", "constructor", "token", "session", "keys", "error", "exp", "nbf",
                            "kid", "alg", "jku", "crit", "b64", "k" * 10000, "\u00e9", "\x00", "a.b"])
            target[k] = hostile_value(rng)
        elif isinstance(target, list):
            target.insert(rng.randrange(len(target) + 1), hostile_value(rng))
        else:
            return hostile_value(rng), "json.add-root"
    elif op == "dup":
        if isinstance(parent, dict):
            bad = hostile_value(rng)
            good = parent[key]
            pairs = []
            for k, v in parent.items():
                if k == key:
                    pairs += [(k, bad), (k, good)] if rng.random() < 0.5 else [(k, good), (k, bad)]
                else:
                    pairs.append((k, v))
            new = Pairs(pairs)
            if len(path) == 1:
                return new, "json.dup"
            _get(tree, path[:-2])[path[-2]] = new
        else:
            parent.insert(key, parent[key])
    elif op == "rename":
        if isinstance(parent, dict):
            v = parent.pop(key)
            newk = rng.choice([key.upper(), key.capitalize(), key + " ", " " + key, key + "\x00", key[:-1],
                               key.replace("_", "-"), key + "\u200b", "\\u0000" + key])
            parent[newk] = v
        else:
            put(None)
    elif op == "wrap":
        put(rng.choice([[node], {"value": node}]))
    elif op == "stringify":
        put(json.dumps(node) if not isinstance(node, str) else json.dumps(node))
    elif op == "edge":
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            put(rng.choice(HOSTILE_NUMBERS + [node + 1, -node, node * 1000, node + 0.5]))
        elif isinstance(node, str):
            put(rng.choice([node + hostile_string(rng), node[: rng.randrange(len(node) + 1)],
                            Raw(b'"' + node.encode("utf-8", "surrogatepass")[:20] + rng.choice(
                                [b"\xff", b"\x00", b"\\u0000", b"\xed\xa0\x80", b"\x1b", b"\\ud800"]) + b'"'),
                            node * rng.choice([2, 100, 5000])]))
        else:
            put(hostile_value(rng))
    return tree, "json.%s" % op


def mutate_bytes(rng, data):
    """One byte-level edit of a text; returns (bytes, name)."""
    data = bytearray(data)
    n = len(data)
    op = rng.choice(["flip", "flip", "truncate", "insert", "delete", "dup", "bom", "trail", "nul", "quote",
                     "brace"])
    if n == 0:
        op = "trail"
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        data = data[: rng.randrange(n)]
    elif op == "insert":
        i = rng.randrange(n + 1)
        data[i:i] = rng.choice([b"\x00", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\\u0000",
                                b"\\", b'"', b",", b"\n", b"\x1b", b"}", b"]", b"{", b"[", b"1e999"])
    elif op == "delete":
        i = rng.randrange(n)
        del data[i: i + rng.randrange(1, 16)]
    elif op == "dup":
        i = rng.randrange(n)
        j = min(n, i + rng.randrange(1, 200))
        data[j:j] = data[i:j]
    elif op == "bom":
        data[0:0] = b"\xef\xbb\xbf"
    elif op == "trail":
        data += rng.choice([b"x", b"\x00", b" {}", b"\n\n", b",", b"garbage" * 10, b"}"])
    elif op == "nul":
        data[rng.randrange(n)] = 0
    elif op == "quote":
        idx = [i for i, b in enumerate(data) if b == 0x22]
        if idx:
            del data[rng.choice(idx)]
    elif op == "brace":
        idx = [i for i, b in enumerate(data) if b in b"{}[]"]
        if idx:
            data[rng.choice(idx)] = rng.choice(b"{}[]")
    return bytes(data), "raw.%s" % op


# --------------------------------------------------------------------------
# JWS
# --------------------------------------------------------------------------
def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Signer:
    def __init__(self, listed_pem, other_pem):
        self.listed = serialization.load_pem_private_key(listed_pem, None)
        self.other = serialization.load_pem_private_key(other_pem, None)

    def sign(self, signing_input, how="ps512"):
        data = signing_input.encode("ascii")
        if how == "ps512":
            return self.listed.sign(data, padding.PSS(padding.MGF1(hashes.SHA512()), 64), hashes.SHA512())
        if how == "other-key":
            return self.other.sign(data, padding.PSS(padding.MGF1(hashes.SHA512()), 64), hashes.SHA512())
        if how == "rs512":
            return self.listed.sign(data, padding.PKCS1v15(), hashes.SHA512())
        if how == "salt32":
            return self.listed.sign(data, padding.PSS(padding.MGF1(hashes.SHA512()), 32), hashes.SHA512())
        if how == "salt-max":
            return self.listed.sign(data, padding.PSS(padding.MGF1(hashes.SHA512()), padding.PSS.MAX_LENGTH),
                                    hashes.SHA512())
        if how == "sha256":
            return self.listed.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        if how == "mgf1-sha256":
            return self.listed.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 64), hashes.SHA512())
        raise ValueError(how)

    def jws(self, header_bytes, payload_bytes, how="ps512"):
        si = b64url(header_bytes) + "." + b64url(payload_bytes)
        return si + "." + b64url(self.sign(si, how))


def split_jws(token):
    """(header dict, payload dict) of a compact JWS from the sandbox."""
    h, p, _ = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p))


# --------------------------------------------------------------------------
# The plan of a call
# --------------------------------------------------------------------------
class Plan:
    def __init__(self, seed=0, call=0, mutate=False, rate=0.5, slow=False, wire_rate=0.25):
        self.seed, self.call, self.mutate = seed, call, mutate
        self.hook = None            # hook(server, endpoint, answer, idx): a fixed edit instead of random ones
        self.rate = rate            # probability that one request's answer is mutated
        self.slow = slow            # may use slow mutations (timeouts)
        self.wire_rate = wire_rate  # share of mutated answers that get a wire-level mutation


PAYLOAD_KEYS = ("preauthorization_code", "reference_code", "access_token", "refresh_token", "value", "expires_on",
                "sub", "consentid", "exp", "nbf", "identifier", "token_type", "id")
BODY_KEYS = ("token", "session", "key", "expiry", "id", "error", "code", "message", "reference")
HEADER_KEYS = ("alg", "jku", "kid", "typ")
JWKS_KEYS = ("keys", "kid", "kty", "n", "e", "pem", "use", "alg")
API_CODES = ["InvalidToken", "InvalidClient", "InvalidRedirectUri", "InsufficientScope", "SDKInvalid",
             "SDKVersionInvalid", "ServiceAuthorizationError", "InvalidGrant", "ValidationErrors",
             "InvalidRequest", "Unknown"]


class Answer:
    """An answer on its way out: status, headers [(name, value) as str or bytes], body bytes."""

    def __init__(self, status, headers, body, reason=None):
        self.status, self.headers, self.body = status, list(headers), body
        self.reason = reason
        self.names = []               # mutations applied
        self.token_payload = None     # the token payload sent (python, or None)
        self.location = None          # the Location sent (onboarding)
        self.force_wire = None        # a hook may name a wire mutation (without "wire.")

    def header(self, name):
        for k, v in self.headers:
            if (k if isinstance(k, str) else k.decode("latin-1")).lower() == name.lower():
                return v
        return None

    def set_header(self, name, value):
        self.headers = [(k, v) for k, v in self.headers
                        if (k if isinstance(k, str) else k.decode("latin-1")).lower() != name.lower()]
        if value is not None:
            self.headers.append((name, value))


class Mutator:
    """The semantic mutations (everything but wire.*), for one answer."""

    def __init__(self, server, rng, endpoint, plan):
        self.s, self.rng, self.endpoint, self.plan = server, rng, endpoint, plan

    # --- token inside an API answer
    def mutate_token(self, header, payload):
        """Returns the compact token to send and records the payload."""
        rng = self.rng
        hb, pb = dumps(header), dumps(payload)
        how = "ps512"
        names = []
        c = rng.randrange(20)
        if c < 8:
            payload, n = mutate_tree(rng, payload, PAYLOAD_KEYS)
            pb = dumps(payload, ascii_only=rng.random() < 0.7)
            names.append("jws.payload-" + n)
        elif c < 10:
            pb, n = mutate_bytes(rng, pb)
            names.append("jws.payload-" + n)
        elif c < 13:
            header, n = self.mutate_header(header)
            hb = dumps(header, ascii_only=rng.random() < 0.7)
            names.append("jws.header-" + n)
        elif c < 14:
            hb, n = mutate_bytes(rng, hb)
            names.append("jws.header-" + n)
        elif c < 16:
            how = rng.choice(["other-key", "rs512", "salt32", "salt-max", "sha256", "mgf1-sha256"])
            names.append("jws.sign-" + how)
        else:
            token = self.s.signer.jws(hb, pb)
            token, n = self.mutate_compact(token)
            names.append(n)
            self.record_payload(pb)
            return token, names
        token = self.s.signer.jws(hb, pb, how)
        self.record_payload(pb)
        return token, names

    def record_payload(self, pb):
        try:
            self.payload_sent = json.loads(pb.decode("utf-8"))
        except Exception:
            self.payload_sent = None

    def mutate_header(self, header):
        rng = self.rng
        h = dict(header)
        c = rng.randrange(10)
        origin = self.s.origin
        if c == 0:
            h["alg"] = rng.choice(["RS512", "none", "HS512", "ps512", "PS512 ", "PS256", "", "PS512\x00", 512, None,
                                   ["PS512"], "P\u0405512"])
            return h, "alg"
        if c in (1, 2):
            port = int(origin.rsplit(":", 1)[1])
            h["jku"] = rng.choice([
                origin + API + "jwks/oauth?x=" + str(rng.randrange(10 ** 9)),   # same origin, new URL
                origin + API + "jwks/" + "a" * rng.randrange(1, 3000),
                origin + "/" + str(rng.randrange(10 ** 9)),
                origin + API + "oauth/token",
                origin + "/_none_",
                origin,
                origin + API + "jwks/oauth#frag",
                origin.replace("127.0.0.1", "localhost") + API + "jwks/oauth",
                origin.replace("https:", "http:") + API + "jwks/oauth",
                "https://127.0.0.1:%d%sjwks/oauth" % (port + 1, API),
                "https://user:pw@127.0.0.1:%d%sjwks/oauth" % (port, API),
                "https://127.0.0.1:%d@evil.example%sjwks/oauth" % (port, API),
                "https://evil.example/jwks",
                origin + API + "jwks/oauth" + "/.." * 50,
                origin + API + "jwks/%00",
                origin + API + "jwks/\u00e9\u20ac",
                "//127.0.0.1:%d%sjwks/oauth" % (port, API),
                "https://127.0.0.1:%d%s" % (port, "x" * 20000),
                "file:///etc/passwd", "", "\x00", 5, None, ["x"], {"u": origin},
                origin + API + "jwks/oauth\r\nX-Injected: 1",
            ])
            return h, "jku"
        if c in (3, 4):
            h["kid"] = rng.choice(["", "sandbox-2", "SANDBOX-1", "sandbox-1 ", "sandbox-1\x00", "k" * 100000,
                                   "\x1b[31m\n", 1, None, ["sandbox-1"], "sandbox-unlisted", hostile_string(rng)])
            return h, "kid"
        if c == 5:
            del h[rng.choice(list(h))]
            return h, "remove"
        if c == 6:
            h[rng.choice(["crit", "b64", "x5u", "jwk", "x5c", "zip", "cty", "typ"])] = rng.choice(
                [["exp"], False, "https://evil.example/", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "DEF", "JOSE"])
            return h, "extra"
        h, n = mutate_tree(rng, h, HEADER_KEYS)
        return h, n

    def mutate_compact(self, token):
        rng = self.rng
        h, p, s = token.split(".")
        c = rng.randrange(16)
        if c == 0:
            return h + "." + p, "jws.two-parts"
        if c == 1:
            return token + "." + s, "jws.four-parts"
        if c == 2:
            return h + "." + p + ".", "jws.empty-signature"
        if c == 3:
            return h + ".." + s, "jws.empty-payload"
        if c == 4:
            return "." + p + "." + s, "jws.empty-header"
        if c == 5:
            pos = rng.randrange(len(token))
            return token[:pos] + rng.choice(["=", "+", "/", " ", "\n", "\t", "%", "!", "\u00e9", "\x00"]) + \
                token[pos:], "jws.bad-alphabet"
        if c == 6:
            return h + "=." + p + "." + s, "jws.padding"
        if c == 7:
            return h + "." + p + "." + s + "A", "jws.len-mod4-1"
        if c == 8:
            sig = bytearray(b64url_decode(s))
            sig[rng.randrange(len(sig))] ^= 1 << rng.randrange(8)
            return h + "." + p + "." + b64url(bytes(sig)), "jws.signature-flip"
        if c == 9:
            return h + "." + p + "." + s[: rng.randrange(len(s))], "jws.signature-truncated"
        if c == 10:
            return h + "." + p + "." + b64url(os.urandom(rng.choice([1, 255, 257, 512, 4096, 600000]))), \
                "jws.signature-size"
        if c == 11:
            return "", "jws.empty"
        if c == 12:
            return token[: rng.randrange(len(token))], "jws.truncated"
        if c == 13:
            return " " + token + " ", "jws.whitespace"
        if c == 14:
            return "." * rng.choice([2, 3, 100]), "jws.dots"
        return h.upper() + "." + p + "." + s, "jws.case"

    # --- whole answers
    def api_answer(self, ans):
        """An API answer (JSON body, maybe with a token)."""
        rng = self.rng
        try:
            body = json.loads(ans.body)
        except Exception:
            body = None
        c = rng.randrange(20)
        if isinstance(body, dict) and isinstance(body.get("token"), str) and body["token"].count(".") == 2 and c < 9:
            header, payload = split_jws(body["token"])
            self.payload_sent = None
            token, names = self.mutate_token(header, payload)
            body["token"] = token
            if rng.random() < 0.15:
                body, n = mutate_tree(rng, body, ("session", "key", "expiry"))
                names.append("json.body-" + n)
            ans.body = dumps(body, ascii_only=rng.random() < 0.8)
            ans.names += names
            ans.token_payload = self.payload_sent
            return
        if c < 13 and body is not None:
            body, n = mutate_tree(rng, body, BODY_KEYS)
            ans.body = dumps(body, ascii_only=rng.random() < 0.7)
            ans.names.append("json.body-" + n)
            return
        if c < 15:
            ans.body, n = mutate_bytes(rng, ans.body)
            ans.names.append(n)
            return
        self.status_mutation(ans)

    def status_mutation(self, ans):
        rng = self.rng
        c = rng.randrange(6)
        if c == 0:
            ans.status = rng.choice([200, 201, 202, 204, 206, 299, 300, 301, 302, 304, 307, 400, 401, 404, 418, 500,
                                     511, 599, 600, 999])
            if ans.status in (301, 302, 307):
                ans.set_header("Location", rng.choice(["https://evil.example/", self.s.origin + API + "jwks/oauth",
                                                       "/" + "a" * 5000]))
            ans.names.append("status.%d" % ans.status)
            return
        if c <= 2:
            status = rng.choice([400, 401, 401, 403, 404, 406, 409, 500, 511, 200, 201])
            err = {"code": rng.choice(API_CODES), "message": "m", "reference": "R" * 32}
            err, n = mutate_tree(rng, err, ("code", "message", "reference")) if rng.random() < 0.8 else (err, "plain")
            body = {"error": err}
            if rng.random() < 0.2:
                body = rng.choice([{"error": rng.choice(API_CODES), "message": hostile_string(rng)},
                                   {"error": hostile_value(rng), "message": hostile_value(rng)},
                                   {"message": "top", "error": err}])
            ans.status = status
            ans.body = dumps(body, ascii_only=rng.random() < 0.5)
            ans.set_header("Content-Type", "application/json")
            ans.names.append("error.body-" + n)
            if status == 401 and rng.random() < 0.3:
                # the 401 InvalidToken that makes digime refresh and retry
                ans.body = dumps({"error": {"code": "InvalidToken", "message": "The token (access_token) is invalid",
                                            "reference": "R" * 32}})
                ans.names.append("error.invalid-token")
            return
        if c == 3:
            ans.status = rng.choice([400, 401, 404, 500])
            ans.body = rng.choice([b"", b"{}", b"[]", b"<html>err</html>", b"null"])

            def hv():
                v = rng.choice([hostile_string(rng).encode("utf-8", "surrogatepass"), b"\xff\xfe\x80", b"\xe2\x82",
                                b"x" * rng.choice([10, 600, 90000]), b"\x01\x1b[2J", "\u20ac".encode() * 200,
                                b"InvalidToken"])
                return v.replace(b"\r", b"").replace(b"\n", b"")
            ans.set_header("X-Error-Code", hv() if rng.random() < 0.7 else rng.choice(API_CODES))
            ans.set_header("X-Error-Message", hv())
            if rng.random() < 0.7:
                ans.set_header("X-Error-Reference", hv())
            ans.names.append("error.x-error-headers")
            return
        if c == 4:
            ans.status = rng.choice([429, 503, 502, 504])
            if rng.random() < 0.8:
                ans.set_header("Retry-After", rng.choice(["0", "1", "11", "-1", "99999999999999999999", "abc", "",
                                                          "1.5", "Wed, 21 Oct 2015 07:28:00 GMT",
                                                          "Fri, 31 Dec 9999 23:59:59 GMT", " 1", "1, 2",
                                                          "\x01", "0" * 1000]))
            ans.names.append("status.retry-%d" % ans.status)
            return
        ans.set_header("Content-Type", rng.choice([
            "text/html", "application/json; charset=latin1", "", "\x01\x1b[31m", b"application/\xff\xfe",
            "a" * rng.choice([100, 5000, 60000]), "application/jwt", "multipart/form-data; boundary=x"]))
        ans.names.append("status.content-type")

    def jwks_answer(self, ans):
        rng = self.rng
        try:
            doc = json.loads(ans.body)
            jwk = doc["keys"][0]
        except Exception:
            return self.api_answer(ans)
        c = rng.randrange(22)
        n_b64, e_b64 = jwk["n"], jwk["e"]
        other = self.s.other_jwk

        def k(**kw):
            d = dict(jwk)
            for key, v in kw.items():
                if v is None:
                    d.pop(key, None)
                else:
                    d[key] = v
            return d
        name = None
        if c == 0:
            keys = [k(pem=None)]                                     # only n/e: must still verify
            name = "jwks.ne-only"
        elif c == 1:
            keys = [k(pem=None, n=rng.choice(["", "A", "AA", "=", "AQAB=", "!!", "A" * 5, n_b64 + "=",
                                               "AA" + n_b64, n_b64[:-10], n_b64[:50], "_" * 342,
                                               b64url(b"\x00" * 256), b64url(b"\xff" * 256),
                                               b64url(b"\x01" + b"\x00" * 255),
                                               b64url(b"\x80" + os.urandom(254) + b"\x02"),   # even modulus
                                               hostile_value(rng)]))]
            name = "jwks.bad-n"
        elif c == 2:
            keys = [k(pem=None, e=rng.choice(["", "A", "AA", "AQ", "Aw", "AQAC", "AAEAAQ", b64url(b"\xff" * 300),
                                               b64url(b"\x01" * 256), n_b64, "AQAB=", hostile_value(rng)]))]
            name = "jwks.bad-e"
        elif c == 3:
            bits = rng.choice([8192, 16384, 16392, 65536, 1 << 20, 4 << 20])
            nbytes = bits // 8
            big = b64url(b"\xc3" + os.urandom(nbytes - 2) + b"\x01")
            if len(big) > 900000:
                big = big[:900000]
            keys = [k(pem=None, n=big)]
            name = "jwks.huge-n-%d" % bits
        elif c == 4:
            keys = [k(pem=None, kty=rng.choice(["EC", "oct", "rsa", "RSA ", "", None, 1, "OKP"]))]
            name = "jwks.kty"
        elif c == 5:
            keys = [k(use=rng.choice(["enc", "", "SIG", 1, None, ["sig"]]))]
            name = "jwks.use"
        elif c == 6:
            keys = [other, jwk] if rng.random() < 0.5 else [jwk, other]
            name = "jwks.duplicate-kid"
        elif c == 7:
            keys = [k(pem=rng.choice(["", "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
                                      jwk["pem"][: rng.randrange(len(jwk["pem"]))], jwk["pem"].replace("A", "B", 3),
                                      jwk["pem"] * 2, self.s.ec_pem, self.s.private_pem_text,
                                      self.s.weak_pem, "-----BEGIN PUBLIC KEY-----\n" + "QUFB" * 200000 +
                                      "\n-----END PUBLIC KEY-----\n", "\x00", hostile_string(rng)]))]
            name = "jwks.bad-pem"
        elif c == 8:
            keys = [jwk] * rng.choice([2, 50, 500])
            name = "jwks.many-keys"
        elif c == 9:
            keys = [k(kid=rng.choice(["", None, 1, "SANDBOX-1", "sandbox-1\x00", "sandbox-1 ", ["sandbox-1"]]))]
            name = "jwks.kid"
        elif c == 10:
            keys = [hostile_value(rng), jwk] if rng.random() < 0.5 else [jwk, hostile_value(rng)]
            name = "jwks.junk-entry"
        elif c == 11:
            doc = rng.choice([{"keys": {}}, {"keys": None}, {"keys": "x"}, {}, {"Keys": [jwk]}, [jwk], {"keys": []},
                              {"keys": [[]]}, {"keys": [jwk], "extra": deep(rng)}])
            ans.body = dumps(doc)
            ans.names.append("jwks.shape")
            return
        elif c == 12:
            keys = [k(pem=None, kid="sandbox-1"), k(kid="sandbox-1", n=other["n"], pem=None)]
            name = "jwks.kid-twice-ne"
        elif c in (13, 14, 15):
            doc, n = mutate_tree(rng, doc, JWKS_KEYS)
            ans.body = dumps(doc, ascii_only=rng.random() < 0.7)
            ans.names.append("jwks." + n)
            return
        elif c == 16:
            ans.body, n = mutate_bytes(rng, ans.body)
            ans.names.append("jwks." + n)
            return
        elif c == 17:
            self.status_mutation(ans)
            return
        elif c == 18:
            keys = [k(pem=self.s.pkcs1_pem)]
            name = "jwks.pkcs1-pem"
        elif c == 19:
            keys = [other]                                            # only the wrong key under kid sandbox-1
            name = "jwks.wrong-key"
        elif c == 20:
            keys = [dict(jwk, kid="k%d" % i) for i in range(rng.choice([10, 300]))] + [jwk]
            name = "jwks.many-kids"
        else:
            keys = [k(pem=None, n=n_b64, e=b64url(b"\x01\x00\x01" + b"\x00" * rng.choice([1, 60, 200])))]
            name = "jwks.big-e"
        doc["keys"] = keys
        ans.body = dumps(doc)
        ans.names.append(name)

    def onboard_answer(self, ans):
        rng = self.rng
        loc = ans.header("Location")
        if ans.status != 302 or not isinstance(loc, str):
            ans.body, n = mutate_bytes(rng, ans.body or b"<html></html>")
            ans.names.append("onboard." + n)
            return
        u = urllib.parse.urlsplit(loc)
        pairs = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
        base = loc.split("?", 1)[0]
        q = u.query
        c = rng.randrange(22)
        if c == 0:
            i = rng.randrange(len(pairs))
            pairs.insert(i, pairs[i])
            q = urllib.parse.urlencode(pairs)
            name = "loc.repeat-param"
        elif c == 1:
            i = rng.randrange(len(pairs))
            name = "loc.drop-" + pairs[i][0]
            del pairs[i]
            q = urllib.parse.urlencode(pairs)
        elif c == 2:
            pos = rng.randrange(len(q) + 1)
            q = q[:pos] + rng.choice(["%", "%z", "%zz", "%0", "%G0", "%%", "%00", "%ff", "%C0%80", "%ED%A0%80",
                                      "%E2%82", "%0a", "%1b", "+", "&", "=", "&&", "==", "#", "%25"]) + q[pos:]
            name = "loc.percent"
        elif c == 3:
            q = q + "&" + rng.choice(["x=" + "y" * rng.choice([100, 16400, 70000]),
                                      "&".join("p%d=%d" % (i, i) for i in range(rng.choice([10, 3000])))])
            name = "loc.huge"
        elif c == 4:
            q = ""
            name = "loc.no-query"
        elif c == 5:
            pairs = [("success", "false"), ("errorCode", hostile_string(rng))] + \
                [p for p in pairs if p[0] == "state"]
            q = urllib.parse.urlencode(pairs)
            name = "loc.success-false"
        elif c == 6:
            pairs = [(k, rng.choice(["TRUE", "1", "", "true ", "yes", "false\x00", "t" * 2000]) if k == "success"
                      else v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs)
            name = "loc.success-value"
        elif c == 7:
            pairs = [(k, hostile_string(rng) if k == "state" else v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs)
            name = "loc.state"
        elif c == 8:
            pairs = [(k, rng.choice(["", "x", hostile_string(rng)]) if k == "code" else v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs)
            name = "loc.code"
        elif c == 9:
            pairs = [(k, hostile_string(rng) if k == "accountReference" else v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs)
            name = "loc.account-reference"
        elif c == 10:
            rng.shuffle(pairs)
            q = urllib.parse.urlencode(pairs)
            name = "loc.shuffled"
        elif c == 11:
            loc2 = rng.choice([q, "?" + q, base + "#" + q, base + "?" + q + "#frag", "no-scheme?" + q,
                               "https://?" + q, "https:///x?" + q, "https://[::1?" + q, " " + base + "?" + q,
                               base.replace("https", "javascript") + "?" + q, "://?" + q, q.replace("&", ";")])
            ans.set_header("Location", loc2)
            ans.location = loc2
            ans.names.append("loc.shape")
            return
        elif c == 12:
            q = q.replace("=", "", 1)
            name = "loc.no-equals"
        elif c == 13:
            q = "&" + q + "&"
            name = "loc.empty-params"
        elif c == 14:
            q = urllib.parse.quote(q, safe="")
            name = "loc.encoded-query"
        elif c == 15:
            pairs = [(k.upper() if rng.random() < 0.5 else k, v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs)
            name = "loc.case"
        elif c == 16:
            pairs = [(k, v + rng.choice(["\x00", "\x01", "\u00e9", "\ud800", "\u20ac" * 3000, " ", "+"])
                      if k != "code" else v) for k, v in pairs]
            q = urllib.parse.urlencode(pairs, encoding="utf-8", errors="surrogatepass")
            name = "loc.param-bytes"
        else:
            lb = loc.encode("latin-1", "replace")
            lb, n = mutate_bytes(rng, lb)
            loc2 = lb.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")
            ans.set_header("Location", loc2)
            ans.location = loc2
            ans.names.append("loc." + n)
            return
        loc2 = base + ("?" + q if q or rng.random() < 0.5 else "")
        ans.set_header("Location", loc2)
        ans.location = loc2
        ans.names.append(name)


# --------------------------------------------------------------------------
# Wire plans
# --------------------------------------------------------------------------
class Wire:
    """How an answer goes on the wire: segments (bytes, delay before), then close or hold."""

    def __init__(self):
        self.segments = []
        self.close = False
        self.hold = False

    def add(self, data, delay=0.0):
        self.segments.append((data, delay))


def _b(x):
    return x if isinstance(x, bytes) else x.encode("latin-1", "replace")


def head_bytes(status, reason, headers, version=b"HTTP/1.1"):
    lines = [version + b" " + _b(str(status)) + b" " + _b(reason or "X")]
    for k, v in headers:
        lines.append(_b(k) + b": " + _b(v))
    return b"\r\n".join(lines) + b"\r\n\r\n"


GZIP_BOMB = None

# wire mutations after which a client that reads the answer at all reads exactly its body
EXACT_WIRE = {"wire.no-cl-close", "wire.chunked", "wire.drip", "wire.huge-header", "wire.many-headers",
              "wire.gzip", "wire.http10", "wire.extra-response", "wire.1xx-first", "wire.close-now",
              "wire.close-early", "wire.silence", "wire.cl-long-hold", "wire.drip-slow", "wire.extra-copy",
              "wire.extra-late"}


def gzip_bomb():
    global GZIP_BOMB
    if GZIP_BOMB is None:
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        chunk = b"\x00" * MB
        parts = [co.compress(chunk) for _ in range(64)]
        parts.append(co.flush())
        GZIP_BOMB = b"".join(parts)
    return GZIP_BOMB


def plain_wire(ans):
    w = Wire()
    headers = [(k, v) for k, v in ans.headers if _b(k).lower() not in (b"content-length", b"connection",
                                                                      b"transfer-encoding")]
    headers.append(("Content-Length", str(len(ans.body))))
    w.add(head_bytes(ans.status, ans.reason, headers) + ans.body)
    return w


def wire_mutation(rng, ans, slow, name=None):
    """A hostile wire plan for the answer (the named one, or a random one); returns (Wire, name)."""
    body = ans.body
    base = [(k, v) for k, v in ans.headers if _b(k).lower() not in (b"content-length", b"connection",
                                                                   b"transfer-encoding")]
    st, rs = ans.status, ans.reason
    w = Wire()
    choices = ["truncate-close", "cl-short", "cl-long-close", "no-cl-close", "chunked", "chunked-bad",
               "chunked-and-cl", "cl-garbage", "cl-dup", "drip", "huge-header", "many-headers", "huge-body",
               "gzip", "gzip-bomb", "encoding-bad", "status-line", "header-garbage", "close-now", "close-early",
               "bitflip", "1xx-first", "http10", "extra-response", "extra-copy", "extra-late"]
    if slow:
        choices += ["cl-long-hold", "drip-slow", "silence"]
    name = name or rng.choice(choices)
    if name == "truncate-close":
        k = rng.randrange(len(body) + 1)
        w.add(head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body[:k])
        w.close = True
    elif name == "cl-short":
        k = rng.randrange(len(body) + 1)
        w.add(head_bytes(st, rs, base + [("Content-Length", str(k))]) + body)
        w.close = True          # the rest of the body stays on the connection for the next request
    elif name in ("cl-long-close", "cl-long-hold"):
        w.add(head_bytes(st, rs, base + [("Content-Length", str(len(body) + rng.choice([1, 10, 100000])))]) + body)
        w.close = name == "cl-long-close"
        w.hold = name == "cl-long-hold"
    elif name == "no-cl-close":
        w.add(head_bytes(st, rs, base + [("Connection", "close")]) + body)
        w.close = True
    elif name in ("chunked", "chunked-bad", "chunked-and-cl"):
        hdr = base + [("Transfer-Encoding", rng.choice(["chunked", "chunked", "Chunked", "gzip, chunked"]
                                                       if name != "chunked" else ["chunked"]))]
        if name == "chunked-and-cl":
            hdr.append(("Content-Length", str(rng.choice([0, 5, len(body)]))))
        out = bytearray()
        i = 0
        while i < len(body):
            n = rng.choice([1, 7, 100, 4096, 65536])
            piece = body[i: i + n]
            ext = rng.choice([b"", b"", b";a=b", b";" + b"x" * 5000])
            out += ("%x" % len(piece)).encode() + ext + b"\r\n" + piece + b"\r\n"
            i += n
        if name == "chunked-bad":
            bad = rng.choice([b"zz\r\n", b"-1\r\n", b"ffffffffffffffffffff\r\n", b"7fffffffffffffff\r\nabc",
                              b"1\r\nab\r\n", b"\r\n", b"0\r\nTrailer: " + b"x" * 200000 + b"\r\n\r\n",
                              b"10\r\n" + b"a" * 5 + b"\r\n"])
            cut = rng.randrange(len(out) + 1)
            out = out[:cut] + bad
            w.close = True
        else:
            out += b"0\r\n" + rng.choice([b"", b"X-Trailer: 1\r\n", b"Content-Length: 5\r\n"]) + b"\r\n"
        w.add(head_bytes(st, rs, hdr) + bytes(out))
    elif name == "cl-garbage":
        v = rng.choice(["abc", "-1", "1e3", "99999999999999999999", " %d " % len(body), "+%d" % len(body), "",
                        "0x10", "%d, %d" % (len(body), len(body)), "%d\x00" % len(body), "18446744073709551616"])
        w.add(head_bytes(st, rs, base + [("Content-Length", v)]) + body)
        w.close = True
    elif name == "cl-dup":
        w.add(head_bytes(st, rs, base + [("Content-Length", str(len(body))),
                                         ("Content-Length", str(rng.choice([0, len(body) + 1, len(body) - 1])))])
              + body)
        w.close = True
    elif name in ("drip", "drip-slow"):
        data = head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body
        budget = 0.25 if name == "drip" else 3.0
        i = 0
        while i < len(data):
            n = rng.choice([1, 2, 5, 16, 64, 512]) if budget > 0 else len(data)
            delay = rng.choice([0, 0.001, 0.005, 0.02]) if name == "drip" else 0.3
            if budget <= 0:
                delay = 0
            budget -= delay
            w.add(data[i: i + n], delay)
            i += n
    elif name == "huge-header":
        v = "h" * rng.choice([8000, 90000, 110000, 300000])
        w.add(head_bytes(st, rs, base + [(rng.choice(["X-Big", "X-Error-Message", "Content-Type", "Retry-After",
                                                      "X-Error-Code"]), v),
                                         ("Content-Length", str(len(body)))]) + body)
        w.close = True
    elif name == "many-headers":
        n = rng.choice([100, 3000, 20000])
        w.add(head_bytes(st, rs, base + [("X-H%d" % i, "v") for i in range(n)] +
                         [("Content-Length", str(len(body)))]) + body)
        w.close = True
    elif name == "huge-body":
        size = rng.choice([MB - 1, MB, MB + 1, 3 * MB // 2, 3 * MB])
        filler = b'{"token":"' + b"A" * (size - 12) + b'"}'
        how = rng.choice(["cl", "chunked", "close"])
        if how == "cl":
            w.add(head_bytes(st, rs, base + [("Content-Length", str(len(filler)))]) + filler)
        elif how == "chunked":
            out = bytearray()
            for i in range(0, len(filler), 65536):
                piece = filler[i: i + 65536]
                out += ("%x\r\n" % len(piece)).encode() + piece + b"\r\n"
            w.add(head_bytes(st, rs, base + [("Transfer-Encoding", "chunked")]) + bytes(out) + b"0\r\n\r\n")
        else:
            w.add(head_bytes(st, rs, base + [("Connection", "close")]) + filler)
        w.close = True
    elif name == "gzip":
        enc = rng.choice(["gzip", "deflate"])
        comp = gzip.compress(body) if enc == "gzip" else zlib.compress(body)
        w.add(head_bytes(st, rs, base + [("Content-Encoding", enc), ("Content-Length", str(len(comp)))]) + comp)
    elif name == "gzip-bomb":
        bomb = gzip_bomb()
        w.add(head_bytes(st, rs, base + [("Content-Encoding", "gzip"), ("Content-Length", str(len(bomb)))]) + bomb)
        w.close = True
    elif name == "encoding-bad":
        enc = rng.choice(["gzip", "deflate", "br", "zstd", "x-unknown", "gzip, gzip", "identity, gzip"])
        data = rng.choice([body, gzip.compress(body)[:-8], b"\x1f\x8b" + os.urandom(100), os.urandom(50)])
        w.add(head_bytes(st, rs, base + [("Content-Encoding", enc), ("Content-Length", str(len(data)))]) + data)
        w.close = True
    elif name == "status-line":
        line = rng.choice([b"HTTP/1.1 abc OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 99 X", b"HTTP/1.1 -200 X",
                           b"HTTP/1.1 200", b"HTTP/2 200 OK", b"HTTP/1.1  200  OK", b"ICY 200 OK", b"http/1.1 200 ok",
                           b"HTTP/1.1 200 \xff\xfe", b"HTTP/1.1 200 " + b"R" * 100000, b"", b"\x00\x00\x00",
                           b"HTTP/1.1 201 Created\x00x", b"HTTP/9.9 201 Created", b"HTTP/1.1 0 X"])
        w.add(line + b"\r\n" + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        w.close = True
    elif name == "header-garbage":
        g = rng.choice([b"NoColonHere", b" folded: continuation", b"X-Nul: a\x00b", b"X-High: \xff\xfe\x80",
                        b"Bad Name: v", b": empty-name", b"X-Ctl: \x01\x1b", b"\tX-Tab: 1",
                        b"Content-Type: application/json\r\n folded", b"X-Error-Code\x00: InvalidToken",
                        b"HTTP/1.1 200 OK"])
        head = head_bytes(st, rs, base + [("Content-Length", str(len(body)))])
        head = head[:-2] + g + b"\r\n\r\n"
        w.add(head + body)
        w.close = True
    elif name == "close-now":
        w.close = True
    elif name == "close-early":
        data = head_bytes(st, rs, base + [("Content-Length", str(len(body)))])
        w.add(data[: rng.randrange(1, len(data))])
        w.close = True
    elif name == "bitflip":
        data = bytearray(head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body)
        for _ in range(rng.choice([1, 2, 5, 20])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        w.add(bytes(data))
        w.close = True
    elif name == "1xx-first":
        pre = rng.choice([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n",
                          b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
                          b"HTTP/1.1 100 Continue\r\n\r\n" * 50, b"HTTP/1.1 199 Odd\r\nContent-Length: 3\r\n\r\nabc"]
                         # a 101 makes the client wait for the upgraded protocol: a timeout
                         + ([b"HTTP/1.1 101 Switching Protocols\r\n\r\n"] if slow else []))
        w.add(pre + head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body)
        w.close = rng.random() < 0.5
    elif name == "http10":
        w.add(head_bytes(st, rs, base, version=b"HTTP/1.0") + body)
        w.close = True
    elif name == "extra-response":
        w.add(head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body +
              head_bytes(401, "X", [("Content-Type", "application/json"), ("Content-Length", "2")]) + b"{}")
        # the client reads the second response as the answer to its next request on this
        # connection (curl takes a TLS connection with pending bytes for alive); closed, so
        # that this happens once per connection
        w.close = True
    elif name in ("extra-late", "extra-late-keep"):
        # a copy of the answer a little later, in a TLS record of its own: the client has
        # finished reading the answer by then and cannot see it as excess of that read.
        # extra-late-keep (never chosen at random) keeps the connection open.
        one = head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body
        w.add(one)
        w.add(one, 0.05)
        w.close = name == "extra-late"
    elif name in ("extra-copy", "extra-copy-keep"):
        # the same answer twice: the copy is a valid answer to the next request on the
        # connection.  extra-copy-keep (never chosen at random) keeps the connection open, so
        # that every later answer on it is one request late.
        one = head_bytes(st, rs, base + [("Content-Length", str(len(body)))]) + body
        w.add(one + one)
        w.close = name == "extra-copy"
    elif name == "silence":
        w.hold = True
    return w, "wire." + name


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def setup(self):
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def log_message(self, *a):
        pass

    def _read_body(self):
        n = self.headers.get("Content-Length")
        return self.rfile.read(int(n)) if n else b""

    def _handle(self):
        s = self.server.hostile
        body = self._read_body()
        plan, idx = s.next_request()
        rng = random.Random("%s/%s/%s" % (plan.seed, plan.call, idx))
        path = self.path
        endpoint = s.endpoint_of(self.command, path)
        ans = s.upstream_answer(self.command, path, dict(self.headers), body, endpoint)
        exact = True
        if plan.hook is not None:
            plan.hook(s, endpoint, ans, idx)
            if ans.force_wire:
                wire, n = wire_mutation(rng, ans, True, ans.force_wire)
                ans.names.append(n)
                exact = n in EXACT_WIRE
            else:
                wire = plain_wire(ans)
        elif plan.mutate and rng.random() < plan.rate:
            do_wire = rng.random() < plan.wire_rate
            if not do_wire or rng.random() < 0.3:
                m = Mutator(s, rng, endpoint, plan)
                if endpoint == "jwks":
                    m.jwks_answer(ans)
                elif endpoint == "onboard":
                    m.onboard_answer(ans)
                else:
                    m.api_answer(ans)
            if do_wire:
                wire, n = wire_mutation(rng, ans, plan.slow)
                ans.names.append(n)
                exact = n in EXACT_WIRE
            else:
                wire = plain_wire(ans)
        else:
            wire = plain_wire(ans)
        if ans.location is None and endpoint == "onboard":
            ans.location = ans.header("Location")
        record = {"idx": idx, "method": self.command, "path": path.split("?")[0], "endpoint": endpoint,
                  "mutations": ans.names, "status": ans.status, "location": ans.location,
                  "body_len": len(ans.body), "body": None, "token_payload": None, "exact": exact}
        if endpoint not in ("jwks", "onboard") and len(ans.body) <= MB:
            # what digime would read, as Python reads it (for the driver's oracle)
            try:
                doc = json.loads(ans.body, parse_float=decimal.Decimal, parse_int=decimal.Decimal)
                record["body"] = doc
                if isinstance(doc, dict) and isinstance(doc.get("token"), str):
                    record["token_payload"] = json.loads(b64url_decode(doc["token"].split(".")[1]),
                                                         parse_float=decimal.Decimal, parse_int=decimal.Decimal)
            except Exception:
                pass
        s.add_record(plan, record)
        self._send(wire)

    def _send(self, wire):
        try:
            for data, delay in wire.segments:
                if delay:
                    time.sleep(delay)
                if data:
                    self.wfile.write(data)
            if wire.hold:
                self.connection.settimeout(15)
                try:
                    while self.connection.recv(65536):
                        pass
                except (OSError, ssl.SSLError):
                    pass
                self.close_connection = True
            elif wire.close:
                self.close_connection = True
        except (OSError, ssl.SSLError):
            self.close_connection = True


class _TLSServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, handler, context, hostile):
        self.hostile = hostile
        super().__init__(addr, handler)
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request, client_address):
        pass        # clients that give up are expected


class HostileServer:
    """The proxy.  upstream: sandbox origin (https://127.0.0.1:PORT); sandbox_dir: its --dir."""

    def __init__(self, upstream, sandbox_dir, host="127.0.0.1", port=0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.sandbox_dir = sandbox_dir
        rd = lambda name: open(os.path.join(sandbox_dir, name), "rb").read()   # noqa: E731
        self.signer = Signer(rd("jwks-sandbox-1.key"), rd("jwks-sandbox-unlisted.key"))
        self.ca_file = os.path.join(sandbox_dir, "ca.pem")
        self.client_ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(os.path.join(sandbox_dir, "server.pem"), os.path.join(sandbox_dir, "server.key"))
        self.server = _TLSServer((host, port), Handler, ctx, self)
        self.port = self.server.server_address[1]
        self.origin = "https://%s:%d" % (host, self.port)
        self.base_url = self.origin + API
        self.onboard_url = self.origin + ONBOARD
        self.jku = self.base_url + "jwks/oauth"
        self.lock = threading.Lock()
        self.plan = Plan()
        self.counter = 0
        self.records = []
        self.local = threading.local()
        self.jwks_body = None
        self._keys_for_mutations()
        self.thread = None

    def _keys_for_mutations(self):
        pub = self.signer.other.public_key().public_numbers()
        listed = self.signer.listed.public_key()
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        e = pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")
        self.other_jwk = {"kid": LISTED_KID, "kty": "RSA", "alg": "PS512", "use": "sig", "n": b64url(n),
                          "e": b64url(e)}
        self.pkcs1_pem = listed.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.PKCS1).decode()
        self.ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.weak_pem = rsa.generate_private_key(65537, 1024).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        # a private key PEM where a public one belongs (a throwaway key, not a secret of the suite)
        self.private_pem_text = rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()

    # --- lifecycle
    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # --- plan and records
    def begin(self, plan):
        with self.lock:
            self.plan = plan
            self.counter = 0
            self.records = []

    def next_request(self):
        with self.lock:
            idx = self.counter
            self.counter += 1
            return self.plan, idx

    def add_record(self, plan, record):
        with self.lock:
            if plan is self.plan:
                self.records.append(record)

    def take_records(self):
        with self.lock:
            return sorted(self.records, key=lambda r: r["idx"])

    # --- upstream
    def endpoint_of(self, method, path):
        p = path.split("?")[0]
        if p.startswith(ONBOARD):
            return "onboard"
        if p.startswith(API):
            rest = p[len(API):]
            if rest in ("oauth/authorize", "oauth/token", "oauth/token/reference", "reference"):
                return rest
            if method == "GET" and (rest.startswith("jwks") or "jwks" in path):
                return "jwks"
        if method == "GET" and path.startswith("/") and not path.startswith("/_sandbox"):
            return "jwks"           # any other same-origin jku: serve the key set
        return "other"

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPSConnection(self.upstream.hostname, self.upstream.port, context=self.client_ctx,
                                            timeout=30)
            self.local.conn = c
        return c

    def _forward(self, method, path, headers, body):
        fwd = {k: v for k, v in headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        for attempt in range(2):
            c = self._conn()
            try:
                c.request(method, path, body=body if method != "GET" else None, headers=fwd)
                r = c.getresponse()
                data = r.read()
                return r.status, r.reason, [(k, v) for k, v in r.getheaders()
                                            if k.lower() not in ("content-length", "connection", "date",
                                                                 "server")], data
            except (OSError, http.client.HTTPException):
                c.close()
                self.local.conn = None
                if attempt:
                    raise

    def resign(self, ans, header=None, payload=None, header_edit=None):
        """Re-signs the answer's token with the listed key after replacing or editing its header
        and/or payload (regression tests use this through Plan.hook)."""
        doc = json.loads(ans.body)
        h, p = split_jws(doc["token"])
        h = header if header is not None else h
        p = payload if payload is not None else p
        if header_edit:
            h = dict(h, **header_edit)
        doc["token"] = self.signer.jws(dumps(h), dumps(p))
        ans.body = dumps(doc)

    def upstream_answer(self, method, path, headers, body, endpoint):
        if endpoint == "jwks":
            if self.jwks_body is None:
                st, _, _, data = self._forward("GET", API + "jwks/oauth", {}, None)
                if st == 200:
                    self.jwks_body = data
            return Answer(200, [("Content-Type", "application/json")], self.jwks_body or b"{}", "OK")
        if endpoint == "other":
            return Answer(404, [("Content-Type", "application/json")],
                          b'{"error":{"code":"NotFound","message":"no such path","reference":"x"}}', "Not Found")
        st, reason, hdrs, data = self._forward(method, path, headers, body)
        ans = Answer(st, hdrs, data, reason)
        # normalise: re-sign the response token for this origin
        try:
            doc = json.loads(data)
        except Exception:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("token"), str) and doc["token"].count(".") == 2:
            header, payload = split_jws(doc["token"])
            header["jku"] = self.jku
            doc["token"] = self.signer.jws(dumps(header), dumps(payload))
            ans.body = json.dumps(doc, separators=(",", ":")).encode()
            ans.token_payload = payload
        return ans


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="sandbox origin, https://127.0.0.1:PORT")
    ap.add_argument("--sandbox-dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--slow", action="store_true")
    a = ap.parse_args()
    s = HostileServer(a.upstream, a.sandbox_dir, port=a.port)
    s.begin(Plan(seed=a.seed, call=0, mutate=a.rate > 0, rate=a.rate, slow=a.slow))
    s.start()
    print(json.dumps({"port": s.port, "base_url": s.base_url, "onboard_url": s.onboard_url}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    s.stop()


if __name__ == "__main__":
    sys.exit(main())
