/*-------------------------------------------------------------------------
 *
 * client.c
 *	  The backend's side of the worker layer: hands a request to this
 *	  database's digime worker (or to a one-shot worker), waits on the
 *	  process latch for the answer, and re-raises the worker's error.
 *
 * The backend holds no lock the worker needs while it waits: the worker
 * claims rows itself, and the flow functions refuse a token row that the
 * caller's own transaction has changed.  A cancel, statement_timeout or
 * termination while waiting leaves the request to the worker, which
 * commits its result: the backend takes back a request no worker has
 * taken yet (nothing was sent) and abandons one that is under way.
 *
 * IDENTIFICATION
 *	  src/worker/client.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "worker/internal.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#define WAIT_SLICE_MS 250

/* The request this backend waits for, for the exit callback. */
static DmSlot *waiting_slot = NULL;
static bool exit_callback_set = false;
static bool wake_at_commit = false;
static Oid	restart_at_commit = InvalidOid;
static bool xact_callback_set = false;

/*
 * The backend stops waiting: a slot no worker took goes back (nothing
 * was sent, returns false); a taken one is left to the worker.
 */
static bool
abandon(DmSlot *slot)
{
	bool		under_way;

	SpinLockAcquire(&slot->mutex);
	under_way = slot->state == SLOT_TAKEN || slot->state == SLOT_DONE;
	if (slot->state == SLOT_SUBMITTED || slot->state == SLOT_DONE)
		dm_slot_init(slot);
	else
		slot->abandoned = true;
	SpinLockRelease(&slot->mutex);
	return under_way;
}

static void
abandon_on_exit(int code, Datum arg)
{
	if (waiting_slot != NULL)
		(void) abandon(waiting_slot);
	waiting_slot = NULL;
}

/* This database's running worker, or NULL. */
static PGPROC *
database_worker(void)
{
	DmDbWorker *e;
	PGPROC	   *proc = NULL;

	if (dm_shared == NULL)
		return NULL;
	LWLockAcquire(dm_shared->lock, LW_SHARED);
	e = dm_db_entry(MyDatabaseId, false);
	if (e != NULL && e->state == DB_RUNNING)
		proc = e->proc;
	LWLockRelease(dm_shared->lock);
	return proc;
}

/* Asks the launcher to look at this database now (its worker is missing). */
static void
poke_launcher(void)
{
	DmDbWorker *e;

	if (dm_shared == NULL || IsUnderPostmaster == false)
		return;
	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	e = dm_db_entry(MyDatabaseId, true);
	if (e != NULL)
		e->wake = true;
	LWLockRelease(dm_shared->lock);
	dm_wake_launcher();
}

/* A slot of the shared queue for this database's worker; NULL when there is no worker. */
static DmSlot *
submit_shared(const DmRequestArgs *args, bool abandoned)
{
	PGPROC	   *worker = database_worker();
	DmSlot	   *slot;

	if (worker == NULL)
		return NULL;
	while ((slot = dm_slot_alloc()) == NULL)
	{
		/* all slots in use: wait for one (back-pressure), honouring cancel */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	PG_TRY();
	{
		dm_request_pack(&slot->req, args);
	}
	PG_CATCH();
	{
		SpinLockAcquire(&slot->mutex);
		dm_slot_init(slot);
		SpinLockRelease(&slot->mutex);
		PG_RE_THROW();
	}
	PG_END_TRY();
	SpinLockAcquire(&slot->mutex);
	slot->caller = MyProc;
	slot->abandoned = abandoned;
	slot->sent = false;
	slot->progress_done = slot->progress_total = 0;
	slot->database = MyDatabaseId;	/* now visible to the worker */
	SpinLockRelease(&slot->mutex);
	SetLatch(&worker->procLatch);
	return slot;
}

/* Whether the worker that took or should take the slot is still there. */
static bool
worker_alive(DmSlot *slot, DmOneshot *os)
{
	pid_t		pid;
	DmSlotState state;
	DmDbWorker *e;
	bool		alive;

	if (os != NULL)
		return dm_oneshot_alive(os);
	SpinLockAcquire(&slot->mutex);
	pid = slot->worker_pid;
	state = slot->state;
	SpinLockRelease(&slot->mutex);
	LWLockAcquire(dm_shared->lock, LW_SHARED);
	e = dm_db_entry(MyDatabaseId, false);
	alive = e != NULL && e->state == DB_RUNNING &&
		(state == SLOT_SUBMITTED || e->pid == pid);
	LWLockRelease(dm_shared->lock);
	return alive;
}

static void
raise_reply(const DmSlotReply *r)
{
	ereport(ERROR,
			(errcode(r->sqlerrcode),
			 errmsg_internal("%s", r->message >= 0 ? r->text + r->message : "digime worker error"),
			 r->detail >= 0 ? errdetail_internal("%s", r->text + r->detail) : 0,
			 r->hint >= 0 ? errhint("%s", r->text + r->hint) : 0));
}

static void
report_progress(DmSlot *slot, const char *what, int *last_decile)
{
	int64		done,
				total;
	int			decile;

	SpinLockAcquire(&slot->mutex);
	done = slot->progress_done;
	total = slot->progress_total;
	SpinLockRelease(&slot->mutex);
	if (total <= 0 || what == NULL)
		return;
	decile = (int) (done * 10 / total);
	if (decile > *last_decile && done < total)
	{
		*last_decile = decile;
		ereport(NOTICE,
				(errmsg("%s: " INT64_FORMAT " of " INT64_FORMAT " done (%d %%)",
						what, done, total, (int) (done * 100 / total))));
	}
}

void
dm_worker_request(const DmRequestArgs *args, DmReply *reply, const char *what,
				  const char *where)
{
	DmSlot	   *slot;
	DmOneshot  *os = NULL;
	MemoryContext cxt = CurrentMemoryContext;
	int			last_decile = 0;
	DmSlotReply r;

	if (!exit_callback_set)
	{
		before_shmem_exit(abandon_on_exit, (Datum) 0);
		exit_callback_set = true;
	}
	slot = submit_shared(args, false);
	if (slot == NULL)
	{
		/* no worker for this database (yet): a one-shot one serves this request */
		poke_launcher();
		os = dm_oneshot_start(args, &slot);
	}
	waiting_slot = slot;

	PG_TRY();
	{
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		for (;;)
		{
			DmSlotState state;

			SpinLockAcquire(&slot->mutex);
			state = slot->state;
			SpinLockRelease(&slot->mutex);
			if (state == SLOT_DONE)
				break;
			report_progress(slot, what, &last_decile);
			if (!worker_alive(slot, os))
			{
				if (state == SLOT_SUBMITTED && os == NULL)
				{
					/* the worker left before taking it: nothing was sent; try again */
					(void) abandon(slot);
					waiting_slot = NULL;
					pgstat_report_wait_end();
					dm_worker_request(args, reply, what, where);
					return;
				}
				ereport(ERROR,
						(errcode(ERRCODE_DIGIME_WORKER_LOST),
						 errmsg("the digime worker exited before it answered"),
						 errdetail("If the request reached digi.me, its result is in %s.", where)));
			}
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 WAIT_SLICE_MS, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
		pgstat_report_wait_end();
	}
	PG_CATCH();
	{
		ErrorData  *edata;
		bool		under_way;

		pgstat_report_wait_end();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		under_way = abandon(slot);
		waiting_slot = NULL;
		if (os != NULL)
			dm_oneshot_finish(os);
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			edata->detail = under_way ?
				psprintf("The request to digi.me goes on in the digime worker, which commits its result: see %s.",
						 where) :
				pstrdup("Nothing was sent to digi.me.");
		ReThrowError(edata);
	}
	PG_END_TRY();

	/* copy the answer out, then free the slot */
	memcpy(&r, &slot->reply, sizeof(r));
	waiting_slot = NULL;
	if (os != NULL)
		dm_oneshot_finish(os);
	else
	{
		SpinLockAcquire(&slot->mutex);
		dm_slot_init(slot);
		SpinLockRelease(&slot->mutex);
	}
	if (!r.ok)
		raise_reply(&r);
	*reply = r.reply;
}

void
dm_worker_post_audit(const DmAudit *audit)
{
	DmRequestArgs args;
	MemoryContext cxt = CurrentMemoryContext;

	memset(&args, 0, sizeof(args));
	args.kind = DM_REQ_AUDIT;
	args.actor.role = audit->role;
	args.audit_action = audit->action;
	args.contract_id = audit->contract_id;
	args.token_id = audit->token_id;
	args.audit_ok = audit->ok;
	args.sqlstate = audit->sqlstate;
	args.reference = audit->reference;
	PG_TRY();
	{
		if (submit_shared(&args, true) == NULL)
			ereport(LOG,
					(errmsg("digime: no worker to record the audit row of a failed %s", audit->action),
					 errdetail("Role %u, SQLSTATE %s.", audit->role,
							   audit->sqlstate ? audit->sqlstate : "none"),
					 errhint("Failures are recorded in digime.audit_log when digime is in shared_preload_libraries.")));
	}
	PG_CATCH();
	{
		/* never hide the caller's own error */
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
	}
	PG_END_TRY();
}

static void
wake_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && OidIsValid(restart_at_commit) && dm_shared != NULL)
	{
		DmDbWorker *e;
		PGPROC	   *proc = NULL;

		LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
		e = dm_db_entry(restart_at_commit, false);
		if (e != NULL && e->state == DB_RUNNING)
		{
			e->restart = true;
			proc = e->proc;
		}
		LWLockRelease(dm_shared->lock);
		if (proc != NULL)
			SetLatch(&proc->procLatch);
	}
	if (event == XACT_EVENT_COMMIT && wake_at_commit && dm_shared != NULL)
	{
		DmDbWorker *e;
		PGPROC	   *proc = NULL;

		LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
		e = dm_db_entry(MyDatabaseId, true);
		if (e != NULL)
		{
			e->wake = true;
			if (e->state == DB_RUNNING)
				proc = e->proc;
		}
		LWLockRelease(dm_shared->lock);
		if (proc != NULL)
			SetLatch(&proc->procLatch);
		else
			dm_wake_launcher();
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
	{
		wake_at_commit = false;
		restart_at_commit = InvalidOid;
	}
}

static void
at_commit(void)
{
	if (!xact_callback_set)
	{
		RegisterXactCallback(wake_callback, NULL);
		xact_callback_set = true;
	}
}

void
dm_worker_wake_at_commit(void)
{
	at_commit();
	wake_at_commit = true;
}

void
dm_worker_restart_at_commit(Oid dboid)
{
	at_commit();
	restart_at_commit = dboid;
}
