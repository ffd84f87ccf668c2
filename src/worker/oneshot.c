/*-------------------------------------------------------------------------
 *
 * oneshot.c
 *	  The one-shot worker: serves one request when this database has no
 *	  running digime worker (digime is not preloaded, or its worker is not
 *	  up yet), with the same engine and the same guarantees.
 *
 * The request lives in a DSM segment that the backend creates; the worker
 * attaches to it, takes the request only if the backend still wants it,
 * and commits its result whether or not the backend still waits.  If no
 * background worker can be started, the call fails at once (53400).
 *
 * IDENTIFICATION
 *	  src/worker/oneshot.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "worker/internal.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"

PGDLLEXPORT void digime_oneshot_main(Datum arg);

struct DmOneshot
{
	dsm_segment *seg;
	BackgroundWorkerHandle *handle;
};

DmOneshot *
dm_oneshot_start(const DmRequestArgs *args, DmSlot **slot_out)
{
	DmOneshot  *os = palloc0(sizeof(DmOneshot));
	DmSlot	   *slot;
	BackgroundWorker worker;

	os->seg = dsm_create(sizeof(DmSlot), 0);
	slot = dsm_segment_address(os->seg);
	dm_slot_init(slot);
	dm_request_pack(&slot->req, args);
	slot->caller = MyProc;
	slot->database = MyDatabaseId;
	slot->state = SLOT_SUBMITTED;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "digime", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "digime_oneshot_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "digime one-shot worker", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "digime worker", BGW_MAXLEN);
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(os->seg));
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &os->handle))
	{
		dsm_detach(os->seg);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a digime worker"),
				 errdetail("No background worker slot is free; nothing was sent to digi.me."),
				 errhint("Raise max_worker_processes: digime needs one slot per database using it "
						 "(with shared_preload_libraries) plus one per request served by a one-shot worker.")));
	}
	*slot_out = slot;
	return os;
}

bool
dm_oneshot_alive(DmOneshot *os)
{
	pid_t		pid;
	BgwHandleStatus st = GetBackgroundWorkerPid(os->handle, &pid);

	return st == BGWH_STARTED || st == BGWH_NOT_YET_STARTED;
}

void
dm_oneshot_finish(DmOneshot *os)
{
	dsm_detach(os->seg);
	pfree(os->handle);
	pfree(os);
}

static DmSlot *oneshot_slot = NULL;

static void
oneshot_exit(int code, Datum arg)
{
	DmSlot	   *s = oneshot_slot;
	PGPROC	   *caller = NULL;

	if (s == NULL)
		return;
	SpinLockAcquire(&s->mutex);
	if (s->state == SLOT_TAKEN && !s->abandoned)
	{
		dm_reply_set_lost(&s->reply);
		s->state = SLOT_DONE;
		caller = s->caller;
	}
	SpinLockRelease(&s->mutex);
	if (caller != NULL)
		SetLatch(&caller->procLatch);
}

void
digime_oneshot_main(Datum arg)
{
	dsm_segment *seg;
	DmSlot	   *slot;
	bool		wanted;

	dm_worker_process_init();
	seg = dsm_attach(DatumGetUInt32(arg));
	if (seg == NULL)
		proc_exit(0);			/* the backend left before we started */
	slot = dsm_segment_address(seg);
	SpinLockAcquire(&slot->mutex);
	wanted = slot->state == SLOT_SUBMITTED;
	if (wanted)
	{
		slot->state = SLOT_TAKEN;
		slot->worker_pid = MyProcPid;
	}
	SpinLockRelease(&slot->mutex);
	if (!wanted)
		proc_exit(0);
	oneshot_slot = slot;
	before_shmem_exit(oneshot_exit, (Datum) 0);
	BackgroundWorkerInitializeConnectionByOid(slot->database, InvalidOid, 0);
	pgstat_report_appname("digime one-shot worker");
	dm_engine_run(DM_ENGINE_ONESHOT, slot);
	oneshot_slot = NULL;
	proc_exit(0);
}
