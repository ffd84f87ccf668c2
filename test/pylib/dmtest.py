"""Helpers for digime's TAP tests (test/t/*.py), run by prove with /usr/bin/python3.

The environment comes from test/run-tests.sh: PGHOST/PGPORT/PGUSER (superuser
postgres on the throwaway cluster), DM_SANDBOX_URL, DM_CA_FILE, DM_WORK, DM_ROOT,
DM_PG_BIN.

Rule for tests: never send a secret (token, code, code_verifier, private key)
to the server except as an argument of digime's own functions that take
secrets; compare secrets in Python.  090_log_hygiene.py checks the server log.
"""
import base64
import hashlib
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import traceback
import urllib.parse

import psycopg2
import psycopg2.extensions
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ROOT = os.environ.get("DM_ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
WORK = os.environ.get("DM_WORK", "/tmp")
PG_BIN = os.environ.get("DM_PG_BIN", "/usr/lib/postgresql/15/bin")
SECRETS_FILE = os.path.join(WORK, "test-secrets.txt")

EXAMPLE_APP = "qgEUV8iJENRiUkuYF5lLpdsOv7Hp0biy"
EXAMPLE_CONTRACT = "yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs"
SECOND_CONTRACT = "second-contract"


# --------------------------------------------------------------------------
# TAP
# --------------------------------------------------------------------------
class Tap:
    """Minimal TAP producer: register test functions with @tap.test, then tap.run()."""

    def __init__(self):
        self.n = 0
        self.failed = 0
        self.tests = []

    def test(self, fn):
        self.tests.append(fn)
        return fn

    def ok(self, cond, name, diag=None):
        self.n += 1
        print(("ok %d - %s" if cond else "not ok %d - %s") % (self.n, name))
        if not cond:
            self.failed += 1
            # on stderr too: prove shows it without --verbose (CI logs)
            sys.stderr.write("# failed: %s\n" % name)
            if diag:
                for line in str(diag).splitlines():
                    print("# " + line)
                    sys.stderr.write("#   %s\n" % line[:2000])
        sys.stdout.flush()
        return cond

    def skip(self, name, reason):
        """A test that does not apply to this run: passes, with the reason (TAP "# skip")."""
        self.n += 1
        print("ok %d - %s # skip %s" % (self.n, name, reason))
        sys.stdout.flush()
        return True

    def eq(self, got, want, name):
        return self.ok(got == want, name, "got:  %r\nwant: %r" % (got, want))

    def match(self, got, pattern, name):
        import re
        return self.ok(got is not None and re.search(pattern, got) is not None, name,
                       "got: %r\ndoes not match: %r" % (got, pattern))

    def run(self):
        for fn in self.tests:
            print("# " + fn.__name__)
            try:
                fn()
            except Exception:
                self.ok(False, fn.__name__ + " raised", traceback.format_exc())
        print("1..%d" % self.n)
        sys.exit(1 if self.failed else 0)


# --------------------------------------------------------------------------
# Sandbox control API
# --------------------------------------------------------------------------
class Sandbox:
    def __init__(self):
        self.url = os.environ["DM_SANDBOX_URL"]
        self.ctx = ssl.create_default_context(cafile=os.environ["DM_CA_FILE"])
        u = urllib.parse.urlsplit(self.url)
        self.host, self.port = u.hostname, u.port

    def _conn(self):
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)

    def call(self, method, path, body=None):
        c = self._conn()
        c.request(method, "/_sandbox/" + path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status >= 300:
            raise RuntimeError("sandbox %s %s: %d %s" % (method, path, r.status, data[:300]))
        return json.loads(data) if data else None

    def fault(self, **kw):
        return self.call("POST", "faults", kw)

    def faults(self):
        return self.call("GET", "faults")

    def config(self, **kw):
        return self.call("POST", "config", kw)

    def reset(self, everything=False):
        self.call("POST", "reset", {"all": True} if everything else {})

    def expire(self, **kw):
        return self.call("POST", "expire", kw)

    def tokens(self, archived=False):
        return self.call("GET", "tokens?archived=1" if archived else "tokens")

    def secrets(self):
        return self.call("GET", "secrets")

    def requests(self, since=0):
        return self.call("GET", "requests?since=%d" % since)

    def mint(self, application_id, contract_id, count=1, **ttl):
        """New users with one valid pair each (POST /_sandbox/mint; ttl: access_ttl, refresh_ttl)."""
        body = {"application_id": application_id, "contract_id": contract_id, "count": count}
        body.update(ttl)
        pairs = self.call("POST", "mint", body)["pairs"]
        for p in pairs:
            record_secret(p["access_token"])
            record_secret(p["refresh_token"])
        return pairs

    def stats(self):
        return self.call("GET", "stats")

    def last_seq(self):
        reqs = self.requests()
        return reqs[-1]["seq"] if reqs else 0

    def register(self, application_id, contract_id, public_key_pem, redirect_uris=None):
        body = {"application_id": application_id, "contract_id": contract_id,
                "public_key_pem": public_key_pem}
        if redirect_uris is not None:
            body["redirect_uris"] = redirect_uris
        return self.call("POST", "contracts", body)

    def follow(self, url):
        """GETs an onboarding URL like a browser would, returning the redirect Location."""
        u = urllib.parse.urlsplit(url)
        c = http.client.HTTPSConnection(u.hostname, u.port, context=self.ctx, timeout=30)
        c.request("GET", u.path + ("?" + u.query if u.query else ""))
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 302:
            raise RuntimeError("onboarding page answered %d" % r.status)
        return r.getheader("Location")


# --------------------------------------------------------------------------
# Keys and JWS
# --------------------------------------------------------------------------
def new_rsa_key(bits=2048, pkcs1=True):
    """A new RSA key as PEM text (PKCS#1 like digi.me's, or PKCS#8)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if pkcs1 else serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()
    record_secret(pem_body(pem))
    return pem


def public_pem(private_pem):
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def spki_sha256(private_pem):
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def pem_body(pem):
    """The base64 lines of a PEM, joined: what would leak if a key leaked."""
    return "".join(l for l in pem.splitlines() if l and not l.startswith("-----"))


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jws_verify_ps512(jws, private_or_public_pem, salt=64, mgf_hash=None):
    """True when the compact JWS verifies with RSASSA-PSS SHA-512, the given salt and MGF1 hash."""
    if "PRIVATE" in private_or_public_pem:
        pub = serialization.load_pem_private_key(private_or_public_pem.encode(), None).public_key()
    else:
        pub = serialization.load_pem_public_key(private_or_public_pem.encode())
    h, p, s = jws.split(".")
    try:
        pub.verify(b64url_decode(s), (h + "." + p).encode(),
                   padding.PSS(mgf=padding.MGF1(mgf_hash or hashes.SHA512()), salt_length=salt),
                   hashes.SHA512())
        return True
    except Exception:
        return False


def s256(verifier):
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


DISCARDED_FILE = os.path.join(WORK, "discarded-tokens.txt")


def discard_tokens(access_tokens):
    """Tokens a test throws away on purpose (a dropped database, an extra cluster, a token obtained
    outside digime): 088_every_token_stored.py does not look for them."""
    with open(DISCARDED_FILE, "a") as f:
        for t in access_tokens:
            if t:
                f.write(t + "\n")


def discarded_tokens():
    try:
        with open(DISCARDED_FILE) as f:
            return set(l.strip() for l in f if l.strip())
    except FileNotFoundError:
        return set()


def revoke_token(admin, token_id):
    """digime_revoke_token as the administrator, telling 088 that the token goes on purpose."""
    try:
        discard_tokens([q1(admin, "SELECT digime.digime_user_access_token(%s)", (token_id,))
                        ["accessToken"]["value"]])
    except psycopg2.Error:
        pass    # revoked already, or not readable
    return q1(admin, "SELECT digime.digime_revoke_token(%s)", (token_id,))


def discard_all_tokens(admin, where="true"):
    """Tells 088 that the tokens a test deletes (where: a condition on digime.user_tokens) go on purpose."""
    ids = [r[0] for r in q(admin, "SELECT id FROM digime.user_tokens WHERE status <> 'revoked' AND "
                                  + where)]
    vals = []
    for t in ids:
        try:
            vals.append(q1(admin, "SELECT digime.digime_user_access_token(%s)", (t,))["accessToken"]["value"])
        except psycopg2.Error:
            pass
    discard_tokens(vals)


def stored_access_tokens(conn):
    """Access tokens of every token row of a database (digime installed), as its superuser reads them."""
    out = set()
    for (tid,) in q(conn, "SELECT id FROM digime.user_tokens WHERE status <> 'revoked'"):
        try:
            out.add(q1(conn, "SELECT digime.digime_user_access_token(%s)", (tid,))["accessToken"]["value"])
        except psycopg2.Error:
            pass    # a row a test damaged on purpose (050)
    return out


def record_secret(value):
    """Remembers a secret this test created, for 090_log_hygiene.py."""
    if value:
        with open(SECRETS_FILE, "a") as f:
            f.write(value.replace("\n", "") + "\n")


# --------------------------------------------------------------------------
# Database
# --------------------------------------------------------------------------
def connect(dbname="postgres", user="postgres", **kw):
    conn = psycopg2.connect(dbname=dbname, user=user, **kw)
    conn.autocommit = True
    return conn


def discard_database_tokens(name, connect_to=None):
    """Tells 088 that the tokens stored in database name go with it (before a DROP DATABASE)."""
    connect_to = connect_to or connect
    try:
        c = connect_to(name)
    except psycopg2.Error:
        return      # no such database
    try:
        if q1(c, "SELECT count(*) FROM pg_extension WHERE extname = 'digime' AND extversion <> '1.0'"):
            discard_tokens(stored_access_tokens(c))
    finally:
        c.close()


def drop_database(admin, name, force=False):
    """DROP DATABASE [IF EXISTS] name [WITH (FORCE)] after telling 088 that its tokens go with it.
    Returns the error (psycopg2.Error) or None."""
    discard_database_tokens(name)
    return error(admin, 'DROP DATABASE %s"%s"%s' % ("IF EXISTS " if force else "", name,
                                                    " WITH (FORCE)" if force else ""))


def fresh_db(name, extension=True):
    """Drops and creates a database (with the extension) and returns a superuser connection."""
    admin = connect()
    drop_database(admin, name, force=True)
    cur = admin.cursor()
    cur.execute('CREATE DATABASE "%s"' % name)
    admin.close()
    conn = connect(name)
    if extension:
        conn.cursor().execute("SET client_min_messages = error; CREATE EXTENSION digime; "
                              "RESET client_min_messages")
    return conn


def add_example_contract(conn):
    """Registers digi.me's published example contract (test/fixtures/digime-example)."""
    q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
      (EXAMPLE_CONTRACT, EXAMPLE_APP, fixture_key("digime-example/read-data.key")))


def ensure_role(name, *options):
    admin = connect()
    cur = admin.cursor()
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
    if cur.fetchone() is None:
        cur.execute('CREATE ROLE "%s" %s' % (name, " ".join(options)))
    admin.close()


def q(conn, sql, args=None):
    """All rows of a query."""
    cur = conn.cursor()
    cur.execute(sql, args)
    return cur.fetchall() if cur.description else None


def q1(conn, sql, args=None):
    """The first column of the first row."""
    rows = q(conn, sql, args)
    return rows[0][0] if rows else None


def error(conn, sql, args=None):
    """Runs sql expecting an error: returns (sqlstate, message, detail, hint), or None."""
    try:
        q(conn, sql, args)
    except psycopg2.Error as e:
        d = e.diag
        return (e.pgcode, d.message_primary, d.message_detail, d.message_hint)
    return None


def add_contract(conn, contract_id, application_id=None, key_pem=None, sandbox=None):
    """Registers a contract with digime and (with sandbox) the sandbox; returns its key."""
    application_id = application_id or EXAMPLE_APP
    key_pem = key_pem or new_rsa_key()
    if sandbox is not None:
        sandbox.register(application_id, contract_id, public_pem(key_pem))
    q(conn, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
      (contract_id, application_id, key_pem))
    return key_pem


def authorize(conn, contract_id, callback="https://app.example/return", state="user-1", **opts):
    """digime_authorize_url with named options; returns (url, code_verifier, session)."""
    names = ["contract_id => %s", "callback => %s", "state => %s"]
    args = [contract_id, callback, state]
    for k, v in opts.items():
        names.append("%s => %%s" % k)
        args.append(json.dumps(v) if isinstance(v, (dict, list)) else v)
    row = q(conn, "SELECT url, code_verifier, session FROM digime.digime_authorize_url(%s)"
            % ", ".join(names), args)[0]
    record_secret(row[1])
    return row


def full_authorization(conn, sandbox, contract_id, state="user-1", **opts):
    """authorize -> onboarding page -> callback; returns the token row as a dict."""
    url, verifier, session = authorize(conn, contract_id, state=state, **opts)
    location = sandbox.follow(url)
    cur = conn.cursor()
    cur.execute("SELECT * FROM digime.digime_handle_callback(%s)", (location,))
    cols = [d[0] for d in cur.description]
    return dict(zip(cols, cur.fetchone()))


def token_json(conn, token_id):
    t = q1(conn, "SELECT digime.digime_user_access_token(%s)", (token_id,))
    record_secret(t["accessToken"]["value"])
    record_secret(t["refreshToken"]["value"])
    return t


def backend_pid(conn):
    return q1(conn, "SELECT pg_backend_pid()")


def server_log_path():
    return os.path.join(WORK, "postgres.log")


# --------------------------------------------------------------------------
# Recorded requests, URLs and processes (used by 010_flow, 020_api_errors,
# 030_transport)
# --------------------------------------------------------------------------
API_ENDPOINTS = ("oauth/authorize", "oauth/token", "oauth/token/reference", "reference", "jwks")


def fixture_key(relpath):
    """A private key PEM from test/fixtures (published test keys, recorded as secrets anyway)."""
    with open(os.path.join(ROOT, "test", "fixtures", relpath)) as f:
        pem = f.read()
    record_secret(pem_body(pem))
    return pem


def api_records(sandbox, since, endpoint=None):
    """Recorded API requests (not onboarding pages) after seq since, optionally of one endpoint."""
    recs = [r for r in sandbox.requests(since) if r["endpoint"] in API_ENDPOINTS]
    if endpoint is not None:
        recs = [r for r in recs if r["endpoint"] == endpoint]
    return recs


def jwt_claims(rec):
    """Claims of a recorded request's client JWT."""
    return rec["jwt"]["claims"]


def query_pairs(url):
    """[(name, value)] of a URL's query, form-decoded once (like URLSearchParams)."""
    return urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)


def query_of(url):
    """The raw query string of a URL."""
    return urllib.parse.urlsplit(url).query


def closed_port():
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def proc_status_kb(pid, field):
    """A kB field (VmRSS, RssAnon, ...) of /proc/PID/status (readable as root)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    return None


# --------------------------------------------------------------------------
# Roles and errors (added for 040/050)
# --------------------------------------------------------------------------
def connect_as(dbname, role, **kw):
    """A connection as another role (trust authentication on the test socket)."""
    return connect(dbname, user=role, **kw)


def sqlstate(conn, sql, args=None):
    """The SQLSTATE of the error sql raises, or None when it succeeds."""
    e = error(conn, sql, args)
    return e[0] if e else None


def copy_out(conn, sql):
    """Runs COPY ... TO STDOUT; returns its text."""
    import io
    buf = io.StringIO()
    conn.cursor().copy_expert(sql, buf)
    return buf.getvalue()


def copy_in(conn, sql, data):
    import io
    conn.cursor().copy_expert(sql, io.StringIO(data))


# --------------------------------------------------------------------------
# Envelope encryption (the format of src/crypt.c)
# --------------------------------------------------------------------------
def read_key_file(path):
    """The 32 key bytes of a digime.key_file (64 hex digits or 32 raw bytes)."""
    raw = open(path, "rb").read()
    s = raw.strip()
    if len(s) == 64:
        return bytes.fromhex(s.decode())
    assert len(raw) == 32, "bad key file"
    return raw


def key_id(key):
    """digime_encryption_key_id() of a key: hex of the first 8 bytes of SHA-256("digime key id" || key)."""
    return hashlib.sha256(b"digime key id" + key).digest()[:8].hex()


def unseal(value, key, aad):
    """Opens a "dmenc1:<keyid>:<b64>" value in Python (raises when it does not verify)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    prefix, kid, b64 = value.split(":", 2)
    assert prefix == "dmenc1" and kid == key_id(key), "not sealed with this key"
    raw = base64.b64decode(b64)
    return AESGCM(key).decrypt(raw[:12], raw[12:], aad.encode()).decode()


def write_key_file(path, mode=0o600, owner="postgres"):
    """Writes a new 256-bit key (64 hex digits) readable by postgres; returns the key bytes."""
    key = os.urandom(32)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        f.write(key.hex() + "\n")
    import shutil
    shutil.chown(path, owner, owner)
    os.chmod(path, mode)
    return key


# --------------------------------------------------------------------------
# Extra clusters (050_encryption): run as postgres, Unix socket only
# --------------------------------------------------------------------------
def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pg_config(option):
    return subprocess.run([os.path.join(PG_BIN, "pg_config"), option], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()


def run_as_postgres(wrap, *cmd, timeout=120):
    """as_postgres(*cmd) started through the command prefix wrap (run as root), unchecked."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    return subprocess.run(list(wrap) + ["runuser", "-u", "postgres", "--"] + list(cmd), env=env,
                          timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd="/")


def as_postgres(*cmd, check=True, timeout=120):
    """Runs a command as user postgres (via runuser) without proxies; returns CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    # cwd "/": the clone may sit in a directory user postgres cannot enter
    return subprocess.run(["runuser", "-u", "postgres", "--"] + list(cmd), env=env, check=check,
                          timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd="/")


def server_env():
    """NAME=VALUE words for `env` that only a postmaster start gets (DM_SERVER_ENV, one a line; set by
    run-tests.sh --asan: the sanitizer runtimes and their options)."""
    return [l for l in os.environ.get("DM_SERVER_ENV", "").splitlines() if "=" in l]


# Set by run-tests.sh --asan: the server runs digime built with ASan and UBSan.
SANITIZED = bool(os.environ.get("DM_SANITIZE"))


class Cluster:
    """A throwaway cluster in $DM_WORK/clusters/NAME: data/, socket/, keys/ and postgres.log.

    settings (a dict, written to data/digime_test.conf, which postgresql.conf
    includes) start as the main cluster's: digime preloaded, the sandbox's URLs
    and CA, full statement and debug logging.  Change them, then restart().
    Use it as a context manager (or call stop()) so that it stops on failure.
    """

    def __init__(self, name):
        self.name = name
        self.dir = os.path.join(WORK, "clusters", name)
        self.data = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "socket")
        self.keys = os.path.join(self.dir, "keys")
        self.log = os.path.join(self.dir, "postgres.log")
        self.port = free_port()
        sandbox = os.environ.get("DM_SANDBOX_URL", "")
        self.settings = {
            "shared_preload_libraries": "digime",
            "digime.base_url": sandbox + "/v1.7/",
            "digime.onboard_url": sandbox + "/apps/saas/",
            "digime.ca_file": os.environ.get("DM_CA_FILE", ""),
            "log_statement": "all",
            "log_min_messages": "debug1",
            "log_min_error_statement": "debug1",
        }
        self.running = False
        self.library = None     # another digime.so for this server only (see start)

    def init(self, initdb=True):
        import atexit
        import shutil
        import signal
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):     # left by an aborted run
            as_postgres(os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", "immediate", "stop",
                        check=False)
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        atexit.register(self.stop)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # run finally/atexit
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        for d in (self.data, self.socket, self.keys):
            os.makedirs(d)
            shutil.chown(d, "postgres", "postgres")
            os.chmod(d, 0o700)
        open(self.log, "w").close()
        shutil.chown(self.log, "postgres", "postgres")
        if not initdb:
            return self
        as_postgres(os.path.join(PG_BIN, "initdb"), "-D", self.data, "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\nport = %d\nlisten_addresses = ''\nunix_socket_directories = '%s'\n"
                    "fsync = off\nmax_connections = 20\nshared_buffers = 16MB\n"
                    "include_if_exists = 'digime_test.conf'\n" % (self.port, self.socket))
        return self

    def write_settings(self):
        path = os.path.join(self.data, "digime_test.conf")
        with open(path, "w") as f:
            for k, v in self.settings.items():
                if v is not None:
                    f.write("%s = '%s'\n" % (k, str(v).replace("'", "''")))
        import shutil
        shutil.chown(path, "postgres", "postgres")

    def log_size(self):
        return os.path.getsize(self.log)

    def log_text(self, since=0):
        with open(self.log, errors="replace") as f:
            f.seek(since)
            return f.read()

    def start(self, expect_failure=False, check=True):
        """Starts the server; returns True when it runs.  With check, raises on an unexpected outcome.

        With self.library set (a path), the server runs in a mount namespace of its own in
        which that file is bind-mounted over the installed digime.so: another build of the
        library for this server only (070_upgrade runs 1.0 this way)."""
        self.write_settings()
        wrap = []
        if self.library:
            installed = os.path.join(pg_config("--pkglibdir"), "digime.so")
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", self.library, installed]
        r = run_as_postgres(wrap, "env", *server_env(), os.path.join(PG_BIN, "pg_ctl"), "-D", self.data,
                            "-l", self.log, "-w", "-t", "30", "start")
        self.running = r.returncode == 0
        if check and self.running == expect_failure:
            fatal = [l for l in self.log_text().splitlines()[-200:] if " FATAL: " in l or " PANIC: " in l]
            raise RuntimeError("cluster %s: pg_ctl start exited %d (expected %s):\n%s\n%s"
                               % (self.name, r.returncode, "failure" if expect_failure else "success",
                                  r.stdout, "\n".join(fatal[-10:])))
        return self.running

    def discard_stored_tokens(self):
        """Tokens stored in this cluster go with it: 088_every_token_stored.py is told so."""
        try:
            admin = self.connect()
            dbs = [r[0] for r in q(admin, "SELECT datname FROM pg_database WHERE datallowconn "
                                          "AND NOT datistemplate")]
            admin.close()
            for db in dbs:
                discard_database_tokens(db, self.connect)
        except Exception:
            pass

    def stop(self):
        if self.running and os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self.discard_stored_tokens()
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            as_postgres(os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop",
                        check=False)
        self.running = False

    def pg_ctl_stop(self, mode="fast", timeout=60):
        """pg_ctl stop -m MODE -w, timed: returns (exit code, seconds, output)."""
        t0 = time.time()
        r = as_postgres(os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                        "-t", str(timeout), "stop", check=False, timeout=timeout + 30)
        dt = time.time() - t0
        if r.returncode == 0:
            self.running = False
        return r.returncode, dt, r.stdout

    def postmaster_pid(self):
        """The postmaster's pid (first line of postmaster.pid), or None."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def try_connect(self, dbname="postgres", user="postgres"):
        """A connection, or None while the server does not accept one (e.g. during crash recovery)."""
        try:
            return self.connect(dbname, user)
        except psycopg2.Error:
            return None

    def wait_accepting(self, dbname="postgres", timeout=30):
        """Waits until the server accepts connections; returns (connection or None, seconds)."""
        return wait_for(lambda: self.try_connect(dbname), timeout, 0.05)

    def make_standby(self, name):
        """A streaming standby of this (running) cluster, made with pg_basebackup -R: a new
        Cluster with this one's settings on its own port and socket (not yet started)."""
        sb = Cluster(name).init(initdb=False)
        as_postgres(os.path.join(PG_BIN, "pg_basebackup"), "-D", sb.data, "-R", "-X", "stream",
                    "-c", "fast", "-h", self.socket, "-p", str(self.port), "-U", "postgres")
        sb.settings = dict(self.settings)
        # postgresql.conf came with the copy: the included file overrides port and socket
        sb.settings["port"] = sb.port
        sb.settings["unix_socket_directories"] = sb.socket
        return sb

    def restart(self, expect_failure=False, check=True):
        self.stop()
        return self.start(expect_failure, check)

    def connect(self, dbname="postgres", user="postgres"):
        conn = psycopg2.connect(host=self.socket, port=self.port, dbname=dbname, user=user)
        conn.autocommit = True
        return conn

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


# --------------------------------------------------------------------------
# Secrets in logs (050, 090)
# --------------------------------------------------------------------------
def fixture_key_bodies():
    """Base64 bodies of the fixture contract keys used by the suite."""
    fix = os.path.join(ROOT, "test", "fixtures")
    return [pem_body(open(os.path.join(fix, p)).read())
            for p in ("digime-example/read-data.key", "keys/second.pem")]


def recorded_secrets():
    """Lines of test-secrets.txt (record_secret)."""
    if not os.path.exists(SECRETS_FILE):
        return []
    with open(SECRETS_FILE) as f:
        return [l.rstrip("\n") for l in f if l.strip()]


def secret_needles(secret):
    """What to look for: the secret, and for a long one (a PEM body) each of its 64-character
    lines, which is how a PEM appears when it is logged with its line breaks."""
    needles = [secret]
    encoded = urllib.parse.quote(secret, safe="")
    if encoded != secret:
        needles.append(encoded)             # as it would appear in a URL
    if len(secret) > 64:
        needles += [secret[i:i + 64] for i in range(0, len(secret), 64) if len(secret[i:i + 64]) >= 16]
    return needles


SECRET_MIN_LEN = 12     # shorter values are placeholders ("code", "verifier") that match ordinary words


def find_secrets(text, secrets):
    """The secrets (of at least SECRET_MIN_LEN characters) of which some needle occurs in text."""
    return [s for s in secrets if len(s) >= SECRET_MIN_LEN and any(n in text for n in secret_needles(s))]


# --------------------------------------------------------------------------
# Waiting and the worker layer (060, 065, 070)
# --------------------------------------------------------------------------
def wait_for(fn, timeout=10.0, interval=0.05):
    """Calls fn until it returns a true value: returns (that value, seconds waited), or
    (None, seconds) after timeout.  An exception counts as not yet."""
    t0 = time.time()
    while True:
        try:
            v = fn()
        except Exception:
            v = None
        if v:
            return v, time.time() - t0
        if time.time() - t0 >= timeout:
            return None, time.time() - t0
        time.sleep(interval)


def wait_value(fn, timeout=10.0):
    """wait_for's value alone (None after timeout)."""
    return wait_for(fn, timeout)[0]


def extra_cluster(name, settings=None, library=None, start=True):
    """A new extra Cluster (see Cluster): the main cluster's settings updated with settings
    (a value None removes a setting), optionally another digime.so, started unless start=False.
    Stop it with cl.stop() (also done at exit)."""
    cl = Cluster(name).init()
    for k, v in (settings or {}).items():
        if v is None:
            cl.settings.pop(k, None)
        else:
            cl.settings[k] = v
    cl.library = library
    if start:
        cl.start()
    return cl


ACTIVITY_COLS = ("pid", "backend_type", "datname", "application_name", "wait_event_type",
                 "wait_event", "state")


def activity(conn, where="backend_type LIKE 'digime%%'"):
    """Rows of pg_stat_activity (as dicts of ACTIVITY_COLS), by default digime's processes."""
    rows = q(conn, "SELECT %s FROM pg_stat_activity WHERE %s ORDER BY pid"
             % (", ".join(ACTIVITY_COLS), where))
    return [dict(zip(ACTIVITY_COLS, r)) for r in rows]


def launcher_pid(conn):
    """The digime launcher's pid, or None."""
    return q1(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'digime launcher'")


def db_worker_pid(conn, dbname):
    """The pid of the per-database digime worker of dbname (not a one-shot worker), or None."""
    return q1(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'digime worker' "
                    "AND application_name = 'digime worker' AND datname = %s", (dbname,))


def wait_db_worker(conn, dbname, timeout=10, other_than=None):
    """Waits for the database worker of dbname (a pid other than other_than): (pid or None, seconds)."""
    def ready():
        pid = db_worker_pid(conn, dbname)
        return pid if pid and pid != other_than else None
    return wait_for(ready, timeout, 0.02)


def wait_no_db_worker(conn, dbname, timeout=10):
    """Waits until dbname has no database worker: (True or None, seconds)."""
    return wait_for(lambda: db_worker_pid(conn, dbname) is None, timeout, 0.02)


def log_worker_starts(log_text, dboid):
    """How often the log says the launcher started a worker for database dboid (DEBUG1)."""
    return log_text.count('starting background worker process "digime worker for database %d"' % dboid)
