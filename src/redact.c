/*-------------------------------------------------------------------------
 *
 * redact.c
 *	  Keeps secrets passed as arguments out of the server log.
 *
 * A few functions must take a secret as an argument: a contract's private
 * key (digime_add_contract, digime_rotate_contract_key), an authorization
 * code and code_verifier (digime_exchange_code, digime_handle_callback),
 * tokens obtained elsewhere (digime_import_token), callback URLs with their
 * code queued for the worker (digime_submit_callback, INSERT INTO
 * digime.callback_inbox).  With log_statement,
 * log_min_duration_statement or log_min_error_statement the server would
 * log the statement (and its bind parameters) that carries them.  This
 * emit_log_hook blanks the quoted literals and bind parameter values of
 * server-log entries whose statement names one of these functions, and
 * replaces their statement line with a redacted copy; what the client
 * sees is unchanged.  It must be installed before the statement is logged:
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

#include "util.h"

#include "tcop/tcopprot.h"
#include "utils/elog.h"

static emit_log_hook_type prev_emit_log_hook = NULL;

static const char *const secret_taking[] = {
	"digime_add_contract",
	"digime_rotate_contract_key",
	"digime_exchange_code",
	"digime_handle_callback",
	"digime_import_token",
	"digime_submit_callback",
	"callback_inbox",			/* INSERT INTO digime.callback_inbox ... */
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
 * Copy of s with the contents of '...' (also E'...'), "...", $tag$...$tag$
 * strings and "JSON data, line N: ..." excerpts replaced by ***.
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
		if (*p == '\'' || *p == '"')
		{
			char		quote = *p;
			bool		backslash = quote == '\'' && p > s && (p[-1] == 'E' || p[-1] == 'e');

			p++;
			while (*p)
			{
				if (backslash && *p == '\\' && p[1])
					p += 2;
				else if (*p == quote && p[1] == quote)
					p += 2;
				else if (*p == quote)
					break;
				else
					p++;
			}
			appendStringInfoChar(&out, quote);
			appendStringInfoString(&out, "***");
			appendStringInfoChar(&out, quote);
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
		else if (strncmp(p, "JSON data, line ", 16) == 0)
		{
			/* PostgreSQL's JSON input errors quote the input without quotes */
			const char *colon = strstr(p, ": ");
			const char *eol = strchr(p, '\n');

			if (colon == NULL || (eol != NULL && colon > eol))
			{
				appendStringInfoChar(&out, *p++);
				continue;
			}
			appendBinaryStringInfo(&out, p, colon - p + 2);
			appendStringInfoString(&out, "***");
			p = eol ? eol : p + strlen(p);
		}
		else
			appendStringInfoChar(&out, *p++);
	}
	return out.data;
}

/*
 * The hook runs before the entry goes to the server log and to the client,
 * and changes to edata reach both, except detail_log, which is for the
 * server log alone.  So an entry of a statement with secrets that also goes
 * to the client keeps its message and DETAIL for the client (digime's own
 * texts hold no secrets; PostgreSQL's may quote the caller's input, which
 * the caller knows) and gets a redacted detail_log for the log; its CONTEXT,
 * which may quote input too (bind parameters, JSON data), is redacted for
 * both.  Entries for the server log alone (log_statement,
 * log_min_duration_statement lines and their parameters) are redacted
 * whole.  The statement line is replaced by a redacted copy.
 */
static void
digime_emit_log_hook(ErrorData *edata)
{
	bool		in_statement = names_secret_function(debug_query_string);

	if (edata->output_to_server &&
		(in_statement || names_secret_function(edata->message) ||
		 names_secret_function(edata->detail) || names_secret_function(edata->context) ||
		 names_secret_function(edata->internalquery)))
	{
		const char *detail;

		if (!edata->output_to_client)
		{
			edata->message = redact_literals(edata->message);
			edata->detail = redact_literals(edata->detail);
			edata->internalquery = redact_literals(edata->internalquery);
		}
		edata->context = redact_literals(edata->context);
		detail = redact_literals(edata->detail_log ? edata->detail_log : edata->detail);
		if (in_statement && !edata->hide_stmt)
		{
			char	   *stmt = redact_literals(debug_query_string);

			edata->hide_stmt = true;
			detail = detail ?
				psprintf("%s\nStatement, secrets redacted: %s", detail, stmt) :
				psprintf("Statement, secrets redacted: %s", stmt);
		}
		edata->detail_log = (char *) detail;
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
