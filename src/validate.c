/*-------------------------------------------------------------------------
 *
 * validate.c
 *	  Validation of the flow functions' arguments: the SDK's io-ts rules
 *	  (protocol §7), made stricter where the SDK fails silently (§8 #10):
 *	  unknown keys are refused instead of being forwarded, empty optional
 *	  strings are refused instead of being dropped, and the callback must be
 *	  an absolute http(s) URL.  Every failure is SQLSTATE 22023 naming the
 *	  offending path, e.g. session_options.pull.scope.timeRanges[0].from.
 *
 * IDENTIFICATION
 *	  src/validate.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "util.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include <curl/curl.h>

/* A tiny schema language for the JSON arguments. */
typedef enum SchemaKind
{
	S_OBJECT,
	S_ARRAY,
	S_STRING,
	S_NUMBER,
	S_BOOL,
	S_ANY
} SchemaKind;

typedef struct Schema Schema;

typedef struct SchemaField
{
	const char *name;
	const Schema *schema;
	bool		required;
} SchemaField;

struct Schema
{
	SchemaKind	kind;
	const SchemaField *fields;	/* S_OBJECT: NULL-terminated */
	const Schema *elem;			/* S_ARRAY */
	const char *const *choices; /* S_STRING: allowed values, or NULL */
};

static const Schema s_number = {S_NUMBER};
static const Schema s_string = {S_STRING};
static const Schema s_bool = {S_BOOL};
static const Schema s_any = {S_ANY};
static const Schema s_string_array = {S_ARRAY, NULL, &s_string};

/* session_options (PullSessionOptions, CAScope) */
static const Schema s_id_object = {S_OBJECT, (const SchemaField[]) {
		{"id", &s_number, true}, {NULL}}};
static const Schema s_service_type = {S_OBJECT, (const SchemaField[]) {
		{"id", &s_number, true},
		{"serviceObjectTypes", &(const Schema) {S_ARRAY, NULL, &s_id_object}, false},
{NULL}}};
static const Schema s_service_group = {S_OBJECT, (const SchemaField[]) {
		{"id", &s_number, true},
		{"serviceTypes", &(const Schema) {S_ARRAY, NULL, &s_service_type}, false},
{NULL}}};
static const Schema s_time_range = {S_OBJECT, (const SchemaField[]) {
		{"from", &s_number, false}, {"last", &s_string, false}, {"to", &s_number, false},
{NULL}}};
static const Schema s_scope = {S_OBJECT, (const SchemaField[]) {
		{"timeRanges", &(const Schema) {S_ARRAY, NULL, &s_time_range}, false},
		{"serviceGroups", &(const Schema) {S_ARRAY, NULL, &s_service_group}, false},
		/* criteria: typed but unvalidated by the SDK; its shape is unknown */
		{"criteria", &(const Schema) {S_ARRAY, NULL, &s_any}, false},
{NULL}}};
static const Schema s_pull = {S_OBJECT, (const SchemaField[]) {
		{"limits", &(const Schema) {S_OBJECT, (const SchemaField[]) {
					{"duration", &(const Schema) {S_OBJECT, (const SchemaField[]) {
								{"sourceFetch", &s_number, true}, {NULL}}}, false},
			{NULL}}}, false},
		{"scope", &s_scope, false},
		{"sourceFetch", &s_bool, false},
		{"sourceFetchFilter", &(const Schema) {S_OBJECT, (const SchemaField[]) {
					{"account", &(const Schema) {S_OBJECT, (const SchemaField[]) {
								{"id", &s_string_array, true}, {NULL}}}, true},
			{NULL}}}, false},
{NULL}}};
static const Schema s_session_options = {S_OBJECT, (const SchemaField[]) {
		{"pull", &s_pull, false}, {NULL}}};

/* sample_data (SampleDataOptions) */
static const Schema s_sample_data = {S_OBJECT, (const SchemaField[]) {
		{"dataSet", &s_string, true}, {"autoOnboard", &s_bool, false}, {NULL}}};

/* sources_scope (SourcesScope, protocol §7) */
static const char *const data_types[] = {
	"medication-information", "laboratory-results", "appointments",
	"patient-summary-hospital-data", "gp-data", "mental-health-patient-summary",
	"documents", "measurements-vital-signs", "allergy-intolerances", "images",
	"medication-related-intolerances", "referral-to-questionnaire",
	"questionnaire-response", "longterm-healthcare-patient-summary",
	"patient-corrections-request", "vaccinations", "integral-birth-care-process",
	NULL
};
static const char *const organization_types[] = {
	"general-practitioner", "health-center", "hospital", "private-treatment-center",
	"specialist-centre", "radiotherapy-center", "dialysis-center",
	"obstetrics-and-maternity-care", "mental-health-care", "youth-health-care",
	"psychology-and-psychotherapy", "nursing-and-care-homes-and-home-care",
	"disability-care", "mentally-disabled-care", "daycare-centers",
	"rehabilitation-center", "pharmacy", "audiological-center", "medical-aids",
	"physiotherapy", "protected-and-supported-living", "dentist", "ambulance",
	"health-insurers", NULL
};
static const Schema s_sources_scope = {S_OBJECT, (const SchemaField[]) {
		{"dataType", &(const Schema) {S_ARRAY, NULL,
		&(const Schema) {S_STRING, NULL, NULL, data_types}}, false},
		{"organizationType", &(const Schema) {S_STRING, NULL, NULL, organization_types}, false},
{NULL}}};

/* user_access_token (the SDK's UserAccessToken) */
static const Schema s_token_part = {S_OBJECT, (const SchemaField[]) {
		{"value", &s_string, true}, {"expiry", &s_number, true}, {NULL}}};
static const Schema s_user_access_token = {S_OBJECT, (const SchemaField[]) {
		{"accessToken", &s_token_part, true},
		{"refreshToken", &s_token_part, true},
		{"user", &(const Schema) {S_OBJECT, (const SchemaField[]) {
					{"id", &s_string, false}, {NULL}}}, false},
		{"consentid", &s_string, false},
{NULL}}};

static const char *
kind_name(SchemaKind k)
{
	switch (k)
	{
		case S_OBJECT:
			return "an object";
		case S_ARRAY:
			return "an array";
		case S_STRING:
			return "a string";
		case S_NUMBER:
			return "a number";
		case S_BOOL:
			return "a boolean";
		default:
			return "a value";
	}
}

static void
invalid(const char *path, const char *fmt, const char *arg)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid %s", path),
			 errdetail_internal(fmt, path, arg)));
}

static void check_value(const Schema *s, JsonbValue *v, const char *path);

static void
check_container(const Schema *s, JsonbContainer *c, const char *path)
{
	JsonbIterator *it = JsonbIteratorInit(c);
	JsonbIteratorToken tok;
	JsonbValue	v;
	int			index = 0;

	if (s->kind == S_OBJECT)
	{
		for (const SchemaField *f = s->fields; f->name; f++)
			if (f->required && dm_json_get(c, f->name) == NULL)
				invalid(path, "%s lacks the required key \"%s\".", f->name);
	}
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			char	   *key = pnstrdup(v.val.string.val, v.val.string.len);
			const SchemaField *f;

			for (f = s->fields; f->name; f++)
				if (strcmp(f->name, key) == 0)
					break;
			if (f->name == NULL)
				invalid(path, "%s has the unknown key \"%s\".", key);
			tok = JsonbIteratorNext(&it, &v, true);
			Assert(tok == WJB_VALUE);
			check_value(f->schema, &v, psprintf("%s.%s", path, key));
		}
		else if (tok == WJB_ELEM)
			check_value(s->elem, &v, psprintf("%s[%d]", path, index++));
	}
}

static void
check_value(const Schema *s, JsonbValue *v, const char *path)
{
	bool		ok;

	switch (s->kind)
	{
		case S_ANY:
			return;
		case S_OBJECT:
			ok = v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data);
			break;
		case S_ARRAY:
			ok = v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data) &&
				!JsonContainerIsScalar(v->val.binary.data);
			break;
		case S_STRING:
			ok = v->type == jbvString;
			break;
		case S_NUMBER:
			ok = v->type == jbvNumeric;
			break;
		case S_BOOL:
			ok = v->type == jbvBool;
			break;
		default:
			ok = false;
	}
	if (!ok)
		invalid(path, "%s must be %s.", kind_name(s->kind));

	if (s->kind == S_OBJECT || s->kind == S_ARRAY)
		check_container(s, v->val.binary.data, path);
	else if (s->kind == S_STRING && s->choices != NULL)
	{
		char	   *str = pnstrdup(v->val.string.val, v->val.string.len);

		for (const char *const *c = s->choices; *c; c++)
			if (strcmp(*c, str) == 0)
				return;
		invalid(path, "%s has the unknown value \"%s\".", str);
	}
}

static void
check_document(const Schema *s, Jsonb *doc, const char *path)
{
	JsonbValue	v;

	if (JB_ROOT_IS_SCALAR(doc) || !JB_ROOT_IS_OBJECT(doc))
		invalid(path, "%s must be a JSON object%s.", "");
	v.type = jbvBinary;
	v.val.binary.data = &doc->root;
	v.val.binary.len = VARSIZE(doc) - VARHDRSZ;
	check_value(s, &v, path);
}

void
dm_validate_session_options(Jsonb *opts)
{
	check_document(&s_session_options, opts, "session_options");
}

void
dm_validate_sample_data(Jsonb *sample)
{
	check_document(&s_sample_data, sample, "sample_data");
}

void
dm_validate_sources_scope(Jsonb *scope)
{
	check_document(&s_sources_scope, scope, "sources_scope");
}

void
dm_validate_user_access_token(Jsonb *token)
{
	check_document(&s_user_access_token, token, "user_access_token");
}

/* BCP 47-like: "en", "nl", "en-GB", "zh-Hant-TW". */
void
dm_validate_locale(const char *locale)
{
	const char *p = locale;
	int			n = 0;
	bool		ok = true;

	while (*p && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
		p++, n++;
	if (n < 2 || n > 3)
		ok = false;
	while (ok && *p)
	{
		if (*p != '-' && *p != '_')
			ok = false;
		else
		{
			p++;
			n = 0;
			while (*p && isalnum((unsigned char) *p))
				p++, n++;
			ok = n >= 1 && n <= 8;
		}
	}
	if (!ok || strlen(locale) > 35)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid locale \"%s\"", locale),
				 errhint("Use a language tag such as \"en\", \"nl\" or \"en-GB\".")));
}

/* An absolute http(s) URL without a fragment (RFC 6749 §3.1.2). */
void
dm_validate_callback(const char *callback)
{
	CURLU	   *h = curl_url();
	char	   *scheme = NULL;
	char	   *fragment = NULL;
	bool		ok;

	char	   *host = NULL;
	char	   *user = NULL;

	ok = h != NULL && curl_url_set(h, CURLUPART_URL, callback, 0) == CURLUE_OK &&
		curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		(strcmp(scheme, "https") == 0 || strcmp(scheme, "http") == 0) &&
		curl_url_get(h, CURLUPART_HOST, &host, 0) == CURLUE_OK && host[0] != '\0' &&
		curl_url_get(h, CURLUPART_USER, &user, 0) == CURLUE_NO_USER &&
		curl_url_get(h, CURLUPART_FRAGMENT, &fragment, 0) == CURLUE_NO_FRAGMENT;
	curl_free(scheme);
	curl_free(host);
	curl_free(user);
	curl_free(fragment);
	curl_url_cleanup(h);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid callback"),
				 errdetail("The callback must be an absolute http or https URL with a host, "
						   "without credentials or fragment.")));
}

void
dm_validate_state(const char *state)
{
	for (const unsigned char *p = (const unsigned char *) state; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("state must not contain control characters")));
}

/* Contract and application ids: printable ASCII without spaces. */
void
dm_validate_id(const char *name, const char *id)
{
	for (const unsigned char *p = (const unsigned char *) id; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s must consist of printable ASCII characters other than space", name)));
}

char *
dm_arg_text(FunctionCallInfo fcinfo, int argno, const char *name)
{
	text	   *t;
	char	   *s;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
	t = PG_GETARG_TEXT_PP(argno);
	if (VARSIZE_ANY_EXHDR(t) > DM_MAX_TEXT_ARG)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is longer than %d bytes", name, DM_MAX_TEXT_ARG)));
	s = text_to_cstring(t);
	if (s[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name)));
	return s;
}

char *
dm_arg_opt_text(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	return dm_arg_text(fcinfo, argno, name);
}

int64
dm_arg_id(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
	return PG_GETARG_INT64(argno);
}

int64
dm_arg_interval_ms(FunctionCallInfo fcinfo, int argno, const char *name)
{
	Interval   *iv;
	double		us;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", name)));
	iv = PG_GETARG_INTERVAL_P(argno);
	/* a month counts 30 days, as extract(epoch from interval) does */
	us = (double) iv->time + (double) iv->day * USECS_PER_DAY +
		(double) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
	if (us < 0 || us > (double) 3650 * USECS_PER_DAY)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between 0 and 3650 days", name)));
	return (int64) (us / 1000);
}
