/*-------------------------------------------------------------------------
 *
 * json.c
 *	  JSON in and out: PostgreSQL's JSON parser and jsonb for reading,
 *	  escape_json for writing.
 *
 * API answers are untrusted: they are checked with pg_parse_json, which
 * reports errors instead of raising them, before jsonb_in sees them, so a
 * malformed answer (which may hold a token) is never echoed in an error.
 * What pg_parse_json accepts but jsonb_in (or pg_parse_json's own
 * recursion) would raise on is refused first: nesting deeper than
 * DM_JSON_MAX_DEPTH (stack depth, 54001) and numbers outside numeric's range
 * (22003); such a document is not JSON digime accepts.
 * Output is compact JSON (no spaces), as the digi.me SDK sends it; jsonb's
 * own text form has spaces after ':' and ','.
 *
 * IDENTIFICATION
 *	  src/json.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "util.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/numeric.h"

/*
 * Deepest nesting of arrays and objects accepted.  digi.me's answers nest
 * three levels; the parsers recurse once per level and raise (54001) when
 * the stack runs out, some ten thousand levels down.
 */
#define DM_JSON_MAX_DEPTH 64

/*
 * Longest number token, and largest decimal exponent, accepted.  Within
 * these, numeric_in (used by jsonb_in) cannot overflow: it raises 22003 for
 * a weight or scale beyond numeric's range, e.g. 1e-20000 or 1e200000.
 */
#define DM_JSON_MAX_NUMBER_LEN 100
#define DM_JSON_MAX_EXPONENT 1000

/* Nesting within DM_JSON_MAX_DEPTH; a scan of the raw text, before any parser recurses. */
static bool
nesting_ok(const char *buf, size_t len)
{
	int			depth = 0;
	bool		in_string = false;

	for (size_t i = 0; i < len; i++)
	{
		char		c = buf[i];

		if (in_string)
		{
			if (c == '\\')
				i++;
			else if (c == '"')
				in_string = false;
		}
		else if (c == '"')
			in_string = true;
		else if (c == '[' || c == '{')
		{
			if (++depth > DM_JSON_MAX_DEPTH)
				return false;
		}
		else if (c == ']' || c == '}')
			depth--;
	}
	return true;
}

typedef struct NumberCheck
{
	bool		ok;
} NumberCheck;

/* Scalar callback of pg_parse_json: flags a number numeric_in would refuse. */
static void
check_number(void *state, char *token, JsonTokenType tokentype)
{
	NumberCheck *nc = (NumberCheck *) state;

	if (tokentype == JSON_TOKEN_NUMBER)
	{
		const char *e = strpbrk(token, "eE");

		if (strlen(token) > DM_JSON_MAX_NUMBER_LEN)
			nc->ok = false;
		else if (e != NULL)
		{
			/* at most 99 characters: strtol saturates, it does not overflow */
			long		exponent = strtol(e + 1, NULL, 10);

			if (exponent > DM_JSON_MAX_EXPONENT || exponent < -DM_JSON_MAX_EXPONENT)
				nc->ok = false;
		}
	}
	if (token != NULL)
		pfree(token);
}

Jsonb *
dm_json_parse(const char *buf, size_t len)
{
	JsonLexContext *lex;
	JsonParseErrorType rc;
	char	   *copy;
	NumberCheck nc = {true};
	JsonSemAction sem;

	if (len > MaxAllocSize - 1 || memchr(buf, '\0', len) != NULL)
		return NULL;
	if (!pg_verifymbstr(buf, (int) len, true))
		return NULL;
	if (!nesting_ok(buf, len))
		return NULL;

	copy = pnstrdup(buf, len);
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &nc;
	sem.scalar = check_number;
	/* need_escapes: also rejects \u0000, which jsonb cannot store */
	lex = makeJsonLexContextCstringLen(copy, (int) len, GetDatabaseEncoding(), true);
	rc = pg_parse_json(lex, &sem);
	if (rc != JSON_SUCCESS || !nc.ok)
	{
		pfree(copy);
		return NULL;
	}
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(copy)));
}

bool
dm_json_is_object(JsonbContainer *c)
{
	return c != NULL && JsonContainerIsObject(c);
}

JsonbValue *
dm_json_get(JsonbContainer *obj, const char *key)
{
	JsonbValue	k;

	if (!dm_json_is_object(obj))
		return NULL;
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	return findJsonbValueFromContainer(obj, JB_FOBJECT, &k);
}

char *
dm_json_get_string(JsonbContainer *obj, const char *key)
{
	JsonbValue *v = dm_json_get(obj, key);

	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

bool
dm_json_get_number(JsonbContainer *obj, const char *key, double *out)
{
	JsonbValue *v = dm_json_get(obj, key);

	if (v == NULL || v->type != jbvNumeric)
		return false;
	/* saturates to +-Infinity or 0 where numeric_float8 would raise 22003 */
	*out = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow,
											  NumericGetDatum(v->val.numeric)));
	return true;
}

static JsonbContainer *
get_container(JsonbContainer *obj, const char *key, bool want_object)
{
	JsonbValue *v = dm_json_get(obj, key);
	JsonbContainer *c;

	if (v == NULL || v->type != jbvBinary)
		return NULL;
	c = v->val.binary.data;
	if (want_object ? !JsonContainerIsObject(c) :
		(!JsonContainerIsArray(c) || JsonContainerIsScalar(c)))
		return NULL;
	return c;
}

JsonbContainer *
dm_json_get_object(JsonbContainer *obj, const char *key)
{
	return get_container(obj, key, true);
}

JsonbContainer *
dm_json_get_array(JsonbContainer *obj, const char *key)
{
	return get_container(obj, key, false);
}

static void
append_scalar(StringInfo out, JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			appendStringInfoString(out, "null");
			break;
		case jbvBool:
			appendStringInfoString(out, v->val.boolean ? "true" : "false");
			break;
		case jbvNumeric:
			appendStringInfoString(out,
								   DatumGetCString(DirectFunctionCall1(numeric_out,
																	   NumericGetDatum(v->val.numeric))));
			break;
		case jbvString:
			{
				char	   *s = pnstrdup(v->val.string.val, v->val.string.len);

				escape_json(out, s);
				pfree(s);
			}
			break;
		default:
			elog(ERROR, "unexpected jsonb value type %d", (int) v->type);
	}
}

void
dm_json_append_compact(StringInfo out, JsonbContainer *c)
{
	JsonbIterator *it = JsonbIteratorInit(c);
	JsonbIteratorToken tok;
	JsonbValue	v;
	bool		need_comma = false;
	bool		raw_scalar = false;

	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		switch (tok)
		{
			case WJB_BEGIN_ARRAY:
				if (v.val.array.rawScalar)
				{
					raw_scalar = true;
					break;
				}
				/* FALLTHROUGH */
			case WJB_BEGIN_OBJECT:
				if (need_comma)
					appendStringInfoChar(out, ',');
				appendStringInfoChar(out, tok == WJB_BEGIN_OBJECT ? '{' : '[');
				need_comma = false;
				break;
			case WJB_END_ARRAY:
				if (raw_scalar)
					break;
				/* FALLTHROUGH */
			case WJB_END_OBJECT:
				appendStringInfoChar(out, tok == WJB_END_OBJECT ? '}' : ']');
				need_comma = true;
				break;
			case WJB_KEY:
				if (need_comma)
					appendStringInfoChar(out, ',');
				append_scalar(out, &v);
				appendStringInfoChar(out, ':');
				need_comma = false;
				break;
			case WJB_VALUE:
			case WJB_ELEM:
				if (need_comma)
					appendStringInfoChar(out, ',');
				append_scalar(out, &v);
				need_comma = true;
				break;
			default:
				elog(ERROR, "unexpected jsonb iterator token %d", (int) tok);
		}
	}
}

static void
member_key(StringInfo out, bool *first, const char *key)
{
	if (!*first)
		appendStringInfoChar(out, ',');
	*first = false;
	escape_json(out, key);
	appendStringInfoChar(out, ':');
}

void
dm_json_member_string(StringInfo out, bool *first, const char *key, const char *value)
{
	member_key(out, first, key);
	escape_json(out, value);
}

void
dm_json_member_int64(StringInfo out, bool *first, const char *key, int64 value)
{
	member_key(out, first, key);
	appendStringInfo(out, INT64_FORMAT, value);
}
