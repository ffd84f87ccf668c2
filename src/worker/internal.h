/*-------------------------------------------------------------------------
 *
 * internal.h
 *	  Private to src/worker/: the shared-memory layout, the request slot
 *	  protocol and the task engine that the per-database worker and the
 *	  one-shot worker both run.
 *
 * A request slot moves FREE -> SUBMITTED (backend filled it) -> TAKEN (a
 * worker took it) -> DONE (answered) -> FREE (backend read the answer).
 * A backend that leaves early (cancel, timeout, termination) takes back a
 * SUBMITTED slot (nothing was sent) or marks a TAKEN one abandoned; the
 * worker finishes an abandoned request, commits its result and frees the
 * slot.  The slot's mutex guards state, abandoned and sent.
 *
 * IDENTIFICATION
 *	  src/worker/internal.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_WORKER_INTERNAL_H
#define DIGIME_WORKER_INTERNAL_H

#include "worker/worker.h"

#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/spin.h"

/* strings of a request: callback state and code fit (protocol caps) */
#define DM_REQUEST_DATA (DM_MAX_TEXT_ARG + 2 * DM_MAX_TOKEN_LEN + 2 * DM_MAX_ID_LEN + 256)
#define DM_REPLY_TEXT 4096

typedef enum DmSlotState
{
	SLOT_FREE,
	SLOT_SUBMITTED,
	SLOT_TAKEN,
	SLOT_DONE
} DmSlotState;

/* A DmRequestArgs flattened into shared memory: strings at offsets (-1 = NULL). */
typedef struct DmRequest
{
	DmRequestKind kind;
	Oid			role;
	bool		is_admin;
	bool		audit_ok;
	int64		token_id;
	int64		within_ms;
	int			concurrency;
	int64		max_tokens;
	int			retention_s;
	int			audit_retention_s;
	int			end_user,
				audit_action,
				contract_id,
				state,
				code,
				code_verifier,
				account_reference,
				sqlstate,
				reference;
	int			used;
	char		data[DM_REQUEST_DATA];
} DmRequest;

typedef struct DmSlotReply
{
	bool		ok;
	int			sqlerrcode;
	DmReply		reply;
	int			message,		/* offsets into text, -1 = none */
				detail,
				hint;
	int			used;
	char		text[DM_REPLY_TEXT];
} DmSlotReply;

typedef struct DmSlot
{
	slock_t		mutex;
	DmSlotState state;
	bool		abandoned;		/* the backend left */
	bool		sent;			/* a request may have reached digi.me */
	Oid			database;
	PGPROC	   *caller;
	pid_t		worker_pid;		/* who took it */
	int64		progress_done;	/* batch progress, for NOTICEs */
	int64		progress_total;
	DmRequest	req;
	DmSlotReply reply;
} DmSlot;

typedef enum DmDbState
{
	DB_UNUSED,					/* free entry */
	DB_STARTING,				/* launcher registered a worker */
	DB_RUNNING,					/* worker serves requests */
	DB_STOPPED,					/* worker exited; restart when due */
	DB_ABSENT,					/* no (current) extension there */
	DB_PAUSED					/* DROP DATABASE and friends in progress */
} DmDbState;

typedef struct DmDbWorker
{
	Oid			dboid;
	DmDbState	state;
	pid_t		pid;			/* the worker, 0 when none */
	PGPROC	   *proc;			/* its PGPROC, for its latch */
	bool		wake;			/* recheck now (CREATE EXTENSION, a fallback call) */
	bool		restart;		/* finish in-flight work and restart (new settings) */
	TimestampTz since;
} DmDbWorker;

typedef struct DmShared
{
	LWLock	   *lock;			/* dbs[] and slot allocation */
	PGPROC	   *launcher;
	int			ndbs;
	int			nslots;
	DmDbWorker *dbs;			/* point into this segment */
	DmSlot	   *slots;
} DmShared;

/* shmem.c */
extern void dm_worker_shmem_init(void);
extern DmShared *dm_shared;		/* NULL without shared_preload_libraries */
extern DmDbWorker *dm_db_entry(Oid dboid, bool create);	/* caller holds lock */
extern DmSlot *dm_slot_alloc(void);	/* NULL when all are in use */
extern void dm_slot_init(DmSlot *slot);
extern void dm_wake_launcher(void);

/* client.c: the worker of dboid restarts when the transaction commits */
extern void dm_worker_restart_at_commit(Oid dboid);

/* request packing (client.c packs, the engine unpacks) */
extern void dm_request_pack(DmRequest *dst, const DmRequestArgs *args);
extern void dm_request_unpack(const DmRequest *src, DmRequestArgs *out);
extern void dm_reply_set_error(DmSlotReply *r, const ErrorData *e);
/* The answer of a request whose worker exited (YD040); no allocation, for exit callbacks. */
extern void dm_reply_set_lost(DmSlotReply *r);

/* dbworker.c: the engine */
typedef enum DmEngineMode
{
	DM_ENGINE_DATABASE,			/* serve this database's slots, periodic work */
	DM_ENGINE_ONESHOT			/* serve one slot, then exit */
} DmEngineMode;

/* Runs the engine; returns when there is nothing more to do (one-shot) or on shutdown. */
extern void dm_engine_run(DmEngineMode mode, DmSlot *oneshot_slot);

/* Worker process setup shared by both kinds of worker. */
extern void dm_worker_process_init(void);

/* oneshot.c */
/* Starts a one-shot worker for the slot in a new DSM segment; NULL when none can start. */
typedef struct DmOneshot DmOneshot;
extern DmOneshot *dm_oneshot_start(const DmRequestArgs *args, DmSlot **slot);
extern bool dm_oneshot_alive(DmOneshot *os);
extern void dm_oneshot_finish(DmOneshot *os);

#endif							/* DIGIME_WORKER_INTERNAL_H */
