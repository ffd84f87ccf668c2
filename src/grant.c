/*-------------------------------------------------------------------------
 *
 * grant.c
 *	  One token-granting request — the code exchange of a callback, a
 *	  low-level code exchange, or a refresh — in the steps the worker's
 *	  engine runs: claim, call, store (or record the failure).
 *
 * The claim checks the request as the actor (the caller, or the owner of an
 * inbox row): the authorization or token must be the actor's and its
 * contract granted to the actor, exactly as the SQL functions check.  It
 * then takes a session-level advisory lock on the authorization or token
 * (without waiting: a busy one is retried by the engine), so that two
 * processes never send the same code or refresh token; within one process
 * the held keys are remembered here, since advisory locks are reentrant.
 * No row lock is held while the request is in flight.
 *
 * The store writes the token row, the authorization's new status and the
 * audit row in one transaction; a refresh's failure updates the token's
 * health (needs_reauthorization, or a counted failure with back-off).
 *
 * IDENTIFICATION
 *	  src/grant.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "grant.h"
#include "guc.h"
#include "store.h"
#include "util.h"

#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#define KEY_TOKEN			(INT64CONST(1) << 56)
#define KEY_AUTHORIZATION	(INT64CONST(2) << 56)

static List *held_keys = NIL;

static void inbox_notify(int64 inbox_id, int64 token_id, const char *status);	/* of int64 *, in TopMemoryContext */

static void
key_tag(LOCKTAG *tag, int64 key)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) ((uint64) key >> 32), (uint32) key, 1);
}

static bool
key_held_here(int64 key)
{
	ListCell   *lc;

	foreach(lc, held_keys)
		if (*(int64 *) lfirst(lc) == key)
			return true;
	return false;
}

/* Takes the session advisory lock of key without waiting. */
static bool
claim_key(DmGrant *g, int64 key)
{
	LOCKTAG		tag;
	int64	   *held;

	if (key_held_here(key))
		return false;
	key_tag(&tag, key);
	held = MemoryContextAlloc(TopMemoryContext, sizeof(int64));
	if (LockAcquire(&tag, ExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
	{
		pfree(held);
		return false;
	}
	*held = key;
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		held_keys = lappend(held_keys, held);
		MemoryContextSwitchTo(old);
	}
	g->lock_key = key;
	return true;
}

static void
release_key(int64 key)
{
	LOCKTAG		tag;
	ListCell   *lc;

	foreach(lc, held_keys)
	{
		int64	   *held = lfirst(lc);

		if (*held == key)
		{
			held_keys = foreach_delete_current(held_keys, lc);
			pfree(held);
			key_tag(&tag, key);
			LockRelease(&tag, ExclusiveLock, true);
			return;
		}
	}
}

static char *
keep(DmGrant *g, const char *s)
{
	return s ? MemoryContextStrdup(g->cxt, s) : NULL;
}

static void
keep_contract(DmGrant *g, const char *contract_id)
{
	dm_store_contract_load(&g->actor, contract_id, &g->contract, g->cxt);
	g->contract.contract_id = keep(g, g->contract.contract_id);
	g->contract.application_id = keep(g, g->contract.application_id);
}

static DmClaim
claim_callback(DmGrant *g)
{
	DmPending	p;

	if (!dm_store_authorization_find(&g->actor, g->state, &p))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("no authorization of role \"%s\" has the callback's state",
						GetUserNameFromId(g->actor.role, false)),
				 errdetail("Only the role that called digime_authorize_url or digime_reauthorize_url can complete it.")));
	if (strcmp(p.status, "completed") == 0)
	{
		/* the same callback again: the same token (an idempotent retry) */
		if (p.code_hash != NULL && strcmp(p.code_hash, dm_sha256_hex(g->code)) == 0 &&
			p.token_id != 0)
		{
			g->result_token_id = p.token_id;
			if (g->inbox_id != 0)
			{
				dm_store_inbox_finish(g->inbox_id, "done", p.token_id, NULL, NULL, 0,
									  dm_callback_without_code(g->inbox_url));
				inbox_notify(g->inbox_id, p.token_id, "done");
			}
			return DM_CLAIM_DONE;
		}
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_USED),
				 errmsg("authorization " INT64_FORMAT " was already completed", p.id)));
	}
	if (strcmp(p.status, "superseded") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED),
				 errmsg("authorization " INT64_FORMAT " was superseded by a newer one with the same state",
						p.id)));
	if (p.expired || strcmp(p.status, "expired") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_AUTHORIZATION_EXPIRED),
				 errmsg("authorization " INT64_FORMAT " has expired", p.id),
				 errdetail("Its callback came later than digime.authorization_ttl after it started."),
				 errhint("Start a new authorization.")));
	if (!claim_key(g, KEY_AUTHORIZATION | p.id))
	{
		dm_secret_free(p.code_verifier);
		return DM_CLAIM_BUSY;
	}
	g->authorization_id = p.id;
	g->reauthorize = strcmp(p.kind, "reauthorize") == 0;
	g->token_id = p.token_id;
	keep_contract(g, p.contract_id);
	g->secret = keep(g, p.code_verifier);
	dm_secret_free(p.code_verifier);
	return DM_CLAIM_SEND;
}

static DmClaim
claim_refresh(DmGrant *g)
{
	DmStoredToken t;
	TimestampTz due;

	dm_store_token_load(&g->actor, g->token_id, true, DM_READ_CURRENT, false, &t);
	if (strcmp(t.status, "revoked") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_TOKEN_REVOKED),
				 errmsg("user access token " INT64_FORMAT " was revoked", g->token_id)));
	if (strcmp(t.status, "needs_reauthorization") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DIGIME_NEEDS_REAUTHORIZATION),
				 errmsg("user access token " INT64_FORMAT " needs reauthorization", g->token_id),
				 errdetail("digi.me refused its refresh token."),
				 errhint("Send the user to the URL of digime_reauthorize_url(" INT64_FORMAT ", callback).",
						 g->token_id)));
	due = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), Max(g->within_ms, 0));
	if (g->within_ms >= 0 && t.access_expires_at > due)
	{
		g->skipped = true;
		g->result_token_id = g->token_id;
		dm_secret_free(t.access_token);
		dm_secret_free(t.refresh_token);
		return DM_CLAIM_DONE;
	}
	if (!claim_key(g, KEY_TOKEN | g->token_id))
	{
		dm_secret_free(t.access_token);
		dm_secret_free(t.refresh_token);
		return DM_CLAIM_BUSY;
	}
	g->token_owner = t.owner_role;
	keep_contract(g, t.contract_id);
	g->secret = keep(g, t.refresh_token);
	dm_secret_free(t.access_token);
	dm_secret_free(t.refresh_token);
	return DM_CLAIM_SEND;
}

DmClaim
dm_grant_claim(DmGrant *g)
{
	switch (g->kind)
	{
		case DM_GRANT_CALLBACK:
			return claim_callback(g);
		case DM_GRANT_EXCHANGE_CODE:
			keep_contract(g, g->contract_id);
			g->secret = keep(g, g->code_verifier);
			return DM_CLAIM_SEND;
		case DM_GRANT_REFRESH:
			return claim_refresh(g);
	}
	return DM_CLAIM_DONE;		/* not reached */
}

DmApiCall *
dm_grant_call(DmGrant *g)
{
	MemoryContext old = MemoryContextSwitchTo(g->cxt);
	DmApiCall  *call;

	if (g->kind == DM_GRANT_REFRESH)
		call = dm_api_refresh_call(&g->contract, g->secret);
	else
		call = dm_api_exchange_call(&g->contract, g->code, g->secret);
	MemoryContextSwitchTo(old);
	return call;
}

void
dm_grant_answer(DmGrant *g, DmApiCall *call, DmHttpResponse *resp)
{
	DmUserToken t;
	DmApiError	err;
	MemoryContext old;

	g->http_status = resp->status;
	if (!dm_api_token_answer(call, resp, &t, &err))
	{
		/* the code of an older, superseded authorization fails PKCE */
		if (g->kind == DM_GRANT_CALLBACK && strcmp(err.code, "InvalidGrant") == 0 &&
			dm_store_authorization_superseded(&g->actor, g->state))
			ereport(ERROR,
					(errcode(ERRCODE_DIGIME_AUTHORIZATION_SUPERSEDED),
					 errmsg("the callback belongs to an authorization that was superseded"),
					 errdetail("digi.me refused the code for the newest authorization with this state (%s: %s).",
							   err.code, err.message),
					 errhint("The user must finish the newest authorization URL.")));
		if (g->kind == DM_GRANT_REFRESH &&
			(strcmp(err.code, "InvalidToken") == 0 || strcmp(err.code, "InvalidGrant") == 0))
			dm_api_raise(&err,
						 psprintf("The refresh token of user access token " INT64_FORMAT
								  " is no longer valid: the user must reauthorize, "
								  "see digime_reauthorize_url(" INT64_FORMAT ", callback).",
								  g->token_id, g->token_id));
		dm_api_raise(&err, NULL);
	}
	old = MemoryContextSwitchTo(g->cxt);
	g->token.access_token = pstrdup(t.access_token);
	g->token.refresh_token = pstrdup(t.refresh_token);
	g->token.access_expires = t.access_expires;
	g->token.refresh_expires = t.refresh_expires;
	g->token.user_id = t.user_id ? pstrdup(t.user_id) : NULL;
	g->token.consent_id = t.consent_id ? pstrdup(t.consent_id) : NULL;
	MemoryContextSwitchTo(old);
	dm_secret_free(t.access_token);
	dm_secret_free(t.refresh_token);
	g->have_token = true;
}

static const char *
action_of(const DmGrant *g)
{
	return g->kind == DM_GRANT_REFRESH ? g->audit_action : "exchange";
}

static Oid
audit_role(const DmGrant *g)
{
	return g->audit_as_owner && OidIsValid(g->token_owner) ? g->token_owner : g->actor.role;
}

static char *
reference_of(const DmGrant *g)
{
	if (g->inbox_id != 0)
		return psprintf("inbox " INT64_FORMAT, g->inbox_id);
	if (g->authorization_id != 0)
		return psprintf("authorization " INT64_FORMAT, g->authorization_id);
	return NULL;
}

/* NOTIFY digime_token, '{"inbox_id": .., "token_id": .., "status": ..}' */
static void
inbox_notify(int64 inbox_id, int64 token_id, const char *status)
{
	StringInfoData js;
	bool		first = true;

	initStringInfo(&js);
	appendStringInfoChar(&js, '{');
	dm_json_member_int64(&js, &first, "inbox_id", inbox_id);
	if (token_id != 0)
		dm_json_member_int64(&js, &first, "token_id", token_id);
	else
		appendStringInfoString(&js, ",\"token_id\":null");
	dm_json_member_string(&js, &first, "status", status);
	appendStringInfoChar(&js, '}');
	dm_store_notify(js.data);
}

/* A failed inbox row: retried later when transient and attempts remain. */
static void
inbox_failed(DmGrant *g, const ErrorData *e)
{
	int			attempts = g->inbox_attempts + 1;
	char	   *url = dm_callback_without_code(g->inbox_url);

	if (dm_grant_transient(g, e->sqlerrcode) && attempts < dm_inbox_max_attempts)
	{
		/* back-off: 2 s doubling per attempt, at most 5 minutes; the code stays */
		int64		delay_ms = Min(INT64CONST(2000) << Min(attempts - 1, 16), 300000);

		dm_store_inbox_finish(g->inbox_id, "pending", 0, unpack_sql_state(e->sqlerrcode),
							  e->message,
							  TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms),
							  g->inbox_url);
		g->inbox_retry = true;
		return;
	}
	dm_store_inbox_finish(g->inbox_id, "failed", 0, unpack_sql_state(e->sqlerrcode),
						  e->message, 0, url);
	inbox_notify(g->inbox_id, 0, "failed");
}

void
dm_grant_store(DmGrant *g)
{
	DmAudit		audit;

	Assert(g->have_token);
	switch (g->kind)
	{
		case DM_GRANT_CALLBACK:
			if (g->reauthorize && dm_store_token_lock(g->token_id) &&
				dm_store_token_update(g->token_id, &g->token, false, g->account_reference))
				g->result_token_id = g->token_id;
			else
				/* a new authorization, or its token row was deleted meanwhile */
				g->result_token_id = dm_store_token_insert(&g->actor, g->contract.contract_id,
														   &g->token, g->state,
														   g->account_reference);
			dm_store_authorization_complete(g->authorization_id, g->result_token_id,
											dm_sha256_hex(g->code));
			break;
		case DM_GRANT_EXCHANGE_CODE:
			g->result_token_id = dm_store_token_insert(&g->actor, g->contract.contract_id,
													   &g->token, NULL, NULL);
			break;
		case DM_GRANT_REFRESH:
			if (!dm_store_token_lock(g->token_id) ||
				!dm_store_token_update(g->token_id, &g->token, true, NULL))
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_OBJECT),
						 errmsg("user access token " INT64_FORMAT " was deleted during its refresh",
								g->token_id)));
			g->result_token_id = g->token_id;
			break;
	}
	memset(&audit, 0, sizeof(audit));
	audit.role = audit_role(g);
	audit.action = action_of(g);
	audit.contract_id = g->contract.contract_id;
	audit.token_id = g->result_token_id;
	audit.ok = true;
	audit.reference = reference_of(g);
	dm_store_audit(&audit);
	if (g->inbox_id != 0)
	{
		dm_store_inbox_finish(g->inbox_id, "done", g->result_token_id, NULL, NULL, 0,
							  dm_callback_without_code(g->inbox_url));
		inbox_notify(g->inbox_id, g->result_token_id, "done");
	}
}

bool
dm_grant_transient(const DmGrant *g, int sqlerrcode)
{
	return ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_CONNECTION_EXCEPTION ||
		sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE ||
		sqlerrcode == ERRCODE_QUERY_CANCELED ||
		sqlerrcode == ERRCODE_DIGIME_WORKER_LOST ||
		g->http_status == 429 || g->http_status >= 500;
}

void
dm_grant_failed(DmGrant *g, const ErrorData *e)
{
	DmAudit		audit;
	char	   *reference = reference_of(g);

	/* token health, once the refresh token may have been used */
	if (g->kind == DM_GRANT_REFRESH && g->lock_key != 0)
			dm_store_token_failed(g->token_id,
							  e->sqlerrcode == ERRCODE_DIGIME_INVALID_TOKEN ||
							  e->sqlerrcode == ERRCODE_DIGIME_INVALID_GRANT,
							  unpack_sql_state(e->sqlerrcode), e->message);
	if (g->inbox_id != 0)
		inbox_failed(g, e);
	memset(&audit, 0, sizeof(audit));
	audit.role = audit_role(g);
	audit.action = action_of(g);
	audit.contract_id = g->contract.contract_id ? g->contract.contract_id : g->contract_id;
	audit.token_id = g->kind == DM_GRANT_REFRESH ? g->token_id : 0;
	audit.ok = false;
	audit.sqlstate = unpack_sql_state(e->sqlerrcode);
	audit.reference = reference;
	dm_store_audit(&audit);
}

void
dm_grant_release(DmGrant *g)
{
	if (g->lock_key != 0)
		release_key(g->lock_key);
	g->lock_key = 0;
	dm_secret_free(g->secret);
	g->secret = NULL;
	if (g->have_token)
	{
		dm_secret_free(g->token.access_token);
		dm_secret_free(g->token.refresh_token);
		g->have_token = false;
	}
}
