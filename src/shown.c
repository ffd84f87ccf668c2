/*-------------------------------------------------------------------------
 *
 * shown.c
 *	  Text chosen by others (the API's answers, a browser's callback URL)
 *	  made safe to repeat in an error message, a log line or a table.
 *
 * IDENTIFICATION
 *	  src/shown.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "util.h"

#include "mb/pg_wchar.h"

char *
dm_shown(const char *s, int max)
{
	int			len = strlen(s);
	char	   *out = pnstrdup(s, len);
	bool		valid = pg_verifymbstr(out, len, true);
	int			cut;

	Assert(max > 3);
	for (unsigned char *c = (unsigned char *) out; *c; c++)
		if (*c < 0x20 || *c == 0x7f || (!valid && *c >= 0x80))
			*c = '?';
	if (len <= max)
		return out;
	cut = pg_mbcliplen(out, len, max - 3);
	strcpy(out + cut, "...");
	return out;
}
