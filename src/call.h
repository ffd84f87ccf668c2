/*-------------------------------------------------------------------------
 *
 * call.h
 *	  The execution frame of every SQL-callable function (call.c): the
 *	  caller as an actor, the switch to the extension owner, the audit row
 *	  of the call, and the function's result row.
 *
 * IDENTIFICATION
 *	  src/call.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_CALL_H
#define DIGIME_CALL_H

#include "digime.h"
#include "store.h"

typedef struct DmCall
{
	FunctionCallInfo fcinfo;
	DmActor		actor;			/* the caller */
	Oid			owner;			/* the extension owner */
	MemoryContext outer_cxt;	/* the caller's context, for results */
	Oid			save_userid;
	int			save_sec_context;
	int			guc_nest;
	bool		entered;		/* owner context and SPI active */
	DmAudit		audit;			/* action NULL: not audited */
} DmCall;

/* A function's body, run by dm_call_run inside the frame. */
typedef Datum (*DmCallBody) (DmCall *call);

/*
 * Runs an SQL-callable function: checks that the installed extension
 * matches this library, records the caller, runs body (which calls
 * dm_call_enter before touching tables), and writes the call's audit row
 * (action; NULL for none): in the caller's transaction when it succeeds,
 * through the worker (committed at once) when it fails.  writes: the
 * function writes, so it is refused (25006) in a read-only transaction or
 * during recovery, before anything is sent.
 */
extern Datum dm_call_run(FunctionCallInfo fcinfo, const char *action, bool writes,
						 DmCallBody body);

/*
 * Pins search_path to "pg_catalog, pg_temp", switches to the extension
 * owner (a security-restricted operation) and connects SPI.  Left by
 * dm_call_run, or by transaction abort.
 */
extern void dm_call_enter(DmCall *call);

/* Raises 25006 when the transaction cannot write. */
extern void dm_call_check_writable(const char *what);

/* The row in SPI_tuptable as the function's composite result, null_cols NULL. */
extern Datum dm_call_result_row(DmCall *call, const char *const *null_cols);

/* The token row as the function's result (secrets NULL), read as "read". */
extern Datum dm_call_token_result(DmCall *call, int64 token_id, DmRead read);

/* The actor of the current user (for triggers, outside a DmCall). */
extern void dm_actor_current(DmActor *a);

#endif							/* DIGIME_CALL_H */
