/*-------------------------------------------------------------------------
 *
 * flow.c
 *	  SQL-callable functions of the authorization flow: digime_authorize_url,
 *	  digime_reauthorize_url, digime_handle_callback, digime_exchange_code,
 *	  digime_refresh_token, digime_user_access_token,
 *	  digime_valid_access_token, digime_import_token.
 *
 * Each validates its arguments before anything is sent or stored and runs
 * in a DmCall (call.c).  The URL calls (oauth/authorize,
 * oauth/token/reference) run here and write in the caller's transaction;
 * every token-granting request goes to the digime worker, which commits
 * the token itself (worker/worker.h), and its result is read back as
 * committed, so that it is returned even under REPEATABLE READ.
 *
 * IDENTIFICATION
 *	  src/flow.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "api.h"
#include "call.h"
#include "crypt.h"
#include "guc.h"
#include "util.h"
#include "worker/worker.h"

#include "access/xact.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

PG_FUNCTION_INFO_V1(digime_authorize_url);
PG_FUNCTION_INFO_V1(digime_exchange_code);
PG_FUNCTION_INFO_V1(digime_handle_callback);
PG_FUNCTION_INFO_V1(digime_refresh_token);
PG_FUNCTION_INFO_V1(digime_reauthorize_url);
PG_FUNCTION_INFO_V1(digime_user_access_token);
PG_FUNCTION_INFO_V1(digime_valid_access_token);
PG_FUNCTION_INFO_V1(digime_import_token);

static Jsonb *
opt_jsonb(FunctionCallInfo fcinfo, int argno)
{
	return PG_ARGISNULL(argno) ? NULL : PG_GETARG_JSONB_P(argno);
}

static void
form_bool(StringInfo q, FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (!PG_ARGISNULL(argno))
		dm_form_append(q, name, PG_GETARG_BOOL(argno) ? "true" : "false");
}

/* Emits the single (url, code_verifier, session) row of a TABLE function. */
static void
return_url_row(FunctionCallInfo fcinfo, const char *url, const char *verifier, Jsonb *session)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	values[0] = CStringGetTextDatum(url);
	values[1] = CStringGetTextDatum(verifier);
	values[2] = JsonbPGetDatum(session);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

static char *
token_where(int64 token_id)
{
	return psprintf("the row of user access token " INT64_FORMAT " in digime.user_tokens",
					token_id);
}

/* Raises YD031 / YD030 for a token that cannot be used as it is. */
static void
check_token_usable(const DmStoredToken *tok)
{
	if (strcmp(tok->status, "revoked") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_TOKEN_REVOKED),
				 errmsg("user access token " INT64_FORMAT " was revoked", tok->id)));
	if (strcmp(tok->status, "needs_reauthorization") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_NEEDS_REAUTHORIZATION),
				 errmsg("user access token " INT64_FORMAT " needs reauthorization", tok->id),
				 errdetail("Its status is needs_reauthorization: digi.me refused its refresh token."),
				 errhint("Send the user to the URL of digime_reauthorize_url(" INT64_FORMAT ", callback).",
						 tok->id)));
}

/*
 * Has the worker refresh a token (within_ms: only if it still expires
 * within that; -1: in any case).  The caller's transaction must not hold
 * the row: the worker could neither see nor wait for its change.
 */
static void
refresh_in_worker(DmCall *call, const DmStoredToken *tok, int64 within_ms, const char *action)
{
	DmRequestArgs a;
	DmReply		r;

	if (tok->changed_here)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_IN_USE),
				 errmsg("user access token " INT64_FORMAT " was changed by the current transaction",
						tok->id),
				 errdetail("The digime worker that refreshes it can neither see nor wait for an uncommitted change."),
				 errhint("Commit the change first.")));
	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_REFRESH;
	a.actor = call->actor;
	a.token_id = tok->id;
	a.within_ms = within_ms;
	a.audit_action = action;
	dm_worker_request(&a, &r, NULL, token_where(tok->id));
}

/* The token row as the caller may read it now, with secrets. */
static void
load_token(DmCall *call, int64 token_id, DmRead read, DmStoredToken *tok)
{
	(void) dm_store_token_load(&call->actor, token_id, true, read, false, tok);
}

static TimestampTz
in_ms(int64 ms)
{
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);
}

/*
 * Calls oauth/authorize for the contract, sending the stored token's access
 * token when user_token_id is given: refreshed first when it expires within
 * digime.refresh_margin, and once more after a 401 InvalidToken.
 */
static void
authorize_with_token(DmCall *call, DmContract *c, const char *callback, const char *state,
					 int64 token_id, Jsonb *opts, DmUrlResult *res)
{
	DmStoredToken tok;
	DmApiError	err;
	JsonbContainer *actions = opts ? &opts->root : NULL;
	int64		margin_ms = (int64) dm_refresh_margin * 1000;

	load_token(call, token_id, DM_READ_CURRENT, &tok);
	check_token_usable(&tok);
	/* the token's own contract must be the caller's too */
	if (strcmp(tok.contract_id, c->contract_id) != 0)
		dm_store_contract_load(&call->actor, tok.contract_id, NULL, NULL);
	if (tok.access_expires_at <= in_ms(margin_ms))
	{
		refresh_in_worker(call, &tok, margin_ms, "refresh_automatic");
		load_token(call, token_id, DM_READ_LATEST, &tok);
	}
	if (!dm_api_authorize(c, callback, state, tok.access_token, actions, res, &err))
	{
		if (!dm_api_error_is(&err, 401, "InvalidToken"))
			dm_api_raise(&err, NULL);
		refresh_in_worker(call, &tok, -1, "refresh_automatic");
		load_token(call, token_id, DM_READ_LATEST, &tok);
		(void) dm_api_authorize(c, callback, state, tok.access_token, actions, res, NULL);
	}
	dm_secret_free(tok.access_token);
	dm_secret_free(tok.refresh_token);
}

static Datum
authorize_url_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *callback = dm_arg_text(fcinfo, 1, "callback");
	char	   *state = dm_arg_text(fcinfo, 2, "state");
	Jsonb	   *opts = opt_jsonb(fcinfo, 5);
	char	   *source_type = PG_ARGISNULL(6) ? "pull" : text_to_cstring(PG_GETARG_TEXT_PP(6));
	Jsonb	   *sample = opt_jsonb(fcinfo, 7);
	char	   *locale = dm_arg_opt_text(fcinfo, 8, "locale");
	char	   *storage_id = dm_arg_opt_text(fcinfo, 10, "storage_id");
	Jsonb	   *scope = opt_jsonb(fcinfo, 12);
	char	   *storage_ref = NULL;
	DmContract	c;
	DmUrlResult res;
	StringInfoData q;
	int64		id;

	call->audit.contract_id = contract_id;
	dm_validate_callback(callback);
	dm_validate_state(state);
	if (!PG_ARGISNULL(3) && PG_GETARG_INT32(3) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("service_id must be a positive integer"),
				 errhint("Pass NULL to let the user choose the service.")));
	if (opts)
		dm_validate_session_options(opts);
	if (strcmp(source_type, "pull") != 0 && strcmp(source_type, "push") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("source_type must be \"pull\" or \"push\"")));
	if (sample)
		dm_validate_sample_data(sample);
	if (locale)
		dm_validate_locale(locale);
	if (scope)
		dm_validate_sources_scope(scope);

	InitMaterializedSRF(fcinfo, 0);
	dm_call_enter(call);
	dm_store_contract_load(&call->actor, contract_id, &c, CurrentMemoryContext);
	if (PG_ARGISNULL(4))
		(void) dm_api_authorize(&c, callback, state, NULL, opts ? &opts->root : NULL, &res, NULL);
	else
	{
		call->audit.token_id = PG_GETARG_INT64(4);
		authorize_with_token(call, &c, callback, state, PG_GETARG_INT64(4), opts, &res);
	}
	if (storage_id)
		storage_ref = dm_api_reference(&c, "cloudId", storage_id);

	/* {onboard}authorize?..., parameters in the SDK's order (protocol §4.1) */
	initStringInfo(&q);
	dm_form_append(&q, "code", res.code);
	dm_form_append(&q, "sourceType", source_type);
	if (!PG_ARGISNULL(3))
		dm_form_append(&q, "service", psprintf("%d", PG_GETARG_INT32(3)));
	if (sample)
	{
		char	   *data_set = dm_json_get_string(&sample->root, "dataSet");
		JsonbValue *auto_onboard = dm_json_get(&sample->root, "autoOnboard");

		if (data_set[0] != '\0')
			dm_form_append(&q, "sampleDataSet", data_set);
		if (auto_onboard && auto_onboard->type == jbvBool && auto_onboard->val.boolean)
			dm_form_append(&q, "sampleDataAutoOnboard", "true");
	}
	if (locale)
		dm_form_append(&q, "lng", locale);
	form_bool(&q, fcinfo, 9, "includeSampleDataOnlySources");
	if (storage_ref)
		dm_form_append(&q, "storageRef", storage_ref);
	form_bool(&q, fcinfo, 11, "triggerQuery");
	if (scope)
	{
		StringInfoData js;

		initStringInfo(&js);
		dm_json_append_compact(&js, &scope->root);
		dm_form_append(&q, "sourcesScope", dm_uri_component(js.data));
	}

	id = dm_store_pending_insert(&call->actor, "authorize", contract_id, state, res.code_verifier,
								 res.session, callback, 0, dm_authorization_ttl);
	call->audit.reference = psprintf("authorization " INT64_FORMAT, id);
	return_url_row(fcinfo, psprintf("%sauthorize?%s", dm_onboard_url, q.data),
				   res.code_verifier, res.session);
	dm_secret_free(res.code_verifier);
	return (Datum) 0;
}

Datum
digime_authorize_url(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "authorize", true, authorize_url_body);
}

static Datum
reauthorize_url_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	int64		token_id = dm_arg_id(fcinfo, 0, "token_id");
	char	   *callback = dm_arg_text(fcinfo, 1, "callback");
	char	   *state = dm_arg_opt_text(fcinfo, 2, "state");
	char	   *locale = dm_arg_opt_text(fcinfo, 3, "locale");
	Jsonb	   *opts = opt_jsonb(fcinfo, 4);
	DmStoredToken tok;
	DmContract	c;
	DmUrlResult res;
	DmApiError	err;
	StringInfoData q;
	int64		id;

	call->audit.token_id = token_id;
	dm_validate_callback(callback);
	if (locale)
		dm_validate_locale(locale);
	if (opts)
		dm_validate_session_options(opts);
	/* the callback is matched by state: make one when the caller has none */
	if (state == NULL)
		state = dm_random_alnum(DM_NONCE_LEN);
	dm_validate_state(state);

	InitMaterializedSRF(fcinfo, 0);
	dm_call_enter(call);
	load_token(call, token_id, DM_READ_CURRENT, &tok);
	if (strcmp(tok.status, "revoked") == 0)
		check_token_usable(&tok);
	call->audit.contract_id = tok.contract_id;
	dm_store_contract_load(&call->actor, tok.contract_id, &c, CurrentMemoryContext);
	/* no refresh first: this is the path for a refresh token that is dead */
	if (!dm_api_token_reference(&c, tok.access_token, callback, state,
								opts ? &opts->root : NULL, &res, &err))
		dm_api_raise(&err, strcmp(err.code, "InvalidToken") == 0 ?
					 "digi.me does not accept the stored access token for a reauthorization: "
					 "start a new authorization with digime_authorize_url()." : NULL);
	dm_secret_free(tok.access_token);
	dm_secret_free(tok.refresh_token);

	/* {onboard}user-reauth?code[&lng][&triggerQuery] (protocol §4.4) */
	initStringInfo(&q);
	dm_form_append(&q, "code", res.code);
	if (locale)
		dm_form_append(&q, "lng", locale);
	form_bool(&q, fcinfo, 5, "triggerQuery");

	id = dm_store_pending_insert(&call->actor, "reauthorize", tok.contract_id, state,
								 res.code_verifier, res.session, callback, token_id,
								 dm_authorization_ttl);
	call->audit.reference = psprintf("authorization " INT64_FORMAT, id);
	return_url_row(fcinfo, psprintf("%suser-reauth?%s", dm_onboard_url, q.data),
				   res.code_verifier, res.session);
	dm_secret_free(res.code_verifier);
	return (Datum) 0;
}

Datum
digime_reauthorize_url(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "reauthorize", true, reauthorize_url_body);
}

static Datum
exchange_code_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *code = dm_arg_text(fcinfo, 1, "authorization_code");
	char	   *verifier = dm_arg_text(fcinfo, 2, "code_verifier");
	DmRequestArgs a;
	DmReply		r;

	call->audit.contract_id = contract_id;
	if (strlen(code) > DM_MAX_TOKEN_LEN || strlen(verifier) > DM_MAX_TOKEN_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("authorization_code and code_verifier must not be longer than %d bytes",
						DM_MAX_TOKEN_LEN)));
	/* the worker checks the contract and audits the exchange */
	call->audit.action = NULL;
	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_EXCHANGE_CODE;
	a.actor = call->actor;
	a.contract_id = contract_id;
	a.code = code;
	a.code_verifier = verifier;
	dm_worker_request(&a, &r, NULL, "digime.user_tokens (the newest row of the contract)");
	dm_secret_free(code);
	dm_secret_free(verifier);
	return dm_call_token_result(call, r.token_id, DM_READ_LATEST);
}

Datum
digime_exchange_code(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "exchange", true, exchange_code_body);
}

static Datum
handle_callback_body(DmCall *call)
{
	char	   *url = dm_arg_text(call->fcinfo, 0, "callback_url");
	DmCallback	cb;
	DmRequestArgs a;
	DmReply		r;

	dm_callback_parse(url, &cb);
	dm_callback_check_success(&cb);
	/* the worker finds, checks and claims the authorization, and audits */
	call->audit.action = NULL;
	memset(&a, 0, sizeof(a));
	a.kind = DM_REQ_CALLBACK;
	a.actor = call->actor;
	a.state = cb.state;
	a.code = cb.code;
	a.account_reference = cb.account_reference;
	dm_worker_request(&a, &r, NULL,
					  "digime.user_tokens; the same callback URL again returns the stored token");
	return dm_call_token_result(call, r.token_id, DM_READ_LATEST);
}

Datum
digime_handle_callback(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "exchange", true, handle_callback_body);
}

static Datum
refresh_token_body(DmCall *call)
{
	int64		token_id = dm_arg_id(call->fcinfo, 0, "token_id");
	DmStoredToken tok;

	call->audit.token_id = token_id;
	dm_call_enter(call);
	/* only a transaction that wrote something can hold the row */
	tok.id = token_id;
	tok.changed_here = false;
	if (GetTopTransactionIdIfAny() != InvalidTransactionId)
		(void) dm_store_token_load(&call->actor, token_id, false, DM_READ_CURRENT, false, &tok);
	call->audit.action = NULL;	/* the worker audits */
	refresh_in_worker(call, &tok, -1, "refresh");
	return dm_call_token_result(call, token_id, DM_READ_LATEST);
}

Datum
digime_refresh_token(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "refresh", true, refresh_token_body);
}

static int64
epoch_seconds(TimestampTz ts)
{
	return (int64) timestamptz_to_time_t(ts);
}

/* The SDK's UserAccessToken (protocol §4.2), expiries in seconds. */
static Datum
user_access_token_json(DmCall *call, DmStoredToken *tok)
{
	StringInfoData js;
	bool		first;
	bool		inner;
	Jsonb	   *result;
	MemoryContext old;

	initStringInfo(&js);
	appendStringInfoString(&js, "{\"accessToken\":{");
	inner = true;
	dm_json_member_string(&js, &inner, "value", tok->access_token);
	dm_json_member_int64(&js, &inner, "expiry", epoch_seconds(tok->access_expires_at));
	appendStringInfoString(&js, "},\"refreshToken\":{");
	inner = true;
	dm_json_member_string(&js, &inner, "value", tok->refresh_token);
	dm_json_member_int64(&js, &inner, "expiry", epoch_seconds(tok->refresh_expires_at));
	appendStringInfoString(&js, "},\"user\":{");
	inner = true;
	if (tok->user_id)
		dm_json_member_string(&js, &inner, "id", tok->user_id);
	appendStringInfoChar(&js, '}');
	first = false;
	if (tok->consent_id)
		dm_json_member_string(&js, &first, "consentid", tok->consent_id);
	appendStringInfoChar(&js, '}');

	old = MemoryContextSwitchTo(call->outer_cxt);
	result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(js.data)));
	MemoryContextSwitchTo(old);
	dm_secret_free(js.data);
	dm_secret_free(tok->access_token);
	dm_secret_free(tok->refresh_token);
	return JsonbPGetDatum(result);
}

static Datum
user_access_token_body(DmCall *call)
{
	int64		token_id = dm_arg_id(call->fcinfo, 0, "token_id");
	DmStoredToken tok;

	dm_call_enter(call);
	load_token(call, token_id, DM_READ_CURRENT, &tok);
	if (strcmp(tok.status, "revoked") == 0)
		check_token_usable(&tok);
	dm_store_contract_load(&call->actor, tok.contract_id, NULL, NULL);
	return user_access_token_json(call, &tok);
}

Datum
digime_user_access_token(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, NULL, false, user_access_token_body);
}

static Datum
valid_access_token_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	int64		token_id = dm_arg_id(fcinfo, 0, "token_id");
	int64		min_ms = dm_arg_interval_ms(fcinfo, 1, "min_validity");
	DmStoredToken tok;

	dm_call_enter(call);
	load_token(call, token_id, DM_READ_CURRENT, &tok);
	check_token_usable(&tok);
	dm_store_contract_load(&call->actor, tok.contract_id, NULL, NULL);
	if (tok.access_expires_at <= in_ms(min_ms))
	{
		if (tok.refresh_expires_at <= GetCurrentTimestamp())
			ereport(ERROR,
					(errcode(ERRCODE_DIGIME_NEEDS_REAUTHORIZATION),
					 errmsg("user access token " INT64_FORMAT " needs reauthorization", token_id),
					 errdetail("Its status is %s, but its refresh token has expired.", tok.status),
					 errhint("Send the user to the URL of digime_reauthorize_url(" INT64_FORMAT ", callback).",
							 token_id)));
		/* a refresh writes: refused before anything is sent where it cannot */
		dm_call_check_writable("digime_valid_access_token");
		refresh_in_worker(call, &tok, min_ms, "refresh_automatic");
		load_token(call, token_id, DM_READ_LATEST, &tok);
		if (tok.access_expires_at <= in_ms(min_ms))
			ereport(ERROR,
					(errcode(ERRCODE_DIGIME_NEEDS_REAUTHORIZATION),
					 errmsg("user access token " INT64_FORMAT " expires within min_validity even after a refresh",
							token_id),
					 errdetail("Its status is %s; digi.me issued an access token that expires too soon.",
							   tok.status),
					 errhint("Ask for a shorter min_validity, or send the user to digime_reauthorize_url(" INT64_FORMAT ", callback).",
							 token_id)));
	}
	return user_access_token_json(call, &tok);
}

Datum
digime_valid_access_token(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, NULL, false, valid_access_token_body);
}

/* accessToken / refreshToken of an imported UserAccessToken. */
static void
import_part(Jsonb *doc, const char *key, char **value, int64 *expiry)
{
	JsonbContainer *o = dm_json_get_object(&doc->root, key);
	double		e = 0;

	*value = dm_json_get_string(o, "value");
	(void) dm_json_get_number(o, "expiry", &e);
	if ((*value)[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("user_access_token.%s.value must not be empty", key)));
	if (strlen(*value) > DM_MAX_TOKEN_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("user_access_token.%s.value is longer than %d bytes", key, DM_MAX_TOKEN_LEN)));
	if (e <= 0 || e > 1e11 || e != (double) (int64) e)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("user_access_token.%s.expiry must be whole seconds since the Unix epoch", key),
				 e > 1e11 ? errhint("The value looks like milliseconds; divide it by 1000.") : 0));
	*expiry = (int64) e;
}

static char *
import_id(char *value, const char *path)
{
	if (value != NULL && strlen(value) > DM_MAX_ID_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("user_access_token.%s is longer than %d bytes", path, DM_MAX_ID_LEN)));
	return value;
}

static Datum
import_token_body(DmCall *call)
{
	FunctionCallInfo fcinfo = call->fcinfo;
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	Jsonb	   *doc;
	JsonbContainer *user;
	DmUserToken t;
	int64		id;

	call->audit.contract_id = contract_id;
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("user_access_token must not be NULL")));
	doc = PG_GETARG_JSONB_P(1);
	dm_validate_user_access_token(doc);
	memset(&t, 0, sizeof(t));
	import_part(doc, "accessToken", &t.access_token, &t.access_expires);
	import_part(doc, "refreshToken", &t.refresh_token, &t.refresh_expires);
	user = dm_json_get_object(&doc->root, "user");
	t.user_id = import_id(user ? dm_json_get_string(user, "id") : NULL, "user.id");
	t.consent_id = import_id(dm_json_get_string(&doc->root, "consentid"), "consentid");

	dm_call_enter(call);
	dm_store_contract_load(&call->actor, contract_id, NULL, NULL);
	id = dm_store_token_insert(&call->actor, contract_id, &t, NULL, NULL);
	call->audit.token_id = id;
	return dm_call_token_result(call, id, DM_READ_CURRENT);
}

Datum
digime_import_token(PG_FUNCTION_ARGS)
{
	return dm_call_run(fcinfo, "import", true, import_token_body);
}
