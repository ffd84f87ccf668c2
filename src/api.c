/*-------------------------------------------------------------------------
 *
 * api.c
 *	  The digi.me API calls of the authorization flow (protocol §4.1-§4.4):
 *	  oauth/authorize, oauth/token (authorization_code and refresh_token
 *	  grants), oauth/token/reference, reference; and the mapping of the
 *	  API's error answers to SQLSTATEs (README, "Errors").
 *
 * Every attempt of a request is signed afresh (new nonce, timestamp and,
 * for PKCE calls, code_verifier), as the SDK does; the code_verifier
 * returned is the one of the last attempt (vector V26).  Claims are written
 * in alphabetical order, as the SDK writes them.
 *
 * IDENTIFICATION
 *	  src/api.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "api.h"
#include "crypt.h"
#include "guc.h"
#include "jose.h"
#include "util.h"

#include "datatype/timestamp.h"
#include "utils/timestamp.h"

/* One claim of a client JWT. */
typedef struct Claim
{
	const char *name;
	const char *str;			/* string value, or NULL for num */
	int64		num;
} Claim;

#define MAX_CLAIMS 12

/* A signed API call being built; arg of dm_api_build. */
struct DmApiCall
{
	DmContract *contract;
	const char *path;			/* below digime.base_url */
	char	   *url;
	char	   *body;			/* JSON body, or NULL */
	bool		pkce;
	char	   *code_verifier;	/* of the last attempt, when pkce */
	int			nclaims;
	Claim		claims[MAX_CLAIMS];
	const char *secrets[4];		/* scrubbed from API error messages */
};
typedef struct DmApiCall SignedCall;

const DmRetryPolicy dm_api_token_policy = DM_RETRY_UNPROCESSED;

static void
call_init(SignedCall *sc, DmContract *c, const char *path)
{
	memset(sc, 0, sizeof(*sc));
	sc->contract = c;
	sc->path = path;
	sc->url = dm_url_join(dm_base_url, path);
}

static void
claim_str(SignedCall *sc, const char *name, const char *value)
{
	Assert(sc->nclaims < MAX_CLAIMS - 5);
	sc->claims[sc->nclaims].name = name;
	sc->claims[sc->nclaims].str = value;
	sc->nclaims++;
}

static void
add_secret(SignedCall *sc, const char *secret)
{
	for (int i = 0; i < lengthof(sc->secrets); i++)
		if (sc->secrets[i] == NULL)
		{
			sc->secrets[i] = secret;
			return;
		}
}

static int
claim_cmp(const void *a, const void *b)
{
	return strcmp(((const Claim *) a)->name, ((const Claim *) b)->name);
}

/* Milliseconds since the Unix epoch, the SDK's "timestamp" claim. */
static int64
unix_ms_now(void)
{
	TimestampTz now = GetCurrentTimestamp();

	return now / 1000 +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;
}

/* DmHttpBuild: signs the call's claims plus fresh nonce/timestamp/PKCE. */
void
dm_api_build(void *arg, int attempt, DmHttpRequest *req)
{
	SignedCall *sc = (SignedCall *) arg;
	Claim		claims[MAX_CLAIMS];
	int			n = sc->nclaims;
	StringInfoData json;
	bool		first = true;
	char	   *challenge = NULL;

	memcpy(claims, sc->claims, sizeof(Claim) * n);
	claims[n++] = (Claim) {"client_id",
		psprintf("%s_%s", sc->contract->application_id, sc->contract->contract_id), 0};
	claims[n++] = (Claim) {"nonce", dm_random_alnum(DM_NONCE_LEN), 0};
	claims[n++] = (Claim) {"timestamp", NULL, unix_ms_now()};
	if (sc->pkce)
	{
		if (sc->code_verifier != NULL)
			dm_secret_free(sc->code_verifier);
		sc->code_verifier = dm_pkce_verifier();
		challenge = dm_pkce_challenge(sc->code_verifier);
		claims[n++] = (Claim) {"code_challenge", challenge, 0};
		claims[n++] = (Claim) {"code_challenge_method", "S256", 0};
	}
	qsort(claims, n, sizeof(Claim), claim_cmp);

	initStringInfo(&json);
	appendStringInfoChar(&json, '{');
	for (int i = 0; i < n; i++)
	{
		if (claims[i].str != NULL)
			dm_json_member_string(&json, &first, claims[i].name, claims[i].str);
		else
			dm_json_member_int64(&json, &first, claims[i].name, claims[i].num);
	}
	appendStringInfoChar(&json, '}');

	req->method = "POST";
	req->url = sc->url;
	req->body = sc->body;
	req->bearer = dm_jws_sign_ps512(sc->contract->key, json.data);
	dm_secret_free(json.data);	/* may hold a token or code */
}

/* Agent body of oauth/authorize and oauth/token/reference (protocol §2). */
static char *
agent_body(JsonbContainer *actions)
{
	StringInfoData b;
	bool		sdk_first = true;
	bool		meta_first = true;

	initStringInfo(&b);
	appendStringInfoString(&b, "{\"agent\":{\"sdk\":{");
	dm_json_member_string(&b, &sdk_first, "name", dm_agent_name);
	dm_json_member_string(&b, &sdk_first, "version", dm_agent_version);
	appendStringInfoString(&b, ",\"meta\":{");
	dm_json_member_string(&b, &meta_first, "postgresql", PG_VERSION);
	appendStringInfoString(&b, "}}}");
	if (actions != NULL)
	{
		appendStringInfoString(&b, ",\"actions\":");
		dm_json_append_compact(&b, actions);
	}
	appendStringInfoChar(&b, '}');
	return b.data;
}

/* Longest piece of an API error text that is repeated in an error. */
#define MAX_API_TEXT 500

/*
 * The API's text made safe to repeat: every occurrence of the call's secrets
 * replaced (one pass per secret, never searching what it put in), then
 * dm_shown.
 */
static char *
scrub(const SignedCall *sc, const char *s)
{
	if (s == NULL)
		return NULL;
	for (int i = 0; i < lengthof(sc->secrets) && sc->secrets[i] != NULL; i++)
	{
		const char *secret = sc->secrets[i];
		size_t		slen = strlen(secret);
		StringInfoData out;
		const char *hit;

		if (slen == 0 || strstr(s, secret) == NULL)
			continue;
		initStringInfo(&out);
		while ((hit = strstr(s, secret)) != NULL)
		{
			appendBinaryStringInfo(&out, s, hit - s);
			appendStringInfoString(&out, "[redacted]");
			s = hit + slen;
		}
		appendStringInfoString(&out, s);
		s = out.data;
	}
	return dm_shown(s, MAX_API_TEXT);
}

static int
api_sqlstate(const char *code)
{
	static const struct
	{
		const char *code;
		int			sqlstate;
	}			map[] = {
		{"InvalidToken", ERRCODE_DIGIME_INVALID_TOKEN},
		{"InvalidClient", ERRCODE_DIGIME_INVALID_CLIENT},
		{"InvalidRedirectUri", ERRCODE_DIGIME_INVALID_REDIRECT_URI},
		{"InsufficientScope", ERRCODE_DIGIME_INSUFFICIENT_SCOPE},
		{"SDKInvalid", ERRCODE_DIGIME_SDK_INVALID},
		{"SDKVersionInvalid", ERRCODE_DIGIME_SDK_INVALID},
		{"ServiceAuthorizationError", ERRCODE_DIGIME_SERVICE_AUTHORIZATION},
		{"InvalidGrant", ERRCODE_DIGIME_INVALID_GRANT},
	};

	for (int i = 0; i < lengthof(map); i++)
		if (strcmp(map[i].code, code) == 0)
			return map[i].sqlstate;
	return ERRCODE_DIGIME_API_ERROR;
}

bool
dm_api_error_is(const DmApiError *err, long status, const char *code)
{
	return err->status == status && strcmp(err->code, code) == 0;
}

void
dm_api_raise(const DmApiError *err, const char *hint)
{
	int			sqlstate = api_sqlstate(err->code);

	if (hint == NULL && sqlstate == ERRCODE_DIGIME_SDK_INVALID)
		hint = "Set digime.agent_name and digime.agent_version to an SDK identity digi.me accepts.";
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("digi.me API error %s: %s", err->code, err->message),
			 errdetail_internal("code: %s; message: %s; reference: %s; HTTP status: %ld; call: %s",
								err->code, err->message,
								err->reference ? err->reference : "none",
								err->status, err->call),
			 hint ? errhint("%s", hint) : 0));
}

static void
malformed(const SignedCall *sc, const DmHttpResponse *resp, const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
			 errmsg("digi.me API answered %s %s", sc->path, what),
			 errdetail_internal("HTTP status %ld, Content-Type %s, %d bytes.",
								resp->status,
								resp->content_type ? dm_shown(resp->content_type, 100) : "none",
								resp->body.len)));
}

/*
 * The JSON object of a 2xx answer.  An error answer fills *err and returns
 * NULL when err is given, else raises.
 */
static Jsonb *
read_answer(SignedCall *sc, DmHttpResponse *r, DmApiError *err)
{
	DmHttpResponse resp = *r;
	Jsonb	   *doc;
	DmApiError	e;

	doc = dm_json_parse(resp.body.data, resp.body.len);
	if (resp.status >= 200 && resp.status <= 299)
	{
		if (doc == NULL || !JB_ROOT_IS_OBJECT(doc))
			malformed(sc, &resp, "with a body that is not a JSON object");
		return doc;
	}

	/* error answers: API shape, then storage shape, then X-Error-* headers */
	memset(&e, 0, sizeof(e));
	e.call = sc->path;
	e.status = resp.status;
	if (doc != NULL && JB_ROOT_IS_OBJECT(doc))
	{
		JsonbContainer *eo = dm_json_get_object(&doc->root, "error");

		if (eo != NULL)
		{
			e.code = dm_json_get_string(eo, "code");
			e.message = dm_json_get_string(eo, "message");
			e.reference = dm_json_get_string(eo, "reference");
		}
		else
		{
			e.code = dm_json_get_string(&doc->root, "error");
			e.message = dm_json_get_string(&doc->root, "message");
		}
	}
	if (e.code == NULL && resp.x_error_code != NULL)
	{
		e.code = resp.x_error_code;
		e.message = resp.x_error_message;
		e.reference = resp.x_error_reference;
	}
	if (e.code == NULL)
		malformed(sc, &resp, psprintf("HTTP status %ld without an error code", resp.status));
	if (e.message == NULL)
		e.message = "no message";
	if (api_sqlstate(e.code) == ERRCODE_DIGIME_API_ERROR)	/* a known code stays as it is */
		e.code = scrub(sc, e.code);
	e.message = scrub(sc, e.message);
	e.reference = scrub(sc, e.reference);
	if (err == NULL)
		dm_api_raise(&e, NULL);
	*err = e;
	return NULL;
}

/* Runs a blocking call; read_answer's result. */
static Jsonb *
call_api(SignedCall *sc, DmRetryPolicy policy, DmApiError *err)
{
	DmHttpResponse resp;

	dm_http_request(dm_api_build, sc, policy, &resp);
	return read_answer(sc, &resp, err);
}

/* The payload of the verified response token in doc's "token". */
static Jsonb *
verified_payload(const SignedCall *sc, Jsonb *doc)
{
	char	   *token = dm_json_get_string(&doc->root, "token");
	DmVerifyState vs = {false};
	Jsonb	   *payload;

	if (token == NULL || token[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s without a token", sc->path)));
	payload = dm_verify_response_token(token, &vs);
	dm_secret_free(token);
	return payload;
}

static char *
required_string(const SignedCall *sc, JsonbContainer *obj, const char *key, const char *where)
{
	char	   *v = dm_json_get_string(obj, key);

	if (v == NULL || v[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s without %s", sc->path, key),
				 errdetail("The %s has no non-empty string \"%s\".", where, key)));
	return v;
}

/* A string of the answer no longer than max bytes; YD010 otherwise. */
static char *
capped(const SignedCall *sc, char *v, const char *what, int max)
{
	if (v != NULL && strlen(v) > (size_t) max)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s with a %s longer than %d bytes",
						sc->path, what, max)));
	return v;
}

/* {key: string, expiry: number} from the body (protocol §7, Session). */
static Jsonb *
required_session(const SignedCall *sc, Jsonb *doc)
{
	JsonbValue *v = dm_json_get(&doc->root, "session");
	JsonbContainer *s = dm_json_get_object(&doc->root, "session");
	double		expiry;

	if (s == NULL || dm_json_get_string(s, "key") == NULL ||
		!dm_json_get_number(s, "expiry", &expiry))
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s without a valid session", sc->path),
				 errdetail("The session must be an object with a string \"key\" and a number \"expiry\".")));
	return JsonbValueToJsonb(v);
}

static bool
url_call(SignedCall *sc, const char *code_key, DmUrlResult *out, DmApiError *err)
{
	Jsonb	   *doc;
	Jsonb	   *payload;

	/* these calls consume nothing: retrying them is safe */
	doc = call_api(sc, DM_RETRY_IDEMPOTENT, err);
	if (doc == NULL)
		return false;
	payload = verified_payload(sc, doc);
	out->code = capped(sc, required_string(sc, &payload->root, code_key, "response token"),
					   code_key, DM_MAX_TOKEN_LEN);
	out->session = required_session(sc, doc);
	out->code_verifier = sc->code_verifier;
	return true;
}

bool
dm_api_authorize(DmContract *c, const char *callback, const char *state,
				 const char *access_token, JsonbContainer *actions,
				 DmUrlResult *out, DmApiError *err)
{
	SignedCall	sc;

	call_init(&sc, c, "oauth/authorize");
	sc.pkce = true;
	sc.body = agent_body(actions);
	if (access_token != NULL)
	{
		claim_str(&sc, "access_token", access_token);
		add_secret(&sc, access_token);
	}
	claim_str(&sc, "redirect_uri", callback);
	claim_str(&sc, "response_mode", "query");
	claim_str(&sc, "response_type", "code");
	claim_str(&sc, "state", state);
	return url_call(&sc, "preauthorization_code", out, err);
}

bool
dm_api_token_reference(DmContract *c, const char *access_token,
					   const char *callback, const char *state,
					   JsonbContainer *actions, DmUrlResult *out, DmApiError *err)
{
	SignedCall	sc;

	call_init(&sc, c, "oauth/token/reference");
	sc.pkce = true;
	sc.body = agent_body(actions);
	claim_str(&sc, "access_token", access_token);
	add_secret(&sc, access_token);
	claim_str(&sc, "redirect_uri", callback);
	if (state != NULL)
		claim_str(&sc, "state", state);
	return url_call(&sc, "reference_code", out, err);
}

char *
dm_api_reference(DmContract *c, const char *type, const char *value)
{
	SignedCall	sc;
	StringInfoData body;
	bool		first = true;
	Jsonb	   *doc;

	call_init(&sc, c, "reference");
	initStringInfo(&body);
	appendStringInfoChar(&body, '{');
	dm_json_member_string(&body, &first, "type", type);
	dm_json_member_string(&body, &first, "value", value);
	appendStringInfoChar(&body, '}');
	sc.body = body.data;
	doc = call_api(&sc, DM_RETRY_IDEMPOTENT, NULL);
	return capped(&sc, required_string(&sc, &doc->root, "id", "answer"), "reference id",
				  DM_MAX_ID_LEN);
}

/* One of access_token / refresh_token of a token payload (protocol §4.2). */
static void
token_part(const SignedCall *sc, JsonbContainer *payload, const char *key,
		   char **value, int64 *expires)
{
	JsonbContainer *o = dm_json_get_object(payload, key);
	double		exp;

	if (o == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s without %s", sc->path, key)));
	*value = capped(sc, required_string(sc, o, "value", key), key, DM_MAX_TOKEN_LEN);
	/* expires_on is in seconds; a millisecond value would be ~1000x too large */
	if (!dm_json_get_number(o, "expires_on", &exp) || exp <= 0 || exp > 1e11 ||
		exp != (double) (int64) exp)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s with an invalid %s.expires_on", sc->path, key),
				 errdetail("expires_on must be whole seconds since the Unix epoch.")));
	*expires = (int64) exp;
}

static void
parse_user_token(const SignedCall *sc, Jsonb *payload, DmUserToken *out)
{
	JsonbValue *v;

	memset(out, 0, sizeof(*out));
	token_part(sc, &payload->root, "access_token", &out->access_token, &out->access_expires);
	token_part(sc, &payload->root, "refresh_token", &out->refresh_token, &out->refresh_expires);
	out->user_id = capped(sc, dm_json_get_string(&payload->root, "sub"), "sub", DM_MAX_ID_LEN);
	out->consent_id = capped(sc, dm_json_get_string(&payload->root, "consentid"),
							 "consentid", DM_MAX_ID_LEN);
	if ((out->user_id == NULL && (v = dm_json_get(&payload->root, "sub")) != NULL && v->type != jbvNull) ||
		(out->consent_id == NULL && (v = dm_json_get(&payload->root, "consentid")) != NULL && v->type != jbvNull))
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered %s with a non-string sub or consentid", sc->path)));
}

bool
dm_api_token_answer(DmApiCall *sc, DmHttpResponse *resp, DmUserToken *out, DmApiError *err)
{
	Jsonb	   *doc = read_answer(sc, resp, err);

	if (doc == NULL)
		return false;
	parse_user_token(sc, verified_payload(sc, doc), out);
	return true;
}

DmApiCall *
dm_api_exchange_call(DmContract *c, const char *code, const char *code_verifier)
{
	SignedCall *sc = palloc(sizeof(SignedCall));

	call_init(sc, c, "oauth/token");
	claim_str(sc, "code", code);
	claim_str(sc, "code_verifier", code_verifier);
	claim_str(sc, "grant_type", "authorization_code");
	add_secret(sc, code);
	add_secret(sc, code_verifier);
	return sc;
}

DmApiCall *
dm_api_refresh_call(DmContract *c, const char *refresh_token)
{
	SignedCall *sc = palloc(sizeof(SignedCall));

	call_init(sc, c, "oauth/token");
	claim_str(sc, "grant_type", "refresh_token");
	claim_str(sc, "refresh_token", refresh_token);
	add_secret(sc, refresh_token);
	return sc;
}

bool
dm_api_error_transient(const DmApiError *err)
{
	return err->status == 429 || err->status >= 500;
}
