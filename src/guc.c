/*-------------------------------------------------------------------------
 *
 * guc.c
 *	  Every digime.* setting and its check hooks (README, "Settings").
 *
 * IDENTIFICATION
 *	  src/guc.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "guc.h"
#include "util.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include <limits.h>

char	   *dm_base_url = NULL;
char	   *dm_onboard_url = NULL;
char	   *dm_ca_file = NULL;
int			dm_timeout_ms = 30000;
int			dm_connect_timeout_ms = 10000;
int			dm_retry_limit = 2;
int			dm_jwks_cache_ttl = 3600;
char	   *dm_agent_name = NULL;
char	   *dm_agent_version = NULL;
int			dm_authorization_ttl = 3600;
int			dm_refresh_margin = 60;
char	   *dm_end_user = NULL;
char	   *dm_key_file = NULL;
char	   *dm_previous_key_file = NULL;
int			dm_worker_naptime = 10;
int			dm_worker_max_inflight = 32;
int			dm_worker_queue_size = 64;
int			dm_worker_lock_timeout = 1000;
int			dm_inbox_max_attempts = 5;
bool		dm_auto_refresh = false;
int			dm_auto_refresh_within = 900;
int			dm_auto_refresh_interval = 300;
int			dm_authorization_retention = 7 * 86400;
int			dm_audit_retention = 90 * 86400;

#define DAY_S 86400

/*
 * digime.base_url / digime.onboard_url: must be https (http only to a
 * loopback address); a missing trailing slash is added, as the SDK does.
 */
static bool
check_endpoint_url(char **newval, void **extra, GucSource source)
{
	const char *why;
	size_t		len;

	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The URL must not be empty.");
		return false;
	}
	if (!dm_url_allowed(*newval, &why))
	{
		GUC_check_errdetail("%s", why);
		return false;
	}
	len = strlen(*newval);
	if ((*newval)[len - 1] != '/')
	{
		char	   *with_slash = malloc(len + 2);

		if (with_slash == NULL)
			return false;
		memcpy(with_slash, *newval, len);
		with_slash[len] = '/';
		with_slash[len + 1] = '\0';
		free(*newval);
		*newval = with_slash;
	}
	return true;
}

static bool
check_ca_file(char **newval, void **extra, GucSource source)
{
	if (*newval != NULL && (*newval)[0] != '\0' && !is_absolute_path(*newval))
	{
		GUC_check_errdetail("digime.ca_file must be an absolute path.");
		return false;
	}
	return true;
}

static bool
check_agent(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("The SDK identity sent to digi.me must not be empty.");
		return false;
	}
	return true;
}

const char *
dm_guc_end_user(void)
{
	return (dm_end_user != NULL && dm_end_user[0] != '\0') ? dm_end_user : NULL;
}

static void
define_api_settings(void)
{
	DefineCustomStringVariable("digime.base_url",
							   "Base URL of the digi.me API.",
							   "Every API call goes to a path below it. https only, "
							   "or http to a loopback address.",
							   &dm_base_url, "https://api.digi.me/v1.7/",
							   PGC_SUSET, 0, check_endpoint_url, NULL, NULL);
	DefineCustomStringVariable("digime.onboard_url",
							   "Base URL of the digi.me onboarding web app.",
							   "Authorization URLs returned to applications start with it.",
							   &dm_onboard_url, "https://api.digi.me/apps/saas/",
							   PGC_SUSET, 0, check_endpoint_url, NULL, NULL);
	DefineCustomStringVariable("digime.ca_file",
							   "Extra CA bundle (PEM) trusted for the digi.me API.",
							   "Trusted in addition to the system CA directory. "
							   "TLS peer and host verification are always on.",
							   &dm_ca_file, "",
							   PGC_SUSET, 0, check_ca_file, NULL, NULL);
	DefineCustomIntVariable("digime.timeout_ms",
							"Time limit of one HTTP request to the digi.me API.",
							NULL, &dm_timeout_ms, 30000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.connect_timeout_ms",
							"Time limit for connecting (TCP and TLS) to the digi.me API.",
							NULL, &dm_connect_timeout_ms, 10000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.retry_limit",
							"Retries of a failed digi.me API request.",
							"Only failures that are safe to retry are retried (README, \"Retries\").",
							&dm_retry_limit, 2, 0, 10,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.jwks_cache_ttl",
							"How long a fetched JWKS is trusted before it is fetched again.",
							"0 fetches it for every verification.",
							&dm_jwks_cache_ttl, 3600, 0, 7 * DAY_S,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("digime.agent_name",
							   "SDK name sent to digi.me as agent.sdk.name.",
							   NULL, &dm_agent_name, "digime-postgresql",
							   PGC_SUSET, 0, check_agent, NULL, NULL);
	DefineCustomStringVariable("digime.agent_version",
							   "SDK version sent to digi.me as agent.sdk.version.",
							   NULL, &dm_agent_version, DIGIME_VERSION,
							   PGC_SUSET, 0, check_agent, NULL, NULL);
}

static void
define_flow_settings(void)
{
	DefineCustomIntVariable("digime.authorization_ttl",
							"How long a pending authorization waits for its callback.",
							NULL, &dm_authorization_ttl, 3600, 60, 7 * DAY_S,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.refresh_margin",
							"Refresh a stored access token this long before it expires.",
							NULL, &dm_refresh_margin, 60, 0, DAY_S,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("digime.end_user",
							   "Application end-user identifier stored with new rows.",
							   "Fills the end_user column of user_tokens and authorizations.",
							   &dm_end_user, "",
							   PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.authorization_retention",
							"How long finished authorizations, inbox rows and revoked tokens are kept.",
							"The worker (or digime_purge) deletes them after this.",
							&dm_authorization_retention, 7 * DAY_S, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.audit_retention",
							"How long rows of digime.audit_log are kept.",
							NULL, &dm_audit_retention, 90 * DAY_S, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
}

static void
define_worker_settings(bool preloading)
{
	DefineCustomIntVariable("digime.worker_naptime",
							"How often the digime launcher looks for databases and the workers do "
							"their periodic work (inbox, retention).",
							NULL, &dm_worker_naptime, 10, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.worker_max_inflight",
							"Most digi.me requests one digime worker has in flight at once.",
							NULL, &dm_worker_max_inflight, 32, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.worker_queue_size",
							"Request slots shared by all backends waiting for a digime worker.",
							"A backend waits for a free slot when all are in use.",
							&dm_worker_queue_size, 64, 4, 10000,
							preloading ? PGC_POSTMASTER : PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.worker_lock_timeout",
							"How long a digime worker waits for a row or token that another "
							"transaction holds before the request fails with 55P03.",
							NULL, &dm_worker_lock_timeout, 1000, 10, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.inbox_max_attempts",
							"Attempts at an inbox row that fails transiently before it is marked failed.",
							NULL, &dm_inbox_max_attempts, 5, 1, 100,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("digime.auto_refresh",
							 "Whether the digime worker refreshes expiring tokens on its own.",
							 "Set per database with ALTER DATABASE ... SET.",
							 &dm_auto_refresh, false,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.auto_refresh_within",
							"Automatic refresh takes tokens whose access token expires within this.",
							NULL, &dm_auto_refresh_within, 900, 1, 30 * DAY_S,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("digime.auto_refresh_interval",
							"How often automatic refresh runs.",
							NULL, &dm_auto_refresh_interval, 300, 1, DAY_S,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
}

void
dm_guc_init(bool preloading)
{
	define_api_settings();
	define_flow_settings();
	define_worker_settings(preloading);

	/*
	 * The key files are read once, by the postmaster loading
	 * shared_preload_libraries.  Loaded later, digime cannot define
	 * postmaster-level settings; they are then configuration-file settings
	 * that crypt.c only checks, refusing to touch secrets when one is set.
	 */
	DefineCustomStringVariable("digime.key_file",
							   "File holding the 256-bit key that encrypts secrets at rest.",
							   "Needs shared_preload_libraries = 'digime'.",
							   &dm_key_file, "",
							   preloading ? PGC_POSTMASTER : PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("digime.previous_key_file",
							   "Previous key file, still used to decrypt during key rotation.",
							   NULL, &dm_previous_key_file, "",
							   preloading ? PGC_POSTMASTER : PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	MarkGUCPrefixReserved("digime");
}
