/*-------------------------------------------------------------------------
 *
 * hint.c
 *	  A HINT for PostgreSQL's own "permission denied" errors on digime's
 *	  objects: a role that was never granted a contract meets them before
 *	  any digime code runs (no USAGE on schema digime, no EXECUTE on the
 *	  functions), and PostgreSQL does not say what to do.  This
 *	  emit_log_hook adds "an administrator grants ... with
 *	  digime_grant_contract" to them; it needs the library preloaded.
 *
 * IDENTIFICATION
 *	  src/hint.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "util.h"

#include "utils/elog.h"

static emit_log_hook_type prev_emit_log_hook = NULL;

/* Objects of the extension an application role may be granted. */
static const char *const denied_messages[] = {
	"permission denied for schema digime",
	"permission denied for function digime_",
	"permission denied for procedure digime_",
	"permission denied for table user_tokens",
	"permission denied for table authorizations",
	"permission denied for table callback_inbox",
	"permission denied for table audit_log",
	"permission denied for view user_tokens_info",
	"permission denied for view contracts_info",
	NULL
};

static void
hint_hook(ErrorData *edata)
{
	if (edata->elevel >= ERROR && edata->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE &&
		edata->hint == NULL && edata->message != NULL)
	{
		for (const char *const *m = denied_messages; *m; m++)
			if (strncmp(edata->message, *m, strlen(*m)) == 0)
			{
				edata->hint = pstrdup("An administrator lets a role use digime with "
									  "digime.digime_grant_contract(contract_id, role).");
				break;
			}
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
dm_hint_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = hint_hook;
}
