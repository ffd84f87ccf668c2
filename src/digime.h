/*-------------------------------------------------------------------------
 *
 * digime.h
 *	  Shared declarations of the digime extension: digi.me user
 *	  authorization (OAuth 2.0 with PKCE, PS512-signed request JWTs) from SQL.
 *
 * Every function here raises ERROR with a documented SQLSTATE (README.md,
 * "Errors") rather than returning failure, unless its comment says
 * otherwise.  No function puts a secret (private key, token, code,
 * code_verifier) into an error message.
 *
 * IDENTIFICATION
 *	  src/digime.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_H
#define DIGIME_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/jsonb.h"

#include <openssl/evp.h>

#ifndef DIGIME_VERSION
#define DIGIME_VERSION "1.0"
#endif

/* digime-specific SQLSTATEs (class YD, implementation-defined range) */
#define ERRCODE_DIGIME_API_ERROR			MAKE_SQLSTATE('Y','D','0','0','0')
#define ERRCODE_DIGIME_INVALID_TOKEN		MAKE_SQLSTATE('Y','D','0','0','1')
#define ERRCODE_DIGIME_INVALID_CLIENT		MAKE_SQLSTATE('Y','D','0','0','2')
#define ERRCODE_DIGIME_INVALID_REDIRECT_URI MAKE_SQLSTATE('Y','D','0','0','3')
#define ERRCODE_DIGIME_INSUFFICIENT_SCOPE	MAKE_SQLSTATE('Y','D','0','0','4')
#define ERRCODE_DIGIME_SDK_INVALID			MAKE_SQLSTATE('Y','D','0','0','5')
#define ERRCODE_DIGIME_SERVICE_AUTHORIZATION MAKE_SQLSTATE('Y','D','0','0','6')
#define ERRCODE_DIGIME_INVALID_GRANT		MAKE_SQLSTATE('Y','D','0','0','7')
#define ERRCODE_DIGIME_MALFORMED_RESPONSE	MAKE_SQLSTATE('Y','D','0','1','0')
#define ERRCODE_DIGIME_VERIFICATION_FAILED	MAKE_SQLSTATE('Y','D','0','1','1')
#define ERRCODE_DIGIME_CALLBACK_ERROR		MAKE_SQLSTATE('Y','D','0','2','0')
#define ERRCODE_DIGIME_AUTHORIZATION_EXPIRED MAKE_SQLSTATE('Y','D','0','2','1')
#define ERRCODE_DIGIME_AUTHORIZATION_USED	MAKE_SQLSTATE('Y','D','0','2','2')
#define ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED MAKE_SQLSTATE('Y','D','0','2','3')

/* ---------------------------------------------------------------------
 * digime.c — GUCs
 * ---------------------------------------------------------------------
 */
extern char *dm_base_url;			/* digime.base_url, always ends in '/' */
extern char *dm_onboard_url;		/* digime.onboard_url, always ends in '/' */
extern char *dm_ca_file;			/* digime.ca_file, "" = system CAs only */
extern int	dm_timeout_ms;			/* digime.timeout_ms: whole request */
extern int	dm_connect_timeout_ms;	/* digime.connect_timeout_ms */
extern int	dm_retry_limit;			/* digime.retry_limit: extra attempts */
extern int	dm_jwks_cache_ttl;		/* digime.jwks_cache_ttl, seconds */
extern int	dm_authorization_ttl;	/* digime.authorization_ttl, seconds */
extern int	dm_refresh_margin;		/* digime.refresh_margin, seconds */
extern char *dm_agent_name;			/* digime.agent_name */
extern char *dm_agent_version;		/* digime.agent_version */
extern char *dm_end_user;			/* digime.end_user */
extern char *dm_key_file;			/* digime.key_file (postmaster) */
extern char *dm_previous_key_file;	/* digime.previous_key_file (postmaster) */

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
 * jws.c — base64url, PS512 JWS signing and verification (OpenSSL)
 * ---------------------------------------------------------------------
 */
extern char *dm_base64url_encode(const unsigned char *data, size_t len);
/* NULL when not strict base64url (no padding, RFC 4648 §5 alphabet). */
extern unsigned char *dm_base64url_decode(const char *s, size_t len, size_t *outlen);

/* Compact JWS of header {"alg":"PS512","typ":"JWT"} and the given claims. */
extern char *dm_jws_sign_ps512(EVP_PKEY *key, const char *claims_json);

typedef struct DmJws
{
	Jsonb	   *header;
	Jsonb	   *payload;
	const char *signing_input;	/* "header.payload" */
	size_t		signing_input_len;
	unsigned char *signature;
	size_t		signature_len;
} DmJws;

/* Splits and decodes a compact JWS; false (never raises) when malformed. */
extern bool dm_jws_parse(const char *compact, DmJws *out);

/* PS512 (RSASSA-PSS, SHA-512, MGF1-SHA-512, salt 64) check; never raises. */
extern bool dm_jws_verify_ps512(EVP_PKEY *key, const DmJws *jws);

/* ---------------------------------------------------------------------
 * keys.c — RSA key handling (OpenSSL)
 * ---------------------------------------------------------------------
 */

/*
 * Parses a PEM private key (PKCS#1 or PKCS#8, unencrypted RSA >= 2048 bits).
 * On failure returns NULL and sets *why to a message naming the problem,
 * never the key.  The caller frees the key with EVP_PKEY_free.
 */
extern EVP_PKEY *dm_private_key_parse(const char *pem, const char **why);

/* Same for public keys (SPKI or PKCS#1 PEM), and RFC 7517 RSA n/e. */
extern EVP_PKEY *dm_public_key_from_pem(const char *pem);
extern EVP_PKEY *dm_public_key_from_jwk(const char *n_b64url, const char *e_b64url);

/* Lower-case hex SHA-256 of the DER SubjectPublicKeyInfo; NULL on failure. */
extern char *dm_key_fingerprint(EVP_PKEY *key);

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

/* ---------------------------------------------------------------------
 * http.c — libcurl transport inside a backend
 * ---------------------------------------------------------------------
 */
typedef enum DmRetryPolicy
{
	DM_RETRY_IDEMPOTENT,		/* retry any transient failure */
	DM_RETRY_UNPROCESSED		/* retry only what cannot have been processed */
} DmRetryPolicy;

typedef struct DmHttpRequest
{
	const char *method;			/* "GET" or "POST" */
	char	   *url;
	char	   *bearer;			/* JWS for "Authorization: Bearer", or NULL */
	char	   *body;			/* JSON body, or NULL for none */
} DmHttpRequest;

typedef struct DmHttpResponse
{
	long		status;
	StringInfoData body;
	char	   *content_type;
	char	   *x_error_code;
	char	   *x_error_message;
	char	   *x_error_reference;
	char	   *retry_after;
} DmHttpResponse;

/*
 * (Re)builds the request for attempt number "attempt" (0-based).  Called
 * before every attempt, so each one is signed afresh.
 */
typedef void (*DmHttpBuild) (void *arg, int attempt, DmHttpRequest *req);

/*
 * Performs the request with up to digime.retry_limit retries (policy as in
 * README "Retries"), honouring query cancel and statement_timeout.  Returns
 * when the API answered (any status); raises a transport error otherwise.
 */
extern void dm_http_request(DmHttpBuild build, void *arg, DmRetryPolicy policy,
							DmHttpResponse *resp);

/* One GET without retries; false (never raises) on transport failure. */
extern bool dm_http_try_get(const char *url, DmHttpResponse *resp);


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

/* ---------------------------------------------------------------------
 * jwks.c — response-token verification against the API's JWKS
 * ---------------------------------------------------------------------
 */

/* Per-call state: the JWKS is refetched on an unknown kid once per call. */
typedef struct DmVerifyState
{
	bool		refetched;
} DmVerifyState;

/*
 * Verifies a response JWS (§3.5 of the protocol, hardened: PS512 only,
 * jku on the API's origin, exp/nbf enforced) and returns its payload.
 */
extern Jsonb *dm_verify_response_token(const char *token, DmVerifyState *state);

/* Makes sure the JWKS of the configured API is cached (prefetch). */
extern void dm_jwks_prefetch(void);

/* ---------------------------------------------------------------------
 * api.c — the digi.me API calls
 * ---------------------------------------------------------------------
 */
typedef struct DmContract
{
	char	   *contract_id;
	char	   *application_id;
	EVP_PKEY   *key;			/* private key; freed with the SPI context */
} DmContract;

/* An API error answer, for callers that handle some codes themselves. */
typedef struct DmApiError
{
	const char *call;			/* API path, e.g. "oauth/token" */
	long		status;
	char	   *code;
	char	   *message;
	char	   *reference;
} DmApiError;

typedef struct DmUrlResult
{
	char	   *code;			/* preauthorization_code / reference_code */
	char	   *code_verifier;	/* NULL when the call carries no PKCE */
	Jsonb	   *session;
} DmUrlResult;

typedef struct DmUserToken
{
	char	   *access_token;
	int64		access_expires;	/* seconds since the epoch */
	char	   *refresh_token;
	int64		refresh_expires;	/* seconds since the epoch */
	char	   *user_id;		/* sub, or NULL */
	char	   *consent_id;		/* consentid, or NULL */
} DmUserToken;

/*
 * Calls with an "err" argument return false and fill *err when the API
 * answers with an error; with err == NULL they raise it.
 */
extern bool dm_api_authorize(DmContract *c, const char *callback, const char *state,
							 const char *access_token, JsonbContainer *actions,
							 DmUrlResult *out, DmApiError *err);
extern bool dm_api_token_reference(DmContract *c, const char *access_token,
								   const char *callback, const char *state,
								   JsonbContainer *actions, DmUrlResult *out,
								   DmApiError *err);
extern char *dm_api_reference(DmContract *c, const char *type, const char *value);
extern bool dm_api_exchange_code(DmContract *c, const char *code,
								 const char *code_verifier, DmUserToken *out,
								 DmApiError *err);
extern bool dm_api_refresh(DmContract *c, const char *refresh_token,
						   DmUserToken *out, DmApiError *err);
extern void dm_api_raise(const DmApiError *err, const char *hint) pg_attribute_noreturn();
extern bool dm_api_error_is(const DmApiError *err, long status, const char *code);

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

/* Longest text argument accepted (a PEM key, a callback URL, a state). */
#define DM_MAX_TEXT_ARG 16384

/* Raises 22004/22023 for NULL, empty or over-long text arguments. */
extern char *dm_arg_text(FunctionCallInfo fcinfo, int argno, const char *name);

/* ---------------------------------------------------------------------
 * crypt.c — optional envelope encryption of secrets at rest
 * ---------------------------------------------------------------------
 */
/* Loads the key files when preloading (in the postmaster). */
extern void dm_crypt_init(bool preloading);
extern bool dm_crypt_enabled(void);
/* Id of the loaded digime.key_file key, or NULL. */
extern const char *dm_crypt_key_id(void);
/* Value to store: AES-256-GCM ciphertext bound to aad, or the plaintext. */
extern char *dm_seal(const char *plain, const char *aad);
/* Plaintext of a stored value; raises if it cannot be decrypted. */
extern char *dm_open(const char *stored, const char *aad);
/* True when the stored value is sealed with the current key (or plain and no key). */
extern bool dm_sealed_current(const char *stored);
/* Wipes and frees a palloc'd secret. */
extern void dm_secret_free(char *secret);

/* ---------------------------------------------------------------------
 * store.c — extension tables, accessed as the extension owner
 * ---------------------------------------------------------------------
 */

/* One SQL-callable function's execution context (see store.c). */
typedef struct DmCall
{
	FunctionCallInfo fcinfo;
	Oid			caller;			/* current_user at entry */
	bool		caller_is_admin;	/* superuser or has the extension owner's privileges */
	Oid			owner;			/* the extension owner */
	MemoryContext outer_cxt;	/* the caller's context, for results */
	Oid			save_userid;
	int			save_sec_context;
	int			guc_nest;
} DmCall;

/*
 * Enters an SQL-callable function's body: pins search_path to
 * "pg_catalog, pg_temp", switches to the extension owner (a restricted
 * operation) and connects SPI.  dm_call_end undoes it; on error,
 * transaction abort does.
 */
extern void dm_call_begin(DmCall *call, FunctionCallInfo fcinfo);
extern void dm_call_end(DmCall *call);

/*
 * Loads a contract the caller may use: 42501 when it does not exist or is
 * not granted to the caller (42704 for an administrator).  With out NULL
 * only checks; otherwise parses the key, which is freed when the SPI
 * context goes away (also on error).
 */
extern void dm_contract_load(DmCall *call, const char *contract_id, DmContract *out);

/* Runs sql (one row) and returns it as the function's composite result, null_cols NULL. */
extern Datum dm_row_result(DmCall *call, const char *sql, int nargs, Oid *argtypes,
						   Datum *args, const char *const *null_cols);

typedef struct DmStoredToken
{
	int64		id;
	char	   *contract_id;
	char	   *access_token;	/* decrypted */
	char	   *refresh_token;	/* decrypted */
	TimestampTz access_expires_at;
	TimestampTz refresh_expires_at;
	char	   *user_id;		/* or NULL */
	char	   *consent_id;		/* or NULL */
	bool		changed_here;	/* the row was written by this transaction */
} DmStoredToken;

/* A token pair as stored: secrets sealed for their row. */
typedef struct DmSealedToken
{
	const char *access_token;
	int64		access_expires;
	const char *refresh_token;
	int64		refresh_expires;
	const char *user_id;
	const char *consent_id;
} DmSealedToken;

/*
 * Loads a token row the caller owns (42501 otherwise).  With serialize,
 * first waits for other transactions refreshing the same token (a
 * transaction-level advisory lock), so that one refresh follows another.
 */
extern void dm_token_load(DmCall *call, int64 token_id, bool serialize, DmStoredToken *out);
extern int64 dm_token_insert(DmCall *call, const char *contract_id, const DmUserToken *t,
							 const char *state, const char *account_reference);
/* state/account_reference NULL keep the stored values. */
extern void dm_token_update(DmCall *call, int64 token_id, const DmUserToken *t,
							const char *state, const char *account_reference,
							bool refreshed);
/* The UPDATE itself (SPI connected); returns the number of rows written. */
extern uint64 dm_token_write(int64 token_id, const DmSealedToken *t, const char *state,
							 const char *account_reference, bool refreshed);
/* The row as the function result: secret columns NULL. */
extern Datum dm_token_result(DmCall *call, int64 token_id);

typedef struct DmPending
{
	int64		id;
	char	   *kind;
	char	   *contract_id;
	char	   *code_verifier;	/* decrypted */
	int64		token_id;		/* 0 when none */
	char	   *status;
	bool		expired;
} DmPending;

extern void dm_pending_insert(DmCall *call, const char *kind, const char *contract_id,
							  const char *state, const char *code_verifier,
							  Jsonb *session, const char *callback, int64 token_id);
/* Finds the caller's authorization for state (locked); false if none. */
extern bool dm_pending_find(DmCall *call, const char *state, DmPending *out);
extern bool dm_pending_has_superseded(DmCall *call, const char *state);
extern void dm_pending_complete(DmCall *call, int64 pending_id, int64 token_id);

/* Refreshes the stored token through the API and stores the new pair. */
extern void dm_token_refresh(DmCall *call, DmContract *c, DmStoredToken *tok);
/* Refreshes when the access token expires within digime.refresh_margin. */
extern void dm_token_refresh_if_due(DmCall *call, DmContract *c, DmStoredToken *tok);

/* ---------------------------------------------------------------------
 * persist.c — refreshed tokens committed by a background worker
 * ---------------------------------------------------------------------
 */

/*
 * Writes and commits a refreshed pair in a transaction of its own; false
 * when it did not (the caller then writes it in its own transaction).
 */
extern bool dm_persist_refresh(Oid owner, const DmStoredToken *old, const DmSealedToken *t);

/* ---------------------------------------------------------------------
 * redact.c — keeps secrets passed as arguments out of the server log
 * ---------------------------------------------------------------------
 */
extern void dm_redact_init(void);

#endif							/* DIGIME_H */
