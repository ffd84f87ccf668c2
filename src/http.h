/*-------------------------------------------------------------------------
 *
 * http.h
 *	  HTTPS requests to the digi.me API with libcurl: one policy (options,
 *	  retries, error classification; http.c) and two drivers: a blocking
 *	  one for backends (http.c) and a libcurl multi one for the digime
 *	  worker, which has many requests in flight at once (http_multi.c).
 *
 * IDENTIFICATION
 *	  src/http.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_HTTP_H
#define DIGIME_HTTP_H

#include "digime.h"

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
 * before every attempt, so each one is signed afresh.  req->bearer is
 * wiped and freed after the attempt.
 */
typedef void (*DmHttpBuild) (void *arg, int attempt, DmHttpRequest *req);

/* ---------------------------------------------------------------------
 * Blocking driver (backends)
 * ---------------------------------------------------------------------
 */

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
 * Multi driver (the digime worker): many requests at once, same policy
 * ---------------------------------------------------------------------
 */
typedef struct DmHttpXfer DmHttpXfer;

/*
 * Starts a request (all its attempts, retries included).  The transfer and
 * its answer live in memory context cxt; build and arg must stay valid
 * until dm_http_xfer_free.
 */
extern DmHttpXfer *dm_http_multi_start(DmHttpBuild build, void *arg, DmRetryPolicy policy,
									   MemoryContext cxt);

/*
 * Waits up to timeout_ms for network activity, a due retry, the process
 * latch or postmaster death (which exits), and drives the transfers.  The
 * caller resets the latch.
 */
extern void dm_http_multi_wait(long timeout_ms);

/* A transfer that has finished (answer or final failure), or NULL. */
extern DmHttpXfer *dm_http_multi_next_done(void);

/* Number of transfers started and not yet returned by next_done. */
extern int	dm_http_multi_active(void);

/* True once an attempt may have reached the API. */
extern bool dm_http_xfer_sent(DmHttpXfer *x);

/* The answer of a finished transfer; raises its transport error if it failed. */
extern void dm_http_xfer_result(DmHttpXfer *x, DmHttpResponse *resp);

/* Aborts (if running) and frees a transfer. */
extern void dm_http_xfer_free(DmHttpXfer *x);

/* Makes transfers abort soon (the worker is shutting down). */
extern void dm_http_multi_abort_all(void);

#endif							/* DIGIME_HTTP_H */
