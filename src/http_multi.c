/*-------------------------------------------------------------------------
 *
 * http_multi.c
 *	  The libcurl multi driver of the digime worker: many requests in
 *	  flight at once, each with the retry rule and error classification of
 *	  http.c.
 *
 * libcurl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION) and
 * when to call it back (CURLMOPT_TIMERFUNCTION); we wait for them together
 * with the process latch in one WaitEventSet, so a new request from a
 * backend wakes the worker at once even while transfers are in flight.
 * PostgreSQL 15 cannot remove a socket from a WaitEventSet, so the set is
 * rebuilt whenever libcurl's socket list changes (rare with keep-alive).
 * Connections are kept alive in the multi handle's cache between requests.
 *
 * A transfer that fails in a way the retry rule allows is retried after
 * its back-off without the worker's involvement; each attempt is built
 * (signed) afresh by the request's build callback.
 *
 * IDENTIFICATION
 *	  src/http_multi.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "http_int.h"

#include "lib/ilist.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

typedef enum XferState
{
	XS_RUNNING,					/* an attempt is in the multi handle */
	XS_WAITING,					/* waiting for its retry */
	XS_DONE						/* answered, or failed for good */
} XferState;

struct DmHttpXfer
{
	dlist_node	node;			/* in running, waiting or done */
	MemoryContext cxt;
	DmHttpBuild build;
	void	   *arg;
	DmRetryPolicy policy;
	XferState	state;
	int			attempt;		/* number of the current/last attempt */
	CURL	   *easy;			/* while running */
	DmAttempt	a;
	DmHttpResponse resp;
	TimestampTz retry_at;
	bool		sent;			/* an attempt may have reached the API */
	ErrorData  *error;			/* building a retry failed */
	bool		returned;		/* handed out by next_done */
};

typedef struct SockEntry
{
	curl_socket_t fd;
	int			what;			/* CURL_POLL_IN / OUT / INOUT */
} SockEntry;

static CURLM *multi = NULL;
static dlist_head running = DLIST_STATIC_INIT(running);
static dlist_head waiting = DLIST_STATIC_INIT(waiting);
static dlist_head done = DLIST_STATIC_INIT(done);
static int	nactive = 0;

static SockEntry *socks = NULL;
static int	nsocks = 0;
static int	socks_cap = 0;
static bool socks_dirty = true;
static WaitEventSet *wes = NULL;

static TimestampTz timer_at = 0;	/* 0: libcurl wants no timeout */

#define EASY_POOL 16
static CURL *easy_pool[EASY_POOL];
static int	neasy_pool = 0;

static int
socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
	int			i;

	for (i = 0; i < nsocks; i++)
		if (socks[i].fd == s)
			break;
	if (what == CURL_POLL_REMOVE)
	{
		if (i < nsocks)
			socks[i] = socks[--nsocks];
	}
	else
	{
		if (i == nsocks)
		{
			if (nsocks == socks_cap)
			{
				int			cap = Max(16, socks_cap * 2);

				socks = socks ? repalloc(socks, cap * sizeof(SockEntry)) :
					MemoryContextAlloc(TopMemoryContext, cap * sizeof(SockEntry));
				socks_cap = cap;
			}
			nsocks++;
			socks[i].fd = s;
		}
		socks[i].what = what;
	}
	socks_dirty = true;
	return 0;
}

static int
timer_cb(CURLM *m, long timeout_ms, void *userp)
{
	timer_at = timeout_ms < 0 ? 0 :
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	return 0;
}

static void
ensure_multi(void)
{
	if (multi != NULL)
		return;
	multi = curl_multi_init();
	if (multi == NULL ||
		curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, socket_cb) != CURLM_OK ||
		curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, timer_cb) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
}

static CURL *
get_easy(void)
{
	CURL	   *e = neasy_pool > 0 ? easy_pool[--neasy_pool] : curl_easy_init();

	if (e == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	return e;
}

static void
put_easy(CURL *e)
{
	if (neasy_pool < EASY_POOL)
		easy_pool[neasy_pool++] = e;
	else
		curl_easy_cleanup(e);
}

/* Takes a running transfer's handle out of the multi handle. */
static void
detach_easy(DmHttpXfer *x)
{
	if (x->easy == NULL)
		return;
	curl_multi_remove_handle(multi, x->easy);
	curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, NULL);
	put_easy(x->easy);
	x->easy = NULL;
	dm_attempt_cleanup(&x->a);
}

/* Starts attempt x->attempt; raises on failure to build or configure. */
static void
start_attempt(DmHttpXfer *x)
{
	MemoryContext old = MemoryContextSwitchTo(x->cxt);

	x->easy = get_easy();
	if (!dm_attempt_setup(x->easy, &x->a, x->build, x->arg, x->attempt) ||
		curl_easy_setopt(x->easy, CURLOPT_PRIVATE, x) != CURLE_OK ||
		curl_multi_add_handle(multi, x->easy) != CURLM_OK)
	{
		curl_easy_cleanup(x->easy);
		x->easy = NULL;
		dm_attempt_cleanup(&x->a);
		elog(ERROR, "could not configure the libcurl handle");
	}
	MemoryContextSwitchTo(old);
	x->state = XS_RUNNING;
	dlist_push_tail(&running, &x->node);
}

DmHttpXfer *
dm_http_multi_start(DmHttpBuild build, void *arg, DmRetryPolicy policy, MemoryContext cxt)
{
	DmHttpXfer *x;

	ensure_multi();
	x = MemoryContextAllocZero(cxt, sizeof(DmHttpXfer));
	x->cxt = cxt;
	x->build = build;
	x->arg = arg;
	x->policy = policy;
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);

		x->a.body = makeStringInfo();
		MemoryContextSwitchTo(old);
	}
	PG_TRY();
	{
		start_attempt(x);
	}
	PG_CATCH();
	{
		dm_attempt_cleanup(&x->a);
		PG_RE_THROW();
	}
	PG_END_TRY();
	nactive++;
	return x;
}

static void
finish_done(DmHttpXfer *x)
{
	x->state = XS_DONE;
	dlist_push_tail(&done, &x->node);
}

/* An attempt ended: answer, retry or final failure. */
static void
attempt_ended(DmHttpXfer *x, CURLcode rc)
{
	MemoryContext old = MemoryContextSwitchTo(x->cxt);
	long		delay = 0;
	DmNext		next;

	dlist_delete(&x->node);
	dm_attempt_finish(x->easy, rc, &x->a, &x->resp);
	if (x->a.request_sent)
		x->sent = true;
	detach_easy(x);
	next = dm_attempt_next(&x->a, &x->resp, x->attempt, x->policy, &delay);
	MemoryContextSwitchTo(old);
	if (next == DM_NEXT_RETRY || next == DM_NEXT_AGAIN)
	{
		x->state = XS_WAITING;
		x->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay);
		if (next == DM_NEXT_RETRY)
			x->attempt++;
		dlist_push_tail(&waiting, &x->node);
	}
	else
		finish_done(x);
}

static void
collect_finished(void)
{
	CURLMsg    *msg;
	int			left;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		DmHttpXfer *x = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &x);
		if (x != NULL)
			attempt_ended(x, msg->data.result);
	}
}

/* Starts the retries that are due; a retry that cannot be built fails its transfer. */
static void
start_due_retries(void)
{
	TimestampTz now = GetCurrentTimestamp();
	dlist_mutable_iter it;

	dlist_foreach_modify(it, &waiting)
	{
		DmHttpXfer *x = dlist_container(DmHttpXfer, node, it.cur);
		MemoryContext old = CurrentMemoryContext;

		if (x->retry_at > now)
			continue;
		dlist_delete(&x->node);
		PG_TRY();
		{
			start_attempt(x);
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(x->cxt);
			x->error = CopyErrorData();
			FlushErrorState();
			MemoryContextSwitchTo(old);
			finish_done(x);
		}
		PG_END_TRY();
	}
}

static void
rebuild_wait_set(void)
{
	if (wes != NULL)
		FreeWaitEventSet(wes);
	wes = CreateWaitEventSet(TopMemoryContext, nsocks + 2);
	AddWaitEventToSet(wes, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wes, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	for (int i = 0; i < nsocks; i++)
	{
		uint32		ev = 0;

		if (socks[i].what & CURL_POLL_IN)
			ev |= WL_SOCKET_READABLE;
		if (socks[i].what & CURL_POLL_OUT)
			ev |= WL_SOCKET_WRITEABLE;
		if (ev != 0)
			AddWaitEventToSet(wes, ev, socks[i].fd, NULL, NULL);
	}
	socks_dirty = false;
}

static long
ms_until(TimestampTz t, TimestampTz now)
{
	return t <= now ? 0 : TimestampDifferenceMilliseconds(now, t);
}

void
dm_http_multi_wait(long timeout_ms)
{
	WaitEvent	events[64];
	int			n;
	int			running_n;
	TimestampTz now;
	dlist_iter	it;

	ensure_multi();
	start_due_retries();
	now = GetCurrentTimestamp();
	if (timer_at != 0)
		timeout_ms = Min(timeout_ms, ms_until(timer_at, now));
	dlist_foreach(it, &waiting)
		timeout_ms = Min(timeout_ms,
						 ms_until(dlist_container(DmHttpXfer, node, it.cur)->retry_at, now));
	if (socks_dirty || wes == NULL)
		rebuild_wait_set();

	n = WaitEventSetWait(wes, Max(timeout_ms, 0), events, lengthof(events), PG_WAIT_EXTENSION);
	for (int i = 0; i < n; i++)
	{
		int			ev = 0;

		if (!(events[i].events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE)))
			continue;
		if (events[i].events & WL_SOCKET_READABLE)
			ev |= CURL_CSELECT_IN;
		if (events[i].events & WL_SOCKET_WRITEABLE)
			ev |= CURL_CSELECT_OUT;
		curl_multi_socket_action(multi, events[i].fd, ev, &running_n);
	}
	if (timer_at != 0 && GetCurrentTimestamp() >= timer_at)
	{
		timer_at = 0;
		curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running_n);
	}
	collect_finished();
	start_due_retries();
}

DmHttpXfer *
dm_http_multi_next_done(void)
{
	DmHttpXfer *x;

	if (dlist_is_empty(&done))
		return NULL;
	x = dlist_container(DmHttpXfer, node, dlist_pop_head_node(&done));
	x->returned = true;
	nactive--;
	return x;
}

int
dm_http_multi_active(void)
{
	return nactive;
}

bool
dm_http_xfer_sent(DmHttpXfer *x)
{
	return x->sent || x->state == XS_RUNNING;
}

void
dm_http_xfer_result(DmHttpXfer *x, DmHttpResponse *resp)
{
	Assert(x->state == XS_DONE);
	if (x->error != NULL)
		ReThrowError(x->error);
	if (x->a.result != XFER_OK)
		dm_attempt_raise(&x->a, x->attempt + 1);
	*resp = x->resp;
}

void
dm_http_xfer_free(DmHttpXfer *x)
{
	if (x == NULL)
		return;
	if (!x->returned)
	{
		dlist_delete(&x->node);
		nactive--;
	}
	detach_easy(x);
	dm_attempt_cleanup(&x->a);
	pfree(x);
}

void
dm_http_multi_abort_all(void)
{
	dlist_mutable_iter it;

	dlist_foreach_modify(it, &running)
	{
		DmHttpXfer *x = dlist_container(DmHttpXfer, node, it.cur);

		dlist_delete(&x->node);
		detach_easy(x);
		x->a.result = XFER_ABORTED;
		finish_done(x);
	}
	dlist_foreach_modify(it, &waiting)
	{
		DmHttpXfer *x = dlist_container(DmHttpXfer, node, it.cur);

		dlist_delete(&x->node);
		x->a.result = XFER_ABORTED;
		finish_done(x);
	}
}
