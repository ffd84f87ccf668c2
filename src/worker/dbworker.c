/*-------------------------------------------------------------------------
 *
 * dbworker.c
 *	  The task engine of the digime worker, and the per-database worker.
 *
 * The per-database worker (started by the launcher) serves the request
 * slots of its database, processes the callback inbox, runs automatic
 * refresh and retention.  The one-shot worker (oneshot.c) runs the same
 * engine for a single slot.
 *
 * Every request becomes a task.  A token-granting task (grant.c) moves
 *		CLAIM -> IN FLIGHT -> STORE -> done, or -> FAIL -> done
 * where CLAIM, STORE and FAIL are short transactions of their own and the
 * API call runs in the libcurl multi driver (http_multi.c) while other
 * tasks go on; a batch (refresh of expiring tokens, an inbox round) is a
 * task whose children are such tasks, at most "concurrency" at once.
 * No transaction is open while a request is in flight, no step waits on a
 * lock for more than a moment (lock_timeout 20 ms; a busy row or claim is
 * retried until digime.worker_lock_timeout, then 55P03 for the caller),
 * and a token that digi.me issued is stored even when its caller is gone:
 * a store that keeps meeting a locked row is retried until it succeeds.
 *
 * Memory: each task has its own context, deleted when it ends; the loop's
 * scratch context is reset every turn; transactions free their own.
 *
 * IDENTIFICATION
 *	  src/worker/dbworker.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "grant.h"
#include "guc.h"
#include "http.h"
#include "jose.h"
#include "store.h"
#include "util.h"
#include "worker/internal.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

PGDLLEXPORT void digime_dbworker_main(Datum arg);

#define SHUTDOWN_GRACE_MS	3000
#define BUSY_RETRY_MS		20
#define STORE_RETRY_MS		50
#define PURGE_BATCH			1000
#define INBOX_BATCH			64

typedef enum TaskKind
{
	TK_GRANT,					/* one exchange or refresh */
	TK_BATCH,					/* refresh of expiring tokens */
	TK_INBOX,					/* a round of the callback inbox */
	TK_PURGE,					/* retention */
	TK_AUDIT					/* an audit row */
} TaskKind;

typedef enum TaskState
{
	TS_CLAIM,
	TS_IN_FLIGHT,
	TS_STORE,
	TS_FAIL,
	TS_CHILDREN,
	TS_DONE
} TaskState;

typedef struct Task
{
	dlist_node	node;
	MemoryContext cxt;
	TaskKind	kind;
	TaskState	state;
	DmSlot	   *slot;			/* the backend's request, or NULL */
	struct Task *parent;		/* batch or inbox round */
	DmRequestArgs args;
	TimestampTz wake_at;		/* next step not before */
	TimestampTz deadline;		/* of a lock wait */
	DmGrant		grant;
	DmApiCall  *call;
	DmHttpXfer *xfer;
	ErrorData  *error;			/* the outcome, when failed */
	int			fail_tries;
	/* batch and inbox round */
	bool		periodic;		/* the worker's own inbox round */
	List	   *todo;			/* int64 * token ids, or DmInboxRow * */
	int			children;		/* running */
	int64		counts[4];
	int64		total;
} Task;

static dlist_head tasks = DLIST_STATIC_INIT(tasks);
static MemoryContext engine_cxt = NULL;
static DmEngineMode engine_mode;
static volatile sig_atomic_t got_sigterm = false;
static TimestampTz shutdown_at = 0;
static int	inflight = 0;		/* grants in flight (transfers) */
static bool inbox_round_running = false;
static bool inbox_wanted = true;
static TimestampTz next_periodic = 0;
static TimestampTz next_auto_refresh = 0;
static Oid	extension_oid = InvalidOid;

static void finish(Task *t, bool ok);

/* ---------------------------------------------------------------------
 * Process setup
 * ---------------------------------------------------------------------
 */

static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	got_sigterm = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * SIGINT keeps PostgreSQL's handler: lock_timeout works by signalling it.
 * A cancel between steps is ignored (the loop clears it); one during a step
 * fails that step, which is then retried or recorded like any failure.
 */
void
dm_worker_process_init(void)
{
	pqsignal(SIGTERM, handle_sigterm);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
}

/*
 * Session settings of a worker, once connected: statements name every
 * object with its schema, and no statement waits on a lock for more than a
 * moment (a busy row is retried; see the top of this file).
 */
static void
worker_session_settings(void)
{
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_SUSET,
							 PGC_S_OVERRIDE, GUC_ACTION_SET, true, 0, false);
	(void) set_config_option("lock_timeout", "20", PGC_SUSET,
							 PGC_S_OVERRIDE, GUC_ACTION_SET, true, 0, false);
}

/* ---------------------------------------------------------------------
 * Transactions
 * ---------------------------------------------------------------------
 */

typedef void (*TxnFn) (Task *t);

static void txn_check_extension(Task *t);

/*
 * Runs fn in a transaction of its own as the extension owner (when the
 * extension is there: the check of txn_check_extension runs without); false
 * and *error (in t's context) when it raised.
 */
static bool
txn_run(Task *t, TxnFn fn, ErrorData **error)
{
	MemoryContext old = CurrentMemoryContext;
	Oid			save_user;
	int			save_sec;
	volatile bool ok = true;

	GetUserIdAndSecContext(&save_user, &save_sec);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		Oid			owner;

		PushActiveSnapshot(GetTransactionSnapshot());
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		owner = fn == txn_check_extension ? save_user : dm_store_extension_owner();
		SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE |
							   SECURITY_RESTRICTED_OPERATION);
		fn(t);
		SPI_finish();
		PopActiveSnapshot();
		SetUserIdAndSecContext(save_user, save_sec);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(t ? t->cxt : TopMemoryContext);
		*error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		SetUserIdAndSecContext(save_user, save_sec);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	return ok;
}

/* ---------------------------------------------------------------------
 * Tasks
 * ---------------------------------------------------------------------
 */

static Task *
task_new(TaskKind kind, DmSlot *slot, Task *parent)
{
	MemoryContext cxt = AllocSetContextCreate(engine_cxt, "digime task",
											  ALLOCSET_SMALL_SIZES);
	Task	   *t = MemoryContextAllocZero(cxt, sizeof(Task));

	t->cxt = cxt;
	t->kind = kind;
	t->slot = slot;
	t->parent = parent;
	t->state = TS_CLAIM;
	t->grant.cxt = cxt;
	dlist_push_tail(&tasks, &t->node);
	if (parent)
		parent->children++;
	return t;
}

/* A grant task from request arguments (allocated in t's context). */
static void
grant_from_args(Task *t)
{
	DmGrant    *g = &t->grant;
	DmRequestArgs *a = &t->args;

	g->actor = a->actor;
	g->state = a->state;
	g->code = a->code;
	g->account_reference = a->account_reference;
	g->contract_id = a->contract_id;
	g->code_verifier = a->code_verifier;
	g->token_id = a->token_id;
	g->within_ms = a->within_ms;
	g->audit_action = a->audit_action ? a->audit_action : "refresh";
	switch (a->kind)
	{
		case DM_REQ_CALLBACK:
			g->kind = DM_GRANT_CALLBACK;
			break;
		case DM_REQ_EXCHANGE_CODE:
			g->kind = DM_GRANT_EXCHANGE_CODE;
			break;
		default:
			g->kind = DM_GRANT_REFRESH;
			break;
	}
}

static Task *
task_from_slot(DmSlot *slot)
{
	DmRequestKind kind = slot->req.kind;
	TaskKind	tk;
	Task	   *t;
	MemoryContext old;

	switch (kind)
	{
		case DM_REQ_REFRESH_BATCH:
			tk = TK_BATCH;
			break;
		case DM_REQ_PROCESS_INBOX:
			tk = TK_INBOX;
			break;
		case DM_REQ_PURGE:
			tk = TK_PURGE;
			break;
		case DM_REQ_AUDIT:
			tk = TK_AUDIT;
			break;
		default:
			tk = TK_GRANT;
			break;
	}
	t = task_new(tk, slot, NULL);
	old = MemoryContextSwitchTo(t->cxt);
	dm_request_unpack(&slot->req, &t->args);
	MemoryContextSwitchTo(old);
	if (tk == TK_GRANT)
		grant_from_args(t);
	return t;
}

/* Progress of a batch, for the backend's NOTICEs: woken at each tenth. */
static void
slot_progress(Task *t)
{
	int64		done = t->counts[0] + t->counts[1] + t->counts[2] + t->counts[3];
	int64		before;
	PGPROC	   *caller;

	if (t->slot == NULL)
		return;
	SpinLockAcquire(&t->slot->mutex);
	before = t->slot->progress_done;
	t->slot->progress_done = done;
	t->slot->progress_total = t->total;
	caller = t->slot->abandoned ? NULL : t->slot->caller;
	SpinLockRelease(&t->slot->mutex);
	if (caller != NULL && t->total > 0 && before * 10 / t->total != done * 10 / t->total)
		SetLatch(&caller->procLatch);
}

/* Answers the backend (or frees the slot of one that left). */
static void
reply(Task *t, bool ok)
{
	DmSlot	   *slot = t->slot;
	PGPROC	   *caller;

	if (slot == NULL)
		return;
	t->slot = NULL;
	SpinLockAcquire(&slot->mutex);
	if (slot->abandoned)
	{
		dm_slot_init(slot);
		SpinLockRelease(&slot->mutex);
		return;
	}
	if (ok)
	{
		slot->reply.ok = true;
		slot->reply.reply.token_id = t->grant.result_token_id;
		memcpy(slot->reply.reply.counts, t->counts, sizeof(t->counts));
	}
	else
		dm_reply_set_error(&slot->reply, t->error);
	slot->state = SLOT_DONE;
	caller = slot->caller;
	SpinLockRelease(&slot->mutex);
	if (caller != NULL)
		SetLatch(&caller->procLatch);
}

/*
 * Parks a task that can go on only when a grant ends (a batch with all its
 * children running, a request beyond digime.worker_max_inflight): the loop
 * does not wake for it until then.
 */
static void
park(Task *t)
{
	t->wake_at = DT_NOEND;
}

static void
wake_parked(void)
{
	dlist_iter	it;

	dlist_foreach(it, &tasks)
	{
		Task	   *t = dlist_container(Task, node, it.cur);

		if (t->wake_at == DT_NOEND)
			t->wake_at = 0;
	}
}

static void
count_child(Task *parent, Task *child, bool ok)
{
	int			i;

	if (ok)
		i = child->grant.skipped ? 3 : 0;
	else if (child->error->sqlerrcode == ERRCODE_DIGIME_INVALID_TOKEN ||
			 child->error->sqlerrcode == ERRCODE_DIGIME_INVALID_GRANT ||
			 child->error->sqlerrcode == ERRCODE_DIGIME_NEEDS_REAUTHORIZATION)
		i = 2;
	else
		i = 1;
	/* an inbox round counts done, failed, retrying (also a store left waiting for its row) */
	if (parent->kind == TK_INBOX)
		i = ok ? 0 : (child->grant.inbox_retry || child->state == TS_STORE ? 2 : 1);
	parent->counts[i]++;
	parent->children--;
	slot_progress(parent);
	wake_parked();
}

static void
finish(Task *t, bool ok)
{
	if (t->kind == TK_GRANT)
	{
		if (t->xfer != NULL)
		{
			dm_http_xfer_free(t->xfer);
			t->xfer = NULL;
			inflight--;
		}
		dm_grant_release(&t->grant);
		wake_parked();
	}
	if (t->periodic)
		inbox_round_running = false;
	reply(t, ok);
	if (t->parent != NULL)
		count_child(t->parent, t, ok);
	dlist_delete(&t->node);
	MemoryContextDelete(t->cxt);
}

static void
fail(Task *t, ErrorData *e)
{
	t->error = e;
	t->state = TS_FAIL;
	t->wake_at = 0;
}

/* ---------------------------------------------------------------------
 * Grant steps
 * ---------------------------------------------------------------------
 */

static DmClaim claim_result;

static void
txn_claim(Task *t)
{
	claim_result = dm_grant_claim(&t->grant);
	if (claim_result == DM_CLAIM_SEND)
	{
		/* make sure the keys are at hand before a one-time grant is consumed */
		dm_jwks_prefetch();
		t->call = dm_grant_call(&t->grant);
	}
}

static void
mark_sent(Task *t)
{
	if (t->slot == NULL)
		return;
	SpinLockAcquire(&t->slot->mutex);
	t->slot->sent = true;
	SpinLockRelease(&t->slot->mutex);
}

/* Sets t's error the way ereport would build it, without raising. */
static void
set_error(Task *t, int sqlerrcode, const char *msg, const char *detail)
{
	MemoryContext old = MemoryContextSwitchTo(t->cxt);

	PG_TRY();
	{
		ereport(ERROR,
				(errcode(sqlerrcode), errmsg_internal("%s", msg), errdetail_internal("%s", detail)));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(t->cxt);
		t->error = CopyErrorData();
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
}

static void
lock_wait_failed(Task *t, const char *what, const char *detail)
{
	set_error(t, ERRCODE_LOCK_NOT_AVAILABLE,
			  psprintf("could not obtain %s within digime.worker_lock_timeout", what), detail);
}

/* Whether the task of this worker that holds claim key only waits for a row to store. */
static bool
holder_storing(int64 key)
{
	dlist_iter	it;

	dlist_foreach(it, &tasks)
	{
		Task	   *o = dlist_container(Task, node, it.cur);

		if (o->kind == TK_GRANT && o->grant.lock_key == key)
			return o->state == TS_STORE;
	}
	return false;
}

static void
step_claim(Task *t, TimestampTz now)
{
	ErrorData  *e = NULL;

	if (t->deadline == 0)
		t->deadline = TimestampTzPlusMilliseconds(now, dm_worker_lock_timeout);
	if (!txn_run(t, txn_claim, &e))
	{
		if (e->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE && now < t->deadline)
		{
			t->wake_at = TimestampTzPlusMilliseconds(now, BUSY_RETRY_MS);
			return;
		}
		dm_grant_release(&t->grant);
		fail(t, e);
		return;
	}
	switch (claim_result)
	{
		case DM_CLAIM_DONE:
			finish(t, true);
			return;
		case DM_CLAIM_BUSY:

			/*
			 * a request for the same row runs: wait for it, beyond
			 * worker_lock_timeout only while its answer may still come
			 */
			if (now >= t->deadline &&
				(holder_storing(t->grant.busy_key) ||
				 now >= TimestampTzPlusMilliseconds(t->deadline,
													(int64) dm_timeout_ms * (dm_retry_limit + 1))))
			{
				lock_wait_failed(t, "the authorization or token",
								 "Another request for it is in progress; nothing was sent.");
				t->state = TS_FAIL;
				return;
			}
			t->wake_at = TimestampTzPlusMilliseconds(now, BUSY_RETRY_MS);
			return;
		case DM_CLAIM_SEND:
			break;
	}
	PG_TRY();
	{
		t->xfer = dm_http_multi_start(dm_api_build, t->call, dm_api_token_policy, t->cxt);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(t->cxt);
		e = CopyErrorData();
		FlushErrorState();
	}
	PG_END_TRY();
	if (t->xfer == NULL)
	{
		fail(t, e);
		return;
	}
	inflight++;
	mark_sent(t);
	t->state = TS_IN_FLIGHT;
}

static DmHttpResponse store_resp;

static void
txn_store(Task *t)
{
	if (!t->grant.have_token)
	{
		dm_http_xfer_result(t->xfer, &store_resp);
		dm_grant_answer(&t->grant, t->call, &store_resp);
	}
	dm_grant_store(&t->grant);
}

static void
step_store(Task *t, TimestampTz now)
{
	ErrorData  *e = NULL;

	if (txn_run(t, txn_store, &e))
	{
		finish(t, true);
		return;
	}
	if (t->grant.have_token &&
		(e->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE || e->sqlerrcode == ERRCODE_QUERY_CANCELED))
	{
		/* the token is in memory: never give it up; the caller may stop waiting */
		if (t->deadline == 0 || t->state != TS_STORE)
			t->deadline = TimestampTzPlusMilliseconds(now, dm_worker_lock_timeout);
		t->state = TS_STORE;
		if (now >= t->deadline && (t->slot != NULL || t->parent != NULL))
		{
			/* whoever waits is answered 55P03; the store goes on, detached */
			lock_wait_failed(t, t->grant.kind == DM_GRANT_REFRESH ? "the row of the token" :
							 "the rows of the authorization and its token",
							 "Another transaction holds it.  digi.me has issued the token: "
							 "the digime worker stores it as soon as the row is free.");
			reply(t, false);
			if (t->parent != NULL)
				count_child(t->parent, t, false);
			t->parent = NULL;
		}
		t->wake_at = TimestampTzPlusMilliseconds(now, STORE_RETRY_MS);
		return;
	}
	if (t->grant.have_token)
		ereport(WARNING,
				(errmsg("digime could not store a token digi.me issued"),
				 errdetail_internal("%s", e->message)));
	fail(t, e);
}

static ErrorData *fail_error;

static void
txn_failed(Task *t)
{
	dm_grant_failed(&t->grant, fail_error);
}

static void
step_fail(Task *t, TimestampTz now)
{
	ErrorData  *e = NULL;

	fail_error = t->error;
	if (t->kind == TK_GRANT && !txn_run(t, txn_failed, &e))
	{
		if (++t->fail_tries < 20)
		{
			t->wake_at = TimestampTzPlusMilliseconds(now, STORE_RETRY_MS);
			return;
		}
		ereport(LOG,
				(errmsg("digime could not record a failed request: %s", e->message)));
	}
	finish(t, false);
}

/* ---------------------------------------------------------------------
 * Batch refresh, inbox rounds, retention, audit
 * ---------------------------------------------------------------------
 */

static void
txn_batch_list(Task *t)
{
	int64		skipped;
	List	   *ids;
	ListCell   *lc;
	MemoryContext old;

	ids = dm_store_tokens_expiring(&t->args.actor, t->args.within_ms, t->args.max_tokens,
								   &skipped);
	old = MemoryContextSwitchTo(t->cxt);
	foreach(lc, ids)
	{
		int64	   *id = palloc(sizeof(int64));

		*id = *(int64 *) lfirst(lc);
		t->todo = lappend(t->todo, id);
	}
	MemoryContextSwitchTo(old);
	t->counts[3] = skipped;
	t->total = list_length(t->todo) + skipped;
}

static void
txn_inbox_list(Task *t)
{
	List	   *exclude = NIL;
	List	   *rows;
	ListCell   *lc;
	dlist_iter	it;
	MemoryContext old;
	Oid			role = (t->slot && !t->args.actor.is_admin) ? t->args.actor.role : InvalidOid;

	/*
	 * The worker's own rounds leave rows alone that are in flight; a
	 * backend's digime_process_inbox takes them too, so that it returns when
	 * they are done (its child waits for the claim and then finds the
	 * authorization completed).
	 */
	if (t->slot == NULL)
		dlist_foreach(it, &tasks)
		{
			Task	   *o = dlist_container(Task, node, it.cur);

			if (o->kind == TK_GRANT && o->grant.inbox_id != 0)
				exclude = lappend(exclude, &o->grant.inbox_id);
		}
	rows = dm_store_inbox_due(role, INBOX_BATCH, exclude);
	old = MemoryContextSwitchTo(t->cxt);
	foreach(lc, rows)
	{
		DmInboxRow *r = lfirst(lc);
		DmInboxRow *c = palloc(sizeof(DmInboxRow));

		*c = *r;
		c->end_user = r->end_user ? pstrdup(r->end_user) : NULL;
		c->callback_url = pstrdup(r->callback_url);
		t->todo = lappend(t->todo, c);
	}
	MemoryContextSwitchTo(old);
	t->total = list_length(t->todo);
}

/* The actor of an inbox row: its owner. */
static void
txn_inbox_actor(Task *t)
{
	Oid			owner = dm_store_extension_owner();
	Oid			role = t->grant.actor.role;

	t->grant.actor.is_admin = superuser_arg(role) || has_privs_of_role(role, owner);
}

/* Starts a child grant for the next token or inbox row. */
static void
spawn_child(Task *t)
{
	Task	   *c = task_new(TK_GRANT, NULL, t);
	MemoryContext old = MemoryContextSwitchTo(c->cxt);

	c->args.actor = t->args.actor;
	if (t->kind == TK_BATCH)
	{
		int64	   *id = linitial(t->todo);

		c->args.kind = DM_REQ_REFRESH;
		c->args.token_id = *id;
		c->args.within_ms = t->args.within_ms;
		/* its own copies: a child whose store waits outlives its batch */
		c->args.audit_action = t->args.audit_action ? pstrdup(t->args.audit_action) : NULL;
		c->args.actor.end_user = t->args.actor.end_user ? pstrdup(t->args.actor.end_user) : NULL;
		grant_from_args(c);
		c->grant.audit_as_owner = t->slot == NULL;
	}
	else
	{
		DmInboxRow *r = linitial(t->todo);
		DmCallback cb;
		ErrorData  *e = NULL;

		c->args.kind = DM_REQ_CALLBACK;
		grant_from_args(c);
		c->grant.actor.role = r->owner_role;
		c->grant.actor.end_user = r->end_user ? pstrdup(r->end_user) : NULL;
		c->grant.inbox_id = r->id;
		c->grant.inbox_url = pstrdup(r->callback_url);
		c->grant.inbox_attempts = r->attempts;
		PG_TRY();
		{
			dm_callback_parse(r->callback_url, &cb);
			dm_callback_check_success(&cb);
			c->grant.state = cb.state;
			c->grant.code = cb.code;
			c->grant.account_reference = cb.account_reference;
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(c->cxt);
			e = CopyErrorData();
			FlushErrorState();
		}
		PG_END_TRY();
		if (e == NULL && !txn_run(c, txn_inbox_actor, &e))
			;
		if (e != NULL)
			fail(c, e);
	}
	MemoryContextSwitchTo(old);
	t->todo = list_delete_first(t->todo);
}

static void
step_parent(Task *t)
{
	ErrorData  *e = NULL;
	bool		stop = false;

	if (t->state == TS_CLAIM)
	{
		if (!txn_run(t, t->kind == TK_BATCH ? txn_batch_list : txn_inbox_list, &e))
		{
			fail(t, e);
			return;
		}
		t->state = TS_CHILDREN;
		slot_progress(t);
	}
	if (t->slot != NULL)
	{
		SpinLockAcquire(&t->slot->mutex);
		stop = t->slot->abandoned;
		SpinLockRelease(&t->slot->mutex);
	}
	/* a backend that left stops the batch; what is in flight still completes */
	if (stop || got_sigterm)
	{
		list_free(t->todo);
		t->todo = NIL;
	}
	while (t->todo != NIL && t->children < Max(t->args.concurrency, 1) &&
		   inflight < dm_worker_max_inflight)
		spawn_child(t);
	if (t->todo == NIL && t->children == 0)
		finish(t, true);
	else
		park(t);
}

static void
txn_purge(Task *t)
{
	uint64		expired = 0;
	bool		more = true;

	for (int round = 0; more && round < 100; round++)
	{
		uint64		e;

		/* a backend's request brings its own settings; the worker's rounds use its own */
		t->counts[1] += dm_store_purge(t->slot ? t->args.retention_s : dm_authorization_retention,
									   t->slot ? t->args.audit_retention_s : dm_audit_retention,
									   PURGE_BATCH, &e, &more);
		expired += e;
	}
	t->counts[0] += expired;
}

static void
txn_audit(Task *t)
{
	DmAudit		audit;

	memset(&audit, 0, sizeof(audit));
	audit.role = t->args.actor.role;
	audit.action = t->args.audit_action;
	audit.contract_id = t->args.contract_id;
	audit.token_id = t->args.token_id;
	audit.ok = t->args.audit_ok;
	audit.sqlstate = t->args.sqlstate;
	audit.reference = t->args.reference;
	dm_store_audit(&audit);
}

static void
step_simple(Task *t)
{
	ErrorData  *e = NULL;

	if (txn_run(t, t->kind == TK_PURGE ? txn_purge : txn_audit, &e))
		finish(t, true);
	else
	{
		if (t->kind == TK_AUDIT)
			ereport(LOG,
					(errmsg("digime could not record an audit row: %s", e->message)));
		t->error = e;
		finish(t, false);
	}
}

/* ---------------------------------------------------------------------
 * The loop
 * ---------------------------------------------------------------------
 */

static void
run_due_steps(TimestampTz now)
{
	dlist_mutable_iter it;

	dlist_foreach_modify(it, &tasks)
	{
		Task	   *t = dlist_container(Task, node, it.cur);

		if (t->wake_at > now)
			continue;
		switch (t->kind)
		{
			case TK_GRANT:
				if (t->state == TS_CLAIM && t->parent == NULL &&
					inflight >= dm_worker_max_inflight)
					park(t);
				else if (t->state == TS_CLAIM)
					step_claim(t, now);
				else if (t->state == TS_STORE)
					step_store(t, now);
				else if (t->state == TS_FAIL)
					step_fail(t, now);
				break;
			case TK_BATCH:
			case TK_INBOX:
				if (t->state == TS_FAIL)
					finish(t, false);
				else
					step_parent(t);
				break;
			case TK_PURGE:
			case TK_AUDIT:
				step_simple(t);
				break;
		}
	}
}

static void
collect_transfers(void)
{
	DmHttpXfer *x;

	while ((x = dm_http_multi_next_done()) != NULL)
	{
		dlist_iter	it;

		dlist_foreach(it, &tasks)
		{
			Task	   *t = dlist_container(Task, node, it.cur);

			if (t->xfer == x)
			{
				t->state = TS_STORE;
				t->wake_at = 0;
				t->deadline = 0;
				break;
			}
		}
	}
}

/* Takes the submitted slots of this database. */
static void
take_slots(void)
{
	for (int i = 0; i < dm_shared->nslots; i++)
	{
		DmSlot	   *s = &dm_shared->slots[i];
		bool		mine;

		SpinLockAcquire(&s->mutex);
		mine = s->state == SLOT_SUBMITTED && s->database == MyDatabaseId;
		if (mine)
		{
			s->state = SLOT_TAKEN;
			s->worker_pid = MyProcPid;
		}
		SpinLockRelease(&s->mutex);
		if (mine)
			(void) task_from_slot(s);
	}
}

/* Answers the slots this process took and has not answered: it is exiting. */
static void
answer_on_exit(int code, Datum arg)
{
	DmDbWorker *e;

	if (dm_shared != NULL)
	{
		for (int i = 0; i < dm_shared->nslots; i++)
		{
			DmSlot	   *s = &dm_shared->slots[i];
			PGPROC	   *caller = NULL;

			SpinLockAcquire(&s->mutex);
			if (s->state == SLOT_TAKEN && s->worker_pid == MyProcPid)
			{
				if (s->abandoned)
					dm_slot_init(s);
				else
				{
					dm_reply_set_lost(&s->reply);
					s->state = SLOT_DONE;
					caller = s->caller;
				}
			}
			SpinLockRelease(&s->mutex);
			if (caller)
				SetLatch(&caller->procLatch);
		}
		LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
		e = dm_db_entry(MyDatabaseId, false);
		if (e != NULL && e->pid == MyProcPid)
		{
			e->pid = 0;
			e->proc = NULL;
			if (e->state == DB_RUNNING || e->state == DB_STARTING)
				e->state = DatumGetBool(arg) ? DB_ABSENT : DB_STOPPED;
		}
		LWLockRelease(dm_shared->lock);
		dm_wake_launcher();
	}
}

static bool extension_gone = false;
static Oid	extension_owner = InvalidOid;

static void
txn_check_extension(Task *t)
{
	Oid			ext = get_extension_oid("digime", true);

	if (!OidIsValid(ext) || (OidIsValid(extension_oid) && ext != extension_oid))
		extension_gone = true;
	else
	{
		/* the installed version must be the library's (raises otherwise) */
		extension_owner = dm_store_extension_owner();
		extension_oid = ext;
	}
}

/* Database mode: retention, inbox, automatic refresh, extension check. */
static void
periodic(TimestampTz now)
{
	ErrorData  *e = NULL;
	DmDbWorker *entry;
	bool		restart = false;

	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	entry = dm_db_entry(MyDatabaseId, false);
	if (entry == NULL || entry->pid != MyProcPid || entry->restart || entry->state == DB_PAUSED)
		restart = true;
	if (entry != NULL && entry->wake)
	{
		/* new inbox rows, or the extension changed: look now */
		inbox_wanted = true;
		next_periodic = 0;
		entry->wake = false;
	}
	LWLockRelease(dm_shared->lock);
	if (restart)
		got_sigterm = true;

	if (inbox_wanted && !inbox_round_running && !got_sigterm)
	{
		Task	   *t = task_new(TK_INBOX, NULL, NULL);

		t->periodic = true;
		t->args.actor.is_admin = true;
		t->args.concurrency = dm_worker_max_inflight;
		inbox_round_running = true;
		inbox_wanted = false;
	}
	if (now < next_periodic)
		return;
	next_periodic = TimestampTzPlusMilliseconds(now, (int64) dm_worker_naptime * 1000);
	inbox_wanted = true;

	if (!txn_run(NULL, txn_check_extension, &e))
	{
		ereport(LOG,
				(errmsg("digime worker stops: %s", e->message)));
		extension_gone = true;
	}
	if (extension_gone)
	{
		got_sigterm = true;
		return;
	}
	(void) task_new(TK_PURGE, NULL, NULL);
	if (dm_auto_refresh && now >= next_auto_refresh)
	{
		Task	   *t = task_new(TK_BATCH, NULL, NULL);

		next_auto_refresh = TimestampTzPlusMilliseconds(now,
														(int64) dm_auto_refresh_interval * 1000);
		/* the worker's own actor: every token, audited as its owner's */
		t->args.actor.role = extension_owner;
		t->args.actor.is_admin = true;
		t->args.within_ms = (int64) dm_auto_refresh_within * 1000;
		t->args.max_tokens = -1;
		t->args.concurrency = Max(1, dm_worker_max_inflight / 2);
		t->args.audit_action = "refresh_automatic";
	}
}

static long
next_timeout(TimestampTz now)
{
	long		ms = (long) dm_worker_naptime * 1000;
	dlist_iter	it;

	if (engine_mode == DM_ENGINE_DATABASE)
		ms = Min(ms, Max(TimestampDifferenceMilliseconds(now, next_periodic), 0));
	dlist_foreach(it, &tasks)
	{
		Task	   *t = dlist_container(Task, node, it.cur);

		if (t->state == TS_IN_FLIGHT || t->wake_at == DT_NOEND)
			continue;
		ms = Min(ms, t->wake_at <= now ? 0 :
				 TimestampDifferenceMilliseconds(now, t->wake_at));
	}
	if (got_sigterm)
		ms = Min(ms, 100);
	return ms;
}

/* After SIGTERM: stop once nothing is left, or when the grace period ends. */
static bool
shutdown_done(TimestampTz now)
{
	if (!got_sigterm)
		return false;
	if (shutdown_at == 0)
		shutdown_at = TimestampTzPlusMilliseconds(now, SHUTDOWN_GRACE_MS);
	if (dlist_is_empty(&tasks))
		return true;
	if (now < shutdown_at)
		return false;
	/*
	 * Out of time: abort the transfers; every grant is recorded as failed and
	 * answered (grants first: their batch counts them), then the rest.
	 */
	dm_http_multi_abort_all();
	collect_transfers();
	for (int pass = 0; pass < 2; pass++)
	{
		dlist_mutable_iter it;

		dlist_foreach_modify(it, &tasks)
		{
			Task	   *t = dlist_container(Task, node, it.cur);

			if ((pass == 0) != (t->kind == TK_GRANT))
				continue;
			if (t->grant.have_token)
				ereport(WARNING,
						(errmsg("digime worker stops before it could store a token digi.me issued")));
			set_error(t, ERRCODE_DIGIME_WORKER_LOST, "the digime worker stopped before it answered",
					  "The server is shutting down, or the database is being dropped or changed; "
					  "a request that reached digi.me may have been completed there.");
			if (t->kind == TK_GRANT)
			{
				t->fail_tries = 19;		/* record it once, then finish */
				step_fail(t, now);
			}
			else
				finish(t, false);
		}
	}
	return true;
}

void
dm_engine_run(DmEngineMode mode, DmSlot *oneshot_slot)
{
	MemoryContext loop_cxt;

	worker_session_settings();
	engine_mode = mode;
	engine_cxt = AllocSetContextCreate(TopMemoryContext, "digime engine", ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "digime loop", ALLOCSET_DEFAULT_SIZES);
	if (oneshot_slot != NULL)
		(void) task_from_slot(oneshot_slot);

	for (;;)
	{
		TimestampTz now;

		MemoryContextSwitchTo(loop_cxt);
		MemoryContextReset(loop_cxt);
		ResetLatch(MyLatch);
		QueryCancelPending = false;	/* see dm_worker_process_init */
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		now = GetCurrentTimestamp();
		if (mode == DM_ENGINE_DATABASE)
		{
			if (!got_sigterm)
				take_slots();
			periodic(now);
		}
		collect_transfers();
		run_due_steps(now);
		if (shutdown_done(GetCurrentTimestamp()))
			break;
		if (mode == DM_ENGINE_ONESHOT && dlist_is_empty(&tasks))
			break;
		pgstat_report_stat(false);
		pgstat_report_activity(STATE_IDLE, NULL);
		dm_http_multi_wait(next_timeout(GetCurrentTimestamp()));
	}
	MemoryContextSwitchTo(TopMemoryContext);
}

/* ---------------------------------------------------------------------
 * The per-database worker
 * ---------------------------------------------------------------------
 */

/* Moves the database's entry from one state to another (if it is in the first). */
static void
set_entry_state(Oid dboid, DmDbState from, DmDbState to)
{
	DmDbWorker *entry;

	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	entry = dm_db_entry(dboid, false);
	if (entry != NULL && entry->state == from && entry->pid == 0)
		entry->state = to;
	LWLockRelease(dm_shared->lock);
}

void
digime_dbworker_main(Datum arg)
{
	Oid			dboid = DatumGetObjectId(arg);
	ErrorData  *e = NULL;
	DmDbWorker *entry;
	bool		running;

	dm_worker_process_init();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname("digime worker");
	before_shmem_exit(answer_on_exit, BoolGetDatum(false));

	/* no (current) extension here: say so and leave until woken */
	if (!txn_run(NULL, txn_check_extension, &e) || extension_gone)
	{
		ereport(DEBUG1,
				(errmsg("digime worker: no current digime extension in this database"),
				 e ? errdetail_internal("%s", e->message) : 0));
		set_entry_state(dboid, DB_STARTING, DB_ABSENT);
		dm_wake_launcher();
		proc_exit(0);
	}

	/* running, unless DROP DATABASE or the like paused the database meanwhile */
	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	entry = dm_db_entry(dboid, false);
	running = entry != NULL && entry->state == DB_STARTING;
	if (running)
	{
		entry->pid = MyProcPid;
		entry->proc = MyProc;
		entry->state = DB_RUNNING;
		entry->wake = false;
		entry->restart = false;
		entry->since = GetCurrentTimestamp();
	}
	LWLockRelease(dm_shared->lock);
	if (!running)
		proc_exit(0);
	ereport(DEBUG1, (errmsg("digime worker started")));

	dm_engine_run(DM_ENGINE_DATABASE, NULL);
	if (extension_gone)
	{
		cancel_before_shmem_exit(answer_on_exit, BoolGetDatum(false));
		before_shmem_exit(answer_on_exit, BoolGetDatum(true));
	}
	proc_exit(0);
}
