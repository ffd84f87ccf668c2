/*-------------------------------------------------------------------------
 *
 * call.c
 *	  The execution frame of every SQL-callable function.
 *
 * Why not SECURITY DEFINER: a SECURITY DEFINER function cannot learn its
 * caller, and digime needs the caller for contract grants and row
 * ownership.  So the SQL functions are SECURITY INVOKER C functions that do
 * what SECURITY DEFINER does, narrowly: the caller (current_user, and
 * digime.end_user) becomes an actor value, dm_call_enter() pins
 * search_path to "pg_catalog, pg_temp" and switches to the extension owner
 * as a security-restricted operation, and the store (store.c) restricts
 * every statement to the actor's rows; the tables' row-level security
 * policies express the same rule for direct access.
 *
 * Each call writes one audit row (digime.audit_log): in the caller's
 * transaction when it succeeds, so that a rollback takes it back with the
 * rest; through the digime worker, committed at once, when it fails.
 * Token-granting requests are audited by the worker that performs them.
 *
 * IDENTIFICATION
 *	  src/call.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "call.h"
#include "guc.h"
#include "worker/worker.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"

static void
actor_of(Oid role, Oid owner, DmActor *a)
{
	const char *end_user = dm_guc_end_user();

	a->role = role;
	a->is_admin = superuser_arg(role) || has_privs_of_role(role, owner);
	a->end_user = end_user ? pstrdup(end_user) : NULL;
}

void
dm_actor_current(DmActor *a)
{
	actor_of(GetUserId(), dm_store_extension_owner(), a);
}

void
dm_call_check_writable(const char *what)
{
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot run %s during recovery", what),
				 errdetail("digime writes to the database; a standby cannot.")));
	if (XactReadOnly)
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot run %s in a read-only transaction", what),
				 errdetail("Nothing was sent to digi.me.")));
}

void
dm_call_enter(DmCall *call)
{
	if (call->entered)
		return;
	GetUserIdAndSecContext(&call->save_userid, &call->save_sec_context);
	call->guc_nest = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	SetUserIdAndSecContext(call->owner, call->save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	call->entered = true;
}

static void
call_leave(DmCall *call)
{
	if (!call->entered)
		return;
	SPI_finish();
	SetUserIdAndSecContext(call->save_userid, call->save_sec_context);
	AtEOXact_GUC(true, call->guc_nest);
	call->entered = false;
}

static const char *
function_name(FunctionCallInfo fcinfo)
{
	return fcinfo->flinfo ? get_func_name(fcinfo->flinfo->fn_oid) : "digime";
}

Datum
dm_call_run(FunctionCallInfo fcinfo, const char *action, bool writes, DmCallBody body)
{
	DmCall		call;
	Datum		result;

	memset(&call, 0, sizeof(call));
	call.fcinfo = fcinfo;
	call.outer_cxt = CurrentMemoryContext;
	call.owner = dm_store_extension_owner();
	actor_of(GetUserId(), call.owner, &call.actor);
	call.audit.role = call.actor.role;
	call.audit.action = action;
	if (writes)
		dm_call_check_writable(function_name(fcinfo));

	PG_TRY();
	{
		result = body(&call);
		if (call.audit.action != NULL)
		{
			dm_call_enter(&call);
			call.audit.ok = true;
			dm_store_audit(&call.audit);
		}
		call_leave(&call);
	}
	PG_CATCH();
	{
		if (call.audit.action != NULL && writes)
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(call.outer_cxt);
			edata = CopyErrorData();
			FlushErrorState();
			call.audit.ok = false;
			call.audit.sqlstate = unpack_sql_state(edata->sqlerrcode);
			dm_worker_post_audit(&call.audit);
			ReThrowError(edata);
		}
		PG_RE_THROW();
	}
	PG_END_TRY();
	return result;
}

Datum
dm_call_result_row(DmCall *call, const char *const *null_cols)
{
	TupleDesc	desc;
	Datum	   *values;
	bool	   *nulls;
	HeapTuple	tup;
	MemoryContext old;
	HeapTuple	row = SPI_tuptable->vals[0];
	TupleDesc	rowdesc = SPI_tuptable->tupdesc;

	if (get_call_result_type(call->fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "function must return a composite type");
	if (rowdesc->natts != desc->natts)
		elog(ERROR, "result row has %d columns, the function's type %d",
			 rowdesc->natts, desc->natts);

	old = MemoryContextSwitchTo(call->outer_cxt);
	values = palloc(sizeof(Datum) * desc->natts);
	nulls = palloc(sizeof(bool) * desc->natts);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		masked = false;

		for (const char *const *c = null_cols; c && *c; c++)
			if (strcmp(NameStr(att->attname), *c) == 0)
				masked = true;
		values[i] = SPI_getbinval(row, rowdesc, i + 1, &nulls[i]);
		if (masked)
			nulls[i] = true;
		else if (!nulls[i])
			values[i] = datumCopy(values[i], att->attbyval, att->attlen);
	}
	tup = heap_form_tuple(BlessTupleDesc(desc), values, nulls);
	MemoryContextSwitchTo(old);
	return HeapTupleGetDatum(tup);
}

Datum
dm_call_token_result(DmCall *call, int64 token_id, DmRead read)
{
	static const char *const secret_cols[] = {"access_token", "refresh_token", NULL};

	dm_call_enter(call);
	if (!dm_store_token_row(token_id, read))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("user access token " INT64_FORMAT " no longer exists", token_id)));
	return dm_call_result_row(call, secret_cols);
}
