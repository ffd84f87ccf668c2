/*-------------------------------------------------------------------------
 *
 * store.h
 *	  The extension's tables (store.c): rows only.  Every function runs
 *	  inside an SPI connection of the caller (a SQL function's DmCall, or a
 *	  worker transaction), as the extension owner, and neither begins nor
 *	  commits a transaction, nor talks to the network.  Rows of the actor
 *	  only, unless the actor is an administrator.
 *
 * IDENTIFICATION
 *	  src/store.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_STORE_H
#define DIGIME_STORE_H

#include "digime.h"
#include "api.h"

#include "access/tupdesc.h"
#include "executor/spi.h"

/*
 * The extension owner; 55000 when the extension is missing, or older than
 * this library (then the HINT says ALTER EXTENSION digime UPDATE).
 */
extern Oid	dm_store_extension_owner(void);

/* ---------------------------------------------------------------------
 * Contracts
 * ---------------------------------------------------------------------
 */

/*
 * Loads a contract the actor may use: 42501 when it does not exist or is
 * not granted to the actor (42704 for an administrator).  With out NULL
 * only checks; otherwise its key comes from keycache.c, held by key_owner.
 */
extern void dm_store_contract_load(const DmActor *a, const char *contract_id, DmContract *out,
								   MemoryContext key_owner);

/* Administration; each raises 42704 for an unknown contract (23505 on add). */
extern void dm_store_contract_add(const char *contract_id, const char *application_id,
								  const char *sealed_key, int bits, const char *fingerprint);
extern void dm_store_contract_rotate(const char *contract_id, const char *sealed_key, int bits,
									 const char *fingerprint);
/* Deletes the contract (its tokens with cascade, else 2BP01); returns its grantees. */
extern List *dm_store_contract_drop(const char *contract_id, bool cascade);
extern void dm_store_grant_add(const char *contract_id, Oid role);
extern void dm_store_grant_remove(const char *contract_id, Oid role);
extern bool dm_store_role_has_grants(Oid role);
/* Runs digime._role_privileges(role, grant) (the list lives in the SQL script). */
extern void dm_store_role_privileges(Oid role, bool grant);
/* contracts_info row of a contract, left in SPI_tuptable. */
extern void dm_store_contract_info(const char *contract_id);

/* Rewrites secrets not sealed with the current key; returns how many changed. */
extern uint64 dm_store_reencrypt_secrets(void);

/* ---------------------------------------------------------------------
 * User access tokens
 * ---------------------------------------------------------------------
 */
typedef struct DmStoredToken
{
	int64		id;
	char	   *contract_id;
	Oid			owner_role;
	char	   *end_user;		/* or NULL */
	char	   *access_token;	/* decrypted; NULL unless loaded with secrets, or revoked */
	char	   *refresh_token;	/* idem */
	TimestampTz access_expires_at;
	TimestampTz refresh_expires_at;
	char	   *user_id;		/* or NULL */
	char	   *consent_id;		/* or NULL */
	char	   *status;			/* active, needs_reauthorization, revoked */
	TimestampTz next_refresh_at;	/* 0 when not backing off */
	bool		changed_here;	/* written by the current transaction */
} DmStoredToken;

/* How a token is read: the statement's snapshot, or the latest committed state. */
typedef enum DmRead
{
	DM_READ_CURRENT,
	DM_READ_LATEST
} DmRead;

/*
 * Loads a token row the actor owns: 42501 otherwise (42704 for an
 * administrator).  with_secrets decrypts the two tokens.  Returns false
 * (only when missing_ok) when there is no such row.
 */
extern bool dm_store_token_load(const DmActor *a, int64 token_id, bool with_secrets, DmRead read,
								bool missing_ok, DmStoredToken *out);

/*
 * Locks a token row (its status after any wait: active, needs_reauthorization,
 * revoked), NULL when there is none.
 */
extern char *dm_store_token_lock(int64 token_id);

/* Inserts a new token of the actor; returns its id. */
extern int64 dm_store_token_insert(const DmActor *a, const char *contract_id, const DmUserToken *t,
								   const char *state, const char *account_reference);

/*
 * A new pair for an existing row: a refresh (refreshed_at set, failures
 * reset) or a reauthorization (account_reference kept when NULL); status
 * becomes active.  Returns false when the row is gone.
 */
extern bool dm_store_token_update(int64 token_id, const DmUserToken *t, bool refreshed,
								  const char *account_reference);

/*
 * Records a failed refresh: needs_reauthorization, or a failure counted
 * and backed off (30 s doubling per failure, at most an hour).
 */
extern void dm_store_token_failed(int64 token_id, bool needs_reauthorization, const char *sqlstate,
								  const char *message);

/* Marks a token revoked and clears its secrets; false when there is none (or it was already). */
extern bool dm_store_token_revoke(int64 token_id);

/* The token row (secrets included) left in SPI_tuptable, read as "read". */
extern bool dm_store_token_row(int64 token_id, DmRead read);

/*
 * Tokens of the actor whose access token expires within within_ms: the
 * ones to refresh (active, refresh token valid, not backing off; at most
 * max_tokens when >= 0), oldest expiry first, and how many others there are.
 */
extern List *dm_store_tokens_expiring(const DmActor *a, int64 within_ms, int64 max_tokens,
									  int64 *skipped);

/* ---------------------------------------------------------------------
 * Authorizations
 * ---------------------------------------------------------------------
 */
typedef struct DmPending
{
	int64		id;
	char	   *kind;			/* authorize, reauthorize */
	char	   *contract_id;
	char	   *code_verifier;	/* decrypted; NULL once finished */
	int64		token_id;		/* 0 when none */
	char	   *status;
	bool		expired;		/* pending but past expires_at */
	char	   *code_hash;		/* of the code that completed it, or NULL */
} DmPending;

/* Records a pending authorization (superseding the actor's pending one with the same state). */
extern int64 dm_store_pending_insert(const DmActor *a, const char *kind, const char *contract_id,
									 const char *state, const char *code_verifier, Jsonb *session,
									 const char *callback, int64 token_id, int ttl_s);

/*
 * The actor's authorization for a state: the pending one, else the newest.
 * 22023 when the actor has no end user and the state is pending for
 * several end users.  False when there is none.
 */
extern bool dm_store_authorization_find(const DmActor *a, const char *state, DmPending *out);
extern bool dm_store_authorization_superseded(const DmActor *a, const char *state);
/* Completes an authorization (whatever it became meanwhile). */
extern void dm_store_authorization_complete(int64 id, int64 token_id, const char *code_hash);
/* Marks a pending authorization expired. */
extern void dm_store_authorization_expire(int64 id);

/* ---------------------------------------------------------------------
 * Callback inbox
 * ---------------------------------------------------------------------
 */
typedef struct DmInboxRow
{
	int64		id;
	Oid			owner_role;
	char	   *end_user;
	char	   *callback_url;
	int			attempts;
} DmInboxRow;

/* Due pending rows (of role, or all when role is InvalidOid), at most limit. */
extern List *dm_store_inbox_due(Oid role, int limit, const List *exclude_ids);
/* Queues a callback URL for role (the trigger checks it); returns its id. */
extern int64 dm_store_inbox_insert(Oid role, const char *end_user, const char *callback_url);
/* Finishes a row: done (token_id), failed, or pending again until retry_at. */
extern void dm_store_inbox_finish(int64 id, const char *status, int64 token_id,
								  const char *sqlstate, const char *message,
								  TimestampTz retry_at, const char *callback_url);

/* ---------------------------------------------------------------------
 * Audit trail and retention
 * ---------------------------------------------------------------------
 */
typedef struct DmAudit
{
	Oid			role;
	const char *action;
	const char *contract_id;	/* or NULL */
	int64		token_id;		/* 0 when none */
	bool		ok;
	const char *sqlstate;		/* errors */
	const char *reference;		/* or NULL */
} DmAudit;

extern void dm_store_audit(const DmAudit *audit);

/*
 * One round of retention, at most limit rows per kind: expires pending
 * authorizations, deletes finished ones, inbox rows and revoked tokens
 * older than retention_s and audit rows older than audit_retention_s.
 * Returns rows changed; *more when a kind had more than limit.
 */
extern uint64 dm_store_purge(int retention_s, int audit_retention_s, int limit,
							 uint64 *expired, bool *more);

/* NOTIFY digime_token with a JSON payload. */
extern void dm_store_notify(const char *payload);

#endif							/* DIGIME_STORE_H */
