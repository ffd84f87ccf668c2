/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The digime launcher (with shared_preload_libraries = 'digime'): keeps
 *	  one worker per database that has the extension, and gets them out of
 *	  the way of DROP DATABASE and friends.
 *
 * Like TimescaleDB's launcher, it connects to no database and reads
 * pg_database; every database that accepts connections and is not a
 * template gets a worker, which exits at once, saying so, where the
 * extension is not installed (then the database is left alone until
 * CREATE EXTENSION digime there wakes the launcher; see the utility hook).
 * A worker that stops is started again (after a second, doubling while it
 * keeps failing, up to digime.worker_naptime).  The launcher itself is
 * restarted by the postmaster after a crash, and runs only on a primary.
 *
 * PostgreSQL 15's DROP DATABASE waits five seconds for other sessions and
 * then fails; ALTER DATABASE RENAME / SET TABLESPACE and CREATE DATABASE
 * from a template refuse connected sessions at once.  So a ProcessUtility
 * hook, run by every backend (the library is preloaded), pauses the
 * database's worker (it finishes what is in flight, within about two
 * seconds, and exits) before those commands and releases it afterwards.
 * ALTER DATABASE ... SET restarts the worker, so that per-database settings
 * such as digime.auto_refresh take effect.
 *
 * IDENTIFICATION
 *	  src/worker/launcher.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "guc.h"
#include "worker/internal.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/utility.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PGDLLEXPORT void digime_launcher_main(Datum arg);

#define PAUSE_WAIT_MS	10000
#define RESTART_MIN_MS	1000

/* The launcher's own view of each database (handles are process-local). */
typedef struct LaunchedDb
{
	Oid			dboid;
	BackgroundWorkerHandle *handle;
	TimestampTz next_start;
	int			failures;
	bool		seen;
} LaunchedDb;

static LaunchedDb *launched = NULL;
static int	nlaunched = 0;
static ProcessUtility_hook_type prev_utility_hook = NULL;

/* ---------------------------------------------------------------------
 * The launcher
 * ---------------------------------------------------------------------
 */

static LaunchedDb *
launched_for(Oid dboid)
{
	for (int i = 0; i < nlaunched; i++)
		if (launched[i].dboid == dboid)
			return &launched[i];
	launched = launched ?
		repalloc(launched, sizeof(LaunchedDb) * (nlaunched + 1)) :
		MemoryContextAlloc(TopMemoryContext, sizeof(LaunchedDb));
	memset(&launched[nlaunched], 0, sizeof(LaunchedDb));
	launched[nlaunched].dboid = dboid;
	return &launched[nlaunched++];
}

/* Databases that may get a worker: connectable, not templates. */
static List *
database_list(void)
{
	List	   *dbs = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (db->datallowconn && !db->datistemplate)
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			dbs = lappend_oid(dbs, db->oid);
			MemoryContextSwitchTo(old);
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return dbs;
}

static bool
start_worker(LaunchedDb *l)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "digime", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "digime_dbworker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "digime worker for database %u", l->dboid);
	strlcpy(worker.bgw_type, "digime worker", BGW_MAXLEN);
	worker.bgw_main_arg = ObjectIdGetDatum(l->dboid);
	worker.bgw_notify_pid = MyProcPid;
	if (l->handle != NULL)
		pfree(l->handle);
	l->handle = NULL;
	if (!RegisterDynamicBackgroundWorker(&worker, &l->handle))
	{
		ereport(LOG,
				(errmsg("digime launcher could not start a worker for database %u", l->dboid),
				 errhint("Raise max_worker_processes.")));
		return false;
	}
	return true;
}

static bool
handle_running(LaunchedDb *l)
{
	pid_t		pid;
	BgwHandleStatus st;

	if (l->handle == NULL)
		return false;
	st = GetBackgroundWorkerPid(l->handle, &pid);
	return st == BGWH_STARTED || st == BGWH_NOT_YET_STARTED;
}

/* One pass: start what should run, forget databases that are gone. */
static void
launcher_pass(void)
{
	List	   *dbs = database_list();
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;

	for (int i = 0; i < nlaunched; i++)
		launched[i].seen = false;
	foreach(lc, dbs)
	{
		Oid			dboid = lfirst_oid(lc);
		LaunchedDb *l = launched_for(dboid);
		DmDbWorker *e;
		bool		start = false;

		l->seen = true;
		LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
		e = dm_db_entry(dboid, true);
		if (e != NULL && !handle_running(l))
		{
			switch (e->state)
			{
				case DB_STOPPED:
				case DB_STARTING:
				case DB_RUNNING:	/* it died without saying so */
					start = now >= l->next_start || e->wake;
					break;
				case DB_ABSENT:
					start = e->wake;
					break;
				case DB_PAUSED:
				case DB_UNUSED:
					break;
			}
			if (start)
			{
				e->state = DB_STARTING;
				e->wake = false;
				e->restart = false;
			}
		}
		LWLockRelease(dm_shared->lock);
		if (start)
		{
			/* back off while it keeps stopping soon after a start */
			l->failures = Min(l->failures + 1, 10);
			l->next_start = TimestampTzPlusMilliseconds(now,
														Min((int64) RESTART_MIN_MS << (l->failures - 1),
															(int64) dm_worker_naptime * 1000));
			if (!start_worker(l))
			{
				LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
				e->state = DB_STOPPED;
				LWLockRelease(dm_shared->lock);
			}
		}
		else if (handle_running(l))
		{
			LWLockAcquire(dm_shared->lock, LW_SHARED);
			/* serving for a while: forget earlier failures */
			if (e != NULL && e->state == DB_RUNNING &&
				TimestampDifferenceExceeds(e->since, now, 60000))
				l->failures = 0;
			LWLockRelease(dm_shared->lock);
		}
	}
	/* databases that are gone */
	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < dm_shared->ndbs; i++)
	{
		DmDbWorker *e = &dm_shared->dbs[i];

		if (e->state != DB_UNUSED && !list_member_oid(dbs, e->dboid) && e->pid == 0)
			e->state = DB_UNUSED;
	}
	LWLockRelease(dm_shared->lock);
	list_free(dbs);
}

static void
launcher_exit(int code, Datum arg)
{
	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	dm_shared->launcher = NULL;
	LWLockRelease(dm_shared->lock);
}

void
digime_launcher_main(Datum arg)
{
	pqsignal(SIGTERM, die);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("digime launcher");

	before_shmem_exit(launcher_exit, (Datum) 0);
	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	dm_shared->launcher = MyProc;
	/* after a crash restart every entry is stale: look at each database again */
	for (int i = 0; i < dm_shared->ndbs; i++)
		if (dm_shared->dbs[i].state != DB_UNUSED && dm_shared->dbs[i].pid == 0)
			dm_shared->dbs[i].state = DB_STOPPED;
	LWLockRelease(dm_shared->lock);

	for (;;)
	{
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		launcher_pass();
		pgstat_report_stat(false);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Min((long) dm_worker_naptime * 1000, RESTART_MIN_MS),
						 PG_WAIT_EXTENSION);
	}
}

static void
register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	strlcpy(worker.bgw_library_name, "digime", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "digime_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "digime launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "digime launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/* ---------------------------------------------------------------------
 * The utility hook (every backend)
 * ---------------------------------------------------------------------
 */

/* Stops a database's worker and keeps it stopped; true when it was running. */
static bool
pause_database(Oid dboid)
{
	DmDbWorker *e;
	pid_t		pid = 0;
	TimestampTz until;

	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	e = dm_db_entry(dboid, true);
	if (e == NULL)
	{
		LWLockRelease(dm_shared->lock);
		return false;
	}
	e->state = DB_PAUSED;
	pid = e->pid;
	LWLockRelease(dm_shared->lock);
	if (pid != 0)
		kill(pid, SIGTERM);
	until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), PAUSE_WAIT_MS);
	while (GetCurrentTimestamp() < until)
	{
		LWLockAcquire(dm_shared->lock, LW_SHARED);
		pid = e->dboid == dboid ? e->pid : 0;
		LWLockRelease(dm_shared->lock);
		if (pid == 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	return true;
}

static void
resume_database(Oid dboid)
{
	DmDbWorker *e;

	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	e = dm_db_entry(dboid, false);
	if (e != NULL && e->state == DB_PAUSED)
	{
		e->state = DB_STOPPED;
		e->wake = true;
	}
	LWLockRelease(dm_shared->lock);
	dm_wake_launcher();
}

static bool
names_digime(List *names)
{
	ListCell   *lc;

	foreach(lc, names)
	{
		Node	   *n = lfirst(lc);

		if (IsA(n, String) && strcmp(strVal(n), "digime") == 0)
			return true;
	}
	return false;
}

/* The database a statement needs without other sessions, or InvalidOid. */
static Oid
database_to_pause(Node *stmt)
{
	ListCell   *lc;

	switch (nodeTag(stmt))
	{
		case T_DropdbStmt:
			return get_database_oid(((DropdbStmt *) stmt)->dbname, true);
		case T_RenameStmt:
			if (((RenameStmt *) stmt)->renameType == OBJECT_DATABASE)
				return get_database_oid(((RenameStmt *) stmt)->subname, true);
			break;
		case T_AlterDatabaseStmt:
			foreach(lc, ((AlterDatabaseStmt *) stmt)->options)
				if (strcmp(((DefElem *) lfirst(lc))->defname, "tablespace") == 0)
					return get_database_oid(((AlterDatabaseStmt *) stmt)->dbname, true);
			break;
		case T_CreatedbStmt:
			foreach(lc, ((CreatedbStmt *) stmt)->options)
			{
				DefElem    *d = lfirst(lc);

				if (strcmp(d->defname, "template") == 0 && d->arg != NULL)
					return get_database_oid(defGetString(d), true);
			}
			break;
		default:
			break;
	}
	return InvalidOid;
}

static void
digime_utility_hook(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					ProcessUtilityContext context, ParamListInfo params,
					QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;
	Oid			pause = dm_shared != NULL ? database_to_pause(stmt) : InvalidOid;
	bool		paused = OidIsValid(pause) && pause_database(pause);

	if (dm_shared != NULL)
	{
		if ((IsA(stmt, CreateExtensionStmt) &&
			 strcmp(((CreateExtensionStmt *) stmt)->extname, "digime") == 0) ||
			(IsA(stmt, AlterExtensionStmt) &&
			 strcmp(((AlterExtensionStmt *) stmt)->extname, "digime") == 0) ||
			(IsA(stmt, DropStmt) && ((DropStmt *) stmt)->removeType == OBJECT_EXTENSION &&
			 names_digime(((DropStmt *) stmt)->objects)))
			dm_worker_wake_at_commit();
		if (IsA(stmt, AlterDatabaseSetStmt))
		{
			Oid			db = get_database_oid(((AlterDatabaseSetStmt *) stmt)->dbname, true);

			if (OidIsValid(db))
				dm_worker_restart_at_commit(db);
		}
	}

	PG_TRY();
	{
		if (prev_utility_hook)
			prev_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv,
							  dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
									queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		if (paused)
			resume_database(pause);
	}
	PG_END_TRY();
}

void
dm_worker_preload_init(void)
{
	dm_worker_shmem_init();
	register_launcher();
	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = digime_utility_hook;
}
