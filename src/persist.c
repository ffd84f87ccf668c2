/*-------------------------------------------------------------------------
 *
 * persist.c
 *	  Stores a refreshed token pair in a transaction of its own.
 *
 * A refresh_token grant may invalidate the old refresh token at digi.me.
 * If the new pair were written in the caller's transaction, an error later
 * in the same statement (say, the authorize call that needed the refresh
 * fails) or a rollback by the caller would lose it, and the user would have
 * to authorize again.  So the new pair is written by a short-lived dynamic
 * background worker that commits at once, and the backend waits for it.
 *
 * The worker is not used, and the caller's transaction writes instead, when
 * that would be wrong or impossible: under REPEATABLE READ or SERIALIZABLE
 * (the caller's snapshot would not see the row change), when the caller's
 * own transaction has changed the row (the worker would wait for it), when
 * no worker slot is free, or when the worker fails (it gives up on a row
 * lock after 1 s).
 *
 * IDENTIFICATION
 *	  src/persist.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"

PGDLLEXPORT void digime_token_writer_main(Datum arg);

/* The request in shared memory; strings follow the struct. */
typedef struct PersistShared
{
	Oid			database;
	Oid			role;
	int64		token_id;
	int64		access_expires;
	int64		refresh_expires;
	int			user_id_off;	/* -1 when NULL */
	int			consent_id_off; /* -1 when NULL */
	int			access_off;
	int			refresh_off;
	volatile int result;		/* 0 not done, 1 stored */
	char		data[FLEXIBLE_ARRAY_MEMBER];
} PersistShared;

static int
put(PersistShared *sh, int *used, const char *s)
{
	int			off = *used;

	if (s == NULL)
		return -1;
	strcpy(sh->data + off, s);
	*used += strlen(s) + 1;
	return off;
}

static const char *
get(PersistShared *sh, int off)
{
	return off < 0 ? NULL : sh->data + off;
}

static void
warn_in_transaction(int64 token_id, const char *why)
{
	ereport(WARNING,
			(errmsg("refreshed user access token " INT64_FORMAT " is stored in the current transaction",
					token_id),
			 errdetail("%s; if this transaction rolls back, the new tokens are lost and the user "
					   "may have to authorize again.", why)));
}

bool
dm_persist_refresh(Oid owner, const DmStoredToken *old, const DmSealedToken *t)
{
	Size		size;
	dsm_segment *seg;
	PersistShared *sh;
	int			used = 0;
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	bool		stored;

	if (old->changed_here)
		return false;			/* the caller's own change: a worker would wait for it */
	if (IsolationUsesXactSnapshot())
	{
		warn_in_transaction(old->id, "The transaction uses REPEATABLE READ or SERIALIZABLE");
		return false;
	}

	size = offsetof(PersistShared, data) + strlen(t->access_token) + strlen(t->refresh_token) + 2 +
		(t->user_id ? strlen(t->user_id) + 1 : 0) + (t->consent_id ? strlen(t->consent_id) + 1 : 0);
	seg = dsm_create(size, 0);
	sh = dsm_segment_address(seg);
	sh->database = MyDatabaseId;
	sh->role = owner;
	sh->token_id = old->id;
	sh->access_expires = t->access_expires;
	sh->refresh_expires = t->refresh_expires;
	sh->access_off = put(sh, &used, t->access_token);
	sh->refresh_off = put(sh, &used, t->refresh_token);
	sh->user_id_off = put(sh, &used, t->user_id);
	sh->consent_id_off = put(sh, &used, t->consent_id);
	sh->result = 0;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "digime", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "digime_token_writer_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "digime token writer", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "digime token writer", BGW_MAXLEN);
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		dsm_detach(seg);
		warn_in_transaction(old->id, "No background worker slot is free (max_worker_processes)");
		return false;
	}
	/* interruptible; a cancelled caller leaves the worker to finish */
	(void) WaitForBackgroundWorkerShutdown(handle);
	pg_memory_barrier();
	stored = sh->result == 1;
	explicit_bzero(sh->data, used);
	dsm_detach(seg);
	if (!stored)
		warn_in_transaction(old->id, "The token writer could not store it (see the server log)");
	return stored;
}

void
digime_token_writer_main(Datum arg)
{
	dsm_segment *seg;
	PersistShared *sh;
	DmSealedToken t;
	bool		stored;

	BackgroundWorkerUnblockSignals();
	seg = dsm_attach(DatumGetUInt32(arg));
	if (seg == NULL)
		proc_exit(1);
	sh = dsm_segment_address(seg);
	BackgroundWorkerInitializeConnectionByOid(sh->database, sh->role, 0);

	memset(&t, 0, sizeof(t));
	t.access_token = get(sh, sh->access_off);
	t.refresh_token = get(sh, sh->refresh_off);
	t.user_id = get(sh, sh->user_id_off);
	t.consent_id = get(sh, sh->consent_id_off);
	t.access_expires = sh->access_expires;
	t.refresh_expires = sh->refresh_expires;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) set_config_option("lock_timeout", "1000", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "digime: store a refreshed token");
	stored = dm_token_write(sh->token_id, &t, NULL, NULL, true) == 1;
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	/* reported only once committed: otherwise the backend writes itself */
	pg_memory_barrier();
	sh->result = stored ? 1 : 0;
	dsm_detach(seg);
	proc_exit(0);
}
