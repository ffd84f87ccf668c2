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

/* Copy of a CONTEXT text with the values of "... with parameters: $1 = '...'" blanked. */
static char *
redact_parameter_lines(const char *context)
{
	StringInfoData out;
	const char *line = context;

	if (context == NULL || strstr(context, "with parameters:") == NULL)
		return (char *) context;
	initStringInfo(&out);
	while (*line)
	{
		const char *end = strchr(line, '\n');
		size_t		len = end ? (size_t) (end - line + 1) : strlen(line);
		char	   *one = pnstrdup(line, len);

		appendStringInfoString(&out, strstr(one, "with parameters:") ? redact_literals(one) : one);
		line += len;
	}
	return out.data;
}

/*
 * The hook runs before the entry goes to the server log and to the client,
 * and changes to edata reach both.  So an entry that also goes to the
 * client keeps its message (digime's own messages hold no secrets) and only
 * loses what the server log alone would show: the statement (hidden, and a
 * redacted copy put in the log-only detail) and bind parameter values.
 * Entries for the server log alone (log_statement, log_min_duration_statement
 * lines and their parameters) have every literal blanked.
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
		if (!edata->output_to_client)
		{
			edata->message = redact_literals(edata->message);
			edata->detail = redact_literals(edata->detail);
			edata->detail_log = redact_literals(edata->detail_log);
			edata->context = redact_literals(edata->context);
			edata->internalquery = redact_literals(edata->internalquery);
		}
		else
			edata->context = redact_parameter_lines(edata->context);
		if (in_statement && !edata->hide_stmt)
		{
			const char *detail = edata->detail_log ? edata->detail_log : edata->detail;
			char	   *stmt = redact_literals(debug_query_string);

			edata->hide_stmt = true;
			edata->detail_log = detail ?
				psprintf("%s\nStatement, secrets redacted: %s", detail, stmt) :
				psprintf("Statement, secrets redacted: %s", stmt);
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
