/*-------------------------------------------------------------------------
 *
 * store.c
 *	  The extension's tables, read and written through SPI as the extension
 *	  owner, and the execution context of every SQL-callable function.
 *
 * Why not SECURITY DEFINER: a SECURITY DEFINER function cannot learn its
 * caller, and digime needs the caller for contract grants and row
 * ownership.  So the SQL functions are SECURITY INVOKER C functions that do
 * what SECURITY DEFINER does, narrowly: dm_call_begin() records the caller
 * (current_user), pins search_path to "pg_catalog, pg_temp" and switches
 * to the extension owner as a security-restricted operation; every query
 * below names its tables with their schema.  Each query restricts itself
 * to the caller's rows (owner_role, and digime.end_user when set); the
 * tables' row-level security policies express the same rule for direct
 * access.
 *
 * Secrets are sealed (crypt.c) with associated data naming table, column
 * and row before they are written, and opened after they are read.
 *
 * IDENTIFICATION
 *	  src/store.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#define TOKEN_COLUMNS \
	"contract_id, access_token, refresh_token, access_token_expires_at, " \
	"refresh_token_expires_at, user_id, consent_id, xmin"

/* First key of the advisory locks that serialize refreshes of one token. */
#define REFRESH_LOCK_KEY 0x64696D65		/* "dime" */

/* Rows of the caller: $2 = caller oid, $3 = digime.end_user or NULL. */
#define CALLER_ROWS \
	"owner_role OPERATOR(pg_catalog.=) $2::pg_catalog.regrole " \
	"AND ($3::pg_catalog.text IS NULL OR end_user OPERATOR(pg_catalog.=) $3)"

static Oid
extension_owner(void)
{
	Oid			nsp = get_namespace_oid("digime", false);
	Oid			rel = get_relname_relid("contracts", nsp);
	HeapTuple	tup;
	Oid			owner;

	if (!OidIsValid(rel))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension digime is not installed in this database")));
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(rel));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", rel);
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

void
dm_call_begin(DmCall *call, FunctionCallInfo fcinfo)
{
	Oid			owner = extension_owner();

	call->fcinfo = fcinfo;
	call->owner = owner;
	call->caller = GetUserId();
	call->caller_is_admin = superuser_arg(call->caller) ||
		has_privs_of_role(call->caller, owner);
	call->outer_cxt = CurrentMemoryContext;
	GetUserIdAndSecContext(&call->save_userid, &call->save_sec_context);
	call->guc_nest = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
	SetUserIdAndSecContext(owner, call->save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
}

void
dm_call_end(DmCall *call)
{
	SPI_finish();
	SetUserIdAndSecContext(call->save_userid, call->save_sec_context);
	AtEOXact_GUC(true, call->guc_nest);
}

/* Runs a query with parameters; NULL Datum pointers in nulls[] as 'n'. */
static uint64
run(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls, int expect)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc != expect)
		elog(ERROR, "SPI_execute_with_args returned %s for: %s",
			 SPI_result_code_string(rc), sql);
	return SPI_processed;
}

static char *
col_text(int col)
{
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col);
}

static Datum
col_datum(int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, isnull);
}

static const char *
caller_end_user(void)
{
	return (dm_end_user != NULL && dm_end_user[0] != '\0') ? dm_end_user : NULL;
}

static void
set_text_param(Datum *values, char *nulls, int i, const char *s)
{
	values[i] = s ? CStringGetTextDatum(s) : (Datum) 0;
	nulls[i] = s ? ' ' : 'n';
}

static char *
aad(const char *table, const char *column, const char *row)
{
	return psprintf("digime/%s/%s/%s", table, column, row);
}

static char *
token_aad(const char *column, int64 id)
{
	return aad("user_tokens", column, psprintf(INT64_FORMAT, id));
}

/*
 * Frees a parsed contract key when the SPI context is deleted, at
 * dm_call_end or on error.  The holder lives in that context (not on the
 * caller's stack, which an error unwinds first).
 */
static void
free_contract_key(void *arg)
{
	EVP_PKEY  **holder = (EVP_PKEY **) arg;

	EVP_PKEY_free(*holder);
	*holder = NULL;
}

void
dm_contract_load(DmCall *call, const char *contract_id, DmContract *out)
{
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(contract_id), ObjectIdGetDatum(call->caller)};
	bool		isnull;
	bool		granted;
	char	   *pem;
	const char *why;
	MemoryContextCallback *cb;
	EVP_PKEY  **holder;

	run("SELECT c.application_id, c.private_key, "
		"  EXISTS (SELECT 1 FROM digime.contract_grants g "
		"          WHERE g.contract_id OPERATOR(pg_catalog.=) c.contract_id "
		"            AND pg_catalog.pg_has_role($2, g.grantee::pg_catalog.oid, 'USAGE')) "
		"FROM digime.contracts c WHERE c.contract_id OPERATOR(pg_catalog.=) $1",
		2, types, values, NULL, SPI_OK_SELECT);
	granted = SPI_processed == 1 &&
		(call->caller_is_admin || DatumGetBool(col_datum(3, &isnull)));
	if (!granted)
	{
		if (call->caller_is_admin)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("digi.me contract \"%s\" does not exist", contract_id)));
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for digi.me contract \"%s\"", contract_id),
				 errdetail("The contract does not exist or is not granted to role \"%s\".",
						   GetUserNameFromId(call->caller, false)),
				 errhint("An administrator grants it with digime_grant_contract().")));
	}
	if (out == NULL)
		return;

	memset(out, 0, sizeof(*out));
	out->contract_id = pstrdup(contract_id);
	out->application_id = col_text(1);
	pem = dm_open(col_text(2), aad("contracts", "private_key", contract_id));
	holder = palloc0(sizeof(EVP_PKEY *));
	cb = palloc(sizeof(MemoryContextCallback));
	cb->func = free_contract_key;
	cb->arg = holder;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, cb);
	*holder = out->key = dm_private_key_parse(pem, &why);
	dm_secret_free(pem);
	if (out->key == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("stored private key of digi.me contract \"%s\" is unusable", contract_id),
				 errdetail("%s", why)));
}

Datum
dm_row_result(DmCall *call, const char *sql, int nargs, Oid *argtypes, Datum *args,
			  const char *const *null_cols)
{
	TupleDesc	desc;
	Datum	   *values;
	bool	   *nulls;
	HeapTuple	tup;
	MemoryContext old;

	if (get_call_result_type(call->fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "function must return a composite type");
	if (run(sql, nargs, argtypes, args, NULL, SPI_OK_SELECT) != 1)
		elog(ERROR, "expected one row from: %s", sql);
	if (SPI_tuptable->tupdesc->natts != desc->natts)
		elog(ERROR, "result row has %d columns, the function's type %d",
			 SPI_tuptable->tupdesc->natts, desc->natts);

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
		values[i] = col_datum(i + 1, &nulls[i]);
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
dm_token_result(DmCall *call, int64 token_id)
{
	static const char *const secret_cols[] = {"access_token", "refresh_token", NULL};
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(token_id)};

	return dm_row_result(call, "SELECT * FROM digime.user_tokens WHERE id OPERATOR(pg_catalog.=) $1",
						 1, types, values, secret_cols);
}

void
dm_token_load(DmCall *call, int64 token_id, bool serialize, DmStoredToken *out)
{
	Oid			types[4] = {INT8OID, OIDOID, TEXTOID, BOOLOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	const char *end_user = caller_end_user();
	bool		isnull;

	values[0] = Int64GetDatum(token_id);
	values[1] = ObjectIdGetDatum(call->caller);
	set_text_param(values, nulls, 2, end_user);
	values[3] = BoolGetDatum(call->caller_is_admin);
	if (serialize)
	{
		Oid			lock_types[2] = {INT4OID, INT4OID};
		Datum		lock_values[2] = {Int32GetDatum(REFRESH_LOCK_KEY),
		Int32GetDatum((int32) (token_id ^ (token_id >> 32)))};

		run("SELECT pg_catalog.pg_advisory_xact_lock($1, $2)",
			2, lock_types, lock_values, NULL, SPI_OK_SELECT);
	}
	run("SELECT " TOKEN_COLUMNS " FROM digime.user_tokens "
		"WHERE id OPERATOR(pg_catalog.=) $1 AND ($4 OR (" CALLER_ROWS "))",
		4, types, values, nulls, SPI_OK_SELECT);
	if (SPI_processed != 1)
	{
		if (call->caller_is_admin)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("user access token " INT64_FORMAT " does not exist", token_id)));
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for user access token " INT64_FORMAT, token_id),
				 errdetail("The token does not exist or is not owned by role \"%s\"%s.",
						   GetUserNameFromId(call->caller, false),
						   end_user ? " and the current digime.end_user" : "")));
	}
	out->id = token_id;
	out->contract_id = col_text(1);
	out->access_token = dm_open(col_text(2), token_aad("access_token", token_id));
	out->refresh_token = dm_open(col_text(3), token_aad("refresh_token", token_id));
	out->access_expires_at = DatumGetTimestampTz(col_datum(4, &isnull));
	out->refresh_expires_at = DatumGetTimestampTz(col_datum(5, &isnull));
	out->user_id = col_text(6);
	out->consent_id = col_text(7);
	out->changed_here =
		TransactionIdIsCurrentTransactionId(DatumGetTransactionId(col_datum(8, &isnull)));
}

/* The stored form of t for row id. */
static void
token_seal(int64 id, const DmUserToken *t, DmSealedToken *out)
{
	out->access_token = dm_seal(t->access_token, token_aad("access_token", id));
	out->access_expires = t->access_expires;
	out->refresh_token = dm_seal(t->refresh_token, token_aad("refresh_token", id));
	out->refresh_expires = t->refresh_expires;
	out->user_id = t->user_id;
	out->consent_id = t->consent_id;
}

/* Parameters 1..7 common to token insert and update. */
static void
token_params(int64 id, const DmSealedToken *t, Datum *values, char *nulls)
{
	values[0] = Int64GetDatum(id);
	values[1] = CStringGetTextDatum(t->access_token);
	values[2] = Float8GetDatum((double) t->access_expires);
	values[3] = CStringGetTextDatum(t->refresh_token);
	values[4] = Float8GetDatum((double) t->refresh_expires);
	values[5] = t->user_id ? CStringGetTextDatum(t->user_id) : (Datum) 0;
	values[6] = t->consent_id ? CStringGetTextDatum(t->consent_id) : (Datum) 0;
	memset(nulls, ' ', 7);
	nulls[5] = t->user_id ? ' ' : 'n';
	nulls[6] = t->consent_id ? ' ' : 'n';
}


int64
dm_token_insert(DmCall *call, const char *contract_id, const DmUserToken *t,
				const char *state, const char *account_reference)
{
	Oid			types[12] = {INT8OID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, TEXTOID,
	TEXTOID, TEXTOID, OIDOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[12];
	char		nulls[12];
	bool		isnull;
	int64		id;

	DmSealedToken sealed;

	run("SELECT pg_catalog.nextval('digime.user_tokens_id_seq')", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	id = DatumGetInt64(col_datum(1, &isnull));

	token_seal(id, t, &sealed);
	token_params(id, &sealed, values, nulls);
	values[7] = CStringGetTextDatum(contract_id);
	nulls[7] = ' ';
	values[8] = ObjectIdGetDatum(call->caller);
	nulls[8] = ' ';
	set_text_param(values, nulls, 9, state);
	set_text_param(values, nulls, 10, account_reference);
	set_text_param(values, nulls, 11, caller_end_user());
	run("INSERT INTO digime.user_tokens (id, access_token, access_token_expires_at, "
		"  refresh_token, refresh_token_expires_at, user_id, consent_id, contract_id, "
		"  owner_role, state, account_reference, end_user) "
		"VALUES ($1, $2, pg_catalog.to_timestamp($3), $4, pg_catalog.to_timestamp($5), $6, $7, $8, "
		"  $9::pg_catalog.regrole, $10, $11, $12)",
		12, types, values, nulls, SPI_OK_INSERT);
	return id;
}

uint64
dm_token_write(int64 token_id, const DmSealedToken *t, const char *state,
			   const char *account_reference, bool refreshed)
{
	Oid			types[10] = {INT8OID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID, BOOLOID};
	Datum		values[10];
	char		nulls[10];

	token_params(token_id, t, values, nulls);
	set_text_param(values, nulls, 7, state);
	set_text_param(values, nulls, 8, account_reference);
	values[9] = BoolGetDatum(refreshed);
	nulls[9] = ' ';
	return run("UPDATE digime.user_tokens SET "
			   "  access_token = $2, access_token_expires_at = pg_catalog.to_timestamp($3), "
			   "  refresh_token = $4, refresh_token_expires_at = pg_catalog.to_timestamp($5), "
			   "  user_id = COALESCE($6, user_id), "
			   "  consent_id = COALESCE($7, consent_id), "
			   "  state = COALESCE($8, state), "
			   "  account_reference = COALESCE($9, account_reference), "
			   "  updated_at = pg_catalog.now(), "
			   "  refreshed_at = CASE WHEN $10 THEN pg_catalog.now() ELSE refreshed_at END "
			   "WHERE id OPERATOR(pg_catalog.=) $1",
			   10, types, values, nulls, SPI_OK_UPDATE);
}

void
dm_token_update(DmCall *call, int64 token_id, const DmUserToken *t,
				const char *state, const char *account_reference, bool refreshed)
{
	DmSealedToken sealed;

	token_seal(token_id, t, &sealed);
	(void) dm_token_write(token_id, &sealed, state, account_reference, refreshed);
}

void
dm_pending_insert(DmCall *call, const char *kind, const char *contract_id,
				  const char *state, const char *code_verifier, Jsonb *session,
				  const char *callback, int64 token_id)
{
	Oid			types[11] = {OIDOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID,
	TEXTOID, JSONBOID, TEXTOID, INT8OID, FLOAT8OID};
	Datum		values[11];
	char		nulls[11];
	bool		isnull;
	int64		id;

	/* $1 role, $2 state, $3 end user: shared by the three statements */
	memset(nulls, ' ', sizeof(nulls));
	values[0] = ObjectIdGetDatum(call->caller);
	values[1] = CStringGetTextDatum(state);
	set_text_param(values, nulls, 2, caller_end_user());

	/* a newer authorization (same role, end user and state) supersedes the pending one */
	run("UPDATE digime.authorizations SET status = 'superseded', code_verifier = NULL "
		"WHERE owner_role OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
		"  AND state OPERATOR(pg_catalog.=) $2 AND end_user IS NOT DISTINCT FROM $3 "
		"  AND status OPERATOR(pg_catalog.=) 'pending'",
		3, types, values, nulls, SPI_OK_UPDATE);
	/* forget the caller's authorizations that expired more than a day ago */
	run("DELETE FROM digime.authorizations "
		"WHERE owner_role OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
		"  AND expires_at OPERATOR(pg_catalog.<) "
		"      (pg_catalog.now() OPERATOR(pg_catalog.-) '1 day'::pg_catalog.interval)",
		1, types, values, nulls, SPI_OK_DELETE);

	run("SELECT pg_catalog.nextval('digime.authorizations_id_seq')",
		0, NULL, NULL, NULL, SPI_OK_SELECT);
	id = DatumGetInt64(col_datum(1, &isnull));

	values[3] = Int64GetDatum(id);
	values[4] = CStringGetTextDatum(kind);
	values[5] = CStringGetTextDatum(contract_id);
	values[6] = CStringGetTextDatum(dm_seal(code_verifier,
											aad("authorizations", "code_verifier",
												psprintf(INT64_FORMAT, id))));
	values[7] = JsonbPGetDatum(session);
	values[8] = CStringGetTextDatum(callback);
	values[9] = Int64GetDatum(token_id);
	nulls[9] = token_id ? ' ' : 'n';
	values[10] = Float8GetDatum((double) dm_authorization_ttl);
	run("INSERT INTO digime.authorizations (owner_role, state, end_user, id, kind, contract_id, "
		"  code_verifier, session, callback, token_id, expires_at) "
		"VALUES ($1::pg_catalog.regrole, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
		"  pg_catalog.now() OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $11))",
		11, types, values, nulls, SPI_OK_INSERT);
}

bool
dm_pending_find(DmCall *call, const char *state, DmPending *out)
{
	Oid			types[3] = {TEXTOID, OIDOID, TEXTOID};
	Datum		values[3];
	char		nulls[3] = {' ', ' ', ' '};
	const char *end_user = caller_end_user();
	bool		isnull;
	Datum		d;
	char	   *verifier;

	values[0] = CStringGetTextDatum(state);
	values[1] = ObjectIdGetDatum(call->caller);
	set_text_param(values, nulls, 2, end_user);

	/* pending for several end users: only digime.end_user can tell which */
	if (end_user == NULL &&
		run("SELECT 1 FROM digime.authorizations "
			"WHERE state OPERATOR(pg_catalog.=) $1 AND " CALLER_ROWS " "
			"  AND status OPERATOR(pg_catalog.=) 'pending'",
			3, types, values, nulls, SPI_OK_SELECT) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the callback's state is pending for more than one end user of role \"%s\"",
						GetUserNameFromId(call->caller, false)),
				 errhint("Set digime.end_user to the end user the callback belongs to, "
						 "or use states that are unique within the role.")));

	run("SELECT id, kind, contract_id, code_verifier, token_id, status, "
		"  expires_at OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp() "
		"FROM digime.authorizations "
		"WHERE state OPERATOR(pg_catalog.=) $1 AND " CALLER_ROWS " "
		"ORDER BY status OPERATOR(pg_catalog.=) 'pending' DESC, created_at DESC, id DESC "
		"LIMIT 1 FOR UPDATE",
		3, types, values, nulls, SPI_OK_SELECT);
	if (SPI_processed == 0)
		return false;
	out->id = DatumGetInt64(col_datum(1, &isnull));
	out->kind = col_text(2);
	out->contract_id = col_text(3);
	verifier = col_text(4);
	out->code_verifier = verifier ?
		dm_open(verifier, aad("authorizations", "code_verifier", psprintf(INT64_FORMAT, out->id))) :
		NULL;
	d = col_datum(5, &isnull);
	out->token_id = isnull ? 0 : DatumGetInt64(d);
	out->status = col_text(6);
	out->expired = DatumGetBool(col_datum(7, &isnull));
	return true;
}

bool
dm_pending_has_superseded(DmCall *call, const char *state)
{
	Oid			types[2] = {TEXTOID, OIDOID};
	Datum		values[2] = {CStringGetTextDatum(state), ObjectIdGetDatum(call->caller)};

	return run("SELECT 1 FROM digime.authorizations "
			   "WHERE state OPERATOR(pg_catalog.=) $1 "
			   "  AND owner_role OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
			   "  AND status OPERATOR(pg_catalog.=) 'superseded' LIMIT 1",
			   2, types, values, NULL, SPI_OK_SELECT) > 0;
}

void
dm_pending_complete(DmCall *call, int64 pending_id, int64 token_id)
{
	Oid			types[2] = {INT8OID, INT8OID};
	Datum		values[2] = {Int64GetDatum(pending_id), Int64GetDatum(token_id)};

	run("UPDATE digime.authorizations SET status = 'completed', code_verifier = NULL, "
		"  completed_at = pg_catalog.now(), token_id = $2 "
		"WHERE id OPERATOR(pg_catalog.=) $1",
		2, types, values, NULL, SPI_OK_UPDATE);
}

void
dm_token_refresh(DmCall *call, DmContract *c, DmStoredToken *tok)
{
	DmUserToken nt;
	DmApiError	err;
	DmSealedToken sealed;

	if (!dm_api_refresh(c, tok->refresh_token, &nt, &err))
	{
		if (strcmp(err.code, "InvalidToken") == 0 || strcmp(err.code, "InvalidGrant") == 0)
			dm_api_raise(&err,
						 psprintf("The refresh token of user access token " INT64_FORMAT
								  " is no longer valid: the user must reauthorize, "
								  "see digime_reauthorize_url(" INT64_FORMAT ", callback).",
								  tok->id, tok->id));
		dm_api_raise(&err, NULL);
	}
	/* committed at once when possible: digi.me may have dropped the old pair */
	token_seal(tok->id, &nt, &sealed);
	if (!dm_persist_refresh(call->owner, tok, &sealed))
		(void) dm_token_write(tok->id, &sealed, NULL, NULL, true);
	dm_secret_free(tok->access_token);
	dm_secret_free(tok->refresh_token);
	tok->access_token = nt.access_token;
	tok->refresh_token = nt.refresh_token;
	tok->access_expires_at = time_t_to_timestamptz((pg_time_t) nt.access_expires);
	tok->refresh_expires_at = time_t_to_timestamptz((pg_time_t) nt.refresh_expires);
}

void
dm_token_refresh_if_due(DmCall *call, DmContract *c, DmStoredToken *tok)
{
	TimestampTz due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												  (int64) dm_refresh_margin * 1000);

	if (tok->access_expires_at <= due)
		dm_token_refresh(call, c, tok);
}
