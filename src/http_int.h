/*-------------------------------------------------------------------------
 *
 * http_int.h
 *	  What the two HTTP drivers share (http.c): one attempt's libcurl
 *	  setup, its classification, and the retry rule.  Private to http.c
 *	  and http_multi.c.
 *
 * IDENTIFICATION
 *	  src/http_int.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_HTTP_INT_H
#define DIGIME_HTTP_INT_H

#include "http.h"

#include <curl/curl.h>

typedef enum XferResult
{
	XFER_OK,
	XFER_DNS,
	XFER_CONNECT,
	XFER_TLS,					/* handshake failed */
	XFER_TLS_VERIFY,			/* certificate not trusted */
	XFER_CA_FILE,				/* digime.ca_file unusable */
	XFER_TIMEOUT,
	XFER_NETWORK,				/* connection failed after connecting */
	XFER_TOO_LARGE,
	XFER_ABORTED,
	XFER_STALE					/* kept-alive connection had unread bytes; nothing sent */
} XferResult;

/* One attempt of a request on one easy handle. */
typedef struct DmAttempt
{
	DmHttpRequest req;			/* as built for this attempt */
	CURL	   *easy;			/* the handle it runs on */
	struct curl_slist *headers;
	StringInfo	body;			/* the answer being received */
	bool		too_large;
	XferResult	result;
	bool		request_sent;
	bool		stale;			/* refused a reused connection (see prereq_cb) */
	int			stale_count;	/* of this request, over all its attempts */
	char		errbuf[CURL_ERROR_SIZE];
} DmAttempt;

/* What to do after an attempt. */
typedef enum DmNext
{
	DM_NEXT_DONE,				/* an answer to return */
	DM_NEXT_RETRY,				/* try again after *delay_ms */
	DM_NEXT_AGAIN,				/* the same attempt again at once, on another
								 * connection (XFER_STALE) */
	DM_NEXT_FAIL				/* raise the attempt's transport error */
} DmNext;

/*
 * Builds attempt number "attempt" and configures easy for it; a->body must
 * be set.  Returns false (a->errbuf says why) when libcurl refused an
 * option; raises only on out-of-memory.
 */
extern bool dm_attempt_setup(CURL *easy, DmAttempt *a, DmHttpBuild build, void *arg,
							 int attempt);

/* Classifies a finished transfer and fills resp from easy on success. */
extern void dm_attempt_finish(CURL *easy, CURLcode rc, DmAttempt *a, DmHttpResponse *resp);

/* Frees what setup allocated (headers, the signed bearer). */
extern void dm_attempt_cleanup(DmAttempt *a);

/* The retry rule (README, "Retries"). */
extern DmNext dm_attempt_next(const DmAttempt *a, const DmHttpResponse *resp, int attempt,
							  DmRetryPolicy policy, long *delay_ms);

/* Raises the transport error of a failed attempt (SQLSTATE by kind). */
extern void dm_attempt_raise(const DmAttempt *a, int attempts) pg_attribute_noreturn();

#endif							/* DIGIME_HTTP_INT_H */
