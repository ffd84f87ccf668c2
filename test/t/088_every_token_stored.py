"""088_every_token_stored: runs after the suite's other tests.  Every token pair the sandbox
delivered during the whole suite and that is still current at digi.me (not replaced by a later
refresh or reauthorization) is stored in some database of the main cluster — whatever the
tests did to their callers (rollbacks, cancels, timeouts, terminations, crashes).

Pairs a test threw away on purpose (dropped databases, extra clusters, tokens the tests obtained
without digime) are listed by dmtest.discard_tokens and not looked for.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest as d  # noqa: E402

tap = d.Tap()


@tap.test
def every_delivered_token_is_stored():
    pairs = d.Sandbox().tokens(archived=True)
    current = [p for p in pairs if p["delivered"] and p["access_state"] != "rotated"]
    discarded = d.discarded_tokens()
    admin = d.connect()
    dbs = [r[0] for r in d.q(admin, "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")]
    stored = set()
    clients = set()
    for db in dbs:
        c = d.connect(db)
        if d.q1(c, "SELECT count(*) FROM pg_extension WHERE extname = 'digime'"):
            stored |= d.stored_access_tokens(c)
            clients |= set(r[0] for r in d.q(c, "SELECT application_id || '_' || contract_id "
                                                "FROM digime.contracts"))
        c.close()
    # pairs of clients no digime database knows were obtained without digime (005, the benchmark)
    looked_for = [p for p in current if p["access_token"] not in discarded and p["client_id"] in clients]
    missing = [p for p in looked_for if p["access_token"] not in stored]
    tap.ok(len(pairs) > 100, "the suite issued %d pairs (%d delivered and current, %d thrown away on purpose)"
           % (len(pairs), len(current), len(current) - len(looked_for)))
    tap.ok(not missing, "each of the %d delivered, current pairs is stored" % len(looked_for),
           "\n".join("%s... %s %s user %s issued %s" % (p["access_token"][:6], p["source"], p["client_id"],
                                                       p["user_id"], p["issued_at"]) for p in missing))


tap.run()
