/*-------------------------------------------------------------------------
 *
 * digime.c
 *	  Module entry point: _PG_init, the digime.* GUCs.
 *
 * IDENTIFICATION
 *	  src/digime.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include <curl/curl.h>

PG_MODULE_MAGIC;

char	   *dm_base_url = NULL;
char	   *dm_onboard_url = NULL;
char	   *dm_ca_file = NULL;
int			dm_timeout_ms = 30000;
int			dm_connect_timeout_ms = 10000;
int			dm_retry_limit = 2;
int			dm_jwks_cache_ttl = 3600;
int			dm_authorization_ttl = 3600;
int			dm_refresh_margin = 60;
char	   *dm_agent_name = NULL;
char	   *dm_agent_version = NULL;
char	   *dm_end_user = NULL;
char	   *dm_key_file = NULL;
char	   *dm_previous_key_file = NULL;

void		_PG_init(void);

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

void
_PG_init(void)
{
	curl_version_info_data *cv;
	bool		preloading = process_shared_preload_libraries_in_progress;

	/* first: from now on, statements with secrets are logged redacted */
	dm_redact_init();

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not initialize libcurl")));
	cv = curl_version_info(CURLVERSION_NOW);
	if (!(cv->features & CURL_VERSION_ASYNCHDNS))
		ereport(WARNING,
				(errmsg("libcurl was built without an asynchronous resolver"),
				 errdetail("Query cancel cannot interrupt a DNS lookup of the digi.me API.")));

	DefineCustomStringVariable("digime.base_url",
							   "Base URL of the digi.me API.",
							   "Every API call goes to a path below it. https only, "
							   "or http to a loopback address.",
							   &dm_base_url,
							   "https://api.digi.me/v1.7/",
							   PGC_SUSET, 0,
							   check_endpoint_url, NULL, NULL);
	DefineCustomStringVariable("digime.onboard_url",
							   "Base URL of the digi.me onboarding web app.",
							   "Authorization URLs returned to applications start with it.",
							   &dm_onboard_url,
							   "https://api.digi.me/apps/saas/",
							   PGC_SUSET, 0,
							   check_endpoint_url, NULL, NULL);
	DefineCustomStringVariable("digime.ca_file",
							   "Extra CA bundle (PEM) trusted for the digi.me API.",
							   "Trusted in addition to the system CA directory. "
							   "TLS peer and host verification are always on.",
							   &dm_ca_file,
							   "",
							   PGC_SUSET, 0,
							   check_ca_file, NULL, NULL);
	DefineCustomIntVariable("digime.timeout_ms",
							"Time limit of one HTTP request to the digi.me API.",
							NULL,
							&dm_timeout_ms,
							30000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("digime.connect_timeout_ms",
							"Time limit for connecting (TCP and TLS) to the digi.me API.",
							NULL,
							&dm_connect_timeout_ms,
							10000, 100, 600000,
							PGC_SUSET, GUC_UNIT_MS,
							NULL, NULL, NULL);
	DefineCustomIntVariable("digime.retry_limit",
							"Retries of a failed digi.me API request.",
							"Only failures that are safe to retry are retried (README, \"Retries\").",
							&dm_retry_limit,
							2, 0, 10,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("digime.jwks_cache_ttl",
							"How long a fetched JWKS is trusted before it is fetched again.",
							"0 fetches it for every verification.",
							&dm_jwks_cache_ttl,
							3600, 0, 7 * 86400,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("digime.authorization_ttl",
							"How long a pending authorization waits for its callback.",
							NULL,
							&dm_authorization_ttl,
							3600, 60, 7 * 86400,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("digime.refresh_margin",
							"Refresh a stored access token this long before it expires.",
							NULL,
							&dm_refresh_margin,
							60, 0, 86400,
							PGC_USERSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomStringVariable("digime.agent_name",
							   "SDK name sent to digi.me as agent.sdk.name.",
							   NULL,
							   &dm_agent_name,
							   "digime-postgresql",
							   PGC_SUSET, 0,
							   check_agent, NULL, NULL);
	DefineCustomStringVariable("digime.agent_version",
							   "SDK version sent to digi.me as agent.sdk.version.",
							   NULL,
							   &dm_agent_version,
							   DIGIME_VERSION,
							   PGC_SUSET, 0,
							   check_agent, NULL, NULL);
	DefineCustomStringVariable("digime.end_user",
							   "Application end-user identifier stored with new rows.",
							   "Fills the end_user column of user_tokens and authorizations.",
							   &dm_end_user,
							   "",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);

	/*
	 * The key files are read once, by the postmaster loading
	 * shared_preload_libraries.  Loaded later, digime cannot define
	 * postmaster-level settings; they are then configuration-file settings
	 * that crypt.c only checks, refusing to touch secrets when one is set.
	 */
	DefineCustomStringVariable("digime.key_file",
							   "File holding the 256-bit key that encrypts secrets at rest.",
							   "Needs shared_preload_libraries = 'digime'.",
							   &dm_key_file,
							   "",
							   preloading ? PGC_POSTMASTER : PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
	DefineCustomStringVariable("digime.previous_key_file",
							   "Previous key file, still used to decrypt during key rotation.",
							   NULL,
							   &dm_previous_key_file,
							   "",
							   preloading ? PGC_POSTMASTER : PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	MarkGUCPrefixReserved("digime");

	dm_crypt_init(preloading);
}
