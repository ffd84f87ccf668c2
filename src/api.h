/*-------------------------------------------------------------------------
 *
 * api.h
 *	  The digi.me API calls of the authorization flow (api.c): building
 *	  and signing the requests, parsing and verifying the answers, and
 *	  mapping error answers to SQLSTATEs.
 *
 * IDENTIFICATION
 *	  src/api.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_API_H
#define DIGIME_API_H

#include "digime.h"
#include "http.h"

#include <openssl/evp.h>

typedef struct DmContract
{
	char	   *contract_id;
	char	   *application_id;
	EVP_PKEY   *key;			/* private key (keycache.c reference) */
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
	int64		access_expires; /* seconds since the epoch */
	char	   *refresh_token;
	int64		refresh_expires;	/* seconds since the epoch */
	char	   *user_id;		/* sub, or NULL */
	char	   *consent_id;		/* consentid, or NULL */
} DmUserToken;

/*
 * Blocking calls (backends).  With an "err" argument they return false and
 * fill *err when the API answers with an error; with err == NULL they raise.
 */
extern bool dm_api_authorize(DmContract *c, const char *callback, const char *state,
							 const char *access_token, JsonbContainer *actions,
							 DmUrlResult *out, DmApiError *err);
extern bool dm_api_token_reference(DmContract *c, const char *access_token,
								   const char *callback, const char *state,
								   JsonbContainer *actions, DmUrlResult *out,
								   DmApiError *err);
extern char *dm_api_reference(DmContract *c, const char *type, const char *value);

/*
 * Token-granting calls (POST oauth/token), performed by the worker's multi
 * driver: dm_api_*_call builds the call, dm_api_build signs each attempt
 * (a DmHttpBuild), dm_api_token_answer reads the answer.
 */
typedef struct DmApiCall DmApiCall;

extern DmApiCall *dm_api_exchange_call(DmContract *c, const char *code, const char *code_verifier);
extern DmApiCall *dm_api_refresh_call(DmContract *c, const char *refresh_token);
extern void dm_api_build(void *call, int attempt, DmHttpRequest *req);
extern const DmRetryPolicy dm_api_token_policy;

/*
 * The token of an answer: true and *out on success; false and *err for an
 * API error answer; raises YD010/YD011 for a malformed or unverifiable one.
 */
extern bool dm_api_token_answer(DmApiCall *call, DmHttpResponse *resp, DmUserToken *out,
								DmApiError *err);

/* Raises an API error with its SQLSTATE (README, "Errors"). */
extern void dm_api_raise(const DmApiError *err, const char *hint) pg_attribute_noreturn();
extern bool dm_api_error_is(const DmApiError *err, long status, const char *code);
/* True for error answers that say the request was not processed (429, 5xx). */
extern bool dm_api_error_transient(const DmApiError *err);

#endif							/* DIGIME_API_H */
