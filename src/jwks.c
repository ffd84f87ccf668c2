/*-------------------------------------------------------------------------
 *
 * jwks.c
 *	  Verification of the API's response tokens against its JWKS.
 *
 * Stricter than the SDK (protocol §3.5, §8 #1-#4):
 *	- alg must be PS512 with a 64-byte salt;
 *	- the jku must be on the configured API's origin (scheme, host, port),
 *	  checked before anything is fetched; redirects are not followed;
 *	- keys come from a JWK's "pem" member (SPKI or PKCS#1) or its RFC 7517
 *	  RSA members n/e;
 *	- exp and nbf are enforced when present.
 *
 * Fetched key sets are cached per backend, keyed by URL, for
 * digime.jwks_cache_ttl seconds; an unknown kid triggers one refetch per
 * call.  At most DM_JWKS_CACHE_MAX URLs are kept: each answer names its jku,
 * and answers naming ever new URLs on the API's origin must not grow the
 * backend without bound.  Before a call that consumes a one-time code, the set at
 * {base}jwks/oauth is prefetched so that a JWKS outage does not lose
 * freshly issued tokens.
 *
 * IDENTIFICATION
 *	  src/jwks.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "guc.h"
#include "http.h"
#include "jose.h"
#include "util.h"

#include "mb/pg_wchar.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

typedef struct JwksKey
{
	char	   *kid;
	EVP_PKEY   *key;
} JwksKey;

typedef struct JwksEntry
{
	char	   *url;
	TimestampTz fetched_at;
	int			nkeys;
	JwksKey    *keys;
} JwksEntry;

static List *jwks_cache = NIL;	/* of JwksEntry *, in TopMemoryContext */

/* Key sets (jku URLs) kept at most; the API uses one. */
#define DM_JWKS_CACHE_MAX 4

/* Longest piece of an answer's header value (alg, jku, kid) repeated in a message. */
#define DM_SHOWN_MAX 100

/*
 * A header value of the answer made safe to repeat, as api.c does with the
 * API's error texts: control characters (newlines, terminal escapes) turned
 * into '?', cut to DM_SHOWN_MAX bytes of whole characters, "..." when cut.
 * The value comes from parsed JSON, so it is valid in the database encoding.
 */
static char *
shown(const char *s)
{
	int			len = strlen(s);
	int			cut = pg_mbcliplen(s, len, DM_SHOWN_MAX);
	char	   *out = palloc(cut + 4);

	memcpy(out, s, cut);
	out[cut] = '\0';
	for (unsigned char *c = (unsigned char *) out; *c; c++)
		if (*c < 0x20 || *c == 0x7f)
			*c = '?';
	if (cut < len)
		strcat(out, "...");
	return out;
}

static JwksEntry *
cache_lookup(const char *url)
{
	ListCell   *lc;

	foreach(lc, jwks_cache)
	{
		JwksEntry  *e = lfirst(lc);

		if (strcmp(e->url, url) == 0)
			return e;
	}
	return NULL;
}

static bool
entry_fresh(JwksEntry *e)
{
	return e != NULL && dm_jwks_cache_ttl > 0 &&
		!TimestampDifferenceExceeds(e->fetched_at, GetCurrentTimestamp(),
									dm_jwks_cache_ttl * 1000);
}

static void
entry_clear_keys(JwksEntry *e)
{
	for (int i = 0; i < e->nkeys; i++)
	{
		EVP_PKEY_free(e->keys[i].key);
		pfree(e->keys[i].kid);
	}
	if (e->keys)
		pfree(e->keys);
	e->keys = NULL;
	e->nkeys = 0;
}

/* Drops the entry fetched longest ago. */
static void
cache_evict_oldest(void)
{
	JwksEntry  *oldest = NULL;
	ListCell   *lc;

	foreach(lc, jwks_cache)
	{
		JwksEntry  *e = lfirst(lc);

		if (oldest == NULL || e->fetched_at < oldest->fetched_at)
			oldest = e;
	}
	if (oldest == NULL)
		return;
	jwks_cache = list_delete_ptr(jwks_cache, oldest);
	entry_clear_keys(oldest);
	pfree(oldest->url);
	pfree(oldest);
}

/* The "keys" array of a JWKS answer; NULL when the body is not a JWKS. */
static JsonbContainer *
jwks_keys(const DmHttpResponse *resp)
{
	Jsonb	   *doc = dm_json_parse(resp->body.data, resp->body.len);

	return doc ? dm_json_get_array(&doc->root, "keys") : NULL;
}

/*
 * Replaces the cached key set of url with the RSA keys in the JWKS array
 * keys; entries without a usable RSA signing key are skipped.
 */
static JwksEntry *
cache_store(const char *url, JsonbContainer *keys)
{
	int			n = JsonContainerSize(keys);
	JwksEntry  *e;
	MemoryContext old;

	old = MemoryContextSwitchTo(TopMemoryContext);
	e = cache_lookup(url);
	if (e == NULL)
	{
		while (list_length(jwks_cache) >= DM_JWKS_CACHE_MAX)
			cache_evict_oldest();
		e = palloc0(sizeof(JwksEntry));
		e->url = pstrdup(url);
		jwks_cache = lappend(jwks_cache, e);
	}
	entry_clear_keys(e);
	e->keys = palloc0(sizeof(JwksKey) * Max(n, 1));
	MemoryContextSwitchTo(old);

	for (int i = 0; i < n; i++)
	{
		JsonbValue *v = getIthJsonbValueFromContainer(keys, i);
		JsonbContainer *jwk;
		char	   *kid,
				   *pem,
				   *kty,
				   *use;
		EVP_PKEY   *key = NULL;

		if (v == NULL || v->type != jbvBinary || !dm_json_is_object(v->val.binary.data))
			continue;
		jwk = v->val.binary.data;
		kid = dm_json_get_string(jwk, "kid");
		use = dm_json_get_string(jwk, "use");
		if (kid == NULL || (use != NULL && strcmp(use, "sig") != 0))
			continue;
		if ((pem = dm_json_get_string(jwk, "pem")) != NULL)
			key = dm_public_key_from_pem(pem);
		else if ((kty = dm_json_get_string(jwk, "kty")) != NULL && strcmp(kty, "RSA") == 0)
		{
			char	   *nn = dm_json_get_string(jwk, "n");
			char	   *ee = dm_json_get_string(jwk, "e");

			if (nn && ee)
				key = dm_public_key_from_jwk(nn, ee);
		}
		if (key == NULL)
			continue;
		e->keys[e->nkeys].kid = MemoryContextStrdup(TopMemoryContext, kid);
		e->keys[e->nkeys].key = key;
		e->nkeys++;
	}
	e->fetched_at = GetCurrentTimestamp();
	return e;
}

static void
build_jwks_get(void *arg, int attempt, DmHttpRequest *req)
{
	req->method = "GET";
	req->url = (char *) arg;
}

static JwksEntry *
fetch(const char *url)
{
	DmHttpResponse resp;
	JsonbContainer *keys;

	dm_http_request(build_jwks_get, (void *) url, DM_RETRY_IDEMPOTENT, &resp);
	if (resp.status < 200 || resp.status > 299)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_VERIFICATION_FAILED),
				 errmsg("could not fetch the digi.me JWKS"),
				 errdetail_internal("GET %s answered HTTP status %ld.", shown(url), resp.status)));
	keys = jwks_keys(&resp);
	if (keys == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me JWKS is not a JSON object with a \"keys\" array"),
				 errdetail_internal("GET %s", shown(url))));
	return cache_store(url, keys);
}

void
dm_jwks_prefetch(void)
{
	char	   *url = dm_url_join(dm_base_url, "jwks/oauth");
	DmHttpResponse resp;
	JsonbContainer *keys;

	/* with no caching the verification fetches it anyway */
	if (dm_jwks_cache_ttl == 0 || entry_fresh(cache_lookup(url)))
		return;
	/* best effort: a failure here is reported by the verification itself */
	if (dm_http_try_get(url, &resp) && resp.status >= 200 && resp.status <= 299 &&
		(keys = jwks_keys(&resp)) != NULL)
		(void) cache_store(url, keys);
}

static EVP_PKEY *
find_key(JwksEntry *e, const char *kid)
{
	for (int i = 0; e != NULL && i < e->nkeys; i++)
		if (strcmp(e->keys[i].kid, kid) == 0)
			return e->keys[i].key;
	return NULL;
}

static void
verification_failed(const char *msg, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_DIGIME_VERIFICATION_FAILED),
			 errmsg("could not verify the digi.me API's answer: %s", msg),
			 detail ? errdetail_internal("%s", detail) : 0));
}

Jsonb *
dm_verify_response_token(const char *token, DmVerifyState *state)
{
	DmJws		jws;
	char	   *alg,
			   *jku,
			   *kid;
	JwksEntry  *e;
	EVP_PKEY   *key;
	double		t;
	double		now;
	bool		fetched = false;

	if (!dm_jws_parse(token, &jws))
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_MALFORMED_RESPONSE),
				 errmsg("digi.me API answered with a token that is not a compact JWS")));

	alg = dm_json_get_string(&jws.header->root, "alg");
	if (alg == NULL || strcmp(alg, "PS512") != 0)
		verification_failed("the token is not signed with PS512",
							psprintf("Header alg is %s.", alg ? shown(alg) : "missing"));
	jku = dm_json_get_string(&jws.header->root, "jku");
	kid = dm_json_get_string(&jws.header->root, "kid");
	if (jku == NULL || kid == NULL)
		verification_failed("the token header names no jku or no kid", NULL);
	if (!dm_url_same_origin(jku, dm_base_url))
		verification_failed("the token's jku is not on the API's origin",
							psprintf("jku %s is not on the origin of digime.base_url %s.",
									 shown(jku), dm_base_url));

	e = cache_lookup(jku);
	if (!entry_fresh(e))
	{
		e = fetch(jku);
		fetched = true;
	}
	key = find_key(e, kid);
	if (key == NULL && !fetched && !state->refetched)
	{
		state->refetched = true;
		e = fetch(jku);
		key = find_key(e, kid);
	}
	if (key == NULL)
		verification_failed("the token's kid is not in the JWKS",
							psprintf("kid \"%s\" is not among the %d usable keys at %s.",
									 shown(kid), e->nkeys, shown(jku)));
	if (!dm_jws_verify_ps512(key, &jws))
		verification_failed("the token's signature does not verify", NULL);

	now = (double) time(NULL);
	if (dm_json_get(&jws.payload->root, "exp") != NULL &&
		(!dm_json_get_number(&jws.payload->root, "exp", &t) || t <= now))
		verification_failed("the token has expired (exp)", NULL);
	if (dm_json_get(&jws.payload->root, "nbf") != NULL &&
		(!dm_json_get_number(&jws.payload->root, "nbf", &t) || t > now))
		verification_failed("the token is not valid yet (nbf)", NULL);

	return jws.payload;
}
