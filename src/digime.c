/*-------------------------------------------------------------------------
 *
 * digime.c
 *	  Module entry point: _PG_init, one call per subsystem.
 *
 * IDENTIFICATION
 *	  src/digime.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "crypt.h"
#include "guc.h"
#include "util.h"
#include "worker/worker.h"

#include "fmgr.h"
#include "miscadmin.h"

#include <curl/curl.h>

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	curl_version_info_data *cv;
	bool		preloading = process_shared_preload_libraries_in_progress;

	/* first: from now on, statements with secrets are logged redacted */
	dm_redact_init();
	dm_hint_init();

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not initialize libcurl")));
	cv = curl_version_info(CURLVERSION_NOW);
	if (!(cv->features & CURL_VERSION_ASYNCHDNS))
		ereport(WARNING,
				(errmsg("libcurl was built without an asynchronous resolver"),
				 errdetail("Query cancel cannot interrupt a DNS lookup of the digi.me API.")));

	dm_guc_init(preloading);
	dm_crypt_init(preloading);
	if (preloading)
		dm_worker_preload_init();
}
