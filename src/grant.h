/*-------------------------------------------------------------------------
 *
 * grant.h
 *	  One token-granting request (grant.c): a code exchange or a refresh,
 *	  in the steps the worker's engine runs: claim (a transaction), the
 *	  API call (no transaction), then store or record the failure (a
 *	  transaction each).
 *
 * IDENTIFICATION
 *	  src/grant.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_GRANT_H
#define DIGIME_GRANT_H

#include "digime.h"
#include "api.h"

typedef enum DmGrantKind
{
	DM_GRANT_CALLBACK,			/* a callback's code, for a pending authorization */
	DM_GRANT_EXCHANGE_CODE,		/* a code and verifier the application kept */
	DM_GRANT_REFRESH
} DmGrantKind;

typedef struct DmGrant
{
	DmGrantKind kind;
	DmActor		actor;
	MemoryContext cxt;			/* the grant's memory, and its contract key */

	/* what was asked */
	const char *state;			/* callback */
	const char *code;			/* callback, exchange_code */
	const char *account_reference;	/* callback */
	int64		inbox_id;		/* callback from the inbox, else 0 */
	const char *inbox_url;		/* its callback URL */
	int			inbox_attempts; /* attempts before this one */
	bool		inbox_retry;	/* failed: the row waits for another attempt */
	const char *contract_id;	/* exchange_code */
	const char *code_verifier;	/* exchange_code */
	int64		token_id;		/* refresh */
	int64		within_ms;		/* refresh: only when expiring within (-1: always) */
	const char *audit_action;	/* refresh: refresh, refresh_automatic, refresh_batch */
	bool		audit_as_owner; /* audit rows name the token's owner (the worker's own refreshes) */

	/* claimed */
	DmContract	contract;
	int64		authorization_id;
	bool		reauthorize;	/* the authorization updates token_id */
	char	   *secret;			/* code_verifier or refresh token */
	int64		lock_key;		/* advisory lock held, 0 when none */
	Oid			token_owner;	/* refresh: the token's owner_role */

	/* outcome */
	long		http_status;	/* of the last answer, 0 when none */
	DmUserToken token;			/* the issued token, once parsed */
	bool		have_token;
	int64		result_token_id;
	bool		skipped;		/* refresh: no longer due, nothing sent */
} DmGrant;

typedef enum DmClaim
{
	DM_CLAIM_SEND,				/* claimed: send the call */
	DM_CLAIM_DONE,				/* answered without sending (repeat, not due) */
	DM_CLAIM_BUSY				/* another process holds the claim: try later */
} DmClaim;

/* In a transaction: checks the request and claims it; raises its error. */
extern DmClaim dm_grant_claim(DmGrant *g);

/* The API call of a claimed grant. */
extern DmApiCall *dm_grant_call(DmGrant *g);

/*
 * In a transaction: reads the answer (true: g->token set).  An API error
 * answer is raised with its SQLSTATE (YD023 for the code of a superseded
 * authorization, a HINT for a dead refresh token).
 */
extern void dm_grant_answer(DmGrant *g, DmApiCall *call, DmHttpResponse *resp);

/*
 * In a transaction: stores g->token with the authorization's new status
 * and the audit row.  Raises 55P03 when a row it needs is locked (the
 * engine retries; the token stays in g).
 */
extern void dm_grant_store(DmGrant *g);

/*
 * In a transaction: records a failure (token health, audit row; an inbox
 * row is retried after a transient failure, up to digime.inbox_max_attempts,
 * else marked failed).
 */
extern void dm_grant_failed(DmGrant *g, const ErrorData *e);

/* Whether a failure is worth retrying later (transport, 429/5xx, a lock). */
extern bool dm_grant_transient(const DmGrant *g, int sqlerrcode);

/* Releases the claim and wipes the grant's secrets. */
extern void dm_grant_release(DmGrant *g);

#endif							/* DIGIME_GRANT_H */
