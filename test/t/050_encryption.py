"""050_encryption: secrets at rest (digime.key_file).

(a) on the main cluster: every stored secret is "dmenc1:" AES-256-GCM under the key
    file, bound to its table, column and row;
(b) an extra cluster without a key file: plaintext and the WARNING, then encryption
    is enabled with digime_reencrypt_secrets();
(c) key rotation with digime.previous_key_file;
(d) refused configurations: key file in the data directory, readable by others,
    malformed, relative; key_file without shared_preload_libraries;
(e) digime.key_file cannot be set at runtime.
Secrets are compared in Python; the extra cluster's log is scanned by 090.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402

tap = d.Tap()
sb = d.Sandbox()


def secrets_of(conn):
    """Every stored secret: {(table, column, row key): stored text}."""
    out = {}
    for table, key_col, col in (("contracts", "contract_id", "private_key"),
                                ("user_tokens", "id", "access_token"),
                                ("user_tokens", "id", "refresh_token"),
                                ("authorizations", "id", "code_verifier")):
        for k, v in d.q(conn, "SELECT %s::text, %s FROM digime.%s WHERE %s IS NOT NULL"
                        % (key_col, col, table, col)):
            out[(table, col, k)] = v
    return out


def aad(k):
    return "digime/%s/%s/%s" % k


def plaintexts(conn, token_ids):
    """{token id: (access token, refresh token)} through digime_user_access_token."""
    out = {}
    for t in token_ids:
        j = d.token_json(conn, t)
        out[t] = (j["accessToken"]["value"], j["refreshToken"]["value"])
    return out


def no_plain(values, plain):
    """True when no plaintext appears in any of the values."""
    return not any(p in v for v in values for p in plain if p)


def fatal_lines(log):
    """The FATAL/PANIC lines of a log excerpt (never its STATEMENT lines)."""
    return "\n".join(l for l in log.splitlines() if " FATAL: " in l or " PANIC: " in l)[-1000:]


def err_text(e):
    return " ".join(x or "" for x in (e or ())[1:])


# --------------------------------------------------------------------------
@tap.test
def main_cluster_sealed():
    sb.reset(everything=True)   # no fault or config left by an earlier file
    conn = d.fresh_db("t050")
    key = d.read_key_file(os.path.join(d.WORK, "keys", "digime.key"))
    kid = d.key_id(key)
    tap.eq(d.q1(conn, "SELECT digime.digime_encryption_key_id()"), kid, "the key file's id is loaded")
    pem = d.add_contract(conn, "t050-c1", sandbox=sb)
    pem2 = d.add_contract(conn, "t050-c2", sandbox=sb)
    t1 = d.full_authorization(conn, sb, "t050-c1", state="t050-a")["id"]
    t2 = d.full_authorization(conn, sb, "t050-c1", state="t050-b")["id"]
    url_p, verifier, _ = d.authorize(conn, "t050-c1", state="t050-pending")
    plain = plaintexts(conn, [t1, t2])
    d.discard_tokens([at for at, _ in plain.values()])     # damaged on purpose below
    stored = secrets_of(conn)
    want_plain = {("contracts", "private_key", "t050-c1"): pem, ("contracts", "private_key", "t050-c2"): pem2}
    for t, (at, rt) in plain.items():
        want_plain[("user_tokens", "access_token", str(t))] = at
        want_plain[("user_tokens", "refresh_token", str(t))] = rt
    pending = d.q1(conn, "SELECT id::text FROM digime.authorizations WHERE state = 't050-pending'")
    want_plain[("authorizations", "code_verifier", pending)] = verifier
    tap.eq(sorted(stored), sorted(want_plain), "stored secrets: 2 keys, 2x2 tokens, 1 pending code_verifier")
    tap.ok(all(v.startswith("dmenc1:%s:" % kid) for v in stored.values()),
           "every stored secret is dmenc1:<key id>:...")
    lines = [l for p in (pem, pem2) for l in p.splitlines() if l and not l.startswith("-----")]
    tap.ok(no_plain(stored.values(), list(want_plain.values()) + lines), "no plaintext in any stored value")
    tap.ok(all(d.unseal(stored[k], key, aad(k)) == want_plain[k] for k in stored),
           "each value is AES-256-GCM under the key file with its table/column/row as associated data")
    tap.ok(len(set(stored.values())) == len(stored), "no two sealed values are equal")

    # a sealed value copied to another row, another column, or altered does not open
    sensitive = [p for pair in plain.values() for p in pair] + [verifier]
    d.q(conn, "UPDATE digime.user_tokens SET access_token = "
              "(SELECT access_token FROM digime.user_tokens WHERE id = %s) WHERE id = %s", (t1, t2))
    for label, sql in (("user_access_token", "SELECT digime.digime_user_access_token(%s)" % t2),
                       ("refresh_token", "SELECT * FROM digime.digime_refresh_token(%s)" % t2)):
        e = d.error(conn, sql)
        tap.ok(e is not None and e[0] == "XX001", "access_token copied to another row: %s -> XX001" % label,
               repr(e))
        tap.ok(not any(s in err_text(e) for s in sensitive), "the error reveals no token")
    d.q(conn, "UPDATE digime.user_tokens SET refresh_token = access_token WHERE id = %s", (t1,))
    e = d.error(conn, "SELECT digime.digime_user_access_token(%s)" % t1)
    tap.ok(e is not None and e[0] == "XX001" and not any(s in err_text(e) for s in sensitive),
           "access_token copied to the refresh_token column -> XX001", repr(e))
    d.q(conn, "UPDATE digime.contracts SET private_key = "
              "(SELECT private_key FROM digime.contracts WHERE contract_id = 't050-c1') "
              "WHERE contract_id = 't050-c2'")
    e = d.error(conn, "SELECT * FROM digime.digime_authorize_url('t050-c2', 'https://app.example/', 'x')")
    tap.ok(e is not None and e[0] == "XX001" and not any(l in err_text(e) for l in lines),
           "private key copied to another contract -> XX001", repr(e))
    d.q(conn, "UPDATE digime.authorizations SET code_verifier = overlay(code_verifier placing "
              "CASE WHEN substr(code_verifier, 40, 1) = 'A' THEN 'B' ELSE 'A' END from 40 for 1) "
              "WHERE state = 't050-pending'")
    e = d.error(conn, "SELECT * FROM digime.digime_handle_callback(%s)", (sb.follow(url_p),))
    tap.ok(e is not None and e[0] == "XX001" and verifier not in err_text(e),
           "an altered code_verifier -> XX001 at the callback", repr(e))
    d.q(conn, "UPDATE digime.user_tokens SET access_token = 'dmenc1:%s:' || 'AAAA' WHERE id = %s" % (kid, t2))
    tap.eq(d.sqlstate(conn, "SELECT digime.digime_user_access_token(%s)" % t2), "XX001",
           "a truncated sealed value -> XX001")
    # a secret that looks sealed is refused rather than stored as such
    doc = {"accessToken": {"value": "dmenc1:x", "expiry": 4102444800},
           "refreshToken": {"value": "rt-x", "expiry": 4102444800}}
    tap.eq(d.sqlstate(conn, "SELECT * FROM digime.digime_import_token('t050-c1', %s)", (json.dumps(doc),)),
           "22023", "a token starting with dmenc1: is refused")
    conn.close()


@tap.test
def runtime_settings():
    # (e) digime.key_file is read at server start only
    conn = d.connect("t050")
    d.ensure_role("t050_app", "LOGIN")
    app = d.connect_as("t050", "t050_app")
    for who, c in (("superuser", conn), ("t050_app", app)):
        for sql in ("SET digime.key_file = '/tmp/other.key'", "SET digime.previous_key_file = '/tmp/other.key'",
                    "SELECT set_config('digime.key_file', '/tmp/other.key', false)",
                    "SET LOCAL digime.key_file = '/tmp/other.key'"):
            tap.eq(d.sqlstate(c, sql), "55P02", "%s: %s -> 55P02" % (who, sql))
    tap.eq(d.sqlstate(conn, "ALTER DATABASE t050 SET digime.key_file = '/tmp/other.key'"), "55P02",
           "ALTER DATABASE SET digime.key_file -> 55P02")
    tap.eq(d.sqlstate(conn, "ALTER ROLE t050_app SET digime.key_file = '/tmp/other.key'"), "55P02",
           "ALTER ROLE SET digime.key_file -> 55P02")
    tap.eq(d.sqlstate(app, "ALTER SYSTEM SET digime.key_file = '/tmp/other.key'"), "42501",
           "t050_app: ALTER SYSTEM SET digime.key_file -> 42501")
    tap.eq(d.sqlstate(app, "SHOW digime.key_file"), "42501", "t050_app: SHOW digime.key_file -> 42501")
    tap.eq(d.q1(conn, "SHOW digime.key_file"), os.path.join(d.WORK, "keys", "digime.key"),
           "the superuser sees the path")
    app.close()
    conn.close()


state = {}     # carried between the phases of extra_cluster


@tap.test
def extra_cluster():
    cl = state["cluster"] = d.Cluster("t050").init()
    try:
        plaintext_then_encrypted(cl)
        rotation(cl)
        refusals(cl)
    finally:
        cl.stop()


def plaintext_then_encrypted(cl):
    # (b) no key file: plaintext, with a WARNING at CREATE EXTENSION
    cl.start()
    root = cl.connect()
    d.q(root, "CREATE DATABASE t050p")
    conn = cl.connect("t050p")
    since = cl.log_size()
    d.q(conn, "CREATE EXTENSION digime")
    notices = "".join(conn.notices)
    tap.ok("WARNING:  digime stores contract keys and user tokens in plaintext" in notices,
           "CREATE EXTENSION warns about plaintext", notices)
    tap.ok("HINT:  Set digime.key_file (and shared_preload_libraries = 'digime'), restart, then run "
           "SELECT digime.digime_reencrypt_secrets()." in notices, "with a HINT on how to encrypt", notices)
    log = cl.log_text(since)
    tap.ok("WARNING:  digime stores contract keys" in log and "HINT:  Set digime.key_file" in log,
           "the WARNING and HINT are in the server log")
    tap.eq(d.q1(conn, "SELECT digime.digime_encryption_key_id()"), None, "no key: key id is NULL")
    pem = d.add_contract(conn, "t050-p", sandbox=sb)
    t1 = d.full_authorization(conn, sb, "t050-p", state="p-1")["id"]
    t2 = d.full_authorization(conn, sb, "t050-p", state="p-2")["id"]
    url, verifier, _ = d.authorize(conn, "t050-p", state="p-pending")
    plain = plaintexts(conn, [t1, t2])
    stored = secrets_of(conn)
    want = {("contracts", "private_key", "t050-p"): pem}
    for t, (at, rt) in plain.items():
        want[("user_tokens", "access_token", str(t))] = at
        want[("user_tokens", "refresh_token", str(t))] = rt
    pid = d.q1(conn, "SELECT id::text FROM digime.authorizations WHERE state = 'p-pending'")
    want[("authorizations", "code_verifier", pid)] = verifier
    tap.eq(stored, want, "without a key file the secrets are stored in plaintext")
    conn.close()
    root.close()

    # enable: key file outside the data directory, 0600, owned by postgres
    k1_path = os.path.join(cl.keys, "k1.key")
    k1 = d.write_key_file(k1_path)
    cl.settings["digime.key_file"] = k1_path
    cl.restart()
    conn = cl.connect("t050p")
    tap.eq(d.q1(conn, "SELECT digime.digime_encryption_key_id()"), d.key_id(k1), "key id of the new key file")
    tap.eq(plaintexts(conn, [t1, t2]), plain, "plaintext values still read with a key loaded")
    n = d.q1(conn, "SELECT digime.digime_reencrypt_secrets()")
    tap.eq(n, len(want), "digime_reencrypt_secrets() returns the number of values converted (%d)" % len(want))
    sealed = secrets_of(conn)
    tap.ok(sorted(sealed) == sorted(want) and
           all(v.startswith("dmenc1:%s:" % d.key_id(k1)) and d.unseal(v, k1, aad(k)) == want[k]
               for k, v in sealed.items()), "every value is now sealed with the new key, bound to its row")
    tap.ok(no_plain(sealed.values(), want.values()), "no plaintext left in the tables")
    tap.eq(d.q1(conn, "SELECT digime.digime_reencrypt_secrets()"), 0, "a second run converts nothing")
    # the flows keep working
    tap.eq(plaintexts(conn, [t1, t2]), plain, "user_access_token returns the same tokens")
    d.q(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (t1,))
    tap.ok(sb_valid(d.token_json(conn, t1)["accessToken"]["value"]), "refresh_token works on a converted token")
    row = d.q(conn, "SELECT id FROM digime.digime_handle_callback(%s)", (sb.follow(url),))
    tap.ok(len(row) == 1, "an authorization started before encryption completes (its verifier was converted)")
    t3 = d.full_authorization(conn, sb, "t050-p", state="p-3")["id"]
    tap.ok(all(v.startswith("dmenc1:%s:" % d.key_id(k1)) for v in secrets_of(conn).values()),
           "new values are sealed")
    state.update(tokens=[t1, t2, t3, row[0][0]], k1=k1, k1_path=k1_path)
    conn.close()


def sb_valid(access_token):
    return any(t["access_token"] == access_token and t["state"] == "valid" for t in sb.tokens())


def rotation(cl):
    # (c) new key; the old one is previous_key_file until everything is rewritten
    k1, k1_path, toks = state["k1"], state["k1_path"], state["tokens"]
    conn = cl.connect("t050p")
    plain = plaintexts(conn, toks)
    conn.close()
    k2_path = os.path.join(cl.keys, "k2.key")
    k2 = d.write_key_file(k2_path)
    cl.settings["digime.key_file"] = k2_path
    cl.settings["digime.previous_key_file"] = k1_path
    cl.restart()
    conn = cl.connect("t050p")
    kid1, kid2 = d.key_id(k1), d.key_id(k2)
    tap.eq(d.q1(conn, "SELECT digime.digime_encryption_key_id()"), kid2, "rotation: the new key is current")
    tap.eq(plaintexts(conn, toks), plain, "rotation: values under the previous key are readable")
    before = secrets_of(conn)
    old = [k for k, v in before.items() if v.startswith("dmenc1:%s:" % kid1)]
    tap.eq(len(old), len(before), "all %d values are still under the old key" % len(before))
    tap.eq(d.q1(conn, "SELECT digime.digime_reencrypt_secrets()"), len(old),
           "digime_reencrypt_secrets() converts all of them")
    after = secrets_of(conn)
    tap.ok(all(v.startswith("dmenc1:%s:" % kid2) and d.unseal(v, k2, aad(k)) == d.unseal(before[k], k1, aad(k))
               for k, v in after.items()) and sorted(after) == sorted(before),
           "every value is re-sealed under the new key with the same plaintext")
    conn.close()
    del cl.settings["digime.previous_key_file"]
    cl.restart()
    conn = cl.connect("t050p")
    tap.eq(plaintexts(conn, toks), plain, "without the previous key everything is still readable")
    d.q(conn, "SELECT * FROM digime.digime_refresh_token(%s)", (toks[0],))
    plain = plaintexts(conn, toks)
    conn.close()
    # a value under a key that is not loaded: F0000 with a HINT
    cl.settings["digime.key_file"] = k1_path
    cl.restart()
    conn = cl.connect("t050p")
    e = d.error(conn, "SELECT digime.digime_user_access_token(%s)", (toks[0],))
    tap.ok(e is not None and e[0] == "F0000" and kid2 in e[1] and e[3] is not None and
           "digime.key_file" in e[3] and "previous_key_file" in e[3],
           "a value under a key that is not loaded -> F0000 naming the key, with a HINT", repr(e))
    tap.ok(not any(p in err_text(e) for pair in plain.values() for p in pair), "the error reveals no token")
    e = d.error(conn, "SELECT digime.digime_reencrypt_secrets()")
    tap.eq(e and e[0], "F0000", "reencrypt_secrets cannot convert values it cannot open -> F0000")
    tap.ok(all(v.startswith("dmenc1:%s:" % kid2) for v in secrets_of(conn).values()), "and changed nothing")
    conn.close()
    cl.settings["digime.key_file"] = k2_path
    cl.restart()
    conn = cl.connect("t050p")
    tap.eq(plaintexts(conn, toks), plain, "with the right key again, everything reads")
    state.update(k2=k2, k2_path=k2_path)
    conn.close()


def refusals(cl):
    # (d) configurations that must not start
    k2 = state["k2"]
    inside = os.path.join(cl.data, "digime.key")
    shutil.copy(state["k2_path"], inside)
    shutil.chown(inside, "postgres", "postgres")
    os.chmod(inside, 0o600)
    loose = os.path.join(cl.keys, "loose.key")
    d.write_key_file(loose, mode=0o644)
    group_w = os.path.join(cl.keys, "groupw.key")
    d.write_key_file(group_w, mode=0o620)
    short = os.path.join(cl.keys, "short.key")
    with open(short, "w") as f:
        f.write("abcdef\n")
    shutil.chown(short, "postgres", "postgres")
    os.chmod(short, 0o600)
    cl.stop()
    for label, setting, path, why in (
            ("key file inside the data directory", "digime.key_file", inside,
             "The key file must be outside the data directory."),
            ("world-readable key file", "digime.key_file", loose, "Other users may access it"),
            ("group-writable key file", "digime.key_file", group_w, "Other users may access it"),
            ("malformed key file", "digime.key_file", short, "It must hold 64 hexadecimal digits"),
            ("relative key file path", "digime.key_file", "keys/k2.key", "The path must be absolute."),
            ("missing key file", "digime.key_file", os.path.join(cl.keys, "missing.key"), "No such file"),
            ("world-readable previous_key_file", "digime.previous_key_file", loose, "Other users may access it")):
        saved = dict(cl.settings)
        cl.settings["digime.key_file"] = state["k2_path"]
        cl.settings[setting] = path
        since = cl.log_size()
        started = cl.start(check=False)
        if started:
            cl.stop()
        log = cl.log_text(since)
        tap.ok(not started and 'could not load %s "%s"' % (setting, path) in log and why in log,
               "%s: the server does not start, and the log says why" % label, fatal_lines(log))
        cl.settings = saved
    cl.settings["digime.key_file"] = state["k2_path"]
    cl.start()
    conn = cl.connect("t050p")
    tap.eq(d.q1(conn, "SELECT digime.digime_encryption_key_id()"), d.key_id(k2), "the valid setup starts again")
    before = secrets_of(conn)
    conn.close()

    # key_file set, digime not preloaded: no secret is written or read
    cl.settings["shared_preload_libraries"] = ""
    cl.settings["log_statement"] = "none"   # the redaction hook loads with the library, after the log line
    cl.restart()
    since = cl.log_size()
    pem = d.new_rsa_key()
    doc = {"accessToken": {"value": "at-np-" + os.urandom(12).hex(), "expiry": 4102444800},
           "refreshToken": {"value": "rt-np-" + os.urandom(12).hex(), "expiry": 4102444800}}
    d.record_secret(doc["accessToken"]["value"])
    d.record_secret(doc["refreshToken"]["value"])
    for label, sql, args in (
            ("add_contract", "SELECT * FROM digime.digime_add_contract('t050-np', 'app', %s)", (pem,)),
            ("import_token", "SELECT * FROM digime.digime_import_token('t050-p', %s)", (json.dumps(doc),)),
            ("rotate_contract_key", "SELECT * FROM digime.digime_rotate_contract_key('t050-p', %s)", (pem,)),
            ("authorize_url", "SELECT * FROM digime.digime_authorize_url('t050-p', 'https://app.example/', 'np')", None),
            ("user_access_token", "SELECT digime.digime_user_access_token(%s)", (state["tokens"][0],)),
            ("encryption_key_id", "SELECT digime.digime_encryption_key_id()", None),
            ("reencrypt_secrets", "SELECT digime.digime_reencrypt_secrets()", None)):
        conn = cl.connect("t050p")      # a new backend each time: the library loads in it
        at = cl.log_size()
        e = d.error(conn, sql, args)
        tap.ok(e is not None and e[0] == "F0000" and "shared_preload_libraries" in err_text(e),
               "not preloaded: %s -> F0000" % label, repr(e) + "\n" + fatal_lines(cl.log_text(at)))
        conn.close()
    conn = cl.connect("t050p")
    tap.eq(secrets_of(conn), before, "not preloaded: nothing was stored or changed")
    conn.close()
    # a new database: CREATE EXTENSION must not end up storing plaintext either
    root = cl.connect()
    d.q(root, "CREATE DATABASE t050np")
    root.close()
    c2 = cl.connect("t050np")
    e = d.error(c2, "CREATE EXTENSION digime")
    c2.close()
    if e is None:
        c2 = cl.connect("t050np")
        e2 = d.error(c2, "SELECT * FROM digime.digime_add_contract('t050-np', 'app', %s)", (pem,))
        c2.close()
        c2 = cl.connect("t050np")
        tap.ok(e2 is not None and e2[0] == "F0000" and d.q1(c2, "SELECT count(*) FROM digime.contracts") == 0,
               "not preloaded, new database: add_contract -> F0000, nothing stored", repr(e2))
        c2.close()
    else:
        tap.eq(e[0], "F0000", "not preloaded, new database: CREATE EXTENSION -> F0000")
    leaked = d.find_secrets(cl.log_text(since), [d.pem_body(pem), doc["accessToken"]["value"],
                                                  doc["refreshToken"]["value"]])
    tap.eq(len(leaked), 0, "not preloaded: no secret reached the server log")
    cl.settings["shared_preload_libraries"] = "digime"
    cl.settings["log_statement"] = "all"
    state["log_end"] = since


@tap.test
def extra_cluster_log():
    # everything before the not-preloaded phase ran with log_statement = all and debug1
    log = state["cluster"].log_text()[:state.get("log_end")]
    secrets = sb.secrets()["values"] + d.recorded_secrets()
    tap.ok(len(log) > 20000 and "digime_handle_callback('***')" in log,
           "the extra cluster's log is substantial and has redacted statements")
    leaked = d.find_secrets(log, secrets)
    tap.eq(len(leaked), 0, "no secret of the suite (%d) in the extra cluster's log" % len(secrets))


tap.run()
