/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The digime worker layer, as the rest of the extension sees it.
 *
 * Every token-granting request (a code exchange or a refresh) is performed
 * by a background worker that commits its result in a transaction of its
 * own and then answers the waiting backend, so a token digi.me has issued
 * is stored whatever happens to the caller (rollback, error, cancel,
 * statement_timeout, termination).  With shared_preload_libraries =
 * 'digime' a launcher keeps one worker per database that has the
 * extension (worker/launcher.c, worker/dbworker.c); otherwise, or while a
 * database's worker is not running, a one-shot dynamic worker serves each
 * request (worker/oneshot.c).  Requests travel through shared memory
 * (worker/shmem.c); the backend's side is worker/client.c.
 *
 * IDENTIFICATION
 *	  src/worker/worker.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_WORKER_H
#define DIGIME_WORKER_H

#include "digime.h"
#include "store.h"

typedef enum DmRequestKind
{
	DM_REQ_CALLBACK,			/* digime_handle_callback: state, code */
	DM_REQ_EXCHANGE_CODE,		/* digime_exchange_code: contract, code, verifier */
	DM_REQ_REFRESH,				/* one token */
	DM_REQ_REFRESH_BATCH,		/* digime_refresh_expiring */
	DM_REQ_PROCESS_INBOX,		/* digime_process_inbox */
	DM_REQ_PURGE,				/* digime_purge */
	DM_REQ_AUDIT				/* an audit row, committed at once; no answer */
} DmRequestKind;

/* A request as the backend states it (strings may be NULL). */
typedef struct DmRequestArgs
{
	DmRequestKind kind;
	DmActor		actor;
	int64		token_id;		/* refresh */
	int64		within_ms;		/* refresh: only when expiring within (-1: always); batch */
	int			concurrency;	/* batch */
	int64		max_tokens;		/* batch, -1 for all */
	const char *audit_action;	/* refresh: refresh, refresh_automatic; audit */
	const char *contract_id;	/* exchange_code; audit */
	const char *state;			/* callback */
	const char *code;			/* callback, exchange_code */
	const char *code_verifier;	/* exchange_code */
	const char *account_reference;	/* callback */
	const char *sqlstate;		/* audit */
	const char *reference;		/* audit */
	bool		audit_ok;		/* audit */
	int			retention_s;	/* purge: digime.authorization_retention of the caller */
	int			audit_retention_s;	/* purge: digime.audit_retention of the caller */
} DmRequestArgs;

/* The worker's answer (errors are raised by dm_worker_request). */
typedef struct DmReply
{
	int64		token_id;		/* the token row written or used */
	int64		counts[4];		/* batch: refreshed, failed, needs reauth, skipped;
								 * inbox: done, failed, retrying; purge: expired, deleted */
} DmReply;

/*
 * Sends a request to the digime worker of this database (or a one-shot
 * worker) and waits for its answer, honouring cancel; re-raises the
 * worker's error with its SQLSTATE.  A cancel or timeout while the request
 * is under way raises 57014 with a DETAIL saying that it goes on and where
 * its result will appear (where).  53400 with a HINT when no worker can
 * be started.  Batch requests report progress as NOTICEs (what).
 */
extern void dm_worker_request(const DmRequestArgs *args, DmReply *reply, const char *what,
							  const char *where);

/* Records an audit row through the worker, without waiting (failures are logged). */
extern void dm_worker_post_audit(const DmAudit *audit);

/* Wakes this database's worker when the current transaction commits. */
extern void dm_worker_wake_at_commit(void);

/* _PG_init when preloading: shared memory, the launcher, the utility hook. */
extern void dm_worker_preload_init(void);

#endif							/* DIGIME_WORKER_H */
