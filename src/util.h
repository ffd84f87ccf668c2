/*-------------------------------------------------------------------------
 *
 * util.h
 *	  Leaf helpers: JSON (json.c), URLs (url.c), random strings and PKCE
 *	  (random.c), argument validation (validate.c), log redaction
 *	  (redact.c).  None of them touches a table or the network.
 *
 * IDENTIFICATION
 *	  src/util.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_UTIL_H
#define DIGIME_UTIL_H

#include "digime.h"

/* ---------------------------------------------------------------------
 * json.c — JSON in and out through PostgreSQL's parser and jsonb
 * ---------------------------------------------------------------------
 */

/* Parses untrusted JSON; NULL if it is not valid JSON (never raises). */
extern Jsonb *dm_json_parse(const char *buf, size_t len);

/* Member of an object container, or NULL when absent or not an object. */
extern JsonbValue *dm_json_get(JsonbContainer *obj, const char *key);

/* String member as a palloc'd C string; NULL when absent or not a string. */
extern char *dm_json_get_string(JsonbContainer *obj, const char *key);

/* Numeric member as double; false when absent or not a number. */
extern bool dm_json_get_number(JsonbContainer *obj, const char *key, double *out);

/* Object/array member's container; NULL when absent or of another type. */
extern JsonbContainer *dm_json_get_object(JsonbContainer *obj, const char *key);
extern JsonbContainer *dm_json_get_array(JsonbContainer *obj, const char *key);

/* True when the container is an object (not an array or scalar). */
extern bool dm_json_is_object(JsonbContainer *c);

/* Appends compact JSON (no insignificant whitespace) of a jsonb value. */
extern void dm_json_append_compact(StringInfo out, JsonbContainer *c);

/* Appends "key":"value" / "key":number to an object being written. */
extern void dm_json_member_string(StringInfo out, bool *first, const char *key, const char *value);
extern void dm_json_member_int64(StringInfo out, bool *first, const char *key, int64 value);

/* ---------------------------------------------------------------------
 * url.c — URLs: configured endpoints, origin checks, form encoding
 * ---------------------------------------------------------------------
 */

/* True when url parses and is https, or http to a loopback address. */
extern bool dm_url_allowed(const char *url, const char **why);
/* True when both URLs have the same scheme, host and port. */
extern bool dm_url_same_origin(const char *a, const char *b);
/* base + relative path, e.g. ("https://h/v1.7/", "oauth/token"). */
extern char *dm_url_join(const char *base, const char *path);

/* application/x-www-form-urlencoded value (WHATWG URLSearchParams). */
extern void dm_form_append(StringInfo query, const char *name, const char *value);
/* ECMAScript encodeURIComponent. */
extern char *dm_uri_component(const char *s);

/* Decoded query-string parameter list. */
typedef struct DmQueryParam
{
	char	   *name;
	char	   *value;
} DmQueryParam;
/* Parses the query of a URL (or a bare query string); raises 22023. */
extern List *dm_query_parse(const char *url_or_query);

/* The parameters of a digi.me callback (protocol §5). */
typedef struct DmCallback
{
	bool		success;
	char	   *error_code;		/* success=false: errorCode, or NULL */
	char	   *state;
	char	   *code;
	char	   *account_reference;	/* or NULL */
} DmCallback;

/*
 * Parses and checks a callback URL (or query string): 22023 when a
 * parameter is missing, repeated, not text or too long.  success=false
 * parses (the caller decides what it means).
 */
extern void dm_callback_parse(const char *url, DmCallback *out);

/* Raises YD020 (message and DETAIL with errorCode) for a callback with success=false. */
extern void dm_callback_check_success(const DmCallback *cb);

/* Copy of a callback URL with the value of its "code" parameter removed. */
extern char *dm_callback_without_code(const char *url);

/* ---------------------------------------------------------------------
 * random.c — nonces, PKCE (RFC 7636 S256)
 * ---------------------------------------------------------------------
 */
#define DM_NONCE_LEN 32
/* len characters from [a-zA-Z0-9], uniform, from pg_strong_random. */
extern char *dm_random_alnum(int len);
/* 43-char code_verifier: base64url of 32 random alphanumerics (SDK form). */
extern char *dm_pkce_verifier(void);
/* base64url(SHA-256(ASCII verifier)), 43 chars. */
extern char *dm_pkce_challenge(const char *verifier);
/* Lower-case hex SHA-256 of a string (for code hashes). */
extern char *dm_sha256_hex(const char *s);

/* ---------------------------------------------------------------------
 * validate.c — argument validation (SDK rules, stricter)
 * ---------------------------------------------------------------------
 */
extern void dm_validate_session_options(Jsonb *opts);
extern void dm_validate_sample_data(Jsonb *sample);
extern void dm_validate_sources_scope(Jsonb *scope);
extern void dm_validate_locale(const char *locale);
extern void dm_validate_callback(const char *callback);
extern void dm_validate_user_access_token(Jsonb *token);
extern void dm_validate_state(const char *state);
extern void dm_validate_id(const char *name, const char *id);

/* Raises 22004/22023 for NULL, empty or over-long text arguments. */
extern char *dm_arg_text(FunctionCallInfo fcinfo, int argno, const char *name);
/* Optional text argument: NULL when SQL NULL; "" is refused (22023). */
extern char *dm_arg_opt_text(FunctionCallInfo fcinfo, int argno, const char *name);
/* A bigint id argument; 22004 when NULL. */
extern int64 dm_arg_id(FunctionCallInfo fcinfo, int argno, const char *name);
/* An interval argument in milliseconds (no months); 22004/22023. */
extern int64 dm_arg_interval_ms(FunctionCallInfo fcinfo, int argno, const char *name);

/* ---------------------------------------------------------------------
 * shown.c — outside text made safe to repeat in messages
 * ---------------------------------------------------------------------
 */
/*
 * A palloc'd copy of s with control characters (newlines, terminal escapes)
 * turned into '?', and every non-ASCII byte too when s is not valid in the
 * database encoding; cut to at most max bytes (max > 3) of whole
 * characters, ending in "..." when cut.
 */
extern char *dm_shown(const char *s, int max);

/* ---------------------------------------------------------------------
 * redact.c — keeps secrets passed as arguments out of the server log
 * ---------------------------------------------------------------------
 */
extern void dm_redact_init(void);

/* ---------------------------------------------------------------------
 * hint.c — a HINT for PostgreSQL's permission errors on digime's objects
 * ---------------------------------------------------------------------
 */
extern void dm_hint_init(void);

#endif							/* DIGIME_UTIL_H */
