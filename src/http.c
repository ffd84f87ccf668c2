/*-------------------------------------------------------------------------
 *
 * http.c
 *	  HTTPS requests to the digi.me API with libcurl: the policy shared by
 *	  both drivers (one attempt's options, its classification, the retry
 *	  rule, transport errors) and the blocking driver used by backends.
 *
 * Blocking driver: one curl multi handle and one easy handle live for the
 * whole process, so connections (and TLS sessions) are kept alive between
 * calls.  The transfer is driven by curl_multi_poll in 100 ms slices with
 * CHECK_FOR_INTERRUPTS() between them, and the progress callback aborts the
 * transfer as soon as a cancel or termination is pending; so query cancel
 * and statement_timeout stop a hanging request within about 0.1 s.  Any
 * failure, including an interrupt, discards both handles: a connection in
 * an unknown state is never reused.
 *
 * Safety: CURLOPT_NOSIGNAL (the backend owns SIGALRM), TLS peer and host
 * verification always on, no redirects, http only where the URL checks of
 * url.c allowed it, answers capped at 1 MB.
 *
 * Retries (README, "Retries"): up to digime.retry_limit more attempts, each
 * rebuilt (so re-signed) by the caller's build callback.
 *	- DM_RETRY_IDEMPOTENT: connection failures, timeouts, and HTTP
 *	  429/502/503/504.
 *	- DM_RETRY_UNPROCESSED (calls that consume a one-time code or refresh
 *	  token): only failures where the request provably never reached the
 *	  API (nothing sent: DNS, connect, TLS handshake) and HTTP 429 or 503,
 *	  which say the request was not processed.
 * Back-off: 500 ms doubling up to 8 s, plus up to 100 ms jitter; a
 * Retry-After of up to 10 s is honoured, a longer one ends the retries.
 *
 * IDENTIFICATION
 *	  src/http.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "guc.h"
#include "http_int.h"

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#define DM_MAX_RESPONSE_BYTES	(1024 * 1024)
#define DM_POLL_MS				100
#define DM_BACKOFF_BASE_MS		500
#define DM_BACKOFF_CAP_MS		8000
#define DM_RETRY_AFTER_CAP_MS	10000

/* ---------------------------------------------------------------------
 * Reused connections
 *
 * A server that sends bytes after an answer (a copy of it, in a TLS record
 * of its own) leaves them on the kept-alive connection; libcurl 7.88 takes
 * such a connection for alive, and the next request on it would read them
 * as its answer, so every later answer would be one request late.  So
 * before a request goes out on a reused connection, prereq_cb refuses the
 * connection if its socket is readable (unread bytes, or closed by the
 * server): nothing has been sent, libcurl closes the connection, and the
 * attempt runs again at once on another one.  libcurl's sockets are known
 * from CURLOPT_SOCKOPTFUNCTION and CURLOPT_CLOSESOCKETFUNCTION.
 * ---------------------------------------------------------------------
 */

/* Refusals per request before it fails as a network error. */
#define DM_MAX_STALE			8
#define DM_MAX_SOCKETS			256

static curl_socket_t open_sockets[DM_MAX_SOCKETS];
static int	n_open_sockets = 0;

static int
sockopt_cb(void *clientp, curl_socket_t fd, curlsocktype purpose)
{
	if (n_open_sockets < DM_MAX_SOCKETS)	/* beyond: not checked */
		open_sockets[n_open_sockets++] = fd;
	return CURL_SOCKOPT_OK;
}

static int
closesocket_cb(void *clientp, curl_socket_t fd)
{
	for (int i = 0; i < n_open_sockets; i++)
		if (open_sockets[i] == fd)
		{
			open_sockets[i] = open_sockets[--n_open_sockets];
			break;
		}
	return close(fd);
}

static int
port_of(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ntohs(((const struct sockaddr_in *) ss)->sin_port);
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *) ss)->sin6_port);
	return -1;
}

/* The socket of the connection with these ports, or CURL_SOCKET_BAD. */
static curl_socket_t
socket_of(int local_port, int peer_port)
{
	for (int i = 0; i < n_open_sockets; i++)
	{
		struct sockaddr_storage local,
					peer;
		socklen_t	llen = sizeof(local),
					plen = sizeof(peer);

		if (getsockname(open_sockets[i], (struct sockaddr *) &local, &llen) == 0 &&
			port_of(&local) == local_port &&
			getpeername(open_sockets[i], (struct sockaddr *) &peer, &plen) == 0 &&
			port_of(&peer) == peer_port)
			return open_sockets[i];
	}
	return CURL_SOCKET_BAD;
}

static int
prereq_cb(void *clientp, char *peer_ip, char *local_ip, int peer_port, int local_port)
{
	DmAttempt  *a = (DmAttempt *) clientp;
	long		new_connections = 0;
	curl_socket_t fd;
	struct pollfd pfd;

	if (curl_easy_getinfo(a->easy, CURLINFO_NUM_CONNECTS, &new_connections) != CURLE_OK ||
		new_connections > 0)
		return CURL_PREREQFUNC_OK;	/* a new connection */
	fd = socket_of(local_port, peer_port);
	if (fd == CURL_SOCKET_BAD)
		return CURL_PREREQFUNC_OK;
	pfd.fd = fd;
	pfd.events = POLLIN;
	pfd.revents = 0;
	if (poll(&pfd, 1, 0) == 0)
		return CURL_PREREQFUNC_OK;
	a->stale = true;
	return CURL_PREREQFUNC_ABORT;
}

/* ---------------------------------------------------------------------
 * One attempt
 * ---------------------------------------------------------------------
 */

static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	DmAttempt  *a = (DmAttempt *) userdata;
	size_t		n = size * nmemb;

	if (a->body->len + n > DM_MAX_RESPONSE_BYTES)
	{
		a->too_large = true;
		return 0;				/* aborts the transfer */
	}
	appendBinaryStringInfo(a->body, ptr, n);
	return n;
}

static int
xferinfo_cb(void *p, curl_off_t dltotal, curl_off_t dlnow,
			curl_off_t ultotal, curl_off_t ulnow)
{
	/* abort now; CHECK_FOR_INTERRUPTS() in the driver raises the real error */
	return (QueryCancelPending || ProcDiePending) && INTERRUPTS_CAN_BE_PROCESSED();
}

/* Wipes header values (the Authorization header holds a JWS) and frees. */
static void
free_headers(struct curl_slist *headers)
{
	for (struct curl_slist *h = headers; h != NULL; h = h->next)
		explicit_bzero(h->data, strlen(h->data));
	curl_slist_free_all(headers);
}

static void
add_header(DmAttempt *a, const char *header)
{
	struct curl_slist *n = curl_slist_append(a->headers, header);

	if (n == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	a->headers = n;
}

void
dm_attempt_cleanup(DmAttempt *a)
{
	free_headers(a->headers);
	a->headers = NULL;
	dm_secret_free(a->req.bearer);
	a->req.bearer = NULL;
}

#define SETOPT(opt, val) \
	do { if (curl_easy_setopt(easy, (opt), (val)) != CURLE_OK) ok = false; } while (0)

bool
dm_attempt_setup(CURL *easy, DmAttempt *a, DmHttpBuild build, void *arg, int attempt)
{
	bool		ok = true;
	bool		post;

	a->easy = easy;
	a->too_large = false;
	a->stale = false;
	a->result = XFER_ABORTED;
	a->request_sent = false;
	a->errbuf[0] = '\0';
	resetStringInfo(a->body);
	memset(&a->req, 0, sizeof(a->req));
	build(arg, attempt, &a->req);
	post = strcmp(a->req.method, "POST") == 0;

	add_header(a, "Accept: application/json");
	if (a->req.bearer != NULL)
	{
		char	   *auth = psprintf("Authorization: Bearer %s", a->req.bearer);

		PG_TRY();
		{
			add_header(a, auth);
		}
		PG_FINALLY();
		{
			dm_secret_free(auth);
		}
		PG_END_TRY();
	}
	if (post)
		add_header(a, a->req.body ? "Content-Type: application/json" : "Content-Type:");
	add_header(a, "Expect:");

	curl_easy_reset(easy);
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_URL, a->req.url);
	SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);
	SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
	SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
	SETOPT(CURLOPT_SSLVERSION, (long) CURL_SSLVERSION_TLSv1_2);
	if (dm_ca_file != NULL && dm_ca_file[0] != '\0')
		SETOPT(CURLOPT_CAINFO, dm_ca_file);
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long) dm_connect_timeout_ms);
	SETOPT(CURLOPT_TIMEOUT_MS, (long) dm_timeout_ms);
	SETOPT(CURLOPT_HTTPHEADER, a->headers);
	SETOPT(CURLOPT_USERAGENT, "digime/" DIGIME_VERSION " (PostgreSQL extension)");
	SETOPT(CURLOPT_ACCEPT_ENCODING, "");
	SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) DM_MAX_RESPONSE_BYTES);
	SETOPT(CURLOPT_WRITEFUNCTION, write_cb);
	SETOPT(CURLOPT_WRITEDATA, a);
	SETOPT(CURLOPT_NOPROGRESS, 0L);
	SETOPT(CURLOPT_XFERINFOFUNCTION, xferinfo_cb);
	SETOPT(CURLOPT_ERRORBUFFER, a->errbuf);
	SETOPT(CURLOPT_SOCKOPTFUNCTION, sockopt_cb);
	SETOPT(CURLOPT_CLOSESOCKETFUNCTION, closesocket_cb);
	SETOPT(CURLOPT_PREREQFUNCTION, prereq_cb);
	SETOPT(CURLOPT_PREREQDATA, a);
	if (post)
	{
		SETOPT(CURLOPT_POST, 1L);
		SETOPT(CURLOPT_POSTFIELDS, a->req.body ? a->req.body : "");
		SETOPT(CURLOPT_POSTFIELDSIZE, (long) (a->req.body ? strlen(a->req.body) : 0));
	}
	else
		SETOPT(CURLOPT_HTTPGET, 1L);
	if (!ok)
		strlcpy(a->errbuf, "could not configure the libcurl handle", sizeof(a->errbuf));
	return ok;
}

static char *
response_header(CURL *easy, const char *name)
{
	struct curl_header *h;

	if (curl_easy_header(easy, name, 0, CURLH_HEADER, -1, &h) == CURLHE_OK &&
		h->value != NULL)
		return pstrdup(h->value);
	return NULL;
}

static XferResult
classify(CURLcode rc, const DmAttempt *a)
{
	switch (rc)
	{
		case CURLE_OK:
			return XFER_OK;
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
			return XFER_DNS;
		case CURLE_COULDNT_CONNECT:
			return XFER_CONNECT;
		case CURLE_OPERATION_TIMEDOUT:
			return XFER_TIMEOUT;
		case CURLE_SSL_CONNECT_ERROR:
			return XFER_TLS;
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
			return XFER_TLS_VERIFY;
		case CURLE_SSL_CACERT_BADFILE:
			return XFER_CA_FILE;
		case CURLE_ABORTED_BY_CALLBACK:
			return a->stale ? XFER_STALE : XFER_ABORTED;
		case CURLE_FILESIZE_EXCEEDED:
			return XFER_TOO_LARGE;
		case CURLE_WRITE_ERROR:
			return a->too_large ? XFER_TOO_LARGE : XFER_NETWORK;
		default:
			return XFER_NETWORK;
	}
}

void
dm_attempt_finish(CURL *easy, CURLcode rc, DmAttempt *a, DmHttpResponse *resp)
{
	long		sent = 0;

	if (a->errbuf[0] == '\0')
		strlcpy(a->errbuf, curl_easy_strerror(rc), sizeof(a->errbuf));
	a->result = classify(rc, a);
	if (a->result == XFER_STALE)
	{
		a->stale_count++;
		strlcpy(a->errbuf, "a kept-alive connection had unread bytes", sizeof(a->errbuf));
	}
	if (curl_easy_getinfo(easy, CURLINFO_REQUEST_SIZE, &sent) != CURLE_OK)
		sent = 1;				/* unknown: assume it was sent */
	a->request_sent = sent > 0;

	memset(resp, 0, sizeof(*resp));
	resp->body = *a->body;
	if (a->result == XFER_OK)
	{
		char	   *ct = NULL;

		curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &resp->status);
		if (curl_easy_getinfo(easy, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct)
			resp->content_type = pstrdup(ct);
		resp->x_error_code = response_header(easy, "X-Error-Code");
		resp->x_error_message = response_header(easy, "X-Error-Message");
		resp->x_error_reference = response_header(easy, "X-Error-Reference");
		resp->retry_after = response_header(easy, "Retry-After");
	}
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, NULL);
}

/* ---------------------------------------------------------------------
 * The retry rule
 * ---------------------------------------------------------------------
 */

static long
backoff_ms(int attempt)
{
	long		ms = DM_BACKOFF_BASE_MS;

	for (int i = 0; i < attempt && ms < DM_BACKOFF_CAP_MS; i++)
		ms *= 2;
	return Min(ms, DM_BACKOFF_CAP_MS) + (long) (pg_prng_uint32(&pg_global_prng_state) % 101);
}

/* Retry-After in ms (delta-seconds or HTTP-date), -1 when absent/unparsable. */
static long
retry_after_ms(const char *value)
{
	char	   *end;
	long		secs;

	if (value == NULL)
		return -1;
	secs = strtol(value, &end, 10);
	if (end != value && *end == '\0' && secs >= 0)
		return secs > LONG_MAX / 1000 ? LONG_MAX : secs * 1000;
	else
	{
		time_t		when = curl_getdate(value, NULL);

		if (when == -1)
			return -1;
		return Max((long) (when - time(NULL)), 0L) * 1000;
	}
}

static bool
retryable_status(long status, DmRetryPolicy policy)
{
	if (status == 429 || status == 503)
		return true;
	return policy == DM_RETRY_IDEMPOTENT && (status == 502 || status == 504);
}

static bool
retryable_failure(const DmAttempt *a, DmRetryPolicy policy)
{
	switch (a->result)
	{
		case XFER_DNS:
		case XFER_CONNECT:
		case XFER_TLS:
			return true;
		case XFER_TIMEOUT:
		case XFER_NETWORK:
		case XFER_STALE:
			return !a->request_sent || policy == DM_RETRY_IDEMPOTENT;
		default:
			return false;
	}
}

DmNext
dm_attempt_next(const DmAttempt *a, const DmHttpResponse *resp, int attempt,
				DmRetryPolicy policy, long *delay_ms)
{
	bool		last = attempt >= dm_retry_limit;

	if (a->result == XFER_STALE && a->stale_count <= DM_MAX_STALE)
		return DM_NEXT_AGAIN;
	if (a->result == XFER_OK)
	{
		long		delay;

		if (last || !retryable_status(resp->status, policy))
			return DM_NEXT_DONE;
		delay = retry_after_ms(resp->retry_after);
		if (delay > DM_RETRY_AFTER_CAP_MS)
			return DM_NEXT_DONE;	/* the server wants longer than we wait */
		*delay_ms = delay >= 0 ? delay : backoff_ms(attempt);
		return DM_NEXT_RETRY;
	}
	if (last || !retryable_failure(a, policy))
		return DM_NEXT_FAIL;
	*delay_ms = backoff_ms(attempt);
	return DM_NEXT_RETRY;
}

void
dm_attempt_raise(const DmAttempt *a, int attempts)
{
	int			sqlstate = ERRCODE_CONNECTION_FAILURE;
	const char *msg;
	const char *hint = NULL;

	switch (a->result)
	{
		case XFER_DNS:
			sqlstate = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			msg = "could not resolve the host name of the digi.me API";
			break;
		case XFER_CONNECT:
			sqlstate = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			msg = "could not connect to the digi.me API";
			break;
		case XFER_TLS:
			sqlstate = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			msg = "TLS handshake with the digi.me API failed";
			break;
		case XFER_TLS_VERIFY:
			sqlstate = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			msg = "could not verify the TLS certificate of the digi.me API";
			hint = "If the API uses a private CA, set digime.ca_file to its PEM bundle.";
			break;
		case XFER_CA_FILE:
			sqlstate = ERRCODE_CONFIG_FILE_ERROR;
			msg = "could not load the CA bundle named by digime.ca_file";
			hint = "digime.ca_file must name a PEM file of CA certificates that the server can read.";
			break;
		case XFER_TIMEOUT:
			if (!a->request_sent)
			{
				sqlstate = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
				msg = "connecting to the digi.me API timed out";
				hint = "The limit is digime.connect_timeout_ms.";
			}
			else
			{
				msg = "request to the digi.me API timed out";
				hint = "The limit is digime.timeout_ms.";
			}
			break;
		case XFER_TOO_LARGE:
			sqlstate = ERRCODE_DIGIME_MALFORMED_RESPONSE;
			msg = "answer of the digi.me API is larger than 1 MB";
			break;
		case XFER_ABORTED:
			sqlstate = ERRCODE_QUERY_CANCELED;
			msg = "request to the digi.me API was interrupted";
			break;
		default:
			msg = "connection to the digi.me API failed";
			break;
	}
	ereport(ERROR,
			(errcode(sqlstate),
			 errmsg("%s", msg),
			 errdetail_internal("%s %s, attempt %d: %s", a->req.method, a->req.url,
								attempts, a->errbuf),
			 hint ? errhint("%s", hint) : 0));
}

/* ---------------------------------------------------------------------
 * Blocking driver
 * ---------------------------------------------------------------------
 */

static CURLM *dm_multi = NULL;
static CURL *dm_easy = NULL;

/* Frees the process's blocking handles (closes kept-alive connections). */
static void
blocking_reset(void)
{
	if (dm_multi != NULL && dm_easy != NULL)
		curl_multi_remove_handle(dm_multi, dm_easy);
	if (dm_easy != NULL)
		curl_easy_cleanup(dm_easy);
	if (dm_multi != NULL)
		curl_multi_cleanup(dm_multi);
	dm_easy = NULL;
	dm_multi = NULL;
}

/* One attempt, driven to its end; raises only on interrupt/OOM. */
static void
perform_once(DmAttempt *a, DmHttpBuild build, void *arg, int attempt, DmHttpResponse *resp)
{
	CURLMcode	mc = CURLM_OK;
	CURLcode	rc = CURLE_FAILED_INIT;
	CURLMsg    *msg;
	int			left;

	if (dm_multi == NULL)
		dm_multi = curl_multi_init();
	if (dm_easy == NULL)
		dm_easy = curl_easy_init();
	if (dm_multi == NULL || dm_easy == NULL)
	{
		blocking_reset();
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	}

	PG_TRY();
	{
		if (!dm_attempt_setup(dm_easy, a, build, arg, attempt) ||
			curl_multi_add_handle(dm_multi, dm_easy) != CURLM_OK)
			elog(ERROR, "could not configure the libcurl handle");
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		for (;;)
		{
			int			running = 0;

			CHECK_FOR_INTERRUPTS();
			mc = curl_multi_perform(dm_multi, &running);
			if (mc != CURLM_OK || running == 0)
				break;
			mc = curl_multi_poll(dm_multi, NULL, 0, DM_POLL_MS, NULL);
			if (mc != CURLM_OK)
				break;
		}
		CHECK_FOR_INTERRUPTS();
		pgstat_report_wait_end();
	}
	PG_CATCH();
	{
		dm_attempt_cleanup(a);
		blocking_reset();
		PG_RE_THROW();
	}
	PG_END_TRY();

	while ((msg = curl_multi_info_read(dm_multi, &left)) != NULL)
		if (msg->msg == CURLMSG_DONE && msg->easy_handle == dm_easy)
			rc = msg->data.result;
	if (mc != CURLM_OK)
		strlcpy(a->errbuf, curl_multi_strerror(mc), sizeof(a->errbuf));
	dm_attempt_finish(dm_easy, rc, a, resp);
	if (mc != CURLM_OK)
		a->result = XFER_NETWORK;
	curl_multi_remove_handle(dm_multi, dm_easy);
	free_headers(a->headers);
	a->headers = NULL;
	if (a->result != XFER_OK)
		blocking_reset();
}

/* Sleeps ms milliseconds, or less if interrupted (then raises). */
static void
sleep_interruptible(long ms)
{
	TimestampTz end = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);

	for (;;)
	{
		long		left = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), end);

		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

void
dm_http_request(DmHttpBuild build, void *arg, DmRetryPolicy policy, DmHttpResponse *resp)
{
	DmAttempt	a;

	memset(&a, 0, sizeof(a));
	a.body = makeStringInfo();
	for (int attempt = 0;;)
	{
		long		delay = 0;
		DmNext		next;

		perform_once(&a, build, arg, attempt, resp);
		dm_secret_free(a.req.bearer);
		a.req.bearer = NULL;
		next = dm_attempt_next(&a, resp, attempt, policy, &delay);
		if (next == DM_NEXT_DONE)
		{
			/* the answer keeps its own buffer */
			a.body = makeStringInfo();
			return;
		}
		if (next == DM_NEXT_FAIL)
			dm_attempt_raise(&a, attempt + 1);
		if (next == DM_NEXT_AGAIN)
			continue;
		sleep_interruptible(delay);
		attempt++;
	}
}

static void
build_get(void *arg, int attempt, DmHttpRequest *req)
{
	req->method = "GET";
	req->url = (char *) arg;
}

bool
dm_http_try_get(const char *url, DmHttpResponse *resp)
{
	DmAttempt	a;

	memset(&a, 0, sizeof(a));
	a.body = makeStringInfo();
	do
		perform_once(&a, build_get, (void *) url, 0, resp);
	while (a.result == XFER_STALE && a.stale_count <= DM_MAX_STALE);
	return a.result == XFER_OK;
}
