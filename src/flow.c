/*-------------------------------------------------------------------------
 *
 * flow.c
 *	  SQL-callable functions of the authorization flow: digime_authorize_url,
 *	  digime_handle_callback, digime_exchange_code, digime_refresh_token,
 *	  digime_reauthorize_url, digime_user_access_token, digime_import_token.
 *
 * Each validates its arguments before anything is sent or stored, runs in a
 * DmCall (store.c), and either completes or raises with nothing written.
 *
 * IDENTIFICATION
 *	  src/flow.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "fmgr.h"
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
PG_FUNCTION_INFO_V1(digime_import_token);

/* Optional text argument: NULL when SQL NULL; "" is refused (22023). */
static char *
opt_text(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	return dm_arg_text(fcinfo, argno, name);
}

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

/*
 * Calls oauth/authorize for the contract, sending the stored token's access
 * token when user_token_id is given: refreshed first when it expires within
 * digime.refresh_margin, and once more after a 401 InvalidToken.
 */
static void
authorize_with_token(DmCall *call, DmContract *c, const char *callback, const char *state,
					 bool with_token, int64 token_id, Jsonb *opts, DmUrlResult *res)
{
	DmStoredToken tok;
	DmContract	tc;
	DmApiError	err;
	JsonbContainer *actions = opts ? &opts->root : NULL;

	if (!with_token)
	{
		(void) dm_api_authorize(c, callback, state, NULL, actions, res, NULL);
		return;
	}
	dm_token_load(call, token_id, true, &tok);
	/* the token's own contract refreshes it; often the same one */
	if (strcmp(tok.contract_id, c->contract_id) == 0)
		tc = *c;
	else
		dm_contract_load(call, tok.contract_id, &tc);
	dm_token_refresh_if_due(call, &tc, &tok);
	if (!dm_api_authorize(c, callback, state, tok.access_token, actions, res, &err))
	{
		if (!dm_api_error_is(&err, 401, "InvalidToken"))
			dm_api_raise(&err, NULL);
		dm_token_refresh(call, &tc, &tok);
		(void) dm_api_authorize(c, callback, state, tok.access_token, actions, res, NULL);
	}
	dm_secret_free(tok.access_token);
	dm_secret_free(tok.refresh_token);
}

Datum
digime_authorize_url(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *callback = dm_arg_text(fcinfo, 1, "callback");
	char	   *state = dm_arg_text(fcinfo, 2, "state");
	Jsonb	   *opts = opt_jsonb(fcinfo, 5);
	char	   *source_type = PG_ARGISNULL(6) ? "pull" : text_to_cstring(PG_GETARG_TEXT_PP(6));
	Jsonb	   *sample = opt_jsonb(fcinfo, 7);
	char	   *locale = opt_text(fcinfo, 8, "locale");
	char	   *storage_id = opt_text(fcinfo, 10, "storage_id");
	Jsonb	   *scope = opt_jsonb(fcinfo, 12);
	char	   *storage_ref = NULL;
	DmCall		call;
	DmContract	c;
	DmUrlResult res;
	StringInfoData q;

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
	dm_call_begin(&call, fcinfo);
	dm_contract_load(&call, contract_id, &c);
	authorize_with_token(&call, &c, callback, state, !PG_ARGISNULL(4),
						 PG_ARGISNULL(4) ? 0 : PG_GETARG_INT64(4), opts, &res);
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

	dm_pending_insert(&call, "authorize", contract_id, state, res.code_verifier,
					  res.session, callback, 0);
	return_url_row(fcinfo, psprintf("%sauthorize?%s", dm_onboard_url, q.data),
				   res.code_verifier, res.session);
	dm_secret_free(res.code_verifier);
	dm_call_end(&call);
	return (Datum) 0;
}

Datum
digime_reauthorize_url(PG_FUNCTION_ARGS)
{
	int64		token_id;
	char	   *callback = dm_arg_text(fcinfo, 1, "callback");
	char	   *state = opt_text(fcinfo, 2, "state");
	char	   *locale = opt_text(fcinfo, 3, "locale");
	Jsonb	   *opts = opt_jsonb(fcinfo, 4);
	DmCall		call;
	DmStoredToken tok;
	DmContract	c;
	DmUrlResult res;
	DmApiError	err;
	StringInfoData q;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("token_id must not be NULL")));
	token_id = PG_GETARG_INT64(0);
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
	dm_call_begin(&call, fcinfo);
	dm_token_load(&call, token_id, false, &tok);
	dm_contract_load(&call, tok.contract_id, &c);
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

	dm_pending_insert(&call, "reauthorize", tok.contract_id, state, res.code_verifier,
					  res.session, callback, token_id);
	return_url_row(fcinfo, psprintf("%suser-reauth?%s", dm_onboard_url, q.data),
				   res.code_verifier, res.session);
	dm_secret_free(res.code_verifier);
	dm_call_end(&call);
	return (Datum) 0;
}

Datum
digime_exchange_code(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	char	   *code = dm_arg_text(fcinfo, 1, "authorization_code");
	char	   *verifier = dm_arg_text(fcinfo, 2, "code_verifier");
	DmCall		call;
	DmContract	c;
	DmUserToken t;
	int64		id;
	Datum		result;

	dm_call_begin(&call, fcinfo);
	dm_contract_load(&call, contract_id, &c);
	(void) dm_api_exchange_code(&c, code, verifier, &t, NULL);
	id = dm_token_insert(&call, contract_id, &t, NULL, NULL);
	result = dm_token_result(&call, id);
	dm_call_end(&call);
	dm_secret_free(code);
	dm_secret_free(verifier);
	PG_RETURN_DATUM(result);
}

/* The one value of a callback parameter, or NULL; 22023 when repeated. */
static char *
callback_param(List *params, const char *name)
{
	ListCell   *lc;
	char	   *value = NULL;

	foreach(lc, params)
	{
		DmQueryParam *p = lfirst(lc);

		if (strcmp(p->name, name) != 0)
			continue;
		if (value != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("callback URL has more than one \"%s\" parameter", name)));
		value = p->value;
	}
	return value;
}

static char *
required_callback_param(List *params, const char *name)
{
	char	   *v = callback_param(params, name);

	if (v == NULL || v[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL has no \"%s\" parameter", name)));
	return v;
}

Datum
digime_handle_callback(PG_FUNCTION_ARGS)
{
	char	   *url = dm_arg_text(fcinfo, 0, "callback_url");
	List	   *params = dm_query_parse(url);
	char	   *success = required_callback_param(params, "success");
	char	   *state;
	char	   *code;
	char	   *account_ref;
	DmCall		call;
	DmPending	p;
	DmContract	c;
	DmUserToken t;
	DmApiError	err;
	int64		token_id;
	Datum		result;

	if (strcmp(success, "false") == 0)
	{
		char	   *error_code = callback_param(params, "errorCode");

		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_CALLBACK_ERROR),
				 errmsg("digi.me authorization failed: %s", error_code ? error_code : "no errorCode"),
				 errdetail("The callback reported success=false, errorCode \"%s\".",
						   error_code ? error_code : "")));
	}
	if (strcmp(success, "true") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL has success=\"%s\"; \"true\" or \"false\" expected", success)));
	state = required_callback_param(params, "state");
	code = required_callback_param(params, "code");
	account_ref = callback_param(params, "accountReference");

	dm_call_begin(&call, fcinfo);
	if (!dm_pending_find(&call, state, &p))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("no authorization of role \"%s\" has the callback's state",
						GetUserNameFromId(call.caller, false)),
				 errdetail("Only the role that called digime_authorize_url or digime_reauthorize_url can complete it.")));
	if (strcmp(p.status, "completed") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_USED),
				 errmsg("authorization " INT64_FORMAT " was already completed", p.id)));
	if (strcmp(p.status, "superseded") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED),
				 errmsg("authorization " INT64_FORMAT " was superseded by a newer one with the same state",
						p.id)));
	if (p.expired)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_EXPIRED),
				 errmsg("authorization " INT64_FORMAT " has expired", p.id),
				 errdetail("Its callback came later than digime.authorization_ttl after it started."),
				 errhint("Start a new authorization.")));

	dm_contract_load(&call, p.contract_id, &c);
	if (!dm_api_exchange_code(&c, code, p.code_verifier, &t, &err))
	{
		/* the code of an older, superseded authorization fails PKCE */
		if (strcmp(err.code, "InvalidGrant") == 0 && dm_pending_has_superseded(&call, state))
			ereport(ERROR,
					(errcode(ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED),
					 errmsg("the callback belongs to an authorization that was superseded"),
					 errdetail("digi.me refused the code for the newest authorization with this state (%s: %s).",
							   err.code, err.message),
					 errhint("The user must finish the newest authorization URL.")));
		dm_api_raise(&err, NULL);
	}
	dm_secret_free(p.code_verifier);

	if (strcmp(p.kind, "reauthorize") == 0)
	{
		DmStoredToken old;

		dm_token_load(&call, p.token_id, true, &old);
		dm_secret_free(old.access_token);
		dm_secret_free(old.refresh_token);
		/* the token keeps the state of the authorization that created it */
		dm_token_update(&call, p.token_id, &t, NULL, account_ref, false);
		token_id = p.token_id;
	}
	else
		token_id = dm_token_insert(&call, p.contract_id, &t, state, account_ref);
	dm_pending_complete(&call, p.id, token_id);
	result = dm_token_result(&call, token_id);
	dm_call_end(&call);
	dm_secret_free(code);
	PG_RETURN_DATUM(result);
}

Datum
digime_refresh_token(PG_FUNCTION_ARGS)
{
	DmCall		call;
	DmStoredToken tok;
	DmContract	c;
	Datum		result;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("token_id must not be NULL")));
	dm_call_begin(&call, fcinfo);
	dm_token_load(&call, PG_GETARG_INT64(0), true, &tok);
	dm_contract_load(&call, tok.contract_id, &c);
	dm_token_refresh(&call, &c, &tok);
	dm_secret_free(tok.access_token);
	dm_secret_free(tok.refresh_token);
	result = dm_token_result(&call, tok.id);
	dm_call_end(&call);
	PG_RETURN_DATUM(result);
}

static int64
epoch_seconds(TimestampTz ts)
{
	return (int64) timestamptz_to_time_t(ts);
}

Datum
digime_user_access_token(PG_FUNCTION_ARGS)
{
	DmCall		call;
	DmStoredToken tok;
	StringInfoData js;
	bool		first = true;
	bool		inner;
	Jsonb	   *result;
	MemoryContext old;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("token_id must not be NULL")));
	dm_call_begin(&call, fcinfo);
	dm_token_load(&call, PG_GETARG_INT64(0), false, &tok);
	dm_contract_load(&call, tok.contract_id, NULL);

	/* the SDK's UserAccessToken (protocol §4.2), expiries in seconds */
	initStringInfo(&js);
	appendStringInfoString(&js, "{\"accessToken\":{");
	inner = true;
	dm_json_member_string(&js, &inner, "value", tok.access_token);
	dm_json_member_int64(&js, &inner, "expiry", epoch_seconds(tok.access_expires_at));
	appendStringInfoString(&js, "},\"refreshToken\":{");
	inner = true;
	dm_json_member_string(&js, &inner, "value", tok.refresh_token);
	dm_json_member_int64(&js, &inner, "expiry", epoch_seconds(tok.refresh_expires_at));
	appendStringInfoString(&js, "},\"user\":{");
	inner = true;
	if (tok.user_id)
		dm_json_member_string(&js, &inner, "id", tok.user_id);
	appendStringInfoChar(&js, '}');
	first = false;
	if (tok.consent_id)
		dm_json_member_string(&js, &first, "consentid", tok.consent_id);
	appendStringInfoChar(&js, '}');

	old = MemoryContextSwitchTo(call.outer_cxt);
	result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(js.data)));
	MemoryContextSwitchTo(old);
	dm_secret_free(js.data);
	dm_secret_free(tok.access_token);
	dm_secret_free(tok.refresh_token);
	dm_call_end(&call);
	PG_RETURN_JSONB_P(result);
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
	if (e <= 0 || e > 1e11 || e != (double) (int64) e)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("user_access_token.%s.expiry must be whole seconds since the Unix epoch", key),
				 e > 1e11 ? errhint("The value looks like milliseconds; divide it by 1000.") : 0));
	*expiry = (int64) e;
}

Datum
digime_import_token(PG_FUNCTION_ARGS)
{
	char	   *contract_id = dm_arg_text(fcinfo, 0, "contract_id");
	Jsonb	   *doc;
	JsonbContainer *user;
	DmUserToken t;
	DmCall		call;
	int64		id;
	Datum		result;

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
	t.user_id = user ? dm_json_get_string(user, "id") : NULL;
	t.consent_id = dm_json_get_string(&doc->root, "consentid");

	dm_call_begin(&call, fcinfo);
	dm_contract_load(&call, contract_id, NULL);
	id = dm_token_insert(&call, contract_id, &t, NULL, NULL);
	result = dm_token_result(&call, id);
	dm_call_end(&call);
	PG_RETURN_DATUM(result);
}
