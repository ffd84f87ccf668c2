/*-------------------------------------------------------------------------
 *
 * redact.c
 *	  Keeps secrets passed as arguments out of the server log.
 *
 * A few functions must take a secret as an argument: a contract's private
 * key (digime_add_contract, digime_rotate_contract_key), an authorization
 * code and code_verifier (digime_exchange_code, digime_handle_callback),
 * tokens obtained elsewhere (digime_import_token).  With log_statement,
 * log_min_duration_statement or log_min_error_statement the server would
 * log the statement (and its bind parameters) that carries them.  This
 * emit_log_hook blanks every quoted literal and bind parameter value of a
 * log entry whose statement names one of these functions, and hides the
 * statement line.  It must be installed before the statement is logged:
 * put digime in shared_preload_libraries (or session_preload_libraries).
 * A statement that reaches these functions under another name (a wrapper
 * function of the application) is not recognised; see README, "Caveats".
 *
 * IDENTIFICATION
 *	  src/redact.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "tcop/tcopprot.h"
#include "utils/elog.h"

static emit_log_hook_type prev_emit_log_hook = NULL;

static const char *const secret_taking[] = {
	"digime_add_contract",
	"digime_rotate_contract_key",
	"digime_exchange_code",
	"digime_handle_callback",
	"digime_import_token",
	NULL
};

static bool
names_secret_function(const char *s)
{
	if (s == NULL)
		return false;
	for (const char *const *f = secret_taking; *f; f++)
		if (strcasestr(s, *f) != NULL)
			return true;
	return false;
}

/*
 * Copy of s with the contents of '...' (also E'...'), "parameters: $n = '...'"
 * values and $tag$...$tag$ strings replaced by ***.
 */
static char *
redact_literals(const char *s)
{
	StringInfoData out;
	const char *p = s;

	if (s == NULL)
		return NULL;
	initStringInfo(&out);
	while (*p)
	{
		if (*p == '\'')
		{
			bool		backslash = p > s && (p[-1] == 'E' || p[-1] == 'e');

			p++;
			while (*p)
			{
				if (backslash && *p == '\\' && p[1])
					p += 2;
				else if (*p == '\'' && p[1] == '\'')
					p += 2;
				else if (*p == '\'')
					break;
				else
					p++;
			}
			appendStringInfoString(&out, "'***'");
			if (*p)
				p++;
		}
		else if (*p == '$' && (p[1] == '$' || isalpha((unsigned char) p[1]) || p[1] == '_'))
		{
			const char *tag_end = strchr(p + 1, '$');
			size_t		tag_len;
			const char *close;

			if (tag_end == NULL || strspn(p + 1, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") != (size_t) (tag_end - p - 1))
			{
				appendStringInfoChar(&out, *p++);
				continue;
			}
			tag_len = tag_end - p + 1;
			close = strstr(tag_end + 1, pnstrdup(p, tag_len));
			appendStringInfoString(&out, "'***'");
			p = close ? close + tag_len : p + strlen(p);
		}
		else
			appendStringInfoChar(&out, *p++);
	}
	return out.data;
}

static void
digime_emit_log_hook(ErrorData *edata)
{
	bool		in_statement = names_secret_function(debug_query_string);

	if (in_statement || names_secret_function(edata->message) ||
		names_secret_function(edata->detail) || names_secret_function(edata->context) ||
		names_secret_function(edata->internalquery))
	{
		edata->message = redact_literals(edata->message);
		edata->detail = redact_literals(edata->detail);
		edata->detail_log = redact_literals(edata->detail_log);
		edata->context = redact_literals(edata->context);
		edata->internalquery = redact_literals(edata->internalquery);
		if (in_statement && !edata->hide_stmt)
		{
			edata->hide_stmt = true;
			if (edata->elevel >= ERROR)
			{
				char	   *stmt = redact_literals(debug_query_string);

				edata->context = edata->context ?
					psprintf("%s\nstatement (secrets redacted): %s", edata->context, stmt) :
					psprintf("statement (secrets redacted): %s", stmt);
			}
		}
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
dm_redact_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = digime_emit_log_hook;
}
