/*-------------------------------------------------------------------------
 *
 * url.c
 *	  URLs through libcurl's URL API (parsing, origins) and escape API
 *	  (percent-encoding).
 *
 * digi.me's onboarding URLs are built by the SDK with WHATWG
 * URLSearchParams (protocol §3.6), whose form encoding differs from
 * curl_easy_escape in three places: space is '+', '*' is kept and '~' is
 * escaped.  sourcesScope is first put through ECMAScript
 * encodeURIComponent, which also keeps ! ' ( ) * ~.  Both are curl's output
 * with those differences undone, so the escaping itself stays curl's.
 *
 * IDENTIFICATION
 *	  src/url.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "util.h"

#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"

#include <curl/curl.h>

/* Parsed URL parts, palloc'd; false when url does not parse. */
typedef struct UrlParts
{
	char	   *scheme;
	char	   *host;
	char	   *port;
	bool		has_user;
	bool		has_query;
	bool		has_fragment;
} UrlParts;

static char *
url_part(CURLU *h, CURLUPart part, unsigned int flags)
{
	char	   *v = NULL;
	char	   *copy = NULL;

	if (curl_url_get(h, part, &v, flags) == CURLUE_OK && v != NULL)
		copy = pstrdup(v);
	curl_free(v);
	return copy;
}

static bool
url_parse(const char *url, UrlParts *p)
{
	CURLU	   *h = curl_url();
	bool		ok;

	memset(p, 0, sizeof(*p));
	if (h == NULL)
		return false;
	ok = curl_url_set(h, CURLUPART_URL, url, 0) == CURLUE_OK;
	if (ok)
	{
		char	   *user = url_part(h, CURLUPART_USER, 0);
		char	   *query = url_part(h, CURLUPART_QUERY, 0);
		char	   *fragment = url_part(h, CURLUPART_FRAGMENT, 0);

		p->scheme = url_part(h, CURLUPART_SCHEME, 0);
		p->host = url_part(h, CURLUPART_HOST, 0);
		p->port = url_part(h, CURLUPART_PORT, CURLU_DEFAULT_PORT);
		p->has_user = user != NULL;
		p->has_query = query != NULL;
		p->has_fragment = fragment != NULL;
		ok = p->scheme != NULL && p->host != NULL && p->port != NULL;
	}
	curl_url_cleanup(h);
	return ok;
}

static bool
host_is_loopback(const char *host)
{
	return pg_strcasecmp(host, "localhost") == 0 ||
		strncmp(host, "127.", 4) == 0 ||
		strcmp(host, "[::1]") == 0;
}

bool
dm_url_allowed(const char *url, const char **why)
{
	UrlParts	p;

	if (!url_parse(url, &p))
		*why = "The value is not an absolute URL.";
	else if (p.has_user)
		*why = "The URL must not carry credentials.";
	else if (p.has_query || p.has_fragment)
		*why = "The URL must not have a query or fragment.";
	else if (pg_strcasecmp(p.scheme, "https") == 0)
		return true;
	else if (pg_strcasecmp(p.scheme, "http") == 0 && host_is_loopback(p.host))
		return true;
	else if (pg_strcasecmp(p.scheme, "http") == 0)
		*why = "Plain http is allowed only to a loopback address; use https.";
	else
		*why = "Only https URLs are allowed.";
	return false;
}

bool
dm_url_same_origin(const char *a, const char *b)
{
	UrlParts	pa,
				pb;

	return url_parse(a, &pa) && url_parse(b, &pb) &&
		pg_strcasecmp(pa.scheme, pb.scheme) == 0 &&
		pg_strcasecmp(pa.host, pb.host) == 0 &&
		strcmp(pa.port, pb.port) == 0 &&
		!pa.has_user;
}

char *
dm_url_join(const char *base, const char *path)
{
	/* GUC check hooks guarantee the trailing slash, as the SDK does */
	return psprintf("%s%s", base, path);
}

/*
 * curl_easy_escape, then replace the listed escapes: each entry maps curl's
 * output ("%2A", "~") to the wanted text ("*", "%7E").
 */
typedef struct EscapeFix
{
	const char *from;
	const char *to;
} EscapeFix;

static const EscapeFix form_fixes[] = {
	{"%20", "+"}, {"%2A", "*"}, {"~", "%7E"}, {NULL, NULL}
};
static const EscapeFix component_fixes[] = {
	{"%21", "!"}, {"%27", "'"}, {"%28", "("}, {"%29", ")"}, {"%2A", "*"}, {NULL, NULL}
};

static void
append_escaped(StringInfo out, const char *s, const EscapeFix *fixes)
{
	char	   *esc = curl_easy_escape(NULL, s, (int) strlen(s));
	const char *p;

	if (esc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	for (p = esc; *p;)
	{
		const EscapeFix *f;

		for (f = fixes; f->from != NULL; f++)
		{
			size_t		n = strlen(f->from);

			if (strncmp(p, f->from, n) == 0)
			{
				appendStringInfoString(out, f->to);
				p += n;
				break;
			}
		}
		if (f->from == NULL)
			appendStringInfoChar(out, *p++);
	}
	curl_free(esc);
}

void
dm_form_append(StringInfo query, const char *name, const char *value)
{
	if (query->len > 0)
		appendStringInfoChar(query, '&');
	append_escaped(query, name, form_fixes);
	appendStringInfoChar(query, '=');
	append_escaped(query, value, form_fixes);
}

char *
dm_uri_component(const char *s)
{
	StringInfoData out;

	initStringInfo(&out);
	append_escaped(&out, s, component_fixes);
	return out.data;
}

/* Form-decodes one name or value: '+' is a space, then %XX via curl. */
static char *
form_decode(const char *s, size_t len)
{
	char	   *plus = pnstrdup(s, len);
	char	   *dec;
	int			declen = 0;
	char	   *result;

	for (char *c = plus; *c; c++)
	{
		if (*c == '+')
			*c = ' ';
		else if (*c == '%' && !(isxdigit((unsigned char) c[1]) && isxdigit((unsigned char) c[2])))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("callback URL has an invalid percent-encoding")));
	}
	dec = curl_easy_unescape(NULL, plus, 0, &declen);
	pfree(plus);
	if (dec == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	if (memchr(dec, '\0', declen) != NULL || !pg_verifymbstr(dec, declen, true))
	{
		curl_free(dec);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL has a parameter that is not valid text")));
	}
	result = pnstrdup(dec, declen);
	curl_free(dec);
	return result;
}

List *
dm_query_parse(const char *url_or_query)
{
	char	   *query = NULL;
	List	   *params = NIL;
	const char *p;

	if (strstr(url_or_query, "://") != NULL)
	{
		CURLU	   *h = curl_url();

		if (h == NULL || curl_url_set(h, CURLUPART_URL, url_or_query, 0) != CURLUE_OK)
		{
			curl_url_cleanup(h);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("callback URL does not parse")));
		}
		query = url_part(h, CURLUPART_QUERY, 0);
		curl_url_cleanup(h);
		if (query == NULL)
			query = "";
	}
	else
	{
		const char *hash = strchr(url_or_query, '#');

		p = url_or_query[0] == '?' ? url_or_query + 1 : url_or_query;
		query = hash ? pnstrdup(p, hash - p) : pstrdup(p);
	}

	for (p = query; *p;)
	{
		const char *amp = strchr(p, '&');
		const char *eq;

		if (amp == NULL)
			amp = p + strlen(p);
		eq = memchr(p, '=', amp - p);

		if (amp > p)
		{
			DmQueryParam *qp = palloc(sizeof(DmQueryParam));

			qp->name = form_decode(p, (eq ? eq : amp) - p);
			qp->value = eq ? form_decode(eq + 1, amp - eq - 1) : pstrdup("");
			params = lappend(params, qp);
		}
		p = *amp ? amp + 1 : amp;
	}
	return params;
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
required_callback_param(List *params, const char *name, size_t max)
{
	char	   *v = callback_param(params, name);

	if (v == NULL || v[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL has no \"%s\" parameter", name)));
	if (strlen(v) > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL parameter \"%s\" is longer than %zu bytes", name, max)));
	return v;
}

void
dm_callback_parse(const char *url, DmCallback *out)
{
	List	   *params = dm_query_parse(url);
	char	   *success = required_callback_param(params, "success", 16);

	memset(out, 0, sizeof(*out));
	if (strcmp(success, "false") == 0)
	{
		out->success = false;
		out->error_code = callback_param(params, "errorCode");
		if (out->error_code != NULL)	/* the browser, so anyone, chooses it */
			out->error_code = dm_shown(out->error_code, DM_MAX_ID_LEN);
		out->state = callback_param(params, "state");
		return;
	}
	if (strcmp(success, "true") != 0)
	{
		success = dm_shown(success, 16);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL has success=\"%s\"; \"true\" or \"false\" expected", success)));
	}
	out->success = true;
	out->state = required_callback_param(params, "state", DM_MAX_TEXT_ARG);
	out->code = required_callback_param(params, "code", DM_MAX_TOKEN_LEN);
	out->account_reference = callback_param(params, "accountReference");
	if (out->account_reference != NULL && strlen(out->account_reference) > DM_MAX_ID_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("callback URL parameter \"accountReference\" is longer than %d bytes",
						DM_MAX_ID_LEN)));
}

void
dm_callback_check_success(const DmCallback *cb)
{
	if (!cb->success)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_CALLBACK_ERROR),
				 errmsg("digi.me authorization failed: %s",
						cb->error_code ? cb->error_code : "no errorCode"),
				 errdetail("The callback reported success=false, errorCode \"%s\".",
						   cb->error_code ? cb->error_code : "")));
}

char *
dm_callback_without_code(const char *url)
{
	StringInfoData out;
	const char *q = strchr(url, '?');
	const char *p;

	/* a bare query string starts at once */
	if (q == NULL && strstr(url, "://") == NULL)
		q = url - 1;
	if (q == NULL)
		return pstrdup(url);
	initStringInfo(&out);
	appendBinaryStringInfo(&out, url, q + 1 - url);
	for (p = q + 1; *p && *p != '#';)
	{
		size_t		seg = strcspn(p, "&#");
		const char *eq = memchr(p, '=', seg);
		size_t		name_len = eq ? (size_t) (eq - p) : seg;

		if (name_len == 4 && strncmp(p, "code", 4) == 0)
			appendStringInfoString(&out, "code=");
		else
			appendBinaryStringInfo(&out, p, seg);
		p += seg;
		if (*p == '&')
			appendStringInfoChar(&out, *p++);
	}
	appendStringInfoString(&out, p);
	return out.data;
}
