/*-------------------------------------------------------------------------
 *
 * jobs.c
 *	  SQL-callable functions for callers that run without a person
 *	  waiting — triggers and scheduled jobs: the callback inbox
 *	  (digime_submit_callback, its INSERT trigger, digime_process_inbox),
 *	  batch refresh (digime_refresh_expiring) and retention (digime_purge).
 *	  The work itself runs in the digime worker (worker/dbworker.c).
 *
 * IDENTIFICATION
 *	  src/jobs.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "call.h"
#include "guc.h"
#include "util.h"
#include "worker/worker.h"

#include "access/htup_details.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(digime_submit_callback);
PG_FUNCTION_INFO_V1(digime_callback_inbox_insert);
PG_FUNCTION_INFO_V1(digime_process_inbox);
PG_FUNCTION_INFO_V1(digime_refresh_expiring);
PG_FUNCTION_INFO_V1(digime_purge);

/* The INOUT result row of a procedure. */
static Datum
procedure_result(DmCall *call, int n, const int64 *values)
{
	TupleDesc	desc;
	Datum		d[4];
	bool		nulls[4] = {false, false, false, false};
	MemoryContext old = MemoryContextSwitchTo(call->outer_cxt);
	HeapTuple	tup;

	if (get_func_result_type(call->fcinfo->flinfo->fn_oid, NULL, &desc) != TYPEFUNC_COMPOSITE ||
		desc->natts != n)
		elog(ERROR, "unexpected result type of a digime procedure");
	for (int i = 0; i < n; i++)
		d[i] = TupleDescAttr(desc, i)->atttypid == INT4OID ?
			Int32GetDatum((int32) values[i]) : Int64GetDatum(values[i]);
	tup = heap_form_tuple(BlessTupleDesc(desc), d, nulls);
	MemoryContextSwitchTo(old);
	return HeapTupleGetDatum(tup);
}

static Datum
submit_callback_body(DmCall *call)
{
	char	   *url = dm_arg_text(call->fcinfo, 0, "callback_url");
	DmCallback	cb;
	int64		id;

	dm_callback_parse(url, &cb);
	dm_call_enter(call);
	id = dm_store_inbox_insert(call->actor.role, call->actor.end_user, url);
	call->audit.reference = psprintf("inbox " INT64_FORMAT, id);
	return Int64GetDatum(id);
}

Datum
digime_submit_callback(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "submit_callback", true, submit_callback_body);
}

/*
 * BEFORE INSERT ON digime.callback_inbox: a malformed callback URL is
 * refused (22023); status and bookkeeping start fresh; end_user defaults
 * to digime.end_user; the worker is woken when the transaction commits
 * (a rolled-back INSERT sends nothing).
 */
Datum
digime_callback_inbox_insert(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	HeapTuple	tup;
	bool		isnull;
	Datum		url;
	DmCallback	cb;
	const char *end_user = dm_guc_end_user();
	const char *names[] = {"status", "token_id", "sqlstate", "message", "attempts",
	"next_attempt_at", "submitted_at", "finished_at", "end_user"};
	int			cols[lengthof(names)];
	Datum		values[lengthof(names)];
	bool		nulls[lengthof(names)];
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BY_INSERT(td->tg_event))
		elog(ERROR, "digime._callback_inbox_insert must run BEFORE INSERT FOR EACH ROW");
	desc = RelationGetDescr(td->tg_relation);
	tup = td->tg_trigtuple;
	url = heap_getattr(tup, SPI_fnumber(desc, "callback_url"), desc, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("callback_url must not be NULL")));
	if (VARSIZE_ANY_EXHDR(DatumGetTextPP(url)) > DM_MAX_TEXT_ARG)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback_url is longer than %d bytes", DM_MAX_TEXT_ARG)));
	dm_callback_parse(TextDatumGetCString(url), &cb);

	for (int i = 0; i < lengthof(names); i++)
	{
		cols[i] = SPI_fnumber(desc, names[i]);
		nulls[i] = true;
		values[i] = (Datum) 0;
	}
	values[0] = CStringGetTextDatum("pending");
	nulls[0] = false;
	values[4] = Int32GetDatum(0);
	nulls[4] = false;
	values[5] = values[6] = TimestampTzGetDatum(now);
	nulls[5] = nulls[6] = false;
	/* end_user: as given, else digime.end_user */
	values[8] = heap_getattr(tup, cols[8], desc, &nulls[8]);
	if (nulls[8] && end_user != NULL)
	{
		values[8] = CStringGetTextDatum(end_user);
		nulls[8] = false;
	}
	tup = heap_modify_tuple_by_cols(tup, desc, lengthof(names), cols, values, nulls);
	dm_worker_wake_at_commit();
	return PointerGetDatum(tup);
}

static Datum
process_inbox_body(DmCall *call)
{
	DmRequestArgs a;
	DmReply		r;

	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_PROCESS_INBOX;
	a.actor = call->actor;
	a.concurrency = 8;
	dm_worker_request(&a, &r, "digime_process_inbox", "digime.callback_inbox");
	return procedure_result(call, 3, r.counts);
}

Datum
digime_process_inbox(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, NULL, true, process_inbox_body);
}

static Datum
refresh_expiring_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	DmRequestArgs a;
	DmReply		r;

	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_REFRESH_BATCH;
	a.actor = call->actor;
	a.within_ms = dm_arg_interval_ms(fcinfo, 0, "within");
	if (PG_ARGISNULL(1) || PG_GETARG_INT32(1) < 1 || PG_GETARG_INT32(1) > 1000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("concurrency must be between 1 and 1000")));
	a.concurrency = PG_GETARG_INT32(1);
	if (!PG_ARGISNULL(2) && PG_GETARG_INT32(2) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must not be negative")));
	a.max_tokens = PG_ARGISNULL(2) ? -1 : PG_GETARG_INT32(2);
	a.audit_action = "refresh_batch";
	dm_worker_request(&a, &r, "digime_refresh_expiring",
					  "digime.user_tokens (refreshed_at, status, last_error)");
	return procedure_result(call, 4, r.counts);
}

Datum
digime_refresh_expiring(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, NULL, true, refresh_expiring_body);
}

static Datum
purge_body(DmCall *call)
{
	DmRequestArgs a;
	DmReply		r;

	if (!call->actor.is_admin)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only the digime administrator may run digime_purge")));
	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_PURGE;
	a.actor = call->actor;
	a.retention_s = dm_authorization_retention;
	a.audit_retention_s = dm_audit_retention;
	dm_worker_request(&a, &r, NULL, "digime.authorizations and digime.audit_log");
	return procedure_result(call, 2, r.counts);
}

Datum
digime_purge(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "purge", true, purge_body);
}
