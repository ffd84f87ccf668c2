"""080_pg_cron: the README recipe — pg_cron calls CALL digime.digime_refresh_expiring() on a
schedule, and the tokens are refreshed (seen in cron.job_run_details and in the tokens).

Runs on a cluster of its own with shared_preload_libraries = 'pg_cron,digime' (Debian's
postgresql-15-cron, version 1.4: schedules have one-minute resolution, so this test waits for
the next minute).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pylib"))
import dmtest  # noqa: E402
from dmtest import q, q1  # noqa: E402

tap = dmtest.Tap()
sb = dmtest.Sandbox()
APP, C1 = dmtest.EXAMPLE_APP, dmtest.EXAMPLE_CONTRACT


@tap.test
def scheduled_batch_refresh():
    with dmtest.Cluster("t080").init() as cl:
        cl.settings.update({"shared_preload_libraries": "pg_cron,digime",
                            "cron.database_name": "postgres",
                            "cron.use_background_workers": "on",
                            "max_worker_processes": "20",
                            "digime.worker_naptime": "2"})
        cl.start()
        admin = cl.connect()
        q(admin, "CREATE EXTENSION pg_cron")
        q(admin, "CREATE DATABASE t080")
        db = cl.connect("t080")
        q(db, "SET client_min_messages = error; CREATE EXTENSION digime")
        q(db, "SELECT * FROM digime.digime_add_contract(%s, %s, %s)",
          (C1, APP, dmtest.fixture_key("digime-example/read-data.key")))
        ids, before = [], {}
        for p in sb.mint(APP, C1, count=5):
            dmtest.record_secret(p["access_token"])
            dmtest.record_secret(p["refresh_token"])
            doc = {"accessToken": {"value": p["access_token"], "expiry": p["access_expires_on"]},
                   "refreshToken": {"value": p["refresh_token"], "expiry": p["refresh_expires_on"]}}
            tid = q1(db, "SELECT id FROM digime.digime_import_token(%s, %s)", (C1, json.dumps(doc)))
            ids.append(tid)
            before[tid] = p["access_token"]
        q(db, "UPDATE digime.user_tokens SET access_token_expires_at = now() + interval '5 minutes'")
        job = q1(admin, "SELECT cron.schedule_in_database('digime-refresh', '* * * * *', "
                        "'CALL digime.digime_refresh_expiring()', 't080')")
        tap.ok(job is not None, "the README recipe schedules the batch refresh with pg_cron")
        run = None
        end = time.time() + 90
        while time.time() < end and run is None:
            rows = q(admin, "SELECT status, return_message FROM cron.job_run_details "
                            "WHERE jobid = %s AND status IN ('succeeded', 'failed')", (job,))
            run = rows[0] if rows else None
            time.sleep(0.5)
        tap.eq(run, ("succeeded", "CALL"), "cron.job_run_details: the job ran and succeeded")
        after = {t: dmtest.token_json(db, t)["accessToken"]["value"] for t in ids}
        tap.eq(sum(1 for t in ids if after[t] != before[t]), 5, "all five tokens were refreshed")
        issued = {p["access_token"]: p for p in sb.tokens()}
        tap.ok(all(issued.get(after[t], {}).get("state") == "valid" for t in ids),
               "the stored pairs are the new, valid ones")
        tap.eq(q1(db, "SELECT count(*) FROM digime.audit_log WHERE action = 'refresh_batch' "
                      "AND outcome = 'ok'"), 5, "audited as refresh_batch")
        q(admin, "SELECT cron.unschedule(%s)", (job,))
        db.close()
        admin.close()


tap.run()
