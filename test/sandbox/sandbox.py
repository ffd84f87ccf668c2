#!/usr/bin/python3
"""Local digi.me-compatible API sandbox for the digime extension's tests.

Speaks the user-authorization protocol of the digi.me API v1.7 (see
/work/shared/digime-api.md): PS512 client JWTs with nonce/timestamp checks,
oauth/authorize, oauth/token (code exchange and refresh with rotation),
oauth/token/reference, reference, a JWKS, and stand-ins for the onboarding
pages that redirect to the caller's callback.  It serves HTTPS with its own
test CA, records every request, and lets tests inject one-shot faults and
inspect state through a control API under /_sandbox/.  See README.md.

Runs with Debian's /usr/bin/python3 (3.11) and python3-cryptography only.
"""

import argparse
import base64
import datetime
import functools
import hashlib
import ipaddress
import itertools
import json
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import string
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

API = "/v1.7/"
ONBOARD = "/apps/saas/"
CONTROL = "/_sandbox/"
JWKS_PATH = API + "jwks/oauth"

LISTED_KID = "sandbox-1"          # published in the JWKS
UNLISTED_KID = "sandbox-unlisted"  # never published (unknown-kid tests)

ALNUM = string.ascii_letters + string.digits
NONCE_RE = re.compile(r"[A-Za-z0-9]{32}")
CHALLENGE_RE = re.compile(r"[A-Za-z0-9_-]{43}")
B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
MAX_BODY = 1 << 20
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # Linux: the peer shut down its side

DEFAULT_CONFIG = {
    "access_ttl": 86400,        # seconds
    "refresh_ttl": 604800,      # seconds
    "timestamp_window": 60,     # accepted clock skew of the client JWT, seconds
    "sdk_blocklist": [],        # agent.sdk.name values answered with SDKInvalid
    "min_sdk_version": None,    # agent.sdk.version below this -> SDKVersionInvalid
    "jwks_pem": "spki",         # form of the JWKS "pem" member: spki | pkcs1
    "latency_ms": {},           # fault endpoint -> extra milliseconds before processing
}

# Fault endpoints and the actions each accepts.  "delay" only waits, then the
# request is processed normally.
IMMEDIATE_ACTIONS = {"error", "raw", "hang", "close"}
COMMON_ACTIONS = IMMEDIATE_ACTIONS | {"delay"}
FAULT_ACTIONS = {
    "oauth/authorize": COMMON_ACTIONS | {"token", "body"},
    "oauth/token": COMMON_ACTIONS | {"token", "body"},
    "oauth/token/reference": COMMON_ACTIONS | {"token", "body"},
    "reference": COMMON_ACTIONS | {"body"},
    "jwks": COMMON_ACTIONS | {"body"},
    "onboard": COMMON_ACTIONS | {"fail"},
}
# Actions that change a successful answer (its token pair is then not "delivered").
ALTERING_ACTIONS = {"token", "body"}
TOKEN_SOURCES = ("exchange", "refresh", "reauthorize", "mint")
MAX_MINT = 100000

# Secrets that must never show up in the extension's logs (GET /_sandbox/secrets
# "values").  Codes that travel in browser URLs and session keys are listed
# separately under "by_kind" only.
SECRET_KINDS = ("access_token", "refresh_token", "authorization_code",
                "code_verifier_received", "refresh_token_received",
                "access_token_received", "code_received")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

class RandomPool:
    """os.urandom bytes, drawn 64 KiB at a time.  rand() mostly runs under the
    state lock, and os.urandom lets go of Python's interpreter lock: a thread that
    holds the state lock and gives the interpreter away may wait a whole switch
    interval (5 ms) to get it back, while every other request queues on the state
    lock behind it.  A refill does that once per ~1300 tokens instead of each time."""

    def __init__(self, size=65536):
        self.lock = threading.Lock()
        self.size, self.buf, self.pos = size, b"", 0

    def take(self, n):
        with self.lock:
            if self.pos + n > len(self.buf):
                self.buf, self.pos = os.urandom(max(self.size, n)), 0
            self.pos += n
            return self.buf[self.pos - n:self.pos]


RANDOM = RandomPool()


def rand(n):
    """n characters from [A-Za-z0-9], CSPRNG.  Bytes >= 248 (4 * 62) are skipped,
    so that every character is equally likely."""
    out = []
    while len(out) < n:
        out += [ALNUM[b % 62] for b in RANDOM.take(n + 8) if b < 248]
    return "".join(out[:n])


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """Strict base64url without padding (raises ValueError)."""
    if not B64URL_RE.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def s256(verifier):
    """RFC 7636 S256 code challenge of a code_verifier."""
    return b64url(hashlib.sha256(verifier.encode("utf-8")).digest())


def version_key(text, width):
    """Dotted numeric version as a tuple of ints (leading digits of each part, else 0)."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in text.split(".")]
    return tuple(parts + [0] * (width - len(parts)))


def version_lower(version, minimum):
    width = max(version.count("."), minimum.count(".")) + 1
    return version_key(version, width) < version_key(minimum, width)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_public_file(path, data):
    """Write atomically (temp file + rename) with mode 0644 whatever the umask."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(data)
    os.replace(tmp, path)


def load_rsa_public_key(pem):
    """RSA public key from SPKI or PKCS#1 PEM (a private key PEM is accepted too)."""
    data = pem.encode("utf-8")
    try:
        key = serialization.load_pem_public_key(data)
    except Exception:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except Exception:
            raise ValueError("cannot load a public key from the PEM") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the contract key must be RSA")
    return key


def pss(salt):
    return padding.PSS(mgf=padding.MGF1(hashes.SHA512()), salt_length=salt)


def sign_jws(key, header, payload, alg="PS512", salt=64, corrupt=False):
    """Compact JWS.  PS512 = RSASSA-PSS/SHA-512/MGF1-SHA-512 with the given salt
    length (64 is what digi.me uses; PyJWT would use the maximum, hence no PyJWT)."""
    signing_input = b64url(compact_json(header)) + "." + b64url(compact_json(payload))
    data = signing_input.encode("ascii")
    if alg == "RS512":
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA512())
    elif alg == "none":
        sig = b""
    else:
        sig = key.sign(data, pss(salt), hashes.SHA512())
    if corrupt and sig:
        sig = sig[:10] + bytes([sig[10] ^ 0xFF]) + sig[11:]
    return signing_input + "." + b64url(sig)


class PendingJWS:
    """A response JWT whose header and payload are final but which is signed only
    when the answer is rendered, outside the state lock: RSA signing is the most
    expensive step of a request, and it needs no shared state."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args  # sign_jws(key, header, payload, alg, salt, corrupt)

    def sign(self):
        return sign_jws(*self.args)


def render_json(obj):
    """compact_json that signs PendingJWS values on the way."""
    def default(value):
        if isinstance(value, PendingJWS):
            return value.sign()
        raise TypeError(f"cannot serialize {type(value).__name__}")
    return json.dumps(obj, separators=(",", ":"), default=default).encode("utf-8")


def parse_bearer(value):
    """Decode 'Bearer <compact JWS>'.

    Returns (record, parts): record is the request log's "jwt" entry (None when
    there is no Authorization header); parts is (header, claims, signing_input,
    signature) or None when the JWT cannot be parsed.
    """
    if value is None:
        return None, None
    scheme, _, raw = value.strip().partition(" ")
    raw = raw.strip()
    record = {"raw": raw or value, "header": None, "claims": None, "signature_valid": None}
    if scheme.lower() != "bearer":
        return record, None
    pieces = raw.split(".")
    if len(pieces) != 3:
        return record, None
    try:
        header = json.loads(b64url_decode(pieces[0]))
        claims = json.loads(b64url_decode(pieces[1]))
        signature = b64url_decode(pieces[2])
    except ValueError:
        return record, None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return record, None
    record["header"], record["claims"] = header, claims
    signing_input = (pieces[0] + "." + pieces[1]).encode("ascii")
    return record, (header, claims, signing_input, signature)


# --------------------------------------------------------------------------
# Keys and certificates
# --------------------------------------------------------------------------

class Pki:
    """Test CA, server certificate and the response-JWT signing keys.

    Everything is generated fresh at start and written to DIR with mode 0644
    (a PostgreSQL server running as another user reads ca.pem).
    """

    def __init__(self, directory):
        self.directory = directory
        self.ca_file = os.path.join(directory, "ca.pem")
        self.cert_file = os.path.join(directory, "server.pem")
        self.key_file = os.path.join(directory, "server.key")
        self.listed_key = self._new_key()
        self.unlisted_key = self._new_key()
        self._make_certificates()
        for kid, key in ((LISTED_KID, self.listed_key), (UNLISTED_KID, self.unlisted_key)):
            write_public_file(os.path.join(directory, f"jwks-{kid}.key"), self._private_pem(key))

    @staticmethod
    def _new_key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @staticmethod
    def _private_pem(key):
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def _make_certificates(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        day = datetime.timedelta(days=1)
        ca_key, server_key = self._new_key(), self._new_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "digime sandbox test CA")])

        def usage(**kw):
            flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                                   "data_encipherment", "key_agreement", "key_cert_sign",
                                   "crl_sign", "encipher_only", "decipher_only"), False)
            flags.update(kw)
            return x509.KeyUsage(**flags)

        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + 3650 * day)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + 365 * day)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True, key_encipherment=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        write_public_file(self.ca_file, ca_cert.public_bytes(pem))
        write_public_file(self.cert_file, server_cert.public_bytes(pem))
        write_public_file(self.key_file, self._private_pem(server_key))

    @functools.lru_cache(maxsize=None)
    def jwk(self, pem_format):
        """The JWKS entry of the listed key: RFC 7517 members plus digi.me's "pem".
        Cached: it is built under the state lock, and the key export lets go of the
        interpreter lock (see RandomPool).  Callers must not change the result."""
        public = self.listed_key.public_key()
        numbers = public.public_numbers()
        fmt = (serialization.PublicFormat.PKCS1 if pem_format == "pkcs1"
               else serialization.PublicFormat.SubjectPublicKeyInfo)
        return {
            "kid": LISTED_KID, "kty": "RSA", "alg": "PS512", "use": "sig",
            "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "pem": public.public_bytes(serialization.Encoding.PEM, fmt).decode("ascii"),
        }


# --------------------------------------------------------------------------
# Requests, replies, errors
# --------------------------------------------------------------------------

class Request:
    """An HTTP request as read by the handler."""

    def __init__(self, method, target, headers, body):
        split = urlsplit(target)
        self.method, self.path, self.query = method, split.path, split.query
        self.headers = headers  # lower-case name -> value
        self.body = body
        self.jwt = None         # (header, claims, signing_input, signature) if parsable
        self.jwt_rec = None     # the request record's "jwt" entry
        self.sig_ok = None      # signature verified with the contract's key
        self.verified_with = None  # the contract whose key sig_ok refers to
        self.endpoint = None    # fault endpoint name, None for unknown routes

    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Reply:
    """What the handler sends back.  close=True: drop the connection instead
    (after sleeping `sleep` seconds).  obj: a JSON body that render() serializes
    later, outside the state lock (it must hold only values no other request
    changes).  pairs: the token pairs the answer carries; clean: no fault altered
    the answer (both for the pairs' "delivered" flag)."""

    def __init__(self, status=200, body=b"", content_type=None, headers=(), close=False, sleep=0,
                 obj=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers, self.close, self.sleep = list(headers), close, sleep
        self.obj, self.pairs, self.clean = obj, [], True

    def render(self):
        if self.obj is not None:
            self.body, self.obj = render_json(self.obj), None


def json_reply(status, obj, headers=()):
    """Serialized at once (control API: its results are live state)."""
    return Reply(status, compact_json(obj), "application/json; charset=utf-8", headers)


def api_reply(status, obj):
    """Serialized (and its response JWTs signed) by Reply.render, outside the lock."""
    return Reply(status, b"", "application/json; charset=utf-8", obj=obj)


class ApiError(Exception):
    """An error answered with digi.me's body {"error":{"code","message","reference"}}."""

    def __init__(self, status, code, message):
        super().__init__(code)
        self.status, self.code, self.message = status, code, message

    def reply(self, reference=None, headers=(), extra=None):
        body = {"error": {"code": self.code, "message": self.message,
                          "reference": reference or rand(32)}}
        body.update(extra or {})
        return json_reply(self.status, body, headers)


def validation_error():
    return ApiError(400, "ValidationErrors", "Parameter validation errors")


class ControlError(Exception):
    """A control-API error, answered as {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------
# The sandbox: state and endpoint logic
# --------------------------------------------------------------------------

class Sandbox:
    """All state lives here, guarded by one lock.  What needs no shared state
    stays outside it: parsing and verifying the client JWT, waiting (latency,
    delay), signing the response JWT and writing the answer."""

    def __init__(self, pki):
        self.pki = pki
        self.origin = None           # https://HOST:PORT, set once listening
        self.lock = threading.RLock()
        self.contracts = {}          # client_id -> contract
        self.nonces = set()          # every accepted nonce, process lifetime
        self.secrets = {}            # kind -> {value: None} (ordered set), process lifetime
        self.requests, self.seq = [], 0
        self.faults, self.fault_seq = [], 0
        self._clear_stats()
        self._clear_flows()

    def _clear_stats(self):
        self.stats_since = time.time()
        self.stats = {}              # endpoint -> status (str) -> count
        self.write_failed = 0        # answers that could not be written to the client
        self.token_counts = {"issued": dict.fromkeys(TOKEN_SOURCES, 0),
                             "delivered": dict.fromkeys(TOKEN_SOURCES, 0)}

    def _clear_flows(self):
        # pairs outlive a reset in the archive, frozen as they were (GET tokens?archived=1)
        self.archived = getattr(self, "archived", []) + [
            item for item in self._token_items() if item["delivered"]]
        self.config = json.loads(json.dumps(DEFAULT_CONFIG))
        self.users = set()
        self.pre_codes = {}    # preauthorization code -> pending authorization
        self.ref_codes = {}    # reference code -> pending reauthorization / onboarding
        self.auth_codes = {}   # authorization code -> grant (kept after use)
        self.pairs = []        # issued token pairs, oldest first
        self.by_access, self.by_refresh = {}, {}

    @property
    def jku(self):
        return self.origin + JWKS_PATH

    def _secret(self, kind, value):
        if isinstance(value, str) and value:
            self.secrets.setdefault(kind, {})[value] = None

    # ---- contracts -------------------------------------------------------

    def add_contract(self, application_id, contract_id, public_key_pem, redirect_uris=None):
        for name, value in (("application_id", application_id), ("contract_id", contract_id),
                            ("public_key_pem", public_key_pem)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if redirect_uris is not None and not (
                isinstance(redirect_uris, list) and all(isinstance(u, str) for u in redirect_uris)):
            raise ValueError("redirect_uris must be a list of strings")
        key = load_rsa_public_key(public_key_pem)
        with self.lock:
            self.contracts[f"{application_id}_{contract_id}"] = {
                "application_id": application_id, "contract_id": contract_id,
                "key": key, "redirect_uris": redirect_uris}

    # ---- dispatch --------------------------------------------------------

    ROUTES = {
        ("POST", API + "oauth/authorize"): "oauth/authorize",
        ("POST", API + "oauth/token"): "oauth/token",
        ("POST", API + "oauth/token/reference"): "oauth/token/reference",
        ("POST", API + "reference"): "reference",
        ("GET", JWKS_PATH): "jwks",
        ("GET", ONBOARD + "authorize"): "onboard",
        ("GET", ONBOARD + "user-reauth"): "onboard",
        ("GET", ONBOARD + "onboard"): "onboard",
        ("GET", ONBOARD + "reauthorize"): "onboard",
    }

    def handle(self, req):
        """Entry point for every request.  The answer's body may still have to be
        rendered (Reply.render); the handler then calls answering() (and unsent())."""
        if req.path.startswith(CONTROL):
            return self.control(req)
        endpoint = self.ROUTES.get((req.method, req.path))
        req.endpoint = endpoint
        req.jwt_rec, req.jwt = parse_bearer(req.headers.get("authorization"))
        self._verify(req)  # no lock: the contract's key does not change in place
        with self.lock:
            rec = self._record(req, endpoint)
            fault = self._take_fault(endpoint) if endpoint else None
            if fault:
                rec["fault"] = fault["action"]
            wait = self.config["latency_ms"].get(endpoint, 0) / 1000 if endpoint else 0
        if fault and fault["action"] == "delay":
            wait += fault["seconds"]
        if wait > 0:
            time.sleep(wait)  # outside the lock: other requests go on meanwhile
        with self.lock:
            if req.jwt and self._contract_of(req) is not req.verified_with:
                self._verify(req)  # the contract was replaced meanwhile
            try:
                if fault and fault["action"] in IMMEDIATE_ACTIONS:
                    reply = self._immediate(fault)
                    rec["error_code"] = fault.get("code")  # set for "error" only
                elif endpoint is None:
                    known = any(path == req.path for _, path in self.ROUTES)
                    raise (ApiError(405, "MethodNotAllowed", "The method is not allowed") if known
                           else ApiError(404, "NotFound", "The requested resource was not found"))
                else:
                    reply = getattr(self, "ep_" + endpoint.replace("/", "_"))(req, rec, fault)
                    reply.clean = not (fault and fault["action"] in ALTERING_ACTIONS)
            except ApiError as e:
                reply = e.reply()
                rec["error_code"] = e.code
            rec["status"] = None if reply.close else reply.status
            return reply

    def answering(self, req, reply, peer_ok):
        """Called just before the answer is written (or the connection dropped):
        counts it, and marks the pairs of a clean 2xx answer "delivered" when the
        client is still there.  Marking before the write means that a client that
        got the answer never sees delivered=false; unsent() takes it back."""
        if req.path.startswith(CONTROL):
            return
        status = "closed" if reply.close else str(reply.status)
        with self.lock:
            per = self.stats.setdefault(req.endpoint or "other", {})
            per[status] = per.get(status, 0) + 1
            if reply.close:
                return
            if not peer_ok:
                self.write_failed += 1
            elif reply.clean and 200 <= reply.status < 300:
                for pair in reply.pairs:
                    pair["delivered"] = True
                    self.token_counts["delivered"][pair["source"]] += 1

    def unsent(self, req, reply):
        """Writing the answer failed: its pairs were not delivered after all."""
        if req.path.startswith(CONTROL):
            return
        with self.lock:
            self.write_failed += 1
            if reply.clean and 200 <= reply.status < 300:
                for pair in reply.pairs:
                    pair["delivered"] = False
                    self.token_counts["delivered"][pair["source"]] -= 1

    def _contract_of(self, req):
        client_id = req.jwt[1].get("client_id")
        return self.contracts.get(client_id) if isinstance(client_id, str) else None

    def _verify(self, req):
        """Verifies the client JWT's signature with its contract's key (if both exist)."""
        req.verified_with, req.sig_ok = None, None
        if not req.jwt:
            return
        req.jwt_rec["signature_valid"] = None
        header, _, signing_input, signature = req.jwt
        contract = req.verified_with = self._contract_of(req)
        if header.get("alg") == "PS512" and contract:
            try:
                contract["key"].verify(signature, signing_input, pss(64), hashes.SHA512())
                req.sig_ok = True
            except (InvalidSignature, ValueError):
                req.sig_ok = False
            req.jwt_rec["signature_valid"] = req.sig_ok

    def _record(self, req, endpoint):
        """Append the request to the log; returns the (mutable) record."""
        jwt_rec, parts = req.jwt_rec, req.jwt
        if parts:
            claims = parts[1]
            for claim, kind in (("code_verifier", "code_verifier_received"),
                                ("refresh_token", "refresh_token_received"),
                                ("access_token", "access_token_received"),
                                ("code", "code_received")):
                self._secret(kind, claims.get(claim))
        self.seq += 1
        rec = {
            "seq": self.seq, "t": time.time(), "method": req.method, "path": req.path,
            "query": req.query,
            "query_pairs": [list(p) for p in parse_qsl(req.query, keep_blank_values=True)],
            "headers": req.headers, "body": req.text(), "jwt": jwt_rec, "status": None,
            "endpoint": endpoint, "fault": None, "error_code": None,
            "client_port": getattr(req, "client_port", None),
            "connection": getattr(req, "connection_id", None),
        }
        self.requests.append(rec)
        return rec

    def _take_fault(self, endpoint):
        """Consume one use of the oldest pending fault for this endpoint."""
        for fault in self.faults:
            if fault["endpoint"] == endpoint:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self.faults.remove(fault)
                return dict(fault)
        return None

    @staticmethod
    def _immediate(fault):
        action = fault["action"]
        if action == "error":
            return ApiError(fault["status"], fault["code"], fault["message"]).reply(
                fault.get("reference"), fault.get("headers", {}).items(), fault.get("body_extra"))
        if action == "raw":
            return Reply(fault["status"], fault.get("body", "").encode("utf-8"),
                         fault.get("content_type", "text/plain"), fault.get("headers", {}).items())
        if action == "hang":
            return Reply(close=True, sleep=fault.get("seconds", 0))
        return Reply(close=True)  # "close"

    # ---- client JWT ------------------------------------------------------

    def check_client_jwt(self, req):
        """The checks every signed call gets, in the API's order; returns (contract, claims)."""
        if not req.jwt:
            raise ApiError(406, "ValidationErrors", "Parameter validation errors")
        header, claims, _, _ = req.jwt
        if header.get("alg") != "PS512":
            raise ApiError(401, "InvalidJWT", "The JWT algorithm is invalid")
        client_id = claims.get("client_id")
        contract = self.contracts.get(client_id) if isinstance(client_id, str) else None
        if contract is None:
            shown = "" if client_id is None else client_id
            raise ApiError(401, "InvalidClient", f"The client_id ({shown}) is invalid")
        if not req.sig_ok:
            raise ApiError(401, "InvalidJWT", "The JWT signature is invalid")
        ts = claims.get("timestamp")
        if not is_int(ts) or abs(ts - time.time() * 1000) > self.config["timestamp_window"] * 1000:
            raise ApiError(401, "InvalidJWT", "The JWT timestamp is outside the accepted window")
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
            raise ApiError(406, "InvalidRequest", "The nonce is invalid")
        if nonce in self.nonces:
            raise ApiError(406, "InvalidRequest",
                           f"The nonce provided in JWT payload ({nonce}) has already been used")
        self.nonces.add(nonce)
        return contract, claims

    @staticmethod
    def _claim(claims, name, valid, optional=False):
        """Value of a claim; ValidationErrors when missing (unless optional) or invalid."""
        if name not in claims and optional:
            return None
        value = claims.get(name)
        if not valid(value):
            raise validation_error()
        return value

    def _check_agent(self, req, rec):
        """SDK agent body of oauth/authorize and oauth/token/reference."""
        body = req.json()
        agent = body.get("agent") if isinstance(body, dict) else None
        sdk = agent.get("sdk") if isinstance(agent, dict) else None
        if not (isinstance(sdk, dict) and isinstance(sdk.get("name"), str)
                and isinstance(sdk.get("version"), str)):
            raise validation_error()
        if "actions" in body:
            if not isinstance(body["actions"], dict):
                raise validation_error()
            rec["actions"] = body["actions"]
        if sdk["name"] in self.config["sdk_blocklist"]:
            raise ApiError(400, "SDKInvalid", f"The SDK is invalid: {sdk['name']}")
        minimum = self.config["min_sdk_version"]
        if minimum and version_lower(sdk["version"], minimum):
            raise ApiError(403, "SDKVersionInvalid", "This SDK version is no longer supported.")

    @staticmethod
    def _check_redirect(contract, redirect_uri):
        allowed = contract["redirect_uris"]
        if allowed is not None and redirect_uri not in allowed:
            raise ApiError(404, "InvalidRedirectUri",
                           f"The redirect_uri ({redirect_uri}) is invalid")

    def _session(self):
        key = rand(32)
        self._secret("session_key", key)
        return {"key": key, "expiry": int(time.time() * 1000) + 3600000}

    # ---- response JWTs and tokens ------------------------------------------

    def _response_jwt(self, payload, fault):
        """A response JWT (PS512, salt 64, kid sandbox-1, jku = our JWKS), signed
        later by Reply.render.  A "token" fault tampers with it.  Returns
        (PendingJWS, payload as sent)."""
        header = {"alg": "PS512", "typ": "JWT", "jku": self.jku, "kid": LISTED_KID}
        payload = dict(payload)
        key, alg, salt, corrupt = self.pki.listed_key, "PS512", 64, False
        if fault and fault["action"] == "token":
            if fault.get("sign_with") == "unlisted":
                key, header["kid"] = self.pki.unlisted_key, UNLISTED_KID
            corrupt = fault.get("sign_with") == "corrupt"
            for name in ("kid", "jku", "alg"):
                if name in fault:
                    header[name] = fault[name]
            alg = fault.get("alg", alg)
            salt = fault.get("salt", salt)
            salt = padding.PSS.MAX_LENGTH if salt == "max" else salt
            for name in fault.get("omit_header", []):
                header.pop(name, None)
            for name in fault.get("payload_remove", []):
                payload.pop(name, None)
            payload.update(fault.get("payload_patch", {}))
            for claim in ("exp", "nbf"):
                if claim in fault:
                    payload[claim] = int(time.time()) + fault[claim]
        return PendingJWS(key, header, payload, alg, salt, corrupt), payload

    def _sign_code(self, name, code, table, fault):
        """Response JWT carrying a one-time code.  If a token fault patched the
        code to another string, the pending entry follows the patched value."""
        token, sent = self._response_jwt({name: code}, fault)
        patched = sent.get(name)
        if isinstance(patched, str) and patched != code:
            table[patched] = table.pop(code)
        return token

    @staticmethod
    def _expired(expires_on):
        return time.time() >= expires_on

    def _lookup_access(self, value, contract):
        """A live (not rotated) pair by access token, any contract of the same application."""
        pair = self.by_access.get(value) if isinstance(value, str) else None
        app_id = self.contracts[pair["client_id"]]["application_id"] if pair else None
        if pair is None or pair["rotated"] or app_id != contract["application_id"]:
            raise ApiError(401, "InvalidToken", "The token (access_token) is invalid")
        return pair

    def _issue_pair(self, client_id, user_id, source, family=None, consentid=None,
                    access_ttl=None, refresh_ttl=None):
        now = int(time.time())
        pair = {
            "access_token": "at-" + rand(40), "refresh_token": "rt-" + rand(40),
            "access_expires_on": now + (self.config["access_ttl"] if access_ttl is None
                                        else access_ttl),
            "refresh_expires_on": now + (self.config["refresh_ttl"] if refresh_ttl is None
                                         else refresh_ttl),
            "user_id": user_id, "client_id": client_id,
            "family": family or "fam-" + rand(16),
            "consentid": consentid or "consent-" + rand(16),
            "issued_at": time.time(), "rotated": False,
            "source": source, "delivered": False,
        }
        self.token_counts["issued"][source] += 1
        self.pairs.append(pair)
        self.by_access[pair["access_token"]] = pair
        self.by_refresh[pair["refresh_token"]] = pair
        self._secret("access_token", pair["access_token"])
        self._secret("refresh_token", pair["refresh_token"])
        return pair

    def _token_body(self, pair, fault):
        payload = {
            "access_token": {"value": pair["access_token"],
                             "expires_on": pair["access_expires_on"]},
            "refresh_token": {"value": pair["refresh_token"],
                              "expires_on": pair["refresh_expires_on"]},
            "sub": pair["user_id"], "consentid": pair["consentid"],
            "identifier": {"id": pair["user_id"]}, "token_type": "Bearer",
        }
        return {"token": self._response_jwt(payload, fault)[0]}

    @staticmethod
    def _apply_body_fault(body, fault):
        if fault and fault["action"] == "body":
            for name in fault.get("remove", []):
                body.pop(name, None)
            body.update(fault.get("patch", {}))
        return body

    # ---- endpoints -------------------------------------------------------

    def ep_oauth_authorize(self, req, rec, fault):
        contract, c = self.check_client_jwt(req)
        is_str = lambda v: isinstance(v, str)
        challenge = self._claim(c, "code_challenge",
                                lambda v: is_str(v) and CHALLENGE_RE.fullmatch(v))
        self._claim(c, "code_challenge_method", lambda v: v == "S256")
        redirect_uri = self._claim(c, "redirect_uri", lambda v: is_str(v) and v)
        self._claim(c, "response_mode", lambda v: v == "query")
        self._claim(c, "response_type", lambda v: v == "code")
        state = self._claim(c, "state", is_str)
        access_token = self._claim(c, "access_token", is_str, optional=True)
        self._check_agent(req, rec)
        self._check_redirect(contract, redirect_uri)
        user_id = None
        if access_token is not None:
            pair = self._lookup_access(access_token, contract)
            if self._expired(pair["access_expires_on"]):
                raise ApiError(401, "InvalidToken", "The token (access_token) is expired")
            user_id = pair["user_id"]
        code = "pa-" + rand(32)
        self.pre_codes[code] = {"client_id": c["client_id"], "code_challenge": challenge,
                                "redirect_uri": redirect_uri, "state": state, "user_id": user_id}
        self._secret("preauthorization_code", code)
        token = self._sign_code("preauthorization_code", code, self.pre_codes, fault)
        return api_reply(201, self._apply_body_fault(
            {"token": token, "session": self._session()}, fault))

    def ep_oauth_token(self, req, rec, fault):
        _, c = self.check_client_jwt(req)
        client_id = c["client_id"]
        nonempty = lambda v: isinstance(v, str) and v
        grant_type = c.get("grant_type")
        if grant_type == "authorization_code":
            code = self._claim(c, "code", nonempty)
            verifier = self._claim(c, "code_verifier", nonempty)
            grant = self.auth_codes.get(code)
            if grant is None or grant["client_id"] != client_id:
                raise ApiError(400, "InvalidGrant", "The authorization code is invalid")
            if grant["used"]:
                raise ApiError(400, "InvalidGrant", "The authorization code has already been used")
            if s256(verifier) != grant["code_challenge"]:
                # A PKCE mismatch leaves the code usable.
                raise ApiError(400, "InvalidGrant",
                               "The code_verifier does not match the code_challenge")
            grant["used"] = True
            family, consentid = grant["family"], None
            if family:  # reauthorization: the new pair supersedes the family's old ones
                for old in self.pairs:
                    if old["family"] == family and not old["rotated"]:
                        old["rotated"], consentid = True, old["consentid"]
            pair = self._issue_pair(client_id, grant["user_id"],
                                    "reauthorize" if family else "exchange", family, consentid)
        elif grant_type == "refresh_token":
            value = self._claim(c, "refresh_token", nonempty)
            old = self.by_refresh.get(value)
            if old is None or old["rotated"] or old["client_id"] != client_id:
                raise ApiError(401, "InvalidToken", "The token (refresh_token) is invalid")
            if self._expired(old["refresh_expires_on"]):
                raise ApiError(401, "InvalidToken", "The token (refresh_token) is expired")
            old["rotated"] = True  # rotation: old refresh and access token die
            pair = self._issue_pair(client_id, old["user_id"], "refresh", old["family"],
                                    old["consentid"])
        else:
            raise validation_error()
        reply = api_reply(201, self._apply_body_fault(self._token_body(pair, fault), fault))
        reply.pairs.append(pair)
        return reply

    def ep_oauth_token_reference(self, req, rec, fault):
        contract, c = self.check_client_jwt(req)
        is_str = lambda v: isinstance(v, str)
        access_token = self._claim(c, "access_token", lambda v: is_str(v) and v)
        redirect_uri = self._claim(c, "redirect_uri", lambda v: is_str(v) and v)
        challenge = None
        if "code_challenge" in c or "code_challenge_method" in c:
            challenge = self._claim(c, "code_challenge",
                                    lambda v: is_str(v) and CHALLENGE_RE.fullmatch(v))
            self._claim(c, "code_challenge_method", lambda v: v == "S256")
        state = self._claim(c, "state", is_str, optional=True)
        self._check_agent(req, rec)
        self._check_redirect(contract, redirect_uri)
        pair = self._lookup_access(access_token, contract)  # expired tokens are fine here
        code = "rc-" + rand(32)
        self.ref_codes[code] = {"client_id": c["client_id"], "code_challenge": challenge,
                                "redirect_uri": redirect_uri, "state": state,
                                "user_id": pair["user_id"], "family": pair["family"]}
        self._secret("reference_code", code)
        token = self._sign_code("reference_code", code, self.ref_codes, fault)
        return api_reply(201, self._apply_body_fault(
            {"token": token, "session": self._session()}, fault))

    def ep_reference(self, req, rec, fault):
        self.check_client_jwt(req)
        body = req.json()
        if not (isinstance(body, dict) and body.get("type") in ("cloudId", "accountId")
                and isinstance(body.get("value"), str) and body["value"]):
            raise validation_error()
        ref = "ref-" + hashlib.sha256(body["value"].encode("utf-8")).hexdigest()[:16]
        return api_reply(201, self._apply_body_fault({"id": ref}, fault))

    def ep_jwks(self, req, rec, fault):
        body = {"keys": [self.pki.jwk(self.config["jwks_pem"])]}
        return api_reply(200, self._apply_body_fault(body, fault))

    def ep_onboard(self, req, rec, fault):
        """Stand-in for the onboarding web app: consent is immediate."""
        page = req.path[len(ONBOARD):]
        code = (parse_qs(req.query).get("code") or [None])[0]
        if page == "authorize":
            entry = self.pre_codes.get(code)
        else:  # user-reauth needs PKCE; onboard / reauthorize are the no-PKCE flows
            entry = self.ref_codes.get(code)
            if entry and (entry["code_challenge"] is not None) != (page == "user-reauth"):
                entry = None
        if entry is None:
            return Reply(400, b"unknown code", "text/html; charset=utf-8")
        (self.pre_codes if page == "authorize" else self.ref_codes).pop(code)  # single use

        if fault and fault["action"] == "fail":
            params = [("success", "false"), ("errorCode", fault["error_code"])]
            if fault.get("with_state") and entry["state"] is not None:
                params.append(("state", entry["state"]))
        elif page in ("authorize", "user-reauth"):
            user_id = entry["user_id"]
            if user_id is None:
                user_id = "user-" + rand(16)
                self.users.add(user_id)
            auth_code = "ac-" + rand(32)
            self.auth_codes[auth_code] = {
                "client_id": entry["client_id"], "code_challenge": entry["code_challenge"],
                "user_id": user_id, "family": entry.get("family"), "used": False}
            self._secret("authorization_code", auth_code)
            params = [("success", "true")]
            if entry["state"] is not None:
                params.append(("state", entry["state"]))
            params.append(("code", auth_code))
            if page == "authorize":
                params.append(("accountReference", "acc-" + rand(16)))
        else:
            params = [("success", "true")]
        uri = entry["redirect_uri"]
        location = uri + ("&" if "?" in uri else "?") + urlencode(params)
        # Header values must be ASCII: escape anything else the callback may contain.
        location = quote(location, safe=string.punctuation)
        return Reply(302, b"", "text/html; charset=utf-8", [("Location", location)])

    # ---- control API -----------------------------------------------------

    def control(self, req):
        name = req.path[len(CONTROL):].strip("/")
        handler = getattr(self, f"ctl_{req.method.lower()}_{name}", None)
        if handler is None:
            return json_reply(404, {"error": f"no control endpoint {req.method} {req.path}"})
        body = None
        if req.method == "POST":
            body = req.json() if req.body.strip() else {}
            if body is None:
                return json_reply(400, {"error": "body must be JSON"})
        try:
            with self.lock:  # serialize inside the lock: results are live state
                return json_reply(*handler(req, body))
        except ControlError as e:
            return json_reply(e.status, {"error": str(e)})

    def ctl_get_health(self, req, body):
        return 200, {"ok": True}

    def ctl_get_contracts(self, req, body):
        return 200, [{"client_id": cid, "application_id": c["application_id"],
                      "contract_id": c["contract_id"], "redirect_uris": c["redirect_uris"]}
                     for cid, c in self.contracts.items()]

    def ctl_post_contracts(self, req, body):
        if not isinstance(body, dict):
            raise ControlError(400, "expected a JSON object")
        try:
            self.add_contract(body.get("application_id"), body.get("contract_id"),
                              body.get("public_key_pem"), body.get("redirect_uris"))
        except ValueError as e:
            raise ControlError(400, str(e)) from None
        return 201, {}

    def ctl_get_faults(self, req, body):
        return 200, self.faults

    def ctl_post_faults(self, req, body):
        items = body if isinstance(body, list) else [body]
        checked = [self._check_fault(item) for item in items]
        for fault in checked:
            self.fault_seq += 1
            fault["id"] = self.fault_seq
            self.faults.append(fault)
        return 201, {"added": len(checked)}

    @staticmethod
    def _check_fault(item):
        """Validate one fault description; returns a copy with defaults filled in."""
        if not isinstance(item, dict):
            raise ControlError(400, "a fault must be a JSON object")
        fault = dict(item)
        endpoint = fault.get("endpoint")
        if endpoint not in FAULT_ACTIONS:
            raise ControlError(400, f"endpoint must be one of {sorted(FAULT_ACTIONS)}")
        if endpoint == "onboard" and "action" not in fault and "error_code" in fault:
            fault["action"] = "fail"
        action = fault.get("action")
        if action not in FAULT_ACTIONS[endpoint]:
            raise ControlError(400, f"action for {endpoint} must be one of "
                                    f"{sorted(FAULT_ACTIONS[endpoint])}")
        fault.setdefault("count", 1)
        if not is_int(fault["count"]) or fault["count"] < 1:
            raise ControlError(400, "count must be a positive integer")

        def need(name, valid, what):
            if not valid(fault.get(name)):
                raise ControlError(400, f"{action}: {name} must be {what}")

        def may(name, valid, what):
            if name in fault:
                need(name, valid, what)

        status_ok = lambda v: is_int(v) and 100 <= v <= 599
        str_list = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
        str_dict = lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        is_str = lambda v: isinstance(v, str)
        if action == "error":
            need("status", status_ok, "an HTTP status")
            need("code", is_str, "a string")
            need("message", is_str, "a string")
            may("reference", is_str, "a string")
            may("headers", str_dict, "an object of strings")
            may("body_extra", lambda v: isinstance(v, dict), "an object")
        elif action == "raw":
            need("status", status_ok, "an HTTP status")
            may("body", is_str, "a string")
            may("content_type", is_str, "a string")
            may("headers", str_dict, "an object of strings")
        elif action in ("hang", "delay"):
            need("seconds", lambda v: is_number(v) and 0 <= v <= 3600, "a number from 0 to 3600")
        elif action == "token":
            may("sign_with", lambda v: v in ("listed", "unlisted", "corrupt"),
                "listed, unlisted or corrupt")
            for name in ("kid", "jku", "alg"):
                may(name, is_str, "a string")
            may("salt", lambda v: v == "max" or (is_int(v) and 0 <= v <= 190),
                "an integer or \"max\"")
            for name in ("omit_header", "payload_remove"):
                may(name, str_list, "a list of strings")
            may("payload_patch", lambda v: isinstance(v, dict), "an object")
            for name in ("exp", "nbf"):
                may(name, is_int, "an integer (seconds from now)")
        elif action == "body":
            may("remove", str_list, "a list of strings")
            may("patch", lambda v: isinstance(v, dict), "an object")
        elif action == "fail":
            need("error_code", is_str, "a string")
            may("with_state", lambda v: isinstance(v, bool), "a boolean")
        return fault

    def ctl_get_config(self, req, body):
        return 200, self.config

    def ctl_post_config(self, req, body):
        checks = {
            "access_ttl": is_int, "refresh_ttl": is_int,
            "timestamp_window": lambda v: is_number(v) and v >= 0,
            "sdk_blocklist": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "min_sdk_version": lambda v: v is None or isinstance(v, str),
            "jwks_pem": lambda v: v in ("spki", "pkcs1"),
            "latency_ms": lambda v: isinstance(v, dict) and all(
                k in FAULT_ACTIONS and is_number(ms) and 0 <= ms <= 600000
                for k, ms in v.items()),
        }
        if not isinstance(body, dict):
            raise ControlError(400, "expected a JSON object")
        for name, value in body.items():
            if name not in checks:
                raise ControlError(400, f"unknown setting {name}")
            if not checks[name](value):
                raise ControlError(400, f"bad value for {name}")
        self.config.update(body)
        return 200, self.config

    def ctl_post_expire(self, req, body):
        if not (isinstance(body, dict)
                and body.keys() & {"access_token", "refresh_token", "user_id"}):
            raise ControlError(400, "give access_token, refresh_token and/or user_id")
        past = int(time.time()) - 1
        targets = []  # (pair, field)
        if "access_token" in body:
            pair = self.by_access.get(body["access_token"])
            if pair is None:
                raise ControlError(404, "unknown access_token")
            targets.append((pair, "access_expires_on"))
        if "refresh_token" in body:
            pair = self.by_refresh.get(body["refresh_token"])
            if pair is None:
                raise ControlError(404, "unknown refresh_token")
            targets.append((pair, "refresh_expires_on"))
        if "user_id" in body:
            if body["user_id"] not in self.users:
                raise ControlError(404, "unknown user_id")
            targets += [(p, "access_expires_on") for p in self.pairs
                        if p["user_id"] == body["user_id"]]
        for pair, field in targets:
            pair[field] = min(pair[field], past)
        return 200, {"expired": len(targets)}

    def ctl_get_requests(self, req, body):
        since = (parse_qs(req.query).get("since") or ["0"])[0]
        try:
            since = int(since)
        except ValueError:
            raise ControlError(400, "since must be an integer") from None
        return 200, [r for r in self.requests if r["seq"] > since]

    def ctl_get_secrets(self, req, body):
        values = {}
        for kind in SECRET_KINDS:
            values.update(self.secrets.get(kind, {}))
        return 200, {"values": list(values),
                     "by_kind": {kind: list(v) for kind, v in self.secrets.items()}}

    def _token_items(self):
        result = []
        for p in getattr(self, "pairs", []):
            access = "rotated" if p["rotated"] else (
                "expired" if self._expired(p["access_expires_on"]) else "valid")
            refresh = "rotated" if p["rotated"] else (
                "expired" if self._expired(p["refresh_expires_on"]) else "valid")
            item = {k: v for k, v in p.items() if k != "rotated"}
            item.update(state=access, access_state=access, refresh_state=refresh)
            result.append(item)
        return result

    def ctl_get_tokens(self, req, body):
        archived = (parse_qs(req.query).get("archived") or ["0"])[0] == "1"
        return 200, (self.archived if archived else []) + self._token_items()

    def ctl_post_mint(self, req, body):
        """New users with one valid pair each, as if a code exchange had issued and
        delivered it (source "mint")."""
        if not isinstance(body, dict):
            raise ControlError(400, "expected a JSON object")
        app_id, contract_id = body.get("application_id"), body.get("contract_id")
        if not (isinstance(app_id, str) and isinstance(contract_id, str)):
            raise ControlError(400, "application_id and contract_id must be strings")
        client_id = f"{app_id}_{contract_id}"
        if client_id not in self.contracts:
            raise ControlError(404, "unknown contract")
        count = body.get("count")
        if not (is_int(count) and 1 <= count <= MAX_MINT):
            raise ControlError(400, f"count must be an integer from 1 to {MAX_MINT}")
        for name in ("access_ttl", "refresh_ttl"):
            if name in body and not is_int(body[name]):
                raise ControlError(400, f"{name} must be an integer (seconds)")
        unknown = body.keys() - {"application_id", "contract_id", "count",
                                 "access_ttl", "refresh_ttl"}
        if unknown:
            raise ControlError(400, f"unknown member {sorted(unknown)[0]}")
        pairs = []
        for _ in range(count):
            user_id = "user-" + rand(16)
            self.users.add(user_id)
            pair = self._issue_pair(client_id, user_id, "mint",
                                    access_ttl=body.get("access_ttl"),
                                    refresh_ttl=body.get("refresh_ttl"))
            pair["delivered"] = True
            self.token_counts["delivered"]["mint"] += 1
            pairs.append({k: pair[k] for k in ("access_token", "refresh_token",
                                               "access_expires_on", "refresh_expires_on",
                                               "user_id", "consentid")})
        return 201, {"pairs": pairs}

    def ctl_get_stats(self, req, body):
        return 200, {"since": self.stats_since, "requests": self.stats,
                     "write_failed": self.write_failed, "tokens": self.token_counts}

    def ctl_post_reset(self, req, body):
        self.requests.clear()
        self.faults.clear()
        self._clear_stats()
        if isinstance(body, dict) and body.get("all"):
            self._clear_flows()
        return 200, {}


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------

class BadRequest(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; every reply carries Content-Length
    server_version = "digime-sandbox"
    sys_version = ""
    timeout = 300                   # idle keep-alive connections

    def setup(self):
        # The listening socket does not handshake in accept() (that would block
        # the accept loop); do it here, in the connection's own thread.
        self.request.settimeout(10)
        # An answer goes out in one write, but an interim "100 Continue" is a write
        # of its own: without TCP_NODELAY, Nagle plus the client's delayed ACK could
        # add ~40 ms after it.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.do_handshake()
        super().setup()
        self.connection_id = next(self.server.connection_ids)  # for keep-alive tests

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _handle(self):
        try:
            body = self._read_body()
        except (BadRequest, ValueError):
            self.close_connection = True
            self._write(Reply(400, b"bad request body", "text/plain"))
            return
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        req = Request(self.command, self.path, headers, body)
        req.client_port, req.connection_id = self.client_address[1], self.connection_id
        sandbox = self.server.sandbox
        try:
            reply = sandbox.handle(req)
            reply.render()  # signs response JWTs, outside the lock
        except Exception as e:
            # Report where, but not the exception text (it could carry a secret).
            tb = "".join(traceback.format_tb(e.__traceback__))
            sys.stderr.write(f"sandbox: internal error {type(e).__name__}\n{tb}")
            reply = ApiError(500, "SandboxError", "Internal sandbox error").reply()
        if reply.sleep:
            time.sleep(reply.sleep)
        if reply.close:
            sandbox.answering(req, reply, False)
            self.close_connection = True  # nothing is written; the socket is closed
        elif self._peer_gone():
            sandbox.answering(req, reply, False)
            self.close_connection = True  # the client gave up: nothing to write to
        else:
            sandbox.answering(req, reply, True)
            if not self._write(reply):
                sandbox.unsent(req, reply)
        self._log(req.method, req.path, "closed" if reply.close else reply.status)

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                if size == 0:
                    break
                if len(body) + size > MAX_BODY:
                    raise BadRequest()
                body += self.rfile.read(size)
                self.rfile.readline(1024)
            while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        n = int(length)
        if not 0 <= n <= MAX_BODY:
            raise BadRequest()
        return self.rfile.read(n)

    def _peer_gone(self):
        """True when the client has already given up on this connection: it shut
        down its side (FIN: Linux's POLLRDHUP; HUP; error), or a TLS 1.2 alert such
        as close_notify is waiting.  (A TLS 1.3 close_notify looks like application
        data from outside, but clients close the socket right after it.)  Nothing is
        read from the socket."""
        poller = select.poll()
        poller.register(self.request.fileno(), select.POLLIN | select.POLLPRI | POLLRDHUP)
        events = poller.poll(0)
        if not events:
            return False  # nothing pending: the client is waiting for the answer
        if events[0][1] & (POLLRDHUP | select.POLLHUP | select.POLLERR):
            return True
        try:  # readable, so this does not block (a timeout socket would wait otherwise)
            data = socket.socket.recv(self.request, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return data in (b"", b"\x15")  # EOF, or a TLS record of type alert

    def _write(self, reply):
        """Writes the answer; True when every byte was handed to the kernel."""
        try:
            self.send_response(reply.status)
            for name, value in reply.headers:
                if name.lower() != "content-length":
                    self.send_header(name, value)
            if reply.content_type:
                self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if self.request_version != "HTTP/0.9" and hasattr(self, "_headers_buffer"):
                # Head and body in one write (end_headers() would write the head on
                # its own): one TLS record and one syscall less per answer.
                self._headers_buffer += [b"\r\n", reply.body]
                self.flush_headers()
            else:
                self.end_headers()
                self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:  # reset, broken pipe, TLS failure, timeout
            self.close_connection = True
            return False
        return True

    def _log(self, method, path, status):
        if self.server.verbose:  # path only: queries can carry codes
            sys.stderr.write(f"sandbox: {method} {path} -> {status}\n")

    def log_request(self, code="-", size="-"):
        pass

    def log_message(self, format, *args):
        pass  # http.server's messages can quote the request line (secrets)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog (socketserver's default is 5)

    def __init__(self, address, sandbox, context, verbose):
        self.sandbox, self.verbose = sandbox, verbose
        self.connection_ids = itertools.count(1)  # serial number of each TCP connection
        super().__init__(address, Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    def server_bind(self):
        # Skip HTTPServer's getfqdn() (a reverse DNS lookup).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # Client aborts, TLS failures, timeouts: expected in tests, stay quiet.
        if self.verbose:
            sys.stderr.write(f"sandbox: connection error {sys.exc_info()[0].__name__}\n")


def main():
    parser = argparse.ArgumentParser(description="Local digi.me-compatible API sandbox.")
    parser.add_argument("--dir", required=True, help="directory for ca.pem, server.pem, port, ...")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--contract", action="append", default=[],
                        metavar="APPID:CONTRACTID:PUBKEY_PEM_FILE")
    parser.add_argument("--verbose", action="store_true", help="one stderr line per request")
    args = parser.parse_args()

    directory = os.path.abspath(args.dir)
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    port_file = os.path.join(directory, "port")
    if os.path.exists(port_file):
        os.unlink(port_file)  # never leave a stale port for readers

    sandbox = Sandbox(Pki(directory))
    for spec in args.contract:
        try:
            app_id, contract_id, pem_file = spec.split(":", 2)
            with open(pem_file, encoding="utf-8") as f:
                sandbox.add_contract(app_id, contract_id, f.read())
        except (ValueError, OSError) as e:
            parser.error(f"--contract {spec}: {e}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(sandbox.pki.cert_file, sandbox.pki.key_file)
    server = Server((args.host, args.port), sandbox, context, args.verbose)
    port = server.server_address[1]
    host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
    sandbox.origin = f"https://{host}:{port}"

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()

    write_public_file(port_file, f"{port}\n".encode("ascii"))
    print(json.dumps({"port": port, "base_url": sandbox.origin + API,
                      "onboard_url": sandbox.origin + ONBOARD,
                      "ca_file": sandbox.pki.ca_file}), flush=True)
    while not stop.wait(0.1):
        pass
    server.shutdown()  # handler threads are daemons: a hanging one does not delay exit
    server.server_close()
    try:
        os.unlink(port_file)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
